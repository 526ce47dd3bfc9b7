"""In-memory synthetic data: needs no files, no TensorFlow and no network.

Used by the CPU quick start, the tests, and benchmarks on machines without tfds.
Example r of the batch at step s is a pure function of (seed, split, s, r): a
resumed run sees the same data, and each process makes only its own rows of
the global batch, so any process count sees the same global batch.

Every source yields the trainer's batch layout:
  tokens int32[B, T], targets int32[B, T], loss_weights float32[B, T],
  and for image-text sources images float32[B, I, H, W, 3], or the packed
  patches of `mmjax.data.patches` (with segment_ids and positions) when the
  scenes keep each image's own size.
"""
import dataclasses

import numpy as np

from mmjax.data import anyres
from mmjax.data import base
from mmjax.data import images as image_codec
from mmjax.data import patches
from mmjax.data import tiles as tiles_lib
from mmjax.data import tokenizers


def _shift(rows: list[list[int]], seq_len: int, pad_id: int, loss_from: list[int]):
  """Next-token inputs/targets from whole sequences; the loss starts at loss_from[b]."""
  tokens = np.full((len(rows), seq_len + 1), pad_id, np.int32)
  weights = np.zeros((len(rows), seq_len), np.float32)
  for b, row in enumerate(rows):
    row = row[:seq_len + 1]
    tokens[b, :len(row)] = row
    weights[b, loss_from[b]:len(row) - 1] = 1.0  # targets tokens[loss_from + 1:len(row)]
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights}


class ArithmeticText(base.Source):
  """Byte-level sentences such as "17+25=42. ": learnable, so a falling loss means something."""

  def __init__(self, batch_size: int, seq_len: int, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.seq_len = seq_len

  def __repr__(self):
    return (f"ArithmeticText(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"seed={self.seed}, split={self.split!r}, rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = []
    for _, rng in self.rows(step):
      text = ""
      while len(text) < self.seq_len:
        a, b = rng.integers(0, 100, size=2)
        text += f"{a}+{b}={a + b}. "
      rows.append([self.tokenizer.bos_id] + self.tokenizer.encode(text[:self.seq_len]))
    return _shift(rows, self.seq_len, self.tokenizer.pad_id, [0] * len(rows))


COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
KINDS = ("square", "circle")
PLACES = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "count", "position")
TASKS = ("vqa", "caption", "mixed")
SCENE_SIZES = ("fixed", "varied")


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  place: str


class ShapeScenes(base.Source):
  """One to `max_shapes` (<= 4) coloured squares and circles, each in its own quadrant.

  Tasks: "vqa" asks one question per image, of three types:
    colour    "what colour is the circle?" -> "red"  (asked when one circle is present)
    count     "how many squares are there?" -> "two"
    position  "where is the blue square?" -> "top right"
  "caption" describes the whole scene ("a red circle top left, a blue square
  bottom right."); "mixed" draws either per example. Colours are distinct
  within an image and uniform over images, so the question alone leaves the
  answer at chance: only a model that reads the image can beat it.

  Each sample is [BOS] + image_tokens placeholders + question bytes + " ", then
  the answer (or caption) + [EOS], with the loss on the answer and EOS only.
  prefix_lm (PaliGemma): the placeholders, [BOS], the question (a caption's:
  "caption en") and "\n", read both ways (batch["prefix_len"] int32[B]), then the
  answer + [EOS].

  sizes "varied" draws each image's height and width from image_size / 2 to
  2 x image_size (aspect ratios up to 4:1); in a dense batch it is then
  squashed to image_size. With a `layout` (config.data.max_patches: deep
  fusion at native resolution), images keep their own size and each row packs
  examples, with segment ids, until its patch slots, its tokens or
  layout.max_images run out, the last image of a row shrunk to the room left
  when that keeps at least half its patches. With an `anyres.Layout` (early
  fusion with grid_pinpoints: LLaVA-NeXT), each image keeps its size and is cut
  into AnyRes tiles, its prompt holding as many placeholders as its size needs;
  with a `tiles.Layout` (Llama 3.2 Vision's tower), into its tiles, one marker.
  """

  def __init__(self, batch_size: int, seq_len: int | None, image_size: int, image_tokens: int,
               task: str = "vqa", max_shapes: int = 3, image_token_id: int | None = None,
               tokenizer: str = "bytes",
               layout: patches.Layout | anyres.Layout | tiles_lib.Layout | None = None,
               sizes: str = "fixed", prefix_lm: bool = False, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.tokenizer = tokenizers.load(tokenizer)
    if task not in TASKS:
      raise ValueError(f"config.data.task must be one of {TASKS}, got {task!r}")
    check_max_shapes(max_shapes)
    if sizes not in SCENE_SIZES:
      raise ValueError(f"config.data.scene_sizes must be one of {SCENE_SIZES}, got {sizes!r}")
    self.max_shapes = max_shapes
    self.task = task
    self.image_size = image_size
    # P per image for early fusion (AnyRes: the most an image can take), 1 for deep fusion
    self.image_tokens = image_tokens
    self.image_token_id = self.tokenizer.image_id if image_token_id is None else image_token_id
    self.layout = layout
    self.sizes = sizes
    self.prefix_lm = prefix_lm  # PaliGemma's layout (tokenizers.encode_prefix_lm), prefix_len
    # Inputs exclude the final EOS.
    needed = max(prompt + answer for prompt, answer in self._longest_texts())
    self.seq_len = seq_len or needed * (layout.max_images if layout else 1)
    if self.seq_len < needed:
      raise ValueError(f"config.data.seq_len={seq_len} is too short for {image_tokens} image "
                       f"tokens and a {task} example ({needed} needed)")

  def __repr__(self):
    return (f"ShapeScenes(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"image_size={self.image_size}, image_tokens={self.image_tokens}, "
            f"task={self.task!r}, max_shapes={self.max_shapes}, layout={self.layout}, "
            f"sizes={self.sizes!r}, seed={self.seed}, "
            f"split={self.split!r}, "
            f"rows from {self.first_row})")

  example_types = (*QUESTION_TYPES, "caption")

  def _longest_texts(self) -> list[tuple[int, int]]:
    """(prompt, answer) lengths of the longest examples this task can make."""
    image = 1 + self.image_tokens  # BOS + placeholders
    question = (image + self._most_tokens("how many squares are there? "),
                self._most_tokens("bottom right"))
    task_prefix = self._most_tokens(tokenizers.CAPTION_PREFIX + "\n") if self.prefix_lm else 0
    caption = (image + task_prefix, self._most_tokens(", ".join(["a yellow circle bottom right"]
                                                   * self.max_shapes)) + 1)
    return {"vqa": [question], "caption": [caption], "mixed": [question, caption]}[self.task]

  def _most_tokens(self, text: str) -> int:
    """Tokens that text, the longest of its kind in bytes, bounds: its bytes for the byte
    tokenizer; one more for a subword one (every token holds a byte or more, but a
    pretokenizer may add a leading-space token)."""
    extra = 0 if isinstance(self.tokenizer, tokenizers.ByteTokenizer) else 1
    return len(text.encode("utf-8")) + extra

  def longest_prompt(self) -> int:
    return max(prompt for prompt, _ in self._longest_texts())

  def longest_answer(self) -> int:
    """Tokens of the longest answer or caption, EOS not counted."""
    return max(answer for _, answer in self._longest_texts())

  def scene(self, step: int, row: int, rng: np.random.Generator,
            room: int | None = None) -> dict | None:
    """Row `row` of batch `step`: image float32[H, W, 3], question, answer, type, caption.

    room: patch slots left in a packed row; None when the image cannot fit them.
    """
    del step, row  # drawn from rng, which they seed
    shape = self.image_shape(rng, room)
    if shape is None:
      return None
    image, shapes = draw_scene(rng, shape, int(rng.integers(1, self.max_shapes + 1)))
    if self.layout is None and shape != (self.image_size, self.image_size):
      # One size per dense batch: squashed to image_size, as a fixed-size pipeline would
      # (through 8-bit PNG, as the tfds scenes store theirs).
      image = image_codec.from_bytes(image_codec.to_png(image), self.image_size)
    kind, question, answer = ask(rng, shapes)
    return {"image": image, "question": question, "answer": answer, "type": kind,
            "caption": caption(shapes)}

  def image_shape(self, rng: np.random.Generator, room: int | None) -> tuple[int, int] | None:
    """(height, width) of the next image: image_size square, or drawn ("varied"); with a
    layout, fitted to whole patches and to `room`, or None if that halves it."""
    S = self.image_size
    height, width = (S, S) if self.sizes == "fixed" else rng.integers(S // 2, 2 * S + 1, size=2)
    if not isinstance(self.layout, patches.Layout):
      return height, width
    grid = self.layout.fit_grid(height, width)
    if room is not None:
      fitted = self.layout.fit_grid(height, width, room) if room > self.layout.cls else (0, 0)
      if 2 * fitted[0] * fitted[1] < grid[0] * grid[1]:
        return None
      grid = fitted
    return grid[0] * self.layout.patch, grid[1] * self.layout.patch

  def example(self, step: int, row: int, rng: np.random.Generator,
              room: int | None = None) -> dict | None:
    """One example: image float32[1, H, W, 3] (AnyRes: [(tiles, token sources)]), prompt ids,
    question, answer, type."""
    scene = self.scene(step, row, rng, room)
    if scene is None:
      return None
    task = self.task if self.task != "mixed" else ("vqa", "caption")[rng.integers(2)]
    if task == "caption":
      kind, question, answer = "caption", "", scene["caption"]
    else:
      kind, question, answer = scene["type"], scene["question"], scene["answer"]
    image, placeholders = self.normalise(scene["image"])[None], self.image_tokens
    if isinstance(self.layout, anyres.Layout):
      tiles, sources = self.layout.cut(scene["image"])
      image, placeholders = [(self.normalise(tiles), sources)], len(sources)
    elif isinstance(self.layout, tiles_lib.Layout):
      tiles, ratio = self.layout.cut(scene["image"])
      image = [(self.normalise(tiles), ratio)]
    if self.prefix_lm:
      prompt, _ = tokenizers.encode_prefix_lm(question or tokenizers.CAPTION_PREFIX, None,
                                              [self.image_token_id] * placeholders,
                                              self.tokenizer)
    else:
      prompt = ([self.tokenizer.bos_id] + [self.image_token_id] * placeholders
                + self.tokenizer.encode(question + " " if question else ""))
    return {"image": image, "prompt": prompt,
            "question": question, "answer": answer, "type": kind}

  def examples(self, step: int) -> list[dict]:
    """This process's rows of batch `step`, one example each."""
    return [self.example(step, row, rng) for row, rng in self.rows(step)]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    if isinstance(self.layout, patches.Layout):
      return self.packed_batch(step)
    examples = self.examples(step)
    rows = [e["prompt"] + self.tokenizer.encode(e["answer"]) + [self.tokenizer.eos_id]
            for e in examples]
    loss_from = [len(e["prompt"]) - 1 for e in examples]  # the first target is the answer's
    images = ({"images": np.stack([e["image"] for e in examples])} if self.layout is None
              else self.layout.pack([e["image"] for e in examples]))
    if self.prefix_lm:  # the image and the prompt, read both ways
      images["prefix_len"] = np.array([len(e["prompt"]) for e in examples], np.int32)
    return {**images, **_shift(rows, self.seq_len, self.tokenizer.pad_id, loss_from)}

  def packed_batch(self, step: int) -> dict[str, np.ndarray]:
    """Rows of whole examples with their images at their own sizes (see the class doc)."""
    layout, pad = self.layout, self.tokenizer.pad_id
    shape = (self.local_batch_size, self.seq_len + 1)
    tokens, weights = np.full(shape, pad, np.int32), np.zeros(shape, np.float32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    images = []
    for b, (row, rng) in enumerate(self.rows(step)):
      room, start, kept = layout.slots, 0, []
      while len(kept) < layout.max_images:
        e = self.example(step, row, rng, room)
        if e is None:
          break
        ids = e["prompt"] + self.tokenizer.encode(e["answer"]) + [self.tokenizer.eos_id]
        if start + len(ids) > shape[1]:
          break
        span = slice(start, start + len(ids))
        tokens[b, span], positions[b, span] = ids, np.arange(len(ids))
        segment_ids[b, span] = len(kept) + 1
        weights[b, start + len(e["prompt"]):start + len(ids)] = 1.0  # answer and EOS
        kept.append(e["image"][0])
        start += len(ids)
        room -= patches.tokens_per_image((e["image"].shape[1] // layout.patch,
                                          e["image"].shape[2] // layout.patch), layout.cls)
      images.append(kept)
    # Weight t belongs to target t, token t + 1: an example's first token has no loss.
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights[:, 1:],
            "segment_ids": segment_ids[:, :-1], "positions": positions[:, :-1],
            **layout.pack(images)}


class ShapeClasses(base.Source):
  """Scenes labelled by what is where: a class per (colour, quadrant, kind), 32 in all.

  One shape a scene (max_shapes=1): labels int32[B], one class each (softmax). More: 1 to
  max_shapes shapes, labels float32[B, 32] with a 1 for every shape (multi-hot, a sigmoid per
  class), as multi-label datasets are; a ViT pretrained so is a vision tower whose tokens tell
  squares from circles in the fusion models' scenes (the tiny pair's counting recipe).
  """

  num_classes = len(COLOURS) * len(PLACES) * len(KINDS)

  def __init__(self, batch_size: int, image_size: int, max_shapes: int = 1, **kwargs):
    super().__init__(batch_size, **kwargs)
    check_max_shapes(max_shapes)
    self.image_size = image_size
    self.max_shapes = max_shapes

  def __repr__(self):
    return (f"ShapeClasses(batch_size={self.batch_size}, image_size={self.image_size}, "
            f"max_shapes={self.max_shapes}, seed={self.seed}, split={self.split!r}, "
            f"rows from {self.first_row})")

  @staticmethod
  def label(shape: Shape) -> int:
    return ((list(COLOURS).index(shape.colour) * len(PLACES) + PLACES.index(shape.place))
            * len(KINDS) + KINDS.index(shape.kind))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """-> {"images": float32[B, H, W, 3], "labels": int32[B] or multi-hot float32[B, 32]}."""
    images, labels = [], []
    for _, rng in self.rows(step):
      image, shapes = draw_scene(rng, self.image_size, int(rng.integers(1, self.max_shapes + 1)))
      images.append(image)
      labels.append([self.label(shape) for shape in shapes])
    if self.max_shapes == 1:
      return {"images": self.normalise(np.stack(images)),
              "labels": np.array([classes[0] for classes in labels], np.int32)}
    multi_hot = np.zeros((len(labels), self.num_classes), np.float32)
    for row, classes in enumerate(labels):
      multi_hot[row, classes] = 1.0
    return {"images": self.normalise(np.stack(images)), "labels": multi_hot}


def check_max_shapes(max_shapes: int):
  """Scenes hold a shape per quadrant at most."""
  if not 1 <= max_shapes <= len(PLACES):
    raise ValueError(f"config.data.max_shapes must be in 1..{len(PLACES)}, got {max_shapes}")


def draw_scene(rng: np.random.Generator, size: int | tuple[int, int],
               num_shapes: int) -> tuple[np.ndarray, list[Shape]]:
  """Shapes of distinct colours in distinct quadrants -> (float32[H, W, 3], shapes by
  quadrant), for size S (square) or (H, W)."""
  height, width = (size, size) if isinstance(size, int) else size
  half_height, half_width = height // 2, width // 2
  side = min(height, width)
  places = np.sort(rng.permutation(len(PLACES))[:num_shapes])
  colours = rng.permutation(len(COLOURS))[:num_shapes]
  image = (0.1 * rng.random((height, width, 3))).astype(np.float32)
  y, x = np.mgrid[:height, :width] + 0.5  # pixel centres
  shapes = []
  for place, colour in zip(places, colours):
    kind = KINDS[rng.integers(len(KINDS))]
    smallest = max(2, side // 10)
    radius = rng.integers(smallest, max(side // 4, smallest + 1))  # fits inside its quadrant
    cy = (place // 2) * half_height + rng.integers(radius, half_height - radius + 1)
    cx = (place % 2) * half_width + rng.integers(radius, half_width - radius + 1)
    if kind == "square":
      inside = np.maximum(np.abs(y - cy), np.abs(x - cx)) < radius
    else:
      inside = (y - cy) ** 2 + (x - cx) ** 2 < radius ** 2
    name = list(COLOURS)[colour]
    image[inside] = COLOURS[name]
    shapes.append(Shape(kind, name, PLACES[place]))
  return image, shapes


def caption(shapes: list[Shape]) -> str:
  return ", ".join(f"a {s.colour} {s.kind} {s.place}" for s in shapes) + "."


def ask(rng: np.random.Generator, shapes: list[Shape]) -> tuple[str, str, str]:
  """One question about the scene -> (question type, question, answer)."""
  kind = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
  unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
  if kind == "colour" and unique:
    shape = unique[rng.integers(len(unique))]
    return kind, f"what colour is the {shape.kind}?", shape.colour
  if kind == "count":
    asked = KINDS[rng.integers(len(KINDS))]
    return kind, f"how many {asked}s are there?", NUMBERS[sum(s.kind == asked for s in shapes)]
  shape = shapes[rng.integers(len(shapes))]  # position; also colour with no unique kind
  return "position", f"where is the {shape.colour} {shape.kind}?", shape.place

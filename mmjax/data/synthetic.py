"""In-memory synthetic data: needs no files, no TensorFlow and no network.

Used by the CPU quick start, the tests, and benchmarks on machines without tfds.
Example r of the batch at step s is a pure function of (seed, split, s, r): a
resumed run sees the same data, and each process makes only its own rows of
the global batch, so any process count sees the same global batch.

Every source yields the trainer's batch layout:
  tokens int32[B, T], targets int32[B, T], loss_weights float32[B, T],
  and for image-text sources images float32[B, I, H, W, 3].
"""
import numpy as np

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


SPLITS = {"train": 0, "validation": 1}


class Source:
  """Rows [process_index * B/P, (process_index + 1) * B/P) of each global batch of B."""

  def __init__(self, batch_size: int, seed: int = 0, split: str = "train",
               process_index: int = 0, process_count: int = 1):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    self.batch_size = batch_size
    self.seed = seed
    self.split = split
    self.local_batch_size = batch_size // process_count
    self.first_row = process_index * self.local_batch_size
    self.tokenizer = tokenizers.ByteTokenizer()

  def rngs(self, step: int):
    for row in range(self.first_row, self.first_row + self.local_batch_size):
      yield np.random.default_rng((self.seed, SPLITS[self.split], step, row))


class ArithmeticText(Source):
  """Byte-level sentences such as "17+25=42. ": learnable, so a falling loss means something."""

  def __init__(self, batch_size: int, seq_len: int, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.seq_len = seq_len

  def __repr__(self):
    return (f"ArithmeticText(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"seed={self.seed}, split={self.split!r}, rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = []
    for rng in self.rngs(step):
      text = ""
      while len(text) < self.seq_len:
        a, b = rng.integers(0, 100, size=2)
        text += f"{a}+{b}={a + b}. "
      rows.append([self.tokenizer.bos_id] + self.tokenizer.encode(text[:self.seq_len]))
    return _shift(rows, self.seq_len, self.tokenizer.pad_id, [0] * len(rows))


COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
PLACES = ("top left", "top right", "bottom left", "bottom right")


class ShapeCaptions(Source):
  """A coloured square in one quadrant of a dark image, captioned "a blue square, top right.".

  The caption is only predictable from the image (16 equally likely captions),
  so a fusion model that uses the image gets a visibly lower loss than the LM
  alone. Each sample is [BOS] + image_tokens placeholders + caption; the loss
  covers the caption only.
  """

  def __init__(self, batch_size: int, seq_len: int, image_size: int, image_tokens: int,
               image_token_id: int | None = None, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.seq_len = seq_len
    self.image_size = image_size
    self.image_tokens = image_tokens  # P per image for early fusion, 1 for deep fusion
    self.image_token_id = self.tokenizer.image_id if image_token_id is None else image_token_id

  def __repr__(self):
    return (f"ShapeCaptions(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"image_size={self.image_size}, image_tokens={self.image_tokens}, "
            f"seed={self.seed}, split={self.split!r}, rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    images, rows, prompt_lens = [], [], []
    for rng in self.rngs(step):
      image, colour, place = draw_square(rng, self.image_size)
      images.append(image[None])
      prompt = [self.tokenizer.bos_id] + [self.image_token_id] * self.image_tokens
      caption = self.tokenizer.encode(f"a {colour} square, {place}.")
      rows.append(prompt + caption + [self.tokenizer.eos_id])
      prompt_lens.append(len(prompt) - 1)  # the first target is the caption's first byte
    if max(len(r) for r in rows) > self.seq_len + 1:
      raise ValueError(f"data.seq_len={self.seq_len} is too short for {self.image_tokens} image "
                       f"tokens and a caption ({max(len(r) for r in rows) - 1} needed)")
    return {"images": np.stack(images),
            **_shift(rows, self.seq_len, self.tokenizer.pad_id, prompt_lens)}


class ShapeClasses(Source):
  """The same images labelled by (colour, quadrant): 16 classes, for training a ViT."""

  num_classes = len(COLOURS) * len(PLACES)

  def __init__(self, batch_size: int, image_size: int, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.image_size = image_size

  def __repr__(self):
    return (f"ShapeClasses(batch_size={self.batch_size}, image_size={self.image_size}, "
            f"seed={self.seed}, split={self.split!r}, rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """-> {"images": float32[B, H, W, 3], "labels": int32[B]}."""
    images, labels = [], []
    for rng in self.rngs(step):
      image, colour, place = draw_square(rng, self.image_size)
      images.append(image)
      labels.append(list(COLOURS).index(colour) * len(PLACES) + PLACES.index(place))
    return {"images": np.stack(images), "labels": np.array(labels, np.int32)}


def draw_square(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
  """A square of a random colour in a random quadrant: -> (float32[S, S, 3], colour, place)."""
  half = size // 2
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  place = rng.integers(len(PLACES))
  side = rng.integers(size // 4, half)  # the square fits inside its quadrant
  top = (place // 2) * half + rng.integers(0, half - side + 1)
  left = (place % 2) * half + rng.integers(0, half - side + 1)
  image = (0.1 * rng.random((size, size, 3))).astype(np.float32)
  image[top:top + side, left:left + side] = COLOURS[colour]
  return image, colour, PLACES[place]



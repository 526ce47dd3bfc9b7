"""Sources that read tfds ArrayRecord datasets by index, in a seeded order.

  TfdsScenes          the generated scenes (data.name="tfds_scenes")
  LlavaConversations  a LLaVA JSON + image folder (data.name="llava")
  CocoCaptions        a COCO-style captions JSON + image folder (data.name="coco_captions")
  Documents           text files (data.name="text"), or the text of any prepared tfds dataset
  ImageClasses        class sub-folders (data.name="image_folder"), or the images and labels
                      of any prepared tfds dataset (data.name="tfds")

Row r of global batch s is record order[s * B + r], where `order` is a grain
shuffle of the split's indices, reshuffled every epoch. Each process reads
only its own rows, so P processes together read every record exactly once
per epoch, and batch s is a pure function of (seed, split, s): the trainer's
checkpointed `next_step` is the whole iterator state, and a resumed run sees
exactly the batches an uninterrupted one would have.

Packing (data.pack = k > 1, token sources): row g holds records order[g*k :
(g+1)*k] back to back, each with its own segment id (1..k; 0 is padding) and
positions from 0, so attention, and deep fusion's images, stay inside their
example. A row always takes k records: one that no longer fits is dropped and
counted, so pick k for the length distribution (the warning says how often).
"""
import collections
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging

import grain
import numpy as np
import tensorflow_datasets as tfds

from mmjax import console
from mmjax.data import anyres
from mmjax.data import base
from mmjax.data import builders
from mmjax.data import images as image_codec
from mmjax.data import patches
from mmjax.data import synthetic
from mmjax.data import tokenizers

log = logging.getLogger(__name__)


def hide_accelerators_from_tensorflow():
  """tfds uses TensorFlow when it is installed (large builds need it); it must not take GPU or
  TPU memory from JAX, as big_vision also ensures."""
  if importlib.util.find_spec("tensorflow") is None:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    tf.config.set_visible_devices([], kind)


def arrayrecord(builder_class, config: tfds.core.BuilderConfig,
                data_dir: str | None) -> tfds.core.DatasetBuilder:
  """One of mmjax's builders, writing ArrayRecord into data_dir ("" or None: tfds' default)."""
  return builder_class(config=config, data_dir=data_dir or None,
                       file_format=tfds.core.FileFormat.ARRAY_RECORD)


def open_split(builder: tfds.core.DatasetBuilder, split: str, seed: int, *, prepare: bool = True):
  """The split, read by index, and its record order: order[g] is the record at global position g.

  prepare: build the dataset when it is not built yet (mmjax's own builders).
  A named tfds dataset must already be prepared: nothing is downloaded here.
  """
  if prepare and not builder.is_prepared():
    hide_accelerators_from_tensorflow()
    try:
      # tfds' own lines would say "Downloading" (nothing is) and draw progress bars into log
      # files: one line of mmjax's instead, and the elapsed time while it builds.
      tfds.display_progress_bar(False)
      with console.elapsed(f"building {builder.name} ({builder.builder_config.name}) in "
                           f"{builder.data_dir_root}, once"), contextlib.redirect_stdout(
                               io.StringIO()):
        builder.download_and_prepare()
    except AssertionError as e:
      if "No examples were yielded" not in str(e):
        raise
      raise ValueError(f"{builder.name} ({builder.builder_config.name}): a split has no usable "
                       "examples (the warning above lists the skipped ones)") from e
    except FileExistsError:
      # Another process (another host, or a second run) finished the same build first and its
      # complete copy is in place: read that one.
      log.info("%s was built by another process meanwhile; reading its copy", builder.name)
      builder = tfds.builder_from_directory(builder.data_dir)
    except ModuleNotFoundError as e:
      if e.name != "tensorflow":
        raise
      # tfds shuffles up to 1 GB of examples in memory and spills larger builds to disk with
      # tf.io.gfile. tensorflow-cpu never touches accelerator memory.
      raise RuntimeError(f"building {builder.name} ({builder.builder_config.name}) takes more "
                         "than tfds' 1 GB in-memory buffer, and spilling to disk needs "
                         "TensorFlow: pip install tensorflow-cpu, then run again") from e
  records = builder.as_data_source(split=split)
  return records, grain.MapDataset.range(len(records)).shuffle(seed=seed).repeat()


def named_builder(name: str, data_dir: str) -> tuple[tfds.core.DatasetBuilder, dict[str, str]]:
  """A prepared tfds dataset by name ("mnist", "mnist:3.0.1") -> (builder, {split: its split}).

  Training reads "train"; validation reads "validation", or "test" when there is none.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    raise FileNotFoundError(f"config.data.tfds_name={name!r} is not prepared in "
                            f"{data_dir or tfds.core.constants.DATA_DIR} (config.data.data_dir); "
                            "nothing is downloaded at run time: `tfds build` it first")
  splits = set(builder.info.splits)
  validation = next((s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or validation is None:
    raise ValueError(f"tfds dataset {name} needs a train split and a validation or test split, "
                     f"has {sorted(splits)}")
  return builder, {"train": "train", "validation": validation}


@dataclasses.dataclass
class Example:
  """One example before layout; loss[i] = 1 where ids[i] is a target the loss is on."""
  id: str
  ids: list[int]  # the whole sequence, BOS to EOS
  loss: list[int]
  # In the order of their placeholders: float32[S, S, 3] each, or AnyRes (tiles, sources).
  images: list = dataclasses.field(default_factory=list)


class RecordSource(base.Source):
  """Token examples read by index, laid out one (or `pack`) per row.

  Subclasses set `records` and `order` and turn a record into an Example.
  Batches: tokens, targets int32[b, T], loss_weights float32[b, T], and
  images float32[b, pack * max_images, S, S, 3] when max_images > 0 (slots in
  the order their placeholders appear; unused slots are never read);
  segment_ids and positions int32[b, T] when packing. With a `patches.Layout`
  (deep fusion, config.data.max_patches), each image keeps its aspect ratio,
  shrunk to whole patches within its share of a row's slots (max_patches /
  max_images), and rows pack whole examples until their tokens or slots run
  out: the packed patches, with segment_ids and positions. With an
  `anyres.Layout` (LLaVA-NeXT), each image keeps its size, cut into AnyRes
  tiles: images float32[b, max_images, N, S, S, 3] and image_sources
  int32[b, max_images, L], and the text holds as many placeholders as each
  image's size needs.
  """

  def __init__(self, batch_size: int, seq_len: int, *, tokenizer: str = "bytes", pack: int = 1,
               max_images: int = 0, image_size: int = 0, resize: str = "bilinear",
               layout: patches.Layout | anyres.Layout | None = None, prefix_lm: bool = False,
               **kwargs):
    super().__init__(batch_size, **kwargs)
    if pack < 1:
      raise ValueError(f"config.data.pack must be >= 1, got {pack}")
    check_resize(resize)
    self.resize = resize
    self.seq_len = seq_len
    self.pack = pack
    self.max_images = max_images
    self.image_size = image_size
    self.layout = layout
    # PaliGemma's layout (tokenizers.encode_prefix_lm): batch["prefix_len"], one example a row.
    self.prefix_lm = prefix_lm
    self.tokenizer = tokenizers.load(tokenizer)
    self.counts = collections.Counter()
    self.image_ids: list[int] = []  # the ids that stand for one image (sources with images)

  def __repr__(self):
    return (f"{type(self).__name__}({self.records!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, pack={self.pack}, tokenizer={self.tokenizer!r}, "
            f"seed={self.seed}, rows from {self.first_row})")

  def example(self, record: dict, position: int) -> Example:
    """The record at global position `position` (which seeds any per-epoch choice)."""
    raise NotImplementedError

  def record(self, position: int) -> dict:
    return self.records[int(self.order[position])]

  def image(self, data: bytes):
    """An encoded image as a batch holds it: float32[S, S, 3] (normalised in the batch), at its
    own size in whole patches (normalised), AnyRes (normalised tiles, token sources) or Llama
    3.2 Vision's (normalised tiles, aspect_ratio_id)."""
    if self.layout is None:
      return image_codec.from_bytes(data, self.image_size, self.resize)
    if isinstance(self.layout, patches.Layout):
      return self.normalise(image_codec.from_bytes(data, self._patch_size, self.resize))
    tiles, where = self.layout.cut(image_codec.from_bytes(data))  # AnyRes' sources, or an id
    return self.normalise(tiles), where

  def _patch_size(self, height: int, width: int) -> tuple[int, int]:
    """An image's size in whole patches within its share of a row, so an example always fits
    an empty row."""
    rows, columns = self.layout.fit_grid(height, width, self.layout.slots // self.max_images)
    return rows * self.layout.patch, columns * self.layout.patch

  def placeholders(self, image) -> list[int]:
    """The ids that stand for one image in the text."""
    if isinstance(self.layout, anyres.Layout):
      return self.image_ids[:1] * len(image[1])
    return self.image_ids

  def _slots(self, e: Example) -> int:
    """The patch slots an example's images take in a packed row (none without patches)."""
    if not isinstance(self.layout, patches.Layout):
      return 0
    p = self.layout.patch
    return sum(patches.tokens_per_image((x.shape[0] // p, x.shape[1] // p), self.layout.cls)
               for x in e.images)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = []
    for row, _ in self.rows(step):
      first = (step * self.batch_size + row) * self.pack
      rows.append(self._fit([self.example(self.record(g), g)
                             for g in range(first, first + self.pack)]))
    return self._layout(rows)

  def _fit(self, examples: list[Example | None]) -> list[Example]:
    """The examples that fit one row of seq_len + 1 tokens; the first is truncated if it must be.

    None stands for an example the source skipped (and counted): the row goes without it.
    """
    slots = self.layout.slots if isinstance(self.layout, patches.Layout) else 0
    room, kept = self.seq_len + 1, []
    for e in examples:
      if e is None:
        continue
      if len(e.ids) > room and kept:
        self._count("dropped from a full packed row (lower data.pack or raise data.seq_len)", e.id)
        continue
      if self._slots(e) > slots and kept:
        self._count("dropped from a row whose patch slots are full (lower data.pack or raise "
                    "data.max_patches)", e.id)
        continue
      if len(e.ids) > room:
        self._count("truncated to data.seq_len", e.id)
        e = self._truncate(e, room)
      kept.append(e)
      room -= len(e.ids)
      slots -= self._slots(e)
    return kept

  def _truncate(self, e: Example, length: int) -> Example:
    """e cut to `length` tokens, never inside an image's placeholders: an image whose
    placeholders do not all fit is cut off whole, with its pixels, so no placeholder is left
    to read the next example's image."""
    ids = e.ids[:length]
    if self.image_ids:
      places = [i for i, t in enumerate(ids) if t == self.image_ids[0]]
      whole, used = 0, 0  # images whose placeholders all fit, and their placeholders
      for image in e.images:
        if used + len(self.placeholders(image)) > len(places):
          break
        whole, used = whole + 1, used + len(self.placeholders(image))
      if len(places) > used:
        ids = ids[:places[used]]
      e = dataclasses.replace(e, images=e.images[:whole])
    return dataclasses.replace(e, ids=ids, loss=e.loss[:len(ids)])

  def _count(self, what: str, example_id: str):
    self.counts[what] += 1
    n = self.counts[what]
    if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: counted, not spammed
      log.warning("%s: example %s %s; %d so far", type(self).__name__, example_id, what, n)

  def _layout(self, rows: list[list[Example]]) -> dict[str, np.ndarray]:
    shape = (len(rows), self.seq_len + 1)
    tokens = np.full(shape, self.tokenizer.pad_id, np.int32)
    weights = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for b, examples in enumerate(rows):
      start = 0
      for k, e in enumerate(examples):
        span = slice(start, start + len(e.ids))
        tokens[b, span], weights[b, span] = e.ids, e.loss
        segment_ids[b, span], positions[b, span] = k + 1, np.arange(len(e.ids))
        start += len(e.ids)
    # The loss is on targets: weight t belongs to token t + 1. An example's first
    # token has no loss, so no target crosses from one packed example to the next.
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights[:, 1:]}
    if self.pack > 1 or isinstance(self.layout, patches.Layout):
      batch.update(segment_ids=segment_ids[:, :-1], positions=positions[:, :-1])
    if self.prefix_lm:  # the tokens before the first the loss is on: read both ways
      batch["prefix_len"] = np.array([(e[0].loss + [1]).index(1) if e else 0 for e in rows],
                                     np.int32)
    if self.max_images and self.layout is not None:
      batch.update(self.layout.pack([[image for e in examples for image in e.images]
                                     for examples in rows]))
    elif self.max_images:
      images = np.zeros((len(rows), self.pack * self.max_images, self.image_size,
                         self.image_size, 3), np.float32)
      for b, examples in enumerate(rows):
        for i, image in enumerate(image for e in examples for image in e.images):
          images[b, i] = image
      batch["images"] = self.normalise(images)
    return batch


def check_resize(method: str):
  if method not in image_codec.RESIZE:
    raise ValueError(f"config.data.resize must be one of {sorted(image_codec.RESIZE)}, "
                     f"got {method!r}")


class TfdsScenes(synthetic.ShapeScenes):
  """`synthetic.ShapeScenes`, read from its tfds build (made on first use in data_dir)."""

  def __init__(self, batch_size: int, seq_len: int | None, image_size: int, image_tokens: int,
               *, data_dir: str | None = None, train_size: int = 50_000,
               eval_size: int = 2_000, **kwargs):
    super().__init__(batch_size, seq_len, image_size, image_tokens, **kwargs)
    config = builders.ShapeScenesConfig(image_size=image_size, max_shapes=self.max_shapes,
                                        train_size=train_size, eval_size=eval_size,
                                        seed=self.seed)
    builder = arrayrecord(builders.MmjaxShapeScenes, config, data_dir)
    self.records, self.order = open_split(builder, self.split, self.seed)

  def __repr__(self):
    return (f"TfdsScenes({self.records!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, task={self.task!r}, seed={self.seed}, "
            f"rows from {self.first_row})")

  def record_index(self, step: int, row: int) -> int:
    return int(self.order[step * self.batch_size + row])

  def scene(self, step: int, row: int, rng, room: int | None = None) -> dict:
    del rng, room  # the record is fixed (and never packed); rng still picks a "mixed" task
    record = self.records[self.record_index(step, row)]
    text = {k: record[k].decode("utf-8") for k in ("question", "answer", "type", "caption")}
    return {"image": image_codec.from_bytes(record["images"][0]), **text}


class LlavaConversations(RecordSource):
  """LLaVA conversations from their tfds build, laid out by `tokenizers.encode_conversation`.

  Each "<image>" becomes image_tokens placeholders (or one marker); an example
  keeps its first max_images images, resized to image_size (AnyRes: at their
  own size, cut into tiles, each taking the placeholders its size needs).
  """

  def __init__(self, batch_size: int, seq_len: int, *, json_path: str, image_dir: str,
               image_tokens: int, image_token_id: int, max_images: int = 1,
               data_dir: str | None = None, **kwargs):
    super().__init__(batch_size, seq_len, max_images=max_images, **kwargs)
    self.image_ids = [image_token_id] * image_tokens
    config = builders.AnnotationsConfig(json_path=json_path, image_dir=image_dir)
    builder = arrayrecord(builders.MmjaxLlava, config, data_dir)
    self.records, self.order = open_split(builder, self.split, self.seed)
    if not len(self.records):
      raise ValueError(f"LLaVA JSON {json_path} has no usable {self.split} examples")

  def example(self, record: dict, position: int) -> Example | None:
    del position
    if len(record["images"]) > self.max_images:  # the placeholders of the rest would read
      self._count("more images than data.max_images", record["id"].decode())  # nothing real
      return None
    images = self._images(record)
    ids, loss = tokenizers.encode_conversation(json.loads(record["conversation"]),
                                               self.tokenizer, self._image_ids(images))
    return Example(record["id"].decode(), ids, loss, images)

  def _images(self, record: dict) -> list:
    return [self.image(data) for data in record["images"][:self.max_images]]

  def _image_ids(self, images: list) -> list[int] | list[list[int]]:
    """The placeholders of every "<image>": the same for each, or AnyRes' per image."""
    return self.image_ids if self.layout is None else [self.placeholders(i) for i in images]

  # The generative evaluator's interface (see evaluate.Generative): each held-out
  # conversation's first question, answered and scored against its first answer.

  example_types = ("conversation",)
  ANSWER_TOKENS = 32  # generated per held-out question at most

  def longest_prompt(self) -> int:
    """Question and answer together stay within the training length (and so the LM's)."""
    return self.seq_len - self.ANSWER_TOKENS - 1

  def longest_answer(self) -> int:
    return self.ANSWER_TOKENS

  def examples(self, step: int) -> list[dict]:
    rows = []
    for row, _ in self.rows(step):
      record = self.record(step * self.batch_size + row)
      question, answer = json.loads(record["conversation"])[:2]
      images = self._images(record)
      ids, loss = tokenizers.encode_conversation([question, answer], self.tokenizer,
                                                 self._image_ids(images))
      if self.layout is None:  # dense slots, the unused ones blank
        dense = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.float32)
        for i, image in enumerate(images):
          dense[i] = image
        images = self.normalise(dense)
      prompt = ids[:loss.index(1)][:self.longest_prompt()]  # a longer question is cut short
      rows.append({"image": images, "prompt": prompt,
                   "question": question["value"], "answer": answer["value"],
                   "type": "conversation"})
    return rows


class CocoCaptions(RecordSource):
  """Captioned images: BOS, the image's placeholders (or marker; AnyRes: as many as its size
  needs), a caption, EOS; loss on the caption. prefix_lm (PaliGemma): the placeholders, BOS,
  "caption en\n", then the caption and EOS.

  Each epoch draws one of the image's captions (seeded by the record's global
  position). Held-out examples carry every caption as references for BLEU/CIDEr.
  """

  example_types = ("caption",)

  def __init__(self, batch_size: int, seq_len: int, *, json_path: str, image_dir: str,
               image_tokens: int, image_token_id: int, data_dir: str | None = None,
               max_references: int = 5, val_json: str = "", val_image_dir: str = "",
               **kwargs):
    super().__init__(batch_size, seq_len, max_images=1, **kwargs)
    self.image_ids = [image_token_id] * image_tokens
    # The longest prompt (an AnyRes image may take fewer placeholders than image_tokens).
    self.prompt = self._prompt(self.image_ids)
    if seq_len <= len(self.prompt) + 1:
      raise ValueError(f"config.data.seq_len={seq_len} leaves no room for a caption after "
                       f"{image_tokens} image tokens")
    self.max_references = max_references
    config = builders.AnnotationsConfig(json_path=json_path, image_dir=image_dir,
                                        validation_json=val_json,
                                        validation_image_dir=val_image_dir)
    builder = arrayrecord(builders.MmjaxCoco, config, data_dir)
    self.records, self.order = open_split(builder, self.split, self.seed)

  def _caption(self, record: dict, position: int) -> str:
    rng = np.random.default_rng((self.seed, base.SPLITS[self.split], position))
    return record["captions"][rng.integers(len(record["captions"]))].decode()

  def _prompt(self, placeholders: list[int]) -> list[int]:
    if self.prefix_lm:
      return tokenizers.encode_prefix_lm(tokenizers.CAPTION_PREFIX, None, placeholders,
                                         self.tokenizer)[0]
    return [self.tokenizer.bos_id] + placeholders

  def example(self, record: dict, position: int) -> Example:
    caption = self.tokenizer.encode(self._caption(record, position)) + [self.tokenizer.eos_id]
    image = self.image(record["images"][0])
    prompt = self._prompt(self.placeholders(image))
    return Example(record["id"].decode(), prompt + caption,
                   [0] * len(prompt) + [1] * len(caption), [image])

  # The generative evaluator's interface (see evaluate.Generative).

  def longest_prompt(self) -> int:
    return len(self.prompt)

  def longest_answer(self) -> int:
    return self.seq_len - len(self.prompt)

  def examples(self, step: int) -> list[dict]:
    rows = []
    for row, _ in self.rows(step):
      record = self.record(step * self.batch_size + row)
      captions = [c.decode() for c in record["captions"]]
      image = self.image(record["images"][0])
      rows.append({"image": [image] if self.layout else self.normalise(image)[None],
                   "prompt": self._prompt(self.placeholders(image)), "question": "",
                   "answer": captions[0], "references": captions[:self.max_references],
                   "type": "caption"})
    return rows


class Documents(RecordSource):
  """Text documents for language-model training: BOS, the text, EOS; loss on all but BOS."""

  def __init__(self, batch_size: int, seq_len: int, records, order, *, text_key: str = "text",
               **kwargs):
    super().__init__(batch_size, seq_len, **kwargs)
    self.records, self.order = records, order
    self.text_key = text_key

  def __repr__(self):
    return (f"Documents({self.records!r}, text_key={self.text_key!r}, "
            f"batch_size={self.batch_size}, seq_len={self.seq_len}, pack={self.pack}, "
            f"tokenizer={self.tokenizer!r}, seed={self.seed}, rows from {self.first_row})")

  def example(self, record: dict, position: int) -> Example:
    text = record[self.text_key]
    ids = ([self.tokenizer.bos_id] + self.tokenizer.encode(
        text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text))
           + [self.tokenizer.eos_id])
    example_id = record["id"].decode() if "id" in record else str(int(self.order[position]))
    return Example(example_id, ids, [0] + [1] * (len(ids) - 1))


class ImageClasses(base.Source):
  """Labelled images -> {"images": float32[b, S, S, 3], "labels": int32[b]}, resized to S."""

  def __init__(self, batch_size: int, image_size: int, records, order, num_classes: int, *,
               image_key: str = "image", label_key: str = "label", resize: str = "bilinear",
               **kwargs):
    super().__init__(batch_size, **kwargs)
    check_resize(resize)
    self.resize = resize
    self.image_size = image_size
    self.records, self.order = records, order
    self.num_classes = num_classes
    self.image_key, self.label_key = image_key, label_key

  def __repr__(self):
    return (f"ImageClasses({self.records!r}, {self.num_classes} classes, "
            f"batch_size={self.batch_size}, image_size={self.image_size}, seed={self.seed}, "
            f"rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    images, labels = [], []
    for row, _ in self.rows(step):
      record = self.records[int(self.order[step * self.batch_size + row])]
      images.append(image_codec.from_bytes(record[self.image_key], self.image_size, self.resize))
      labels.append(record[self.label_key])
    return {"images": self.normalise(np.stack(images)), "labels": np.array(labels, np.int32)}


def image_folder(image_dir: str, split: str, seed: int, data_dir: str | None = None):
  """(records, order, number of classes) of a class-folder dataset, converted on first use."""
  builder = arrayrecord(builders.MmjaxImageFolder, builders.ImageFolderConfig(image_dir=image_dir),
                        data_dir)
  records, order = open_split(builder, split, seed)
  return records, order, builder.info.features["label"].num_classes


def text_files(files: str, text_key: str, split: str, seed: int, data_dir: str | None = None):
  """(records, order) of .txt/.jsonl documents, converted on first use."""
  builder = arrayrecord(builders.MmjaxText, builders.TextConfig(files=files, text_key=text_key),
                        data_dir)
  return open_split(builder, split, seed)

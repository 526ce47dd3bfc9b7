"""tensorflow-datasets builders, written as ArrayRecord and read by index without TensorFlow.

Images are stored as encoded bytes (PNG here; a source's own JPEG/PNG bytes
for user data) in a `Tensor(shape=(), dtype=object)` sequence rather than an
`Image` feature: building `Image` features needs TensorFlow, these need only
tfds and array_record, and reading decodes them with Pillow.
"""
import collections
import hashlib
import json
import os
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import images as image_codec
from mmjax.data import synthetic

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


class ShapeScenesConfig(tfds.core.BuilderConfig):
  """Which scenes to generate; each setting builds its own dataset directory."""

  def __init__(self, *, image_size: int = 32, max_shapes: int = 2, train_size: int = 50_000,
               eval_size: int = 2_000, seed: int = 0):
    super().__init__(name=f"{image_size}px_{max_shapes}shapes_{train_size}_seed{seed}",
                     version="1.0.0",
                     description="generated shape scenes with one question and a caption each")
    self.image_size = image_size
    self.max_shapes = max_shapes
    self.train_size = train_size
    self.eval_size = eval_size
    self.seed = seed


class MmjaxShapeScenes(tfds.core.GeneratorBasedBuilder):
  """The generated scenes of `synthetic.ShapeScenes` as a tfds dataset: train, validation, test.

  Example i of a split ("id": "train/i") is drawn from np.random.default_rng((seed,
  split, i)): the same config always builds the same dataset (tfds stores the
  examples in its own shuffled order). At 32 px about 1,200 scenes a second
  build on a 2-core CPU.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ShapeScenesConfig()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),  # "train/17": example 17 of the train split
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "type": tfds.features.Text(),
        "caption": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    sizes = {"train": self.builder_config.train_size, "validation": self.builder_config.eval_size,
             "test": self.builder_config.eval_size}
    return {split: self._generate_examples(split, size) for split, size in sizes.items()}

  def _generate_examples(self, split: str, size: int):
    config = self.builder_config
    for i in range(size):
      rng = np.random.default_rng((config.seed, SPLIT_SEEDS[split], i))
      image, shapes = synthetic.draw_scene(rng, config.image_size,
                                           int(rng.integers(1, config.max_shapes + 1)))
      kind, question, answer = synthetic.ask(rng, shapes)
      yield i, {"id": f"{split}/{i}", "images": [image_codec.encode_png(image)], "question": question, "answer": answer,
                "type": kind, "caption": synthetic.caption(shapes)}


class LlavaConfig(tfds.core.BuilderConfig):
  """A LLaVA conversation JSON file and the folder its "image" paths are relative to."""

  def __init__(self, *, json_path: str, image_dir: str, validation_percent: int = 2):
    json_path, image_dir = os.path.abspath(json_path), os.path.abspath(image_dir)
    digest = hashlib.sha1(f"{json_path}|{image_dir}|{validation_percent}".encode()).hexdigest()
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(json_path))[0].lower())
    super().__init__(name=f"{stem}_{digest[:10]}", version="1.0.0",
                     description=f"LLaVA conversations from {json_path}")
    self.json_path = json_path
    self.image_dir = image_dir
    self.validation_percent = validation_percent


class MmjaxLlava(tfds.core.GeneratorBasedBuilder):
  """LLaVA-format conversations with their image files' bytes, converted once.

  The JSON is a list of {"id", "image" (optional; a path or a list of paths
  under image_dir), "conversations": [{"from": "human"|"gpt", "value"}, ...]}.
  An example whose image is missing or unreadable, or whose conversation is
  empty or does not alternate human/gpt, is skipped; one warning gives the
  count of each kind and the first few ids. The validation split holds out
  validation_percent of the ids (at least one), chosen by hash so it is stable.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "conversation": tfds.features.Text(),  # the turns, as JSON
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    if not os.path.exists(config.json_path):
      raise FileNotFoundError(f"LLaVA JSON {config.json_path} does not exist")
    with open(config.json_path, encoding="utf-8") as f:
      try:
        entries = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"LLaVA JSON {config.json_path} is not valid JSON: {e}") from e
    if len(entries) < 2:
      raise ValueError(f"LLaVA JSON {config.json_path} needs at least 2 examples (train and "
                       f"validation), has {len(entries)}")
    ids = [str(e.get("id", n)) for n, e in enumerate(entries)]
    by_hash = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    held_out = set(by_hash[:max(1, len(ids) * config.validation_percent // 100)])
    return {
        "train": self._generate_examples([(i, e) for i, e in zip(ids, entries)
                                          if i not in held_out]),
        "validation": self._generate_examples([(i, e) for i, e in zip(ids, entries)
                                               if i in held_out]),
    }

  def _generate_examples(self, entries: list[tuple[str, dict]]):
    skipped = collections.defaultdict(list)
    for example_id, entry in entries:
      turns = entry.get("conversations") or []
      if not turns:
        skipped["empty conversation"].append(example_id)
        continue
      if any(t.get("from") != ("human", "gpt")[n % 2] for n, t in enumerate(turns)):
        skipped["turns not alternating human, gpt"].append(example_id)
        continue
      paths = entry.get("image") or []
      paths = [paths] if isinstance(paths, str) else paths
      images = []
      for path in paths:
        full = os.path.join(self.builder_config.image_dir, path)
        if not os.path.exists(full):
          skipped["missing image file"].append(example_id)
          break
        with open(full, "rb") as f:
          data = f.read()
        try:
          image_codec.decode(data)
        except (OSError, ValueError, SyntaxError):
          skipped["unreadable image"].append(example_id)
          break
        images.append(data)
      if len(images) != len(paths):
        continue
      yield example_id, {"id": example_id, "images": images, "conversation": json.dumps(turns)}
    if skipped:
      logging.warning("LLaVA %s: skipped %s", self.builder_config.json_path, "; ".join(
          f"{len(ids)} with {why} (first: {ids[:3]})" for why, ids in skipped.items()))

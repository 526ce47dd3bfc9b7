"""tensorflow-datasets builders, written as ArrayRecord and read by index without TensorFlow.

Images are stored as encoded bytes (PNG here; a source's own JPEG/PNG bytes
for user data) in a `Tensor(shape=(), dtype=object)` sequence rather than an
`Image` feature: building `Image` features needs TensorFlow, these need only
tfds and array_record, and reading decodes them with Pillow.
"""
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmjax.data import synthetic

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def encode_png(image: np.ndarray) -> bytes:
  """float[H, W, 3] in [0, 1] -> PNG bytes (8 bits per channel)."""
  buffer = io.BytesIO()
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> float32[H, W, 3] in [0, 1], whatever the file's mode (grey, RGBA...)."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


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
  examples in its own shuffled order). 50,000 training scenes at
  32 px build in about half a minute.
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
      yield i, {"id": f"{split}/{i}", "images": [encode_png(image)], "question": question, "answer": answer,
                "type": kind, "caption": synthetic.caption(shapes)}

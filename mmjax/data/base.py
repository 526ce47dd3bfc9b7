"""What the trainer and the evaluators may ask of a data source: the `Source` protocol.

Every source (config.data.name, built by `mmjax.data.sources.build`):

  batch(step) -> dict[str, np.ndarray]   this process's rows of global batch `step`,
                                          a pure function of (seed, split, step)
  batch_size, local_batch_size            global rows, and this process's share
  tokenizer                               how its text was turned into ids
  image_mean, image_std                   how its pixels were normalised
  num_classes                             classification sources: labels are below it
  prefix_lm                               token sources: each row's prompt (image, BOS,
                                          question) is read both ways, batch["prefix_len"]

Sources of held-out prompts, which the generative evaluator answers and scores,
have a non-empty `example_types` and also:

  examples(step) -> list[dict]            per row: "image" float32[I, S, S, 3], "prompt"
                                          ids, "question", "answer", "type" (one of
                                          example_types), "references" (captions)
  longest_prompt(), longest_answer()      token counts that bound every example
  max_references                          reference answers kept per example
"""
import numpy as np

from mmjax.data import images as image_codec
from mmjax.data import tokenizers

# Every random draw of a split is seeded with its number: the splits never share a draw.
SPLITS = {"train": 0, "validation": 1, "test": 2}


class Source:
  """Rows [process_index * B/P, (process_index + 1) * B/P) of each global batch of B."""

  example_types: tuple[str, ...] = ()  # non-empty: held-out prompts with answers to score
  max_references: int = 1
  num_classes: int | None = None
  prefix_lm: bool = False

  def __init__(self, batch_size: int, seed: int = 0, split: str = "train",
               process_index: int = 0, process_count: int = 1,
               image_mean: tuple[float, ...] = (0.0, 0.0, 0.0),
               image_std: tuple[float, ...] = (1.0, 1.0, 1.0)):
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
    self.image_mean = np.asarray(image_mean, np.float32)
    self.image_std = np.asarray(image_std, np.float32)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def examples(self, step: int) -> list[dict]:
    raise NotImplementedError(f"{type(self).__name__} has no held-out prompts to answer")

  def longest_prompt(self) -> int:
    raise NotImplementedError(f"{type(self).__name__} has no held-out prompts to answer")

  def longest_answer(self) -> int:
    raise NotImplementedError(f"{type(self).__name__} has no held-out prompts to answer")

  def normalise(self, images: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] -> (pixels - image_mean) / image_std, per channel (config.data keys)."""
    return image_codec.normalise(images, self.image_mean, self.image_std)

  def rows(self, step: int):
    """(row of the global batch, its generator) for this process's rows of batch `step`."""
    for row in range(self.first_row, self.first_row + self.local_batch_size):
      yield row, np.random.default_rng((self.seed, SPLITS[self.split], step, row))

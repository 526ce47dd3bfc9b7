"""In-memory synthetic data: needs no files, no TensorFlow and no network.

Used by the CPU quick start, the tests, and benchmarks on machines without tfds.
Batches are a pure function of (seed, step), so a resumed run sees the same data.

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


class ArithmeticText:
  """Byte-level sentences such as "17+25=42. ": learnable, so a falling loss means something."""

  def __init__(self, batch_size: int, seq_len: int, seed: int = 0):
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.tokenizer = tokenizers.ByteTokenizer()

  def __repr__(self):
    return f"ArithmeticText(batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed})"

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, step))
    rows = []
    for _ in range(self.batch_size):
      text = ""
      while len(text) < self.seq_len:
        a, b = rng.integers(0, 100, size=2)
        text += f"{a}+{b}={a + b}. "
      rows.append([self.tokenizer.bos_id] + self.tokenizer.encode(text[:self.seq_len]))
    return _shift(rows, self.seq_len, self.tokenizer.pad_id, [0] * self.batch_size)


COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
PLACES = ("top left", "top right", "bottom left", "bottom right")


class ShapeCaptions:
  """A coloured square in one quadrant of a dark image, captioned "a blue square, top right.".

  The caption is only predictable from the image (16 equally likely captions),
  so a fusion model that uses the image gets a visibly lower loss than the LM
  alone. Each sample is [BOS] + image_tokens placeholders + caption; the loss
  covers the caption only.
  """

  def __init__(self, batch_size: int, seq_len: int, image_size: int, image_tokens: int,
               seed: int = 0):
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.image_size = image_size
    self.image_tokens = image_tokens  # P per image for early fusion, 1 for deep fusion
    self.seed = seed
    self.tokenizer = tokenizers.ByteTokenizer()

  def __repr__(self):
    return (f"ShapeCaptions(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"image_size={self.image_size}, image_tokens={self.image_tokens}, seed={self.seed})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, step))
    S, half = self.image_size, self.image_size // 2
    images = np.zeros((self.batch_size, 1, S, S, 3), np.float32)
    rows, prompt_lens = [], []
    for b in range(self.batch_size):
      colour = list(COLOURS)[rng.integers(len(COLOURS))]
      place = rng.integers(len(PLACES))
      side = rng.integers(S // 4, half)  # the square fits inside its quadrant
      top = (place // 2) * half + rng.integers(0, half - side + 1)
      left = (place % 2) * half + rng.integers(0, half - side + 1)
      images[b, 0] = 0.1 * rng.random((S, S, 3))
      images[b, 0, top:top + side, left:left + side] = COLOURS[colour]
      prompt = [self.tokenizer.bos_id] + [self.tokenizer.image_id] * self.image_tokens
      caption = self.tokenizer.encode(f"a {colour} square, {PLACES[place]}.")
      rows.append(prompt + caption + [self.tokenizer.eos_id])
      prompt_lens.append(len(prompt) - 1)  # the first target is the caption's first byte
    if max(len(r) for r in rows) > self.seq_len + 1:
      raise ValueError(f"data.seq_len={self.seq_len} is too short for {self.image_tokens} image "
                       f"tokens and a caption ({max(len(r) for r in rows) - 1} needed)")
    return {"images": images,
            **_shift(rows, self.seq_len, self.tokenizer.pad_id, prompt_lens)}

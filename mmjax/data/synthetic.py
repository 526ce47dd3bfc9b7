"""In-memory synthetic data: needs no files, no TensorFlow and no network.

Used by the CPU quick start and by benchmarks on machines without tfds.
"""
import numpy as np


class ArithmeticText:
  """Byte-level sentences such as "17+25=42.": learnable, so a falling loss means something.

  Batches are a pure function of (seed, step), so a resumed run sees the same data.
  """

  def __init__(self, batch_size: int, seq_len: int, seed: int = 0):
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed

  def __repr__(self):
    return f"ArithmeticText(batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed})"

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """-> {"tokens": int32[B, T+1]}: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    rng = np.random.default_rng((self.seed, step))
    rows = []
    for _ in range(self.batch_size):
      text = ""
      while len(text) < self.seq_len + 1:
        a, b = rng.integers(0, 100, size=2)
        text += f"{a}+{b}={a + b}. "
      rows.append(np.frombuffer(text[:self.seq_len + 1].encode(), np.uint8))
    return {"tokens": np.stack(rows).astype(np.int32)}

"""Metric writing: DIR/metrics.jsonl, TensorBoard event files, a terminal progress line.

Only process 0 writes; the others get a writer that does nothing.
"""
import json
import os
import sys

import jax
import numpy as np

# Dense bf16 peak TFLOP/s by device kind, for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(device: jax.Device) -> float | None:
  """The peak of one device, or None where unknown (CPUs)."""
  kind = device.device_kind
  return next((peak for name, peak in PEAK_TFLOPS.items() if name in kind), None)


class Writer:
  """Writes scalars to metrics.jsonl (one object per line with "step") and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.progress = self.enabled and sys.stderr.isatty()
    if not self.enabled:
      return
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.samples = open(os.path.join(workdir, "samples.jsonl"), "a")
    # Imported here: tools/bench.py needs only peak_tflops, on GPU images without tensorboardX.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()
    if self.progress:
      shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k in ("loss", "eval_loss"))
      sys.stderr.write(f"\rstep {step}/{self.total_steps} {shown}  ")
      sys.stderr.flush()

  def write_samples(self, step: int, samples: list[dict]):
    """Generated answers next to the truth: DIR/samples.jsonl, and images + text in TensorBoard.

    samples: dicts with "image" float[H, W, 3] in [0, 1] and text fields.
    """
    if not self.enabled:
      return
    for i, sample in enumerate(samples):
      text = {k: v for k, v in sample.items() if k != "image"}
      self.samples.write(json.dumps({"step": step, **text}) + "\n")
      self.tensorboard.add_image(f"samples/{i}", np.clip(sample["image"], 0, 1), step,
                                 dataformats="HWC")
      self.tensorboard.add_text(f"samples/{i}", " | ".join(f"{k}: {v}" for k, v in text.items()),
                                step)
    self.samples.flush()
    self.tensorboard.flush()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.samples.close()
      self.tensorboard.close()
      if self.progress:
        sys.stderr.write("\n")

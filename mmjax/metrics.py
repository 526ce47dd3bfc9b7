"""Metrics: model FLOPs and peaks for MFU; writing DIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes; the others get a writer that does nothing.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import lm
from mmjax.models import vit

# Dense peak TFLOP/s of one device by compute dtype and device kind, for MFU. float32 matmuls
# have no published peak on TPUs (XLA runs them as several bfloat16 passes): MFU is left out.
PEAK_TFLOPS = {
    "bfloat16": {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                 "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
                 "TPU v6": 918.0},
    "float32": {"H100": 67.0, "H200": 67.0, "A100": 19.5},  # without TF32
}


def peak_tflops(device: jax.Device, dtype: str = "bfloat16") -> float | None:
  """The peak of one device at the compute dtype, or None where unknown (CPUs)."""
  peaks = PEAK_TFLOPS.get(jnp.dtype(dtype).name, {})
  return next((peak for name, peak in peaks.items() if name in device.device_kind), None)


def model_flops(family: str, model, params, batch: dict) -> float:
  """Training FLOPs per step by MaxText's count: 3 x (matmuls + attention) of the forward pass.

  Each kernel is counted over the tokens that pass through it: text tokens
  for the LM, patches for the ViT, the projector and the cross-attention keys
  and values. An embedding lookup is a gather (not counted); a tied output
  projection is.
  """
  if family == "vit":
    towers, text = {"": model}, None
  elif family == "lm":
    towers, text = {"": model}, model
  else:
    towers, text = {"vit/": vit.Model(**model.vit), "lm/": lm.Model(**model.lm)}, lm.Model(
        **model.lm)
  B = next(iter(batch.values())).shape[0]
  vision = towers.get("vit/", model if family == "vit" else None)
  if "patches" in batch:  # packed at native resolution: every slot is computed, padding too
    images, patches = B, batch["patches"].shape[1]  # one ViT sequence per row
    keys = patches  # cross-attention keys per row
    tokens = patches
  else:
    images = 0 if family == "lm" else (B if family == "vit" else B * batch["images"].shape[1])
    patches = (vision.image_size // vision.patch_size) ** 2 if vision is not None else 0
    keys = patches * (batch["images"].shape[1] if family == "deep_fusion" else 0)
    tokens = patches + int(vision is not None and vision.pool == "cls")
  visual_tokens = images * patches
  T = batch["tokens"].shape[1] if "tokens" in batch else 0
  text_tokens = B * T

  forward = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if not name.endswith("kernel"):
      continue  # biases, norms, lookups (embeddings) and additions are not matmuls
    if family == "vit" and name.startswith("head/"):
      forward += 2 * leaf.size * images  # the classifier sees one pooled vector per image
      continue
    on_images = (family == "vit" or name.startswith(("vit/", "projector/", "adapter/",
                                                      "resampler/"))
                 or ("xattn" in name and ("/key/" in name or "/value/" in name)))
    forward += 2 * leaf.size * (visual_tokens if on_images else text_tokens)
  if text is not None:
    if text.tie_embeddings:
      forward += 2 * text.vocab_size * text.width * text_tokens
    heads_dim = text.num_heads * (text.head_dim or text.width // text.num_heads)
    forward += 0.5 * 4 * text.depth * B * T * T * heads_dim  # causal: half the scores
    if family == "deep_fusion":
      crosses = sum(1 for k in params if k.startswith("xattn_"))
      forward += 4 * crosses * B * T * keys * heads_dim
  if vision is not None:
    forward += 4 * vision.depth * images * tokens * tokens * vision.width
  return 3 * forward


class Writer:
  """Writes scalars to metrics.jsonl (one object per line with "step") and TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
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

  def write_samples(self, step: int, samples: list[dict]):
    """Generated answers next to the truth: DIR/samples.jsonl, and images + text in TensorBoard.

    samples: dicts with "image" float[H, W, 3] in [0, 1] (0 x 0: the example has none, at its
    own size) and text fields.
    """
    if not self.enabled:
      return
    for i, sample in enumerate(samples):
      text = {k: v for k, v in sample.items() if k != "image"}
      self.samples.write(json.dumps({"step": step, **text}) + "\n")
      if sample["image"].size:
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

"""Metrics: model FLOPs and peaks for MFU; writing DIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes; the others get a writer that does nothing.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import lora
from mmjax.models import deep_fusion
from mmjax.models import lm

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


def model_flops(family: str, model, params, batch: dict, frozen=None) -> float:
  """Training FLOPs per step by MaxText's count: 3 x (matmuls + attention) of the forward pass,
  the forward pass once and the backward pass's two matmuls (the input's gradient, the
  weight's) each as much again.

  Each kernel is counted over the tokens that pass through it: text tokens
  for the LM, patches for the ViT, the projector and the cross-attention keys
  and values. An embedding lookup is a gather (not counted); a tied output
  projection is, and so are LoRA's factors.
  frozen: a tree like params, True where a parameter does not train (optim.frozen_mask):
  its weight gradient is not computed, and a ViT none of whose parameters train runs no
  backward pass at all (steps.make_train_step), so neither is counted. None: all train.
  """
  paths = {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in
           jax.tree_util.tree_flatten_with_path(frozen if frozen is not None else params)[0]}
  is_frozen = lambda name: frozen is not None and bool(paths[name])
  vision_trains = family == "vit" or not all(is_frozen(n) for n in paths if n.startswith("vit/"))

  def passes(name: str, trains: bool) -> int:
    """How many times the matmuls of a parameter's layer run: forward, input gradient (where
    the backward pass reaches), weight gradient (where it trains)."""
    on_vit = family == "vit" or name.startswith("vit/")
    return 1 + int(vision_trains or not on_vit) + int(trains)

  if family == "vit":
    towers, text = {"": model}, None
  elif family == "lm":
    towers, text = {"": model}, model
  else:
    tower = deep_fusion.VISION_TOWERS[getattr(model, "vision_tower", "vit")](**model.vit)
    towers, text = {"vit/": tower, "lm/": lm.Model(**model.lm)}, lm.Model(**model.lm)
  B = next(iter(batch.values())).shape[0]
  vision = towers.get("vit/", model if family == "vit" else None)
  depth = getattr(vision, "depth", 0) + getattr(vision, "global_depth", 0)
  if "patches" in batch:  # packed at native resolution: every slot is computed, padding too
    images, patches = B, batch["patches"].shape[1]  # one ViT sequence per row
    keys = patches  # cross-attention keys per row
    tokens = patches
  elif "aspect_ratio_ids" in batch:  # Llama 3.2 Vision's tiles: every tile slot is computed
    images = B * batch["images"].shape[1]
    patches = tokens = vision.slots_per_image
    keys = vision.tokens_per_image * batch["images"].shape[1]
  else:
    images = 0 if family == "lm" else (B if family == "vit" else B * batch["images"].shape[1])
    patches = (vision.image_size // vision.patch_size) ** 2 if vision is not None else 0
    keys = patches * (batch["images"].shape[1] if family == "deep_fusion" else 0)
    tokens = patches + int(vision is not None and vision.pool == "cls")
  visual_tokens = images * patches
  T = batch["tokens"].shape[1] if "tokens" in batch else 0
  text_tokens = B * T

  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if not name.endswith(("kernel", *lora.FACTORS)):
      continue  # biases, norms, lookups (embeddings) and additions are not matmuls
    runs = passes(name, not is_frozen(name))
    if family == "vit" and name.startswith("head/"):
      total += runs * 2 * leaf.size * images  # the classifier sees one pooled vector per image
      continue
    on_images = (family == "vit" or name.startswith(("vit/", "projector/", "adapter/",
                                                      "resampler/"))
                 or ("xattn" in name and ("/key/" in name or "/value/" in name)))
    total += runs * 2 * leaf.size * (visual_tokens if on_images else text_tokens)
  if text is not None:
    if text.tie_embeddings:
      embedding = "lm/embedder/embedding" if family in ("early_fusion", "deep_fusion") else (
          "embedder/embedding")
      total += passes(embedding, not is_frozen(embedding)) * (
          2 * text.vocab_size * text.width * text_tokens)
    heads_dim = text.num_heads * (text.head_dim or text.width // text.num_heads)
    attention = 0.5 * 4 * text.depth * B * T * T * heads_dim  # causal: half the scores
    if family == "deep_fusion":
      crosses = sum(1 for k in params if k.startswith("xattn_"))
      attention += 4 * crosses * B * T * keys * heads_dim
    total += 3 * attention  # scores have no weights: forward, and gradients of both inputs
  if vision is not None:
    total += (3 if vision_trains else 1) * (
        4 * depth * images * tokens * tokens * vision.width)
  return total


def _open_after(path: str, step: int):
  """A JSON-lines file opened to append, without its rows past `step`."""
  if os.path.exists(path):
    with open(path) as f:
      rows = f.readlines()
    kept = [row for row in rows if row.strip() and json.loads(row)["step"] <= step]
    if len(kept) < len(rows):
      with open(path, "w") as f:
        f.writelines(kept)
  return open(path, "a")


def _summary_writer(logdir: str, purge_step: int):
  """tensorboardX's SummaryWriter, without the import of torch it makes where torch is installed
  (3 s of every run's start here) only to accept torch tensors: mmjax writes numpy. TensorBoard
  hides the events of earlier files from purge_step on."""
  # Imported here: tools/bench.py needs only peak_tflops, on GPU images without tensorboardX.
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  else:
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    finally:
      del sys.modules["torch"]
  return SummaryWriter(logdir, purge_step=purge_step)


class Writer:
  """Writes scalars to metrics.jsonl (one object per line with "step") and TensorBoard."""

  def __init__(self, workdir: str, after_step: int = 0):
    """after_step: the step training resumes from; rows of later steps, written by a run that
    stopped before saving them, are dropped (and hidden in TensorBoard), so no step is listed
    twice."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = _open_after(os.path.join(workdir, "metrics.jsonl"), after_step)
    self.samples = _open_after(os.path.join(workdir, "samples.jsonl"), after_step)
    self.tensorboard = _summary_writer(os.path.join(workdir, "tensorboard"), after_step + 1)

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

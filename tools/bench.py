"""Benchmarks mmjax's jitted training step against the naive reference, and its decoding.

  python tools/bench.py                         # CPU: the tiny cases
  python tools/bench.py --cases gpt2-124m,llama-1b,vit-b16,early-fusion,deep-fusion   # GPU
  python tools/bench.py --decode --cases gpt2-124m,llama-1b   # generation at batch 1 and 32
  python tools/bench.py --data   # examples/s of the fusion configs' data sources
  python tools/bench.py --mixed_sizes   # deep fusion: images at their own sizes vs resized
  python tools/bench.py --topology v5e:2x4 --cases gpt2-124m --batch 64   # memory per TPU chip

Prints one JSON line per case: seconds per step (median after warm-up),
tokens/s or images/s, model TFLOP/s and MFU by MaxText's count (3 x forward
matmul FLOPs + attention, causal attention halved), peak device memory, compile
time; then the reference's line at the same shapes and the ratio mmjax /
reference. --repeats N alternates the two N times and compares the best of each;
--profile DIR traces three more of mmjax's steps per case. Batches are
synthetic and in memory, so it needs neither tfds nor TensorFlow; the step is
the trainer's own (`steps.make_train_step`).

--mixed_sizes trains deep fusion (configs/deep_fusion.py:tiny-native) on one
batch of varied-size scenes packed at their own resolution, and on the same
examples with every image resized to the largest side (a row per example, as
with one image size), and reports images/s of each, the compiled FLOPs of each
step (XLA's cost analysis) and the patch slots used.

--decode times `generation.make_generate` (greedy, no EOS, so every row makes
every token) and compares new tokens/s with the memory-bandwidth bound: each
step reads every parameter and the KV cache written so far, so tokens/s <=
batch x bandwidth / (parameter bytes + average cache bytes).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from flax import linen as nn
import jax
import ml_collections
import numpy as np

from mmjax import dry_run
from mmjax import generation
from mmjax import metrics
from mmjax import models
from mmjax import sharding
from mmjax import steps
from mmjax.data import patches
from mmjax.data import sources
from mmjax.data import synthetic
from mmjax.models import lm

# Config files import their siblings as `configs.common`: the repository root must be importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench" / (
    "naive_reference.py")

GPT2 = {"model.vocab_size": 50304}  # the reference pads the vocabulary to a multiple of 64
# The reference's ViT, as big_vision's, uses flax's default tanh GELU (mmjax's ViT default is the
# exact erf GELU of the original ViT and HF checkpoints); the same model is timed on both sides.
VIT_B16 = {"num_classes": 1000, "pool": "gap", "mlp_activation": "gelu_tanh"}
FUSION_B16 = {"model.vit.mlp_activation": "gelu_tanh", "model.lm.vocab_size": 50304}
TINY_LM = dict(variant=None, width=128, depth=4, num_heads=4, mlp_dim=512, vocab_size=512,
               max_len=128)
TINY_PAIR = {"model.lm.vocab_size": 512, "model.image_token_id": 3, "data.name": "shapes",
             "data.seq_len": 64, "batch_size": 8}
# name -> (shipped config, overrides, the reference's model or None). Each case is the shipped
# config (its remat, scan and attention choices) with the model made the reference's where one
# exists, data in memory and the reference's batch.
CASES = {
    "lm-tiny": ("lm.py:tiny", {**{f"model.{k}": v for k, v in TINY_LM.items()},
                               "data.seq_len": 128, "batch_size": 8}, "lm-tiny"),
    "vit-tiny": ("vit.py:tiny", {"model.variant": None, "model.width": 128, "model.depth": 4,
                                 "model.num_heads": 4, "model.mlp_dim": 512,
                                 "model.patch_size": 8, "model.image_size": 64,
                                 **{f"model.{k}": v for k, v in VIT_B16.items()},
                                 "batch_size": 16}, "vit-tiny"),
    "early-tiny": ("early_fusion.py:tiny", TINY_PAIR, None),
    "deep-tiny": ("deep_fusion.py:tiny", TINY_PAIR, None),
    "gpt2-124m": ("lm.py:gpt2-124m", {**GPT2, "batch_size": 16}, "gpt2-124m"),
    "llama-1b": ("lm.py:llama-1b", {"batch_size": 8}, None),
    "vit-b16": ("vit.py:base", {**{f"model.{k}": v for k, v in VIT_B16.items()},
                                "batch_size": 128}, "vit-b16"),
    "early-fusion": ("early_fusion.py:base", {**FUSION_B16, "data.name": "shapes",
                                              "data.seq_len": 1024, "batch_size": 16}, None),
    "deep-fusion": ("deep_fusion.py:base", {**FUSION_B16, "data.name": "shapes",
                                            "data.seq_len": 1024, "batch_size": 16}, None),
}


def case_config(name: str, dtype: str | None = None, attention: str | None = None):
  """The shipped config of a case with its overrides, and the compute dtype and attention."""
  if name not in CASES:
    raise SystemExit(f"unknown case {name!r}; known: {sorted(CASES)}")
  file, overrides, _ = CASES[name]
  config = common.load(file)
  config.optimizer = _adamw()
  config.update_from_flattened_dict(overrides)
  towers = ("model.vit.", "model.lm.") if config.family in models.IMAGE_TEXT else ("model.",)
  if dtype:
    config.model.dtype = dtype
  if attention:
    for tower in towers:
      config.update_from_flattened_dict({f"{tower}attention_impl": attention})
  return config


def synthetic_batch(config, rng) -> dict[str, np.ndarray]:
  """Random inputs of the config's global batch, laid out as its data source lays them."""
  spec = sources.batch_spec(config)
  if config.family == "vit":
    B, size = spec["images"].shape[:2]
    return {"images": rng.standard_normal((B, size, size, 3), np.float32),
            "labels": rng.integers(0, config.model.num_classes, B).astype(np.int32)}
  vocab = models.build("lm", models.language_fields(config.family, config.model)).vocab_size
  B, T = spec["tokens"].shape
  tokens = rng.integers(4, vocab, (B, T)).astype(np.int32)
  out = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
         "loss_weights": np.ones((B, T), np.float32)}
  if "images" in spec:
    out["images"] = rng.standard_normal(spec["images"].shape, np.float32)
    marks = sources.placeholders_per_image(config)
    out["tokens"][:, 1:1 + marks] = config.model.image_token_id
    out["loss_weights"][:, :1 + marks] = 0.0
  return out


def run_case(name: str, steps_timed: int, dtype: str, attention: str, profile: str = "") -> dict:
  config = case_config(name, dtype, attention)
  run = steps.setup(config)
  batch = sharding.global_batch(synthetic_batch(config, np.random.default_rng(0)), run.mesh)
  state = run.init(jax.random.key(0))
  tic = time.perf_counter()
  compiled = run.compile_train()
  compile_seconds = time.perf_counter() - tic
  state, out = compiled(state, batch)  # warm-up
  jax.block_until_ready(out)
  times = []
  for _ in range(steps_timed):
    tic = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - tic)
  seconds = float(np.median(times))
  if profile:  # three more steps under the profiler, after (not inside) the timed ones
    with jax.profiler.trace(os.path.join(profile, name), create_perfetto_trace=True):
      for _ in range(3):
        state, out = compiled(state, batch)
      jax.block_until_ready(out)
  family, batch_size = config.family, config.batch_size
  text_len = batch["tokens"].shape[1] if "tokens" in batch else None
  params = run.abstract_state["params"]
  flops = metrics.model_flops(family, run.model, params, batch, run.frozen)
  device = jax.devices()[0]
  peak = metrics.peak_tflops(device, dtype)
  memory = device.memory_stats() or {} if hasattr(device, "memory_stats") else {}
  per_step = batch_size * text_len if text_len else batch_size
  result = {
      "impl": "mmjax", "case": name, "device": device.device_kind, "devices": jax.device_count(),
      "dtype": dtype, "attention": attention, "batch": batch_size,
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "seconds_per_step": seconds,
      ("tokens_per_s" if text_len else "images_per_s"): per_step / seconds,
      "model_tflops_per_s": flops / seconds / 1e12,
      "mfu": flops / seconds / 1e12 / (peak * jax.device_count()) if peak else None,
      "peak_memory_gib": memory.get("peak_bytes_in_use", 0) / 2**30 or None,
      "compile_seconds": compile_seconds, "final_loss": float(out["loss"]),
  }
  if text_len and family != "lm":
    result["tokens_per_s_text"] = batch_size * text_len / seconds
  return result


# Spec HBM bandwidth, bytes/s, for the decoding bound (a device copy through jax measured
# 3.6 TB/s on an H200, 75% of its spec).
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def run_decode(name: str, batch_size: int, prompt_len: int, new_tokens: int, dtype: str,
               repeats: int) -> dict:
  """Generation throughput of one case at one batch size."""
  config = case_config(name, dtype)
  if config.family == "vit":
    raise SystemExit(f"--decode needs a case with text, not {name!r}")
  config.update_from_flattened_dict({"batch_size": batch_size, "data.seq_len": prompt_len})
  model = models.build(config.family, config.model)
  data = synthetic_batch(config, np.random.default_rng(0))
  inputs = steps.init_inputs(jax.tree.map(lambda x: x[:1], data))
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *inputs))["params"])()
  lengths = np.full((batch_size,), prompt_len, np.int32)
  sampling = generation.Sampling(max_new_tokens=new_tokens)
  generate = jax.jit(generation.make_generate(model, sampling))
  args = (params, data["tokens"], lengths, data.get("images"), jax.random.key(0))
  tic = time.perf_counter()
  compiled = generate.lower(*args).compile()
  compile_seconds = time.perf_counter() - tic
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - tic)
  seconds = float(np.median(times))

  # Bytes of one cache slot across the batch and every layer, keys and values (not `end`).
  slot = jax.eval_shape(lambda: model.apply({"params": params}, method=lambda m: lm.empty_caches(
      m.language, batch_size, 1)))
  cache_per_token = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(slot) if x.ndim)
  average_len = prompt_len + new_tokens / 2
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bytes_per_step = param_bytes + cache_per_token * average_len
  device = jax.devices()[0]
  bandwidth = next((b for k, b in BANDWIDTH.items() if k in device.device_kind), None)
  return {  # seconds: prefill and every step of one generate call
      "impl": "mmjax", "mode": "decode", "case": name, "device": device.device_kind,
      "dtype": dtype, "batch": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "seconds": seconds, "tokens_per_s": batch_size * new_tokens / seconds,
      "ms_per_step": 1e3 * seconds / new_tokens, "bytes_per_step": bytes_per_step,
      "bound_tokens_per_s": batch_size * bandwidth / bytes_per_step if bandwidth else None,
      "compile_seconds": compile_seconds,
  }


def run_data(name: str, batch_size: int, steps: int) -> dict:
  """Examples/s of one fusion-config data source (tiny pair: 32 px, 16 image tokens);
  "shapes-varied" is configs/deep_fusion.py:tiny-native's (batch_size rows of packed examples,
  images at their own sizes), with the fraction of patch slots that hold a patch."""
  if name == "tfds_scenes":
    import tempfile  # pylint: disable=g-import-not-at-top
    from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top  # needs tfds, grain
    source = pipeline.TfdsScenes(batch_size, None, 32, 16, max_shapes=2, train_size=5000,
                                 data_dir=tempfile.mkdtemp())
  elif name == "shapes-varied":
    config = common.load("deep_fusion.py:tiny-native")
    config.batch_size = batch_size
    source = sources.build(config)
  else:
    source = synthetic.ShapeScenes(batch_size, None, 32, 16, max_shapes=2)
  source.batch(0)
  examples, used = 0, []
  tic = time.perf_counter()
  for step in range(1, steps + 1):
    batch = source.batch(step)
    if "patch_images" in batch:
      examples += int(np.sum(batch["image_grids"][..., 0] > 0))
      used.append(float(np.mean(batch["patch_images"] > 0)))
    else:
      examples += batch_size
  seconds = time.perf_counter() - tic
  return {"impl": "mmjax", "mode": "data", "source": name, "batch": batch_size,
          "examples_per_s": examples / seconds, "ms_per_batch": 1e3 * seconds / steps,
          **({"patch_slots_used": float(np.mean(used))} if used else {})}


# --mixed_sizes workloads: overrides of configs/deep_fusion.py:tiny-native. Its tiny ViT costs
# less than its text; "vision-heavy" has a ViT (width 256, depth 4, 4 px patches: up to 256 a
# scene) that outweighs the text, as the vision towers of Llama 3.2 Vision (ViT-H, 1601 patches
# a tile, up to 4 tiles) and Flamingo do for short texts.
MIXED_SIZES = {
    "tiny-native": {},
    "vision-heavy": {"model.vit.variant": None, "model.vit.width": 256, "model.vit.depth": 4,
                     "model.vit.num_heads": 4, "model.vit.mlp_dim": 1024,
                     "model.vit.patch_size": 4, "data.max_patches": 512},
}


def mixed_size_batches(workload: str, rows: int, seed: int = 0):
  """One batch of varied-size scenes, twice: packed at native resolution, and as a row per
  example with each image resized to the largest side -> ((config, batch), (config, batch),
  the number of images, the fraction of patch slots used)."""
  native = common.load("deep_fusion.py:tiny-native")
  native.update_from_flattened_dict({**MIXED_SIZES[workload], "batch_size": rows, "seed": seed,
                                     "optimizer": _adamw()})
  packed = sources.build(native).batch(0)
  examples = []  # (tokens with the final target, loss weights, image) of every packed example
  for r in range(rows):
    for k in range(1, int(packed["segment_ids"][r].max()) + 1):
      where = packed["segment_ids"][r] == k
      ids = np.append(packed["tokens"][r, where], packed["targets"][r, where][-1])
      examples.append((ids, packed["loss_weights"][r, where], patches.unpack(packed, r, k - 1)))
  largest = max(max(image.shape[:2]) for _, _, image in examples)
  length = max(len(ids) for ids, _, _ in examples) - 1
  dense = common.load("deep_fusion.py:tiny-native")
  dense.update_from_flattened_dict({
      **MIXED_SIZES[workload], "batch_size": len(examples), "seed": seed, "optimizer": _adamw(),
      "data.max_patches": None, "data.scene_sizes": "fixed", "data.pack": 1,
      "data.image_size": largest, "data.seq_len": length})
  N = len(examples)
  batch = {"tokens": np.zeros((N, length), np.int32), "targets": np.zeros((N, length), np.int32),
           "loss_weights": np.zeros((N, length), np.float32),
           "images": np.zeros((N, 1, largest, largest, 3), np.float32)}
  for i, (ids, weights, image) in enumerate(examples):
    n = len(ids) - 1
    batch["tokens"][i, :n], batch["targets"][i, :n] = ids[:-1], ids[1:]
    batch["loss_weights"][i, :n] = weights
    batch["images"][i, 0] = jax.image.resize(image, (largest, largest, 3), "bilinear")
  used = float(np.mean(packed["patch_images"] > 0))
  return (native, packed), (dense, batch), N, used


def run_mixed_sizes(workload: str, rows: int, steps_timed: int, repeats: int) -> list[dict]:
  """Native resolution against resizing to the largest size, on the same examples."""
  (native, packed), (dense, resized), images, used = mixed_size_batches(workload, rows)
  runs = {}
  for name, config, batch in (("native", native, packed), ("resized", dense, resized)):
    run = steps.setup(config)
    compiled = run.compile_train()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    runs[name] = dict(compiled=compiled, state=run.init(jax.random.key(0)),
                      batch=sharding.global_batch(batch, run.mesh), flops=float(cost["flops"]),
                      times=[])
  for _ in range(repeats):  # the two take turns, so drift in the machine's load hits both alike
    for run in runs.values():
      run["state"], out = run["compiled"](run["state"], run["batch"])  # warm-up
      jax.block_until_ready(out)
      for _ in range(steps_timed):
        tic = time.perf_counter()
        run["state"], out = run["compiled"](run["state"], run["batch"])
        jax.block_until_ready(out)
        run["times"].append(time.perf_counter() - tic)
  rows_out = []
  for name, run in runs.items():
    seconds = float(np.median(run["times"]))
    rows_out.append({"impl": "mmjax", "mode": "mixed_sizes", "workload": workload,
                     "images": name,
                     "device": jax.devices()[0].device_kind,
                     "batch_shapes": {k: list(v.shape) for k, v in run["batch"].items()},
                     "seconds_per_step": seconds, "images_per_s": images / seconds,
                     "compiled_flops": run["flops"]})
  native_row, resized_row = rows_out
  rows_out.append({"mode": "mixed_sizes", "workload": workload, "images_per_step": images,
                   "patch_slots_used": used,
                   "images_per_s_native_over_resized": (native_row["images_per_s"]
                                                        / resized_row["images_per_s"]),
                   "flops_resized_over_native": (resized_row["compiled_flops"]
                                                 / native_row["compiled_flops"])})
  return rows_out


def _adamw() -> ml_collections.ConfigDict:
  """The reference's optimizer: AdamW at a constant 3e-4 (plus mmjax's clipping and decay mask)."""
  return ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-4, schedule="constant", warmup_steps=0, decay_steps=1,
      b1=0.9, b2=0.999, momentum=0.9, weight_decay=1e-4, clip_norm=1.0, frozen=""))


def run_reference(path: str, model: str, steps: int, dtype: str, attention: str,
                  batch: int | None = None, topology: str = "") -> dict:
  command = [sys.executable, path, "--model", model, "--steps", str(steps), "--dtype", dtype,
             "--attention", attention]
  if batch:
    command += ["--batch", str(batch)]
  if topology:
    command += ["--topology", topology]
  result = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def run_topology(name: str, topology: str, batch: int | None, reference: str) -> list[dict]:
  """Per-chip memory of the case's train step compiled for a TPU slice, and the reference's.

  The case keeps its shipped config's attention, remat and scan choices, in
  bfloat16. The reference reports XLA's memory analysis without libtpu's peak,
  so both are compared by arguments + outputs + temporaries - aliased (every
  temporary live at once, an upper bound); mmjax's libtpu peak is given beside.
  """
  config = case_config(name, dtype="bfloat16")
  if batch:
    config.batch_size = batch
  ours = {"impl": "mmjax", "case": name, **dry_run.check(config, topology, evaluation=False)}
  rows = [ours]
  reference_model = CASES[name][2]
  if reference_model and reference and not os.path.exists(reference):
    print(f"the naive reference is not at {reference}: compiling mmjax alone", file=sys.stderr)
  elif reference and reference_model:
    theirs = run_reference(reference, reference_model, 1, "bfloat16", "naive",
                           config.batch_size, topology)
    theirs["formula_peak_bytes"] = (theirs["argument_bytes"] + theirs["output_bytes"]
                                    + theirs["temp_bytes"] - theirs["alias_bytes"])
    ratio = ours["formula_peak_bytes"] / theirs["formula_peak_bytes"]
    rows += [theirs, {"case": name, "topology": topology, "batch": config.batch_size,
                      "formula_gib_mmjax": ours["formula_peak_bytes"] / dry_run.GiB,
                      "formula_gib_reference": theirs["formula_peak_bytes"] / dry_run.GiB,
                      "formula_ratio_mmjax_over_reference": ratio,
                      "libtpu_peak_gib_mmjax": ours["peak_bytes"] / dry_run.GiB}]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--cases", default="lm-tiny,vit-tiny,early-tiny,deep-tiny" if on_cpu else
                      "gpt2-124m,llama-1b,vit-b16,early-fusion,deep-fusion")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=1,
                      help="alternate mmjax and the reference this many times; the ratio is of "
                      "the best of each (noisy shared machines)")
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
  parser.add_argument("--attention", default="xla" if on_cpu else "auto",
                      help="mmjax's attention_impl; the reference gets naive on CPU, cudnn on GPU")
  parser.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                      help="path to naive_reference.py; '' to skip it")
  parser.add_argument("--profile", default="",
                      help="also trace three mmjax steps per case into DIR/<case> (a Perfetto "
                      "trace.json.gz, and xplane.pb for TensorBoard's profiler)")
  parser.add_argument("--decode", action="store_true", help="time generation instead")
  parser.add_argument("--data", action="store_true",
                      help="time the fusion configs' data sources (batch 16) instead")
  parser.add_argument("--mixed_sizes", action="store_true",
                      help="time deep fusion on varied-size images: native vs resized")
  parser.add_argument("--rows", type=int, default=8, help="--mixed_sizes: packed rows")
  parser.add_argument("--decode_batches", default="1,32")
  parser.add_argument("--prompt_len", type=int, default=None,
                      help="--decode prompt tokens; default: half the case's text length")
  parser.add_argument("--new_tokens", type=int, default=None,
                      help="--decode tokens to generate; default: half the case's text length")
  parser.add_argument("--topology", default="",
                      help="compile each case for this TPU slice (e.g. v5e:2x4) and compare its "
                      "memory per chip with the reference's; needs libtpu, uses no TPU")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch of every case (default: the case's)")
  args = parser.parse_args()
  if args.data:
    for name in ("shapes", "shapes-varied", "tfds_scenes"):
      print(json.dumps(run_data(name, 16, 10 * args.steps)), flush=True)
    return
  if args.mixed_sizes:
    for workload in MIXED_SIZES:
      for row in run_mixed_sizes(workload, args.rows, args.steps, args.repeats):
        print(json.dumps(row), flush=True)
    return
  if args.topology:
    for name in args.cases.split(","):
      for row in run_topology(name, args.topology, args.batch, args.reference):
        print(json.dumps(row), flush=True)
    return
  for name in args.cases.split(","):
    config = case_config(name)
    if args.decode:
      half = (sources.batch_spec(config)["tokens"].shape[1] if config.family != "vit" else 2) // 2
      for batch in (int(b) for b in args.decode_batches.split(",")):
        print(json.dumps(run_decode(name, batch, args.prompt_len or half, args.new_tokens or half,
                                    args.dtype, max(args.steps // 3, 1))), flush=True)
      continue
    reference_model = CASES[name][2] if args.reference else None
    if reference_model and not os.path.exists(args.reference):
      print(f"the naive reference is not at {args.reference}: timing mmjax alone (pass "
            "--reference PATH to compare)", file=sys.stderr)
      reference_model = None
    # mmjax and the reference take turns, so drift in a shared machine's load hits both alike.
    ours, theirs = [], []
    for _ in range(args.repeats):
      ours.append(run_case(name, args.steps, args.dtype, args.attention, args.profile))
      print(json.dumps(ours[-1]), flush=True)
      if reference_model:
        theirs.append(run_reference(args.reference, reference_model, args.steps, args.dtype,
                                    "naive" if on_cpu else "cudnn"))
        print(json.dumps(theirs[-1]), flush=True)
    if reference_model:
      unit = "tokens_per_s" if "tokens_per_s" in theirs[0] else "images_per_s"
      print(json.dumps({"case": name, "unit": unit, "repeats": args.repeats,
                        "ratio_mmjax_over_reference": (max(o[unit] for o in ours)
                                                       / max(t[unit] for t in theirs)),
                        "ratio_each_repeat": [o[unit] / t[unit] for o, t in zip(ours, theirs)]}),
            flush=True)

if __name__ == "__main__":
  main()

"""LoRA: adapters that start at the base model, train alone, merge, and load in peft."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import peft
import pytest
import torch
import transformers

from configs import common
from mmjax import checkpoint
from mmjax import lora
from mmjax import models
from mmjax import sharding
from mmjax import steps
from mmjax.data import sources
from mmjax.interop import hf
import train_cli


def tiny_lora(**settings):
  config = common.load("lm.py:tiny,lora")
  config.batch_size = 4
  config.optimizer.lora.update(settings)
  return config


@pytest.fixture(scope="module")
def run():
  return steps.setup(tiny_lora(rank=4, alpha=8.0), jax.devices()[:1])


def flat(tree, is_leaf=None) -> dict:
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v
          for k, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_factors_start_at_the_base_model_and_merge_as_written(run):
  params = run.init(jax.random.key(0))["params"]
  names = flat(params)
  modules = sorted(p.removesuffix("/lora_a") for p in names if p.endswith("/lora_a"))
  assert modules == sorted(f"block_{i}/{kind}" for i in range(2) for kind in (
      "attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down"))
  # b = 0: the merged model is the base model, exactly.
  assert all(not np.any(v) for p, v in names.items() if p.endswith("lora_b"))
  jax.tree.map(np.testing.assert_array_equal, run.merge(params), lora.base(params))

  # With b set, each kernel is W + (alpha / r) a @ b, its input and output axes kept.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda k, v: rng.normal(size=v.shape).astype(np.float32)
      if k[-1].key == "lora_b" else v, params)
  merged = flat(run.merge(params))
  query, out = params["block_0"]["attn"]["query"], params["block_0"]["attn"]["out"]
  np.testing.assert_allclose(merged["block_0/attn/query/kernel"], query["kernel"] + 2.0 * np.einsum(
      "dr,rnh->dnh", query["lora_a"], query["lora_b"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(merged["block_0/attn/out/kernel"], out["kernel"] + 2.0 * np.einsum(
      "nhr,rd->nhd", out["lora_a"], out["lora_b"]), rtol=1e-5, atol=1e-6)
  assert not any(p.endswith(lora.FACTORS) for p in merged)

  # The step's way, x W + s (x a) b inside each projection, is the merged model.
  tokens = jnp.arange(16)[None] % 200
  with lora.adapted(run.config.optimizer):
    adapted, _ = run.model.apply({"params": params}, tokens)
  expected, _ = run.model.apply({"params": run.merge(params)}, tokens)
  base_logits, _ = run.model.apply({"params": lora.base(params)}, tokens)
  scale = np.abs(expected).max()
  assert np.abs(adapted - expected).max() < 1e-5 * scale
  assert np.abs(base_logits - expected).max() > 1e-2 * scale

  # The factors carry their kernel's logical axes on its two sides.
  axes = flat(run.param_axes, is_leaf=lambda x: isinstance(x, P))
  assert axes["block_0/attn/query/lora_a"] == P("embed", None)
  assert axes["block_0/attn/query/lora_b"] == P(None, "heads", "kv")
  assert axes["block_0/attn/out/lora_a"] == P("heads", "kv", None)
  assert axes["block_0/mlp/down/lora_b"] == P(None, "embed")


def test_only_the_adapters_train_and_hold_optimizer_state(run):
  state = run.init(jax.random.key(0))
  before = jax.tree.map(np.asarray, state["params"])
  train_step, _ = run.compile()
  data = sources.build(run.config, "train")
  for step in range(3):
    state, metrics = train_step(state, sharding.global_batch(data.batch(step), run.mesh))
  assert np.isfinite(float(metrics["loss"]))
  after = flat(state["params"])
  for path, value in flat(before).items():
    if lora.is_factor(path):
      continue
    np.testing.assert_array_equal(after[path], value, err_msg=path)  # bit for bit
  assert all(np.any(v) for p, v in after.items() if p.endswith("lora_b"))
  # Adam's two moments exist for the factors and nothing else.
  factor_sizes = sum(v.size for p, v in after.items() if lora.is_factor(p))
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"])
                if jnp.issubdtype(x.dtype, jnp.floating))
  assert moments == 2 * factor_sizes


def test_bfloat16_base_halves_the_frozen_kernels():
  run = steps.setup(tiny_lora(base_dtype="bfloat16"), jax.devices()[:1])
  params = flat(run.abstract_state["params"])
  assert params["block_0/attn/query/kernel"].dtype == jnp.bfloat16
  assert params["block_0/attn/query/lora_a"].dtype == jnp.float32
  assert params["block_0/attn_norm/scale"].dtype == jnp.float32
  state = run.init(jax.random.key(0))
  full = steps.setup(tiny_lora(), jax.devices()[:1]).init(jax.random.key(0))
  # The same base model, rounded to bfloat16: the logits agree to bfloat16's precision.
  tokens = jnp.arange(16)[None] % 200
  ours = run.model.apply({"params": run.merge(state["params"])}, tokens)[0]
  theirs = run.model.apply({"params": lora.base(full["params"])}, tokens)[0]
  assert np.abs(ours - theirs).max() < 2e-2 * np.abs(theirs).max()


def with_base(config, base_dtype):
  config = config.copy_and_resolve_references()
  config.optimizer.lora.base_dtype = base_dtype
  return config


@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scanned"])
def test_int8_base_keeps_a_scale_per_channel_and_trains_only_the_adapters(scan):
  config = tiny_lora(base_dtype="int8")
  config.model.scan_layers = scan
  run = steps.setup(config, jax.devices()[:1])
  prefix = "blocks" if scan else "block_0"
  lead = (2,) if scan else ()
  params = flat(run.abstract_state["params"])
  assert params[f"{prefix}/attn/query/kernel"].dtype == jnp.int8
  assert params[f"{prefix}/attn/query/kernel_scale"].shape == (*lead, 1, 4, 16)  # [D, N, H]
  assert params[f"{prefix}/attn/out/kernel_scale"].shape == (*lead, 1, 1, 64)  # [N, H, D]
  assert params[f"{prefix}/attn_norm/scale"].dtype == jnp.float32
  axes = flat(run.param_axes, is_leaf=lambda x: isinstance(x, P))
  assert tuple(axes[f"{prefix}/attn/query/kernel_scale"])[-2:] == ("heads", "kv")

  # Each int8 kernel times its scale is the float kernel within half a step of its channel.
  state = run.init(jax.random.key(0))
  full = steps.setup(with_base(config, None), jax.devices()[:1]).init(jax.random.key(0))["params"]
  query = state["params"][prefix]["attn"]["query"]
  weights = np.asarray(full[prefix]["attn"]["query"]["kernel"])
  dequantized = np.asarray(query["kernel"], np.float32) * np.asarray(query["kernel_scale"])
  assert np.all(np.abs(dequantized - weights) <= np.asarray(query["kernel_scale"]) / 2 + 1e-7)
  steps_per_channel = np.abs(weights).max(axis=-3) / np.asarray(query["kernel_scale"])[..., 0, :, :]
  assert np.all((steps_per_channel >= 127) & (steps_per_channel <= 128))  # absmax: int8's range
  np.testing.assert_allclose(lora.base(state["params"])[prefix]["attn"]["query"]["kernel"],
                             dequantized, rtol=1e-6)
  # Pretrained float weights put into the int8 state (towers, init_from) are quantized afresh:
  # the same int8 values (a tie at the range's edge may round either way under jit) and scales.
  reloaded = lora.overlay(state["params"], lora.base(full))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(b, np.float32), rtol=1e-6,
                                                       atol=1 if a.dtype == jnp.int8 else 0),
               reloaded, state["params"])

  # With b set: the step's way, (x q) s + (x a) b, is the merged model; int8 is within 2% of
  # the logits' scale of the float32 base and of the bfloat16 one (weight rounding).
  def logits(params, base_dtype):
    b = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda k, v: 0.1 * b.normal(size=v.shape).astype(np.float32)
        if k[-1].key == "lora_b" else v, params)
    merged = lora.merge(params, optimizer=with_base(config, base_dtype).optimizer)
    return params, run.model.apply({"params": merged}, tokens)[0]

  tokens = jnp.arange(16)[None] % 200
  params, merged = logits(state["params"], "int8")
  with lora.adapted(config.optimizer):
    adapted, _ = run.model.apply({"params": params}, tokens)
  scale = np.abs(merged).max()
  assert np.abs(adapted - merged).max() < 1e-5 * scale
  bf16 = steps.setup(with_base(config, "bfloat16"), jax.devices()[:1]).init(jax.random.key(0))
  for reference, base_dtype in ((full, None), (bf16["params"], "bfloat16")):
    _, theirs = logits(reference, base_dtype)
    assert 0 < np.abs(merged - theirs).max() < 2e-2 * scale, base_dtype

  # Training moves the factors only: the int8 kernels and their scales stay bit for bit and
  # hold no optimizer state.
  train_step, _ = run.compile()
  data = sources.build(run.config, "train")
  before = flat(jax.tree.map(np.asarray, state["params"]))  # the step donates the state
  for step in range(2):
    state, metrics = train_step(state, sharding.global_batch(data.batch(step), run.mesh))
  assert np.isfinite(float(metrics["loss"]))
  trained, after = state, flat(state["params"])
  for path in before:
    if not lora.is_factor(path):
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert all(np.any(v) for p, v in after.items() if p.endswith("lora_b"))
  factor_sizes = sum(v.size for p, v in after.items() if lora.is_factor(p))
  moments = sum(x.size for x in jax.tree.leaves(trained["opt_state"])
                if jnp.issubdtype(x.dtype, jnp.floating))
  assert moments == 2 * factor_sizes


def test_bad_lora_settings_name_the_key():
  with pytest.raises(ValueError, match=r"config.optimizer.lora.targets='nothing' matches no"):
    steps.setup(tiny_lora(targets="nothing"), jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config.optimizer.lora.rank must be >= 1"):
    steps.validate(tiny_lora(rank=0), 1)


LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=320)


def hf_model(kind: str):
  torch.manual_seed(0)
  if kind == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
          image_size=32, patch_size=8),
      text_config=transformers.LlamaConfig(**LLAMA), image_token_index=258)).eval()


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_peft_loads_the_exported_adapter_with_mmjax_logits(tmp_path, run_train, kind):
  base = hf_model(kind)
  base.save_pretrained(tmp_path / "hf")
  train_cli.run_tool("import_hf.py", f"--hf_dir={tmp_path / 'hf'}",
                     f"--out={tmp_path / 'import'}")
  rows = run_train(tmp_path / "run", f"hf.py:{tmp_path / 'import'},lora",
                   {"total_steps": 4, "log_every": 2, "eval_every": 0,
                    "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
                    # The adapters alone (a LLaVA's projector would train too): PEFT's layout.
                    "optimizer.frozen": ".*"})
  assert rows[-1]["step"] == 4
  train_cli.run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}",
                     f"--out={tmp_path / 'adapter'}", "--format=peft")
  config, merged, _ = checkpoint.read_model(str(tmp_path / "run"))
  model = models.build(config["family"], config["model"])
  tokens = np.array([[256] + ([258] * 16 if kind == "llava" else []) + list(b"12+34=46")])
  images = np.random.RandomState(0).rand(1, 32, 32, 3).astype(np.float32)
  inputs = dict(input_ids=torch.tensor(tokens))
  if kind == "llava":
    ours, _ = model.apply({"params": merged}, jnp.asarray(tokens), jnp.asarray(images[None]))
    inputs["pixel_values"] = torch.tensor(images.transpose(0, 3, 1, 2))
  else:
    ours, _ = model.apply({"params": merged}, jnp.asarray(tokens))
  with torch.no_grad():
    plain = base(**inputs).logits.numpy()
    # (peft puts the adapters into `base` itself.)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    theirs = adapted(**inputs).logits.numpy()
  scale = np.abs(theirs).max()
  assert np.abs(np.asarray(ours) - theirs).max() < 1e-4 * scale  # PEFT computes them unmerged
  assert np.abs(plain - theirs).max() > 1e-3 * scale  # and the adapters do something

  # Read back, the adapter is the run's factors.
  _, factors, _ = checkpoint.read_model(str(tmp_path / "run"), merge_adapters=False)
  settings, loaded = hf.load_adapter(str(tmp_path / "adapter"), config)
  assert settings["rank"] == 16 and settings["alpha"] == 32.0
  for path, value in flat(loaded).items():
    np.testing.assert_allclose(value, flat(factors)[path], rtol=1e-6, err_msg=path)
  assert len(flat(loaded)) == sum(lora.is_factor(p) for p in flat(factors))
  adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 16 and len(adapter_config["target_modules"]) == 2 * 7
  # The HF base with the adapter merged in at import is the model the run trained.
  train_cli.run_tool("import_hf.py", f"--hf_dir={tmp_path / 'hf'}",
                     f"--adapter={tmp_path / 'adapter'}", f"--out={tmp_path / 'merged'}")
  _, imported, _ = checkpoint.read_model(str(tmp_path / "merged"))
  for path, value in flat(merged).items():
    np.testing.assert_allclose(flat(imported)[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_adapters_resume_bit_identical_on_8_devices(tmp_path, run_train):
  # One schedule for both runs (unset, it would follow each run's total_steps).
  short = {"total_steps": 20, "log_every": 5, "eval_every": 0, "checkpoint_every": 10,
           "optimizer.warmup_steps": 3, "optimizer.decay_steps": 30}
  straight = run_train(tmp_path / "straight", "lm.py:tiny,lora", {**short, "total_steps": 30},
                       devices=8)
  run_train(tmp_path / "resumed", "lm.py:tiny,lora", short, devices=8)
  resumed = run_train(tmp_path / "resumed", "lm.py:tiny,lora", {**short, "total_steps": 30},
                      devices=8)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  assert straight[-1]["loss"] < straight[0]["loss"]
  _, a, _ = checkpoint.read_model(str(tmp_path / "straight"), merge_adapters=False)
  _, b, _ = checkpoint.read_model(str(tmp_path / "resumed"), merge_adapters=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert any(lora.is_factor(p) for p in flat(a))


def test_a_scanned_lm_takes_adapters_on_its_stacked_kernels():
  config = tiny_lora(rank=2)
  config.model.scan_layers = True
  run = steps.setup(config, jax.devices()[:1])
  params = run.init(jax.random.key(0))["params"]
  assert params["blocks"]["attn"]["query"]["lora_a"].shape == (2, 64, 2)  # [L, D, R]
  params = jax.tree_util.tree_map_with_path(
      lambda k, v: jnp.full(v.shape, 0.05) if k[-1].key == "lora_b" else v, params)
  tokens = jnp.arange(16)[None] % 200
  # In float64 (x + x A B vs x (A B + W) differ by summation order only, ~1e-16 relative),
  # rounded to float32 logits: equal to float32's last bit. (In float32 the two orders drift
  # apart by ~1e-5 of the logits' scale, more or less by machine.)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    model = models.build("lm", dict(config.model.to_dict(), dtype="float64"))
    with lora.adapted(config.optimizer):
      adapted, _ = model.apply({"params": params}, tokens)
    merged, _ = model.apply({"params": run.merge(params)}, tokens)
  np.testing.assert_allclose(adapted, merged, rtol=2 * np.finfo(np.float32).eps, atol=0)

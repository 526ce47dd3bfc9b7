"""Tests of the optimizer builder: freezing, weight-decay mask, schedules, choices."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mmjax import models
from mmjax import optim


def params_tree():
  return {"vit": {"block_0": {"mlp": {"up": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}}},
          "lm": {"embedder": {"embedding": jnp.ones((8, 4))},
                 "final_norm": {"scale": jnp.ones(4)}},
          "projector": {"dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}}


STEPS = 100  # the run's total_steps in these tests


def config(**overrides):
  cfg = common.optimizer(learning_rate=0.1)
  cfg.warmup_steps = 0
  cfg.update(overrides)
  return cfg


def run_steps(tx, params, n=3):
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for _ in range(n):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_param_paths():
  paths = optim.param_paths(params_tree())
  assert paths["vit"]["block_0"]["mlp"]["up"]["kernel"] == "vit/block_0/mlp/up/kernel"


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_params_unchanged_and_stateless(name):
  params = params_tree()
  tx = optim.make_optimizer(config(name=name, frozen=r"^(vit|lm)/"), params, STEPS)
  new, state = run_steps(tx, params)
  for tower in ("vit", "lm"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new[tower], params[tower])
  assert not np.array_equal(new["projector"]["dense_0"]["kernel"],
                            params["projector"]["dense_0"]["kernel"])
  # Optimizer state holds arrays for the projector only.
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  trained_size = sum(x.size for x in jax.tree.leaves(params["projector"]))
  assert 0 < state_sizes <= 2 * trained_size  # Adam's two moments at most


def test_freezing_everything_is_an_error():
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.make_optimizer(config(frozen="."), params_tree(), STEPS)


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = params_tree()
  tx = optim.make_optimizer(config(weight_decay=0.5), params, STEPS)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  paths = optim.param_paths(params)
  for path, update in zip(jax.tree.leaves(paths), jax.tree.leaves(updates)):
    decayed = bool(jnp.any(update != 0))
    assert decayed == path.endswith("kernel"), path


def model_decay(family: str, fields: dict, *inputs) -> dict[str, bool]:
  params = jax.eval_shape(lambda: nn.unbox(models.build(family, fields).init(
      jax.random.key(0), *inputs))["params"])
  return {path: optim.decays(path) for path in jax.tree.leaves(optim.param_paths(params))}


def test_weight_decay_by_what_a_parameter_is_on_real_trees():
  # The names that fooled the old substring rule: Llama's SwiGLU "mlp/gate/kernel" and the
  # ViT's patch-embedding "embedding/kernel" are weight matrices; the deep-fusion "attn_gate"
  # and "mlp_gate" scalars are gates.
  tokens, images = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 1, 16, 16, 3))
  llama = model_decay("lm", dict(variant="llama-tiny"), tokens)
  assert llama["block_0/mlp/gate/kernel"] and llama["block_0/attn/query/kernel"]
  assert llama["head/kernel"] and not llama["embedder/embedding"]
  assert not llama["block_0/attn_norm/scale"] and not llama["final_norm/scale"]
  vit = model_decay("vit", dict(variant="mu/8", image_size=16, num_classes=3, pool="map"),
                    images[:, 0])
  assert vit["embedding/kernel"] and vit["head/kernel"] and vit["map_head/mlp/up/kernel"]
  assert not any(vit[p] for p in ("embedding/bias", "pos_embedding", "map_head/probe",
                                  "block_0/mlp/up/bias", "final_norm/scale"))
  towers = dict(vit=dict(variant="mu/8", image_size=16, pool="cls"), lm=dict(variant="gpt2-tiny"),
                image_token_id=3)
  early = model_decay("early_fusion", towers, tokens, images)
  assert early["projector/dense_0/kernel"] and not early["projector/dense_0/bias"]
  assert not early["vit/cls"] and not early["lm/pos_embedding"]
  deep = model_decay("deep_fusion", {**towers, "resampler_latents": 2, "cross_every": 1},
                     tokens, images)
  assert deep["xattn_0/attn/key/kernel"] and deep["adapter/dense_1/kernel"]
  assert not any(deep[p] for p in ("xattn_0/attn_gate", "xattn_0/mlp_gate", "resampler/latents",
                                   "xattn_1/attn_norm/scale"))


def test_schedules():
  cosine = optim.schedule(config(warmup_steps=10, decay_steps=110), STEPS)
  assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.1)
  assert float(cosine(60)) == pytest.approx(0.05, rel=1e-3)
  linear = optim.schedule(config(schedule="linear", warmup_steps=10, decay_steps=110), STEPS)
  assert float(linear(60)) == pytest.approx(0.05) and float(linear(110)) == pytest.approx(0.0)
  constant = optim.schedule(config(schedule="constant", warmup_steps=10), STEPS)
  assert float(constant(5)) == pytest.approx(0.05) and float(constant(1000)) == pytest.approx(0.1)


@pytest.mark.parametrize("total_steps", [40, 1000, 5000])
def test_an_unset_schedule_follows_total_steps(total_steps):
  # The config file's run is 1000 steps; --config.total_steps moves warmup and decay with it.
  cfg = common.load("lm.py:tiny").optimizer
  schedule = optim.schedule(cfg, total_steps)
  warmup = min(100, total_steps // 10)
  assert optim.plan(cfg, total_steps) == (warmup, total_steps)
  peak = cfg.learning_rate
  assert float(schedule(warmup)) == pytest.approx(peak)  # the peak, inside the run
  assert float(schedule(warmup // 2)) == pytest.approx(peak * (warmup // 2) / warmup)
  assert float(schedule(total_steps)) == pytest.approx(0.0, abs=1e-12)  # the end, at the end
  middle = (warmup + total_steps) // 2  # cosine's half-way point
  assert float(schedule(middle)) == pytest.approx(peak / 2, rel=0.05)
  assert optim.describe_schedule(cfg, total_steps) == (
      f"warmup {warmup} steps to {peak:g}, cosine to 0 at step {total_steps}")


def test_a_set_schedule_stays_as_set():
  cfg = config(warmup_steps=5, decay_steps=50)
  assert optim.plan(cfg, 1000) == (5, 50)
  assert float(optim.schedule(cfg, 1000)(50)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match=r"config.optimizer.decay_steps=5 must exceed the "
                                       r"warmup's 10 steps"):
    optim.schedule(config(warmup_steps=10, decay_steps=5), 1000)


def test_unknown_names():
  with pytest.raises(ValueError, match="optimizer.name must be one of"):
    optim.make_optimizer(config(name="lion"), params_tree(), STEPS)
  with pytest.raises(ValueError, match="optimizer.schedule must be one of"):
    optim.make_optimizer(config(schedule="step"), params_tree(), STEPS)


def test_clipping_by_global_norm():
  params = {"w": jnp.zeros(4)}
  tx = optim.make_optimizer(config(name="sgd", momentum=0.0, weight_decay=0.0, clip_norm=1.0,
                                   schedule="constant", warmup_steps=0), params, STEPS)
  assert isinstance(tx, optax.GradientTransformation)
  updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * np.full(4, 0.5), rtol=1e-6)


def test_lr_multipliers_scale_matching_updates():
  params = params_tree()
  # No clipping: with a frozen tower the clip norm would be taken over fewer gradients.
  plain = optim.make_optimizer(config(name="sgd", momentum=0.0, weight_decay=0.0,
                                      clip_norm=1e9), params, STEPS)
  scaled = optim.make_optimizer(config(name="sgd", momentum=0.0, weight_decay=0.0,
                                       clip_norm=1e9, frozen=r"^vit/",
                                       lr_multipliers=((r"^projector/", 0.25),
                                                       (r"^proj", 9.0))), params, STEPS)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  expected, _ = plain.update(grads, plain.init(params), params)
  updates, _ = scaled.update(grads, scaled.init(params), params)
  paths = optim.param_paths(params)
  for path, want, got in zip(jax.tree.leaves(paths), jax.tree.leaves(expected),
                             jax.tree.leaves(updates)):
    if path.startswith("vit/"):
      np.testing.assert_array_equal(got, 0.0)  # frozen wins
    elif path.startswith("projector/"):
      np.testing.assert_allclose(got, 0.25 * want, rtol=1e-6)  # the first match applies
    else:
      np.testing.assert_array_equal(got, want)

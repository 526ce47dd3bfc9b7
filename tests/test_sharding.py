"""Tests of meshes, rules presets and the shardings given to parameters and optimizer state."""
from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from mmjax import sharding
from mmjax.models import lm


def test_mesh_shape_resolution():
  assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
  assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(dict(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"config.mesh.shape .* needs 4 devices, but there are 8"):
    sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.mesh_shape(dict(data=3, fsdp=-1, tensor=1), 8)


def test_make_mesh_uses_every_device():
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.devices.size == jax.device_count() == 8


def test_rules_presets_and_errors():
  assert dict(sharding.rules("fsdp"))["embed"] == "fsdp"
  assert dict(sharding.rules("fsdp_tp"))["mlp"] == "tensor"
  assert "embed" not in dict(sharding.rules("dp"))
  assert all(len(r) <= 10 for r in sharding.RULES.values())
  assert sharding.rules([["embed", "tensor"]]) == (("embed", "tensor"),)
  with pytest.raises(ValueError, match="config.mesh.rules must be one of"):
    sharding.rules("zero3")


def lm_shardings(preset, shape, **model_overrides):
  model = lm.Model("gpt2-tiny", **model_overrides)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  mesh = sharding.make_mesh(shape)
  return mesh, boxed, sharding.param_shardings(boxed, mesh, sharding.rules(preset))


def test_param_shardings_per_preset():
  _, _, dp = lm_shardings("dp", dict(data=-1, fsdp=1, tensor=1))
  assert dp["block_0"]["mlp"]["up"]["kernel"].spec == P(None, None)
  _, _, fsdp = lm_shardings("fsdp", dict(data=1, fsdp=-1, tensor=1))
  assert fsdp["block_0"]["mlp"]["up"]["kernel"].spec == P("fsdp", None)
  assert fsdp["block_0"]["attn"]["query"]["kernel"].spec == P("fsdp", None, None)
  assert fsdp["embedder"]["embedding"].spec == P(None, "fsdp")
  _, _, tp = lm_shardings("fsdp_tp", dict(data=1, fsdp=-1, tensor=2))
  assert tp["block_0"]["mlp"]["up"]["kernel"].spec == P("fsdp", "tensor")
  assert tp["block_0"]["attn"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
  assert tp["embedder"]["embedding"].spec == P("tensor", "fsdp")


def test_indivisible_dimensions_stay_unsharded():
  # width 36 does not split 8 ways; the MLP's 256 does over tensor=2 only.
  _, _, shardings = lm_shardings("fsdp", dict(data=1, fsdp=-1, tensor=1), width=36, num_heads=4)
  assert shardings["block_0"]["mlp"]["up"]["kernel"].spec == P(None, None)


def test_optimizer_state_sharded_like_params_and_really_split():
  mesh, boxed, shardings = lm_shardings("fsdp", dict(data=1, fsdp=-1, tensor=1))
  params = nn.unbox(boxed)
  tx = optax.adamw(1e-3)
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
  state_shardings = sharding.state_shardings(abstract, shardings, mesh)
  mu = state_shardings["opt_state"][0].mu
  assert mu["block_0"]["mlp"]["up"]["kernel"].spec == P("fsdp", None)
  assert state_shardings["opt_state"][0].count.spec == P()
  # Created directly sharded: each device holds 1/8 of a large kernel.
  state = jax.jit(lambda: {"params": jax.tree.map(jnp.ones_like, params),
                           "opt_state": tx.init(jax.tree.map(jnp.ones_like, params))},
                  out_shardings=state_shardings)()
  kernel = state["params"]["block_0"]["mlp"]["up"]["kernel"]
  assert kernel.shape == (64, 256)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 256)}


def test_global_batch_is_split_over_batch_axes():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  local = {"tokens": np.arange(16 * 3).reshape(16, 3)}
  batch = sharding.global_batch(local, mesh)
  np.testing.assert_array_equal(batch["tokens"], local["tokens"])
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(4, 3)}

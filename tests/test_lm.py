"""Tests of the decoder LM: counts, causality, packing, prefix-LM, scan, flavours."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import lm


def count_params(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_parameter_counts():
  assert count_params(lm.Model("gpt2-124m")) == 124_439_808
  assert count_params(lm.Model("llama-1b")) == 1_100_048_384


def test_flavour_fields():
  gpt2, llama = lm.Model("gpt2-tiny"), lm.Model("llama-tiny")
  assert (gpt2.positions, gpt2.norm, gpt2.mlp_activation, gpt2.tie_embeddings) == (
      "learned", "layernorm", "gelu_tanh", True)
  assert (llama.positions, llama.norm, llama.mlp_activation, llama.tie_embeddings) == (
      "rope", "rmsnorm", "swiglu", False)
  assert lm.Model("llama-tiny", tie_embeddings=True).tie_embeddings  # overrides win


def test_bad_variant_and_field_errors():
  with pytest.raises(ValueError, match="unknown LM variant 'gpt3'"):
    lm.Model("gpt3")
  with pytest.raises(ValueError, match=r"unknown LM field\(s\) \['depht'\]"):
    lm.Model("gpt2-tiny", depht=3)
  with pytest.raises(ValueError, match="flavour must be one of"):
    lm.Model("gpt2-tiny", flavour="mamba")


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def model_and_params(request):
  model = lm.Model(request.param)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def random_tokens(key, shape, vocab=512):
  return jax.random.randint(key, shape, 0, vocab)


def test_causality(model_and_params):
  model, params = model_and_params
  tokens = random_tokens(jax.random.key(1), (2, 12))
  logits, _ = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 12, 512) and logits.dtype == jnp.float32
  t = 5
  changed = tokens.at[:, t + 1:].set(random_tokens(jax.random.key(2), (2, 12 - t - 1)))
  logits2, _ = model.apply({"params": params}, changed)
  np.testing.assert_allclose(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-5)
  assert not np.allclose(logits2[:, t + 1:], logits[:, t + 1:], atol=1e-3)


def test_packed_examples_match_separate_runs(model_and_params):
  model, params = model_and_params
  a = random_tokens(jax.random.key(3), (1, 5))
  b = random_tokens(jax.random.key(4), (1, 7))
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits, _ = model.apply({"params": params}, packed, segment_ids=segments, positions=positions)
  logits_a, _ = model.apply({"params": params}, a)
  logits_b, _ = model.apply({"params": params}, b)
  np.testing.assert_allclose(logits[:, :5], logits_a, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], logits_b, atol=1e-5)


def test_prefix_lm(model_and_params):
  model, params = model_and_params
  tokens = random_tokens(jax.random.key(5), (1, 10))
  prefix_len = jnp.array([4])
  logits, _ = model.apply({"params": params}, tokens, prefix_len=prefix_len)
  in_prefix = tokens.at[0, 3].set((tokens[0, 3] + 1) % 512)
  logits_p, _ = model.apply({"params": params}, in_prefix, prefix_len=prefix_len)
  # Position 0 sees position 3 inside the prefix ...
  assert not np.allclose(logits_p[0, 0], logits[0, 0], atol=1e-4)
  after = tokens.at[0, 6].set((tokens[0, 6] + 1) % 512)
  logits_a, _ = model.apply({"params": params}, after, prefix_len=prefix_len)
  # ... but nothing before position 6 sees position 6.
  np.testing.assert_allclose(logits_a[0, :6], logits[0, :6], atol=1e-5)
  # With prefix_len 0 it is the causal model.
  causal, _ = model.apply({"params": params}, tokens)
  zero, _ = model.apply({"params": params}, tokens, prefix_len=jnp.array([0]))
  np.testing.assert_allclose(zero, causal, atol=1e-6)


@pytest.mark.parametrize("variant,remat", [("llama-tiny", "none"), ("gpt2-tiny", "dots"),
                                           ("llama-tiny", "full")])
def test_scan_equals_unrolled(variant, remat):
  tokens = random_tokens(jax.random.key(6), (2, 9))
  unrolled = lm.Model(variant)
  scanned = lm.Model(variant, scan_layers=True, remat_policy=remat)
  params = nn.unbox(unrolled.init(jax.random.key(0), tokens))["params"]
  stacked = lm.stack_layers(params, unrolled.depth)
  assert stacked["blocks"]["mlp"]["up"]["kernel"].shape[0] == unrolled.depth
  out_u, _ = unrolled.apply({"params": params}, tokens)
  out_s, _ = scanned.apply({"params": stacked}, tokens)
  np.testing.assert_allclose(out_s, out_u, atol=1e-5)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)

  grads_u = jax.grad(lambda p: loss(unrolled, p))(params)
  grads_s = jax.grad(lambda p: loss(scanned, p))(stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               lm.unstack_layers(grads_s, unrolled.depth), grads_u)
  # Scanned init has the layer axis in its partitioning.
  spec = nn.get_partition_spec(scanned.init(jax.random.key(0), tokens))
  assert spec["params"]["blocks"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "kv")


def test_tied_and_untied_heads():
  tokens = jnp.zeros((1, 4), jnp.int32)
  gpt2 = nn.unbox(lm.Model("gpt2-tiny").init(jax.random.key(0), tokens))["params"]
  llama = nn.unbox(lm.Model("llama-tiny").init(jax.random.key(0), tokens))["params"]
  assert "head" not in gpt2 and "pos_embedding" in gpt2
  assert llama["head"]["kernel"].shape == (64, 512) and "pos_embedding" not in llama
  # Tied logits are hidden @ embedding^T.
  logits, aux = lm.Model("gpt2-tiny").apply({"params": gpt2}, tokens)
  np.testing.assert_allclose(logits, aux["hidden"] @ gpt2["embedder"]["embedding"].T, atol=1e-5)
  # GQA: 4 query heads share 2 kv heads.
  assert llama["block_0"]["attn"]["key"]["kernel"].shape == (64, 2, 16)


def test_bf16_close_to_float32(model_and_params):
  model, params = model_and_params
  tokens = random_tokens(jax.random.key(7), (2, 8))
  out32, _ = model.apply({"params": params}, tokens)
  out16, aux16 = model.clone(dtype=jnp.bfloat16).apply({"params": params}, tokens)
  assert out16.dtype == jnp.float32  # logits come out in float32 for the loss
  # bfloat16 keeps 8 bits of mantissa: within a few percent of the logits' own spread.
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.std(out32)))
  assert np.mean(np.argmax(out16, -1) == np.argmax(out32, -1)) > 0.9
  # Both heads multiply in bfloat16 and sum in float32: no bfloat16 rounding of the sums.
  hidden = aux16["hidden"].astype(jnp.bfloat16)
  params = nn.unbox(params)
  table = (params["head"]["kernel"] if "head" in params
           else params["embedder"]["embedding"].T).astype(jnp.bfloat16)
  np.testing.assert_array_equal(out16, jnp.einsum("BTD,DV->BTV", hidden, table,
                                                  preferred_element_type=jnp.float32))


def test_too_long_sequence_is_an_error():
  model = lm.Model("gpt2-tiny")
  with pytest.raises(ValueError, match="exceeds the LM's max_len=256"):
    model.init(jax.random.key(0), jnp.zeros((1, 300), jnp.int32))


def test_bad_remat_policy():
  with pytest.raises(ValueError, match="remat_policy must be"):
    lm.Model("gpt2-tiny", remat_policy="some").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

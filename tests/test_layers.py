"""Tests of the shared layers: masks, attention kernels, GQA, RoPE, MLP, norms."""
import functools

import chex
from flax import linen as nn
import jax
from jax.experimental import topologies
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers


def random_qkv(key, B=2, T=5, S=7, N=4, K=2, H=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, H), dtype))


def naive_attention(q, k, v, allowed):
  """Per-head loops in numpy: the independent reference."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      scores = q[b, :, n] @ k[b, :, n // G].T / np.sqrt(H)
      ok = allowed[b] if allowed is not None else np.ones_like(scores, bool)
      scores = np.where(ok, scores, -np.inf)
      for t in range(T):
        if not ok[t].any():
          continue  # nothing to attend to: output stays zero
        w = np.exp(scores[t] - scores[t].max())
        out[b, t, n] = (w / w.sum()) @ v[b, :, n // G]
  return out


class TestMask:

  def test_causal(self):
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(layers.Mask(causal=True).dense(4, 4)[0, 0], expected)

  def test_prefix_lm(self):
    mask = layers.Mask(causal=True, prefix_len=jnp.array([2, 0])).dense(4, 4)
    prefix2 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    causal = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(mask[:, 0], np.stack([prefix2, causal]))

  def test_segments_and_causal(self):
    # Two packed examples [0, 1, 2] and [3, 4], then one padding token.
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    mask = layers.Mask(causal=True, segment_ids=segments).dense(6, 6)[0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)

  def test_kv_lengths(self):
    mask = layers.Mask(kv_lengths=jnp.array([1, 3])).dense(2, 4)
    expected = np.array([[[1, 0, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 0], [1, 1, 1, 0]]], bool)
    np.testing.assert_array_equal(mask[:, 0], expected)

  def test_cross_segments(self):
    mask = layers.Mask(segment_ids=jnp.array([[1, 2]]),
                       kv_segment_ids=jnp.array([[2, 1, 1]])).dense(2, 3)
    np.testing.assert_array_equal(mask[0, 0], np.array([[0, 1, 1], [1, 0, 0]], bool))

  def test_empty_mask_is_none(self):
    assert layers.Mask().dense(3, 3) is None

  def test_prefix_without_causal_is_an_error(self):
    with pytest.raises(ValueError, match="prefix_len"):
      layers.Mask(prefix_len=jnp.array([1])).dense(2, 2)


class TestKernels:

  @pytest.mark.parametrize("mask_kwargs", [
      dict(),
      dict(causal=True),
      dict(kv_lengths=np.array([3, 7])),
      dict(explicit=np.random.RandomState(0).rand(2, 5, 7) > 0.5),
  ])
  def test_xla_matches_naive(self, mask_kwargs):
    q, k, v = random_qkv(jax.random.key(0), S=5 if mask_kwargs.get("causal") else 7)
    mask = layers.Mask(**{n: jnp.asarray(a) if n != "causal" else a
                          for n, a in mask_kwargs.items()})
    dense = mask.dense(q.shape[1], k.shape[1])
    allowed = None if dense is None else np.broadcast_to(
        np.asarray(dense)[:, 0], (2, q.shape[1], k.shape[1]))
    np.testing.assert_allclose(layers.xla_attention(q, k, v, mask),
                               naive_attention(q, k, v, allowed), atol=1e-5)

  def test_window_mask_by_hand(self):
    # A local layer's mask: causal within the window's 2 latest keys, a prefix of 3 both ways
    # beyond it (transformers' rule for PaliGemma 2); decoding: the query at cache slot 4.
    mask = layers.Mask(causal=True, window=2, prefix_len=jnp.array([3]))
    expected = np.array([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(mask.dense(6, 6)[0, 0], expected)
    decoding = layers.Mask(causal=True, window=2, q_offset=jnp.array(4))
    np.testing.assert_array_equal(decoding.dense(1, 6)[0, 0], [[0, 0, 0, 1, 1, 0]])

  def test_fully_masked_query_gets_zero(self):
    q, k, v = random_qkv(jax.random.key(1))
    explicit = jnp.ones((2, 5, 7), bool).at[0, 2].set(False)
    out = layers.xla_attention(q, k, v, layers.Mask(explicit=explicit))
    assert jnp.all(jnp.isfinite(out))
    np.testing.assert_array_equal(out[0, 2], 0.0)
    assert jnp.all(jnp.abs(out[0, 1]) > 0)

  @pytest.mark.parametrize("T,causal", [(197, False), (77, True), (64, True)])
  def test_fused_padding_matches_unpadded(self, T, causal):
    # jax's own kernel with implementation="xla" runs our padding logic on the CPU; a wrong
    # pad length or an unmasked padded key changes the result.
    q, k, v = random_qkv(jax.random.key(2), T=T, S=T, N=4, K=2, H=16)
    lengths = jnp.array([T, T - 10], jnp.int32)
    mask = layers.Mask(causal=causal, kv_lengths=lengths)
    np.testing.assert_allclose(layers.fused_attention(q, k, v, mask, implementation="xla"),
                               layers.xla_attention(q, k, v, mask), atol=1e-5)

  @pytest.mark.parametrize("platform,dtype,mask,T,S,H,kernel", [
      ("cpu", jnp.bfloat16, dict(causal=True), 6, 6, 8, "xla"),
      ("gpu", jnp.bfloat16, dict(causal=True), 6, 6, 8, "cudnn"),
      ("gpu", jnp.bfloat16, dict(kv_lengths=True), 5, 6, 8, "cudnn"),
      ("gpu", jnp.float32, dict(causal=True), 6, 6, 8, "xla"),  # cuDNN needs 16-bit inputs
      ("gpu", jnp.bfloat16, dict(causal=True), 6, 6, 256, "xla"),  # head dim over 128
      ("gpu", jnp.bfloat16, dict(causal=True, segments=True), 6, 6, 8, "xla"),
      ("gpu", jnp.bfloat16, dict(causal=True), 5, 6, 8, "xla"),  # causal over unequal lengths
      ("tpu", jnp.bfloat16, dict(causal=True), 512, 512, 8, "splash"),
      ("tpu", jnp.float32, dict(causal=True, segments=True), 512, 512, 8, "splash"),
      ("tpu", jnp.bfloat16, dict(kv_lengths=True), 512, 512, 8, "splash"),
      ("tpu", jnp.bfloat16, dict(), 7, 512, 8, "splash"),  # full attention, unequal lengths
      # deep fusion's "latest" media: a text position's image against each key's
      ("tpu", jnp.bfloat16, dict(segments=True, kv_segments=True), 7, 512, 8, "splash"),
      ("tpu", jnp.bfloat16, dict(segments=True, kv_segments=True), 7, 256, 8, "xla"),
      ("tpu", jnp.bfloat16, dict(causal=True), 256, 256, 8, "xla"),  # short: XLA keeps less
      ("tpu", jnp.bfloat16, dict(causal=True, prefix=True), 512, 512, 8, "splash"),
      ("tpu", jnp.bfloat16, dict(explicit=True), 512, 512, 8, "xla"),
      ("tpu", jnp.bfloat16, dict(causal=True), 7, 512, 8, "xla"),
      ("tpu", jnp.bfloat16, dict(causal=True, window=128, soft_cap=True), 512, 512, 8, "splash"),
      ("gpu", jnp.bfloat16, dict(causal=True, window=4), 6, 6, 8, "xla"),  # cuDNN: no windows
      ("gpu", jnp.bfloat16, dict(causal=True, soft_cap=True), 6, 6, 8, "xla"),  # nor soft caps
  ])
  def test_auto_chooses_by_platform_and_mask(self, platform, dtype, mask, T, S, H, kernel):
    q, k, _ = random_qkv(jax.random.key(3), B=2, T=T, S=S, H=H, dtype=dtype)
    scores = layers.Scores(soft_cap=50.0 if mask.get("soft_cap") else None)
    mask = layers.Mask(
        causal=mask.get("causal", False), window=mask.get("window"),
        segment_ids=jnp.ones((2, T), jnp.int32) if mask.get("segments") else None,
        kv_segment_ids=jnp.ones((2, S), jnp.int32) if mask.get("kv_segments") else None,
        kv_lengths=jnp.array([S, 4]) if mask.get("kv_lengths") else None,
        prefix_len=jnp.array([2, 3]) if mask.get("prefix") else None,
        explicit=jnp.ones((2, T, S), bool) if mask.get("explicit") else None)
    assert layers.choose_attention("auto", q, k, mask, platform, scores) == kernel
    assert layers.choose_attention("xla", q, k, mask, platform, scores) == "xla"

  def test_the_target_platform_is_the_meshs(self):
    # A TPU slice compiled from this CPU host: "auto" must pick the TPU's kernel.
    assert layers.target_platform() == "cpu"
    devices = topologies.get_topology_desc(topology_name="v5e:2x2",
                                                             platform="tpu").devices
    mesh = jax.make_mesh((4,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      assert layers.target_platform() == "tpu"

  @pytest.mark.parametrize("mask_kwargs,T,S,scores", [
      (dict(causal=True), 200, 200, layers.Scores()),
      (dict(causal=True, segment_ids=[[1] * 80 + [2] * 100 + [0] * 20, [1] * 200]), 200, 200,
       layers.Scores()),
      (dict(kv_lengths=[150, 70]), 70, 150, layers.Scores()),
      # Gemma 2's local layers: a window inside a block of 128, its scale and soft cap.
      (dict(causal=True, window=50), 200, 200, layers.Scores(query_scalar=24, soft_cap=0.5)),
      # PaliGemma 2's: a prefix (the image and prompt) both ways beyond the window, and two
      # packed examples in the second row (a prefix, as its mask, per row).
      (dict(causal=True, window=50, prefix_len=[120, 70],
            segment_ids=[[1] * 200, [1] * 90 + [2] * 110]), 200, 200,
       layers.Scores(soft_cap=0.5)),
  ])
  def test_splash_matches_xla_with_gradients(self, mask_kwargs, T, S, scores):
    # Pallas' interpreter runs the TPU kernel here: padding to 128, segment ids (0 = packing
    # padding, which attends only to itself), key lengths and GQA (4 query heads, 2 kv heads).
    q, k, v = random_qkv(jax.random.key(5), T=T, S=S, N=4, K=2, H=64)
    mask = layers.Mask(**{n: jnp.asarray(a) if n not in ("causal", "window") else a
                          for n, a in mask_kwargs.items()})
    weights = jax.random.normal(jax.random.key(6), q.shape)

    def loss(impl, q, k, v):
      return jnp.sum(layers.dot_product_attention(q, k, v, mask, impl, scores) * weights)

    out = layers.dot_product_attention(q, k, v, mask, "splash", scores)
    expected = layers.xla_attention(q, k, v, mask, scores)
    np.testing.assert_allclose(out, expected, atol=1e-5 * float(jnp.abs(expected).max()))
    grads = jax.grad(functools.partial(loss, "splash"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for got, wanted in zip(grads, want):
      np.testing.assert_allclose(got, wanted, atol=1e-5 * float(jnp.abs(wanted).max()))

  def test_splash_is_split_over_a_mesh(self):
    # Under a mesh each device runs the kernel on its rows and heads (shard_map): the same
    # numbers as one device, with the batch over data x fsdp and the heads over tensor.
    q, k, v = random_qkv(jax.random.key(7), B=4, T=128, S=128, N=4, K=2, H=64)
    segments = jnp.asarray(np.repeat([[1, 2]], 4, axis=0).repeat(64, axis=1))
    mask = layers.Mask(causal=True, segment_ids=segments)
    alone = layers.dot_product_attention(q, k, v, mask, "splash")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("act_batch", ("data", "fsdp")), ("heads", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      split = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "splash"))(
          q, k, v)
    np.testing.assert_allclose(split, alone, atol=1e-6)

  def test_cudnn_on_cpu_is_a_clear_error(self):
    q, k, v = random_qkv(jax.random.key(4), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
      layers.dot_product_attention(q, k, v, layers.Mask(), "cudnn")

  def test_unknown_impl(self):
    q, k, v = random_qkv(jax.random.key(4))
    with pytest.raises(ValueError, match="attention_impl must be one of"):
      layers.dot_product_attention(q, k, v, layers.Mask(), "flash")


class TestAttention:

  def test_gqa_equals_mha_with_repeated_kv_heads(self):
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    gqa = layers.Attention(num_heads=4, num_kv_heads=2)
    params = nn.unbox(gqa.init(jax.random.key(1), x))["params"]
    mha_params = jax.tree.map(lambda a: a, params)
    for name in ("key", "value"):  # kernel [D, K, H] -> [D, N, H]: kv head k serves q heads 2k, 2k+1
      mha_params[name]["kernel"] = jnp.repeat(params[name]["kernel"], 2, axis=1)
    mask = layers.Mask(causal=True)
    out_gqa, _ = gqa.apply({"params": params}, x, mask=mask)
    out_mha, _ = layers.Attention(num_heads=4).apply({"params": mha_params}, x, mask=mask)
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-6)

  def test_mqa_has_one_kv_head(self):
    x = jnp.ones((1, 3, 16))
    params = nn.unbox(layers.Attention(num_heads=4, num_kv_heads=1).init(jax.random.key(0), x))
    params = params["params"]
    assert params["key"]["kernel"].shape == (16, 1, 4)

  def test_cross_attention_shapes_and_values(self):
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 24))
    attn = layers.Attention(num_heads=2, head_dim=4, use_bias=True)
    params = attn.init(jax.random.key(2), x, ctx)["params"]
    out, cache = attn.apply({"params": params}, x, ctx)
    assert out.shape == (2, 3, 16)
    # Recompute by hand from the parameters.
    p = jax.tree.map(np.asarray, nn.unbox(params))
    q = np.einsum("BTD,DNH->BTNH", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("BSD,DNH->BSNH", ctx, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("BSD,DNH->BSNH", ctx, p["value"]["kernel"]) + p["value"]["bias"]
    o = naive_attention(q, k, v, None)
    expected = np.einsum("BTNH,NHD->BTD", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # The returned cache holds the projected context; reading it skips the projection.
    np.testing.assert_allclose(cache.k, k, atol=1e-5)
    again, same = attn.apply({"params": params}, x, cache)
    np.testing.assert_allclose(again, out, atol=1e-6)
    assert same is cache

  @pytest.mark.parametrize("rope", [None, 10000.0])
  def test_self_attention_cache_matches_full_pass(self, rope):
    # Prefill 3 tokens into a 7-slot cache, then extend one token at a time: every output
    # equals the same row of one causal pass over all 6 tokens.
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    attn = layers.Attention(num_heads=4, num_kv_heads=2, rope_theta=rope)
    params = attn.init(jax.random.key(1), x)
    full, _ = attn.apply(params, x, mask=layers.Mask(causal=True))
    cache = layers.KVCache.empty(2, 7, 2, 4, jnp.float32)
    slots = jnp.arange(7)
    steps = [(0, 3), (3, 4), (4, 5), (5, 6)]
    for start, stop in steps:
      queries = jnp.arange(start, stop)
      allowed = jnp.broadcast_to(slots[None, :] <= queries[:, None], (2, stop - start, 7))
      out, cache = attn.apply(params, x[:, start:stop], mask=layers.Mask(explicit=allowed),
                              positions=jnp.broadcast_to(queries, (2, stop - start)), cache=cache)
      np.testing.assert_allclose(out, full[:, start:stop], atol=1e-5)
    assert int(cache.end) == 6
    np.testing.assert_array_equal(cache.k[:, 6], 0)  # the unwritten slot stays empty

  def test_rope_scores_depend_only_on_relative_position(self):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
      qm = layers.apply_rope(q, jnp.array([[m]]), 10000.0)
      kn = layers.apply_rope(k, jnp.array([[n]]), 10000.0)
      return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(0, 0) == pytest.approx(score(77, 77), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)

  def test_linear_rope_scaling_divides_positions(self):
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    scaled = layers.apply_rope(x, jnp.array([[0, 4, 8]]), 10000.0,
                               {"rope_type": "linear", "factor": 4.0})
    plain = layers.apply_rope(x, jnp.array([[0, 1, 2]]), 10000.0)
    np.testing.assert_allclose(scaled, plain, atol=1e-5)
    with pytest.raises(ValueError, match="rope_type must be one of"):
      layers.rope_frequencies(8, 10000.0, {"rope_type": "yarn"})

  def test_rope_position_zero_is_identity_and_norm_preserved(self):
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    rotated = layers.apply_rope(x, pos, 10000.0)
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)

  def test_qk_norm_params_and_effect(self):
    x = jax.random.normal(jax.random.key(0), (1, 4, 16)) * 100.0
    attn = layers.Attention(num_heads=2, qk_norm=True)
    params = nn.unbox(attn.init(jax.random.key(1), x))["params"]
    assert params["query_norm"]["scale"].shape == (8,)
    plain = layers.Attention(num_heads=2)
    plain_params = {k: v for k, v in params.items() if not k.endswith("_norm")}
    assert not np.allclose(attn.apply({"params": params}, x)[0],
                           plain.apply({"params": plain_params}, x)[0], atol=1e-3)

  def test_bf16_close_to_float32(self):
    x = jax.random.normal(jax.random.key(0), (2, 8, 64))
    attn32 = layers.Attention(num_heads=4, num_kv_heads=2, rope_theta=10000.0)
    params = attn32.init(jax.random.key(1), x)["params"]
    out32, _ = attn32.apply({"params": params}, x, mask=layers.Mask(causal=True))
    out16, _ = attn32.clone(dtype=jnp.bfloat16).apply({"params": params}, x,
                                                      mask=layers.Mask(causal=True))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2, rtol=5e-2)


class TestMlpAndNorms:

  @pytest.mark.parametrize("activation,fn", [
      ("gelu", lambda h: 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))),
      ("gelu_tanh", lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))),
      ("quick_gelu", lambda h: h / (1 + np.exp(-1.702 * h))),
  ])
  def test_gelu_mlps(self, activation, fn):
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mlp = layers.Mlp(16, activation=activation)
    params = mlp.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(np.asarray, nn.unbox(params))
    hidden = np.asarray(x) @ p["up"]["kernel"] + p["up"]["bias"]
    expected = np.asarray(fn(hidden)) @ p["down"]["kernel"] + p["down"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, atol=1e-5)

  def test_swiglu(self):
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mlp = layers.Mlp(16, activation="swiglu", use_bias=False)
    params = mlp.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(np.asarray, nn.unbox(params))
    gate = np.asarray(x) @ p["gate"]["kernel"]
    up = np.asarray(x) @ p["up"]["kernel"]
    expected = (gate / (1 + np.exp(-gate)) * up) @ p["down"]["kernel"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, atol=1e-5)

  def test_unknown_activation(self):
    with pytest.raises(ValueError, match="activation must be one of"):
      layers.Mlp(4, activation="relu6").init(jax.random.key(0), jnp.ones((1, 2)))

  def test_rmsnorm(self):
    x = jax.random.normal(jax.random.key(0), (3, 8)).astype(jnp.bfloat16)
    norm = layers.Norm("rmsnorm", 1e-6)
    params = norm.init(jax.random.key(1), x)
    out = norm.apply(params, x)
    assert out.dtype == jnp.bfloat16  # math in float32, output in the input's dtype
    x32 = np.asarray(x, np.float32)
    expected = x32 / np.sqrt(np.mean(x32**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2)

  def test_layernorm_runs_in_float32(self):
    x = (jax.random.normal(jax.random.key(0), (3, 8)) * 3 + 1).astype(jnp.bfloat16)
    out = layers.Norm("layernorm", 1e-5).apply(
        layers.Norm("layernorm", 1e-5).init(jax.random.key(1), x), x)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(jnp.mean(out, -1), jnp.zeros(3), atol=1e-5)


def test_every_parameter_is_logically_partitioned():
  x = jnp.ones((1, 4, 16))
  variables = layers.Attention(num_heads=2, qk_norm=True, use_bias=True).init(
      jax.random.key(0), x)
  leaves = jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert specs["out"]["kernel"] == jax.sharding.PartitionSpec("heads", "kv", "embed")

"""Tests that define deep fusion: closed gates, media masks, zero rows, resolutions, packing."""
import functools
import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmjax import checkpoint
from mmjax import models
from mmjax import sharding
from mmjax import steps
from mmjax.data import patches as patch_lib
from mmjax.data import sources
from mmjax.models import deep_fusion
from mmjax.models import layers
from mmjax.models import lm
from mmjax.models import vit

IMG = 9  # image marker id in these tests
VIT = dict(variant="mu/8", image_size=16, pool="none")  # 4 tokens per 16 px image
LM = dict(variant="llama-tiny", vocab_size=32)


def make(**overrides):
  return deep_fusion.Model(vit=overrides.pop("vit", VIT), lm=overrides.pop("lm", LM),
                           image_token_id=IMG, cross_every=1, **overrides)


def random_images(key, B, I, size=16):
  return jax.random.normal(key, (B, I, size, size, 3))


GATES = ("attn_gate", "mlp_gate")  # a cross block's tanh gates' parameters


def open_gates(params, value=1.0):
  """Sets every cross block's tanh gate alphas to `value` (they start at 0); the SwiGLU MLPs'
  `gate` kernels are left as they are."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, value) if path[-1].key in GATES else x, params)


@pytest.fixture(scope="module")
def model_and_params():
  model = make()
  tokens = jnp.array([[1, IMG, 5, 6, IMG, 7]])
  return model, nn.unbox(model.init(jax.random.key(0), tokens,
                                    random_images(jax.random.key(1), 1, 2)))["params"]


def lm_logits(params, tokens, **kwargs):
  return lm.Model(**LM).apply({"params": params["lm"]}, tokens, **kwargs)[0]


def test_closed_gates_give_exactly_the_lm(model_and_params):
  model, params = model_and_params
  tokens = jnp.array([[1, IMG, 5, 6, IMG, 7], [2, 3, IMG, 4, 5, 6]])
  for seed in range(2):
    logits, aux = model.apply({"params": params}, tokens, random_images(jax.random.key(seed), 2, 2))
    np.testing.assert_array_equal(logits, lm_logits(params, tokens))
    assert float(aux["xattn/gate_0"]) == 0.0 and float(aux["xattn/gate_1"]) == 0.0


def test_gate_init_starts_the_gates_open():
  """gate_init=a: the gates start at tanh(a), the rest of the model as with closed gates."""
  tokens, images = jnp.array([[1, IMG, 5, 6, IMG, 7]]), random_images(jax.random.key(1), 1, 2)
  closed, opened = make(gate="channel"), make(gate="channel", gate_init=0.5)
  closed_params = nn.unbox(closed.init(jax.random.key(0), tokens, images))["params"]
  params = nn.unbox(opened.init(jax.random.key(0), tokens, images))["params"]
  is_gate = lambda path: jax.tree_util.keystr(path).endswith(("['attn_gate']", "['mlp_gate']"))
  jax.tree_util.tree_map_with_path(
      lambda path, x, y: np.testing.assert_array_equal(x, 0.5 if is_gate(path) else y),
      params, closed_params)
  logits, aux = opened.apply({"params": params}, tokens, images)
  np.testing.assert_allclose(aux["xattn/gate_0"], np.tanh(0.5), rtol=1e-6)
  assert not np.allclose(logits, closed.apply({"params": closed_params}, tokens, images)[0])


def test_all_text_batches_match_the_lm_even_with_open_gates(model_and_params):
  model, params = model_and_params
  params = open_gates(params)
  tokens = jnp.array([[1, 2, 5, 6, 3, 7]])
  expected = lm_logits(params, tokens)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, None)[0], expected)
  # Images given but never marked in the text: every row has no media and gets exactly zero.
  logits, _ = model.apply({"params": params}, tokens, random_images(jax.random.key(2), 1, 2))
  np.testing.assert_array_equal(logits, expected)


def test_text_before_the_first_image_gets_nothing(model_and_params):
  model, params = model_and_params
  params = open_gates(params)
  tokens = jnp.array([[1, 2, 3, IMG, 5, 6]])
  logits, _ = model.apply({"params": params}, tokens, random_images(jax.random.key(3), 1, 2))
  assert jnp.all(jnp.isfinite(logits))
  expected = lm_logits(params, tokens)
  np.testing.assert_array_equal(logits[:, :3], expected[:, :3])
  assert not np.allclose(logits[:, 3:], expected[:, 3:], atol=1e-3)


@pytest.mark.parametrize("rule,expected", [
    ("previous", [[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]]),
    ("latest", [[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]),
])
def test_media_mask_by_hand(rule, expected):
  is_marker = jnp.array([[0, 1, 0, 1, 0, 1]], bool)
  mask = deep_fusion.media_mask(is_marker, jnp.repeat(jnp.arange(3), 2), rule)
  np.testing.assert_array_equal(mask[0], np.repeat(np.array(expected, bool), 2, axis=-1))


def test_media_mask_with_packed_examples():
  # Example 1 = positions 0-2 (image 0 marked at 1), example 2 = positions 3-5 (image 1 at 4).
  is_marker = jnp.array([[0, 1, 0, 0, 1, 0]], bool)
  segments = jnp.array([[1, 1, 1, 2, 2, 2]])
  mask = deep_fusion.media_mask(is_marker, jnp.arange(2), "previous", segments)
  expected = [[0, 0], [1, 0], [1, 0], [0, 0], [0, 1], [0, 1]]
  np.testing.assert_array_equal(mask[0], np.array(expected, bool))


def test_latest_media_as_segment_ids_runs_splash_as_xla():
  """Under "latest" the media mask is segment ids (a position's image, -1 for none; each key's
  image), which splash reads: the mask media_mask gives (hand-checked above), and through a
  cross block the output and gradients of XLA's dense mask (Pallas' interpreter runs the TPU
  kernel here; rows that see no image are exactly zero either way)."""
  # Row 0: two packed examples, image 0 marked at 1 (example 1), image 1 at 6 (example 2):
  # positions 4 and 5 open example 2 before its image and see nothing. Row 1: images 0 and 1
  # marked side by side. Keys: image 0's, image 1's, a padding slot, an image never marked.
  is_marker = jnp.array([[0, 1, 0, 0, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0, 0, 0]], bool)
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1] * 8])
  key_image = jnp.array([[0, 0, 0, 1, 1, vit.PADDING, 2, 2]] * 2)
  media = deep_fusion.media_attention_mask(is_marker, key_image, "latest", segments)
  assert media.explicit is None
  visible = media.dense(8, 8)[:, 0]
  np.testing.assert_array_equal(
      visible, deep_fusion.media_mask(is_marker, key_image, "latest", segments))
  np.testing.assert_array_equal(visible[0, :, :3].any(-1), [0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(visible[1, :, 3:5].any(-1), [0, 0, 0, 1, 1, 1, 1, 1])

  def block(impl):
    return deep_fusion.GatedCrossAttention(
        num_heads=4, num_kv_heads=2, mlp_dim=32, norm="rmsnorm", norm_eps=1e-6,
        mlp_activation="swiglu", qk_norm=False, gate="channel", dtype=jnp.float32,
        media_free_rows="mlp_only", attention_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  visual = jax.random.normal(jax.random.key(1), (2, 8, 16))
  params = nn.unbox(block("xla").init(jax.random.key(2), x, visual, media))["params"]
  params = open_gates(params, 0.5)
  weights = jax.random.normal(jax.random.key(3), x.shape)

  def loss(impl, params, x, visual):
    return jnp.sum(block(impl).apply({"params": params}, x, visual, media)[0] * weights)

  want, want_grads = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2))(
      params, x, visual)
  got, got_grads = jax.value_and_grad(functools.partial(loss, "splash"), (0, 1, 2))(
      params, x, visual)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))
  assert float(jnp.abs(want_grads[2]).max()) > 0  # the image keys and values were read


def test_unknown_media_rule():
  with pytest.raises(ValueError, match="media_attention must be one of"):
    deep_fusion.media_mask(jnp.zeros((1, 2), bool), jnp.arange(1), "all")


def test_visual_tokens_never_see_text(model_and_params):
  model, params = model_and_params
  images = random_images(jax.random.key(4), 1, 2)
  params = open_gates(params)
  _, aux_a = model.apply({"params": params}, jnp.array([[1, IMG, 5, 6, IMG, 7]]), images)
  _, aux_b = model.apply({"params": params}, jnp.array([[4, IMG, 2, IMG, 3, 3]]), images)
  np.testing.assert_array_equal(aux_a["img/features"], aux_b["img/features"])
  direct = model.apply({"params": params}, images, method="encode_images")
  np.testing.assert_array_equal(direct, aux_a["img/features"])


def test_image_gradient_only_through_cross_attention(model_and_params):
  model, params = model_and_params
  tokens = jnp.array([[1, IMG, 5, 6, IMG, 7]])
  images = random_images(jax.random.key(5), 1, 2)

  def loss(images, params):
    return jnp.sum(model.apply({"params": params}, tokens, images)[0] ** 2)

  np.testing.assert_array_equal(jax.grad(loss)(images, params), 0.0)  # closed gates
  assert jnp.any(jax.grad(loss)(images, open_gates(params)) != 0)


def test_resolutions_change_keys_not_text(model_and_params):
  model, params = model_and_params
  params = open_gates(params)
  tokens = jnp.array([[1, IMG, 5, 6, 7, 8]])
  for size, tokens_per_image in [(16, 4), (32, 16), (24, 9)]:
    logits, aux = model.apply({"params": params}, tokens,
                              random_images(jax.random.key(6), 1, 1, size=size))
    assert logits.shape == (1, 6, 32)
    assert aux["img/features"].shape == (1, 1, tokens_per_image, 64)
    assert jnp.all(jnp.isfinite(logits))


def test_packed_examples_see_only_their_own_images(model_and_params):
  model, params = model_and_params
  params = open_gates(params)
  images = random_images(jax.random.key(7), 1, 2)
  a, b = jnp.array([[1, IMG, 5, 6]]), jnp.array([[2, IMG, 7]])
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 4 + [2] * 3])
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
  logits, _ = model.apply({"params": params}, packed, images, segment_ids=segments,
                          positions=positions)
  alone_a, _ = model.apply({"params": params}, a, images[:, :1])
  alone_b, _ = model.apply({"params": params}, b, images[:, 1:])
  np.testing.assert_allclose(logits[:, :4], alone_a, atol=1e-5)
  np.testing.assert_allclose(logits[:, 4:], alone_b, atol=1e-5)


def test_media_mask_over_packed_patches_by_hand():
  # Keys: image 0's two patches, image 1's cls slot (never a key) and patch, padding.
  is_marker = jnp.array([[0, 1, 0, 1, 0]], bool)
  key_image = jnp.array([[0, 0, vit.PADDING, 1, vit.PADDING]])
  expected = {"previous": [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 1, 0],
                           [1, 1, 0, 1, 0]],
              "latest": [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 0],
                         [0, 0, 0, 1, 0]]}
  for rule, want in expected.items():
    np.testing.assert_array_equal(deep_fusion.media_mask(is_marker, key_image, rule)[0],
                                  np.array(want, bool))


@pytest.mark.parametrize("vit_fields,resampler", [(dict(posemb="learn", pool="cls"), None),
                                                  (dict(posemb="sincos2d"), None),
                                                  (dict(posemb="learn"), 3)])
def test_mixed_sizes_in_one_batch_match_each_example_alone(vit_fields, resampler):
  # Row 0: an 8 x 16 image; row 1: a 16 x 16 one; row 2: a 12 x 4 then an 8 x 16 image. Each
  # row's logits equal those of its example alone: dense for rows 0 and 1, and for row 2 its
  # images packed with no padding at all.
  model = make(vit={**VIT, "variant": "mu/4", **vit_fields}, resampler_latents=resampler)
  rng = np.random.default_rng(0)
  wide, square, tall = (rng.standard_normal((h, w, 3)).astype(np.float32)
                        for h, w in [(8, 16), (16, 16), (12, 4)])
  tokens = jnp.array([[1, IMG, 5, 6, 7, 3], [2, IMG, 7, 3, 3, 3], [1, IMG, 4, IMG, 5, 6]])
  cls = vit_fields.get("pool") == "cls"

  def as_patches(rows, slots):
    return vit.Patches(*(jnp.asarray(x) for x in patch_lib.pack(
        rows, 4, slots=slots, max_images=2, cls=cls).values()))

  packed = as_patches([[wide], [square], [tall, wide]], 24)
  params = open_gates(nn.unbox(model.init(jax.random.key(0), tokens, packed))["params"], 0.5)
  logits, _ = model.apply({"params": params}, tokens, packed)
  for row, image in [(0, wide), (1, square)]:
    alone, _ = model.apply({"params": params}, tokens[row:row + 1], jnp.asarray(image)[None, None])
    np.testing.assert_allclose(logits[row], alone[0], rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(alone))))
  alone, _ = model.apply({"params": params}, tokens[2:],
                         as_patches([[tall, wide]], 3 + 8 + 2 * int(cls)))
  np.testing.assert_allclose(logits[2], alone[0], rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(alone))))
  # The images matter: the same text with the rows' images swapped reads differently.
  swapped, _ = model.apply({"params": params}, tokens, as_patches([[square], [wide],
                                                                    [tall, wide]], 24))
  assert not np.allclose(swapped[:2, 2:], logits[:2, 2:], atol=1e-3)


def test_packed_rows_train_as_their_examples_alone():
  # The training loss of tiny-native's packed rows (varied-size scenes, several examples a row)
  # and its gradient: the sums of each example's own, run alone in a row of its own. Every
  # parameter's gradient agrees to 1e-5 of the largest (the attention key biases' true
  # gradient is zero: softmax ignores a score added to every key).
  config = common.load("deep_fusion.py:tiny-native")
  config.batch_size = 2
  batch = sources.build(config).batch(0)
  model = models.build(config.family, config.model)
  params = nn.unbox(model.init(jax.random.key(0), *steps.init_inputs(batch))["params"])
  params = open_gates(params, 0.5)
  total = jax.jit(jax.value_and_grad(lambda p, b: steps.loss_terms(model, p, b)[0]))
  loss, grads = total(params, batch)
  layout, T = sources.layout(config), batch["tokens"].shape[1]
  alone_loss, alone_grads, examples = 0.0, jax.tree.map(jnp.zeros_like, params), 0
  for row in range(2):
    for segment in sorted(set(batch["segment_ids"][row]) - {0}):
      where = np.flatnonzero(batch["segment_ids"][row] == segment)
      one = {k: np.zeros((1, T), batch[k].dtype) for k in ("tokens", "targets", "loss_weights",
                                                             "segment_ids", "positions")}
      for k in one:
        one[k][0, :len(where)] = batch[k][row, where]
      one["segment_ids"][0, :len(where)] = 1
      one.update(layout.pack([[patch_lib.unpack(batch, row, segment - 1)]]))
      value, g = total(params, one)
      alone_loss += value
      alone_grads = jax.tree.map(jnp.add, alone_grads, g)
      examples += 1
  assert examples >= 6  # about 5 a row
  np.testing.assert_allclose(loss, alone_loss, rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(alone_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(alone_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5 * scale)


def test_resampler_channel_gates_and_gqa():
  model = make(resampler_latents=3, gate="channel", cross_kv_heads=1, qk_norm=True,
               cross_layers=(1,))
  tokens = jnp.array([[1, IMG, 5]])
  images = random_images(jax.random.key(8), 1, 1)
  params = nn.unbox(model.init(jax.random.key(0), tokens, images))["params"]
  assert sorted(k for k in params if k.startswith("xattn")) == ["xattn_1"]
  assert params["xattn_1"]["attn_gate"].shape == (64,)
  assert params["xattn_1"]["attn"]["key"]["kernel"].shape == (64, 1, 16)
  assert "query_norm" in params["xattn_1"]["attn"]
  _, aux = model.apply({"params": params}, tokens, images)
  assert aux["img/features"].shape == (1, 1, 3, 64)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens, images)[0],
                                lm_logits(params, tokens))


@pytest.mark.parametrize("sink", [False, True])
def test_attention_sink_lets_the_output_count_matching_keys(sink):
  """Without a sink a cross-attention's softmax averages the image keys: showing every key
  twice changes nothing, so three matching shapes read as one. With the learned sink key the
  image keys' share of the attention grows with their number, and the output with it."""
  block = deep_fusion.GatedCrossAttention(
      num_heads=2, num_kv_heads=None, mlp_dim=16, norm="rmsnorm", norm_eps=1e-6,
      mlp_activation="swiglu", qk_norm=False, gate="scalar", dtype=jnp.float32,
      attention_sink=sink)
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  visual = jax.random.normal(jax.random.key(1), (1, 4, 8))
  seen = jnp.array([[[False] * 4, [True] * 4, [True] * 4]])  # row 0 sees no image
  media = layers.Mask(explicit=seen)
  params = nn.unbox(block.init(jax.random.key(2), x, visual, media))["params"]
  params = {**params, "attn_gate": jnp.array(1.0), "mlp_gate": jnp.array(0.0)}
  assert ("sink" in params) == sink
  once, aux = block.apply({"params": params}, x, visual, media)
  twice, _ = block.apply({"params": params}, x, jnp.concatenate([visual, visual], axis=1),
                         layers.Mask(explicit=jnp.concatenate([seen, seen], axis=-1)))
  branch = np.abs(np.asarray(once - x))[0, 1:].max()  # the gated attention's contribution
  moved = np.abs(np.asarray(twice - once))[0, 1:].max() / branch
  assert (moved > 1e-3) if sink else (moved < 1e-6), moved
  np.testing.assert_array_equal(once[0, 0], x[0, 0])  # no image seen: nothing added, sink or not
  # Decoding reads the keys and values projected once (the sink's among them): same output.
  cached, _ = block.apply({"params": params}, x, aux["cache"], media)
  np.testing.assert_allclose(cached, once, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fields,packed", [(dict(), False),  # a cross block before each block
                                           (dict(cross_layers=(1,), attention_sink=True), True)])
def test_scanned_lm_gives_the_same_logits_and_gradients(fields, packed):
  """lm.scan_layers=True runs [cross block + k LM blocks] groups as one loop: the same model
  as the unrolled one, on params converted by stack_layers (and back by unstack_layers)."""
  unrolled = make(**fields, vit={**VIT, "variant": "mu/4"})
  scanned = make(**fields, vit={**VIT, "variant": "mu/4"}, lm={**LM, "scan_layers": True,
                                                              "remat_policy": "full"})
  tokens = jnp.array([[1, IMG, 5, 6, IMG, 7], [2, 3, IMG, 7, 3, 3]])
  rng = np.random.default_rng(0)
  if packed:
    images = vit.Patches(*(jnp.asarray(x) for x in patch_lib.pack(
        [[rng.standard_normal((8, 16, 3)), rng.standard_normal((12, 4, 3))],
         [rng.standard_normal((16, 16, 3))]], 4, slots=24, max_images=2, cls=False).values()))
  else:
    images = random_images(jax.random.key(1), 2, 2)
  params = open_gates(nn.unbox(unrolled.init(jax.random.key(0), tokens, images))["params"], 0.5)
  cross_at, depth = unrolled.bind({"params": params}).cross_at, 2
  stacked = deep_fusion.stack_layers(params, cross_at, depth)
  shapes = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(0), tokens, images)))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(stacked)
  assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, stacked)

  def loss(model, p):
    logits, _ = model.apply({"params": p}, tokens, images)
    return jnp.mean(jnp.square(logits)), logits

  (want, want_logits), want_grads = jax.value_and_grad(loss, 1, has_aux=True)(unrolled, params)
  (got, got_logits), got_grads = jax.value_and_grad(loss, 1, has_aux=True)(scanned, stacked)
  scale = float(jnp.max(jnp.abs(want_logits)))
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5 * scale)
  got_grads = deep_fusion.unstack_layers(got_grads, cross_at, depth)
  grad_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  for path, g in jax.tree_util.tree_flatten_with_path(want_grads)[0]:
    mine = functools.reduce(lambda t, k: t[k.key], path, got_grads)
    np.testing.assert_allclose(mine, g, atol=1e-5 * grad_scale, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.max(jnp.abs(want_grads["xattn_1"]["attn"]["query"]["kernel"]))) > 0
  # Decoding runs it unscanned, on the params unstacked again.
  decoding, unstack = deep_fusion.for_decoding(scanned)
  assert not decoding.lm["scan_layers"] and deep_fusion.for_decoding(unrolled)[0] is unrolled
  jax.tree.map(np.testing.assert_array_equal, unstack(stacked), params)


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["unscanned_to_scanned",
                                                               "scanned_to_unscanned"])
def test_a_saved_model_loads_into_the_other_layout(tmp_path, saved_scanned):
  """config.init_from: a deep-fusion model saved with its LM unscanned loads into the scanned
  model (cross blocks at 1 of 2: one group) and the reverse, exactly, sharded as the target."""
  fields = dict(vit=VIT, lm=LM, image_token_id=IMG, cross_layers=(1,))
  as_saved = dict(fields, lm={**LM, "scan_layers": saved_scanned})
  wanted = dict(fields, lm={**LM, "scan_layers": not saved_scanned})
  shapes, tree = jax.tree.flatten(nn.unbox(models.abstract_params("deep_fusion", fields)))
  unrolled = jax.tree.unflatten(tree, [jax.random.normal(jax.random.key(i), s.shape)
                                       for i, s in enumerate(shapes)])  # every leaf its own
  stacked = deep_fusion.stack_layers(unrolled, (1,), 2)
  saved, expected = (stacked, unrolled) if saved_scanned else (unrolled, stacked)
  checkpoint.save_params(str(tmp_path / "params"), saved)
  mesh = sharding.make_mesh(checkpoint.FSDP_OVER_ALL_DEVICES)
  rules = sharding.rules("fsdp")
  boxed = models.abstract_params("deep_fusion", wanted)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), sharding.param_shardings(boxed, mesh, rules))
  loaded = checkpoint.load_model_params(str(tmp_path / "params"), target, None, "deep_fusion",
                                        as_saved, wanted, mesh, rules)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  jax.tree.map(lambda x, t: assert_sharded_as(x, t.sharding), loaded, target)


def assert_sharded_as(x, want):
  assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


def test_configuration_errors():
  tokens, images = jnp.array([[1, IMG]]), random_images(jax.random.key(0), 1, 1)
  with pytest.raises(ValueError, match="evenly spaced"):
    make(lm={**LM, "depth": 3, "scan_layers": True}, cross_layers=(0, 1)).init(
        jax.random.key(0), tokens, images)
  with pytest.raises(ValueError, match=r"cross_layers \[5\] outside the LM's blocks 0..1"):
    make(cross_layers=(5,)).init(jax.random.key(0), tokens, images)
  with pytest.raises(ValueError, match="gate must be one of"):
    make(gate="vector").init(jax.random.key(0), tokens, images)


def numpy_resampler(params: dict, x: np.ndarray, depth: int, heads: int) -> np.ndarray:
  """Flamingo's Perceiver resampler written out in numpy, from the parameters alone.

  Per layer: latents attend to [norm(x); norm(latents)] (a residual), then a GELU MLP without
  biases (a residual); a final LayerNorm. x: [B, P, D] -> [B, R, D].
  """
  def norm(z, p):
    mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  def gelu(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))

  B = x.shape[0]
  y = np.broadcast_to(params["latents"], (B, *params["latents"].shape)).astype(np.float64)
  for i in range(depth):
    context = np.concatenate([norm(x, params[f"context_norm_{i}"]),
                              norm(y, params[f"latent_norm_{i}"])], axis=1)
    query = norm(y, params[f"query_norm_{i}"])
    attn = params[f"attn_{i}"]
    q = np.einsum("brd,dnh->brnh", query, attn["query"]["kernel"])
    k = np.einsum("bsd,dnh->bsnh", context, attn["key"]["kernel"])
    v = np.einsum("bsd,dnh->bsnh", context, attn["value"]["kernel"])
    scores = np.einsum("brnh,bsnh->bnrs", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnrs,bsnh->brnh", probs, v)
    y = y + np.einsum("brnh,nhd->brd", out, attn["out"]["kernel"])
    mlp = params[f"mlp_{i}"]
    h = norm(y, params[f"mlp_norm_{i}"])
    y = y + gelu(h @ mlp["up"]["kernel"]) @ mlp["down"]["kernel"]
  return norm(y, params["final_norm"])


def test_perceiver_resampler_against_numpy():
  resampler = deep_fusion.PerceiverResampler(num_latents=3, depth=2, num_heads=2, mlp_dim=24,
                                             dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = nn.unbox(resampler.init(jax.random.key(1), x))["params"]
  # Non-trivial norms: the reference must apply every scale and bias where the model does.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  ours = resampler.apply({"params": params}, x)
  expected = numpy_resampler(jax.tree.map(np.asarray, params), np.asarray(x, np.float64), 2, 2)
  assert ours.shape == (2, 3, 8)
  np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max())

"""Tests of the ViT: parameter count, pooling, patch embedding values, resolution changes."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import patches
from mmjax.interop import hf
from mmjax.models import vit


def count_params(model, *inputs):
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_vit_b16_parameter_count():
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  assert count_params(vit.Model("B/16", num_classes=1000), images) == 86_567_656


@pytest.mark.parametrize("variant,width,depth", [("Ti/16", 192, 12), ("S/32", 384, 12),
                                                 ("L/14", 1024, 24), ("H/14", 1280, 32)])
def test_variants_decode(variant, width, depth):
  model = vit.Model(variant)
  assert (model.width, model.depth, model.patch_size) == (width, depth,
                                                          int(variant.split("/")[1]))


def test_bad_variant_and_field_errors():
  with pytest.raises(ValueError, match="ViT variant must look like 'B/16'"):
    vit.Model("X/16")
  with pytest.raises(ValueError, match=r"unknown ViT field\(s\) \['widht'\]"):
    vit.Model("B/16", widht=3)


def tiny(**overrides):
  return vit.Model("mu/8", image_size=32, **overrides)


@pytest.mark.parametrize("pool,num_tokens", [("cls", 17), ("gap", 16), ("map", 16)])
def test_pooling_shapes(pool, num_tokens):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = tiny(pool=pool, num_classes=5)
  variables = model.init(jax.random.key(1), images)
  logits, aux = model.apply(variables, images)
  assert logits.shape == (2, 5)
  assert aux["features"].shape == (2, num_tokens, 32)
  assert aux["pooled"].shape == (2, 32)
  assert aux["block_1"].shape == (2, num_tokens, 32)
  if pool == "gap":
    np.testing.assert_allclose(aux["pooled"], aux["features"].mean(1), atol=1e-6)
  if pool == "cls":
    np.testing.assert_array_equal(aux["pooled"], aux["features"][:, 0])


def test_patch_embedding_values():
  # With no blocks, the tokens are LayerNorm(patchify(x) @ W + b + pos): computed by hand here.
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  model = vit.Model(width=8, depth=0, mlp_dim=8, num_heads=2, patch_size=8, image_size=16,
                    pool="gap", norm_eps=1e-6)
  variables = model.init(jax.random.key(1), images)
  p = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
  _, aux = model.apply(variables, images)
  x = np.asarray(images).reshape(2, 2, 8, 2, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 192)
  tokens = x @ p["embedding"]["kernel"].reshape(192, 8) + p["embedding"]["bias"]
  tokens = tokens + p["pos_embedding"]
  mean, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  expected = (tokens - mean) / np.sqrt(var + 1e-6) * p["final_norm"]["scale"] + p[
      "final_norm"]["bias"]
  np.testing.assert_allclose(aux["features"], expected, atol=1e-5)


def test_other_resolution_interpolates_positions():
  model = tiny(pool="cls")
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  for size, grid in [(48, 6), (24, 3), (40, 5)]:
    _, aux = model.apply(variables, jax.random.normal(jax.random.key(2), (2, size, size, 3)))
    assert aux["features"].shape == (2, 1 + grid * grid, 32)
    assert jnp.all(jnp.isfinite(aux["features"]))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("target", [(5, 7), (2, 3), (6, 6)])
def test_interpolation_matches_pytorch(method, target):
  # A field with structure (random, per channel), up- and downsampled, against PyTorch's own
  # interpolate: what HF's interpolate_pos_encoding and timm call.
  import torch  # pylint: disable=g-import-not-at-top
  grid, D = 4, 3
  field = np.random.RandomState(0).randn(grid, grid, D).astype(np.float32)
  pos = jnp.concatenate([jnp.full((1, 1, D), 7.0), jnp.asarray(field).reshape(1, -1, D)], 1)
  out = vit.interpolate_positions(pos, True, grid, target, method)
  theirs = torch.nn.functional.interpolate(
      torch.tensor(field).permute(2, 0, 1)[None], size=target, mode=method,
      align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_array_equal(out[0, 0], 7.0)  # cls position untouched
  np.testing.assert_allclose(out[0, 1:].reshape(*target, D), theirs, atol=1e-5)


def test_bicubic_is_the_default_of_imported_towers():
  config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "patch_size": 8,
            "intermediate_size": 64, "num_attention_heads": 2, "image_size": 32,
            "hidden_act": "gelu"}
  assert hf.vit_fields(config)["posemb_resize"] == "bicubic"


def test_interpolate_positions_values():
  D = 4
  pos = jnp.concatenate([jnp.full((1, 1, D), 7.0),  # cls
                         jnp.broadcast_to(jnp.arange(D, dtype=jnp.float32), (1, 9, D))], axis=1)
  out = vit.interpolate_positions(pos, True, 3, (5, 5))
  assert out.shape == (1, 26, D)
  np.testing.assert_array_equal(out[0, 0], 7.0)  # cls position untouched
  np.testing.assert_allclose(out[0, 1:], jnp.broadcast_to(jnp.arange(D), (25, D)), atol=1e-6)
  assert vit.interpolate_positions(pos, True, 3, (3, 3)) is pos


def test_image_size_not_multiple_of_patch():
  model = tiny()
  with pytest.raises(ValueError, match="not a multiple of patch size 8"):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_bf16_close_to_float32():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = tiny(pool="map")
  variables = model.init(jax.random.key(1), images)
  out32, _ = model.apply(variables, images)
  out16, _ = tiny(pool="map", dtype=jnp.bfloat16).apply(variables, images)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.1, rtol=0.05)


def test_parameters_are_float32_and_partitioned():
  variables = tiny(pool="map", num_classes=3, dtype=jnp.bfloat16).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  leaves = jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
  assert all(a.value.dtype == jnp.float32 for a in leaves)


def test_sincos2d_position_embeddings():
  np.testing.assert_allclose(vit.sincos_2d(jnp.array([0, 0]), jnp.array([0, 1]), 4),
                             [[0, 1, 0, 1], [np.sin(1), np.cos(1), 0, 1]], atol=1e-6)
  rows, columns = jnp.mgrid[:3, :3]
  pe = vit.sincos_2d(rows.reshape(-1), columns.reshape(-1), 8)  # x-features: the column's,
  # y-features: the row's
  np.testing.assert_allclose(pe[1, :4], pe[4, :4], atol=1e-6)
  np.testing.assert_allclose(pe[3, 4:], pe[4, 4:], atol=1e-6)
  model = vit.Model("mu/8", image_size=16, pool="none", posemb="sincos2d")
  images = jnp.zeros((1, 16, 16, 3))
  params = model.init(jax.random.key(0), images)["params"]
  assert "pos_embedding" not in params
  tokens, _ = model.apply({"params": params}, images)
  assert not np.allclose(tokens[0, 0], tokens[0, 3], atol=1e-3)  # same pixels, other place
  with pytest.raises(ValueError, match="posemb must be"):
    vit.Model("mu/8", image_size=16, posemb="sincos").init(jax.random.key(0), images)


@pytest.mark.parametrize("posemb,pool,resize", [("learn", "cls", "bicubic"),  # map: fractional
                                                ("learn", "gap", "bilinear"),
                                                ("sincos2d", "none", "bilinear"),
                                                ("sincos2d", "map", "bilinear")])
def test_packed_images_match_each_image_alone(posemb, pool, resize):
  # Three sizes and aspect ratios, two in one row: each image's features, block outputs and
  # pooled vector equal those of the image run alone as a dense batch of one.
  coords = "fractional" if pool == "map" else "absolute"
  model = vit.Model("mu/4", image_size=16, pool=pool, posemb=posemb, posemb_resize=resize,
                    posemb_coords=coords)
  rng = np.random.default_rng(0)
  images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in
            [(8, 16), (12, 4), (16, 16)]]
  cls = pool == "cls"
  packed = patches.pack([images[:2], images[2:]], 4, slots=20, max_images=2, cls=cls)
  variables = model.init(jax.random.key(0), images[2][None])
  _, aux = model.apply(variables, vit.Patches(*(jnp.asarray(packed[k]) for k in patches.KEYS)))
  where = [(0, 0, 0), (0, 1, 9 if cls else 8), (1, 0, 0)]  # (row, image, first slot)
  for image, (row, index, first) in zip(images, where):
    _, alone = model.apply(variables, image[None])
    n = alone["features"].shape[1]
    assert np.all(packed["patch_images"][row, first:first + n] == index + 1)
    for key in ("features", "block_0"):
      want = alone[key][0]
      np.testing.assert_allclose(aux[key][row, first:first + n], want, rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(want))))
    if pool != "none":
      want = alone["pooled"][0]
      np.testing.assert_allclose(aux["pooled"][row, index], want, rtol=1e-5,
                                 atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_fractional_sincos_positions_name_the_same_place_at_any_size():
  # At the model's grid, fractional = absolute; on a grid twice as fine, patch r sits at
  # (r + 0.5) * 4 / 8 - 0.5 of the model's 4-patch grid.
  model = vit.Model("mu/4", image_size=16, pool="none", posemb="sincos2d",
                    posemb_coords="fractional", depth=0)
  absolute = model.clone(posemb_coords="absolute")
  images = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  variables = model.init(jax.random.key(1), images)
  np.testing.assert_array_equal(model.apply(variables, images)[0],
                                absolute.apply(variables, images)[0])
  large = jnp.zeros((1, 32, 32, 3))  # patch embeddings are then the bias: 0
  tokens = model.apply(variables, large)[0][0]  # [64, D] after the final norm, no blocks
  rows, columns = jnp.mgrid[:8, :8]
  want = vit.sincos_2d((rows.reshape(-1) + 0.5) / 2 - 0.5, (columns.reshape(-1) + 0.5) / 2 - 0.5,
                       32)
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(tokens, norm(want), atol=1e-4)

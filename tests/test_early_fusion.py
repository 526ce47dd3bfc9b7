"""Tests that define early fusion: splicing, masks, LM equivalence, gradient paths."""
import re

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax.data import synthetic
from mmjax.data import tokenizers
from mmjax.models import early_fusion
from mmjax.models import layers
from mmjax.models import lm
from mmjax.models import vit

IMG = 9  # placeholder id in these tests
VIT = dict(variant="mu/8", image_size=16, pool="none")  # 2x2 = 4 tokens per image
LM = dict(variant="llama-tiny", vocab_size=32)
P = 4


def make(**overrides):
  return early_fusion.Model(vit=overrides.pop("vit", VIT), lm=overrides.pop("lm", LM),
                            image_token_id=IMG, **overrides)


@pytest.fixture(scope="module")
def model_and_params():
  model = make()
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5, 6, 7]])
  images = jnp.zeros((1, 1, 16, 16, 3))
  return model, nn.unbox(model.init(jax.random.key(0), tokens, images))["params"]


def random_images(key, B, I, size=16):
  return jax.random.normal(key, (B, I, size, size, 3))


def test_splice_by_hand():
  B, T, I, D = 2, 12, 2, 3
  text = jnp.arange(B * T * D, dtype=jnp.float32).reshape(B, T, D)
  images = -1.0 - jnp.arange(B * I * 2 * D, dtype=jnp.float32).reshape(B, I, 2, D)
  is_placeholder = np.zeros((B, T), bool)
  is_placeholder[0, [2, 3, 7, 8]] = True  # sample 0: two images of 2 tokens each
  out = np.asarray(early_fusion.splice(text, images, jnp.asarray(is_placeholder)))
  expected = np.array(text)
  expected[0, 2], expected[0, 3] = images[0, 0, 0], images[0, 0, 1]
  expected[0, 7], expected[0, 8] = images[0, 1, 0], images[0, 1, 1]
  np.testing.assert_array_equal(out, expected)  # sample 1 has no image: untouched


def test_no_images_is_exactly_the_lm(model_and_params):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 9)  # no placeholder among them
  lm_logits, _ = lm.Model(**LM).apply({"params": params["lm"]}, tokens)
  logits, _ = model.apply({"params": params}, tokens, None)
  np.testing.assert_array_equal(logits, lm_logits)
  # Images present but no placeholders in the text: nothing is written.
  logits, _ = model.apply({"params": params}, tokens, random_images(jax.random.key(2), 2, 1))
  np.testing.assert_array_equal(logits, lm_logits)


def test_image_embeddings_land_at_placeholders(model_and_params):
  model, params = model_and_params
  # Sample 0: two images; sample 1: text only, in the same batch, no dummy image in its text.
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, 6, 7],
                      [1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5]])
  images = random_images(jax.random.key(3), 2, 2)
  logits, aux = model.apply({"params": params}, tokens, images)
  assert aux["img/features"].shape == (2, 2, P, 64)
  # The same sequence built by hand and run through the plain LM.
  language = lm.Model(**LM)
  x = language.apply({"params": params["lm"]}, tokens, method="embed_tokens")
  x = x.at[0, 1:5].set(aux["img/features"][0, 0]).at[0, 6:10].set(aux["img/features"][0, 1])
  expected, _ = language.apply({"params": params["lm"]}, x, mask=layers.Mask(causal=True),
                               method="from_embeddings")
  np.testing.assert_allclose(logits, expected, atol=1e-6)
  # The text-only sample equals the LM on it alone.
  alone, _ = language.apply({"params": params["lm"]}, tokens[1:])
  np.testing.assert_allclose(logits[1], alone[0], atol=1e-5)


def test_text_never_changes_visual_tokens(model_and_params):
  model, params = model_and_params
  images = random_images(jax.random.key(4), 1, 1)
  a = jnp.array([[1, IMG, IMG, IMG, IMG, 5, 6, 7]])
  b = jnp.array([[3, IMG, IMG, IMG, IMG, 8, 2, 1]])
  _, aux_a = model.apply({"params": params}, a, images)
  _, aux_b = model.apply({"params": params}, b, images)
  np.testing.assert_array_equal(aux_a["img/features"], aux_b["img/features"])


def test_image_gradient_flows_only_through_the_projector(model_and_params):
  model, params = model_and_params
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5, 6, 7]])
  images = random_images(jax.random.key(5), 1, 1)

  def loss(images, params):
    return jnp.sum(model.apply({"params": params}, tokens, images)[0][:, 4:] ** 2)

  assert jnp.any(jax.grad(loss)(images, params) != 0)
  cut = jax.tree.map(lambda x: x, params)
  cut["projector"]["dense_1"] = jax.tree.map(jnp.zeros_like, params["projector"]["dense_1"])
  np.testing.assert_array_equal(jax.grad(loss)(images, cut), 0.0)


def test_prefix_lm_is_bidirectional_over_image_and_prompt(model_and_params):
  model, params = model_and_params
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5, 6, 7, 8]])
  images = random_images(jax.random.key(6), 1, 1)
  prompt_changed = tokens.at[0, 5].set(3)
  answer_changed = tokens.at[0, 7].set(3)
  prefix = jnp.array([6])  # BOS, image, one prompt token
  run = lambda t, **kw: model.apply({"params": params}, t, images, **kw)[0]
  # Image positions see the prompt token after them under prefix-LM, not under causal.
  assert not np.allclose(run(prompt_changed, prefix_len=prefix)[0, 1],
                         run(tokens, prefix_len=prefix)[0, 1], atol=1e-5)
  np.testing.assert_allclose(run(prompt_changed)[0, :5], run(tokens)[0, :5], atol=1e-6)
  # The answer stays causal.
  np.testing.assert_allclose(run(answer_changed, prefix_len=prefix)[0, :7],
                             run(tokens, prefix_len=prefix)[0, :7], atol=1e-6)


def test_vision_layer_and_cls():
  vit_fields = dict(variant="mu/8", image_size=16, pool="cls")
  model = make(vit=vit_fields, vision_layer=-2, drop_cls=True)
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5]])
  images = random_images(jax.random.key(7), 1, 1)
  params = nn.unbox(model.init(jax.random.key(0), tokens, images))["params"]
  _, aux = model.apply({"params": params}, tokens, images)
  _, vit_aux = vit.Model(**vit_fields).apply({"params": params["vit"]}, images[:, 0])
  expected = layers.Projector(64, 2).apply({"params": params["projector"]},
                                           vit_aux["block_0"][:, 1:])
  np.testing.assert_allclose(aux["img/features"][:, 0], expected, atol=1e-6)
  assert early_fusion.num_image_tokens(vit_fields, 16, drop_cls=True) == 4
  assert early_fusion.num_image_tokens(vit_fields, 16, drop_cls=False) == 5


def test_linear_projector_and_bad_name():
  tokens = jnp.array([[1, IMG, IMG, IMG, IMG]])
  images = jnp.zeros((1, 1, 16, 16, 3))
  params = nn.unbox(make(projector="linear").init(jax.random.key(0), tokens, images))["params"]
  assert list(params["projector"]) == ["dense_0"]
  with pytest.raises(ValueError, match="projector must be one of"):
    make(projector="qformer").init(jax.random.key(0), tokens, images)


def test_pretrained_towers_load_unchanged(model_and_params):
  model, params = model_and_params
  tokens = jnp.array([[1, 2, 3, 4]])
  pretrained_lm = nn.unbox(lm.Model(**LM).init(jax.random.key(42), tokens))["params"]
  pretrained_vit = nn.unbox(vit.Model(**VIT).init(jax.random.key(43),
                                                  jnp.zeros((1, 16, 16, 3))))["params"]
  loaded = checkpoint.graft(params, {"lm": pretrained_lm, "vit": pretrained_vit})
  expected, _ = lm.Model(**LM).apply({"params": pretrained_lm}, tokens)
  np.testing.assert_array_equal(model.apply({"params": loaded}, tokens, None)[0], expected)
  chex_equal = jax.tree.map(np.array_equal, loaded["vit"], pretrained_vit)
  assert all(jax.tree.leaves(chex_equal))
  wrong = lm.Model(**{**LM, "mlp_dim": 128}).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match=r"parameter lm/block_0/mlp/(down|gate|up)/kernel"):
    checkpoint.graft(params, {"lm": nn.unbox(wrong)["params"]})


def test_no_loss_on_image_positions():
  # The synthetic source never puts loss on an image target, a prompt or padding.
  batch = synthetic.ShapeScenes(4, None, 16, P, task="caption").batch(0)
  image_id = tokenizers.ByteTokenizer.image_id
  assert np.all(batch["loss_weights"][batch["targets"] == image_id] == 0)
  tokenizer = tokenizers.ByteTokenizer()
  for targets_b, weights_b in zip(batch["targets"], batch["loss_weights"]):
    weighted = targets_b[weights_b > 0]  # exactly the caption and its EOS
    assert weighted[-1] == tokenizer.eos_id
    shape = r"a (red|green|blue|yellow) (square|circle) (top|bottom) (left|right)"
    assert re.fullmatch(rf"{shape}(, {shape})*\.", tokenizer.decode(weighted[:-1]))
  assert np.all(batch["loss_weights"][batch["targets"] == 0] == 0)
  np.testing.assert_array_equal(batch["tokens"][:, 1:1 + P], image_id)

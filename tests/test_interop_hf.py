"""HuggingFace import/export, proven against transformers run in PyTorch on the CPU.

Tiny random models are built from configs here (no network), saved with
save_pretrained, imported, and compared on the same inputs.
"""
import json
import os
import tracemalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch
import transformers

from mmjax import models
from mmjax import sharding
from mmjax.data import anyres
from mmjax.interop import hf
from mmjax.models import early_fusion
import hf_parity

RTOL = 1e-4  # max |mmjax - transformers| / max |transformers|


def assert_parity(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert error < RTOL, f"relative error {error:.2e}"


def build(config):
  return models.build(config["family"], config["model"])


def saved(tmp_path, model, name="hf"):
  path = str(tmp_path / name)
  model.save_pretrained(path)
  return path


IMAGES = np.random.RandomState(0).randn(2, 24, 24, 3).astype(np.float32)


def torch_images(images):
  return torch.tensor(images.transpose(0, 3, 1, 2))


VISION_CONFIG = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=52, image_size=24, patch_size=8)


@pytest.fixture(scope="module", params=["vit", "clip", "siglip"])
def vision(request, tmp_path_factory):
  torch.manual_seed(0)
  if request.param == "vit":
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        **VISION_CONFIG, num_labels=5))
  elif request.param == "clip":
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_CONFIG))
  else:
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_CONFIG))
  return request.param, model.eval(), saved(tmp_path_factory.mktemp(request.param), model)


def vision_outputs(kind, model, images):
  with torch.no_grad():
    out = model(pixel_values=torch_images(images), output_hidden_states=True)
  return out.logits if kind == "vit" else out.pooler_output, out.hidden_states


def test_vision_tower_parity(vision):
  kind, model, path = vision
  config, params = hf.load(path)
  out, aux = build(config).apply({"params": params}, jnp.asarray(IMAGES))
  expected, hidden = vision_outputs(kind, model, IMAGES)
  assert_parity(out, expected)
  # Intermediate layers too: what LLaVA reads (hidden_states[-2]) is block L-2's output.
  assert_parity(aux["block_1"], hidden[-2])


def test_vision_tower_export_round_trip(vision, tmp_path):
  kind, model, path = vision
  reloaded = hf_parity.export_and_reload(model, path, tmp_path / "out")
  assert_parity(vision_outputs(kind, reloaded, IMAGES)[0], vision_outputs(kind, model, IMAGES)[0])


TOKENS = np.random.RandomState(1).randint(0, 97, (2, 11))


def llama(**overrides):
  config = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=80, vocab_size=97,
                max_position_embeddings=64)
  config.update(overrides)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


LMS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=36, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
        bos_token_id=0, eos_token_id=0)),
    "llama_gqa_untied": llama,
    "llama_mqa_tied": lambda: llama(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3_rope_scaling": lambda: llama(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8)),
}


@pytest.fixture(scope="module", params=sorted(LMS))
def language_model(request, tmp_path_factory):
  torch.manual_seed(0)
  model = LMS[request.param]().eval()
  return model, saved(tmp_path_factory.mktemp(request.param), model)


def lm_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_lm_parity(language_model):
  model, path = language_model
  config, params = hf.load(path)
  logits, _ = build(config).apply({"params": params}, jnp.asarray(TOKENS))
  assert_parity(logits, lm_logits(model, TOKENS))


def test_lm_greedy_generation_matches_transformers(language_model):
  model, path = language_model
  config, params = hf.load(path)
  ours = build(config)
  tokens = TOKENS[:1, :5]
  for _ in range(6):  # greedy: the argmax of a full forward pass, one token at a time
    logits, _ = ours.apply({"params": params}, jnp.asarray(tokens))
    tokens = np.concatenate([tokens, np.argmax(logits[:, -1:], -1)], axis=1)
  with torch.no_grad():
    theirs = model.generate(torch.tensor(TOKENS[:1, :5]), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(tokens, theirs.numpy())


def test_lm_export_round_trip(language_model, tmp_path):
  model, path = language_model
  reloaded = hf_parity.export_and_reload(model, path, tmp_path / "out")
  assert_parity(lm_logits(reloaded, TOKENS), lm_logits(model, TOKENS))


IMAGE_TOKEN = 100


# HF's vision_feature_layer indexes hidden_states, whose 0 is the embeddings: -2 and 1 are the
# same layer of a 3-block tower, counted from either end, and 2 is another.
@pytest.fixture(scope="module", params=[-2, 1, 2])
def llava(tmp_path_factory, request):
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**{**VISION_CONFIG, "num_hidden_layers": 3}),
      text_config=transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=80, vocab_size=104),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=request.param)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  return model, saved(tmp_path_factory.mktemp("llava"), model)


def llava_inputs():
  # One prompt, two images of 9 patches each, with text around and between them.
  tokens = np.array([[1, 5] + [IMAGE_TOKEN] * 9 + [7, 8] + [IMAGE_TOKEN] * 9 + [9, 10, 11]])
  return tokens, IMAGES


def test_llava_parity_with_two_images(llava):
  model, path = llava
  config, params = hf.load(path)
  layer = model.config.vision_feature_layer
  assert config["family"] == "early_fusion"
  assert config["model"]["vision_layer"] == {-2: -2, 1: 0, 2: 1}[layer]  # mmjax's block index
  tokens, images = llava_inputs()
  logits, _ = build(config).apply({"params": params}, jnp.asarray(tokens),
                                  jnp.asarray(images[None]))
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens), pixel_values=torch_images(images)).logits
  assert_parity(logits, expected.numpy())


def test_llava_export_round_trip(llava, tmp_path):
  model, path = llava
  reloaded = hf_parity.export_and_reload(model, path, tmp_path / "out")
  assert reloaded.config.vision_feature_layer == model.config.vision_feature_layer
  tokens, images = llava_inputs()
  with torch.no_grad():
    a = reloaded(input_ids=torch.tensor(tokens), pixel_values=torch_images(images)).logits
    b = model(input_ids=torch.tensor(tokens), pixel_values=torch_images(images)).logits
  assert_parity(a.numpy(), b.numpy())


PINPOINTS = [[24, 48], [48, 24], [48, 48], [24, 72]]


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION_CONFIG),
      text_config=transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=80, vocab_size=104),
      image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  return model, saved(tmp_path_factory.mktemp("llava_next"), model)


def llava_next_inputs():
  """One prompt, a 30 x 70 px and a 60 x 14 px image: 1 x 3 and 2 x 1 grids of 24 px tiles
  after a base tile each; unpadded, 33 and 21 tokens."""
  sizes = [(30, 70), (60, 14)]
  counts = [anyres.num_tokens(size, PINPOINTS, 24, 8) for size in sizes]
  tokens = np.array([[1, 5] + [IMAGE_TOKEN] * counts[0] + [7, 8] + [IMAGE_TOKEN] * counts[1]
                     + [9, 10, 11]])
  tiles = [1 + np.prod(anyres.tile_grid(size, PINPOINTS, 24)) for size in sizes]
  pixels = np.random.RandomState(1).randn(2, max(tiles), 24, 24, 3).astype(np.float32)
  return tokens, sizes, counts, tiles, pixels


def test_anyres_token_counts_by_hand():
  # 30 x 70 px: the 24 x 72 pinpoint keeps the most pixels (56 x 24 of them; 1 x 3 tiles, a
  # 3 x 9 grid of patches). The image is less wide (70 / 30) than the grid (9 / 3): resized to
  # the grid's 3 rows it is 70 * 3 / 30 = 7 patches wide, so 1 padding column goes each side.
  sources = anyres.token_sources((30, 70), PINPOINTS, 24, 8)
  assert anyres.tile_grid((30, 70), PINPOINTS, 24) == (1, 3)
  assert len(sources) == 9 + 3 * (7 + 1)
  np.testing.assert_array_equal(sources[:9], np.arange(9))  # the base tile's patches
  # Row 0 of the grid: columns 1..7 of the 9, i.e. tile 1's patches 1, 2, tile 2's 0-2,
  # tile 3's 0, 1; then the newline.
  np.testing.assert_array_equal(sources[9:17], [10, 11, 18, 19, 20, 27, 28, early_fusion.NEWLINE])


def test_anyres_tiles_are_the_hf_processors():
  from transformers.models.llava_next import image_processing_pil_llava_next  # pylint: disable=g-import-not-at-top
  processor = image_processing_pil_llava_next.LlavaNextImageProcessorPil(
      size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
      image_grid_pinpoints=PINPOINTS, do_normalize=False)
  rng = np.random.RandomState(2)
  for size in [(30, 70), (60, 14), (47, 47)]:
    image = rng.randint(0, 256, (*size, 3)).astype(np.uint8)
    theirs = processor(images=[image], return_tensors="np")
    ours = anyres.tiles(image, PINPOINTS, 24)
    assert ours.shape[0] == 1 + np.prod(anyres.tile_grid(size, PINPOINTS, 24))
    np.testing.assert_allclose(ours, theirs["pixel_values"][0].transpose(0, 2, 3, 1), atol=1e-6)
    assert list(theirs["image_sizes"][0]) == list(size)


def test_llava_next_parity_with_two_image_sizes(llava_next):
  model, path = llava_next
  config, params = hf.load(path)
  assert config["model"]["grid_pinpoints"] == tuple(map(tuple, PINPOINTS))
  tokens, sizes, counts, tiles, pixels = llava_next_inputs()
  # Each image's tiles and tokens, padded to what the pinpoints allow (PAD tokens, blank tiles).
  packed = anyres.Layout(tuple(map(tuple, PINPOINTS)), 24, 8, max_images=2).pack(
      [[(pixels[i, :n], anyres.token_sources(size, PINPOINTS, 24, 8))
        for i, (size, n) in enumerate(zip(sizes, tiles))]])
  images = early_fusion.Tiles(jnp.asarray(packed["images"]), jnp.asarray(packed["image_sources"]))
  logits, aux = build(config).apply({"params": params}, jnp.asarray(tokens), images)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     pixel_values=torch.tensor(pixels.transpose(0, 1, 4, 2, 3)),
                     image_sizes=torch.tensor(sizes)).logits
  assert_parity(logits, expected.numpy())
  # Padded to the most tokens an image can take: the base tile's 9 and the 48 x 48 grid's 6
  # rows of 6 patches and a newline.
  assert aux["img/features"].shape == (1, 2, 9 + 6 * (6 + 1), 48)
  assert tiles == [4, 3] and counts == [33, 21]


def test_llava_next_export_round_trip(llava_next, tmp_path):
  model, path = llava_next
  reloaded = hf_parity.export_and_reload(model, path, tmp_path / "out")
  assert reloaded.config.image_grid_pinpoints == PINPOINTS
  tokens, sizes, _, _, pixels = llava_next_inputs()
  inputs = dict(input_ids=torch.tensor(tokens), image_sizes=torch.tensor(sizes),
                pixel_values=torch.tensor(pixels.transpose(0, 1, 4, 2, 3)))
  with torch.no_grad():
    assert_parity(reloaded(**inputs).logits.numpy(), model(**inputs).logits.numpy())


def test_import_streams_into_shardings(language_model):
  _, path = language_model
  config, _ = hf.load(path)
  model = build(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  shardings = sharding.param_shardings(boxed, mesh, sharding.rules("fsdp_tp"))
  _, params = hf.load(path, shardings)
  kernel = params["block_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding == shardings["block_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0] // 4,
                                                                kernel.shape[1] // 2)}


def test_unsupported_fields_name_the_field(tmp_path):
  torch.manual_seed(0)
  path = saved(tmp_path, llama(attention_bias=True))
  with pytest.raises(ValueError, match=r"Llama: config.json field 'attention_bias'=True"):
    hf.load(path)
  config = json.load(open(os.path.join(path, "config.json")))
  config.update(attention_bias=False, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
  json.dump(config, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"'rope_parameters.rope_type'='yarn' is not supported"):
    hf.load(path)
  config["model_type"] = "mamba"
  json.dump(config, open(os.path.join(path, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"'model_type'='mamba' is not supported"):
    hf.load(path)


def test_export_refuses_what_huggingface_cannot_hold():
  with pytest.raises(ValueError, match=r"model.posemb='sincos2d' has no HuggingFace equivalent"):
    hf.hf_config({"family": "vit", "model": {"variant": "Ti/16", "posemb": "sincos2d"}})
  with pytest.raises(ValueError, match=r"model.pool='none' has no HuggingFace equivalent"):
    hf.hf_config({"family": "vit", "model": {"variant": "Ti/16", "pool": "none"}})
  # Pooled by averaging, a tower exports as SigLIP without its head (PaliGemma's), if it is one.
  with pytest.raises(ValueError, match=r"SigLIP export needs model.mlp_activation='gelu_tanh'"):
    hf.hf_config({"family": "vit", "model": {"variant": "Ti/16", "pool": "gap"}})


def test_missing_tensor_is_named(tmp_path):
  torch.manual_seed(0)
  path = saved(tmp_path, LMS["gpt2"]())
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["transformer.h.1.ln_2.weight"]
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"tensor 'transformer.h.1.ln_2.weight' is missing"):
    hf.load(path)


def test_sharded_checkpoint_and_tokenizer_files(tmp_path):
  torch.manual_seed(0)
  model = llama().eval()
  path = str(tmp_path / "hf")
  model.save_pretrained(path, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=__import__("tokenizers").Tokenizer(
          __import__("tokenizers").models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
  tokenizer.save_pretrained(path)
  config, params = hf.load(path)
  logits, _ = build(config).apply({"params": params}, jnp.asarray(TOKENS))
  assert_parity(logits, lm_logits(model, TOKENS))
  out = tmp_path / "copy"
  out.mkdir()
  assert "tokenizer.json" in hf.copy_tokenizer(path, str(out))
  assert (out / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()


def test_import_streams_each_tensor_into_its_shards(tmp_path):
  """8 devices: every tensor arrives sharded as the fsdp rules say, and the host holds a few
  tensors at a time (traced numpy allocations), never the model."""
  torch.manual_seed(0)
  path = saved(tmp_path, transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)))
  config = hf.mmjax_config(json.load(open(os.path.join(path, "config.json"))))
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  shardings = sharding.param_shardings(models.abstract_params("lm", config["model"]), mesh,
                                       sharding.rules("fsdp"))
  hf.load(path, shardings)  # jax's one-time allocations (caches) are not the import's
  tracemalloc.start()
  try:
    _, params = hf.load(path, shardings)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  jax.tree.map(lambda x, s: assert_equal(x.sharding, s), params, shardings)
  assert params["block_0"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", None)
  sizes = [x.nbytes for x in jax.tree.leaves(params)]
  assert sum(sizes) > 10 * max(sizes)
  assert peak < 3 * max(sizes), (peak, max(sizes), sum(sizes))


def assert_equal(a, b):
  assert a == b, (a, b)

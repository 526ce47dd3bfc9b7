"""IDEFICS (IdeficsForVisionText2Text, the open Flamingo) in and out, proven against transformers.

Tiny random IDEFICS models are built from configs (no network), with and without the
Perceiver resampler, with float and vector gates: two images in one prompt, text before
the first image, an empty image slot, a decoupled vocabulary (two additional rows, <image>
the last), cross blocks before every second layer, and non-zero gates everywhere.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from transformers.models.idefics import image_processing_pil_idefics
from transformers.models.idefics import processing_idefics

from mmjax import generation
from mmjax import models
from mmjax.data import images as images_lib
from mmjax.data import tiles as tiles_lib
from mmjax.interop import hf
from mmjax.models import deep_fusion
import hf_parity

RTOL = 1e-4  # max |mmjax - transformers| / max |transformers|
VOCAB, EXTRA, SIZE = 320, 2, 8
IMAGE = VOCAB + EXTRA - 1  # <image>: the last additional row, after <fake_token_around_image>

VISION = dict(embed_dim=16, image_size=SIZE, patch_size=4, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=32)
TEXT = dict(vocab_size=VOCAB, additional_vocab_size=EXTRA, hidden_size=32, intermediate_size=48,
            num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            freeze_text_layers=False, freeze_vision_layers=False)
KINDS = {  # the two layouts IDEFICS checkpoints come in
    "resampler,vector": dict(use_resampler=True, alpha_type="vector", qk_layer_norms=True,
                             perceiver_config=dict(use_resampler=True, resampler_n_latents=3,
                                                   resampler_depth=2, resampler_n_heads=2,
                                                   resampler_head_dim=6)),
    "plain,float": dict(use_resampler=False, alpha_type="float", qk_layer_norms=False)}


def tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer with IDEFICS' two additional tokens at their ids."""
  vocab = {f"t{i}": i for i in range(VOCAB)}
  vocab.update({"<fake_token_around_image>": VOCAB, "<image>": IMAGE})
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
  model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token="t1",
                                              eos_token="t2", pad_token="t0")


@pytest.fixture(scope="module", params=sorted(KINDS))
def idefics(request, tmp_path_factory):
  """(transformers model, its directory, inputs as transformers takes them, images)."""
  config = transformers.IdeficsConfig(vision_config=VISION, **TEXT, **KINDS[request.param])
  torch.manual_seed(0)
  model = transformers.IdeficsForVisionText2Text(config).eval()
  hf_parity.open_gates(model, "alpha")
  if config.use_resampler:  # latents small beside the images' tokens: each image's latents differ
    with torch.no_grad():
      model.model.perceiver_resampler.latents.mul_(0.1)
  path = str(tmp_path_factory.mktemp("idefics") / "hf")
  model.save_pretrained(path)

  rng = np.random.default_rng(0)
  sizes = [[(8, 16), (20, 9)], [(16, 16), (8, 8)], [(5, 30)]]  # (h, w) of each row's images
  images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in row] for row in sizes]
  processor = image_processing_pil_idefics.IdeficsImageProcessorPil(image_size=SIZE)
  pixels = np.zeros((3, 2, 3, SIZE, SIZE), np.float32)  # [B, I, 3, H, W]; row 2's slot 1 empty
  for b, row in enumerate(images):
    pixels[b, :len(row)] = np.asarray(processor(row, return_tensors="np"))
  tokens = rng.integers(4, 300, (3, 12))
  tokens[0, [3, 7]] = IMAGE  # text before the first image, then two images apart
  tokens[1, [2, 3]] = IMAGE  # two adjacent images: the second is the latest from there on
  tokens[2, 5] = IMAGE  # one image, an empty second slot
  index, _ = processing_idefics.image_attention_mask_for_packed_input_ids(
      torch.tensor(tokens), tokenizer(), "pt")
  image_mask = processing_idefics.incremental_to_binary_attention_mask(index, "pt", num_classes=2)
  inputs = dict(input_ids=tokens, pixel_values=pixels, image_attention_mask=image_mask.numpy(),
                attention_mask=np.ones_like(tokens))
  return model, path, inputs, images


def ours(inputs) -> tuple[jax.Array, jax.Array]:
  return (jnp.asarray(inputs["input_ids"], jnp.int32),
          jnp.asarray(inputs["pixel_values"].transpose(0, 1, 3, 4, 2)))


def torch_inputs(inputs) -> dict:
  return {k: torch.tensor(v) for k, v in inputs.items()}


def test_processor_matches_transformers(idefics):
  _, path, inputs, images = idefics
  # Pixels: each image resized to the tower's size (bicubic) and normalised with CLIP's.
  for b, row in enumerate(images):
    for i, image in enumerate(row):
      mine = images_lib.normalise(images_lib.from_bytes(image, SIZE, resize="bicubic"),
                                  tiles_lib.CLIP_MEAN, tiles_lib.CLIP_STD)
      np.testing.assert_allclose(mine, inputs["pixel_values"][b, i].transpose(1, 2, 0),
                                 atol=1e-5)
  # Which image each text position reads: the processor's mask is deep fusion's "latest" rule.
  with open(os.path.join(path, "config.json")) as f:
    fields = hf.mmjax_config(json.load(f))["model"]
  assert fields["media_attention"] == "latest" and fields["image_token_id"] == IMAGE
  media = deep_fusion.media_mask(jnp.asarray(inputs["input_ids"]) == IMAGE, jnp.arange(2),
                                 fields["media_attention"])
  np.testing.assert_array_equal(media, inputs["image_attention_mask"].astype(bool))


def test_logits_match_transformers(idefics):
  model, path, inputs, _ = idefics
  config, params = hf.load(path)
  fields = config["model"]
  assert fields["cross_layers"] == (0, 2) and fields["lm"]["vocab_size"] == VOCAB + EXTRA
  with torch.no_grad():
    theirs = model(**torch_inputs(inputs)).logits.numpy()
  assert theirs.shape[-1] == VOCAB + EXTRA
  logits, _ = models.build("deep_fusion", fields).apply({"params": params}, *ours(inputs))
  error = hf_parity.relative_error(logits, theirs)
  assert error < RTOL, f"relative error {error:.2e}"
  # The inputs reach what a wrong rule would get wrong: rows that see no image keep IDEFICS'
  # MLP branch, and a position reads only the latest image.
  for wrong in (dict(media_free_rows="zero"), dict(media_attention="previous")):
    other, _ = models.build("deep_fusion", {**fields, **wrong}).apply({"params": params},
                                                                       *ours(inputs))
    assert hf_parity.relative_error(other, theirs) > 10 * RTOL, wrong


def test_export_round_trip_is_bit_identical(idefics, tmp_path):
  model, path, inputs, _ = idefics
  config, params = hf.load(path)
  hf.save(str(tmp_path), config, params)
  hf_parity.assert_same_tensors(path, str(tmp_path))
  reloaded = transformers.IdeficsForVisionText2Text.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(**torch_inputs(inputs)).logits.numpy(),
                                  model(**torch_inputs(inputs)).logits.numpy())


def test_greedy_kv_cache_generation_matches_transformers(idefics):
  model, path, inputs, _ = idefics
  config, params = hf.load(path)
  n = 6
  with torch.no_grad():
    theirs = model.generate(**torch_inputs(inputs), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n)
  tokens, pixels = ours(inputs)
  generate = jax.jit(generation.make_generate(
      models.build("deep_fusion", config["model"]), generation.Sampling(max_new_tokens=n)))
  out = generate(params, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]), pixels,
                 jax.random.key(0))
  np.testing.assert_array_equal(out["tokens"], theirs[:, tokens.shape[1]:].numpy())


def test_unsupported_layouts_name_the_field(idefics):
  _, path, _, _ = idefics
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with pytest.raises(ValueError, match="cross_layer_interval"):
    hf.mmjax_config({**config, "cross_layer_interval": 3})  # 3 does not divide 4 layers
  fields = hf.mmjax_config(config)["model"]
  with pytest.raises(ValueError, match="media_attention"):
    hf.hf_config({"family": "deep_fusion", "model": {**fields, "media_attention": "previous"}})

"""Llama 3.2 Vision (MllamaForConditionalGeneration) in and out, proven against transformers.

A tiny random Mllama is built from a config (no network): four tile slots, images laid
out in two arrangements, two images in one prompt, text before the first image, adjacent
image tokens, an empty image slot, GQA, cross-attention layers at two indices and
non-zero gates everywhere. Its processor is checked against transformers' own on images
of several sizes and aspect ratios.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from transformers.models.mllama import image_processing_pil_mllama
from transformers.models.mllama import processing_mllama

from mmjax import checkpoint
from mmjax import generation
from mmjax import lora
from mmjax import models
from mmjax.data import tiles as tiles_lib
from mmjax.interop import hf
from mmjax.models import deep_fusion
from mmjax.models import tiled_vit
import hf_parity
import train_cli

RTOL = 1e-4  # max |mmjax - transformers| / max |transformers|
IMAGE = 320  # <|image|>: the first of the 8 rows past the vocabulary, as in Meta's
TILE, MAX_TILES = 8, 4

VISION = dict(hidden_size=16, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
              intermediate_size=32, vision_output_dim=48, image_size=TILE, patch_size=4,
              max_num_tiles=MAX_TILES, intermediate_layers_indices=[0, 2], norm_eps=1e-5)
TEXT = dict(vocab_size=320, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, cross_attention_layers=[1, 3],
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
  """(transformers model, its directory, inputs as transformers takes them)."""
  config = transformers.MllamaConfig(vision_config=VISION, text_config=TEXT,
                                     image_token_index=IMAGE)
  torch.manual_seed(0)
  model = transformers.MllamaForConditionalGeneration(config).eval()
  hf_parity.open_gates(model, "gate")
  path = str(tmp_path_factory.mktemp("mllama") / "hf")
  model.save_pretrained(path)

  rng = np.random.default_rng(0)
  sizes = [[(8, 16), (20, 9)], [(16, 16), (8, 8)], [(5, 30)]]  # (h, w) of each row's images
  images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in row] for row in sizes]
  processor = image_processing_pil_mllama.MllamaImageProcessorPil(
      size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
      image_mean=list(tiles_lib.CLIP_MEAN), image_std=list(tiles_lib.CLIP_STD))
  pixels = processor(images, return_tensors="np")
  tokens = rng.integers(4, 300, (3, 12))
  tokens[0, [3, 7]] = IMAGE  # text before the first image, then two images apart
  tokens[1, [2, 3]] = IMAGE  # two adjacent images: one run, both seen from the second on
  tokens[2, 5] = IMAGE  # one image, an empty second slot
  spans = [processing_mllama.get_cross_attention_token_mask(list(row), IMAGE) for row in tokens]
  cross_mask = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
      spans, pixels["num_tiles"], MAX_TILES, tokens.shape[1])
  inputs = dict(input_ids=tokens, pixel_values=pixels["pixel_values"],
                aspect_ratio_ids=pixels["aspect_ratio_ids"],
                aspect_ratio_mask=pixels["aspect_ratio_mask"], cross_attention_mask=cross_mask)
  return model, path, inputs, images


def ours(inputs, images) -> tuple[jax.Array, tiled_vit.Tiles]:
  return jnp.asarray(inputs["input_ids"], jnp.int32), jax.tree.map(
      jnp.asarray, tiles_lib.prepare(images, TILE, MAX_TILES))


def test_processor_matches_transformers(mllama):
  _, _, inputs, images = mllama
  tiles = tiles_lib.prepare(images, TILE, MAX_TILES)
  np.testing.assert_array_equal(tiles.aspect_ratio_ids, inputs["aspect_ratio_ids"])
  np.testing.assert_array_equal(tiles.tile_mask, inputs["aspect_ratio_mask"].astype(bool))
  np.testing.assert_allclose(tiles.pixels, inputs["pixel_values"].transpose(0, 1, 2, 4, 5, 3),
                             atol=1e-5)
  # The rows above use four of the eight arrangements; every size maps as transformers' does.
  for size in [(1, 1), (8, 8), (9, 8), (7, 33), (33, 7), (16, 17), (40, 40), (100, 3)]:
    expected = image_processing_pil_mllama.get_optimal_tiled_canvas(*size, MAX_TILES, TILE)
    rows, columns = tiles_lib.canvas(size, TILE, MAX_TILES)
    assert (rows * TILE, columns * TILE) == tuple(int(s) for s in expected), size
    assert tiles_lib.fitted_size(size, rows, columns, TILE) == (
        image_processing_pil_mllama.get_image_size_fit_to_canvas(
            *size, rows * TILE, columns * TILE, TILE))


def test_latest_run_window_by_hand():
  is_marker = jnp.array([[0, 1, 0, 1, 1, 0, 1, 0]], bool)
  seen, oldest = deep_fusion.media_window(is_marker, "latest_run")
  np.testing.assert_array_equal(seen, [[0, 1, 1, 2, 3, 3, 4, 4]])
  np.testing.assert_array_equal(oldest, [[0, 0, 0, 1, 1, 1, 3, 3]])
  # Decoding continues the window: a new marker right after one extends the run.
  step = lambda s, o, after, now: deep_fusion.next_window(
      jnp.array([s]), jnp.array([o]), jnp.array([after]), jnp.array([now]), "latest_run")
  assert [int(v[0]) for v in step(4, 3, True, True)] == [5, 3]
  assert [int(v[0]) for v in step(4, 3, False, True)] == [5, 4]
  assert [int(v[0]) for v in step(4, 3, False, False)] == [4, 3]


def test_logits_match_transformers(mllama):
  model, path, inputs, images = mllama
  config, params = hf.load(path)
  assert config["model"]["cross_layers"] == (1, 2)  # HF layers 1 and 3 precede blocks 1 and 2
  with torch.no_grad():
    theirs = model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  logits, _ = models.build("deep_fusion", config["model"]).apply({"params": params},
                                                                  *ours(inputs, images))
  error = hf_parity.relative_error(logits, theirs)
  assert error < RTOL, f"relative error {error:.2e}"
  # The inputs reach what a wrong rule would get wrong: Flamingo's rows (zeroed where no
  # image is seen) and Flamingo's "latest" image differ from transformers by far more.
  for wrong in (dict(media_free_rows="zero"), dict(media_attention="latest")):
    other, _ = models.build("deep_fusion", {**config["model"], **wrong}).apply(
        {"params": params}, *ours(inputs, images))
    assert hf_parity.relative_error(other, theirs) > 10 * RTOL, wrong


def test_export_round_trip_is_bit_identical(mllama, tmp_path):
  model, path, inputs, _ = mllama
  config, params = hf.load(path)
  hf.save(str(tmp_path), config, params)
  hf_parity.assert_same_tensors(path, str(tmp_path))
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["text_config"]["cross_attention_layers"] == [1, 3]
  reloaded = transformers.MllamaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
    np.testing.assert_array_equal(reloaded(**torch_inputs).logits.numpy(),
                                  model(**torch_inputs).logits.numpy())


def test_greedy_kv_cache_generation_matches_transformers(mllama):
  model, path, inputs, images = mllama
  config, params = hf.load(path)
  n = 6
  with torch.no_grad():
    theirs = model.generate(**{k: torch.tensor(v) for k, v in inputs.items()},
                            attention_mask=torch.ones(inputs["input_ids"].shape, dtype=torch.long),
                            do_sample=False, max_new_tokens=n, min_new_tokens=n)
  tokens, tiles = ours(inputs, images)
  generate = jax.jit(generation.make_generate(
      models.build("deep_fusion", config["model"]), generation.Sampling(max_new_tokens=n)))
  out = generate(params, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]), tiles,
                 jax.random.key(0))
  np.testing.assert_array_equal(out["tokens"], theirs[:, tokens.shape[1]:].numpy())


def test_unsupported_layouts_name_the_field(mllama, tmp_path):
  _, path, _, _ = mllama
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["text_config"]["cross_attention_layers"] = [1, 4]  # the last layer: nothing after it
  with pytest.raises(ValueError, match="cross_attention_layers"):
    hf.mmjax_config(config)
  fields = hf.mmjax_config(json.load(open(os.path.join(path, "config.json"))))["model"]
  with pytest.raises(ValueError, match="media_attention"):
    hf.hf_config({"family": "deep_fusion", "model": {**fields, "media_attention": "previous"}})


def flat(tree) -> dict:
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lora_fine_tune_moves_only_adapters_and_peft_loads_them(mllama, tmp_path, run_train):
  model, path, inputs, images = mllama
  train_cli.run_tool("import_hf.py", f"--hf_dir={path}", f"--out={tmp_path / 'import'}")
  rows = run_train(tmp_path / "run", f"hf.py:{tmp_path / 'import'},lora",
                   {"total_steps": 3, "log_every": 3, "eval_every": 0,
                    "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
                    "data.train_size": 64, "data.eval_size": 16})  # the default scenes, fewer
  assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
  _, imported, _ = checkpoint.read_model(str(tmp_path / "import"))
  config, trained, _ = checkpoint.read_model(str(tmp_path / "run"), merge_adapters=False)
  trained, imported = flat(trained), flat(imported)
  factors = [p for p in trained if lora.is_factor(p)]
  assert any(p.startswith("xattn_") for p in factors) and any(p.startswith("lm/") for p in factors)
  for name, value in imported.items():  # the base model never moved
    np.testing.assert_array_equal(trained[name], value, err_msg=name)
  assert all(np.abs(trained[p]).max() > 0 for p in factors if p.endswith("lora_b"))

  train_cli.run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}",
                     f"--out={tmp_path / 'adapter'}", "--format=peft")
  _, merged, _ = checkpoint.read_model(str(tmp_path / "run"))
  ours_logits, _ = models.build("deep_fusion", config["model"]).apply({"params": merged},
                                                                       *ours(inputs, images))
  base = transformers.MllamaForConditionalGeneration.from_pretrained(path).eval()
  with torch.no_grad():
    torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
    plain = base(**torch_inputs).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    theirs = adapted(**torch_inputs).logits.numpy()
  scale = np.abs(theirs).max()
  assert np.abs(np.asarray(ours_logits) - theirs).max() < RTOL * scale  # PEFT: unmerged
  assert np.abs(plain - theirs).max() > 10 * RTOL * scale  # and the adapters do something

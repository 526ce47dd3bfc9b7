"""Pretrained towers into both fusion models, end to end through train.py and generate.py.

A tiny CLIP vision tower and a tiny Llama with its own tokenizer.json (which,
like Llama's, has no "<image>" and no pad token) are built with transformers
and tokenizers, as a user would download them.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flax import linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np
from PIL import Image
import pytest
import tokenizers as hf_tokenizers
import torch
import transformers

from configs import common
from mmjax import checkpoint
from mmjax import generation
from mmjax import models
from mmjax import steps
from mmjax import towers
from mmjax import trainer
from mmjax.data import images as image_codec
from mmjax.data import synthetic
from mmjax.data import tokenizers
from mmjax.interop import hf
from mmjax.models import lm
from mmjax.models import vit
import train_cli

PIXELS = {"image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}


def scene_texts(n: int = 64) -> list[str]:
  source = synthetic.ShapeScenes(n, None, 32, 1, task="mixed", max_shapes=2)
  return [e["question"] + " " + e["answer"] for e in source.examples(0)] + [
      synthetic.caption(synthetic.draw_scene(np.random.default_rng(i), 32, 2)[1])
      for i in range(n)]


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
  """{"vision": a CLIP vision directory, "language": a Llama directory with a tokenizer}."""
  root = tmp_path_factory.mktemp("towers")
  torch.manual_seed(0)
  vision = root / "clip"
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=8)).save_pretrained(vision)
  (vision / "preprocessor_config.json").write_text(json.dumps(PIXELS))

  language = root / "llama"
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.Metaspace()
  tokenizer.decoder = hf_tokenizers.decoders.Metaspace()
  tokenizer.train_from_iterator(scene_texts(), hf_tokenizers.trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=128, tie_word_embeddings=False)).save_pretrained(language)
  tokenizer.save(str(language / "tokenizer.json"))
  (language / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
  return {"vision": str(vision), "language": str(language)}


def overrides(tower_dirs, **more):
  return {"towers.vision": tower_dirs["vision"], "towers.language": tower_dirs["language"],
          "data.name": "shapes", "model.dtype": "float32", "batch_size": 8, "eval_every": 0,
          "optimizer.warmup_steps": 2, **more}


def config_for(spec: str, settings: dict):
  config = common.load(spec)
  for key, value in settings.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return config


def test_resolve_takes_shapes_pixels_and_tokenizer_from_the_towers(tower_dirs):
  config = towers.resolve(config_for("deep_fusion.py:pretrained", overrides(tower_dirs)))
  tokenizer = tokenizers.load(os.path.join(tower_dirs["language"], "tokenizer.json"))
  llama_vocab = json.load(open(os.path.join(tower_dirs["language"], "config.json")))["vocab_size"]
  # The Llama tokenizer has no "<image>": it is added after the vocabulary, whose table grows.
  assert tokenizer.image_id == llama_vocab and tokenizer.vocab_size == llama_vocab + 1
  assert config.model.image_token_id == llama_vocab
  assert config.model.lm.vocab_size == llama_vocab + 1
  assert config.optimizer.trained_rows == (("lm/embedder/embedding", (llama_vocab,)),)
  assert (config.model.vit.width, config.model.vit.patch_size, config.model.vit.pool) == (
      32, 8, "cls")
  assert config.model.lm.flavour == "llama" and config.model.lm.attention_impl == "auto"
  assert config.model.cross_every == 2  # every block of a 2-block LM
  assert tuple(config.data.image_mean) == tuple(PIXELS["image_mean"])
  assert config.optimizer.frozen == r"^(vit|lm)/"  # Flamingo's recipe by default
  # No pad token: padding takes unk, which never carries loss.
  assert tokenizer.pad_id == tokenizer.tokenizer.token_to_id("<unk>")
  assert (tokenizer.bos_id, tokenizer.eos_id) == (
      tokenizer.tokenizer.token_to_id("<s>"), tokenizer.tokenizer.token_to_id("</s>"))


def test_a_pretrained_config_without_its_towers_names_the_key():
  config = common.load("early_fusion.py:pretrained")
  with pytest.raises(ValueError, match=r"config\.towers\.vision"):
    towers.resolve(config)


def test_a_directory_holding_no_model_is_named(tmp_path):
  config = config_for("early_fusion.py:tiny", {"towers.vision": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match=rf"config\.towers\.vision={tmp_path} holds "
                     r"neither config\.json .* nor checkpoints/"):
    towers.resolve(config)


def test_a_language_directory_holding_a_vision_model_is_refused(tower_dirs):
  config = config_for("early_fusion.py:pretrained", overrides(
      tower_dirs, **{"towers.language": tower_dirs["vision"]}))
  with pytest.raises(ValueError, match="not a language model"):
    towers.resolve(config)


def initial_params(spec: str, settings: dict) -> dict:
  """The parameters a run starts from: seeded init, then the towers' weights."""
  run = steps.setup(config_for(spec, settings), jax.devices()[:1])
  params = run.init(jax.random.key(0))["params"]
  return {**params, **towers.load(run.config, run.abstract_state["params"])}


run_tool = train_cli.run_tool


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def moved(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("spec", ["deep_fusion.py:pretrained", "early_fusion.py:pretrained"])
def test_a_huggingface_lm_tower_loads_into_a_scanned_lm(tower_dirs, spec):
  """Scanned (model.lm.scan_layers): HF's layers are read into their slices of the stack."""
  unrolled = initial_params(spec, overrides(tower_dirs, **{"model.lm.scan_layers": False}))
  scanned = initial_params(spec, overrides(tower_dirs, **{"model.lm.scan_layers": True}))
  assert jax.tree.leaves(scanned["lm"]["blocks"])[0].shape[0] == 2
  assert_same(scanned["lm"], lm.stack_layers(unrolled["lm"], 2))
  assert_same(scanned["vit"], unrolled["vit"])


@pytest.mark.parametrize("saved_as", ["params export", "train.py workdir"])
def test_an_mmjax_vit_classifier_is_a_vision_tower_without_its_head(tmp_path, saved_as):
  """What configs/vit.py:tiny-scenes trains, as its workdir or as tools/export_hf.py
  --format=params writes it: its ViT, head and all, becomes both tiny fusion models' ViT; the
  head is never read."""
  if saved_as == "params export":
    fields = dict(variant="mu/8", image_size=32, pool="gap", posemb="sincos2d", num_classes=32)
    params = nn.unbox(vit.Model(**fields).init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))[
        "params"]
    checkpoint.save_params(str(tmp_path / "params"), params)
    (tmp_path / "mmjax_config.json").write_text(json.dumps({"family": "vit", "model": fields}))
  else:
    config = common.load("vit.py:tiny-scenes")
    config.update_from_flattened_dict({"total_steps": 2, "eval_every": 0, "log_every": 1,
                                       "checkpoint.async_save": False})
    trainer.train_and_evaluate(config, str(tmp_path))
    _, params, _ = checkpoint.read_model(str(tmp_path))
  assert params["head"]["kernel"].shape == (32, 32)  # ViT-mu: width 32; 32 classes
  for spec in ("early_fusion.py:tiny", "deep_fusion.py:tiny"):
    loaded = initial_params(spec, {"towers.vision": str(tmp_path), "data.name": "shapes"})
    assert_same(loaded["vit"], {k: v for k, v in params.items() if k != "head"})


def test_a_byte_level_lm_workdir_is_a_language_tower(tmp_path):
  # A train.py run of the tiny LM has no tokenizer file: its bytes come with it.
  config = common.load("lm.py:tiny")
  config.model.max_len = 256  # room for a scene's question and answer after its image
  config.update_from_flattened_dict({"total_steps": 2, "eval_every": 0, "log_every": 1,
                                     "checkpoint.async_save": False})
  trainer.train_and_evaluate(config, str(tmp_path))
  _, params, _ = checkpoint.read_model(str(tmp_path))
  settings = {"towers.language": str(tmp_path), "data.name": "shapes"}
  resolved = towers.resolve(config_for("deep_fusion.py:tiny", settings))
  assert resolved.data.tokenizer == "bytes"
  assert resolved.model.image_token_id == tokenizers.ByteTokenizer.image_id
  assert resolved.model.lm.max_len == 256 and resolved.model.lm.variant == "gpt2-tiny"
  assert_same(initial_params("deep_fusion.py:tiny", settings)["lm"], params)


def test_deep_fusion_from_two_towers_trains_only_the_new_parts_and_answers(
    tmp_path, run_train, tower_dirs):
  settings = overrides(tower_dirs, total_steps=40, log_every=2,
                       **{"optimizer.learning_rate": 1e-2})
  rows = run_train(tmp_path / "run", "deep_fusion.py:pretrained", settings)
  assert rows[-1]["step"] == 40 and rows[-1]["loss"] < 0.95 * rows[0]["loss"]

  config, params, tokenizer_spec = checkpoint.read_model(str(tmp_path / "run"))
  start = initial_params("deep_fusion.py:pretrained", settings)
  _, clip = hf.load(tower_dirs["vision"])
  _, llama = hf.load(tower_dirs["language"])
  assert_same(params["vit"], clip)  # frozen, bit for bit
  image_id = config["model"]["image_token_id"]
  # The LM is frozen; its tables grew by the image token (a row of the embedding, a column
  # of the untied head) and are the Llama's up to it.
  embedding = np.asarray(params["lm"]["embedder"]["embedding"])
  np.testing.assert_array_equal(embedding[:image_id], llama["embedder"]["embedding"])
  np.testing.assert_array_equal(np.asarray(params["lm"]["head"]["kernel"])[:, :image_id],
                                llama["head"]["kernel"])
  assert_same({k: v for k, v in params["lm"].items() if k not in ("embedder", "head")},
              {k: v for k, v in llama.items() if k not in ("embedder", "head")})
  # The new image-token row started at the mean of the tower's rows and trained.
  start_row = np.asarray(start["lm"]["embedder"]["embedding"][image_id])
  np.testing.assert_allclose(start_row, np.mean(llama["embedder"]["embedding"], axis=0),
                             rtol=1e-6, atol=1e-7)
  assert not np.array_equal(embedding[image_id], start_row)
  assert moved(params["adapter"], start["adapter"])
  assert moved(params["xattn_1"], start["xattn_1"])

  # generate.py answers with the Llama's tokenizer, as the run trained.
  assert tokenizer_spec == os.path.join(tower_dirs["language"], "tokenizer.json")
  source = synthetic.ShapeScenes(1, None, 32, 1, task="vqa", split="validation",
                                 tokenizer=tokenizer_spec, image_token_id=image_id)
  example = source.examples(0)[0]
  Image.fromarray(np.round(example["image"][0] * 255).astype(np.uint8)).save(
      tmp_path / "scene.png")
  answer = run_tool("generate.py", f"--workdir={tmp_path / 'run'}",
                    f"--image={tmp_path / 'scene.png'}", f"--prompt={example['question']}",
                    "--max_new_tokens=4").strip()
  tokenizer = tokenizers.load(tokenizer_spec)
  prompt = tokenizers.encode_prompt(example["question"], 1, "<image>{prompt} ", [image_id],
                                    tokenizer)
  assert prompt == example["prompt"]  # the tool's default template is the data's layout
  assert config["template"] == "<image>{prompt} "
  images = image_codec.normalise(image_codec.read(str(tmp_path / "scene.png"), 32)[None, None],
                                 config["pixels"]["mean"], config["pixels"]["std"])
  tokens, lengths = generation.left_pad([prompt], tokenizer.pad_id)
  expected = generation.make_generate(models.build("deep_fusion", config["model"]),
                                      generation.Sampling(max_new_tokens=4,
                                                          eos_id=tokenizer.eos_id,
                                                          pad_id=tokenizer.pad_id))(
      params, tokens, lengths, images, jax.random.key(0))
  assert answer == tokenizer.decode(expected["tokens"][0][:expected["lengths"][0]]).strip()


@pytest.mark.parametrize("stage,trained", [("stage1", {"projector"}),
                                           ("stage2", {"projector", "lm"})])
def test_early_fusion_from_two_towers_trains_what_its_stage_says(
    tmp_path, run_train, tower_dirs, stage, trained):
  spec = f"early_fusion.py:pretrained,{stage}"
  settings = overrides(tower_dirs, total_steps=6, log_every=3)
  run_train(tmp_path / "run", spec, settings)
  config, params, _ = checkpoint.read_model(str(tmp_path / "run"))
  start = initial_params(spec, settings)
  assert config["model"]["vision_layer"] == -2  # LLaVA's feature layer
  for name in ("vit", "projector", "lm"):
    assert moved(params[name], start[name]) == (name in trained), name
  _, clip = hf.load(tower_dirs["vision"])
  assert_same(params["vit"], clip)

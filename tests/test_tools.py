"""The command-line tools end to end: import a HuggingFace model, fine-tune it, export it back."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from PIL import Image
from safetensors.numpy import load_file
import torch
import transformers

from mmjax import checkpoint
from mmjax import generation
from mmjax import models
from mmjax.data import anyres
from mmjax.data import images as image_codec
from mmjax.data import synthetic
from mmjax.data import tokenizers
import train_cli

sys.path.insert(0, str(train_cli.ROOT / "tools"))
import show_params  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import lm as lm_config  # pylint: disable=g-import-not-at-top,wrong-import-position


run_tool = train_cli.run_tool


def tiny_towers(image_size: int) -> dict:
  """A tiny CLIP tower (8 px patches) and a tiny Llama over the byte tokenizer's ids."""
  return dict(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
          image_size=image_size, patch_size=8),
      text_config=transformers.LlamaConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=64, vocab_size=320))


def test_import_finetune_export(tmp_path, run_train):
  torch.manual_seed(0)
  llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      **tiny_towers(image_size=32), image_token_index=258)).eval()
  llava.save_pretrained(tmp_path / "hf")
  run_tool("import_hf.py", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'import'}")
  imported = json.loads((tmp_path / "import" / "mmjax_config.json").read_text())
  assert imported["family"] == "early_fusion"

  rows = run_train(tmp_path / "run", "hf.py:" + str(tmp_path / "import"),
                   {"total_steps": 6, "log_every": 3, "eval_every": 0})
  assert rows[-1]["step"] == 6

  run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  config, params, _ = checkpoint.read_model(str(tmp_path / "run"))
  tokens = np.array([[256] + [258] * 16 + [97, 32, 114]])
  images = np.random.RandomState(0).rand(1, 32, 32, 3).astype(np.float32)
  ours, _ = models.build("early_fusion", config["model"]).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(images[None]))
  with torch.no_grad():
    theirs = exported(input_ids=torch.tensor(tokens),
                      pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
  # Fine-tuning moved the weights away from the import.
  with torch.no_grad():
    before = llava(input_ids=torch.tensor(tokens),
                   pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
  assert not np.allclose(before, theirs, atol=1e-6)


def test_deep_fusion_export_parts_and_name_map(tmp_path, run_train):
  run_train(tmp_path / "run", "deep_fusion.py:tiny", {"total_steps": 2, "log_every": 1,
                                                      "eval_every": 0})
  out = run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
  assert "no HuggingFace form" in out  # the tiny tower has no cls token
  config, params, _ = checkpoint.read_model(str(tmp_path / "run"))
  flat = load_file(tmp_path / "out" / "model.safetensors")
  np.testing.assert_array_equal(flat["xattn_0/attn/query/kernel"],
                                params["xattn_0"]["attn"]["query"]["kernel"])
  assert len(flat) == len(jax.tree.leaves(params))
  language = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "language").eval()
  # The run's byte-level tokenizer goes with its language tower, with the same ids.
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "language")
  assert tokenizer("abc").input_ids == [256, 97, 98, 99]
  tokens = np.array([[256, 97, 98, 99]])
  ours, _ = models.build("lm", config["model"]["lm"]).apply({"params": params["lm"]},
                                                                jnp.asarray(tokens))
  with torch.no_grad():
    theirs = language(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_params_only_export_round_trip(tmp_path, run_train):
  run_train(tmp_path / "run", "lm.py:tiny", {"total_steps": 2, "log_every": 1, "eval_every": 0})
  # As a HuggingFace GPT-2: a byte-level run's tokenizer, with its ids, loads in transformers.
  run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}")
  text = "héllo 1+2=3\n"
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ids = tokenizer(text).input_ids
  assert ids == [256] + tokenizers.ByteTokenizer().encode(text)  # BOS, then the bytes
  assert tokenizer.decode(ids, skip_special_tokens=True) == text
  assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (257, 0)
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (256, 257)
  assert tokenizers.load(str(tmp_path / "hf" / "tokenizer.json")).encode(text) == ids[1:]
  run_tool("export_hf.py", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'served'}",
           "--format=params")
  config, params, _ = checkpoint.read_model(str(tmp_path / "served"))
  _, trained, _ = checkpoint.read_model(str(tmp_path / "run"))
  assert config["family"] == "lm"
  jax.tree.map(np.testing.assert_array_equal, params, trained)
  # Read as the model runs: only the parameters, straight into their shards on all devices.
  kernel = trained["block_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert len(kernel.sharding.device_set) == jax.device_count() == 8


def test_show_params_lists_axes_and_shardings():
  config = lm_config.get_config("tiny")
  config.mesh.rules = "fsdp_tp"
  config.mesh.shape.update(dict(data=1, fsdp=-1, tensor=2))
  table = {row[0]: row[1:] for row in show_params.rows(config)}
  assert table["block_0/mlp/up/kernel"] == ((64, 256), 16384, ("embed", "mlp"),
                                            "P('fsdp', 'tensor')")
  assert table["embedder/embedding"][2] == ("vocab", "embed")
  model = models.build(config.family, config.model)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert sum(r[1] for r in table.values()) == sum(x.size for x in jax.tree.leaves(params))


def test_generate_answers_an_anyres_import_as_transformers_does(tmp_path):
  # A tiny LLaVA-NeXT: its processor's tiles and HF's greedy tokens against tools/generate.py on
  # the same two image files (a 30 x 70 and a 60 x 14 px image, different token counts).
  from transformers.models.llava_next import image_processing_pil_llava_next  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  pinpoints = [[24, 48], [48, 24], [48, 48], [24, 72]]
  model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
      **tiny_towers(image_size=24), image_token_index=258, image_grid_pinpoints=pinpoints)).eval()
  model.save_pretrained(tmp_path / "hf")
  run_tool("import_hf.py", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'import'}")
  rng = np.random.RandomState(0)
  paths = []
  for i, size in enumerate([(30, 70), (60, 14)]):
    paths.append(tmp_path / f"image_{i}.png")
    Image.fromarray(rng.randint(0, 256, (*size, 3)).astype(np.uint8)).save(paths[-1])
  out = run_tool("generate.py", f"--workdir={tmp_path / 'import'}", "--tokenizer=bytes",
                 "--template={prompt}", "--prompt=<image> or <image>?", f"--image={paths[0]}",
                 f"--image={paths[1]}", "--max_new_tokens=5")
  processor = image_processing_pil_llava_next.LlavaNextImageProcessorPil(
      size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
      image_grid_pinpoints=pinpoints, do_normalize=False)
  inputs = processor(images=[np.asarray(Image.open(p)) for p in paths], return_tensors="pt")
  counts = [anyres.num_tokens(s, pinpoints, 24, 8) for s in [(30, 70), (60, 14)]]
  tokenizer = tokenizers.ByteTokenizer()
  ids = ([tokenizer.bos_id] + [258] * counts[0] + tokenizer.encode(" or ") + [258] * counts[1]
         + tokenizer.encode("?"))
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                            eos_token_id=None, pad_token_id=0, **inputs)
  new = theirs[0, len(ids):].tolist()
  new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
  assert len(new) >= 3 and out.rstrip("\n") == tokenizer.decode(new)


def test_generate_answers_like_decode(tmp_path, run_train):
  run_train(tmp_path / "run", "early_fusion.py:tiny", {"total_steps": 30, "log_every": 10,
                                                       "eval_every": 0})
  source = synthetic.ShapeScenes(2, None, 32, 16, task="vqa", split="validation")
  examples = source.examples(0)
  requests = []
  for i, example in enumerate(examples):
    path = tmp_path / f"scene_{i}.png"
    Image.fromarray(np.round(example["image"][0] * 255).astype(np.uint8)).save(path)
    # Relative paths are the JSONL file's, whatever the current directory.
    requests.append({"prompt": example["question"], "images": [path.name]})
    # The default template lays a prompt out as the training data does.
    assert tokenizers.encode_prompt(example["question"], 1, "<image>{prompt} ", [258] * 16,
                                    source.tokenizer) == example["prompt"]
  requests.append({"prompt": "two images: <image> and <image>?", "images": [
      str(tmp_path / "scene_0.png"), "scene_1.png"]})
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in requests))
  out = run_tool("generate.py", f"--workdir={tmp_path / 'run'}",
                 f"--prompts={tmp_path / 'prompts.jsonl'}", "--max_new_tokens=6")
  answers = [json.loads(line)["answer"] for line in out.splitlines()]

  config, params, _ = checkpoint.read_model(str(tmp_path / "run"))
  model = models.build("early_fusion", config["model"])
  images = np.zeros((3, 2, 32, 32, 3), np.float32)
  for b, request in enumerate(requests):
    for i, path in enumerate(request["images"]):
      images[b, i] = image_codec.read(str(tmp_path / path), 32)
  prompts = [e["prompt"] for e in examples] + [
      [256] + list(b"two images: ") + [258] * 16 + list(b" and ") + [258] * 16 + list(b"? ")]
  tokens, lengths = generation.left_pad(prompts, 0)
  expected = generation.make_generate(model, generation.Sampling(max_new_tokens=6, eos_id=257))(
      params, tokens, lengths, images, jax.random.key(0))
  assert answers == [source.tokenizer.decode(t[:n]) for t, n in zip(expected["tokens"],
                                                                      expected["lengths"])]
  np.testing.assert_allclose(images[0, 0], examples[0]["image"][0], atol=1 / 255)
  # A file that is not an image: one line naming it.
  result = subprocess.run([sys.executable, str(train_cli.ROOT / "tools" / "generate.py"),
                           f"--workdir={tmp_path / 'run'}", "--prompt=hi",
                           f"--image={tmp_path / 'prompts.jsonl'}"], env=train_cli.env(1),
                          capture_output=True, text=True, timeout=300)
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert result.returncode == 1 and lines == [
      f"error: cannot read image {tmp_path / 'prompts.jsonl'}: not an image file Pillow reads "
      "(PNG, JPEG, GIF, WebP, ...)"], lines


def test_showcase_trains_each_scheme_per_seed_and_tabulates_mean_and_spread(tmp_path):
  args = [f"--out={tmp_path}", "--set=total_steps=6", "--set=batch_size=4",
          "--set=data.name=shapes", "--questions=8"]
  out = run_tool("showcase.py", *args, "--seeds=0,1", "--schemes=early_fusion")
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert sorted((r["scheme"], r["seed"]) for r in rows) == [("early_fusion", 0),
                                                              ("early_fusion", 1)]
  for r in rows:
    assert 0.0 <= r["vqa/accuracy"] <= 1.0 and r["wall_seconds"] > 0
  early = [r["vqa/accuracy"] for r in rows]
  mean, spread = np.mean(early), np.std(early, ddof=1)
  assert f"| default | early_fusion | 2 | {mean:.3f} +- {spread:.3f} |" in out
  assert out.splitlines()[-1].startswith("| text only: the commonest training answer")
  # Finished runs are read back, not trained again; a scheme added later trains its own.
  finished = tmp_path / "default" / "early_fusion-seed0" / "showcase.json"
  stamp = finished.stat().st_mtime_ns
  chart = tmp_path / "chart.png"
  again = run_tool("showcase.py", *args, "--seeds=0", "--schemes=early_fusion,deep_fusion",
                   f"--chart={chart}", "--chart_runs=default:early_fusion,default:deep_fusion")
  assert finished.stat().st_mtime_ns == stamp
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  deep = [r["vqa/accuracy"] for r in rows if r["scheme"] == "deep_fusion"]
  assert len(deep) == 1 and f"| default | deep_fusion | 1 | {deep[0]:.3f} +- 0.000 |" in again
  assert f"| default | early_fusion | 2 | {mean:.3f} +- {spread:.3f} |" in again  # every run
  assert out.splitlines()[-1] == again.splitlines()[-2]  # the same baseline, then the chart
  assert Image.open(chart).size[0] > 300

"""Answers prompts, about images or not, with a trained mmjax model.

  python tools/generate.py --workdir DIR --image scene.png --prompt "what colour is the circle?"
  python tools/generate.py --workdir DIR --prompts prompts.jsonl --method beam --beam_size 4

DIR is a training workdir (its newest complete checkpoint) or a params-only
export (tools/export_hf.py --format=params). --prompts reads one JSON object
per line, {"prompt": "...", "images": ["a.png", ...]} (relative paths from the
file's folder), and prints one per line with "answer" added. Each prompt is
laid out by --template: "<image>" stands for one image's placeholder tokens
(early fusion) or marker (deep fusion);
images without an "<image>" in the template go first. The default is the
layout of the run's training data: "<image>{prompt} " for the generated
scenes, LLaVA-1.5's "USER: <image>\n{prompt} ASSISTANT:" for LLaVA data and
LLaVA imports; a prompt with its own "<image>" markers places its images
itself. A PaliGemma (an import, or a run with config.data.prefix_lm) reads
its images, BOS, the prompt and "\n" both ways, as its processor lays them out
("caption en", "answer en what is on the table?", "detect cat"). Text is
tokenized as the model was trained (the run's config.data.tokenizer, a
pretrained language tower's, an import's) unless --tokenizer says otherwise;
images are read with Pillow, made RGB, resized to the model's resolution (or,
for a run trained with config.data.max_patches, kept at their own size and
aspect ratio within that many patches, or for a LLaVA-NeXT import cut into
AnyRes tiles as its processor does) and normalised as in training
(config.data.image_mean/std, or an import's preprocessor values).
"""
import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from mmjax import checkpoint
from mmjax import console
from mmjax import generation
from mmjax import models
from mmjax import steps
from mmjax.data import anyres
from mmjax.data import images as image_codec
from mmjax.data import patches
from mmjax.data import tokenizers
from mmjax.models import early_fusion

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or params-only export.")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) for --prompt; repeat the flag.")
_PROMPTS = flags.DEFINE_string("prompts", None, "A JSONL file of {prompt, images} objects.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Default: the run's own (its config.data."
                                 "tokenizer, or the import's). Or 'bytes', a SentencePiece "
                                 ".model file or a HuggingFace tokenizer.json.")
_TEMPLATE = flags.DEFINE_string("template", None, "How a prompt is laid out. Default: as the "
                                "run's training data did (its config.data.name).")
_METHOD = flags.DEFINE_enum("method", "greedy", list(generation.METHODS), "How to choose tokens.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "--method=sample: logits / temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "--method=sample: keep the k likeliest; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "--method=sample: nucleus probability mass.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "--method=beam: beams per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "--method=sample: random seed.")


def read_requests() -> list[dict]:
  if (_PROMPT.value is None) == (_PROMPTS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompts")
  if _PROMPT.value is not None:
    return [{"prompt": _PROMPT.value, "images": _IMAGES.value}]
  with open(_PROMPTS.value) as f:
    requests = [json.loads(line) for line in f if line.strip()]
  for n, request in enumerate(requests, 1):
    if "prompt" not in request:
      raise ValueError(f"{_PROMPTS.value} line {n} has no \"prompt\"")
  # Image paths are the JSONL file's: relative ones start from its folder.
  folder = os.path.dirname(os.path.abspath(_PROMPTS.value))
  return [{**r, "images": [os.path.join(folder, p) for p in r.get("images", [])]}
          for r in requests]


def anyres_images(config: dict, requests: list[dict]) -> tuple[early_fusion.Tiles, list]:
  """Each request's images cut as LLaVA-NeXT's processor cuts them -> (Tiles, per request the
  placeholder ids of each of its images)."""
  fields = config["model"]
  layout = anyres.Layout(tuple(map(tuple, fields["grid_pinpoints"])),
                         models.image_size("early_fusion", fields),
                         models.patch_size("early_fusion", fields),
                         max_images=max(1, max(len(r.get("images", [])) for r in requests)))
  rows = [[layout.cut(image_codec.read(path, None)) for path in r.get("images", [])]
          for r in requests]
  rows = [[(image_codec.normalise(tiles, **config.get("pixels", {})), sources)
           for tiles, sources in row] for row in rows]
  ids = [[[fields["image_token_id"]] * len(sources) for _, sources in row] for row in rows]
  return steps.batch_images(layout.pack(rows)), ids


def main(argv):
  del argv
  requests = read_requests()
  config, params, run_tokenizer = checkpoint.read_model(_WORKDIR.value)
  model = models.build(config["family"], config["model"])
  tokenizer = tokenizers.load(_TOKENIZER.value or run_tokenizer)
  images = None
  image_ids = []
  if config["model"].get("grid_pinpoints"):  # AnyRes (LLaVA-NeXT): tiles, tokens by image size
    images, image_ids = anyres_images(config, requests)
  elif config["family"] in ("early_fusion", "deep_fusion"):
    size, image_ids = models.image_layout(config["family"], config["model"])
    most = max(len(r.get("images", [])) for r in requests)
    if most and "max_patches" in config:  # trained at native resolution: images keep theirs
      images = steps.batch_images(patches.read_rows(
          [r.get("images", []) for r in requests],
          models.patch_size(config["family"], config["model"]), config["max_patches"],
          models.has_cls(config["family"], config["model"]),
          **config.get("pixels", {})))
    elif most:  # rows with fewer images get blank slots: no placeholder ever reads them
      images = np.zeros((len(requests), most, size, size, 3), np.float32)
      for b, request in enumerate(requests):
        for i, path in enumerate(request.get("images", [])):
          images[b, i] = image_codec.read(path, size)
      images = image_codec.normalise(images, **config.get("pixels", {}))
  elif any(r.get("images") for r in requests):
    raise ValueError(f"a {config['family']} model takes no images")
  template = _TEMPLATE.value or config.get("template", "{prompt}")
  if config.get("prefix_lm"):  # PaliGemma: the images, BOS, the prompt and "\n", read both ways
    prompts = [tokenizers.encode_prefix_lm(r["prompt"], None,
                                           image_ids * len(r.get("images", [])), tokenizer)[0]
               for r in requests]
  else:
    prompts = [tokenizers.encode_prompt(r["prompt"], len(r.get("images", [])), template,
                                        image_ids[b] if config["model"].get("grid_pinpoints")
                                        else image_ids, tokenizer)
               for b, r in enumerate(requests)]
  tokens, lengths = generation.left_pad(prompts, tokenizer.pad_id)
  sampling = generation.Sampling(
      method=_METHOD.value, max_new_tokens=_MAX_NEW_TOKENS.value, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, beam_size=_BEAM_SIZE.value)
  out = jax.jit(generation.make_generate(model, sampling, config.get("prefix_lm", False)))(
      params, tokens, lengths, images, jax.random.key(_SEED.value))
  out = jax.device_get(out)
  for b, request in enumerate(requests):
    answer = tokenizer.decode(out["tokens"][b][:out["lengths"][b]])
    if _PROMPTS.value is None:
      print(answer)
    else:
      print(json.dumps({**request, "answer": answer}))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  console.app_run(main)

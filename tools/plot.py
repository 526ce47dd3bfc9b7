"""Pictures from training runs: metric charts, and where a generated answer looks in the image.

  python tools/plot.py --workdir /tmp/ef --workdir /tmp/df --out runs.png
  python tools/plot.py --attention --workdir /tmp/df --image a.png --prompt "where is the red
      circle?" --image b.png --prompt "what colour is the square?" --out attention.png

Charts: loss and eval_loss, held-out scores, learning rate, throughput and (deep
fusion) the cross-attention gates, from each DIR/metrics.jsonl; several runs
share each panel. --attention answers each prompt about its image with the
newest checkpoint of one run (greedy) and lays the answer's attention over the
image's patches: cross-attention for deep fusion, self-attention over the
image's placeholder tokens for early fusion (averaged over heads, layers and
the answer's tokens).
"""
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import checkpoint
from mmjax import console
from mmjax import generation
from mmjax import models
from mmjax import plots
from mmjax import steps
from mmjax.data import images as image_codec
from mmjax.data import patches
from mmjax.data import tokenizers

_WORKDIR = flags.DEFINE_multi_string("workdir", [], "Training workdir(s); repeat the flag.")
_OUT = flags.DEFINE_string("out", "plot.png", "PNG file to write.")
_ATTENTION = flags.DEFINE_bool("attention", False, "Attention maps instead of metric charts.")
_IMAGE = flags.DEFINE_multi_string("image", [], "--attention: image files, one per --prompt.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "--attention: prompts, one per --image.")
_TEMPLATE = flags.DEFINE_string("template", "<image>{prompt} ", "How a prompt is laid out "
                                "(as tools/generate.py).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "As tools/generate.py.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Answer tokens at most.")
_DPI = flags.DEFINE_integer("dpi", 100, "Resolution of the PNG.")


def run_names(workdirs: list[str]) -> list[str]:
  """Short legend names: the last path component, or the whole path where those clash."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else list(workdirs)


def attention_maps(workdir: str, image_paths: list[str], prompts: list[str]):
  """-> (images float[H, W, 3] in [0, 1], maps float[gh, gw] per image, share [B], answers)."""
  config, params, _ = checkpoint.read_model(workdir)
  if config["family"] not in ("early_fusion", "deep_fusion"):
    raise ValueError(f"{workdir} holds a {config['family']} model; attention maps need an "
                     "early_fusion or deep_fusion one")
  model = models.build(config["family"], config["model"])
  tokenizer = tokenizers.load(_TOKENIZER.value)
  size, image_ids = models.image_layout(config["family"], config["model"])
  if "max_patches" in config:  # trained on images at their own sizes: each keeps its own
    patch = models.patch_size(config["family"], config["model"])
    packed = patches.read_rows([[path] for path in image_paths], patch, config["max_patches"],
                               models.has_cls(config["family"], config["model"]),
                               **config.get("pixels", {}))
    std, mean = (np.asarray(config.get("pixels", {}).get(k, v)) for k, v in (("std", 1.0),
                                                                            ("mean", 0.0)))
    pixels = [patches.unpack(packed, b, 0) * std + mean for b in range(len(image_paths))]
    normalised = steps.batch_images(packed)
  else:
    pixels = np.stack([image_codec.read(path, size) for path in image_paths])
    normalised = image_codec.normalise(pixels, **config.get("pixels", {}))[:, None]
  prompt_ids = [tokenizers.encode_prompt(p, 1, _TEMPLATE.value, image_ids, tokenizer)
                for p in prompts]
  tokens, lengths = generation.left_pad(prompt_ids, tokenizer.pad_id)
  generate = jax.jit(generation.make_generate(model, generation.Sampling(
      method="greedy", max_new_tokens=_MAX_NEW_TOKENS.value, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id)))
  out = jax.device_get(generate(params, tokens, lengths, normalised, jax.random.key(0)))
  answers = [list(out["tokens"][b][:out["lengths"][b]]) for b in range(len(prompts))]
  sequence, rows = plots.answer_rows(prompt_ids, answers, tokenizer.pad_id)
  maps, share = plots.image_attention(model, params, jnp.asarray(sequence),
                                      jax.tree.map(jnp.asarray, normalised), jnp.asarray(rows))
  return pixels, maps, share, [tokenizer.decode(a) for a in answers], config["family"]


def main(argv):
  workdirs = _WORKDIR.value + list(argv[1:])  # --workdir A B works too
  if not workdirs:
    raise app.UsageError("give at least one --workdir")
  if _ATTENTION.value:
    if len(_IMAGE.value) != len(_PROMPT.value) or not _IMAGE.value:
      raise app.UsageError("--attention takes one --prompt per --image")
    pixels, maps, share, answers, family = attention_maps(workdirs[0], _IMAGE.value,
                                                          _PROMPT.value)
    titles = [f"{p}\n-> {a}" + (f" ({s:.0%} of attention on the image)"
                                if family == "early_fusion" else "")
              for p, a, s in zip(_PROMPT.value, answers, share)]
    figure = plots.attention_figure(pixels, maps, titles)
  else:
    figure = plots.metrics_figure({name: plots.read_metrics(w)
                                   for name, w in zip(run_names(workdirs), workdirs)})
  figure.savefig(_OUT.value, dpi=_DPI.value, bbox_inches="tight")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  console.app_run(main)

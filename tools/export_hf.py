"""Exports an mmjax model to HuggingFace format, or as params only for serving.

  python tools/export_hf.py --workdir DIR --out OUT [--format hf|params|peft]

DIR is a training workdir (its newest checkpoint is used) or a directory from
tools/import_hf.py. "hf" writes config.json + model.safetensors that
transformers' from_pretrained loads (ViT, CLIP, SigLIP, GPT-2, Llama, Gemma,
Gemma 2, LLaVA, PaliGemma 1 and 2, Llama 3.2 Vision, IDEFICS), plus the run's
tokenizer: the files of its tokenizer's folder (a pretrained tower's or an
import's), or for byte-level runs a tokenizer.json with the same ids. Other
deep-fusion models have no HuggingFace class: OUT/vision and OUT/language get
their towers, and OUT/model.safetensors all its weights named by their mmjax paths
("xattn_3/attn/query/kernel", ...). "params" writes mmjax_config.json and an
Orbax params-only checkpoint. A LoRA run's adapters are merged into their
kernels for both; "peft" writes them alone (adapter_model.safetensors +
adapter_config.json), for peft.PeftModel.from_pretrained on the HF base model.
"""
import json
import os

from absl import flags
from mmjax import checkpoint
from mmjax import console
from mmjax import models
from mmjax.data import tokenizers
from mmjax.interop import hf
from mmjax.interop import idefics
from mmjax.interop import mllama
from mmjax.models import lm

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or import directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "params", "peft"],
                            "What to write: a HuggingFace model (LoRA adapters merged), "
                            "mmjax params, or a LoRA run's adapters alone in the PEFT layout.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  out = _OUT.value
  if _FORMAT.value == "peft":
    config, params, _ = checkpoint.read_model(_WORKDIR.value, merge_adapters=False)
    if "lora" not in config:
      raise ValueError(f"{_WORKDIR.value} trained no LoRA adapters (config.optimizer.lora."
                       "targets): export it with --format=hf")
    hf.save_adapter(out, config, params, config["lora"])
    print(f"wrote a PEFT LoRA adapter to {out} (the base model: the run's towers or import; "
          "parameters trained in full, such as a projector, are only in --format=hf)")
    return
  config, params, tokenizer = checkpoint.read_model(_WORKDIR.value)
  os.makedirs(out, exist_ok=True)
  if _FORMAT.value == "params":
    with open(os.path.join(out, "mmjax_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    checkpoint.save_params(os.path.join(out, "params"), params)
    print(f"wrote mmjax_config.json and params/ to {out}")
    return
  language = models.language_fields(config["family"], config["model"])
  if config["family"] == "deep_fusion" and not (mllama.is_mllama(config["model"])
                                                or idefics.is_idefics(config["model"])):
    hf.save_flat(os.path.join(out, "model.safetensors"), params)
    with open(os.path.join(out, "mmjax_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    hf.save(os.path.join(out, "language"), {"family": "lm", "model": language}, params["lm"],
            tokenizers.load(tokenizer))
    write_tokenizer(tokenizer, os.path.join(out, "language"), language)
    try:
      hf.save(os.path.join(out, "vision"), {"family": "vit", "model": config["model"]["vit"]},
              params["vit"])
    except ValueError as e:  # e.g. a tower without cls token or MAP head
      print(f"the vision tower has no HuggingFace form, not written: {e}")
    print(f"wrote {out}/language (and vision) and all weights by mmjax name in "
          f"{out}/model.safetensors")
    return
  if config["family"] == "vit":
    hf.save(out, config, params)
  else:
    hf.save(out, config, params, tokenizers.load(tokenizer))
    write_tokenizer(tokenizer, out, language)
  print(f"wrote a HuggingFace {config['family']} model to {out}")


def write_tokenizer(spec: str, out: str, language: dict):
  """The model's tokenizer files beside it: the run's (with tokenizer_config.json and the rest
  of its folder), or for a byte-level run one transformers loads with the same ids."""
  if spec == "bytes":
    tokenizers.save_bytes_for_huggingface(out, lm.Model(**language).max_len)
  else:
    hf.copy_tokenizer(os.path.dirname(spec), out)


if __name__ == "__main__":
  console.app_run(main)

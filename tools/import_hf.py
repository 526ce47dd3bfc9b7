"""Imports a local HuggingFace model directory into mmjax.

  python tools/import_hf.py --hf_dir ./llava-1.5-7b-hf --out /tmp/llava

Tensors stream one at a time from the safetensors files into their shards on
--mesh (default: fully sharded over every device), so a model larger than one
device's memory, or than the host's, imports as it will train.

--adapter merges a PEFT LoRA adapter of the model into the weights it writes.

Writes OUT/mmjax_config.json ({"family", "model"}, and "pixels": the image
mean/std of the model's preprocessor_config.json when it has one), OUT/params (an Orbax
params-only checkpoint) and the tokenizer files. Fine-tune it with
`python train.py --config configs/hf.py:OUT --workdir DIR`.
"""
import functools
import json
import os

from absl import flags
import jax
import ml_collections

from mmjax import checkpoint
from mmjax import console
from mmjax import lora
from mmjax import models
from mmjax import sharding
from mmjax.data import tokenizers
from mmjax.interop import hf
from mmjax.interop import paligemma

_HF_DIR = flags.DEFINE_string("hf_dir", None, "config.json + *.safetensors directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the mmjax import to.")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1",
                            "Mesh axis sizes the parameters are placed on (-1: the rest).")
_RULES = flags.DEFINE_string("rules", "fsdp", "Sharding rules: fsdp, dp or fsdp_tp.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A PEFT LoRA adapter directory of this model "
                               "(adapter_config.json + adapter_model.safetensors), merged in.")
flags.mark_flags_as_required(["hf_dir", "out"])


def parse_mesh(text: str) -> dict[str, int]:
  """"data=1,fsdp=-1,tensor=1" -> {"data": 1, "fsdp": -1, "tensor": 1}."""
  try:
    sizes = {axis.strip(): int(size) for axis, size in (
        item.split("=") for item in text.split(",") if item.strip())}
  except ValueError:
    raise ValueError(f"--mesh={text!r}: expected axis=size pairs, e.g. data=1,fsdp=-1,tensor=1")
  unknown = set(sizes) - {"data", "fsdp", "tensor"}
  if unknown:
    raise ValueError(f"--mesh={text!r}: unknown axis {sorted(unknown)[0]!r}; the axes are data, "
                     "fsdp and tensor")
  return {"data": 1, "fsdp": 1, "tensor": 1, **sizes}


def main(argv):
  del argv
  with open(os.path.join(_HF_DIR.value, "config.json")) as f:
    config = hf.mmjax_config(json.load(f))
  mesh = sharding.make_mesh(parse_mesh(_MESH.value))
  boxed = models.abstract_params(config["family"], config["model"])
  config, params = hf.load(_HF_DIR.value, sharding.param_shardings(
      boxed, mesh, sharding.rules(_RULES.value)))
  if _ADAPTER.value:
    settings, factors = hf.load_adapter(_ADAPTER.value, config)
    params = jax.jit(functools.partial(lora.merge, optimizer=ml_collections.ConfigDict(
        {"lora": settings})))(lora.overlay(params, factors))
  preprocessor = os.path.join(_HF_DIR.value, "preprocessor_config.json")
  if os.path.exists(preprocessor):
    with open(preprocessor) as f:
      settings = json.load(f)
    if "image_mean" in settings:
      config["pixels"] = {"mean": settings["image_mean"], "std": settings["image_std"]}
  if config["family"] == "early_fusion" and paligemma.is_paligemma(config["model"]):
    config["prefix_lm"] = True  # prompts as PaliGemma reads them (tokenizers.encode_prefix_lm)
  elif config["family"] == "early_fusion":  # a LLaVA: prompts as it was trained on them
    config["template"] = tokenizers.LLAVA_TEMPLATE
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "mmjax_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  checkpoint.save_params(os.path.join(_OUT.value, "params"), params)
  tokenizer = hf.copy_tokenizer(_HF_DIR.value, _OUT.value)
  print(f"imported a {config['family']} model into {_OUT.value} (tokenizer files: {tokenizer})")


if __name__ == "__main__":
  console.app_run(main)

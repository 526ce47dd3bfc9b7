"""Imports a local HuggingFace model directory into mmjax.

  python tools/import_hf.py --hf_dir ./llava-1.5-7b-hf --out /tmp/llava

Writes OUT/mmjax_config.json ({"family", "model"}, and "pixels": the image
mean/std of the model's preprocessor_config.json when it has one), OUT/params (an Orbax
params-only checkpoint) and the tokenizer files. Fine-tune it with
`python train.py --config configs/hf.py:OUT --workdir DIR`.
"""
import json
import os

from absl import flags

from mmjax import checkpoint
from mmjax import console
from mmjax.interop import hf

_HF_DIR = flags.DEFINE_string("hf_dir", None, "config.json + *.safetensors directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the mmjax import to.")
flags.mark_flags_as_required(["hf_dir", "out"])


def main(argv):
  del argv
  config, params = hf.load(_HF_DIR.value)
  preprocessor = os.path.join(_HF_DIR.value, "preprocessor_config.json")
  if os.path.exists(preprocessor):
    with open(preprocessor) as f:
      settings = json.load(f)
    if "image_mean" in settings:
      config["pixels"] = {"mean": settings["image_mean"], "std": settings["image_std"]}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "mmjax_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  checkpoint.save_params(os.path.join(_OUT.value, "params"), params)
  tokenizer = hf.copy_tokenizer(_HF_DIR.value, _OUT.value)
  print(f"imported a {config['family']} model into {_OUT.value} (tokenizer files: {tokenizer})")


if __name__ == "__main__":
  console.app_run(main)

"""Fine-tune an import: `configs/hf.py:DIR[,lora]`, DIR written by tools/import_hf.py.

`configs/hf.py:/path/from/import_hf,lora` fine-tunes through LoRA adapters
on the LM's projections (and the projector of a LLaVA in full; the
cross-attention blocks' projections of a deep fusion model too; a PaliGemma's
adapters alone). A PaliGemma reads its data in its own layout
(config.data.prefix_lm: image, BOS, prompt both ways, the answer causal).

The family and model fields come from the import's mmjax_config.json, and the
run starts from its params/. The data is the family's default (synthetic, byte
tokens: the model's vocabulary must hold 320 ids) until flags point it at real
data, e.g. `--config.data.name=llava --config.data.json=...
--config.data.tokenizer=OUT/tokenizer.json`.
Pixels are normalised with the model's own preprocessor mean/std when the
import found them.
"""
import json
import os

import ml_collections

from configs import common
from mmjax.interop import paligemma


SUFFIX = "DIR,lora: LoRA on the LM's projections (and a LLaVA projector in full), the rest frozen"


def variants() -> list[str]:
  return ["DIR (a tools/import_hf.py --out directory)"]


def get_config(arg: str) -> ml_collections.ConfigDict:
  """DIR, or DIR,lora: LoRA on the LM's projections, everything else frozen."""
  arg, lora = (arg.removesuffix(",lora"), True) if arg.endswith(",lora") else (arg, False)
  path = os.path.join(arg, "mmjax_config.json")
  if not os.path.exists(path):
    raise ValueError(f"configs/hf.py needs a directory written by tools/import_hf.py; "
                     f"{path} does not exist")
  with open(path) as f:
    imported = json.load(f)
  config = common.base_config(family=imported["family"], total_steps=200, batch_size=8)
  config.model = ml_collections.ConfigDict(imported["model"])
  config.init_from = os.path.abspath(arg)
  config.optimizer = common.optimizer(learning_rate=1e-4)  # fine-tuning
  model = imported["model"]
  is_paligemma = imported["family"] == "early_fusion" and paligemma.is_paligemma(model)
  if lora:  # the adapters train; with early fusion the projector too (LLaVA's LoRA recipe)
    common.with_lora(config, "" if imported["family"] == "lm" else "lm/")
    if imported["family"] == "deep_fusion":  # and the cross-attention blocks' projections
      config.optimizer.lora.targets += "|" + common.projections(blocks=r"xattn_\d+")
    config.optimizer.frozen = "^(?!projector/)"
    if is_paligemma:
      config.optimizer.frozen = "."  # the adapters alone (the Colab recipe; all of it PEFT)
  if imported["family"] == "lm":
    config.data = common.text_data(seq_len=min(128, model["max_len"]))
    return config
  config.data = common.image_data() if imported["family"] == "vit" else common.image_text_data()
  config.data.update(common.pixels(**imported.get("pixels", {})))
  if is_paligemma:
    config.data.prefix_lm = True  # as PaliGemma was trained: image + prompt both ways
  return config

"""Decoder LM configs: `--config configs/lm.py:tiny` is the CPU quick start."""
import ml_collections

from configs import common

VARIANTS = {
    # Byte-level GPT-2-shaped model on synthetic arithmetic: about a minute on a laptop CPU.
    "tiny": dict(model=dict(variant="gpt2-tiny", vocab_size=320, max_len=128), seq_len=64,
                 batch_size=16, total_steps=1000),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown configs/lm.py variant {arg!r}; known: {sorted(VARIANTS)}")
  preset = VARIANTS[arg]
  config = common.base_config(family="lm", total_steps=preset["total_steps"],
                              batch_size=preset["batch_size"])
  config.model = ml_collections.ConfigDict(preset["model"])  # lm.Model(**config.model)
  config.data = ml_collections.ConfigDict(dict(name="arithmetic", seq_len=preset["seq_len"]))
  return config

"""Decoder LM configs: `--config configs/lm.py:tiny` is the CPU quick start."""
import ml_collections

from configs import common

VARIANTS = {
    # Byte-level GPT-2-shaped model on synthetic arithmetic: about a minute on a laptop CPU.
    "tiny": dict(model=dict(variant="gpt2-tiny", vocab_size=320, max_len=128, dtype="float32",
                            attention_impl="xla"), seq_len=64,
                 batch_size=16, total_steps=1000),
    # Full-size shapes for GPUs and TPUs (the benchmark cases), bfloat16 compute.
    "gpt2-124m": dict(model=dict(variant="gpt2-124m", dtype="bfloat16", attention_impl="auto"),
                      seq_len=1024, batch_size=16, total_steps=10000),
    "llama-1b": dict(model=dict(variant="llama-1b", dtype="bfloat16", attention_impl="auto",
                                remat_policy="dots_no_batch"),
                     seq_len=2048, batch_size=8, total_steps=10000),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = common.variant(VARIANTS, arg, "configs/lm.py")
  config = common.base_config(family="lm", total_steps=preset["total_steps"],
                              batch_size=preset["batch_size"])
  config.model = ml_collections.ConfigDict(preset["model"])  # lm.Model(**config.model)
  config.data = common.text_data(preset["seq_len"])
  return config

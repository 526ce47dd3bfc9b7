"""Decoder LM configs: `configs/lm.py:VARIANT[,lora]`; `lm.py:tiny` is the CPU quick start."""
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
    # Scanned: unrolled, XLA keeps every layer's gathered weights for the backward pass (13.9
    # GiB a chip at 4 x 2048 tokens on a v5e:2x4, dry run) where the scan needs 10.7.
    "llama-1b": dict(model=dict(variant="llama-1b", dtype="bfloat16", attention_impl="auto",
                                scan_layers=True, remat_policy="dots_no_batch"),
                     seq_len=2048, batch_size=8, total_steps=10000),
    # Pods: 2 x 2048 tokens a chip on a v5p-128 (64 chips), parameters and Adam moments split
    # over every chip (fsdp). Scanned, with nothing saved per block but its input: 32 layers of
    # 4096 wide leave the memory to the state.
    "llama-7b": dict(model=dict(variant="llama-7b", dtype="bfloat16", attention_impl="auto",
                                scan_layers=True, remat_policy="full"),
                     seq_len=2048, batch_size=128, total_steps=10000),
}


SUFFIX = "VARIANT,lora: LoRA (rank 16) on every projection, the rest frozen"


def variants() -> list[str]:
  return list(VARIANTS)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """VARIANT, or VARIANT,lora: LoRA (rank 16) on every projection, the rest frozen."""
  arg, _, lora = arg.partition(",")
  if lora not in ("", "lora"):
    raise ValueError(f"configs/lm.py takes VARIANT[,lora], got {arg},{lora}")
  preset = common.variant(VARIANTS, arg, "configs/lm.py")
  config = common.base_config(family="lm", total_steps=preset["total_steps"],
                              batch_size=preset["batch_size"])
  config.model = ml_collections.ConfigDict(preset["model"])  # lm.Model(**config.model)
  config.data = common.text_data(preset["seq_len"])
  if lora:
    common.with_lora(config)
    config.optimizer.frozen = ".*"  # only the adapters train
  return config

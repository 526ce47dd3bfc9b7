"""Decoder LM configs: `--config configs/lm.py:tiny` (the CPU quick start)."""
import ml_collections

VARIANTS = {
    # Byte-level GPT-2-shaped model: trains on a laptop CPU in about a minute.
    "tiny": dict(model=dict(variant="gpt2-tiny", vocab_size=256, max_len=128), seq_len=64,
                 batch_size=16, total_steps=1000),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown configs/lm.py variant {arg!r}; known: {sorted(VARIANTS)}")
  preset = VARIANTS[arg]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = preset["total_steps"]
  config.batch_size = preset["batch_size"]  # global, in sequences
  config.log_every = 25

  config.model = ml_collections.ConfigDict(preset["model"])  # lm.Model(**config.model)
  config.data = ml_collections.ConfigDict(dict(name="arithmetic", seq_len=preset["seq_len"]))

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3  # tiny models take large steps
  config.optimizer.warmup_steps = 20
  config.optimizer.decay_steps = config.total_steps
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95  # GPT-2/3 practice, steadier than 0.999 at small batch
  config.optimizer.weight_decay = 0.1
  config.optimizer.clip_norm = 1.0
  return config

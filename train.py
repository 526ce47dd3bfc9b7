"""Trains an mmjax model.

  python train.py --config configs/lm.py:tiny --workdir /tmp/mmjax [--config.key=value ...]
  python train.py --config configs/lm.py:llama-1b --dry_run=v5e:2x4   # will it fit? (no TPU used)

Several processes: set --config.distributed.coordinator_address=host:port with
num_processes and process_id, or run under a cluster that jax detects itself
(TPU pods, SLURM), where jax.distributed.initialize() needs no arguments.
"""
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from mmjax import console
from mmjax import dry_run
from mmjax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_DRY_RUN = flags.DEFINE_string(
    "dry_run", "", "A TPU slice ('v5e:2x4', 'v5p-128'): compile the run's steps for it, say "
    "whether they fit, and stop; exits 1 when they do not (as tools/dry_run.py).")
flags.mark_flags_as_required(["config"])

# Clusters in which jax.distributed.initialize() finds its settings on its own (and TPU VMs).
CLUSTER_ENV_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_spec = config_flags.get_config_filename(flags.FLAGS["config"])
  if _DRY_RUN.value:
    report = dry_run.check(_CONFIG.value, _DRY_RUN.value)
    print(dry_run.summary(report, config_spec))
    return 0 if report["fits"] else 1
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (or --dry_run=TOPOLOGY)")
  distributed = _CONFIG.value.distributed
  # Before anything touches a device: every process must join first.
  if distributed.coordinator_address:
    jax.distributed.initialize(distributed.coordinator_address, distributed.num_processes,
                               distributed.process_id)
  elif any(os.environ.get(v) for v in CLUSTER_ENV_VARS) or console.on_a_tpu_vm():
    jax.distributed.initialize()
  timer = console.Timer()
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(console.summary(result, workdir=_WORKDIR.value, config_spec=config_spec,
                          wall_seconds=timer.seconds,
                          overrides=console.config_overrides(sys.argv[1:])), file=sys.stderr)


if __name__ == "__main__":
  console.app_run(main)

"""Trains an mmjax model.

  python train.py --config configs/lm.py:tiny --workdir /tmp/mmjax [--config.key=value ...]
  python train.py --config configs/lm.py:llama-1b --dry_run=v5e:2x4   # will it fit? (no TPU used)
  python train.py --list_configs                                  # the config files and variants
  python train.py --config configs/lm.py:tiny --print_config      # every key, as resolved

Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, and the
same command resumes there; a second Ctrl-C stops at once.

Several processes: set --config.distributed.coordinator_address=host:port with
num_processes and process_id, or run under a cluster that jax detects itself
(TPU pods, SLURM), where jax.distributed.initialize() needs no arguments.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import common
from mmjax import console

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_DRY_RUN = flags.DEFINE_string(
    "dry_run", "", "A TPU slice ('v5e:2x4', 'v5p-128'): compile the run's steps for it, say "
    "whether they fit, and stop; exits 1 when they do not (as tools/dry_run.py).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the config, overrides and pretrained towers applied, and its "
    "learning-rate schedule, then stop.")
_LIST_CONFIGS = flags.DEFINE_bool("list_configs", False,
                                  "List the config files and their variants, then stop.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LIST_CONFIGS.value:
    print(common.listing())
    return 0
  if _CONFIG.value is None:
    raise ValueError("--config is required: --config configs/lm.py:tiny, say "
                     "(--list_configs lists them)")
  # jax and the trainer load here, once the flags and config keys are checked: a mistyped
  # flag is reported at once, not after the seconds jax takes to import.
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import distributed, dry_run, optim, towers, trainer  # pylint: disable=g-import-not-at-top
  config_spec = config_flags.get_config_filename(flags.FLAGS["config"])
  if _PRINT_CONFIG.value:
    config = towers.resolve(_CONFIG.value)
    print(config)
    print(f"# learning rate: {optim.describe_schedule(config.optimizer, config.total_steps)}")
    return 0
  if _DRY_RUN.value:
    report = dry_run.check(_CONFIG.value, _DRY_RUN.value)
    print(dry_run.summary(report, config_spec))
    return 0 if report["fits"] else 1
  if not _WORKDIR.value:
    raise ValueError("--workdir is required (or --dry_run=TOPOLOGY, --print_config)")
  # Before anything touches a device: every process must join first.
  distributed.join(_CONFIG.value.distributed)
  timer = console.Timer()
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(console.summary(result, workdir=_WORKDIR.value, config_spec=config_spec,
                          wall_seconds=timer.seconds,
                          overrides=console.config_overrides(sys.argv[1:])), file=sys.stderr)
  # Stopped by Ctrl-C: a shell's `train.py && next` must not go on (SIGTERM, a preemption the
  # scheduler restarts, exits 0).
  return 130 if result["stopped_by"] == "Ctrl-C" else 0


if __name__ == "__main__":
  console.app_run(main)

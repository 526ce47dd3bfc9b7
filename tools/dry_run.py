"""Checks a run before paying for the pod: compiles its steps for a TPU slice, here, on a CPU.

  python tools/dry_run.py --config configs/lm.py:llama-1b --topology v5e:2x4
  python tools/dry_run.py --config configs/lm.py:gpt2-124m --topology v5e-8 --max_batch
  python tools/dry_run.py --config configs/lm.py:llama-7b --topology v5e:4x4 --slices 2 \\
      --config.batch_size=256

Builds the model, shardings, optimizer and steps exactly as train.py does
(mmjax.steps.setup), on the slice's chips, compiles the train and eval steps
with libtpu (`pip install -e ".[tpu]"`; no TPU is used) and prints a short
summary, then, as its last line, one JSON object: config, topology, chips,
device_kind, hbm_bytes, argument/output/temp/alias/code bytes per chip,
peak_bytes (libtpu's own peak), formula_peak_bytes (arguments + outputs +
temporaries - aliased, an upper bound), fits (libtpu's verdict: it compiled
the steps for the chip's HBM), compile_s. --max_batch finds, by compiling, the
largest global batch whose peak is within --max_batch_limit of HBM, and
compiles its neighbours too (memory is not always monotone in the batch).
Exits 1 when the run does not fit.
"""
import json
import logging
import os
import pathlib
import sys

# The host only compiles: keep jax on the CPU, so it does not look for a TPU to run on.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Config files import their siblings as `configs.common`: the repository root must be importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmjax import console  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmjax import dry_run  # pylint: disable=g-import-not-at-top,wrong-import-position

log = logging.getLogger("mmjax.dry_run")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice: 'v5e:2x4', 'v5p:4x4x4', "
                                "'v5e-8', ...")
_SLICES = flags.DEFINE_integer("slices", 1, "Slices of that topology (multi-slice: the data "
                               "axis spans them, config.mesh.dcn).")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find the largest global batch that fits.")
_LIMIT = flags.DEFINE_float("max_batch_limit", 0.9, "--max_batch: the share of HBM it may use.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  name = config_flags.get_config_filename(flags.FLAGS["config"])  # "configs/lm.py:llama-1b"
  report = dry_run.check(_CONFIG.value, _TOPOLOGY.value, _SLICES.value)
  report["config"] = name
  print(dry_run.summary(report, name))
  if _MAX_BATCH.value:
    log.info("searching for the largest global batch within %.0f%% of HBM", 100 * _LIMIT.value)
    batch, best, odd = dry_run.largest_batch(_CONFIG.value, _TOPOLOGY.value, _SLICES.value,
                                             _LIMIT.value)
    report.update(max_batch=batch, max_batch_peak_bytes=best["peak_bytes"] if batch else None,
                  max_batch_not_monotone=odd)
    print(f"  largest global batch within {_LIMIT.value:.0%} of HBM: {batch}"
          + (f" ({best['peak_bytes'] / dry_run.GiB:.2f} GiB per chip at libtpu's peak)"
             if batch else ""))
    for line in odd:  # memory is not always monotone in the batch
      print(f"  memory is not monotone in the batch here: {line}")
  print(json.dumps(report))
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  console.app_run(main)

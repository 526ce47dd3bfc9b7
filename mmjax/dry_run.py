"""Compile a config's steps for a TPU slice from any machine, and say whether they fit.

  report = dry_run.check(config, "v5e:2x4")   # compiles; no TPU is used
  report["fits"], report["peak_bytes"]        # libtpu's verdict and its peak per chip

With libtpu installed (`pip install -e ".[tpu]"`), jax describes any TPU
slice by its topology and compiles for its chips ahead of time. libtpu
refuses a program that does not fit a chip's HBM, and reports the peak of the
one it accepts: the verdict is libtpu's own. The steps are the ones
`steps.setup` builds for the trainer, on the slice's chips instead of this
machine's devices.

Topologies are named as libtpu names them, generation:chips per dimension
("v5e:2x4", "v6e:4x4", "v4:2x2x2", "v5p:4x4x4"), or by their product name
("v5e-8", "v4-16", "v5p-128": v4 and v5p count TensorCores, two per chip).
"""
import contextlib
import dataclasses
import logging
import math
import os
import re
import time

import jax
import ml_collections

from mmjax import console
from mmjax import sharding
from mmjax import steps

log = logging.getLogger(__name__)

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # libtpu's topology prefix
  hbm_bytes: int  # what a program may use per chip: the limit libtpu reports when one does not fit
  megacore: bool  # two TensorCores driven as one device per chip (v4, v5p)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, megacore=True),
    "v5e": Chip("v5e", int(15.75 * GiB), megacore=False),
    "v5p": Chip("v5", 95 * GiB, megacore=True),
    "v6e": Chip("v6e", 32 * GiB, megacore=False),
}


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """"v5e:2x4" or "v5e-8" -> (the chip, chips along each dimension)."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)([:-])([\dx]+)", topology)
  if not match:
    raise ValueError(f"topology {topology!r} is not one of 'v5e:2x4' (chips per dimension) or "
                     f"'v5e-8' (product name), with a generation in {sorted(CHIPS)}")
  chip = CHIPS[match.group(1)]
  if match.group(2) == ":":
    return chip, tuple(int(n) for n in match.group(3).split("x"))
  count = int(match.group(3)) // (2 if chip.megacore else 1)
  shapes = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}
  if chip.megacore:
    shapes = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}
  if count not in shapes:
    raise ValueError(f"topology {topology!r}: no {match.group(1)} slice of {count} chips is "
                     f"known here; name its shape instead, e.g. {match.group(1)}:2x2")
  return chip, shapes[count]


def topology_devices(topology: str, slices: int = 1) -> list[jax.Device]:
  """The chips of `slices` TPU slices of this topology, for compiling only."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling only, nothing runs: another process (a test worker, a job on this TPU host) may
  # hold libtpu too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chip, shape = parse_topology(topology)
  name = f"{chip.name}:{'x'.join(map(str, shape))}"
  settings = dict(num_slices=slices) if slices > 1 else {}
  if chip.megacore:  # one device per chip, and the hosts' 2x2x1 chips as in a real pod
    settings.update(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
  elif len(shape) == 2 and shape[0] * shape[1] < 4:  # a host of fewer chips than 2x2 (a Colab
    settings.update(chips_per_host_bounds=(*shape, 1))  # TPU, v5litepod-1): libtpu's default
    # host is 2x2 and cannot lay out a smaller slice
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **settings).devices
  except jax.errors.JaxRuntimeError as e:
    if "INVALID_ARGUMENT" not in str(e):
      raise
    reason = str(e).split("INVALID_ARGUMENT:", 1)[1].strip().splitlines()[0]
    raise ValueError(f"topology {topology!r} is not a slice libtpu can lay out: {reason}") from e
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError("compiling for a TPU needs libtpu: pip install -e \".[tpu]\"") from e
    raise


@contextlib.contextmanager
def no_compilation_cache():
  """A slice's executables cannot be loaded back here (there is no TPU client to load them
  into): never write them to a persistent compilation cache (JAX_COMPILATION_CACHE_DIR)."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def hbm_bytes(topology: str) -> int:
  return parse_topology(topology)[0].hbm_bytes


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled program, and its peak two ways.

  peak_bytes: the compiler's own peak, the most its buffer assignment holds at
  once (libtpu checks this against HBM when it compiles; XLA:CPU and GPU fill
  it too); where a backend leaves it 0, the formula below.
  formula_peak_bytes: arguments + outputs + temporaries - aliased, which counts
  every temporary as live at once: 0.6 to 7.5 GiB above libtpu's figure for Llama
  1B-7B train steps (for tiny programs libtpu's scratch buffers make it the lower).
  """
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes,
         "code_bytes": stats.generated_code_size_in_bytes}
  out["formula_peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                               - out["alias_bytes"])
  out["peak_bytes"] = getattr(stats, "peak_memory_in_bytes", 0) or out["formula_peak_bytes"]
  return out


def describe(stats: dict[str, int]) -> str:
  """`memory`'s bytes in a line: "4.21 GiB per device at peak (arguments 0.19, ...)"."""
  gib = lambda key: f"{stats[key] / GiB:.2f}"
  return (f"{gib('peak_bytes')} GiB per device at peak (arguments {gib('argument_bytes')}, "
          f"outputs {gib('output_bytes')}, temporaries {gib('temp_bytes')}, aliased "
          f"{gib('alias_bytes')})")


# libtpu's words when a program does not fit, sizes in binary units: "Used 15.75G of 15.75G
# hbm. Exceeded hbm capacity by 699.0K." (the excess is the exact figure: "Used" is rounded),
# or, when its temporaries alone are too many, "the total memory required for HLO temporaries
# (160.00G) exceeds available HBM (15.75G)" (then the peak is at least that).
OUT_OF_MEMORY = re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm"
                           r"|required for [\w ]+ \(([\d.]+)([KMGT])\) exceeds available HBM")
EXCEEDED = re.compile(r"Exceeded hbm capacity by ([\d.]+)([KMGT])")
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory_peak(message: str, hbm: int) -> int | None:
  """The bytes a chip would need, from libtpu's RESOURCE_EXHAUSTED message; None for any other
  error."""
  found = OUT_OF_MEMORY.search(message)
  if "RESOURCE_EXHAUSTED" not in message or not found:
    return None
  exceeded = EXCEEDED.search(message)
  if exceeded:
    return hbm + int(float(exceeded.group(1)) * UNITS[exceeded.group(2)])
  return int(float(found.group(1) or found.group(3)) * UNITS[found.group(2) or found.group(4)])


@no_compilation_cache()
def check(config: ml_collections.ConfigDict, topology: str, slices: int = 1, *,
          evaluation: bool = True, limit: float = 1.0) -> dict:
  """Compiles config's train (and eval) step for the slice -> a report, also when it does not fit.

  The verdict is libtpu's: "fits" when it compiled the steps (it refuses, with
  RESOURCE_EXHAUSTED, what does not fit its HBM) and their peaks, libtpu's own
  (`memory`'s peak_bytes), are within `limit` x HBM: a margin a user asks for.
  -> {"config", "topology", "slices", "chips", "device_kind", "hbm_bytes", "limit",
  "batch_size", argument/output/temp/alias/code bytes and the two peaks of the train step,
  "eval_peak_bytes", "fits", "compile_s"}; when libtpu runs out of memory, "peak_bytes" is
  the size it asked for and "error" its message.
  """
  devices = topology_devices(topology, slices)
  report = {"config": config.get("name", ""), "topology": topology, "slices": slices,
            "chips": len(devices), "device_kind": devices[0].device_kind,
            "hbm_bytes": hbm_bytes(topology), "limit": limit, "batch_size": config.batch_size}
  run = steps.setup(config, devices)
  tic = time.perf_counter()
  try:
    lowered = run.lower_train()
    with console.elapsed(f"lowered the train step in {time.perf_counter() - tic:.0f} s; "
                         f"compiling it for {topology}"):
      report.update(memory(lowered.compile()))
    if evaluation:
      with console.elapsed("compiling the eval step"):
        report["eval_peak_bytes"] = memory(run.lower_eval().compile())["peak_bytes"]
  except jax.errors.JaxRuntimeError as e:
    peak = out_of_memory_peak(str(e), report["hbm_bytes"])
    if peak is None:
      raise
    report.update(peak_bytes=peak, fits=False, error=str(e).strip().splitlines()[0][:300])
  report["compile_s"] = round(time.perf_counter() - tic, 1)
  report.setdefault("fits", max(report["peak_bytes"], report.get("eval_peak_bytes", 0))
                    <= limit * report["hbm_bytes"])
  return report


def largest_batch(config: ml_collections.ConfigDict, topology: str, slices: int = 1,
                  limit: float = 1.0) -> tuple[int, dict, list[str]]:
  """The largest global batch whose steps fit in `limit` x HBM (libtpu's verdict, `check`),
  found by compiling.

  Batches step by the data-parallel size (a batch must split evenly over it).
  Memory is not always monotone in the batch (a larger batch can tile
  differently), so the answer's neighbours are compiled too.
  -> (batch, its report, what the neighbours say where they disagree with a monotone
  reading); (0, the smallest batch's report, []) when even that does not fit.
  """
  chips = len(topology_devices(topology, slices))
  step = math.prod(sharding.mesh_shape(config.mesh.shape, chips)[:2])  # data x fsdp
  tried = {}

  def fits(n: int) -> bool:  # n data-parallel steps
    if n not in tried:
      trial = ml_collections.ConfigDict(config.to_dict())
      trial.batch_size = n * step * config.microbatches
      tried[n] = check(trial, topology, slices, evaluation=False, limit=limit)
      report = tried[n]
      log.info("global batch %d: %.2f GiB per chip at libtpu's peak, %s (compiled in %.0f s)",
               trial.batch_size, report["peak_bytes"] / GiB, verdict(report),
               report["compile_s"])
    return tried[n]["fits"]

  if not fits(1):
    return 0, tried[1], []
  low, high = 1, 2
  while fits(high):  # double until it does not fit
    low, high = high, high * 2
  while high - low > 1:  # then halve the gap
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  batch = lambda n: n * step * config.microbatches
  odd = [f"global batch {batch(n)} {'fits' if fits(n) else 'does not fit'} too"
         for n in (low - 1, high + 1) if n >= 1 and fits(n) != (n < low)]
  return batch(low), tried[low], odd


def verdict(report: dict) -> str:
  """Whether a report's steps fit, and why not: "fits", "does not fit: libtpu ran out of HBM"."""
  if report["fits"]:
    return "fits" + (f" within {report['limit']:.0%} of HBM" if report["limit"] < 1 else "")
  if "error" in report:
    return "does not fit: libtpu ran out of HBM"
  return f"does not fit within {report['limit']:.0%} of HBM"


def summary(report: dict, name: str = "") -> str:
  """A few lines for a person: the slice, the bytes per chip, whether it fits."""
  gib = lambda n: f"{n / GiB:.2f} GiB"
  slices = f" x {report['slices']} slices" if report["slices"] > 1 else ""
  lines = [f"{name or 'the config'} on {report['topology']}{slices}: {report['chips']} x "
           f"{report['device_kind']}, {gib(report['hbm_bytes'])} HBM each; global batch "
           f"{report['batch_size']}"]
  share = report["peak_bytes"] / report["hbm_bytes"]
  if "error" in report:
    lines.append(f"  train step: needs {gib(report['peak_bytes'])} per chip ({share:.0%} of "
                 f"HBM): {report['error']}")
  else:
    lines.append(f"  train step: {gib(report['peak_bytes'])} per chip at libtpu's peak "
                 f"({share:.0%} of HBM): state {gib(report['argument_bytes'])}, temporaries "
                 f"{gib(report['temp_bytes'])} (all live at once: "
                 f"{gib(report['formula_peak_bytes'])})")
  if "eval_peak_bytes" in report:
    lines.append(f"  eval step: {gib(report['eval_peak_bytes'])} per chip")
  lines.append(f"  {verdict(report)}; compiled in {report['compile_s']:.0f} s")
  return "\n".join(lines)

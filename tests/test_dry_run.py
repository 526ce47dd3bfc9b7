"""Compiling for TPU slices from this CPU: memory per chip, fitting, topologies, the tools."""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from mmjax import dry_run
from mmjax import models
from mmjax import sharding
from mmjax import steps
import train_cli


def tiny(spec: str, **overrides):
  config = common.load(spec)
  config.update_from_flattened_dict({"batch_size": 8, **overrides})
  if config.family != "lm":
    config.data.name = "shapes"
  return config


def tiled_bytes(shape: tuple[int, ...]) -> int:
  """Bytes of an array of 4-byte (or smaller) items laid out in whole (8, 128) TPU tiles."""
  rows, columns = (1, 1, *shape)[-2:]
  return math.prod(shape[:-2]) * -(-rows // 8) * 8 * -(-columns // 128) * 128 * 4


@pytest.mark.parametrize("spec", ["lm.py:tiny", "deep_fusion.py:tiny"])
def test_tiny_models_compile_for_a_v5e_slice_within_their_shapes(spec):
  config = tiny(spec)
  report = dry_run.check(config, "v5e:2x2")
  assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite" and report["fits"]
  run = steps.setup(config, dry_run.topology_devices("v5e:2x2"))
  # The arguments are this chip's shard of the state and of the batch, as the shardings say:
  # at least their bytes, at most those shards laid out in whole (8, 128) tiles of 4 bytes.
  shards = [s.shard_shape(x.shape) for x, s in zip(
      jax.tree.leaves((run.abstract_state, run.abstract_batch)),
      jax.tree.leaves((run.state_sharding, {k: run.batch_sharding for k in run.abstract_batch})))]
  itemsizes = [x.dtype.itemsize for x in jax.tree.leaves((run.abstract_state, run.abstract_batch))]
  exact = sum(math.prod(shape) * size for shape, size in zip(shards, itemsizes))
  tiled = sum(tiled_bytes(shape) for shape in shards)
  assert exact <= report["argument_bytes"] <= tiled
  # The state is donated: the new one is written over the old.
  assert report["alias_bytes"] >= run.state_bytes_per_device
  # Temporaries: below every layer's activations kept in float32 at 16 x the model width, the
  # logits of every position with their gradient, and two copies of the state (gradients,
  # updates); a step that kept more would be a regression.
  lm_fields = config.model.lm if config.family != "lm" else config.model
  language = models.build("lm", lm_fields)
  B, T = run.abstract_batch["tokens"].shape
  per_chip = B // 4 * T
  bound = (language.depth * per_chip * 16 * language.width * 4
           + 2 * per_chip * language.vocab_size * 4 + 2 * run.state_bytes_per_device)
  if config.family != "lm":  # and the ViT's, at its width, for each image's patches
    vision = models.build("vit", config.model.vit)
    patches = (vision.image_size // vision.patch_size) ** 2
    bound += vision.depth * B // 4 * patches * 16 * vision.width * 4
  assert report["temp_bytes"] < bound
  assert report["formula_peak_bytes"] == (report["argument_bytes"] + report["output_bytes"]
                                          + report["temp_bytes"] - report["alias_bytes"])
  # libtpu's peak: at least the state it holds throughout.
  assert report["argument_bytes"] <= report["peak_bytes"]


def test_a_run_that_does_not_fit_is_reported_not_raised():
  # 2^28 embedding rows x 8 wide, replicated (dp): its logits alone are far over 16 GiB a chip.
  config = tiny("lm.py:tiny", **{"model.vocab_size": 2**28, "model.width": 8,
                                 "model.num_heads": 1, "model.depth": 1, "mesh.rules": "dp"})
  report = dry_run.check(config, "v5e:2x2")
  assert not report["fits"] and report["peak_bytes"] > report["hbm_bytes"] == 15.75 * 2**30
  assert "Ran out of memory" in report["error"]



def test_the_verdict_is_libtpus_peak_not_the_sum_of_the_parts():
  # arguments + outputs + temporaries - aliased is not what libtpu checks against HBM. A 4M-row
  # embedding (8 wide, replicated): its temporaries dominate and libtpu's peak is below the sum,
  # so with a limit between the two the run fits. The tiny LM: libtpu's peak (program and
  # scratch buffers) is above the sum, so with a limit between the two it does not.
  embedding = tiny("lm.py:tiny", **{"model.vocab_size": 4_000_000, "model.width": 8,
                                    "model.num_heads": 1, "model.depth": 1, "mesh.rules": "dp"})
  for config, fits in ((embedding, True), (tiny("lm.py:tiny"), False)):
    first = dry_run.check(config, "v5e:2x2", evaluation=False)
    libtpu, formula = first["peak_bytes"], first["formula_peak_bytes"]
    assert formula == (first["argument_bytes"] + first["output_bytes"] + first["temp_bytes"]
                       - first["alias_bytes"])
    assert (libtpu < formula) == fits and first["fits"]
    between = (libtpu + formula) / 2 / first["hbm_bytes"]  # a limit, as a share of HBM
    report = dry_run.check(config, "v5e:2x2", evaluation=False, limit=between)
    assert report["fits"] == fits and report["peak_bytes"] == libtpu
    assert dry_run.verdict(report) == (f"fits within {between:.0%} of HBM" if fits else
                                       f"does not fit within {between:.0%} of HBM")


def test_the_batch_search_compiles_the_answers_neighbours(monkeypatch):
  # Memory need not grow with the batch: here 40 fits where 32 does not. The search (doubling,
  # then halving the gap) answers 24, and says that its neighbour 40 fits too.
  fitting = {8, 16, 24, 40}
  compiled = []

  def check(config, topology, slices=1, *, evaluation=True, limit=1.0):
    compiled.append(config.batch_size)
    return {"fits": config.batch_size in fitting, "limit": limit, "peak_bytes": 1,
            "compile_s": 1.0, "batch_size": config.batch_size}

  monkeypatch.setattr(dry_run, "check", check)
  batch, report, odd = dry_run.largest_batch(tiny("lm.py:tiny"), "v5e:2x4", limit=0.9)
  assert (batch, report["batch_size"]) == (24, 24)
  assert compiled == [8, 16, 32, 24, 40]  # 16 is 24's lower neighbour, compiled already
  assert odd == ["global batch 40 fits too"]


def test_the_size_libtpu_asked_for_is_read_from_its_message():
  # Messages as libtpu 0.0.48 words them. "Used" is rounded to 15.75G; the excess is exact.
  hbm = int(15.75 * 2**30)
  used = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
          "of memory in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by "
          "699.0K.")
  assert dry_run.out_of_memory_peak(used, hbm) == hbm + 699 * 2**10
  temporaries = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                 "temporaries (16.10G) exceeds available HBM (15.75G).")
  assert dry_run.out_of_memory_peak(temporaries, hbm) == int(16.10 * 2**30)
  assert dry_run.out_of_memory_peak("INTERNAL: Used 1G of 2G hbm", hbm) is None

@pytest.mark.parametrize("name,kind,shape,chips", [
    ("v5e:2x4", "TPU v5 lite", (2, 4), 8), ("v5e-8", "TPU v5 lite", (2, 4), 8),
    ("v6e:2x2", "TPU v6 lite", (2, 2), 4), ("v4-16", "TPU v4", (2, 2, 2), 8),
    ("v5p-16", "TPU v5", (2, 2, 2), 8), ("v5p:2x2x1", "TPU v5", (2, 2, 1), 4),
])
def test_topologies_by_shape_or_product_name(name, kind, shape, chips):
  assert dry_run.parse_topology(name)[1] == shape
  devices = dry_run.topology_devices(name)
  assert len(devices) == chips and devices[0].device_kind == kind


def test_bad_topology_names_say_what_is_known():
  with pytest.raises(ValueError, match="topology 'v9:2x2' is not one of"):
    dry_run.parse_topology("v9:2x2")
  with pytest.raises(ValueError, match="no v5e slice of 12 chips is known here"):
    dry_run.parse_topology("v5e-12")


def test_two_slices_put_the_data_axis_across_them():
  devices = dry_run.topology_devices("v5e:2x2", slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1}, devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # mesh.devices[data, fsdp, tensor]: each data row is one slice; fsdp stays inside it.
  np.testing.assert_array_equal(slice_of[:, :, 0], [[0, 0, 0, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match=r"config.mesh.dcn .* does not divide the mesh"):
    sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)


def test_the_tool_and_train_py_print_a_summary_and_json(tmp_path):
  tool = subprocess.run(
      [sys.executable, str(train_cli.ROOT / "tools" / "dry_run.py"),
       f"--config={train_cli.ROOT / 'configs' / 'lm.py'}:tiny", "--topology=v5e-4",
       "--config.batch_size=8"], env=train_cli.env(1), capture_output=True, text=True,
      timeout=600)
  assert tool.returncode == 0, tool.stderr[-2000:]
  lines = tool.stdout.strip().splitlines()
  report = json.loads(lines[-1])
  assert report["fits"] and report["chips"] == 4 and report["topology"] == "v5e-4"
  assert report["config"].endswith("configs/lm.py:tiny")
  assert "train step:" in tool.stdout and "fits; compiled in" in tool.stdout
  command = train_cli.command(tmp_path, "lm.py:tiny", {"batch_size": 8})
  command = [c for c in command if not c.startswith("--workdir")] + ["--dry_run=v5e:2x2"]
  train = subprocess.run(command, env=train_cli.env(1), capture_output=True, text=True,
                         timeout=600)
  assert train.returncode == 0, train.stderr[-2000:]
  assert "train step:" in train.stdout and not (tmp_path / "checkpoints").exists()
  gib = float(train.stdout.split("train step: ")[1].split(" GiB")[0])
  assert gib == pytest.approx(report["peak_bytes"] / 2**30, abs=0.006)

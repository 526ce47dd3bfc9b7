"""Test-wide settings: 8 fake CPU devices so sharding tests see a real mesh."""
import atexit
import os
import shutil
import tempfile

# Must be set before jax initialises its backends, i.e. before any test imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile for TPU slices (no TPU is used) in both workers: libtpu may be loaded twice.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# tfds datasets the tests build (the fusion configs' default scenes among them) go to one
# directory per test session, shared with train.py subprocesses, never to ~/tensorflow_datasets.
if "TFDS_DATA_DIR" not in os.environ:
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="mmjax-tfds-")
  atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

import subprocess

import pytest

import train_cli


@pytest.fixture
def run_train():
  """Runs train.py in a fresh process with `devices` CPU devices; returns its metrics rows."""

  def run(workdir, config: str, overrides: dict, devices: int = 1):
    result = subprocess.run(train_cli.command(workdir, config, overrides),
                            env=train_cli.env(devices), cwd=train_cli.ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_cli.read_metrics(workdir)

  return run

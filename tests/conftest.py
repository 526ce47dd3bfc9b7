"""Test-wide settings: 8 fake CPU devices so sharding tests see a real mesh."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile for TPU slices (no TPU is used) in both workers: libtpu may be loaded twice.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# tfds datasets the tests build (the fusion configs' default scenes among them) go to one
# directory per test session, shared with train.py subprocesses, never to ~/tensorflow_datasets.
if "TFDS_DATA_DIR" not in os.environ:
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="mmjax-tfds-")
  atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)
# One persistent compilation cache for the session, both workers and every train.py they start:
# the many runs of the same tiny configs compile each step once (a cached compile of the
# tiny LM's step: 2 s instead of 8 on 2 cores).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmjax-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import subprocess

import pytest

import train_cli  # imports jax: it reads the settings above now, XLA_FLAGS when it starts

os.environ["XLA_FLAGS"] = train_cli.xla_flags(devices=8)


def _run_train(workdir, config: str, overrides: dict, devices: int = 1,
               fast_compile: bool = True):
  """Runs train.py in a fresh process with `devices` CPU devices; returns its metrics rows."""
  result = subprocess.run(train_cli.command(workdir, config, overrides),
                          env=train_cli.env(devices, fast_compile), cwd=train_cli.ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return train_cli.read_metrics(workdir)


@pytest.fixture
def run_train():
  return _run_train


@pytest.fixture(scope="module")
def run_train_module():
  """run_train for module-scoped fixtures (a run several tests compare with)."""
  return _run_train

"""Test-wide settings: 8 fake CPU devices so sharding tests see a real mesh."""
import os

# Must be set before jax initialises its backends, i.e. before any test imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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

"""Running train.py as a user would, in a fresh process, for end-to-end tests."""
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def command(workdir, config: str, overrides: dict) -> list[str]:
  """The train.py command line for configs/<config> with --config.key=value overrides."""
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / config}",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def env(devices: int) -> dict:
  """The environment for a CPU process with `devices` fake devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]

"""Running train.py as a user would, in a fresh process, for end-to-end tests."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def command(workdir, config: str, overrides: dict) -> list[str]:
  """The train.py command line for configs/<config> with --config.key=value overrides."""
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / config}",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def env(devices: int) -> dict:
  """The environment for a CPU process with `devices` fake devices."""
  # This checkout's mmjax, whichever one pip installed.
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def run_tool(name: str, *args) -> str:
  """Runs tools/<name> in a fresh one-device process; its stdout (stderr in the failure)."""
  result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *args],
                          env=env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout

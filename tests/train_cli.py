"""Running train.py as a user would, in a fresh process, for end-to-end tests."""
import json
import os
import pathlib
import subprocess
import sys

from configs import common

ROOT = pathlib.Path(__file__).resolve().parent.parent


# The default generated scenes, fewer of them: a run reads a few hundred at most, and building
# the configs' 50,000 cost a test minutes (once per image size a session).
FEW_SCENES = {"data.train_size": 512, "data.eval_size": 128}


def command(workdir, config: str, overrides: dict) -> list[str]:
  """The train.py command line for configs/<config> with --config.key=value overrides."""
  try:
    data = common.load(config).get("data") or {}
  except (ValueError, ImportError):  # a mistake the test wants train.py to report
    data = {}
  if overrides.get("data.name", data.get("name")) == "tfds_scenes":
    overrides = {**FEW_SCENES, **overrides}
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

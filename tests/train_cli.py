"""Running train.py as a user would, in a fresh process, for end-to-end tests."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parent.parent


def command(workdir, config: str, overrides: dict) -> list[str]:
  """The train.py command line for configs/<config> with --config.key=value overrides."""
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / config}",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


# Most tests' models are tiny and run a few steps: compiling is most of their time, and LLVM's
# optimisation passes cost more than the code they speed up (a quarter less CPU time for the
# suite). Runs of hundreds of steps are the other way round (1000 steps of lm.py:tiny take 186 s
# instead of 85): they ask for fast_compile=False.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def xla_flags(devices: int | None, fast_compile: bool = True) -> str:
  """This session's XLA_FLAGS with `devices` fake CPU devices (None: as many as the process
  asks for itself)."""
  flags = DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).replace(FAST_COMPILE, "")
  if fast_compile:
    flags += " " + FAST_COMPILE
  if devices is not None:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return " ".join(flags.split())


def env(devices: int, fast_compile: bool = True) -> dict:
  """The environment for a CPU process with `devices` fake devices."""
  # This checkout's mmjax, whichever one pip installed.
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
              XLA_FLAGS=xla_flags(devices, fast_compile))


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def run_tool(name: str, *args) -> str:
  """Runs tools/<name> in a fresh one-device process; its stdout (stderr in the failure)."""
  result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *args],
                          env=env(1), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def wait_for(path: pathlib.Path, timeout=300):
  """Waits until the file exists and has content."""
  deadline = time.time() + timeout
  while not (path.exists() and path.stat().st_size):
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, config: str, overrides: dict, count: int = 2,
                    devices: int = 2) -> list[subprocess.Popen]:
  """`count` train.py processes of one run on localhost, `devices` CPU devices each; process
  i's stderr goes to WORKDIR.stderr.i (read it with `stderr`)."""
  port = free_port()
  pathlib.Path(workdir).parent.mkdir(parents=True, exist_ok=True)
  return [subprocess.Popen(
      command(workdir, config, {**overrides,
                                "distributed.coordinator_address": f"127.0.0.1:{port}",
                                "distributed.num_processes": count,
                                "distributed.process_id": i}),
      env=env(devices), stdout=subprocess.DEVNULL,
      stderr=open(f"{workdir}.stderr.{i}", "w"), text=True) for i in range(count)]


def stderr(workdir, process: int) -> str:
  return pathlib.Path(f"{workdir}.stderr.{process}").read_text()


def run_processes(workdir, config: str, overrides: dict, count: int = 2,
                  devices: int = 2) -> list[dict]:
  """start_processes, each expected to succeed; the run's metrics rows."""
  processes = start_processes(workdir, config, overrides, count, devices)
  for i, p in enumerate(processes):
    p.wait(timeout=600)
    assert p.returncode == 0, stderr(workdir, i)[-3000:]
  return read_metrics(workdir)


def final_params(workdir) -> dict:
  """The params of a run's newest checkpoint, on one device."""
  directory = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  path = directory / str(step) / "state"
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    saved = ckpt.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one_device),
                          saved)
    return jax.device_get(ckpt.restore(path, target)["params"])

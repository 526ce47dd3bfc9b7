"""A pod losing a host, played by two processes of 2 CPU devices each on this machine
(jax.distributed on localhost): one killed or stalled mid-run, one preempted (SIGTERM), the run
coming back on 1 x 4 or 4 x 1, its newest checkpoint broken. Each case asserts the exit codes,
how soon every process stops (bounds below), the line it says, and that the same command resumes
to the same final parameters as a run that never stopped.
"""
import re
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from mmjax import distributed
import train_cli
from train_cli import final_params

# One worker runs this file (pytest -n, --dist loadgroup): the uninterrupted run is made once.
pytestmark = pytest.mark.xdist_group("pods")

TIMEOUT_S = 8  # config.distributed.heartbeat_timeout_s in these runs
STEPS = 20  # lm.py:tiny on 2 shared cores: ~4,400 tokens/s for 2 x 2 devices, ~15,000 for 1 x 1
# One learning-rate schedule for every run below, however many steps it was started for.
RUN = {"log_every": 5, "eval_every": 0, "checkpoint_every": 10, "optimizer.warmup_steps": 3,
       "optimizer.decay_steps": STEPS, "distributed.heartbeat_timeout_s": TIMEOUT_S}
LONG = 100_000  # a run that is still going when the fault comes
DEVICES = 2  # per process: the run is 2 x 2 (2 x 4: ~1,900 tokens/s)


def start(workdir, overrides):
  return train_cli.start_processes(workdir, "lm.py:tiny", overrides, devices=DEVICES)


def run(workdir, count=2, devices=DEVICES):
  """The planned run (STEPS) on `count` processes, to its end or from where it stopped."""
  return train_cli.run_processes(workdir, "lm.py:tiny", {**RUN, "total_steps": STEPS}, count,
                                 devices)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Two processes, never interrupted: what every restarted run must end as."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  return workdir, run(workdir)


def assert_same_run(workdir, straight):
  straight_dir, straight_rows = straight
  rows = train_cli.read_metrics(workdir)
  assert rows[-1]["step"] == STEPS and rows[-1]["loss"] == straight_rows[-1]["loss"]
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(straight_dir))


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_lost_process_stops_the_other_in_one_line_and_the_run_resumes(tmp_path, straight,
                                                                        fault):
  workdir = tmp_path / "run"
  processes = start(workdir, {**RUN, "total_steps": LONG})
  train_cli.wait_for(workdir / "checkpoints" / "10" / "commit_success.txt")
  victim, survivor = processes[1], processes[0]
  victim.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
  struck = time.time()
  survivor.wait(timeout=120)
  took = time.time() - struck
  if fault == "stall":
    victim.kill()
  victim.wait()
  said = train_cli.stderr(workdir, 0).strip().splitlines()
  assert survivor.returncode == 1 and took < TIMEOUT_S + 12, (took, said[-3:])
  match = re.fullmatch(
      rf"error: process 1 of 2 sent no pulse for {TIMEOUT_S} s \(killed, its host lost, or "
      r"stalled\): stopping this one too; the same command on every process resumes from "
      rf"checkpoint step (\d+) \({re.escape(str(workdir))}/checkpoints/\d+\)", said[-1])
  assert match, said[-3:]
  assert not any("Traceback" in line or "Check failure" in line for line in said)
  resumed_from = int(match.group(1))
  assert resumed_from >= 10
  if fault == "stall":  # noticed as a kill is; the restart below is the same
    return
  # The same command (with the run's planned length) on both processes: back to the same run.
  run(workdir)
  assert f"resumed from checkpoint step {resumed_from}" in train_cli.stderr(workdir, 0)
  assert_same_run(workdir, straight)


def test_sigterm_on_one_process_stops_both_at_one_step_and_the_run_resumes(tmp_path, straight):
  workdir = tmp_path / "run"
  processes = start(workdir, {**RUN, "total_steps": LONG, "checkpoint_every": 1000})
  train_cli.wait_for(workdir / "metrics.jsonl")  # step 5 is done
  processes[1].send_signal(signal.SIGTERM)
  sent = time.time()
  for p in processes:
    p.wait(timeout=120)
  took = time.time() - sent
  assert [p.returncode for p in processes] == [0, 0] and took < 60, took  # the save included
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] < STEPS, saved  # within a few steps, not the next log
  for i in range(2):
    assert f"stopped at step {saved[0]} after SIGTERM" in train_cli.stderr(workdir, i)
  run(workdir)
  assert_same_run(workdir, straight)


def stopped_at_10(straight, workdir):
  """The uninterrupted 2 x 2 run as it was at step 10: its checkpoint 10."""
  straight_dir, _ = straight
  shutil.copytree(straight_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  return workdir


@pytest.mark.parametrize("count,devices", [(1, 4), (4, 1)], ids=["1x4", "4x1"])
def test_a_run_of_2x2_resumes_on_another_number_of_processes(tmp_path, straight, count,
                                                             devices):
  """Each process reads its rows of the same global batches, whatever their number."""
  workdir = stopped_at_10(straight, tmp_path / "run")
  run(workdir, count, devices)
  for i in range(count):
    assert "resumed from checkpoint step 10" in train_cli.stderr(workdir, i)
  assert_same_run(workdir, straight)


def truncate_process_1s_largest_file(step_dir):
  # What process 1 alone reads: process 0 would restore this step, process 1 cannot.
  largest = max((step_dir / "state" / "ocdbt.process_1" / "d").iterdir(),
                key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:100])


def test_every_process_passes_over_a_broken_newest_checkpoint(tmp_path, straight):
  """A newest step broken on shared storage: every process resumes from the one before (they
  agree, though only process 1 fails to read it), the broken step is kept aside, and the run
  writes that step again and ends as the uninterrupted one. (Steps every process fails to
  read, an empty folder or one without manifests, are tests/test_checkpoint.py's.)"""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  truncate_process_1s_largest_file(workdir / "checkpoints" / str(STEPS))
  run(workdir)
  for i in range(2):
    said = train_cli.stderr(workdir, i)
    assert f"checkpoint step {STEPS} (" in said and "resumed from checkpoint step 10" in said
    assert f"resuming from checkpoint step 10, not the newer [{STEPS}]" in said
  assert [p.name for p in (workdir / "checkpoints.unreadable").iterdir()] == [str(STEPS)]
  assert_same_run(workdir, straight)


class SlowClient:
  """The coordination client's key-value calls, each taking `call_s`; peer 0 keeps pulsing."""

  def __init__(self, call_s: float):
    self.call_s, self.calls, self.inside = call_s, [], threading.Event()

  def key_value_set(self, key, value, allow_overwrite):
    self._call(("set", key, value, allow_overwrite))

  def key_value_try_get(self, key):
    self._call(("get", key))
    return str(len(self.calls))

  def _call(self, call):
    self.calls.append(call)
    self.inside.set()
    time.sleep(self.call_s)
    self.inside.clear()


def test_the_watchdog_is_stopped_outside_a_call_before_the_process_exits():
  """What the process runs at exit: the pulse thread ends between two calls into the client,
  never inside one (Python would end it there, and the process would abort after a good run),
  and makes no call after; it does not wait out its pulse interval."""
  client = SlowClient(call_s=0.3)
  stop = distributed.watch(client, me=1, count=2, timeout_s=60)
  assert client.inside.wait(5)
  asked = time.monotonic()
  stop()
  took = time.monotonic() - asked
  assert not client.inside.is_set() and took > 0.1, took  # it finished the call it was in
  assert not any(t.name == "mmjax-peers" for t in threading.enumerate())
  calls = len(client.calls)
  assert client.calls[:2] == [("set", "mmjax/pulse/1", "1", True), ("get", "mmjax/pulse/0")]
  time.sleep(1.5 * distributed.PULSE_S)
  assert len(client.calls) == calls
  # Stopped between two beats, it ends then, not a pulse interval later.
  stop = distributed.watch(SlowClient(call_s=0), me=1, count=2, timeout_s=60)
  time.sleep(0.1)
  asked = time.monotonic()
  stop()
  assert time.monotonic() - asked < distributed.PULSE_S / 2

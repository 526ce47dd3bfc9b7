"""A pod losing a host, played by two processes on this machine (jax.distributed on localhost):
one killed or stalled mid-run, one preempted (SIGTERM). Each case asserts the exit codes, how
soon every process stops (bounds below), the line it says, and that the same command resumes
to the same final parameters as a run that never stopped.
"""
import re
import signal
import time

import jax
import numpy as np
import pytest

import train_cli
from train_cli import final_params

TIMEOUT_S = 8  # config.distributed.heartbeat_timeout_s in these runs
# One learning-rate schedule for every run below, however many steps it was started for.
RUN = {"log_every": 10, "eval_every": 0, "checkpoint_every": 20, "optimizer.warmup_steps": 3,
       "optimizer.decay_steps": 60, "distributed.heartbeat_timeout_s": TIMEOUT_S}
STEPS = 60
LONG = 100_000  # a run that is still going when the fault comes


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Two processes, never interrupted: what every restarted run must end as."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  rows = train_cli.run_processes(workdir, "lm.py:tiny", {**RUN, "total_steps": STEPS})
  return workdir, rows


def assert_same_run(workdir, straight):
  straight_dir, straight_rows = straight
  rows = train_cli.read_metrics(workdir)
  assert rows[-1]["step"] == STEPS and rows[-1]["loss"] == straight_rows[-1]["loss"]
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(straight_dir))


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_lost_process_stops_the_other_in_one_line_and_the_run_resumes(tmp_path, straight,
                                                                        fault):
  workdir = tmp_path / "run"
  processes = train_cli.start_processes(workdir, "lm.py:tiny", {**RUN, "total_steps": LONG})
  train_cli.wait_for(workdir / "checkpoints" / "40" / "commit_success.txt")
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
  assert resumed_from >= 40
  if fault == "stall":  # noticed as a kill is; the restart below is the same
    return
  # The same command (with the run's planned length) on both processes: back to the same run.
  train_cli.run_processes(workdir, "lm.py:tiny", {**RUN, "total_steps": STEPS})
  assert f"resumed from checkpoint step {resumed_from}" in train_cli.stderr(workdir, 0)
  assert_same_run(workdir, straight)


def test_sigterm_on_one_process_stops_both_at_one_step_and_the_run_resumes(tmp_path, straight):
  workdir = tmp_path / "run"
  processes = train_cli.start_processes(workdir, "lm.py:tiny",
                                        {**RUN, "total_steps": LONG, "checkpoint_every": 1000})
  train_cli.wait_for(workdir / "metrics.jsonl")  # step 10 is done
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
  train_cli.run_processes(workdir, "lm.py:tiny", {**RUN, "total_steps": STEPS})
  assert_same_run(workdir, straight)

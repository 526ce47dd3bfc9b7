"""Several processes as one run: joining them, and saying in a line when they cannot or when
one of them is lost.

  distributed.join(config.distributed)   # first thing, before anything touches a device
  distributed.resume_from(lambda: ...)   # what a restart resumes from, once there is a workdir

With config.distributed.coordinator_address set, every process joins the
coordinator under its own process_id; on TPU VMs and SLURM or MPI jobs,
jax.distributed finds its settings itself.

A lost process (killed, its host gone, stalled) is noticed by every other one
within config.distributed.heartbeat_timeout_s: each process counts up a key of
its own in the coordination service's key-value store every second, and a
watchdog thread ends the process with one line naming the silent peer and the
newest complete checkpoint when a peer's count has not moved for that long.
JAX's own heartbeat check, which aborts from C++ with a stack trace, is set
HEARTBEAT_MARGIN_S later, so the line comes first.
"""
import atexit
from collections.abc import Callable
import logging
import os
import re
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed  # its private coordination client
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmjax import console

log = logging.getLogger(__name__)

# Clusters in which jax.distributed.initialize() finds its settings on its own (and TPU VMs).
CLUSTER_ENV_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
# jax's own join timeout aborts the process from C++ with a stack trace: the watchdog says it in
# a line this many seconds before jax would.
ABORT_MARGIN_S = 30
# The same for a peer lost mid-run: jax's heartbeat timeout is mmjax's plus this.
HEARTBEAT_MARGIN_S = 20
PULSE_S = 1.0  # how often each process counts up its key, and the watchdog reads the others'


def join(config: ml_collections.ConfigDict):
  """Starts jax.distributed where config.distributed or the cluster asks for several processes."""
  timeouts = dict(initialization_timeout=config.join_timeout_s + ABORT_MARGIN_S,
                  heartbeat_timeout_seconds=config.heartbeat_timeout_s + HEARTBEAT_MARGIN_S)
  if not config.coordinator_address:
    if any(os.environ.get(v) for v in CLUSTER_ENV_VARS) or console.on_a_tpu_vm():
      jax.distributed.initialize(**timeouts)
      _watch_peers(config)
    return
  if not 0 <= config.process_id < config.num_processes:
    raise ValueError(f"config.distributed.process_id={config.process_id} must be in "
                     f"0..{config.num_processes - 1} (config.distributed.num_processes)")
  log.info("process %d of %d: waiting up to %d s for all %d to join at %s", config.process_id,
           config.num_processes, config.join_timeout_s, config.num_processes,
           config.coordinator_address)
  watchdog = threading.Timer(config.join_timeout_s, _not_joined, args=(config,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id, **timeouts)
  finally:
    watchdog.cancel()
  _watch_peers(config)


def _not_joined(config: ml_collections.ConfigDict):
  print(f"error: not all {config.num_processes} processes joined {config.coordinator_address} "
        f"within {config.join_timeout_s} s (config.distributed.join_timeout_s): run the same "
        "command on every host, each with its own config.distributed.process_id",
        file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  # the main thread is blocked inside jax


def resume_from(point: Callable[[], str]):
  """What the line about a lost process says a restart resumes from (the trainer's workdir)."""
  global _resume_point
  _resume_point = point


def collective_failed(error: Exception):
  """A computation across processes failed (a peer's connection dropped): one line, exit 1.
  Exits at once: JAX's coordination agent is about to abort the process from C++."""
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  first = re.sub(r"(Error dispatching computation: )+", "", first)[:160]
  try:  # the coordinator answers: another process is lost, and the watchdog will name it
    jax_distributed.global_state.client.key_value_try_get(f"mmjax/pulse/{jax.process_index()}")
    time.sleep(_watch_timeout_s + 2 * PULSE_S)  # it exits the process with its line first
    who = "a process is most likely lost"
  except Exception:  # pylint: disable=broad-except
    who = f"process 0 of {jax.process_count()} (the coordinator) is lost"
  _stop(f"error: a computation across the {jax.process_count()} processes failed, {who} "
        f"({first}); {_resume_point()}")


def processes_without(ok: bool) -> list[int]:
  """Every process says whether something went well for it -> those for which it did not."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  oks = np.asarray(multihost_utils.process_allgather(np.array(ok))).reshape(-1)
  return [i for i, each in enumerate(oks) if not each]


def wait_for_everyone(name: str):
  """Returns once every process has reached the same call (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def preemption_synced() -> bool:
  """Whether JAX's preemption service runs (several processes joined): it takes SIGTERM and
  agrees on a step at which every process stops (multihost_utils.reached_preemption_sync_point)."""
  return (jax.process_count() > 1
          and jax_distributed.global_state.preemption_sync_manager is not None)


def _watch_peers(config: ml_collections.ConfigDict):
  """Starts this process's pulse and the watchdog over the others' (several processes only)."""
  if jax.process_count() == 1:
    return
  client = jax_distributed.global_state.client  # key-value store
  global _watch_timeout_s
  _watch_timeout_s = config.heartbeat_timeout_s
  atexit.register(watch(client, jax.process_index(), jax.process_count(),
                        config.heartbeat_timeout_s))


def watch(client, me: int, count: int, timeout_s: float) -> Callable[[], None]:
  """Starts the pulse-and-watchdog thread; returns what stops it and waits for it to end.

  A process must stop it before it exits: Python ends daemon threads at exit wherever they are,
  and one ended inside a call into the coordination client aborts the process ("FATAL: exception
  not rethrown") after the run has ended well."""
  stopping = threading.Event()
  thread = threading.Thread(target=_pulse_and_watch, daemon=True, name="mmjax-peers",
                            args=(client, me, count, timeout_s, stopping))
  thread.start()

  def stop():
    stopping.set()
    thread.join(timeout=5 * PULSE_S)  # a call that hangs (its coordinator gone) does not hang exit
  return stop


def _pulse_and_watch(client, me: int, count: int, timeout_s: float,
                     stopping: threading.Event):
  # peer -> (its last count, when it last moved, by this process's clock); None: no pulse yet
  seen = {peer: (None, time.monotonic()) for peer in range(count) if peer != me}
  beat = 0
  while not stopping.is_set():
    beat += 1
    try:
      client.key_value_set(f"mmjax/pulse/{me}", str(beat), allow_overwrite=True)
      counts = {peer: _read(client, f"mmjax/pulse/{peer}") for peer in range(count) if peer != me}
    except Exception as e:  # pylint: disable=broad-except  # the coordinator itself is gone
      if me != 0 and not stopping.is_set():
        _lost(0, count, f"(the coordinator) stopped answering ({type(e).__name__})")
      counts = {}
    now = time.monotonic()
    for peer, value in counts.items():
      if seen[peer][0] != value:
        seen[peer] = (value, now)
      elif now - seen[peer][1] > timeout_s:
        _lost(peer, count, f"sent no pulse for {timeout_s:g} s (killed, its host lost, or "
              "stalled)")
    stopping.wait(PULSE_S)


def _read(client, key: str) -> str | None:
  """A key's value, or None before its process has set it."""
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e):
      return None
    raise


def _lost(peer: int, count: int, what: str):
  _stop(f"error: process {peer} of {count} {what}: stopping this one too; {_resume_point()}")


def _stop(line: str):
  print(line, file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  # the main thread may be blocked in a collective


def _no_workdir_yet() -> str:
  return "no checkpoint was written by this run yet"


_resume_point: Callable[[], str] = _no_workdir_yet
_watch_timeout_s = 0.0  # the watchdog's, once it runs

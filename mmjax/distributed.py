"""Several processes as one run: joining them, and saying in a line when they cannot.

  distributed.join(config.distributed)   # first thing, before anything touches a device

With config.distributed.coordinator_address set, every process joins the
coordinator under its own process_id; on TPU VMs and SLURM or MPI jobs,
jax.distributed finds its settings itself.
"""
import logging
import os
import sys
import threading

import jax
import ml_collections

from mmjax import console

log = logging.getLogger(__name__)

# Clusters in which jax.distributed.initialize() finds its settings on its own (and TPU VMs).
CLUSTER_ENV_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
# jax's own join timeout aborts the process from C++ with a stack trace: the watchdog says it in
# a line this many seconds before jax would.
ABORT_MARGIN_S = 30


def join(config: ml_collections.ConfigDict):
  """Starts jax.distributed where config.distributed or the cluster asks for several processes."""
  timeouts = dict(initialization_timeout=config.join_timeout_s + ABORT_MARGIN_S,
                  heartbeat_timeout_seconds=config.heartbeat_timeout_s)
  if not config.coordinator_address:
    if any(os.environ.get(v) for v in CLUSTER_ENV_VARS) or console.on_a_tpu_vm():
      jax.distributed.initialize(**timeouts)
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


def _not_joined(config: ml_collections.ConfigDict):
  print(f"error: not all {config.num_processes} processes joined {config.coordinator_address} "
        f"within {config.join_timeout_s} s (config.distributed.join_timeout_s): run the same "
        "command on every host, each with its own config.distributed.process_id",
        file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  # the main thread is blocked inside jax

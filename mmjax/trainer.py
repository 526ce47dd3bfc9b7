"""train_and_evaluate(config, workdir): the training loop, top to bottom.

  1. validate the config, before anything compiles
  2. setup: mesh, rules, model, shardings, optimizer, the jitted steps (mmjax/steps.py)
  3. this process's data
  4. restore the newest complete checkpoint, else create the state directly sharded
  5. compile the steps
  6. the loop: step (the next batch read meanwhile), log, evaluate, checkpoint, stop cleanly on
     SIGTERM
"""
import concurrent.futures
import logging
import os
import re
import signal
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmjax import checkpoint
from mmjax import console
from mmjax import distributed
from mmjax import dry_run
from mmjax import evaluate
from mmjax import lora
from mmjax import metrics
from mmjax import optim
from mmjax import sharding
from mmjax import steps
from mmjax import towers
from mmjax.data import images as image_codec
from mmjax.data import sources
from mmjax.models import deep_fusion

log = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "stop")


# The loop's numeric keys with a domain (steps.BOUNDS has those of the model and data).
BOUNDS = {"total_steps": ">= 1", "log_every": ">= 1", "eval_every": ">= 0", "eval_steps": ">= 1",
          "checkpoint_every": ">= 0", "checkpoint.max_to_keep": ">= 1",
          "checkpoint.keep_every": ">= 0"}


def validate(config: ml_collections.ConfigDict, num_devices: int):
  """One-line errors naming the config key, raised before anything compiles: the loop's keys
  (validate_loop) and everything steps.setup builds."""
  validate_loop(config)
  steps.validate(towers.resolve(config), num_devices, jax.process_count())


def validate_loop(config: ml_collections.ConfigDict):
  """The loop's own keys: steps, logging, evaluation, checkpoints, the NaN policy."""
  steps.check_bounds(config, BOUNDS)
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  if config.eval_every % config.log_every:
    raise ValueError(f"config.eval_every={config.eval_every} must be a multiple of "
                     f"config.log_every={config.log_every}: evaluation is logged with training")


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a request to checkpoint and stop, agreed by every
  process. A second Ctrl-C stops at once (KeyboardInterrupt).

  With several processes JAX's preemption service takes SIGTERM (a maintenance event on one
  host) and the processes agree, through the coordination service, on the next step at which
  all of them save and stop; Ctrl-C is agreed at logging steps.
  """

  NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

  def __init__(self):
    self.received = None  # the first signal's name
    self.synced = distributed.preemption_synced()
    # Only the flag is set here: an exception raised at an arbitrary point (inside a callback
    # from XLA, say) can be swallowed there, and the run would go on.
    self.previous = {s: signal.signal(s, self._handle) for s in self.NAMES
                     if not (self.synced and s == signal.SIGTERM)}  # restored on exit

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == "Ctrl-C":
      raise KeyboardInterrupt
    if self.received is None:
      self.received = self.NAMES[signum]
      log.warning("%s: saving a checkpoint after this step, then stopping%s", self.received,
                  " (Ctrl-C again: stop now)" if signum == signal.SIGINT else "")

  def should_stop(self, step: int, sync: bool) -> bool:
    """With several processes the Ctrl-C flags are combined only when `sync` (a logging step);
    a SIGTERM anywhere stops every process at the step the preemption service agrees on."""
    if jax.process_count() == 1:
      return self.received is not None
    if self.synced and multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or "SIGTERM"
      return True
    if not sync:
      return False
    return bool(distributed.processes_without(self.received is None))  # any signalled

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for number, handler in self.previous.items():
      signal.signal(number, handler)


def check_workdir(workdir: str):
  """A one-line error for a workdir that is a file or cannot be written; nothing is created."""
  if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", workdir):  # else it would be a local folder "gs:"
    raise ValueError(f"--workdir {workdir}: mmjax writes its workdir with local file operations "
                     "(metrics, the checkpoints' steps); mount the bucket (gcsfuse) or use a file "
                     "system every host shares, and give its path")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir}: {existing} cannot be written")


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data for config.total_steps; returns the last metrics."""
  # 0. From here on SIGTERM and Ctrl-C mean: checkpoint after the current step and stop.
  with Preemption() as preemption:
    # 1. Config errors surface here and in setup, before any compilation; nothing is written.
    check_workdir(workdir)
    validate_loop(config)
    initial = (checkpoint.params_location(config.init_from, "config.init_from")
               if config.init_from else None)

    # 2. Model, mesh, shardings, optimizer and the jitted steps: the same for every entry point.
    # From here on the config holds what its pretrained towers decide (their shapes, tokenizer).
    run = steps.setup(config)
    config, mesh = run.config, run.mesh

    # 3. This process's rows of every global batch.
    train_data = sources.build(config, "train")
    eval_data = sources.build(config, "validation")
    if config.family == "vit" and config.model.num_classes < train_data.num_classes:
      raise ValueError(f"config.model.num_classes={config.model.num_classes} is smaller than "
                       f"the {train_data.num_classes} classes of {train_data!r}")

    # 4. Restore the newest complete checkpoint, else create the state directly sharded.
    checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                           keep_every=config.checkpoint.keep_every,
                                           async_save=config.checkpoint.async_save)
    # A lost process ends every other one with a line saying where a restart resumes.
    distributed.resume_from(checkpointer.resume_point)
    restored = checkpointer.restore_latest(run.abstract_state)
    if restored:
      state, data_state, start = restored
      log.info("resumed from checkpoint step %d", start)
      planned = checkpointer.saved_config(start).get("total_steps")
      if planned != config.total_steps and start < config.total_steps:
        log.warning("checkpoint step %d was saved by a run of %s steps, this one runs %d: "
                    "learning rate %s, %.3g at step %d", start, planned, config.total_steps,
                    optim.describe_schedule(config.optimizer, config.total_steps),
                    optim.schedule(config.optimizer, config.total_steps)(start), start + 1)
    else:
      state = run.init(jax.random.key(config.seed))
      if initial:  # pretrained weights: tools/import_hf.py's output, or another run's workdir
        # (With LoRA the checkpoint holds the base model: the fresh factors stay.)
        # (Saved with its LM scanned and trained unscanned, or the reverse: restacked.)
        saved, params_dir, subtree, _ = initial
        state["params"] = lora.overlay(state["params"], checkpoint.load_model_params(
            params_dir, lora.base(run.abstract_state["params"]), subtree, config.family,
            saved["model"] if saved["family"] == config.family else config.model.to_dict(),
            config.model.to_dict(), mesh, run.rules))
        log.info("initialised the parameters from %s", config.init_from)
      pretrained = towers.load(config, lora.base(run.abstract_state["params"])) if config.get(
          "towers") else {}
      if pretrained:  # the towers' weights over the fresh ones, sharded as the state is
        state["params"] = lora.overlay(state["params"], pretrained)
        log.info("initialised %s from %s", " and ".join(sorted(pretrained)),
                 ", ".join(d for d in config.towers.values() if d))
      elif lora.settings(config.optimizer) and not initial:
        log.warning("LoRA over a randomly initialised model: its base stays random (start "
                    "from pretrained weights with config.init_from or config.towers)")
      data_state, start = {"next_step": 1}, 0
    if start >= config.total_steps:
      log.warning("checkpoint step %d is at or past config.total_steps=%d: nothing to train "
                  "(a larger --config.total_steps goes on from there)", start, config.total_steps)

    # 5. Compile both steps once, for the global batch's shapes.
    tic = time.perf_counter()
    compiled_step, compiled_eval = run.compile()
    compile_seconds = time.perf_counter() - tic
    log.info("compiled the train step in %.0f s: %s", compile_seconds,
                 dry_run.describe(dry_run.memory(compiled_step)))
    # Generated answers, scored, where the data has prompts to answer (image-text sources).
    generative = None
    if config.eval_every and eval_data.example_types:
      generative = evaluate.Generative(run.model, eval_data, mesh, run.rules, run.params_sharding,
                                       num_batches=config.eval_steps, merge=run.merge)
    # MaxText's count of the model's FLOPs (XLA's cost analysis counts a loop body once).
    flops = metrics.model_flops(config.family, run.model, run.abstract_state["params"],
                                run.abstract_batch, run.frozen) / jax.device_count()
    dtype = config.model.get("dtype", "float32")
    peak = metrics.peak_tflops(jax.devices()[0], dtype)
    # Every slot of the batch, padding included; "items" counts what the loss was on.
    slots_per_step = (config.batch_size if config.family == "vit"
                      else np.prod(run.abstract_batch["tokens"].shape))
    schedule = optim.schedule(config.optimizer, config.total_steps)
    _, decay = optim.plan(config.optimizer, config.total_steps)
    if config.optimizer.schedule != "constant" and decay < config.total_steps:
      log.warning("config.optimizer.decay_steps=%d ends before config.total_steps=%d: steps "
                  "%d-%d train at learning rate 0 (unset it to decay over the whole run)",
                  decay, config.total_steps, decay + 1, config.total_steps)
    # Deep fusion logs how far its tanh gates have opened (tools/plot.py draws them).
    gates = jax.jit(deep_fusion.gate_values) if config.family == "deep_fusion" else None

    # 6. The loop. Host syncs (float(), device_get) happen on logging steps only.
    writer = metrics.Writer(workdir, after_step=start)
    progress = console.Progress(config.total_steps, start,
                                "images" if config.family == "vit" else "tokens",
                                enabled=jax.process_index() == 0)
    config_json = config.to_dict()
    last, tic, steps_since, items = {}, time.perf_counter(), 0, 0.0
    step, saved, stopped_by = start, start if restored else None, None
    # The next batch is read on a thread while the device runs this step (batches are a pure
    # function of the step, so reading ahead changes nothing).
    prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
    upcoming = prefetcher.submit(train_data.batch, data_state["next_step"])
    try:
      for step in range(start + 1, config.total_steps + 1):
        local_batch = upcoming.result()
        if step == start + 1:  # the steps were compiled for batch_spec, not for this batch
          sources.check_batch(train_data, local_batch, run.abstract_batch)
        upcoming = prefetcher.submit(train_data.batch, data_state["next_step"] + 1)
        batch = sharding.global_batch(local_batch, mesh)
        data_state = {"next_step": data_state["next_step"] + 1}
        state, step_metrics = compiled_step(state, batch)
        steps_since += 1
        progress.step()
        items = items + step_metrics.pop("items")  # on the device: no sync until logged
        log_now = step % config.log_every == 0 or step == config.total_steps
        if log_now:
          scalars = {k: float(v) for k, v in step_metrics.items()}
          seconds = (time.perf_counter() - tic) / steps_since
          scalars.update(
              learning_rate=float(schedule(step - 1)), steps_per_sec=1.0 / seconds,
              items_per_sec=float(items) / steps_since / seconds,
              padded_items_per_sec=slots_per_step / seconds, skipped_steps=int(state["skipped"]))
          if gates:
            scalars.update({k: float(v) for k, v in gates(state["params"]).items()})
          scalars["tflops_per_device"] = flops / seconds / 1e12
          if peak:  # against the peak at the compute dtype, where it is known
            scalars["mfu"] = scalars["tflops_per_device"] / peak
          if not last:  # the first row of this run
            scalars["compile_seconds"] = compile_seconds
          if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
            scalars.update(eval_losses(compiled_eval, state["params"], eval_data,
                                       config.eval_steps, mesh))
            if generative:
              scores, samples = generative(state["params"])
              scalars.update(scores)
              writer.write_samples(step, samples)
          _check_finite(state, config.nan_policy)
          checkpointer.check()  # a save that failed in the background stops the run here
          writer.write(step, scalars)
          progress.log(step, scalars)
          last, tic, steps_since, items = scalars, time.perf_counter(), 0, 0.0
        preempted = preemption.should_stop(step, sync=log_now)
        if ((config.checkpoint_every and step % config.checkpoint_every == 0)
            or step == config.total_steps or preempted):
          _check_finite(state, config.nan_policy)
          checkpointer.save(step, state, data_state, config_json)
          saved = step
        if preempted:
          stopped_by = preemption.received or "another process's signal"
          log.warning("stopped at step %d after %s; checkpoint saved, the same command resumes "
                      "there", step, stopped_by)
          break
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() > 1:  # a peer's connection dropped mid-collective
        distributed.collective_failed(e)
      raise
    finally:
      prefetcher.shutdown(cancel_futures=True)
      progress.close()
      writer.close()
      checkpointer.close()
    example = write_example(generative, workdir) if generative else None
    return {**last, "example": example, "step": step, "total_steps": config.total_steps,
            "compile_seconds": compile_seconds, "checkpoint_step": saved,
            "stopped_by": stopped_by}


def write_example(generative: evaluate.Generative, workdir: str) -> dict[str, str] | None:
  """A held-out image as WORKDIR/example.png, and its question: what the closing summary's
  generate command asks the trained model. Process 0 writes it; the others return None, as
  does a first held-out batch without images."""
  found = generative.example() if jax.process_index() == 0 else None
  if found is None:
    return None
  image, question = found
  path = os.path.join(workdir, "example.png")
  with open(path, "wb") as f:
    f.write(image_codec.to_png(image))
  return {"image": path, "prompt": question}


def eval_losses(eval_step, params, data, num_batches: int, mesh) -> dict:
  totals, classification = np.zeros(3), False
  for i in range(num_batches):
    batch = data.batch(i)
    classification = "labels" in batch
    totals += np.array(jax.device_get(eval_step(params, sharding.global_batch(batch, mesh))))
  return evaluate.loss_scores(totals, classification)


def _check_finite(state, policy: str):
  if policy == "stop" and int(state["skipped"]):
    raise FloatingPointError(f"non-finite loss or gradients at step {int(state['first_bad_step'])} "
                             "(config.nan_policy='stop'); the update was not applied or saved")

"""train_and_evaluate(config, workdir): the training loop, top to bottom.

  1. validate the config, before anything compiles
  2. mesh and logical-axis rules
  3. model, optimizer and this process's data
  4. eval_shape -> parameter and optimizer-state shardings
  5. jit(init, out_shardings): the state is born sharded, no host holds it whole
  6. restore the newest complete checkpoint, if any
  7. jit(train_step) with explicit shardings and donated state
  8. the loop: step (the next batch read meanwhile), log, evaluate, checkpoint, stop cleanly on
     SIGTERM
"""
import concurrent.futures
import functools
import os
import signal
import time

from absl import logging
from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import checkpoint
from mmjax import evaluate
from mmjax import metrics
from mmjax import optim
from mmjax import sharding
from mmjax.data import synthetic
from mmjax.models import deep_fusion
from mmjax.models import early_fusion
from mmjax.models import lm
from mmjax.models import vit

MODELS = {"lm": lm.Model, "vit": vit.Model, "early_fusion": early_fusion.Model,
          "deep_fusion": deep_fusion.Model}
# Batch keys passed to the model as keyword arguments when present.
MODEL_KWARGS = ("positions", "segment_ids", "prefix_len")
NAN_POLICIES = ("skip", "stop")
# The data sources (config.data.name) that feed each model family.
FAMILY_DATA = {"lm": ("arithmetic", "text", "tfds"),
               "vit": ("shape_classes", "image_folder", "tfds"),
               "early_fusion": ("shapes", "tfds_scenes", "llava", "coco_captions"),
               "deep_fusion": ("shapes", "tfds_scenes", "llava", "coco_captions")}
DATA_NAMES = tuple(dict.fromkeys(n for names in FAMILY_DATA.values() for n in names))
REQUIRED_DATA_KEYS = {"llava": ("json", "image_dir", "seq_len"),
                      "coco_captions": ("json", "image_dir", "seq_len"),
                      "image_folder": ("image_dir",), "text": ("files", "seq_len"),
                      "tfds": ("tfds_name",)}


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.family not in MODELS:
    raise ValueError(f"config.family must be one of {sorted(MODELS)}, got {config.family!r}")
  return MODELS[config.family](**config.model.to_dict())


def build_data(config: ml_collections.ConfigDict, split: str = "train"):
  """This process's share of the global batch, from config.data."""
  data = config.data
  common = dict(seed=config.seed, split=split, process_index=jax.process_index(),
                process_count=jax.process_count())
  if "image_mean" in data:
    common.update(image_mean=data.image_mean, image_std=data.image_std)
  if data.name not in DATA_NAMES:
    raise ValueError(f"config.data.name must be one of {DATA_NAMES}, got {data.name!r}")
  if data.name == "arithmetic":
    return synthetic.ArithmeticText(config.batch_size, data.seq_len, **common)
  if data.name == "shapes":
    return synthetic.ShapeScenes(config.batch_size, data.seq_len, data.image_size,
                                 data.image_tokens, task=data.task, max_shapes=data.max_shapes,
                                 image_token_id=config.model.image_token_id, **common)
  if data.name == "shape_classes":
    return synthetic.ShapeClasses(config.batch_size, data.image_size, **common)
  # Imported here: only these sources need tfds and grain (the GPU benchmark image has neither).
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  if data.name == "tfds_scenes":
    return pipeline.TfdsScenes(config.batch_size, data.seq_len, data.image_size,
                               data.image_tokens, task=data.task, max_shapes=data.max_shapes,
                               data_dir=data.data_dir, train_size=data.train_size,
                               eval_size=data.eval_size,
                               image_token_id=config.model.image_token_id, **common)
  tokens = dict(tokenizer=data.get("tokenizer", "bytes"), pack=data.get("pack", 1))
  resize = dict(resize=data.get("resize", "bilinear"))
  if data.name in ("llava", "coco_captions"):
    source = {"llava": pipeline.LlavaConversations, "coco_captions": pipeline.CocoCaptions}
    images = dict(max_images=data.max_images) if data.name == "llava" else {}
    return source[data.name](
        config.batch_size, data.seq_len, json_path=data.json, image_dir=data.image_dir,
        image_size=data.image_size, image_tokens=data.image_tokens,
        image_token_id=config.model.image_token_id, data_dir=data.data_dir, **images, **tokens,
        **resize, **common)
  if data.name == "image_folder":
    records, order, num_classes = pipeline.image_folder(data.image_dir, split, config.seed,
                                                        data.data_dir)
    return pipeline.ImageClasses(config.batch_size, data.image_size, records, order,
                                 num_classes, **resize, **common)
  if data.name == "text":
    records, order = pipeline.text_files(data.files, data.text_key, split, config.seed,
                                         data.data_dir)
    return pipeline.Documents(config.batch_size, data.seq_len, records, order,
                              text_key="text", **tokens, **common)
  # "tfds": a prepared tfds dataset by name; its images and labels for a ViT, else its text.
  builder, splits = pipeline.named_builder(data.tfds_name, data.data_dir)
  records, order = pipeline.open_split(builder, splits[split], config.seed, prepare=False)
  if config.family == "vit":
    return pipeline.ImageClasses(config.batch_size, data.image_size, records, order,
                                 builder.info.features[data.label_key].num_classes,
                                 image_key=data.image_key, label_key=data.label_key, **resize,
                                 **common)
  return pipeline.Documents(config.batch_size, data.seq_len, records, order,
                            text_key=data.text_key, **tokens, **common)


def init_inputs(batch: dict) -> tuple:
  """The positional model inputs of a batch: (images,) or (tokens,) or (tokens, images)."""
  if "labels" in batch:
    return (batch["images"],)
  return (batch["tokens"], *((batch["images"],) if "images" in batch else ()))


def loss_terms(model: nn.Module, params, batch: dict):
  """-> (summed loss, weight count, summed correct) for any family's batch.

  Sums, not means: accumulated over microbatches or devices and divided once,
  they give the full-batch mean however the batch is split.
  """
  if "labels" in batch:  # image classification: images float[B, H, W, 3], labels int[B]
    logits, _ = model.apply({"params": params}, batch["images"])
    targets, weights = batch["labels"], jnp.ones(batch["labels"].shape, jnp.float32)
  else:  # next-token prediction: tokens, targets, loss_weights int/float[B, T] (+ images)
    images = (batch["images"],) if "images" in batch else ()
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    logits, _ = model.apply({"params": params}, batch["tokens"], *images, **kwargs)
    targets, weights = batch["targets"], batch["loss_weights"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct)


def validate(config: ml_collections.ConfigDict, num_devices: int):
  """One-line errors naming the config key, raised before anything compiles."""
  towers = {"model": build_model(config)}
  if config.family in ("early_fusion", "deep_fusion"):
    towers = {"model.vit": vit.Model(**config.model.vit.to_dict()),
              "model.lm": lm.Model(**config.model.lm.to_dict())}
  for key, tower in towers.items():
    if not getattr(tower, "head_dim", None) and tower.width % tower.num_heads:
      raise ValueError(f"config.{key}.num_heads={tower.num_heads} does not divide "
                       f"config.{key}.width={tower.width}")
    kv_heads = getattr(tower, "num_kv_heads", None)
    if kv_heads and tower.num_heads % kv_heads:
      raise ValueError(f"config.{key}.num_kv_heads={kv_heads} does not divide "
                       f"config.{key}.num_heads={tower.num_heads}")
  data = config.data
  if data.name not in FAMILY_DATA[config.family]:
    raise ValueError(f"config.data.name={data.name!r} does not feed a {config.family} model; "
                     f"use one of {FAMILY_DATA[config.family]}")
  for key in REQUIRED_DATA_KEYS.get(data.name, ()):
    if not data.get(key):
      raise ValueError(f"config.data.{key} must be set for config.data.name={data.name!r}")
  if data.get("pack", 1) > 1 and data.name not in ("llava", "coco_captions", "text", "tfds"):
    raise ValueError(f"config.data.pack={data.pack} packs only llava, coco_captions, text and "
                     f"tfds text, not {data.name!r}")
  if config.family != "vit":
    lm_fields = config.model if config.family == "lm" else config.model.lm
    vocab = lm.Model(**lm_fields.to_dict()).vocab_size
    tokenizer = synthetic.tokenizers.load(data.get("tokenizer", "bytes"))
    if vocab < tokenizer.vocab_size:
      key = "config.model.vocab_size" if config.family == "lm" else "config.model.lm.vocab_size"
      raise ValueError(f"{key}={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
                       f"ids ({tokenizer!r}, config.data.name={data.name!r})")
  data_size, fsdp_size, _ = sharding.mesh_shape(config.mesh.shape, num_devices)
  sharding.rules(config.mesh.rules)
  parallel = data_size * fsdp_size
  if config.microbatches < 1 or config.batch_size % config.microbatches:
    raise ValueError(f"config.microbatches={config.microbatches} must be >= 1 and divide "
                     f"config.batch_size={config.batch_size}")
  microbatch = config.batch_size // config.microbatches
  if microbatch % parallel:
    raise ValueError(f"config.batch_size={config.batch_size} (microbatches of {microbatch}) is "
                     f"not divisible by the data-parallel size {parallel} (mesh data x fsdp)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {optim.OPTIMIZERS}, "
                     f"got {config.optimizer.name!r}")
  if config.optimizer.schedule not in optim.SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {optim.SCHEDULES}, "
                     f"got {config.optimizer.schedule!r}")
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  if config.eval_every % config.log_every:
    raise ValueError(f"config.eval_every={config.eval_every} must be a multiple of "
                     f"config.log_every={config.log_every}: evaluation is logged with training")
  if config.total_steps < 1:
    raise ValueError(f"config.total_steps must be >= 1, got {config.total_steps}")


class Preemption:
  """Turns SIGTERM into a request to checkpoint and stop, agreed by every process."""

  def __init__(self):
    self.requested = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)  # restored on __exit__

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def should_stop(self, sync: bool) -> bool:
    """With several processes the flags are combined, only when `sync` (a logging step)."""
    if jax.process_count() == 1:
      return self.requested
    if not sync:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self.previous)


def new_state(model: nn.Module, optimizer, inputs: tuple, rng: jax.Array) -> dict:
  """The train state: fresh parameters, their optimizer state, the step and the NaN counters."""
  params = nn.unbox(model.init(rng, *inputs)["params"])
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


# ----------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------


def make_train_step(model, optimizer, *, microbatches: int):
  """(state, batch) -> (state, metrics); a non-finite update is skipped and counted."""

  def grads_and_terms(params, batch):
    def loss_sum(params):
      total, count, correct = loss_terms(model, params, batch)
      return total, (count, correct)
    (total, (count, correct)), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
    return grads, total, count, correct

  def train_step(state, batch):
    params = state["params"]
    if microbatches == 1:
      grads, total, count, correct = grads_and_terms(params, batch)
    else:
      # Microbatch m takes rows m, m + M, m + 2M, ...: every microbatch stays spread over all
      # devices, where contiguous slices would each sit on a few of them.
      split = jax.tree.map(lambda x: x.reshape(x.shape[0] // microbatches, microbatches,
                                               *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, microbatch):
        out = grads_and_terms(params, microbatch)
        return jax.tree.map(jnp.add, carry, out), None

      zeros = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0, 0.0)
      (grads, total, count, correct), _ = jax.lax.scan(accumulate, zeros, split)
    # Normalise once by the whole batch's weight: the same update however it was split.
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = total / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(ok, new, old)
    step = state["step"] + 1
    new_state = {
        "params": jax.tree.map(keep, new_params, params),
        "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
        "step": step,
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        "first_bad_step": jnp.where(~ok & (state["first_bad_step"] < 0), step,
                                    state["first_bad_step"]),
    }
    return new_state, {"loss": loss, "accuracy": correct / count, "grad_norm": grad_norm}

  return train_step


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data for config.total_steps; returns the last metrics."""
  # 0. From here on SIGTERM means: checkpoint after the current step and stop.
  with Preemption() as preemption:
    # 1. Config errors surface here, before any compilation.
    validate(config, jax.device_count())

    # 2. Mesh and logical-axis rules: the model's axis names -> mesh axes.
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.rules(config.mesh.rules)

    # 3. Model, this process's data, optimizer.
    model = build_model(config)
    train_data = build_data(config, "train")
    eval_data = build_data(config, "validation")
    if config.family == "vit" and config.model.num_classes < train_data.num_classes:
      raise ValueError(f"config.model.num_classes={config.model.num_classes} is smaller than "
                       f"the {train_data.num_classes} classes of {train_data!r}")
    example = jax.tree.map(lambda x: x[:1], train_data.batch(0))
    inputs = init_inputs(example)

    # 4. Abstract init: shapes and logical axes, no memory. (No rules in scope during init:
    # flax's DenseGeneral would constrain its flat pre-reshape kernel with the 3-d axis names.)
    abstract_boxed = jax.eval_shape(functools.partial(model.init, jax.random.key(config.seed)),
                                    *inputs)["params"]
    params_sharding = sharding.param_shardings(abstract_boxed, mesh, rules)
    optimizer = optim.make_optimizer(config.optimizer, nn.unbox(abstract_boxed))

    init_state = functools.partial(new_state, model, optimizer, inputs)
    abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_sharding = sharding.state_shardings(abstract_state, params_sharding, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # 5 + 6. Restore the newest complete checkpoint, else create the state directly sharded.
    checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                           keep_every=config.checkpoint.keep_every,
                                           async_save=config.checkpoint.async_save)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sharding)
    restored = checkpointer.restore_latest(target)
    if restored:
      state, data_state, start = restored
      logging.info("resumed from checkpoint step %d", start)
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
      if config.init_from:  # pretrained weights, e.g. from tools/import_hf.py
        state["params"] = checkpoint.load_params(os.path.join(config.init_from, "params"),
                                                 target["params"])
        logging.info("initialised the parameters from %s", config.init_from)
      data_state, start = {"next_step": 1}, 0

    # 7. The step: explicit shardings; the old state's buffers are donated to the new one.
    train_step = jax.jit(make_train_step(model, optimizer, microbatches=config.microbatches),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0)
    eval_step = jax.jit(functools.partial(loss_terms, model),
                        in_shardings=(params_sharding, batch_sharding))
    abstract_batch = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype,
                                              sharding=batch_sharding) for k, v in example.items()}
    tic = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # activation constraints need both
      compiled_step = train_step.lower(state, abstract_batch).compile()
      compiled_eval = eval_step.lower(state["params"], abstract_batch).compile()
    compile_seconds = time.perf_counter() - tic
    # Generated answers, scored, where the data has prompts to answer (image-text sources).
    generative = None
    if config.eval_every and hasattr(eval_data, "examples"):
      generative = evaluate.Generative(model, eval_data, mesh, rules, params_sharding,
                                       num_batches=config.eval_steps)
    flops = _flops_per_device(compiled_step)
    peak = metrics.peak_tflops(jax.devices()[0])
    items_per_step = np.prod(abstract_batch["labels" if "labels" in example else "tokens"].shape)
    schedule = optim.schedule(config.optimizer)
    # Deep fusion logs how far its tanh gates have opened (tools/plot.py draws them).
    gates = jax.jit(deep_fusion.gate_values) if config.family == "deep_fusion" else None

    # 8. The loop. Host syncs (float(), device_get) happen on logging steps only.
    writer = metrics.Writer(workdir, config.total_steps)
    config_json = config.to_dict()
    last, tic, steps_since = {}, time.perf_counter(), 0
    step = start
    # The next batch is read on a thread while the device runs this step (batches are a pure
    # function of the step, so reading ahead changes nothing).
    prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
    upcoming = prefetcher.submit(train_data.batch, data_state["next_step"])
    try:
      for step in range(start + 1, config.total_steps + 1):
        local_batch = upcoming.result()
        upcoming = prefetcher.submit(train_data.batch, data_state["next_step"] + 1)
        batch = sharding.global_batch(local_batch, mesh)
        data_state = {"next_step": data_state["next_step"] + 1}
        state, step_metrics = compiled_step(state, batch)
        steps_since += 1
        log_now = step % config.log_every == 0 or step == config.total_steps
        if log_now:
          scalars = {k: float(v) for k, v in step_metrics.items()}
          seconds = (time.perf_counter() - tic) / steps_since
          scalars.update(
              learning_rate=float(schedule(step - 1)), steps_per_sec=1.0 / seconds,
              items_per_sec=items_per_step / seconds, skipped_steps=int(state["skipped"]))
          if gates:
            scalars.update({k: float(v) for k, v in gates(state["params"]).items()})
          if flops:
            scalars["tflops_per_device"] = flops / seconds / 1e12
            if peak:
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
          writer.write(step, scalars)
          last, tic, steps_since = scalars, time.perf_counter(), 0
        preempted = preemption.should_stop(sync=log_now)
        if ((config.checkpoint_every and step % config.checkpoint_every == 0)
            or step == config.total_steps or preempted):
          _check_finite(state, config.nan_policy)
          checkpointer.save(step, state, data_state, config_json)
        if preempted:
          logging.warning("stopped at step %d after SIGTERM; rerun the command to resume", step)
          break
    finally:
      prefetcher.shutdown(cancel_futures=True)
      writer.close()
      checkpointer.close()
    return {"step": step, **last}


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


def _flops_per_device(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) or None
  except Exception:  # pylint: disable=broad-except
    return None  # some backends report no cost analysis

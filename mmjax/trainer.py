"""train_and_evaluate(config, workdir): the training loop.

This version trains on one device from the in-memory synthetic sources:
model -> data -> optimizer -> jit(init) -> jitted step with donated state ->
loop -> metrics.jsonl. Meshes, checkpoints and tfds data plug in here.
"""
import json
import os
import time

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax import optim
from mmjax.data import synthetic
from mmjax.models import deep_fusion
from mmjax.models import early_fusion
from mmjax.models import lm

MODELS = {"lm": lm.Model, "early_fusion": early_fusion.Model, "deep_fusion": deep_fusion.Model}
# Batch keys passed to the model as keyword arguments when present.
MODEL_KWARGS = ("positions", "segment_ids", "prefix_len")


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.family not in MODELS:
    raise ValueError(f"family must be one of {sorted(MODELS)}, got {config.family!r}")
  return MODELS[config.family](**config.model.to_dict())


def build_data(config: ml_collections.ConfigDict):
  data = config.data
  if data.name == "arithmetic":
    return synthetic.ArithmeticText(config.batch_size, data.seq_len, config.seed)
  if data.name == "shapes":
    return synthetic.ShapeCaptions(config.batch_size, data.seq_len, data.image_size,
                                   data.image_tokens, config.seed)
  raise ValueError(f"data.name must be 'arithmetic' or 'shapes', got {data.name!r}")


def apply_model(model: nn.Module, params, batch: dict) -> tuple[jax.Array, dict]:
  """Runs any model family on a batch: tokens (+ images) (+ packing/prefix fields)."""
  images = (batch["images"],) if "images" in batch else ()
  kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
  return model.apply({"params": params}, batch["tokens"], *images, **kwargs)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Summed token loss and token count: float32[B, T, V], int[B, T], float[B, T] -> (sum, count).

  Returned as a sum and a count so that averages over any split of the batch
  agree with the average over the whole batch.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data for config.total_steps; returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  model = build_model(config)
  data = build_data(config)
  example = jax.tree.map(lambda x: x[:1], data.batch(0))

  def init(rng):
    return nn.unbox(model.init(rng, example["tokens"],
                               *((example["images"],) if "images" in example else ()))["params"])

  abstract_params = jax.eval_shape(init, jax.random.key(config.seed))
  optimizer = optim.make_optimizer(config.optimizer, abstract_params)

  def init_state(rng):
    params = init(rng)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

  state = jax.jit(init_state)(jax.random.key(config.seed))

  def train_step(state, batch):
    def loss_fn(params):
      logits, _ = apply_model(model, params, batch)
      total, count = cross_entropy(logits, batch["targets"], batch["loss_weights"])
      return total / jnp.maximum(count, 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  # The old state's buffers are reused for the new one: nothing else may hold them.
  train_step = jax.jit(train_step, donate_argnums=0)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  tic = time.perf_counter()
  with open(metrics_path, "a") as metrics_file:
    for step in range(1, config.total_steps + 1):
      state, metrics = train_step(state, data.batch(step))
      if step % config.log_every == 0 or step == config.total_steps:
        # float() waits for the device: only on logging steps.
        last = {"step": step, **{k: float(v) for k, v in metrics.items()},
                "steps_per_sec": config.log_every / (time.perf_counter() - tic)}
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
        logging.info("step %d: loss %.4f", step, last["loss"])
        tic = time.perf_counter()
  return last

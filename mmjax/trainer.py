"""train_and_evaluate(config, workdir): the training loop.

This first version trains the decoder LM on one device from the in-memory
synthetic source: model -> optimizer -> jitted step with donated state ->
loop -> metrics.jsonl. Meshes, checkpoints and real data plug in here.
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

from mmjax.data import synthetic
from mmjax.models import lm


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Summed token loss and token count: float32[B, T, V], int[B, T], float[B, T] -> (sum, count).

  Returned as a sum and a count so that averages over any split of the batch
  agree with the average over the whole batch.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.decay_steps)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config.model on config.data for config.total_steps; returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  model = lm.Model(**config.model)
  data = synthetic.ArithmeticText(config.batch_size, config.data.seq_len, config.seed)
  optimizer = make_optimizer(config.optimizer)

  def init(rng):
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    params = nn.unbox(model.init(rng, tokens)["params"])
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

  state = jax.jit(init)(jax.random.key(config.seed))

  def train_step(state, batch):
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, inputs)
      total, count = cross_entropy(logits, targets, jnp.ones(targets.shape, jnp.float32))
      return total / count

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

"""Optax optimizers from config: schedule, clipping, weight-decay mask, freezing, multipliers.

Parameters are addressed by their "/"-joined path, e.g. "lm/block_3/attn/query/kernel".
Frozen parameters get `optax.set_to_zero` under `optax.multi_transform`, so
their updates are exactly zero and they carry no optimizer state. Learning-rate
multipliers scale the final updates of matching parameters, which for these
optimizers is the same as scaling their learning rate (and decoupled decay).
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax import lora

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


def decays(path: str) -> bool:
  """Weight decay by what a parameter is: matrices of weights ("kernel": projections, MLPs, the
  patch embedding, output heads) decay; scales, biases, embedding and position tables, gates,
  latents, probes and class tokens do not."""
  return path.rsplit("/", 1)[-1] == "kernel"


def param_paths(params) -> dict:
  """A tree like params whose leaves are their "/"-joined paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)


def plan(config: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int]:
  """-> (warmup steps, decay steps): optimizer.warmup_steps and decay_steps where set, else
  derived from the run's length: a 10% warmup (at most 100 steps), then decay to step
  total_steps. So `--config.total_steps=N` alone plans the schedule over N steps."""
  warmup = config.get("warmup_steps")
  decay = config.get("decay_steps")
  return (min(100, total_steps // 10) if warmup is None else warmup,
          total_steps if decay is None else decay)


def check_schedule(config: ml_collections.ConfigDict, total_steps: int):
  """One-line errors naming the key: a schedule that cannot be built."""
  if config.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, "
                     f"got {config.schedule!r}")
  warmup, decay = plan(config, total_steps)
  if warmup < 0:
    raise ValueError(f"config.optimizer.warmup_steps must be >= 0, got {warmup}")
  if config.schedule != "constant" and decay <= warmup:
    raise ValueError(f"config.optimizer.decay_steps={decay} must exceed the warmup's {warmup} "
                     "steps (config.optimizer.warmup_steps)")


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then `config.schedule` from the peak to 0 at the decay's end."""
  check_schedule(config, total_steps)
  lr = config.learning_rate
  warmup, decay = plan(config, total_steps)
  if config.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay - warmup)
  else:
    after = optax.linear_schedule(lr, 0.0, decay - warmup)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def describe_schedule(config: ml_collections.ConfigDict, total_steps: int) -> str:
  """The schedule in words: "warmup 100 steps to 0.003, cosine to 0 at step 1000"."""
  warmup, decay = plan(config, total_steps)
  lr = f"{config.learning_rate:g}"
  rest = (f"constant {lr}" if config.schedule == "constant"
          else f"{config.schedule} to 0 at step {decay}")
  return f"warmup {warmup} steps to {lr}, {rest}" if warmup else f"{rest} from {lr}"


def make_optimizer(config: ml_collections.ConfigDict, params,
                   total_steps: int) -> optax.GradientTransformation:
  """The optimizer for `params` (a tree of arrays or shapes) described by config.optimizer, for
  a run of total_steps (the schedule's length unless the config sets its own)."""
  if config.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}")
  lr = schedule(config, total_steps)
  paths = param_paths(params)
  decay_mask = jax.tree.map(decays, paths)
  if config.name == "adamw":
    tx = optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                     mask=decay_mask, mu_dtype=config.get("mu_dtype"))
  elif config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask),
                     optax.sgd(lr, momentum=config.momentum))
  else:
    tx = optax.adafactor(lr, weight_decay_rate=config.weight_decay or None,
                         weight_decay_mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
  if config.get("frozen") or config.get("trained_rows") or lora.settings(config):
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(config, params))
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  if config.get("lr_multipliers"):
    tx = optax.chain(tx, scale_by_path(config.lr_multipliers, paths))
  return tx


def frozen_mask(config: ml_collections.ConfigDict, params):
  """A tree like params: True where optimizer.frozen (a regex over paths) freezes the parameter.

  A table named in optimizer.trained_rows stays trained (its other rows get no gradient, see
  `row_masks`), however the regex reads. With optimizer.lora, its target kernels are frozen
  and their factors train, however the regex reads.
  """
  pattern = re.compile(config.get("frozen") or "(?!)")  # "": nothing is frozen
  rows = dict(config.get("trained_rows") or ())
  adapters = lora.settings(config)

  def frozen(path):
    if lora.is_factor(path):
      return False
    return lora.is_target(adapters, path) or (bool(pattern.search(path)) and path not in rows)

  mask = jax.tree.map(frozen, param_paths(params))
  if all(jax.tree.leaves(mask)):
    raise ValueError(f"optimizer.frozen={config.frozen!r} freezes every parameter")
  return mask


def row_masks(config: ml_collections.ConfigDict, params):
  """A tree like params: for each table in optimizer.trained_rows ((path, row ids), ...), a
  float32[rows, 1] mask of 1 on the rows that train, by which its gradient is multiplied (a
  new token's embedding learns while the frozen vocabulary stays as it was); None elsewhere."""
  rows = {path: tuple(ids) for path, ids in (config.get("trained_rows") or ())}
  paths = param_paths(params)
  unknown = sorted(set(rows) - set(jax.tree.leaves(paths)))
  if unknown:
    raise ValueError(f"optimizer.trained_rows names {unknown}, which the model lacks")

  def mask(path, param):
    if path not in rows:
      return None
    return jnp.zeros((param.shape[0], 1), jnp.float32).at[jnp.asarray(rows[path])].set(1.0)

  return jax.tree.map(mask, paths, params)


def split_frozen(params, mask) -> tuple[dict, dict]:
  """-> (trained, frozen): params with None where the other half holds the leaf."""
  trained = jax.tree.map(lambda p, f: None if f else p, params, mask)
  frozen = jax.tree.map(lambda p, f: p if f else None, params, mask)
  return trained, frozen


def merge_frozen(trained, frozen):
  """The inverse of split_frozen."""
  return jax.tree.map(lambda t, f: f if t is None else t, trained, frozen,
                      is_leaf=lambda x: x is None)


def scale_by_path(multipliers, paths) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first (regex, factor) pair matching its path."""
  def factor(path):
    return next((float(f) for pattern, f in multipliers if re.search(pattern, path)), 1.0)

  factors = jax.tree.map(factor, paths)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f, updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

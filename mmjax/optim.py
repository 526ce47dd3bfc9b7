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


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  if config.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {config.schedule!r}")
  lr, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, config.decay_steps - warmup)
  else:
    after = optax.linear_schedule(lr, 0.0, config.decay_steps - warmup)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """The optimizer for `params` (a tree of arrays or shapes) described by config.optimizer."""
  if config.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}")
  lr = schedule(config)
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

"""The train and eval steps, and `setup(config)`: all an entry point needs to run them.

  run = steps.setup(config)                    # or setup(config, devices=<a TPU slice's>)
  state = run.init(jax.random.key(config.seed))  # created sharded: no host holds it whole
  train_step, eval_step = run.compile()
  state, metrics = train_step(state, sharding.global_batch(local_batch, run.mesh))

`setup` builds, in order: config checks -> mesh and logical-axis rules ->
model -> abstract parameters and their shardings -> optimizer -> abstract state
and its shardings -> the jitted init, train and eval steps. It reads no data
and allocates nothing, so the trainer, tools/bench.py, tools/dry_run.py,
tools/show_params.py and the notebooks all start from it, and a TPU slice's
devices can stand in for this machine's.
"""
from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import operator

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import lora
from mmjax import models
from mmjax import optim
from mmjax import sharding
from mmjax import towers
from mmjax.data import patches
from mmjax.data import sources
from mmjax.data import tiles
from mmjax.models import early_fusion
from mmjax.models import tiled_vit
from mmjax.models import vit

# Batch keys passed to the model as keyword arguments when present.
MODEL_KWARGS = ("positions", "segment_ids", "prefix_len")


def batch_images(batch: dict) -> (jax.Array | vit.Patches | early_fusion.Tiles | tiled_vit.Tiles
                                  | None):
  """A batch's images: dense float[B, (I,) H, W, 3], packed patches at their own sizes, AnyRes
  tiles, Llama 3.2 Vision's tiles, or None."""
  if "patches" in batch:
    return vit.Patches(*(batch[k] for k in patches.KEYS))
  if "aspect_ratio_ids" in batch:
    return tiled_vit.Tiles(*(batch[k] for k in tiles.KEYS))
  if "image_sources" in batch:
    return early_fusion.Tiles(batch["images"], batch["image_sources"])
  return batch.get("images")


def init_inputs(batch: dict) -> tuple:
  """The positional model inputs of a batch: (images,) or (tokens,) or (tokens, images)."""
  if "labels" in batch:
    return (batch["images"],)
  images = batch_images(batch)
  return (batch["tokens"], *(() if images is None else (images,)))


def loss_terms(model: nn.Module, params, batch: dict):
  """-> (summed loss, weight count, summed correct) for any family's batch.

  Sums, not means: accumulated over microbatches or devices and divided once,
  they give the full-batch mean however the batch is split.
  """
  if "labels" in batch:  # image classification: images float[B, H, W, 3], labels int[B]
    # (one class an image) or float[B, classes] (multi-hot: every class an image shows)
    logits, _ = model.apply({"params": params}, batch["images"])
    labels, top = batch["labels"], jnp.argmax(logits, -1)
    if labels.ndim == 2:  # a sigmoid per class, as big_vision's multi-label training
      losses = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
      correct = jnp.take_along_axis(labels, top[:, None], -1)[:, 0]  # precision at 1
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      correct = (top == labels).astype(jnp.float32)
    return jnp.sum(losses), jnp.float32(len(labels)), jnp.sum(correct)
  # Next-token prediction: tokens, targets, loss_weights int/float[B, T] (+ images). Only the
  # final hidden states are used: jit drops the model's own [B, T, V] logits.
  kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
  _, aux = model.apply({"params": params}, *init_inputs(batch), **kwargs)
  total, correct = chunked_token_losses(model, params, aux["hidden"], batch["targets"],
                                        batch["loss_weights"])
  return total, jnp.sum(batch["loss_weights"]), correct


def adapted_loss_terms(model: nn.Module, optimizer: ml_collections.ConfigDict | None, params,
                       batch: dict):
  """loss_terms with the LoRA adapters of optimizer.lora (if any) applied."""
  with lora.adapted(optimizer):
    return loss_terms(model, params, batch)


# Sequence positions per chunk of logits: [B, 256, V] float32 at a time.
LOGIT_CHUNK = 256


def chunked_token_losses(model: nn.Module, params, hidden: jax.Array, targets: jax.Array,
                         weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and correct next tokens, the logits made a chunk of positions at a time.

  hidden: float[B, T, D] final (normed) hidden states; targets int[B, T];
  weights float[B, T]. Each chunk's float32 logits are recomputed in the
  backward pass instead of kept, so the whole [B, T, V] never exists, forward
  or backward: for GPT-2 at 8 x 1024 tokens a device that is 2.3 GiB.
  """
  B, T, _ = hidden.shape
  chunk = max(c for c in range(1, min(T, LOGIT_CHUNK) + 1) if T % c == 0)
  split = lambda x: x.reshape(B, T // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def add_chunk(sums, xs):
    h, t, w = xs
    # A weightless target may be a token the head never predicts (Llama 3.2 Vision's image
    # token lies past the vocabulary): its NaN loss would survive the zero weight.
    t = jnp.where(w > 0, t, 0)
    logits = model.apply({"params": params}, h, method=lambda m, h: m.language.logits(h))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, t)
    correct = (jnp.argmax(logits, -1) == t) * w
    return (sums[0] + jnp.sum(losses * w), sums[1] + jnp.sum(correct)), None

  zero = jnp.zeros((), jnp.float32)
  (total, correct), _ = jax.lax.scan(add_chunk, (zero, zero),
                                     (split(hidden), split(targets), split(weights)))
  return total, correct


def new_state(model: nn.Module, optimizer, inputs: tuple, rng: jax.Array,
              adapt: Callable = lambda params, rng: params) -> dict:
  """The train state: fresh parameters, their optimizer state, the step and the NaN counters.

  adapt: (params, rng) -> params with what the model lacks (LoRA factors, lora.init).
  """
  params = adapt(nn.unbox(model.init(rng, *inputs)["params"]), jax.random.fold_in(rng, 1))
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def make_train_step(model, optimizer, *, microbatches: int, frozen=None, row_masks=None,
                    adapters: ml_collections.ConfigDict | None = None):
  """(state, batch) -> (state, metrics); a non-finite update is skipped and counted.

  frozen: a tree like the parameters, True where a parameter is not trained
  (optim.frozen_mask). Gradients are taken for the trained ones only: nothing
  is differentiated through a frozen tower that only frozen parameters feed
  (a frozen ViT runs no backward pass), no weight gradient of a frozen layer
  is computed, and grad_norm and the non-finite guard cover what is trained.
  row_masks (optim.row_masks): tables of which only some rows train.
  adapters: config.optimizer, whose LoRA factors (lora.adapted) the model applies.
  """

  def grads_and_terms(params, batch):
    trained, fixed = optim.split_frozen(params, frozen) if frozen is not None else (params, None)

    def loss_sum(trained):
      merged = trained if fixed is None else optim.merge_frozen(trained, fixed)
      total, count, correct = adapted_loss_terms(model, adapters, merged, batch)
      return total, (count, correct)
    (total, (count, correct)), grads = jax.value_and_grad(loss_sum, has_aux=True)(trained)
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

      trained = params if frozen is None else optim.split_frozen(params, frozen)[0]
      zeros = (jax.tree.map(jnp.zeros_like, trained), 0.0, 0.0, 0.0)
      (grads, total, count, correct), _ = jax.lax.scan(accumulate, zeros, split)
    # Normalise once by the whole batch's weight: the same update however it was split.
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    if row_masks is not None:
      grads = jax.tree.map(lambda g, m: g if m is None else g * m, grads, row_masks,
                           is_leaf=lambda x: x is None)
    loss = total / count
    grad_norm = optax.tree.norm(grads)  # of the trained parameters
    if frozen is not None:  # the optimizer takes a whole tree; frozen leaves get no update
      grads = optim.merge_frozen(grads, jax.tree.map(
          lambda p, f: jnp.zeros_like(p) if f else None, params, frozen))
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
    # items: what the loss was on (tokens with a weight, or images), not padding.
    return new_state, {"loss": loss, "accuracy": correct / count, "grad_norm": grad_norm,
                       "items": count}

  return train_step


# The numeric keys `setup` reads that have a domain, as (comparison, bound) pairs. Unset keys
# (None) are not checked: unset means derived (optimizer.warmup_steps) or off.
BOUNDS = {
    "batch_size": ">= 1", "microbatches": ">= 1",
    "optimizer.learning_rate": "> 0", "optimizer.weight_decay": ">= 0",
    "optimizer.clip_norm": "> 0", "optimizer.b1": ">= 0, < 1", "optimizer.b2": ">= 0, < 1",
    "optimizer.momentum": ">= 0, < 1", "optimizer.warmup_steps": ">= 0",
    "optimizer.decay_steps": ">= 1", "optimizer.lora.alpha": "> 0",
    "data.seq_len": ">= 2", "data.pack": ">= 1", "data.max_images": ">= 1",
    "data.train_size": ">= 1", "data.eval_size": ">= 1", "data.max_shapes": ">= 1",
    "data.max_patches": ">= 1", "data.image_size": ">= 1",
    "distributed.num_processes": ">= 1",
}
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}


def check_bounds(config: ml_collections.ConfigDict, bounds: dict[str, str]):
  """One-line errors for numeric keys outside their domain: "config.batch_size must be >= 1,
  got 0". bounds: key -> "OP NUMBER[, OP NUMBER]"."""
  for key, rule in bounds.items():
    value = config
    for part in key.split("."):
      value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    for condition in rule.split(", "):
      comparison, bound = condition.split(" ")
      if not COMPARISONS[comparison](value, float(bound)):
        raise ValueError(f"config.{key} must be {' and '.join(rule.split(', '))}, got {value}")


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1):
  """One-line errors naming the config key, for everything `setup` builds; nothing compiles."""
  check_bounds(config, BOUNDS)
  models.check(config.family, config.model)
  sources.check(config)
  lora.check(config.optimizer)
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
  if config.batch_size % num_processes:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"{num_processes} processes")
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {optim.OPTIMIZERS}, "
                     f"got {config.optimizer.name!r}")
  if config.optimizer.get("mu_dtype") not in (None, "float32", "bfloat16"):
    raise ValueError(f"config.optimizer.mu_dtype must be unset, 'float32' or 'bfloat16', got "
                     f"{config.optimizer.mu_dtype!r}")
  optim.check_schedule(config.optimizer, config.total_steps)


@dataclasses.dataclass(frozen=True)
class Setup:
  """A config's model, mesh, shardings, optimizer and jitted steps; nothing allocated yet."""

  config: ml_collections.ConfigDict  # as given, with what its pretrained towers decide
  model: nn.Module
  mesh: jax.sharding.Mesh
  rules: tuple  # logical axis -> mesh axes
  optimizer: optax.GradientTransformation
  param_axes: dict  # each parameter's logical axis names (a PartitionSpec of names)
  frozen: dict  # like the parameters: True where one does not train (optim.frozen_mask)
  params_sharding: dict
  state_sharding: dict
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: dict  # jax.ShapeDtypeStructs carrying state_sharding
  abstract_batch: dict  # the global batch: jax.ShapeDtypeStructs carrying batch_sharding
  init: Callable  # (rng) -> state, created directly in its shardings
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (params, batch) -> (summed loss, weight count, summed correct)
  merge: Callable  # the state's params -> the model's: LoRA factors into kernels, or as they are

  def lower_train(self) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):  # constraints need both
      return self.train_step.lower(self.abstract_state, self.abstract_batch)

  def lower_eval(self) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.eval_step.lower(self.abstract_state["params"], self.abstract_batch)

  def compile_train(self) -> jax.stages.Compiled:
    """The train step compiled for the abstract state and batch (what compile() returns first)."""
    return self.lower_train().compile()

  def compile(self) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
    """-> (train step, eval step), compiled for the abstract state and batch."""
    return self.compile_train(), self.lower_eval().compile()

  @property
  def state_bytes_per_device(self) -> int:
    """Bytes of parameters and optimizer state one device holds."""
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(self.abstract_state),
                               jax.tree.leaves(self.state_sharding)))


def setup(config: ml_collections.ConfigDict,
          devices: Sequence[jax.Device] | None = None) -> Setup:
  """Everything config describes, built for `devices` (default: every process's devices)."""
  devices = jax.devices() if devices is None else list(devices)
  config = towers.resolve(config)  # what pretrained towers decide, if the config names any
  validate(config, len(devices), jax.process_count())
  mesh = sharding.make_mesh(config.mesh.shape, devices, config.mesh.get("dcn"))
  rules = sharding.rules(config.mesh.rules)
  model = models.build(config.family, config.model)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in sources.batch_spec(config).items()}
  inputs = jax.tree.map(lambda x: np.zeros((1, *x.shape[1:]), x.dtype),
                        init_inputs(abstract_batch))

  # Shapes and logical axes, no memory. (No rules in scope during init: flax's DenseGeneral
  # would constrain its flat pre-reshape kernel with the 3-d axis names.)
  boxed = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), *inputs)["params"]
  boxed = lora.add(boxed, config.optimizer)  # LoRA factors, with their kernels' axes
  params_sharding = sharding.param_shardings(boxed, mesh, rules)
  optimizer = optim.make_optimizer(config.optimizer, nn.unbox(boxed), config.total_steps)
  frozen = optim.frozen_mask(config.optimizer, nn.unbox(boxed))
  row_masks = (optim.row_masks(config.optimizer, nn.unbox(boxed))
               if config.optimizer.get("trained_rows") else None)
  init_state = functools.partial(new_state, model, optimizer, inputs, adapt=functools.partial(
      lora.init, optimizer=config.optimizer, abstract=nn.unbox(boxed)))
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_sharding = sharding.state_shardings(abstract, params_sharding, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, state_sharding)
  return Setup(
      config=config, model=model, mesh=mesh, rules=rules, optimizer=optimizer,
      param_axes=nn.get_partition_spec(boxed), frozen=frozen, params_sharding=params_sharding,
      state_sharding=state_sharding, batch_sharding=batch_sharding,
      abstract_state=abstract_state, abstract_batch=abstract_batch,
      init=jax.jit(init_state, out_shardings=state_sharding),
      # The old state's buffers are donated to the new one: one state's memory, not two.
      train_step=jax.jit(make_train_step(model, optimizer, microbatches=config.microbatches,
                                         frozen=frozen, row_masks=row_masks,
                                         adapters=config.optimizer),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0),
      eval_step=jax.jit(functools.partial(adapted_loss_terms, model, config.optimizer),
                        in_shardings=(params_sharding, batch_sharding)),
      merge=functools.partial(lora.merge, optimizer=config.optimizer))

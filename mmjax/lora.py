"""LoRA: low-rank adapters on the kernels a regex over parameter paths names.

  config.optimizer.lora = dict(targets=r"^lm/.*/(query|key|value|out|gate|up|down)/kernel$",
                               rank=16, alpha=32.0, base_dtype=None)

A target kernel W keeps its path; two factors join it in its module,
"lora_a" float32[*in, r] and "lora_b" float32[r, *out]. In the train and eval
steps (`adapted`) each such projection returns x W + (alpha / r) (x a) b: no
merged kernel is formed and no gradient of W, so training costs the base
model's forward and backward through activations plus the small factors.
Generation, the evaluators and the HF export take `merge`d parameters, W +
(alpha / r) a b, formed once. The models know nothing of LoRA (a flax method
interceptor adds the adapters' term), so every family and tower takes them. b
starts at zero: the first step starts exactly at the base model.

In training the target kernels are frozen (no gradient, no optimizer state)
and the factors always train; every other parameter follows optimizer.frozen,
so a stage that freezes "^(vit|lm)/" and puts LoRA on the LM trains the
projector in full and the LM through its adapters (LLaVA's LoRA recipe). The
factors carry their kernel's logical axes on its input and output sides, so they
shard as the kernel does. `base_dtype="bfloat16"` stores the frozen targets in
bfloat16, halving the base model's memory; `"int8"` quarters it (QLoRA-style):
each target becomes int8 values ("kernel") and a float32 scale per output
channel ("kernel_scale", size 1 along the input axes), quantized by qwix
(absmax, symmetric). The projection multiplies the int8 kernel cast to the
compute dtype, so the cast fuses into the matmul, and scales its output per
channel: x (q s) = (x q) s.

Einsum letters: L stacked layers (scanned LMs), I the kernel's input size
(its leading axes flattened), O its output size, R the rank.
"""
import contextlib
import math
import re
import zlib

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models import layers

FACTORS = ("lora_a", "lora_b")
SCALE = "kernel_scale"  # beside an int8 base kernel
BASE_DTYPES = (None, "float32", "bfloat16", "int8")
STACKED = "layers"  # the logical axis of a scanned LM's stacked blocks


def settings(optimizer: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict | None:
  """config.optimizer.lora when it names targets, else None (no LoRA)."""
  lora = optimizer.get("lora") if optimizer else None
  return lora if lora and lora.get("targets") else None


def check(optimizer: ml_collections.ConfigDict):
  lora = settings(optimizer)
  if lora is None:
    return
  if int(lora.rank) < 1:
    raise ValueError(f"config.optimizer.lora.rank must be >= 1, got {lora.rank}")
  if lora.get("base_dtype") not in BASE_DTYPES:
    raise ValueError(f"config.optimizer.lora.base_dtype must be unset or one of "
                     f"{BASE_DTYPES[1:]}, got {lora.base_dtype!r}")
  try:
    re.compile(lora.targets)
  except re.error as e:
    raise ValueError(f"config.optimizer.lora.targets={lora.targets!r} is not a regex: {e}")


def is_factor(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in FACTORS


def is_target(lora, path: str) -> bool:
  """Whether path is a kernel LoRA adapts (frozen), or the int8 scale of one."""
  name = path.rsplit("/", 1)[-1]
  return (lora is not None and name in ("kernel", SCALE)
          and re.search(lora.targets, path.removesuffix("_scale")) is not None)


def sides(names: tuple) -> tuple[int, int]:
  """(stacked leading axes, input axes) of a kernel from its logical axis names: the output
  is the trailing "embed" axis of a projection back to the model width (attention out, MLP
  down, patch embedding), else everything after the first axis."""
  stacked = int(bool(names) and names[0] == STACKED)
  rest = names[stacked:]
  inputs = len(rest) - 1 if rest[-1] == "embed" and len(rest) > 1 else 1
  return stacked, inputs


def add(boxed: dict, optimizer: ml_collections.ConfigDict) -> dict:
  """Abstract boxed parameters (eval_shape of model.init) with the factors' shapes and axes."""
  lora = settings(optimizer)
  if lora is None:
    return boxed
  r = int(lora.rank)
  found = []

  def visit(tree, prefix):
    out = {}
    for key, value in tree.items():
      path = f"{prefix}{key}"
      if isinstance(value, dict):
        out[key] = visit(value, path + "/")
        continue
      out[key] = value
      if is_target(lora, path):
        found.append(path)
        names = tuple(value.names)
        shape = value.value.shape
        stacked, inputs = sides(names)
        split = stacked + inputs
        lead = shape[:stacked]
        out["lora_a"] = nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct((*shape[:split], r), jnp.float32), (*names[:split], None))
        out["lora_b"] = nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct((*lead, r, *shape[split:]), jnp.float32),
            (*names[:stacked], None, *names[split:]))
        if lora.get("base_dtype") == "int8":  # one scale per output channel
          out[SCALE] = nn.LogicallyPartitioned(
              jax.ShapeDtypeStruct((*lead, *[1] * inputs, *shape[split:]), jnp.float32),
              (*names[:stacked], *[None] * inputs, *names[split:]))
    return out

  boxed = visit(boxed, "")
  if not found:
    raise ValueError(f"config.optimizer.lora.targets={lora.targets!r} matches no kernel")
  return boxed


def _stacked(kernel_ndim: int, a_ndim: int, b_ndim: int) -> int:
  """Leading axes a and b share with their kernel: 1 for a scanned LM's stacked layers."""
  return a_ndim + b_ndim - 2 - kernel_ndim


def quantize(kernel: jax.Array, a_ndim: int, b_ndim: int):
  """An adapted kernel -> qwix.QArray: int8 values and a float32 scale per output channel
  (and stacked layer); its input axes, known from the factors' ranks, share one scale."""
  import qwix  # pylint: disable=g-import-not-at-top  # only int8 bases need it
  stacked = _stacked(kernel.ndim, a_ndim, b_ndim)
  inputs = a_ndim - 1 - stacked
  channels = [*range(stacked), *range(stacked + inputs, kernel.ndim)]
  return qwix.quantize(kernel.astype(jnp.float32), jnp.int8, channelwise_axes=channels)


def init(params: dict, rng: jax.Array, *, optimizer: ml_collections.ConfigDict,
         abstract: dict) -> dict:
  """params with the factors of `abstract` (from `add`, unboxed): a uniform in
  +-1/sqrt(fan in) (PEFT's kaiming default), b zero; the targets in base_dtype."""
  lora = settings(optimizer)
  if lora is None:
    return params
  int8 = lora.get("base_dtype") == "int8"
  base_dtype = jnp.dtype("float32" if int8 else lora.get("base_dtype") or "float32")

  def visit(tree, shapes, prefix):
    out = {}
    for key, shape in shapes.items():
      path = f"{prefix}{key}"
      if isinstance(shape, dict):
        out[key] = visit(tree[key], shape, path + "/")
      elif key == "lora_a":
        stacked = _stacked(tree["kernel"].ndim, len(shape.shape), len(shapes["lora_b"].shape))
        bound = 1.0 / math.prod(shape.shape[stacked:-1]) ** 0.5
        out[key] = jax.random.uniform(jax.random.fold_in(rng, zlib.crc32(path.encode())),
                                      shape.shape, jnp.float32, -bound, bound)
      elif key == "lora_b":
        out[key] = jnp.zeros(shape.shape, jnp.float32)
      elif is_target(lora, path) and int8:
        quantized = quantize(tree["kernel"], len(shapes["lora_a"].shape),
                             len(shapes["lora_b"].shape))
        out[key] = quantized.scale if key == SCALE else quantized.qvalue
      elif is_target(lora, path):
        out[key] = tree[key].astype(base_dtype)
      else:
        out[key] = tree[key]
    return out

  return visit(params, abstract, "")


def merge(params: dict, *, optimizer: ml_collections.ConfigDict) -> dict:
  """The model's parameters: each target kernel W + (alpha / r) * a @ b, the factors gone."""
  lora = settings(optimizer)
  if lora is None:
    return params
  scale = float(lora.alpha) / int(lora.rank)

  def visit(tree):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" not in tree:
      return {k: visit(v) for k, v in tree.items()}
    a, b, kernel = tree["lora_a"], tree["lora_b"], tree["kernel"]
    stacked = _stacked(kernel.ndim, a.ndim, b.ndim)
    lead = kernel.shape[:stacked]
    r = a.shape[-1]
    a2 = a.reshape(*lead, -1, r)
    b2 = b.reshape(*lead, r, -1)
    delta = jnp.einsum("...IR,...RO->...IO", a2, b2).reshape(kernel.shape)
    merged = {k: v for k, v in tree.items() if k not in (*FACTORS, SCALE)}
    base_kernel = dequantized(tree)
    merged["kernel"] = (base_kernel + scale * delta).astype(
        jnp.promote_types(base_kernel.dtype, jnp.float32))
    return merged

  return visit(params)


# The projections LoRA adapts: each contracts the trailing axes of its input with its kernel's
# leading axes (a Conv, e.g. the ViT's patch embedding, does not).
PROJECTIONS = (nn.Dense, layers.HeadProjection)


@contextlib.contextmanager
def adapted(optimizer: ml_collections.ConfigDict):
  """Within it (around a model.apply, when tracing a step), every projection holding factors
  beside its kernel returns y + (alpha / r) (x a) b."""
  lora = settings(optimizer)
  if lora is None:
    yield
    return
  scale = float(lora.alpha) / int(lora.rank)

  def add_adapter(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", "lora_a"):
      return next_fun(*args, **kwargs)
    if not isinstance(module, PROJECTIONS):
      raise ValueError(f"config.optimizer.lora.targets={lora.targets!r} names the kernel of "
                       f"{'/'.join(module.path)}, a {type(module).__name__}: LoRA adapts dense "
                       "projections only")
    y = next_fun(*args, **kwargs)
    a = module.get_variable("params", "lora_a").astype(y.dtype)  # [*in, R]
    b = module.get_variable("params", "lora_b").astype(y.dtype)  # [R, *out]
    if module.has_variable("params", SCALE):  # y = x q (+ bias): x (q s) = (x q) s
      channel_scale = module.get_variable("params", SCALE)  # [1 per input axis, *out]
      channel_scale = channel_scale.reshape(channel_scale.shape[a.ndim - 1:]).astype(y.dtype)
      bias = (module.get_variable("params", "bias").astype(y.dtype)
              if module.has_variable("params", "bias") else 0.0)
      y = (y - bias) * channel_scale + bias
    h = jnp.tensordot(args[0].astype(y.dtype), a, axes=a.ndim - 1)  # [..., R]
    return y + scale * jnp.tensordot(h, b, axes=1)

  with nn.intercept_methods(add_adapter):
    yield


def dequantized(module_params: dict) -> jax.Array:
  """A module's kernel in float32: an int8 one times its scale, any other as it is."""
  kernel = module_params["kernel"]
  if SCALE not in module_params:
    return kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  return kernel.astype(jnp.float32) * module_params[SCALE]


def base(params: dict) -> dict:
  """params without the factors: the tree a pretrained checkpoint or tower holds (an int8
  kernel as the float32 one it stands for; params may be arrays or ShapeDtypeStructs)."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out[key] = base(value)
    elif key == "kernel" and SCALE in params:
      out[key] = (jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=value.sharding)
                  if isinstance(value, jax.ShapeDtypeStruct) else dequantized(params))
    elif key not in (*FACTORS, SCALE):
      out[key] = value
  return out


def overlay(params: dict, loaded: dict) -> dict:
  """params with the leaves of `loaded` put in, subtree by subtree: pretrained base weights
  (each in the dtype of the leaf it replaces, bfloat16 for base_dtype targets, quantized
  afresh for int8 ones; the factors kept) or factors read back (new leaves beside their
  kernels, as they are)."""
  out = dict(params)
  for key, value in loaded.items():
    if isinstance(value, dict):
      out[key] = overlay(params.get(key, {}), value)
    elif key == "kernel" and SCALE in params:
      quantized = quantize(value, params["lora_a"].ndim, params["lora_b"].ndim)
      out["kernel"], out[SCALE] = quantized.qvalue, quantized.scale
    else:
      out[key] = value.astype(params[key].dtype) if key in params else value
  return out

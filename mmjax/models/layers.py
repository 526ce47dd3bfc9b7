"""Layers shared by every mmjax model: attention, MLPs, norms, embeddings.

Einsum letters:
  B batch          T query (text) length   S key/value length
  N query heads    K key/value heads       G query heads per kv head (N = K * G)
  H head dim       D width                 F MLP hidden width
  V vocabulary

dtype policy: parameters are float32 (`param_dtype`); matmuls run in the
module's `dtype` (bfloat16 on accelerators); softmax and norms run in float32.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `layers`) and the main activations carry `act_batch`, `act_len`,
`act_embed`. Without logical-axis rules in scope these annotations do nothing.
"""
from collections.abc import Callable
import math
from typing import Any

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

ACT_AXES = ("act_batch", "act_len", "act_embed")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")

# cuDNN's fused attention rejects lengths such as 197 or 577 ("Unsupported sequence length"):
# the fused path pads both lengths to this multiple and masks the padded keys.
CUDNN_LENGTH_MULTIPLE = 64


REMAT_POLICIES = {  # name -> jax.checkpoint policy; "none" means no remat
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # Save the projections' outputs, recompute the rest (norms, activations, attention).
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(block: type[nn.Module], policy: str, scanned: bool = False) -> type[nn.Module]:
  """The block class, rematerialised in the backward pass by `policy` (a key of REMAT_POLICIES,
  or "none": the block as it is)."""
  if policy == "none":
    return block
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                     f"got {policy!r}")
  return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)  # scan stops CSE


def constrain(x: jax.Array) -> jax.Array:
  """Pins a float[B, T, D] activation to the activation sharding."""
  return nn.with_logical_constraint(x, ACT_AXES)


def partitioned(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


@struct.dataclass
class Mask:
  """What each query position may attend to; fields left None impose nothing.

  Kept as a description rather than a dense array so the fused kernel can use
  its native causal and key-length masking instead of a [B, T, S] tensor.
  """

  causal: bool = struct.field(pytree_node=False, default=False)
  prefix_len: jax.Array | None = None  # int32[B]: bidirectional over the first prefix_len positions
  segment_ids: jax.Array | None = None  # int32[B, T]: packed examples never attend to each other
  kv_segment_ids: jax.Array | None = None  # int32[B, S]: defaults to segment_ids
  kv_lengths: jax.Array | None = None  # int32[B]: keys at positions >= kv_lengths are padding
  explicit: jax.Array | None = None  # bool[B, T, S]: anything else, e.g. a media mask
  # Sliding-window (local) attention: a query sees the `window` latest keys up to itself
  # (Gemma 2's local layers, Mistral); the prefix stays bidirectional beyond it, as in
  # transformers. Static: kernels build their masks from it.
  window: int | None = struct.field(pytree_node=False, default=None)
  q_offset: jax.Array | None = None  # int32[]: the first query's key slot when decoding (cache.end)

  @property
  def only_causal_and_lengths(self) -> bool:
    return (self.prefix_len is None and self.segment_ids is None and self.explicit is None
            and self.window is None)

  def dense(self, q_len: int, kv_len: int) -> jax.Array | None:
    """Materialises the mask as bool[B or 1, 1, T, S], or None when it allows all."""
    q = jnp.arange(q_len)[:, None] + (0 if self.q_offset is None else self.q_offset)
    k = jnp.arange(kv_len)[None, :]
    parts = []
    if self.causal:
      allowed = k <= q
      if self.window is not None:
        allowed = allowed & (k > q - self.window)
      if self.prefix_len is not None:
        prefix = self.prefix_len[:, None, None]
        allowed = allowed | ((k < prefix) & (q < prefix))
      parts.append(allowed)
    elif self.prefix_len is not None or self.window is not None:
      raise ValueError("Mask.prefix_len and Mask.window need causal=True: they change a causal "
                       "mask")
    if self.segment_ids is not None:
      kv_segments = self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
      parts.append(self.segment_ids[:, :, None] == kv_segments[:, None, :])
    if self.kv_lengths is not None:
      parts.append(k < self.kv_lengths[:, None, None])
    if self.explicit is not None:
      parts.append(self.explicit)
    if not parts:
      return None
    mask = parts[0]
    for part in parts[1:]:
      mask = mask & part
    return jnp.broadcast_to(mask, (mask.shape[0] if mask.ndim == 3 else 1, q_len, kv_len))[:, None]


@struct.dataclass
class KVCache:
  """Keys and values an attention layer has computed, kept for decoding.

  Self-attention caches have a fixed length S and are filled from the left:
  a call writes its T new keys at slots [end, end + T) and returns end + T.
  Cross-attention caches hold the projected context once and are only read.
  """

  k: jax.Array  # float[B, S, K, H], RoPE already applied
  v: jax.Array  # float[B, S, K, H]
  end: jax.Array  # int32[]: slots [0, end) are written

  @classmethod
  def empty(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
    zeros = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
    return cls(k=zeros, v=zeros, end=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------
# Attention kernels.
# ----------------------------------------------------------------------------


@struct.dataclass
class Scores:
  """How query-key scores are scaled before the softmax."""

  query_scalar: float | None = struct.field(pytree_node=False, default=None)  # scores /
  # sqrt(query_scalar); None: the head dim (Gemma 2's query_pre_attn_scalar may differ)
  soft_cap: float | None = struct.field(pytree_node=False, default=None)  # scores -> soft_cap *
  # tanh(scores / soft_cap) (Gemma 2)

  def scale(self, head_dim: int) -> float:
    return (self.query_scalar or head_dim) ** -0.5


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): Gemma 2's bound on attention scores and logits; None: x."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def attention_probs(q: jax.Array, k: jax.Array, mask: Mask, scores: Scores = Scores()
                    ) -> jax.Array:
  """Softmax attention probabilities.

  q: float[B, T, N, H]; k: float[B, S, K, H] -> float32[B, K, G, T, S], where
  G = N / K query heads share each key head (head n = k * G + g). A query whose
  keys are all masked gets all zeros, not a uniform average.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  q = q.reshape(B, T, K, N // K, H)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = soft_cap(logits * scores.scale(H), scores.soft_cap)
  allowed = mask.dense(T, S)
  if allowed is None:
    return jax.nn.softmax(logits, axis=-1)
  allowed = allowed[:, :, None]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(jnp.float32).min), axis=-1)
  return probs * jnp.any(allowed, axis=-1, keepdims=True)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
                  scores: Scores = Scores()) -> jax.Array:
  """Reference attention in plain einsums.

  q: float[B, T, N, H]; k, v: float[B, S, K, H] -> float[B, T, N, H].
  A query whose keys are all masked gets exactly zero, not a uniform average,
  so text before any image gets nothing from cross-attention.
  """
  B, T, N, H = q.shape
  probs = attention_probs(q, k, mask, scores)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
  return out.reshape(B, T, N, H)


def fused_attention(q, k, v, mask: Mask, implementation: str = "cudnn",
                    scores: Scores = Scores()) -> jax.Array:
  """`jax.nn.dot_product_attention` with lengths padded to what cuDNN accepts.

  Shapes as in `xla_attention`. Padded keys are masked through
  `key_value_seq_lengths` and padded queries are sliced off, so results equal
  the unpadded computation. `implementation="xla"` runs the same padding on
  any backend (the tests use it on the CPU).
  """
  if not mask.only_causal_and_lengths or scores.soft_cap is not None:
    raise ValueError("fused attention takes only causal and key-length masks, no soft cap")
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  if mask.causal and T != S:
    raise ValueError(f"fused causal attention needs equal lengths, got T={T}, S={S}")
  pad_t = -T % CUDNN_LENGTH_MULTIPLE
  pad_s = -S % CUDNN_LENGTH_MULTIPLE
  kv_lengths = mask.kv_lengths
  if pad_s and kv_lengths is None:
    kv_lengths = jnp.full((B,), S, jnp.int32)
  q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(
      q, k, v,
      is_causal=mask.causal, scale=scores.scale(q.shape[-1]),
      key_value_seq_lengths=None if kv_lengths is None else kv_lengths.astype(jnp.int32),
      implementation=implementation)
  return out[:, :T]


# TPU lanes: splash attention's blocks, and so the lengths it runs, are multiples of this.
SPLASH_LENGTH_MULTIPLE = 128
# "auto" picks splash from this many keys: shorter, its saved statistics and the padding to 128
# outweigh the scores it avoids keeping (ViT-B/16, 197 tokens, B=256 on a v5e:2x4 dry run:
# 2.58 GiB a chip with splash, 2.23 with XLA; GPT-2 at 1024 tokens: 4.7 against 7.5).
SPLASH_MIN_KEYS = 512


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
                     scores: Scores = Scores()) -> jax.Array:
  """Pallas splash (flash) attention for TPUs: no [B, N, T, S] scores are ever stored.

  Shapes as in `xla_attention`. Takes causal, local (a window) or full masks
  with segment ids and key lengths (`splash_qualifies`), a prefix-LM's prefix
  (two kernels, see below) and a soft cap.
  Lengths are padded to multiples of 128 and the padding masked through
  segment ids that match nothing real. Under a mesh the kernel runs per
  device (shard_map) over the batch, and over the heads where the rules split
  them. Off a TPU it runs in Pallas' interpreter: exact, slow, for tests.
  """
  # Imported here: only TPU runs (and their tests) need the Pallas kernels.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  if mask.causal and T != S:
    raise ValueError(f"splash causal attention needs equal lengths, got T={T}, S={S}")
  # Segment ids carry every mask but the causal one: packed examples, key lengths, padding.
  q_ids = jnp.ones((B, T), jnp.int32) if mask.segment_ids is None else mask.segment_ids
  kv_ids = mask.kv_segment_ids if mask.kv_segment_ids is not None else mask.segment_ids
  kv_ids = jnp.ones((B, S), jnp.int32) if kv_ids is None else kv_ids
  if mask.prefix_len is not None:
    # A row inside the prefix sees the whole prefix (which holds its causal keys), a row after
    # it its causal (or local) keys: a full kernel over the prefix's keys for the first rows, the
    # causal one for the others. Per-row prefixes are no static mask, so each kernel runs on
    # every row and each row keeps one result (twice the kernel's work, no [T, S] scores).
    in_prefix = jnp.arange(T) < mask.prefix_len[:, None]  # [B, T], and as keys (T = S)
    prefix = Mask(segment_ids=jnp.where(in_prefix, q_ids, -1),
                  kv_segment_ids=jnp.where(in_prefix, kv_ids, -3), kv_lengths=mask.kv_lengths)
    rows = splash_attention(q, k, v, prefix, scores)
    rest = splash_attention(q, k, v, mask.replace(prefix_len=None), scores)
    return jnp.where(in_prefix[:, :, None, None], rows, rest)
  Tp, Sp = (-(-n // SPLASH_LENGTH_MULTIPLE) * SPLASH_LENGTH_MULTIPLE for n in (T, S))
  if mask.kv_lengths is not None:
    kv_ids = jnp.where(jnp.arange(S) < mask.kv_lengths[:, None], kv_ids, -2)
  q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
  kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-2)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q, k, v = pad(q * scores.scale(H), Tp).astype(k.dtype), pad(k, Sp), pad(v, Sp)

  shape = (Tp, Sp)
  if mask.window is not None:  # the window's keys up to the query: window - 1 before it
    head_mask = splash_mask.LocalMask(shape, window_size=(mask.window - 1, 0), offset=0)
  elif mask.causal:
    head_mask = splash_mask.CausalMask(shape)
  else:
    head_mask = splash_mask.FullMask(shape)
  block = math.gcd(Tp, Sp, 512)  # 512 where the lengths allow: fewer grid steps
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa(
      splash_mask.MultiHeadMask([head_mask] * G), block_sizes=blocks, head_shards=1,
      q_seq_shards=1, attn_logits_soft_cap=scores.soft_cap, interpret=target_platform() != "tpu")

  def one_row(q, k, v, q_ids, kv_ids):  # q [T, n, H], k/v [S, k, H]: one example's heads here
    heads, kv_heads = q.shape[1], k.shape[1]
    q = q.reshape(Tp, kv_heads, G, H).transpose(1, 2, 0, 3)  # [k, G, T, H]: G per kv head
    k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [k, S, H]
    ids = splash.SegmentIds(q=q_ids, kv=kv_ids)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
    return out.transpose(2, 0, 1, 3).reshape(Tp, heads, H)

  def per_device(q, k, v, q_ids, kv_ids):
    return jax.vmap(one_row)(q, k, v, q_ids, kv_ids)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:  # a Pallas call is not partitioned by XLA: give each device its rows
    batch = nn.logical_to_mesh_axes(("act_batch",))[0]
    heads = nn.logical_to_mesh_axes(("heads",))[0]
    size = lambda axes: math.prod(mesh.shape[a] for a in (
        (axes,) if isinstance(axes, str) else axes or ()))
    if B % size(batch):
      batch = None
    if K % size(heads):
      heads = None
    rows, cols = jax.sharding.PartitionSpec(batch, None), jax.sharding.PartitionSpec(
        batch, None, heads, None)
    per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(cols, cols, cols, rows, rows),
                               out_specs=cols, check_vma=False)
  out = per_device(q, k, v, q_ids, kv_ids)
  return out[:, :T].astype(v.dtype)


def target_platform() -> str:
  """What the computation being traced is for: the mesh's devices (a TPU slice compiled from a
  CPU host is "tpu"), else this process's default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def cudnn_qualifies(q: jax.Array, mask: Mask, platform: str, scores: Scores = Scores()) -> bool:
  """Whether the cuDNN kernel can run these shapes exactly."""
  return (platform == "gpu"
          and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
          and mask.only_causal_and_lengths and scores.soft_cap is None)


def splash_qualifies(q: jax.Array, k: jax.Array, mask: Mask) -> bool:
  """Whether splash attention computes this exactly: causal, local or full, with segment ids, key
  lengths and a prefix (an explicit mask or a decoding step's needs the XLA kernel)."""
  return (mask.explicit is None and mask.q_offset is None
          and not (mask.causal and q.shape[1] != k.shape[1]))


def choose_attention(impl: str, q: jax.Array, k: jax.Array, mask: Mask,
                     platform: str | None = None, scores: Scores = Scores()) -> str:
  """The kernel `impl` runs for these inputs: "xla", "cudnn" or "splash".

  "auto": cuDNN on GPUs, and splash on TPUs from SPLASH_MIN_KEYS keys, where they
  compute the mask exactly; else XLA. platform: what the computation is for
  (default `target_platform()`).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  platform = platform or target_platform()
  if impl == "cudnn" and not cudnn_qualifies(q, mask, platform, scores):
    raise ValueError(
        "attention_impl='cudnn' needs a GPU, bfloat16/float16 compute, head dim <= 128 "
        f"(multiple of 8), only causal/key-length masks and no soft cap; got platform "
        f"{platform}, {q.dtype}, head dim {q.shape[-1]}. Use 'auto'.")
  if impl == "splash" and not splash_qualifies(q, k, mask):
    raise ValueError("attention_impl='splash' takes causal or full masks with segment ids and "
                     "key lengths and a prefix, not an explicit mask. Use 'auto'.")
  if impl != "auto":
    return impl
  if cudnn_qualifies(q, mask, platform, scores) and (not mask.causal
                                                         or q.shape[1] == k.shape[1]):
    return "cudnn"
  if platform == "tpu" and splash_qualifies(q, k, mask) and k.shape[1] >= SPLASH_MIN_KEYS:
    return "splash"
  return "xla"


def dot_product_attention(q, k, v, mask: Mask, impl: str, scores: Scores = Scores()
                          ) -> jax.Array:
  """Attention by the kernel `choose_attention` picks; shapes as in `xla_attention`."""
  kernel = choose_attention(impl, q, k, mask, scores=scores)
  if kernel == "cudnn":
    return fused_attention(q, k, v, mask, scores=scores)
  if kernel == "splash":
    return splash_attention(q, k, v, mask, scores)
  return xla_attention(q, k, v, mask, scores)


# ----------------------------------------------------------------------------
# Rotary position embeddings (Llama's half-split convention).
# ----------------------------------------------------------------------------


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """float32[H/2] rotation frequencies, optionally rescaled for longer contexts.

  scaling: {"rope_type": "linear", "factor": f} divides every frequency by f;
  {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"} rescales only the low frequencies (Llama 3.1).
  """
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  kind = (scaling or {}).get("rope_type", "default")
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling rope_type must be one of {ROPE_TYPES}, got {kind!r}")
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: dict | None = None) -> jax.Array:
  """Rotates x: float[B, T, N, H] by positions: int[B, T]; math in float32."""
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, in float32."""

  eps: float = 1e-6
  # Gemma stores the weight as an offset from 1 (initialised to 0) and scales by 1 + weight:
  # kept so, an imported weight returns to its checkpoint bit for bit.
  scale_offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", partitioned(init, ("embed",)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (self.scale_offset + scale)).astype(x.dtype)


def Norm(kind: str, eps: float, name: str | None = None) -> nn.Module:  # pylint: disable=invalid-name
  """LayerNorm or RMSNorm (Gemma's: scaled by 1 + weight) with float32 math, scale/bias on the
  `embed` axis."""
  if kind == "layernorm":
    return nn.LayerNorm(
        epsilon=eps, dtype=jnp.float32, name=name,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)))
  if kind == "rmsnorm":
    return RMSNorm(eps=eps, name=name)
  if kind == "gemma_rmsnorm":
    return RMSNorm(eps=eps, scale_offset=1.0, name=name)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class HeadProjection(nn.Module):
  """Into heads, "BTD,DNH->BTNH" (features=(N, H)), or out of them, "BTNH,NHD->BTD" (features=(D,)).

  The kernel is initialised as the 2-d matrix a Dense layer would have, so
  fan-in and fan-out mean the same. (flax's DenseGeneral does the same but
  applies the 3-d axis names to the 2-d matrix when logical rules are in scope.)
  """

  features: tuple[int, ...]
  use_bias: bool
  kernel_init: Initializer
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    into_heads = len(self.features) == 2
    if into_heads:
      shape, axes, fan_in_ndim = (x.shape[-1], *self.features), ("embed", "heads", "kv"), 1
      bias_axes, equation = ("heads", "kv"), "...D,DNH->...NH"
    else:
      shape, axes, fan_in_ndim = (*x.shape[-2:], *self.features), ("heads", "kv", "embed"), 2
      bias_axes, equation = ("embed",), "...NH,NHD->...D"

    def init(rng, shape, dtype):
      flat = (math.prod(shape[:fan_in_ndim]), math.prod(shape[fan_in_ndim:]))
      return self.kernel_init(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel", partitioned(init, axes), shape, jnp.float32)
    y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, bias_axes),
                        self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head, grouped-query or multi-query attention; self or cross.

  Self-attention when `kv` is None; cross-attention (queries from x, keys and
  values from kv) otherwise. RoPE is applied inside when `rope_theta` is set.
  Returns (out, KVCache of the keys and values attended over), so decoding can
  keep them: pass that self-attention cache back as `cache` to append to it,
  or a cross-attention cache as `kv` to skip re-projecting the context.
  """

  num_heads: int
  num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA
  head_dim: int | None = None  # None: width // num_heads
  use_bias: bool = False
  qk_norm: bool = False  # RMSNorm over the head dim of q and k
  qk_norm_eps: float = 1e-6
  scores: Scores = Scores()  # the scores' scale and soft cap
  rope_theta: float | None = None  # None: the caller handles positions
  rope_scaling: dict | None = None  # see rope_frequencies
  attention_impl: str = "xla"  # or "auto", "cudnn", "splash"
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  out_init: Initializer | None = None  # None: kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | KVCache | None = None, *,
               mask: Mask = Mask(), positions: jax.Array | None = None,
               kv_positions: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache]:
    """x: float[B, T, D]; kv: float[B, S, Dkv]; positions: int[B, T] -> (float[B, T, D], cache).

    cache (self-attention only): the new keys go to slots [cache.end, cache.end + T)
    and the queries attend over all S slots, so `mask` spans S keys.
    """
    D = x.shape[-1]
    N = self.num_heads
    K = self.num_kv_heads or N
    H = self.head_dim or D // N
    if N % K:
      raise ValueError(f"num_heads={N} is not a multiple of num_kv_heads={K}")
    if cache is not None and kv is not None:
      raise ValueError("Attention takes a self-attention `cache` or a cross-attention `kv`")

    def proj(name, heads, inputs):
      return HeadProjection((heads, H), use_bias=self.use_bias, kernel_init=self.kernel_init,
                            dtype=self.dtype, name=name)(inputs)

    q = proj("query", N, x)
    if self.qk_norm:
      q = RMSNorm(self.qk_norm_eps, name="query_norm")(q)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)

    if isinstance(kv, KVCache):  # cross-attention to a context projected earlier
      new_cache = kv
    else:
      context = x if kv is None else kv
      k = proj("key", K, context)
      v = proj("value", K, context)
      if self.qk_norm:
        k = RMSNorm(self.qk_norm_eps, name="key_norm")(k)
      if self.rope_theta is not None:
        if kv_positions is None:
          kv_positions = positions if kv is None else jnp.broadcast_to(
              jnp.arange(context.shape[1]), context.shape[:2])
        k = apply_rope(k, kv_positions, self.rope_theta, self.rope_scaling)
      if cache is None:
        new_cache = KVCache(k=k, v=v, end=jnp.array(k.shape[1], jnp.int32))
      else:
        write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(
            buffer, new.astype(buffer.dtype), cache.end, axis=1)
        new_cache = KVCache(k=write(cache.k, k), v=write(cache.v, v), end=cache.end + x.shape[1])

    k, v = new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype)
    if self.is_mutable_collection("intermediates"):  # asked for by mmjax/plots.py
      probs = attention_probs(q, k, mask, self.scores)
      self.sow("intermediates", "attention", probs.reshape(x.shape[0], N, *probs.shape[-2:]))
    out = dot_product_attention(q, k, v, mask, self.attention_impl, self.scores)
    out = HeadProjection((D,), use_bias=self.use_bias,
                         kernel_init=self.out_init or self.kernel_init, dtype=self.dtype,
                         name="out")(out)
    return out, new_cache


class Mlp(nn.Module):
  """Feed-forward block: GELU variants (two matrices) or gated SwiGLU / GeGLU (three)."""

  hidden_dim: int
  activation: str = "gelu"  # or "gelu_tanh" (GPT-2), "quick_gelu" (CLIP), "relu", "swiglu"
  # (Llama), "geglu" (Gemma: the tanh GELU of the gate times the up projection)
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  out_init: Initializer | None = None  # None: kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, T, D] -> float[B, T, D]."""
    D = x.shape[-1]

    def dense(name, features, axes, init):
      return nn.Dense(
          features, use_bias=self.use_bias, dtype=self.dtype, name=name,
          kernel_init=partitioned(init, axes),
          bias_init=partitioned(nn.initializers.zeros, axes[-1:]))

    up = dense("up", self.hidden_dim, ("embed", "mlp"), self.kernel_init)(x)
    if self.activation in ("swiglu", "geglu"):
      gate = dense("gate", self.hidden_dim, ("embed", "mlp"), self.kernel_init)(x)
      hidden = (nn.silu(gate) if self.activation == "swiglu"
                else nn.gelu(gate, approximate=True)) * up
    elif self.activation == "gelu":
      hidden = nn.gelu(up, approximate=False)
    elif self.activation == "gelu_tanh":
      hidden = nn.gelu(up, approximate=True)
    elif self.activation == "quick_gelu":
      hidden = up * nn.sigmoid(1.702 * up)
    elif self.activation == "relu":
      hidden = nn.relu(up)
    else:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    return dense("down", D, ("mlp", "embed"), self.out_init or self.kernel_init)(hidden)


class Projector(nn.Module):
  """Maps vision tokens to the LM width: Dense, then (GELU, Dense) for each extra layer.

  One layer is LLaVA's "linear" projector, two its "mlp2x_gelu".
  """

  out_dim: int
  num_layers: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[..., Dv] -> float[..., D]."""
    if self.num_layers < 1:
      raise ValueError(f"a projector needs at least one layer, got {self.num_layers}")
    for i in range(self.num_layers):
      if i:
        x = nn.gelu(x, approximate=False)
      x = nn.Dense(self.out_dim, dtype=self.dtype, name=f"dense_{i}",
                   kernel_init=partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                   bias_init=partitioned(nn.initializers.zeros, ("embed",)))(x)
    return x

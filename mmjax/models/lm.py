"""Decoder-only language model: GPT-2, Llama, Gemma and Gemma 2 flavours chosen by fields.

Einsum letters as in `layers`: B batch, T length, D width, V vocabulary.

GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings.
Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output head.
Gemma: Llama's block with GeGLU, RMSNorm by (1 + weight), heads of their own
size (256), multi-query attention, embeddings scaled by sqrt(width), tied.
Gemma 2: Gemma in a `SandwichBlock` (norms before and after each branch),
scores and logits soft-capped (tanh), local (sliding-window) layers between
global ones.

`Model` is set up (not compact) because fusion models drive it piece by piece:
`embed_tokens` -> (splice image embeddings) -> `add_positions` -> `blocks` ->
`final_norm` -> `logits`. Fusion models hold it under the name "lm", so its
parameters keep the plain LM's names and an LM checkpoint loads unchanged.

Returns `(logits float32[B, T, V], aux)` with aux["hidden"] the final hidden
states float[B, T, D] (after the final norm).
"""
from collections.abc import Callable
import dataclasses
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

VARIANTS = {
    "gpt2-124m": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "gpt2-350m": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "gpt2-774m": dict(width=1280, depth=36, num_heads=20, mlp_dim=5120),
    # TinyLlama-1.1B's shape: the 1B-class Llama for the GPU benchmarks.
    "llama-1b": dict(flavour="llama", width=2048, depth=22, num_heads=32, num_kv_heads=4,
                     mlp_dim=5632, vocab_size=32000, max_len=2048),
    # Llama-2-7B's shape: pod-scale training and fine-tuning.
    "llama-7b": dict(flavour="llama", width=4096, depth=32, num_heads=32, mlp_dim=11008,
                     vocab_size=32000, max_len=4096),
    # Tiny models for tests and CPU configs; byte-level vocabulary.
    "gpt2-tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=256, vocab_size=512, max_len=256),
    "llama-tiny": dict(flavour="llama", width=64, depth=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=192, vocab_size=512, max_len=256),
    # Gemma-2B's shape (PaliGemma 1's LM; PaliGemma's vocabulary adds 1024 <loc> and 128 <seg>
    # tokens: vocab_size=257216).
    "gemma-2b": dict(flavour="gemma", width=2048, depth=18, num_heads=8, num_kv_heads=1,
                     head_dim=256, mlp_dim=16384, vocab_size=256000, max_len=8192),
    # Gemma-2 2B and 9B (PaliGemma 2's 3B and 10B LMs).
    "gemma2-2b": dict(flavour="gemma2", width=2304, depth=26, num_heads=8, num_kv_heads=4,
                      head_dim=256, mlp_dim=9216, vocab_size=256000, max_len=8192,
                      query_scalar=256),
    "gemma2-9b": dict(flavour="gemma2", width=3584, depth=42, num_heads=16, num_kv_heads=8,
                      head_dim=256, mlp_dim=14336, vocab_size=256000, max_len=8192,
                      query_scalar=256),
    "gemma-tiny": dict(flavour="gemma", width=64, depth=2, num_heads=4, num_kv_heads=1,
                       head_dim=32, mlp_dim=192, vocab_size=512, max_len=256),
    # A window shorter than the test sequences, so the local layers differ from global ones.
    "gemma2-tiny": dict(flavour="gemma2", width=64, depth=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, mlp_dim=192, vocab_size=512, max_len=256, sliding_window=8,
                        query_scalar=24),
}

FLAVOURS = {  # fields that a flavour sets unless overridden
    "gpt2": dict(positions="learned", norm="layernorm", norm_eps=1e-5, mlp_activation="gelu_tanh",
                 use_bias=True, tie_embeddings=True),
    "llama": dict(positions="rope", norm="rmsnorm", norm_eps=1e-5, mlp_activation="swiglu",
                  use_bias=False, tie_embeddings=False),
    "gemma": dict(positions="rope", norm="gemma_rmsnorm", norm_eps=1e-6, mlp_activation="geglu",
                  use_bias=False, tie_embeddings=True, scale_embeddings=True),
    "gemma2": dict(block="sandwich", positions="rope", norm="gemma_rmsnorm", norm_eps=1e-6,
                   mlp_activation="geglu", use_bias=False, tie_embeddings=True,
                   scale_embeddings=True, attn_soft_cap=50.0, final_soft_cap=30.0,
                   sliding_window=4096, global_every=2),
}
# A scanned stack keeps every residual its body makes, and XLA cannot recompute any of them
# across iterations as it does in an unrolled stack: unremat, GPT-2 124M at 8 x 1024 tokens a
# chip needs 8.4 GiB scanned against 4.7 unrolled (v5e dry run). Scanned, "none" saves as
# "dots_no_batch" (3.4 GiB), so a scan never costs more than the unrolled model.
SCANNED_NONE = "dots_no_batch"


class Embedder(nn.Module):
  """Token embedding table, also the output projection when tied (as in gemma)."""

  vocab_size: int
  width: int
  dtype: jnp.dtype
  extra_tokens: int = 0  # rows past the vocabulary: embedded, never predicted
  scale: bool = False  # multiply embeddings by sqrt(width), in the compute dtype (Gemma)

  def setup(self):
    self.embedding = self.param(
        "embedding", layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        (self.vocab_size + self.extra_tokens, self.width), jnp.float32)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens: int[B, T] -> float[B, T, D]."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return x * jnp.asarray(self.width ** 0.5, self.dtype) if self.scale else x

  def attend(self, x: jax.Array) -> jax.Array:
    """x: float[B, T, D] -> float32[B, T, V]: scores against every embedding, as nn.Embed.attend."""
    table = self.embedding[:self.vocab_size]
    return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), table.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class Block(nn.Module):
  """Pre-norm decoder block (GPT-2, Llama, Gemma): x + attn(norm(x)), then x + mlp(norm(x)).

  Returns (x, cache) so the same module can be scanned.
  """

  num_heads: int
  num_kv_heads: int | None
  head_dim: int | None
  mlp_dim: int
  norm: str
  norm_eps: float
  mlp_activation: str
  use_bias: bool
  rope_theta: float | None
  rope_scaling: dict | None
  depth: int  # of the whole stack: scales the residual projections' init (GPT-2)
  attention_impl: str
  dtype: jnp.dtype
  scores: layers.Scores = layers.Scores()  # the attention scores' scale and soft cap
  window: int | None = None  # local attention over the `window` latest keys; None: global

  @nn.compact
  def __call__(self, x: jax.Array, mask: layers.Mask, positions: jax.Array,
               cache: layers.KVCache | None = None) -> tuple[jax.Array, layers.KVCache | None]:
    """x: float[B, T, D]; positions: int[B, T] -> (float[B, T, D], updated cache or None).

    With a cache (decoding) `mask` spans the cache's S slots; see layers.Attention.
    """
    y, new_cache = self.attention(self.norm_layer("attn_norm")(x), mask, positions, cache)
    x = layers.constrain(x + y.astype(x.dtype))
    y = self.mlp(self.norm_layer("mlp_norm")(x))
    # Training returns no cache: scan would stack every layer's keys and values as outputs.
    return layers.constrain(x + y.astype(x.dtype)), None if cache is None else new_cache

  def norm_layer(self, name: str) -> nn.Module:
    return layers.Norm(self.norm, self.norm_eps, name=name)

  def attention(self, x, mask, positions, cache):
    if self.window is not None:
      mask = mask.replace(window=self.window)
    return layers.Attention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        use_bias=self.use_bias, scores=self.scores, rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling, attention_impl=self.attention_impl,
        kernel_init=nn.initializers.normal(0.02), out_init=self.residual_init,
        dtype=self.dtype, name="attn",
    )(x, mask=mask, positions=positions, cache=cache)

  def mlp(self, x):
    return layers.Mlp(self.mlp_dim, activation=self.mlp_activation, use_bias=self.use_bias,
                      kernel_init=nn.initializers.normal(0.02), out_init=self.residual_init,
                      dtype=self.dtype, name="mlp")(x)

  @property
  def residual_init(self):
    return nn.initializers.normal(0.02 / (2 * self.depth) ** 0.5)


class SandwichBlock(Block):
  """Gemma 2's block: each branch normed before and after, x + norm(attn(norm(x))), then
  x + norm(mlp(norm(x)))."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: layers.Mask, positions: jax.Array,
               cache: layers.KVCache | None = None) -> tuple[jax.Array, layers.KVCache | None]:
    """As Block.__call__."""
    y, new_cache = self.attention(self.norm_layer("attn_norm")(x), mask, positions, cache)
    x = layers.constrain(x + self.norm_layer("post_attn_norm")(y).astype(x.dtype))
    y = self.mlp(self.norm_layer("mlp_norm")(x))
    y = self.norm_layer("post_mlp_norm")(y)
    return layers.constrain(x + y.astype(x.dtype)), None if cache is None else new_cache


BLOCKS = {"pre_norm": Block, "sandwich": SandwichBlock}


class _Model(nn.Module):
  """Decoder LM; build it through `Model(variant=...)`."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  flavour: str = "gpt2"  # or "llama", "gemma", "gemma2"; sets the defaults of the fields below
  block: str = "pre_norm"  # a key of BLOCKS: "sandwich" (Gemma 2) norms after each branch too
  vocab_size: int = 50257
  extra_tokens: int = 0  # embedded, never predicted: Llama 3.2 Vision's 8 rows past the vocabulary
  max_len: int = 1024  # learned positions' table size; RoPE models only check it
  num_kv_heads: int | None = None  # None: = num_heads
  head_dim: int | None = None  # None: width // num_heads
  positions: str = "learned"  # or "rope"
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None  # e.g. Llama 3.1's {"rope_type": "llama3", ...}
  norm: str = "layernorm"  # or "rmsnorm"
  norm_eps: float = 1e-5
  mlp_activation: str = "gelu_tanh"  # or "swiglu", "geglu", "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # token embeddings x sqrt(width) (Gemma)
  query_scalar: float | None = None  # attention scores / sqrt(this); None: head_dim
  attn_soft_cap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
  final_soft_cap: float | None = None  # output logits -> cap * tanh(logits / cap) (Gemma 2)
  sliding_window: int | None = None  # local layers attend to the window's latest keys only
  global_every: int = 1  # with a window: layer i is global when (i + 1) % global_every == 0
  # (Gemma 2: 2, local and global alternate; 1: every layer global; 0: none)
  scan_layers: bool = False  # one scanned block (faster compiles) or depth unrolled ones
  remat_policy: str = "none"  # or a key of layers.REMAT_POLICIES; scanned, "none" is SCANNED_NONE
  attention_impl: str = "xla"  # or "auto", "cudnn", "splash"
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  def setup(self):
    if self.positions not in ("learned", "rope"):
      raise ValueError(f"LM positions must be 'learned' or 'rope', got {self.positions!r}")
    if self.block not in BLOCKS:
      raise ValueError(f"LM block must be one of {sorted(BLOCKS)}, got {self.block!r}")
    self.embedder = Embedder(self.vocab_size, self.width, self.dtype, self.extra_tokens,
                             self.scale_embeddings)
    if self.positions == "learned":
      self.pos_embedding = self.param(
          "pos_embedding", layers.partitioned(nn.initializers.normal(0.01), (None, "embed")),
          (self.max_len, self.width), jnp.float32)
    block = layers.remat(BLOCKS[self.block], self.block_remat_policy, scanned=self.scan_layers)
    if self.scan_layers:
      self.scanned_blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})(**self.block_fields(), name="blocks")
    else:
      self.blocks = [block(**self.block_fields(i), name=f"block_{i}")
                     for i in range(self.depth)]
    self.final_norm = layers.Norm(self.norm, self.norm_eps)
    if not self.tie_embeddings:
      # Multiplied in the compute dtype, summed and returned in float32, as the tied head does:
      # the loss's softmax over the vocabulary sees no bfloat16 rounding of the logits.
      self.head = nn.Dense(
          self.vocab_size, use_bias=False, dtype=self.dtype,
          dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32),
          kernel_init=layers.partitioned(nn.initializers.normal(0.02), ("embed", "vocab")))

  @property
  def block_remat_policy(self) -> str:
    return SCANNED_NONE if self.scan_layers and self.remat_policy == "none" else (
        self.remat_policy)

  def window(self, layer: int) -> int | None:
    """The attention window of block `layer`; None: global."""
    is_global = self.global_every and (layer + 1) % self.global_every == 0
    return None if self.sliding_window is None or is_global else self.sliding_window

  def block_fields(self, layer: int | None = None) -> dict:
    """Block `layer`'s fields; None: every block's, the same for all (a scanned stack:
    the LM's, deep fusion's groups)."""
    if layer is None:
      windows = {self.window(i) for i in range(self.depth)}
      if len(windows) > 1:
        raise ValueError("an LM whose local and global layers alternate (Gemma 2) runs its "
                         "blocks unrolled: set lm.scan_layers=False")
      window = windows.pop()
    else:
      window = self.window(layer)
    return dict(
        window=window,
        scores=layers.Scores(self.query_scalar, self.attn_soft_cap),
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, norm=self.norm, norm_eps=self.norm_eps,
        mlp_activation=self.mlp_activation, use_bias=self.use_bias,
        rope_theta=self.rope_theta if self.positions == "rope" else None,
        rope_scaling=self.rope_scaling, depth=self.depth,
        attention_impl=self.attention_impl, dtype=self.dtype)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               prefix_len: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens: int[B, T] -> (logits float32[B, T, V], aux).

    positions: int[B, T], default 0..T-1 (packed data restarts them per example).
    segment_ids: int[B, T], packed examples never attend to each other.
    prefix_len: int[B], bidirectional attention over the first prefix_len tokens.
    """
    mask = layers.Mask(causal=True, prefix_len=prefix_len, segment_ids=segment_ids)
    return self.from_embeddings(self.embed_tokens(tokens), mask=mask, positions=positions)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens: int[B, T] -> float[B, T, D], before positions are added."""
    return self.embedder.encode(tokens)

  def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Adds learned position embeddings (RoPE models rotate inside attention instead).

    x: float[B, T, D]; positions: int[B, T] -> float[B, T, D].
    """
    if x.shape[1] > self.max_len:
      raise ValueError(f"sequence length {x.shape[1]} exceeds the LM's max_len={self.max_len}")
    if self.positions == "learned":
      x = x + jnp.take(self.pos_embedding, positions, axis=0).astype(x.dtype)
    return layers.constrain(x)

  @property
  def language(self) -> "_Model":
    """Every text model's LM is `model.language`: a fusion model's tower, or the LM itself."""
    return self

  def from_embeddings(self, x: jax.Array, *, mask: layers.Mask,
                      positions: jax.Array | None = None,
                      caches: list[layers.KVCache] | layers.KVCache | None = None,
                      before_block: Callable[[int, jax.Array], jax.Array] | None = None,
                      ) -> tuple[jax.Array, dict]:
    """x: float[B, T, D] input embeddings -> (logits float32[B, T, V], aux).

    caches: from `empty_caches` when decoding (one per block, or one stacked
    along a leading layer axis when scanned); aux["caches"] returns them updated.
    before_block(i, x) -> x runs before block i (deep fusion's cross-attention
    blocks plug in here); only unrolled blocks take it.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    x = self.add_positions(x, positions)
    if self.scan_layers:
      if before_block is not None:
        raise ValueError("a scanned LM (scan_layers=True) runs its blocks as one loop: nothing "
                         "can run between them")
      x, new_caches = self.scanned_blocks(x, mask, positions, caches)
    else:
      new_caches = []
      for i, block in enumerate(self.blocks):
        if before_block is not None:
          x = before_block(i, x)
        x, cache = block(x, mask, positions, None if caches is None else caches[i])
        new_caches.append(cache)
    x = self.final_norm(x)
    aux = {"hidden": x}
    if caches is not None:
      aux["caches"] = new_caches
    return self.logits(x), aux

  def logits(self, x: jax.Array) -> jax.Array:
    """x: float[B, T, D] normed hidden states -> float32[B, T, V]."""
    logits = self.embedder.attend(x) if self.tie_embeddings else self.head(x)
    return layers.soft_cap(logits, self.final_soft_cap)


def Model(variant: str | None = None, **overrides) -> _Model:  # pylint: disable=invalid-name
  """Decoder LM from a variant name ("gpt2-124m", "llama-1b", ...) and field overrides."""
  if variant is not None and variant not in VARIANTS:
    raise ValueError(f"unknown LM variant {variant!r}; known: {sorted(VARIANTS)}")
  fields = dict(VARIANTS[variant]) if variant else {}
  fields.update(overrides)
  flavour = fields.get("flavour", "gpt2")
  if flavour not in FLAVOURS:
    raise ValueError(f"LM flavour must be one of {sorted(FLAVOURS)}, got {flavour!r}")
  fields = {**FLAVOURS[flavour], **fields}
  known = {f.name for f in dataclasses.fields(_Model)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown LM field(s) {unknown}; known: {sorted(known - {'parent', 'name'})}")
  return _Model(**fields)


def empty_caches(model: _Model, batch: int, length: int) -> list[layers.KVCache] | layers.KVCache:
  """Zeroed self-attention caches of `length` slots for every block of `model`."""
  cache = layers.KVCache.empty(batch, length, model.num_kv_heads or model.num_heads,
                               model.head_dim or model.width // model.num_heads, model.dtype)
  if model.scan_layers:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (model.depth, *a.shape)), cache)
  return [cache] * model.depth


def stack_layers(params: dict, depth: int) -> dict:
  """Unrolled params (block_0 ... block_{depth-1}) -> scanned params (blocks, leading axis)."""
  params = dict(params)
  blocks = [params.pop(f"block_{i}") for i in range(depth)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_layers(params: dict, depth: int) -> dict:
  """Scanned params -> unrolled params; the inverse of `stack_layers`."""
  params = dict(params)
  blocks = params.pop("blocks")
  for i in range(depth):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return params

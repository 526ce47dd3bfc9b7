"""Vision Transformer (Dosovitskiy et al. 2020), big_vision-style.

Einsum letters as in `layers`: B batch, P patches (+1 with a cls token),
D width. `Model(variant="B/16")` builds ViT-B with 16 px patches.

Returns `(out, aux)`: out is the logits when `num_classes` is set, else the
pooled vector; aux holds
  "features": float[B, P, D] final features (after the final norm),
  "pooled":   float[B, D],
  "block_i":  float[B, P, D] output of block i (before any final norm), so a
              fusion model can read an earlier layer, as LLaVA does.
"""
import dataclasses
import re

from flax import linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

VARIANTS = {  # width, depth, mlp_dim, num_heads
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    # Tiny towers for tests and CPU configs.
    "mu": dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    "nano": dict(width=64, depth=2, mlp_dim=128, num_heads=4),
}
POOLS = ("cls", "gap", "map", "none")


def variant_fields(variant: str) -> dict:
  """"B/16" -> the ViT-B fields with patch_size=16."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in VARIANTS:
    raise ValueError(f"ViT variant must look like 'B/16' with a size in {sorted(VARIANTS)}, "
                     f"got {variant!r}")
  return {**VARIANTS[match.group(1)], "patch_size": int(match.group(2))}


class Block(nn.Module):
  """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  mlp_dim: int
  mlp_activation: str
  norm_eps: float
  attention_impl: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, P, D] -> float[B, P, D]."""
    y = layers.Norm("layernorm", self.norm_eps, name="attn_norm")(x)
    y, _ = layers.Attention(
        num_heads=self.num_heads, use_bias=True, attention_impl=self.attention_impl,
        dtype=self.dtype, name="attn")(y)
    x = layers.constrain(x + y.astype(x.dtype))
    y = layers.Norm("layernorm", self.norm_eps, name="mlp_norm")(x)
    y = layers.Mlp(self.mlp_dim, activation=self.mlp_activation, dtype=self.dtype, name="mlp")(y)
    return layers.constrain(x + y.astype(x.dtype))


class MapHead(nn.Module):
  """Multihead attention pooling (big_vision's MAP): one learned probe queries the tokens."""

  num_heads: int
  mlp_dim: int
  mlp_activation: str
  norm_eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, P, D] -> float[B, D]."""
    D = x.shape[-1]
    probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(),
                                                   (None, None, "embed")), (1, 1, D))
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, D)).astype(x.dtype)
    x, _ = layers.Attention(num_heads=self.num_heads, use_bias=True, dtype=self.dtype,
                            name="attn")(probe, x)
    y = layers.Norm("layernorm", self.norm_eps, name="norm")(x)
    x = x + layers.Mlp(self.mlp_dim, activation=self.mlp_activation, dtype=self.dtype,
                       name="mlp")(y).astype(x.dtype)
    return x[:, 0]


class _Model(nn.Module):
  """ViT encoder; build it through `Model(variant=...)`."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  num_classes: int | None = None  # None: no classification head
  image_size: int = 224  # resolution the position embeddings are laid out for
  pool: str = "cls"  # or "gap", "map", "none"
  posemb: str = "learn"  # or "sincos2d": fixed, for any grid (big_vision's)
  posemb_resize: str = "bilinear"  # or "bicubic" (HF, timm): learned positions on another grid
  pre_norm: bool = False  # a norm before the blocks, as in CLIP
  patch_bias: bool = True  # CLIP's patch embedding has no bias
  mlp_activation: str = "gelu"  # "quick_gelu" for OpenAI CLIP
  norm_eps: float = 1e-6  # HF ViT uses 1e-12, CLIP 1e-5
  attention_impl: str = "xla"  # or "auto", "cudnn", "splash"
  remat_policy: str = "none"  # or a key of layers.REMAT_POLICIES
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict]:
    """images: float[B, H, W, 3] -> (logits float[B, C] or pooled float[B, D], aux)."""
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool must be one of {POOLS}, got {self.pool!r}")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch size {p}")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                use_bias=self.patch_bias, name="embedding",
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(images)
    B, gh, gw, D = x.shape
    x = x.reshape(B, gh * gw, D)

    if self.posemb == "sincos2d":  # patches only: the cls token, if any, has no position
      x = x + posemb_sincos_2d(gh, gw, D).astype(x.dtype)
    elif self.posemb != "learn":
      raise ValueError(f"ViT posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    has_cls = self.pool == "cls"
    if has_cls:
      cls = self.param("cls", layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, D))
      x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)).astype(x.dtype), x], axis=1)
    if self.posemb == "learn":
      grid = self.image_size // p
      pos = self.param("pos_embedding",
                       layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, int(has_cls) + grid * grid, D))
      x = x + interpolate_positions(pos, has_cls, grid, (gh, gw),
                                    self.posemb_resize).astype(x.dtype)
    if self.pre_norm:
      x = layers.Norm("layernorm", self.norm_eps, name="pre_norm")(x)
    x = layers.constrain(x)

    aux = {}
    block = layers.remat(Block, self.remat_policy)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                self.attention_impl, self.dtype, name=f"block_{i}")(x)
      aux[f"block_{i}"] = x
    x = layers.Norm("layernorm", self.norm_eps, name="final_norm")(x)
    aux["features"] = x

    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = jnp.mean(x, axis=1)
    elif self.pool == "map":
      pooled = MapHead(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                       self.dtype, name="map_head")(x)
    else:
      return x, aux
    aux["pooled"] = pooled
    if self.num_classes is None:
      return pooled, aux
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=layers.partitioned(nn.initializers.zeros, ("embed", None)),
                      bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(pooled)
    return logits.astype(jnp.float32), aux


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-d sine-cosine position embeddings float32[1, h * w, width] (big_vision's)."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / max(width // 4 - 1, 1))
  y = jnp.einsum("m,d->md", y.reshape(-1), omega)
  x = jnp.einsum("m,d->md", x.reshape(-1), omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


POSEMB_RESIZE = ("bilinear", "bicubic")


def resize_weights(size: int, target: int, method: str) -> jax.Array:
  """float32[target, size]: row i mixes the source positions that target position i reads.

  Half-pixel centres and no antialiasing, with PyTorch's kernels (its bicubic
  is Keys' with a = -0.75, edges repeated), so a model resized here matches
  one resized by HF's interpolate_pos_encoding or timm.
  """
  if method not in POSEMB_RESIZE:
    raise ValueError(f"ViT posemb_resize must be one of {POSEMB_RESIZE}, got {method!r}")
  source = (jnp.arange(target) + 0.5) * size / target - 0.5
  if method == "bilinear":
    source = jnp.maximum(source, 0.0)
    left = jnp.floor(source)
    taps, weights = left[:, None] + jnp.arange(2), jnp.stack([1 - (source - left),
                                                              source - left], axis=1)
  else:
    a = -0.75
    left = jnp.floor(source)
    distance = jnp.abs(source[:, None] - (left[:, None] + jnp.arange(-1, 3)))  # [target, 4]
    near = ((a + 2) * distance - (a + 3)) * distance ** 2 + 1  # |d| <= 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a  # 1 < |d| < 2
    taps, weights = left[:, None] + jnp.arange(-1, 3), jnp.where(distance <= 1, near, far)
  taps = jnp.clip(taps, 0, size - 1).astype(jnp.int32)
  return jnp.zeros((target, size)).at[jnp.arange(target)[:, None], taps].add(weights)


def interpolate_positions(pos: jax.Array, has_cls: bool, grid: int, target: tuple[int, int],
                          method: str = "bilinear") -> jax.Array:
  """Resizes float[1, (1+) grid*grid, D] position embeddings to a target patch grid.

  The cls position (if any) is kept as is; the patch grid is resized by
  `resize_weights` along each axis ("bicubic", as HF and timm do, or "bilinear").
  """
  if target == (grid, grid):
    return pos
  cls_pos, patch_pos = pos[:, :int(has_cls)], pos[:, int(has_cls):]
  D = pos.shape[-1]
  rows, columns = (resize_weights(grid, n, method) for n in target)
  patch_pos = jnp.einsum("hH,wW,HWD->hwD", rows, columns, patch_pos.reshape(grid, grid, D))
  return jnp.concatenate([cls_pos, patch_pos.reshape(1, target[0] * target[1], D)], axis=1)


def Model(variant: str | None = None, num_classes: int | None = None, **overrides) -> _Model:  # pylint: disable=invalid-name
  """ViT from a variant name ("Ti/16", "B/16", "L/14", ...) and field overrides."""
  fields = variant_fields(variant) if variant else {}
  fields.update(overrides)
  known = {f.name for f in dataclasses.fields(_Model)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown ViT field(s) {unknown}; known: {sorted(known - {'parent', 'name'})}")
  return _Model(num_classes=num_classes, **fields)

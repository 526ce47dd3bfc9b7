"""Vision Transformer (Dosovitskiy et al. 2020), big_vision-style.

Einsum letters as in `layers`: B batch, P patches (+1 with a cls token),
D width. `Model(variant="B/16")` builds ViT-B with 16 px patches.

Returns `(out, aux)`: out is the logits when `num_classes` is set, else the
pooled vector; aux holds
  "features": float[B, P, D] final features (after the final norm),
  "pooled":   float[B, D],
  "block_i":  float[B, P, D] output of block i (before any final norm), so a
              fusion model can read an earlier layer, as LLaVA does.

Native resolution (NaViT's "patch n' pack", Dehghani et al. 2023): the model
also takes `Patches`, images of different sizes and aspect ratios cut into
patches and packed into rows of a fixed budget of P slots. Each patch attends
only to its own image's patches, gets the position of its (row, column) in its
own image's grid, and pooling is per image (M images per row at most): pooled
float[B, M, D]. One compile serves every mix of sizes, and each image's
features equal those of the image run alone as a dense batch.
"""
import dataclasses
import re

from flax import linen as nn
from flax import struct
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


@struct.dataclass
class Patches:
  """Images at their own sizes, cut into p x p patches and packed into rows of P slots.

  Built by `mmjax.data.patches.pack`; M is the most images a row holds.
  """

  pixels: jax.Array  # float[B, P, p * p * 3]: each patch's pixels, (y, x, channel) order
  image_ids: jax.Array  # int32[B, P]: 1 + the index of the patch's image in its row; 0: padding
  coords: jax.Array  # int32[B, P, 2]: (row, column) in its image's grid; (-1, -1): a cls slot
  grids: jax.Array  # int32[B, M, 2]: each image's grid (rows, columns); (0, 0): no image

  @property
  def is_cls(self) -> jax.Array:
    return self.coords[..., 0] < 0

  def image_index(self) -> jax.Array:
    """int32[B, P]: the index of each slot's image in its row; PADDING for padding."""
    return jnp.where(self.image_ids > 0, self.image_ids - 1, PADDING)

  def membership(self) -> jax.Array:
    """bool[B, P, M]: whether slot p belongs to image m."""
    return self.image_ids[..., None] == jnp.arange(1, self.grids.shape[1] + 1)


PADDING = 2 ** 30  # the image index of padding slots: past any real image


def layer_features(aux: dict, layer: int | None, depth: int) -> jax.Array:
  """A fusion model's read of the tower: aux["features"] (the final normed tokens) for None,
  else block `layer`'s output (negative: from the last block, -2 LLaVA's, -1 IDEFICS')."""
  return aux["features"] if layer is None else aux[f"block_{layer % depth}"]


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
  attn_bias: bool = True  # Llama 3.2 Vision's tower has none

  @nn.compact
  def __call__(self, x: jax.Array, mask: layers.Mask) -> jax.Array:
    """x: float[B, P, D] -> float[B, P, D]."""
    y = layers.Norm("layernorm", self.norm_eps, name="attn_norm")(x)
    y, _ = layers.Attention(
        num_heads=self.num_heads, use_bias=self.attn_bias, attention_impl=self.attention_impl,
        dtype=self.dtype, name="attn")(y, mask=mask)
    x = self.join(x, y, "attn")
    y = layers.Norm("layernorm", self.norm_eps, name="mlp_norm")(x)
    y = layers.Mlp(self.mlp_dim, activation=self.mlp_activation, dtype=self.dtype, name="mlp")(y)
    return self.join(x, y, "mlp")

  def join(self, x: jax.Array, y: jax.Array, branch: str) -> jax.Array:
    """The residual stream x plus the output y of its "attn" or "mlp" branch."""
    del branch
    return layers.constrain(x + y.astype(x.dtype))


class MapHead(nn.Module):
  """Multihead attention pooling (big_vision's MAP): one learned probe queries the tokens."""

  num_heads: int
  mlp_dim: int
  mlp_activation: str
  norm_eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, membership: jax.Array | None = None) -> jax.Array:
    """x: float[B, P, D] -> float[B, D]; with membership bool[B, P, M] (packed images), one
    probe per image, reading only its patches -> float[B, M, D]."""
    D = x.shape[-1]
    probe = self.param("probe", layers.partitioned(nn.initializers.xavier_uniform(),
                                                   (None, None, "embed")), (1, 1, D))
    M = 1 if membership is None else membership.shape[-1]
    probe = jnp.broadcast_to(probe, (x.shape[0], M, D)).astype(x.dtype)
    mask = layers.Mask() if membership is None else layers.Mask(
        explicit=jnp.swapaxes(membership, 1, 2))
    x, _ = layers.Attention(num_heads=self.num_heads, use_bias=True, dtype=self.dtype,
                            name="attn")(probe, x, mask=mask)
    y = layers.Norm("layernorm", self.norm_eps, name="norm")(x)
    x = x + layers.Mlp(self.mlp_dim, activation=self.mlp_activation, dtype=self.dtype,
                       name="mlp")(y).astype(x.dtype)
    return x[:, 0] if membership is None else x


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
  # sincos2d at "absolute" patch coordinates, or "fractional": scaled to the image_size grid (as
  # learned positions are resized), so a position names the same place in any size (NaViT's).
  posemb_coords: str = "absolute"
  pre_norm: bool = False  # a norm before the blocks, as in CLIP
  patch_bias: bool = True  # CLIP's patch embedding has no bias
  mlp_activation: str = "gelu"  # "quick_gelu" for OpenAI CLIP
  norm_eps: float = 1e-6  # HF ViT uses 1e-12, CLIP 1e-5
  attention_impl: str = "xla"  # or "auto", "cudnn", "splash"
  remat_policy: str = "none"  # or a key of layers.REMAT_POLICIES
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, images: jax.Array | Patches) -> tuple[jax.Array, dict]:
    """images: float[B, H, W, 3] or Patches -> (logits float[B, (M,) C] or pooled float[B,
    (M,) D], aux); M only for Patches."""
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool must be one of {POOLS}, got {self.pool!r}")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"ViT posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    if self.posemb_coords not in ("absolute", "fractional"):
      raise ValueError("ViT posemb_coords must be 'absolute' or 'fractional', got "
                       f"{self.posemb_coords!r}")
    p = self.patch_size
    packed = isinstance(images, Patches)
    if packed:
      B, P = images.image_ids.shape
      pixels = images.pixels.reshape(B * P, p, p, 3)
    else:
      if images.shape[1] % p or images.shape[2] % p:
        raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch size {p}")
      pixels = images
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                use_bias=self.patch_bias, name="embedding",
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(pixels)
    D = x.shape[-1]
    has_cls = self.pool == "cls"
    cls = self.param("cls", layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
                     (1, 1, D)) if has_cls else None
    pos = self.param("pos_embedding",
                     layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, int(has_cls) + (self.image_size // p) ** 2, D)
                     ) if self.posemb == "learn" else None
    if packed:
      x = self._embed_packed(x.reshape(B, P, D), images, cls, pos)
      mask = layers.Mask(segment_ids=images.image_ids)
    else:
      x = self._embed_dense(x, cls, pos)
      mask = layers.Mask()
    if self.pre_norm:
      x = layers.Norm("layernorm", self.norm_eps, name="pre_norm")(x)
    x = layers.constrain(x)

    aux = {}
    block = layers.remat(Block, self.remat_policy)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                self.attention_impl, self.dtype, name=f"block_{i}")(x, mask)
      aux[f"block_{i}"] = x
    x = layers.Norm("layernorm", self.norm_eps, name="final_norm")(x)
    aux["features"] = x

    if self.pool == "none":
      return x, aux
    if self.pool == "map":
      pooled = MapHead(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                       self.dtype, name="map_head")(x, images.membership() if packed else None)
    elif not packed:
      pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    else:  # the cls slot of each image, or the mean of its patches
      pick = images.membership() & (images.is_cls == has_cls)[..., None]  # [B, P, M]
      pooled = jnp.einsum("BPM,BPD->BMD", pick.astype(x.dtype), x) / jnp.maximum(
          jnp.sum(pick, axis=1), 1)[..., None].astype(x.dtype)
    aux["pooled"] = pooled
    if self.num_classes is None:
      return pooled, aux
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=layers.partitioned(nn.initializers.zeros, ("embed", None)),
                      bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(pooled)
    return logits.astype(jnp.float32), aux

  def _embed_dense(self, x: jax.Array, cls: jax.Array | None,
                   pos: jax.Array | None) -> jax.Array:
    """Patch embeddings float[B, gh, gw, D] -> tokens float[B, (1 +) gh * gw, D] with positions."""
    B, gh, gw, D = x.shape
    x = x.reshape(B, gh * gw, D)
    if self.posemb == "sincos2d":  # patches only: the cls token, if any, has no position
      rows, columns = jnp.mgrid[:gh, :gw]
      x = x + self._sincos(rows.reshape(-1), columns.reshape(-1), gh, gw, D).astype(x.dtype)
    if cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)).astype(x.dtype), x], axis=1)
    if pos is not None:
      x = x + interpolate_positions(pos, cls is not None, self.image_size // self.patch_size,
                                    (gh, gw), self.posemb_resize).astype(x.dtype)
    return x

  def _embed_packed(self, x: jax.Array, images: Patches, cls: jax.Array | None,
                    pos: jax.Array | None) -> jax.Array:
    """Patch embeddings float[B, P, D] -> tokens float[B, P, D]: each slot gets what the same
    token of its image run alone would (`_embed_dense`)."""
    D = x.shape[-1]
    is_cls = images.is_cls[..., None]
    rows, columns = images.coords[..., 0], images.coords[..., 1]
    index = jnp.clip(images.image_ids - 1, 0)[..., None]  # [B, P, 1]
    image_grid = jnp.take_along_axis(images.grids, index, axis=1)  # [B, P, 2]: (gh, gw)
    if self.posemb == "sincos2d":
      embedding = self._sincos(rows, columns, image_grid[..., 0], image_grid[..., 1], D)
      x = x + jnp.where(is_cls, 0.0, embedding).astype(x.dtype)
    if cls is not None:
      x = jnp.where(is_cls, cls.astype(x.dtype), x)
    if pos is not None:
      has_cls = cls is not None
      grid = self.image_size // self.patch_size
      row_weights = resize_weights_at(rows, image_grid[..., 0], grid, self.posemb_resize)
      column_weights = resize_weights_at(columns, image_grid[..., 1], grid, self.posemb_resize)
      table = pos[0, int(has_cls):].reshape(grid, grid, D)
      patch_pos = jnp.einsum("BPh,BPw,hwD->BPD", row_weights, column_weights, table)
      if has_cls:
        patch_pos = jnp.where(is_cls, pos[0, 0], patch_pos)
      x = x + patch_pos.astype(x.dtype)
    return x

  def _sincos(self, rows: jax.Array, columns: jax.Array, gh, gw, width: int) -> jax.Array:
    """sincos2d at patch (row, column) of a gh x gw grid, by posemb_coords -> float32[..., D]."""
    if self.posemb_coords == "fractional":  # half-pixel centres, as resize_weights
      grid = self.image_size // self.patch_size
      rows = (rows + 0.5) * grid / jnp.maximum(gh, 1) - 0.5
      columns = (columns + 0.5) * grid / jnp.maximum(gw, 1) - 0.5
    return sincos_2d(rows, columns, width)


def sincos_2d(y: jax.Array, x: jax.Array, width: int, temperature: float = 10_000.0) -> jax.Array:
  """The sine-cosine embedding of patch coordinates: y, x [...] -> float32[..., width]."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / max(width // 4 - 1, 1))
  y = jnp.einsum("...,d->...d", y, omega)
  x = jnp.einsum("...,d->...d", x, omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


POSEMB_RESIZE = ("bilinear", "bicubic")


def resize_weights(size: int, target: int, method: str) -> jax.Array:
  """float32[target, size]: row i mixes the source positions that target position i reads.

  Half-pixel centres and no antialiasing, with PyTorch's kernels (its bicubic
  is Keys' with a = -0.75, edges repeated), so a model resized here matches
  one resized by HF's interpolate_pos_encoding or timm.
  """
  return resize_weights_at(jnp.arange(target), jnp.asarray(target), size, method)


def resize_weights_at(index: jax.Array, target: jax.Array, size: int, method: str) -> jax.Array:
  """`resize_weights`' row for position index of a target-long axis, for any shape of index
  and target (int[...], target >= 1 where it matters) -> float32[..., size]."""
  if method not in POSEMB_RESIZE:
    raise ValueError(f"ViT posemb_resize must be one of {POSEMB_RESIZE}, got {method!r}")
  source = (index + 0.5) * size / jnp.maximum(target, 1) - 0.5
  if method == "bilinear":
    source = jnp.maximum(source, 0.0)
    left = jnp.floor(source)
    taps = left[..., None] + jnp.arange(2)
    weights = jnp.stack([1 - (source - left), source - left], axis=-1)
  else:
    a = -0.75
    left = jnp.floor(source)
    taps = left[..., None] + jnp.arange(-1, 3)
    distance = jnp.abs(source[..., None] - taps)  # [..., 4]
    near = ((a + 2) * distance - (a + 3)) * distance ** 2 + 1  # |d| <= 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a  # 1 < |d| < 2
    weights = jnp.where(distance <= 1, near, far)
  taps = jnp.clip(taps, 0, size - 1).astype(jnp.int32)
  return jnp.einsum("...k,...ks->...s", weights, jax.nn.one_hot(taps, size, dtype=weights.dtype))


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

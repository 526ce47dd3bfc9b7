"""Llama 3.2 Vision's image encoder: a ViT over the tiles of each image.

Einsum letters as in `layers`: B batch, I images per sample, N tiles per image
(max_tiles), P = 1 + patches per tile (a cls token first), Q = P rounded up to
a multiple of 8 (the rest are padding slots), D width, A tile arrangements.

A processor (mmjax.data.tiles) resizes each image onto the canvas of the best
of the A arrangements of at most N tiles (`aspect_ratios`), pads it, and cuts
it into tiles of image_size x image_size; `aspect_ratio_ids` (1..A, 0: no
image) names the arrangement. Then, per image:

  each tile's patches + tanh(pre_gate) * pre_tile[arrangement, tile]
  [cls; patches] + (1 - tanh(pos_gate)) * pos + tanh(pos_gate) * tile_pos[arrangement, tile]
  pre_norm, padded to Q slots; the N tiles form one sequence of N * Q tokens
  `depth` plain blocks, post_norm, + tanh(post_gate) * post_tile[arrangement, tile]
  `global_depth` blocks with tanh gates on their attention and MLP

The output keeps every tile's P tokens (padding slots dropped) with the
final features beside the outputs of the `feature_layers` plain blocks:
float[B, I, N * P, D * (1 + K)], laid out as Meta's checkpoints expect.

Masking is Meta's (and transformers'): a pair of tokens is masked only when
both are padding (a padding slot, or a tile the image does not use), so real
tokens also read the padding ones. A checkpoint's numbers depend on it.
"""
import math

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models import vit

# Llama 3.2 Vision's pre- and post-norms are torch's default LayerNorm, whatever norm_eps says.
OUTER_NORM_EPS = 1e-5
SLOT_MULTIPLE = 8  # each tile's tokens are padded to a multiple of this


@struct.dataclass
class Tiles:
  """Images cut into tiles by `mmjax.data.tiles` (Llama 3.2 Vision's processor)."""

  pixels: jax.Array  # float[B, I, N, h, w, 3]: each image's tiles, zeros past its own
  aspect_ratio_ids: jax.Array  # int32[B, I]: 1 + the index of the arrangement; 0: no image
  tile_mask: jax.Array  # bool[B, I, N]: the tiles the image uses (tile 0 always)


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
  """The tile arrangements (rows, columns) of at most max_tiles tiles, in the processor's
  order: aspect_ratio_id k + 1 is arrangement k."""
  return [(rows, columns) for rows in range(1, max_tiles + 1)
          for columns in range(1, max_tiles + 1) if rows * columns <= max_tiles]


class GatedBlock(vit.Block):
  """vit.Block whose attention and MLP branches are scaled by tanh gates (the global layers)."""

  def join(self, x: jax.Array, y: jax.Array, branch: str) -> jax.Array:
    gate = jnp.tanh(self.param(f"{branch}_gate", layers.partitioned(
        nn.initializers.constant(math.pi / 4), (None,)), (1,)))
    return super().join(x, gate * y, branch)


class Model(nn.Module):
  """Tiled ViT encoder (Llama 3.2 Vision's)."""

  width: int
  depth: int  # plain blocks
  global_depth: int  # gated blocks after them
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int = 448  # a tile's side
  max_tiles: int = 4  # N
  feature_layers: tuple[int, ...] = (3, 7, 15, 23, 30)  # plain blocks whose outputs are kept
  norm_eps: float = 1e-5  # the blocks' norms
  mlp_activation: str = "gelu"
  attention_impl: str = "xla"  # or "auto", "cudnn", "splash"
  remat_policy: str = "none"  # or a key of layers.REMAT_POLICIES
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @property
  def tokens_per_tile(self) -> int:
    """P: a tile's cls token and patches."""
    return 1 + (self.image_size // self.patch_size) ** 2

  @property
  def tokens_per_image(self) -> int:
    """N * P: the visual tokens of one image (every tile slot's)."""
    return self.max_tiles * self.tokens_per_tile

  @property
  def slots_per_image(self) -> int:
    """N * Q: the tokens the blocks run over for one image, padding slots included."""
    return self.max_tiles * -(-self.tokens_per_tile // SLOT_MULTIPLE) * SLOT_MULTIPLE

  @property
  def features_dim(self) -> int:
    return self.width * (1 + len(self.feature_layers))

  @nn.compact
  def __call__(self, tiles: Tiles) -> tuple[jax.Array, dict]:
    """tiles -> (float[B, I, N * P, D * (1 + K)], aux with "block_i": float[B * I, N * Q, D])."""
    bad = [i for i in self.feature_layers if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"tiled ViT feature_layers {bad} outside its blocks 0..{self.depth - 1}")
    B, I, N, h, w, _ = tiles.pixels.shape
    p, D = self.patch_size, self.width
    if (h, w) != (self.image_size, self.image_size) or N != self.max_tiles:
      raise ValueError(f"tiles of {N} x {h}x{w} px do not match the tiled ViT's "
                       f"{self.max_tiles} x {self.image_size}x{self.image_size}")
    A = len(aspect_ratios(N))
    x = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                name="embedding", kernel_init=layers.partitioned(
                    nn.initializers.lecun_normal(), (None, None, None, "embed")),
                )(tiles.pixels.reshape(B * I * N, h, w, 3))
    P = 1 + x.shape[1] * x.shape[2]
    x = x.reshape(B * I, N, P - 1, D)
    ids = tiles.aspect_ratio_ids.reshape(B * I)

    def table(name: str, shape: tuple[int, ...], init=nn.initializers.normal(0.02)):
      return self.param(name, layers.partitioned(init, (None,) * len(shape)), shape)

    def gate(name: str) -> jax.Array:
      return jnp.tanh(table(name, (1,), nn.initializers.zeros))

    def tile_embedding(name: str, per_tile: int) -> jax.Array:  # -> float[B*I, N, per_tile, D]
      rows = jnp.take(table(name, (A + 1, N * per_tile * D)), ids, axis=0)
      return rows.reshape(B * I, N, per_tile, D)

    x = x + (gate("pre_tile_gate") * tile_embedding("pre_tile_embedding", 1)).astype(x.dtype)
    cls = table("cls", (D,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (B * I, N, 1, D)), x], axis=2)
    pos_gate = gate("pos_gate")  # moves weight from one position table to per-arrangement ones
    x = x + ((1 - pos_gate) * table("pos_embedding", (P, D))).astype(x.dtype)
    x = x + (pos_gate * tile_embedding("tile_pos_embedding", P)).astype(x.dtype)
    x = layers.Norm("layernorm", OUTER_NORM_EPS, name="pre_norm")(x)

    Q = -(-P // SLOT_MULTIPLE) * SLOT_MULTIPLE
    x = jnp.pad(x, ((0, 0), (0, 0), (0, Q - P), (0, 0))).reshape(B * I, N * Q, D)
    padding = (~tiles.tile_mask.reshape(B * I, N, 1)) | (jnp.arange(Q) >= P)
    padding = padding.reshape(B * I, N * Q)
    mask = layers.Mask(explicit=~(padding[:, :, None] & padding[:, None, :]))
    x = layers.constrain(x)

    aux = {}
    block = layers.remat(vit.Block, self.remat_policy)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                self.attention_impl, self.dtype, attn_bias=False, name=f"block_{i}")(x, mask)
      aux[f"block_{i}"] = x
    x = layers.Norm("layernorm", OUTER_NORM_EPS, name="post_norm")(x)
    x = x.reshape(B * I, N, Q, D) + (
        gate("post_tile_gate") * tile_embedding("post_tile_embedding", 1)).astype(x.dtype)
    x = x.reshape(B * I, N * Q, D)
    gated = layers.remat(GatedBlock, self.remat_policy)
    for i in range(self.global_depth):
      x = gated(self.num_heads, self.mlp_dim, self.mlp_activation, self.norm_eps,
                self.attention_impl, self.dtype, attn_bias=False, name=f"global_block_{i}")(x, mask)

    kept = [x] + ([jnp.stack([aux[f"block_{i}"] for i in self.feature_layers], axis=-1)
                   .reshape(B * I, N * Q, -1)] if self.feature_layers else [])
    features = jnp.concatenate(kept, axis=-1).reshape(B * I, N, Q, -1)[:, :, :P]
    return features.reshape(B, I, N * P, -1), aux

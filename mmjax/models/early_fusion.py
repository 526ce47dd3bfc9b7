"""Early fusion (LLaVA, PaliGemma): image tokens spliced into the text sequence.

Einsum letters as in `layers`: B batch, T text length, D LM width,
I image slots per sample, P image tokens per image.

images float[B, I, H, W, 3] -> ViT -> tokens of one ViT layer (cls dropped or
not) -> projector -> float[B, I, P, D]. The text carries P placeholder tokens
(`image_token_id`) per image; the k-th run of P placeholders in a sample
receives image k of that sample, and every other position keeps its text
embedding. Samples may carry zero or several images; unused image slots are
never read. The LM then reads the sequence as text, with a causal mask, or a
prefix-LM mask (PaliGemma) when `prefix_len` covers image + prompt.

Parameters: "vit" and "lm" are exactly `vit.Model`'s and `lm.Model`'s, so
pretrained towers load unchanged; "projector" is new.

LLaVA-NeXT's AnyRes (`grid_pinpoints` set): images come as `Tiles`, each a base
tile and the tiles of a grid chosen by its aspect ratio
(`mmjax.data.anyres`), with the source of each of its tokens: the base tile's
patches, then the grid's patches row by row with its padding dropped, each row
ended by the learned "image_newline". An image's token count depends on its
size; the text reserves that many placeholders.
"""
from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models import lm as lm_lib
from mmjax.models import vit as vit_lib

PROJECTORS = {"linear": 1, "mlp2x_gelu": 2}  # LLaVA's names -> number of Dense layers
# Tiles.sources beyond the tile patches: the learned row-end embedding; no token (an image with
# fewer tokens than the batch's longest).
NEWLINE, PAD = -1, -2


@struct.dataclass
class Tiles:
  """Images as LLaVA-NeXT's AnyRes reads them (built by `mmjax.data.anyres`)."""

  pixels: jax.Array  # float[B, I, N, S, S, 3]: tile 0 the whole image, then its grid row-major
  sources: jax.Array  # int32[B, I, L]: per token, tile * P + patch, NEWLINE or PAD


class Model(nn.Module):
  """LLaVA-style vision-language model."""

  vit: dict  # vit.Model(**vit), e.g. {"variant": "B/16", "pool": "cls"}
  lm: dict  # lm.Model(**lm), e.g. {"variant": "gpt2-124m"}
  image_token_id: int  # placeholder token: P of them per image in the text
  projector: str = "mlp2x_gelu"  # or "linear"
  vision_layer: int | None = None  # None: final normed ViT tokens; i: block i's output (-2: LLaVA)
  drop_cls: bool = True  # drop the cls token (when the ViT has one) before projecting
  # AnyRes (LLaVA-NeXT): the (height, width) grids an image's tiles may cover; () = off. It
  # adds "image_newline" float[D], the embedding that ends each row of an image's grid.
  grid_pinpoints: tuple[tuple[int, int], ...] = ()
  dtype: jnp.dtype = jnp.float32  # compute dtype of both towers and the projector

  def setup(self):
    if self.projector not in PROJECTORS:
      raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {self.projector!r}")
    self.vision = vit_lib.Model(**{"dtype": self.dtype, **self.vit}, name="vit")
    self.language = lm_lib.Model(**{"dtype": self.dtype, **self.lm}, name="lm")
    self.project = layers.Projector(self.language.width, PROJECTORS[self.projector],
                                    dtype=self.dtype, name="projector")
    if self.grid_pinpoints:
      self.image_newline = self.param("image_newline", layers.partitioned(
          nn.initializers.normal(self.language.width ** -0.5), ("embed",)),
          (self.language.width,))

  def __call__(self, tokens: jax.Array, images: jax.Array | None, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               prefix_len: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens: int[B, T]; images: float[B, I, H, W, 3] or None -> (logits float32[B, T, V], aux).

    aux["img/features"]: float[B, I, P, D] projected image features.
    """
    x = self.language.embed_tokens(tokens)
    aux = {}
    if images is not None:
      image_embeddings = self.embed_images(images)
      aux["img/features"] = image_embeddings
      x = splice(x, image_embeddings, tokens == self.image_token_id, present(images))
    mask = layers.Mask(causal=True, prefix_len=prefix_len, segment_ids=segment_ids)
    logits, lm_aux = self.language.from_embeddings(x, mask=mask, positions=positions)
    return logits, {**aux, **lm_aux}

  def embed_images(self, images: jax.Array | Tiles) -> jax.Array:
    """images: float[B, I, H, W, 3] -> float[B, I, P, D] in the LM width; Tiles -> float[B,
    I, L, D], a token per source (PAD ones zero)."""
    if isinstance(images, vit_lib.Patches):
      raise ValueError("early fusion reads images of one size (float[B, I, H, W, 3]) or AnyRes "
                       "tiles: images packed at their own sizes (vit.Patches) feed deep fusion")
    if isinstance(images, Tiles):
      if not self.grid_pinpoints:
        raise ValueError("AnyRes tiles need a model with grid_pinpoints (LLaVA-NeXT)")
      B, I, N = images.pixels.shape[:3]
      tiles = self.embed_images(images.pixels.reshape(B, I * N, *images.pixels.shape[3:]))
      P, D = tiles.shape[2:]
      tokens = jnp.take_along_axis(tiles.reshape(B, I, N * P, D),
                                   jnp.maximum(images.sources, 0)[..., None], axis=2)
      newline = self.image_newline.astype(tokens.dtype)
      sources = images.sources[..., None]
      return jnp.where(sources == NEWLINE, newline, jnp.where(sources == PAD, 0, tokens))
    B, I = images.shape[:2]
    _, vit_aux = self.vision(images.reshape(B * I, *images.shape[2:]))
    features = vit_lib.layer_features(vit_aux, self.vision_layer, self.vision.depth)
    if self.drop_cls and self.vision.pool == "cls":
      features = features[:, 1:]
    embeddings = self.project(features)
    return embeddings.reshape(B, I, *embeddings.shape[1:]).astype(self.dtype)


def present(images: jax.Array | Tiles) -> jax.Array | None:
  """bool[B, I, L]: which of embed_images' tokens exist (AnyRes), or None: all of them."""
  return images.sources != PAD if isinstance(images, Tiles) else None


def splice(text: jax.Array, images: jax.Array, is_placeholder: jax.Array,
           present: jax.Array | None = None) -> jax.Array:
  """Writes image tokens into the placeholder positions, in order, per sample.

  text: float[B, T, D]; images: float[B, I, P, D]; is_placeholder: bool[B, T] -> float[B, T, D].
  The n-th placeholder of a sample (counting from 0) takes token n % P of image n // P;
  with present bool[B, I, P] (AnyRes images of different token counts), the n-th of the
  sample's present tokens, in order.
  """
  B, I, P, D = images.shape
  flat = images.reshape(B, I * P, D)
  if present is not None:  # present tokens first, in order: a stable sort of "absent"
    order = jnp.argsort(~present.reshape(B, I * P), axis=1, stable=True)
    flat = jnp.take_along_axis(flat, order[..., None], axis=1)
  index = jnp.cumsum(is_placeholder, axis=1) - 1  # [B, T]
  index = jnp.clip(index, 0, I * P - 1)  # non-placeholders read any row; it is discarded below
  gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
  return jnp.where(is_placeholder[..., None], gathered.astype(text.dtype), text)


def num_image_tokens(vit_fields: dict, image_size: int, drop_cls: bool = True) -> int:
  """P, the number of placeholders one image of image_size px needs."""
  model = vit_lib.Model(**vit_fields)
  grid = image_size // model.patch_size
  return grid * grid + int(model.pool == "cls" and not drop_cls)


def placeholders_per_image(fields: dict, image_size: int) -> int:
  """P: the placeholder tokens the text holds for one image of image_size px, from Model fields."""
  return num_image_tokens(fields["vit"], image_size, fields.get("drop_cls", True))

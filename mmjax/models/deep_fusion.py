"""Deep fusion (Flamingo, Llama 3.2 Vision): gated cross-attention from text to image.

Einsum letters as in `layers`: B batch, T text length, D LM width,
I image slots per sample, R visual tokens per image (ViT patches, or
resampler latents), S = I * R cross-attention keys.

images float[B, I, H, W, 3] -> ViT -> adapter (feed-forward layers into the
LM width) -> optional Perceiver resampler (R learned latents) -> visual tokens
float[B, I, R, D]. They are computed from the images alone: the text never
reaches them. Before chosen LM blocks sits a gated cross-attention block:

  x = x + tanh(attn_gate) * CrossAttn(norm(x), visual) * has_media
  x = x + tanh(mlp_gate)  * Mlp(norm(x))               * has_media

The gates start at 0, so at initialisation the model IS the plain LM. Each
image is marked in the text by one `image_token_id` token; a text position
sees the images marked at or before it ("previous"), only the latest one
("latest", Flamingo's choice), or the latest run of adjacent markers
("latest_run", Llama 3.2 Vision's). Rows that see no image (text before the
first image, samples without images) get exactly zero (`has_media`); with
media_free_rows="all_keys" they attend to every key and only their MLP branch
is zeroed, as transformers' Llama 3.2 Vision does; with "mlp_only" their
attention branch is zeroed and their MLP branch kept, as IDEFICS does. Image
resolution changes R, never the text length. Under "latest" the mask is segment
ids (a position's image against each key's), which splash runs on TPUs.

IDEFICS (the open Flamingo) is this model with adapter_layers=0 (its cross
blocks project keys and values from the ViT width), the CLIP tower's last
block read with its cls token (vision_layer=-1, drop_cls=False), its
resampler's options and media_free_rows="mlp_only".

vision_tower="tiled" reads `tiled_vit.Tiles` (Llama 3.2 Vision's tiles and
aspect-ratio ids) with `tiled_vit.Model`: R = every tile slot's tokens, and
the keys of tiles an image does not use are never attended to.

Parameters: "vit" and "lm" are exactly the vision tower's (`vit.Model`'s or
`tiled_vit.Model`'s) and `lm.Model`'s;
"adapter", "resampler" and "xattn_<i>" (before LM block i) are new.

Images at their own sizes come as `vit.Patches` (patches of each row's images
packed into a fixed budget): the visual keys are then the row's S = P patch
slots (or M * R resampler latents, R per image), and each text position
attends only to the patches of the images it may see, so mixed sizes cost only
the patches they have.
"""
from collections.abc import Callable
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models import lm as lm_lib
from mmjax.models import tiled_vit
from mmjax.models import vit as vit_lib

MEDIA_ATTENTION = ("previous", "latest", "latest_run")
# Rules whose mask is one id per text position equal to one per key (segment ids), so fused
# kernels (splash) run them: under "latest" a position sees exactly one image. "previous" and
# "latest_run" give a position a range of images, which only a dense mask holds.
SEGMENT_RULES = ("latest",)
MEDIA_FREE_ROWS = ("zero", "all_keys", "mlp_only")
GATES = ("scalar", "channel")
VISION_TOWERS = {"vit": vit_lib.Model, "tiled": tiled_vit.Model}


class PerceiverResampler(nn.Module):
  """Flamingo's resampler: R learned latents cross-attend to [tokens; latents]."""

  num_latents: int
  depth: int
  num_heads: int
  dtype: jnp.dtype
  mlp_dim: int | None = None  # None: 4 x the width it reads
  head_dim: int | None = None  # None: width // num_heads (IDEFICS sets its own)
  mlp_activation: str = "gelu"  # IDEFICS': "relu"
  query_norm: bool = True  # a norm of its own for the queries; False: the latents' (IDEFICS')

  @nn.compact
  def __call__(self, x: jax.Array, membership: jax.Array | None = None) -> jax.Array:
    """x: float[B, P, D] -> float[B, R, D]; with membership bool[B, P, M] (packed images),
    R latents per image, reading only its patches -> float[B, M * R, D]."""
    B, P, D = x.shape
    R = self.num_latents
    latents = self.param("latents", layers.partitioned(nn.initializers.normal(0.02),
                                                       (None, "embed")), (R, D))
    M = 1 if membership is None else membership.shape[-1]
    y = jnp.broadcast_to(jnp.tile(latents, (M, 1)), (B, M * R, D)).astype(self.dtype)
    mask = layers.Mask()
    if membership is not None:  # latent (m, r) reads image m's patches and image m's latents
      reads_patch = jnp.repeat(jnp.swapaxes(membership, 1, 2), R, axis=1)  # [B, M * R, P]
      same_image = jnp.repeat(jnp.repeat(jnp.eye(M, dtype=bool), R, axis=0), R, axis=1)
      mask = layers.Mask(explicit=jnp.concatenate(
          [reads_patch, jnp.broadcast_to(same_image, (B, M * R, M * R))], axis=-1))
    for i in range(self.depth):
      context = jnp.concatenate([layers.Norm("layernorm", 1e-5, name=f"context_norm_{i}")(x),
                                 layers.Norm("layernorm", 1e-5, name=f"latent_norm_{i}")(y)],
                                axis=1).astype(self.dtype)
      query = (layers.Norm("layernorm", 1e-5, name=f"query_norm_{i}")(y) if self.query_norm
               else context[:, P:])
      attended, _ = layers.Attention(num_heads=self.num_heads, head_dim=self.head_dim,
                                     dtype=self.dtype, name=f"attn_{i}")(query, context, mask=mask)
      y = y + attended.astype(y.dtype)
      h = layers.Norm("layernorm", 1e-5, name=f"mlp_norm_{i}")(y)
      y = y + layers.Mlp(self.mlp_dim or 4 * D, activation=self.mlp_activation, use_bias=False,
                         dtype=self.dtype, name=f"mlp_{i}")(h).astype(y.dtype)
    return layers.Norm("layernorm", 1e-5, name="final_norm")(y)


class GatedCrossAttention(nn.Module):
  """Text queries attend to visual keys/values; tanh gates start closed (by default)."""

  num_heads: int
  num_kv_heads: int | None
  mlp_dim: int
  norm: str
  norm_eps: float
  mlp_activation: str
  qk_norm: bool
  gate: str  # "scalar" or "channel"
  dtype: jnp.dtype
  gate_init: float = 0.0  # the gates start at tanh(gate_init): 0, closed, keeps the LM's output
  media_free_rows: str = "zero"  # or "all_keys", "mlp_only"; see the module docstring
  attention_sink: bool = False  # a learned key every row that sees an image may attend to
  attention_impl: str = "xla"  # as layers.Attention's; splash needs a media mask of segment ids

  @nn.compact
  def __call__(self, x: jax.Array, visual: jax.Array | layers.KVCache,
               media: layers.Mask) -> tuple[jax.Array, dict]:
    """x: float[B, T, D]; visual: float[B, S, D]; media: which keys each position sees
    (`media_attention_mask`) -> (float[B, T, D], aux).

    visual may also be aux["cache"] of an earlier call: the visual keys and
    values, projected once per image when decoding (with the sink's first).
    """
    if self.gate not in GATES:
      raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
    if self.media_free_rows not in MEDIA_FREE_ROWS:
      raise ValueError(f"media_free_rows must be one of {MEDIA_FREE_ROWS}, got "
                       f"{self.media_free_rows!r}")
    D = x.shape[-1]
    gate_shape = () if self.gate == "scalar" else (D,)
    gate_axes = () if self.gate == "scalar" else ("embed",)
    gate_init = nn.initializers.constant(self.gate_init)
    attn_gate = jnp.tanh(self.param("attn_gate", layers.partitioned(gate_init, gate_axes),
                                    gate_shape))
    mlp_gate = jnp.tanh(self.param("mlp_gate", layers.partitioned(gate_init, gate_axes),
                                   gate_shape))
    visible = media.explicit if media.explicit is not None else (  # bool[B, T, S]
        media.segment_ids[:, :, None] == media.kv_segment_ids[:, None, :])
    has_media = jnp.any(visible, axis=-1, keepdims=True)  # [B, T, 1]
    if self.attention_sink or self.media_free_rows == "all_keys":  # not one id per key
      media = layers.Mask(explicit=visible)
    if self.attention_sink:
      # Without it the softmax runs over the image keys alone and averages them: three matching
      # shapes read as one. A key to put the rest of the attention on keeps how much matched.
      if not isinstance(visual, layers.KVCache):  # a cache holds the projected sink already
        sink = self.param("sink", layers.partitioned(nn.initializers.normal(0.02),
                                                     (None, "embed")), (1, visual.shape[-1]))
        visual = jnp.concatenate(
            [jnp.broadcast_to(sink.astype(visual.dtype), (visual.shape[0], *sink.shape)),
             visual], axis=1)
      media = layers.Mask(explicit=jnp.concatenate([has_media, media.explicit], axis=-1))
    attn_rows = mlp_rows = has_media.astype(x.dtype)
    if self.media_free_rows == "all_keys":
      media, attn_rows = layers.Mask(explicit=media.explicit | ~has_media), 1.0
    elif self.media_free_rows == "mlp_only":
      mlp_rows = 1.0

    y = layers.Norm(self.norm, self.norm_eps, name="attn_norm")(x)
    y, cache = layers.Attention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, qk_norm=self.qk_norm,
        qk_norm_eps=self.norm_eps, attention_impl=self.attention_impl,
        kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, name="attn")(y, visual,
                                                                                mask=media)
    x = x + (attn_gate * y * attn_rows).astype(x.dtype)
    y = layers.Norm(self.norm, self.norm_eps, name="mlp_norm")(x)
    y = layers.Mlp(self.mlp_dim, activation=self.mlp_activation, use_bias=False,
                   kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, name="mlp")(y)
    x = x + (mlp_gate * y * mlp_rows).astype(x.dtype)
    return layers.constrain(x), {"attn_gate": attn_gate, "mlp_gate": mlp_gate, "cache": cache}


class Model(nn.Module):
  """Flamingo-style vision-language model."""

  vit: dict  # the vision tower's fields, e.g. {"variant": "B/16", "pool": "none"}
  lm: dict  # lm.Model(**lm); scanned (scan_layers) with evenly spaced cross_layers
  image_token_id: int  # one per image in the text, where the image appears
  cross_layers: tuple[int, ...] = ()  # LM blocks with a cross block before them; () = every Nth
  cross_every: int = 4  # N when cross_layers is empty: blocks N-1, 2N-1, ...
  adapter_layers: int = 2  # Dense layers from the ViT width into the LM width; 0: none (IDEFICS)
  vision_layer: int | None = None  # None: the final normed ViT tokens; i: block i's output
  drop_cls: bool = True  # drop the cls token (when the ViT has one); IDEFICS keeps it
  resampler_latents: int | None = None  # R; None: no resampler, R = number of ViT tokens
  resampler_depth: int = 2
  resampler_options: dict | None = None  # more PerceiverResampler fields (IDEFICS' head_dim...)
  media_attention: str = "previous"  # or "latest" (Flamingo), "latest_run" (Llama 3.2 Vision)
  media_free_rows: str = "zero"  # or "all_keys" (HF Llama 3.2 Vision), "mlp_only" (IDEFICS)
  vision_tower: str = "vit"  # or "tiled": tiled_vit.Model (Llama 3.2 Vision's)
  gate: str = "scalar"  # or "channel": one tanh gate per width channel
  # The gates start at tanh(gate_init). Closed (0) keeps a pretrained LM's output exactly; an
  # LM trained with the cross blocks can start them open (counting: README).
  gate_init: float = 0.0
  qk_norm: bool = False
  attention_sink: bool = False  # a learned null key in every cross block (counting)
  cross_kv_heads: int | None = None  # None: the LM's num_kv_heads
  additional_vocab: int = 0  # IDEFICS: its checkpoint keeps the last N token ids' rows apart
  dtype: jnp.dtype = jnp.float32  # compute dtype of every part

  def setup(self):
    if self.vision_tower not in VISION_TOWERS:
      raise ValueError(f"vision_tower must be one of {sorted(VISION_TOWERS)}, got "
                       f"{self.vision_tower!r}")
    self.vision = VISION_TOWERS[self.vision_tower](**{"dtype": self.dtype, **self.vit}, name="vit")
    self.language = lm_lib.Model(**{"dtype": self.dtype, **self.lm}, name="lm")
    depth, width = self.language.depth, self.language.width
    self.cross_at = cross_positions(self.cross_layers, self.cross_every, depth)
    bad = [i for i in self.cross_at if not 0 <= i < depth]
    if bad:
      raise ValueError(f"cross_layers {bad} outside the LM's blocks 0..{depth - 1}")
    if self.adapter_layers:
      self.adapter = layers.Projector(width, self.adapter_layers, dtype=self.dtype,
                                      name="adapter")
    if self.resampler_latents:
      self.resampler = PerceiverResampler(**{
          "num_latents": self.resampler_latents, "depth": self.resampler_depth,
          "num_heads": self.language.num_heads, "dtype": self.dtype,
          **(self.resampler_options or {})}, name="resampler")
    if self.language.scan_layers:
      self.group_size, self.cross_offset = scan_groups(self.cross_at, depth)
      # Only creates the stacked parameters ("xattn", a leading axis over the cross blocks):
      # run_language scans them with the LM's stacked blocks, a group at a time.
      self.xattn_stack = nn.scan(
          GatedCrossAttention, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=len(self.cross_at),
          metadata_params={nn.PARTITION_NAME: "layers"})(**self.cross_fields(), name="xattn")
    else:
      self.xattn = {i: GatedCrossAttention(**self.cross_fields(), name=f"xattn_{i}")
                    for i in self.cross_at}

  def cross_fields(self) -> dict:
    return dict(num_heads=self.language.num_heads,
                num_kv_heads=self.cross_kv_heads or self.language.num_kv_heads,
                mlp_dim=self.language.mlp_dim, norm=self.language.norm,
                norm_eps=self.language.norm_eps, mlp_activation=self.language.mlp_activation,
                qk_norm=self.qk_norm, gate=self.gate, gate_init=self.gate_init, dtype=self.dtype,
                media_free_rows=self.media_free_rows, attention_sink=self.attention_sink,
                # A kernel named for the LM's self-attention may not take a media mask: "auto"
                # picks per mask (splash for SEGMENT_RULES on TPUs, else XLA).
                attention_impl="xla" if self.language.attention_impl == "xla" else "auto")

  def __call__(self, tokens: jax.Array,
               images: jax.Array | vit_lib.Patches | tiled_vit.Tiles | None, *,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens: int[B, T]; images: float[B, I, H, W, 3], Patches, Tiles or None -> (logits
    float32[B, T, V], aux).

    aux: "img/features" (encode_images), "xattn/gate_<i>" the tanh gates, "hidden".
    """
    if images is None:  # All text: the cross blocks would add exactly zero.
      return self.language(tokens, positions=positions, segment_ids=segment_ids)
    visual = self.encode_images(images)
    keys, key_image = self.visual_keys(images, visual)
    media = media_attention_mask(tokens == self.image_token_id, key_image, self.media_attention,
                                 segment_ids)
    logits, aux = self.run_language(tokens, keys, media, positions=positions,
                                    segment_ids=segment_ids)
    return logits, {"img/features": visual, **aux}

  def encode_images(self, images: jax.Array | vit_lib.Patches | tiled_vit.Tiles) -> jax.Array:
    """Visual tokens, computed from the images alone (the text plays no part).

    images float[B, I, H, W, 3] or Tiles -> float[B, I, R, D]; Patches ->
    float[B, P, D] (one per patch slot), or float[B, M * R, D] with the resampler.
    """
    if isinstance(images, tiled_vit.Tiles) != (self.vision_tower == "tiled"):
      raise ValueError(f"a {self.vision_tower!r} vision tower cannot read "
                       f"{type(images).__name__}")
    if isinstance(images, tiled_vit.Tiles):
      features, _ = self.vision(images)
      visual = self.project(features)
      if self.resampler_latents:
        B, I = features.shape[:2]
        visual = self.resampler(visual.reshape(B * I, *visual.shape[2:]))
        visual = visual.reshape(B, I, *visual.shape[1:])
      return visual.astype(self.dtype)
    if isinstance(images, vit_lib.Patches):
      _, vit_aux = self.vision(images)
      visual = self.project(vit_lib.layer_features(vit_aux, self.vision_layer, self.vision.depth))
      if self.resampler_latents:
        visual = self.resampler(visual, images.membership() & ~images.is_cls[..., None])
      return visual.astype(self.dtype)
    B, I = images.shape[:2]
    _, vit_aux = self.vision(images.reshape(B * I, *images.shape[2:]))
    features = vit_lib.layer_features(vit_aux, self.vision_layer, self.vision.depth)
    if self.drop_cls and self.vision.pool == "cls":
      features = features[:, 1:]
    visual = self.project(features)
    if self.resampler_latents:
      visual = self.resampler(visual)
    return visual.reshape(B, I, *visual.shape[1:]).astype(self.dtype)

  def project(self, features: jax.Array) -> jax.Array:
    """Into the LM width (IDEFICS' cross blocks read the ViT width: no adapter)."""
    return self.adapter(features) if self.adapter_layers else features

  def visual_keys(self, images: jax.Array | vit_lib.Patches,
                  visual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """encode_images' tokens as cross-attention keys float[B, S, D], with the index of each
    key's image in its row, int[S] or int[B, S] (vit.PADDING: no image's, never seen)."""
    if isinstance(images, tiled_vit.Tiles) and not self.resampler_latents:
      B, I, R, D = visual.shape
      N = images.tile_mask.shape[-1]
      used = jnp.repeat(images.tile_mask, R // N, axis=-1)  # [B, I, R]: the key's tile is used
      key_image = jnp.where(used, jnp.arange(I)[:, None], vit_lib.PADDING)
      return visual.reshape(B, I * R, D), key_image.reshape(B, I * R)
    if not isinstance(images, vit_lib.Patches):
      B, I, R, D = visual.shape
      return visual.reshape(B, I * R, D), jnp.repeat(jnp.arange(I), R)
    if self.resampler_latents:
      M = images.grids.shape[1]
      present = images.grids[..., 0] > 0  # [B, M]
      key_image = jnp.where(present, jnp.arange(M), vit_lib.PADDING)
      return visual, jnp.repeat(key_image, self.resampler_latents, axis=1)
    return visual, jnp.where(images.is_cls, vit_lib.PADDING, images.image_index())

  def run_language(self, tokens: jax.Array, visual: jax.Array | list[layers.KVCache],
                   media: layers.Mask, *, positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, mask: layers.Mask | None = None,
                   caches: list[layers.KVCache] | None = None) -> tuple[jax.Array, dict]:
    """The LM over the text, its cross blocks reading the images.

    tokens int[B, T]; visual float[B, S, D]; media: media_attention_mask's. Decoding
    passes `caches` (lm.empty_caches) with a `mask` over their slots, and after
    the first call `visual` = aux["cross_caches"]: one KVCache per cross block,
    so the image keys and values are projected once.
    """
    if mask is None:
      mask = layers.Mask(causal=True, segment_ids=segment_ids)
    if self.language.scan_layers:
      if caches is not None:
        raise ValueError("decoding runs deep fusion unscanned: see deep_fusion.for_decoding")
      return self.run_scanned(self.language.embed_tokens(tokens), visual, media, mask, positions)
    aux, cross_caches = {}, []

    def cross_block(i: int, x: jax.Array) -> jax.Array:
      if i not in self.xattn:
        return x
      context = visual[len(cross_caches)] if isinstance(visual, list) else visual
      x, cross = self.xattn[i](x, context, media)
      aux[f"xattn/gate_{i}"] = cross["attn_gate"]
      aux[f"xattn/mlp_gate_{i}"] = cross["mlp_gate"]
      cross_caches.append(cross["cache"])
      return x

    logits, lm_aux = self.language.from_embeddings(
        self.language.embed_tokens(tokens), mask=mask, positions=positions, caches=caches,
        before_block=cross_block)
    return logits, {**aux, **lm_aux, "cross_caches": cross_caches}


  def run_scanned(self, x: jax.Array, visual: jax.Array, media: layers.Mask, mask: layers.Mask,
                  positions: jax.Array | None) -> tuple[jax.Array, dict]:
    """run_language with the LM scanned: one loop over groups of [k LM blocks with a cross
    block before the one at cross_offset], the blocks of a group in loops of their own (so a
    sharded model gathers one block's weights at a time); the LM's blocks stay stacked as a
    scanned LM stacks them ("lm/blocks", [depth, ...]) and the cross blocks as "xattn" [n, ...]."""
    lm = self.language
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    x = lm.add_positions(x, positions)
    if self.is_initializing():  # creates both stacks' parameters
      lm.scanned_blocks(x, mask, positions, None)
      self.xattn_stack(x, visual, media)
    params = nn.unbox(self.variables["params"])  # boxed while initialising
    n, k, o = len(self.cross_at), self.group_size, self.cross_offset
    blocks = jax.tree.map(lambda a: a.reshape(n, k, *a.shape[1:]), params["lm"]["blocks"])
    # Unbound (parent=None): applied to each group's slice of the stacks, each block
    # rematerialised on its own (as the LM's scanned blocks are), so the backward pass holds
    # one block's intermediates at a time, not a whole group's.
    block = lm_lib.BLOCKS[lm.block](**lm.block_fields(), parent=None)
    cross = GatedCrossAttention(**self.cross_fields(), parent=None)
    run_block = lambda p, x: block.apply({"params": p}, x, mask, positions, None)[0]
    run_cross = lambda p, x: cross.apply({"params": p}, x, visual, media)[0]
    policy = lm.block_remat_policy
    if policy != "none":
      remat = functools.partial(jax.checkpoint, policy=layers.REMAT_POLICIES[policy],
                                prevent_cse=False)
      run_block, run_cross = remat(run_block), remat(run_cross)

    def blocks_of(x, block_params):  # an inner scan: one block's weights gathered at a time
      return jax.lax.scan(lambda x, p: (run_block(p, x), None), x, block_params)[0]

    def group(x, group_params):
      block_params, cross_params = group_params
      if o:
        x = blocks_of(x, jax.tree.map(lambda a: a[:o], block_params))
      x = run_cross(cross_params, x)
      return blocks_of(x, jax.tree.map(lambda a: a[o:], block_params)), None

    x, _ = jax.lax.scan(group, x, (blocks, params["xattn"]))
    x = lm.final_norm(x)
    gates = {f"xattn/{kind}_{i}": jnp.tanh(params["xattn"][f"{gate}_gate"][g])
             for g, i in enumerate(self.cross_at) for kind, gate in (("gate", "attn"),
                                                                      ("mlp_gate", "mlp"))}
    return lm.logits(x), {**gates, "hidden": x}


def cross_positions(cross_layers: tuple[int, ...], cross_every: int, depth: int
                    ) -> tuple[int, ...]:
  """The LM blocks with a cross block before them."""
  return tuple(cross_layers) or tuple(range(cross_every - 1, depth, cross_every))


def for_decoding(model: Model) -> tuple[Model, Callable[[dict], dict]]:
  """Decoding keeps a self-attention cache per LM block and a cross cache per cross block, so
  it runs unscanned: -> (the model unscanned, its params from the scanned ones). A model
  that is not scanned comes back as it is."""
  language = lm_lib.Model(**model.lm)
  if not language.scan_layers:
    return model, lambda params: params
  at = cross_positions(model.cross_layers, model.cross_every, language.depth)
  return (model.clone(lm={**model.lm, "scan_layers": False}),
          lambda params: unstack_layers(params, at, language.depth))


def scan_groups(cross_at: tuple[int, ...], depth: int) -> tuple[int, int]:
  """Evenly spaced cross blocks -> (k LM blocks a group, the block of a group a cross block
  precedes); anything else cannot be one scanned body."""
  n = len(cross_at)
  k = depth // n if n else 0
  if not n or depth % n or tuple(cross_at) != tuple(range(cross_at[0], depth, k)):
    raise ValueError(f"a scanned deep fusion LM (lm.scan_layers=True) needs cross_layers "
                     f"evenly spaced over its {depth} blocks (one every k, from a block below "
                     f"k), got {tuple(cross_at)}")
  return k, cross_at[0]


def stack_layers(params: dict, cross_at: tuple[int, ...], depth: int) -> dict:
  """Unscanned deep fusion params -> scanned (lm/blocks and xattn stacked)."""
  params = {**params, "lm": lm_lib.stack_layers(params["lm"], depth)}
  cross = [params.pop(f"xattn_{i}") for i in cross_at]
  params["xattn"] = jax.tree.map(lambda *xs: jnp.stack(xs), *cross)
  return params


def unstack_layers(params: dict, cross_at: tuple[int, ...], depth: int) -> dict:
  """Scanned deep fusion params -> unscanned; the inverse of `stack_layers`."""
  params = {**params, "lm": lm_lib.unstack_layers(params["lm"], depth)}
  cross = params.pop("xattn")
  for g, i in enumerate(cross_at):
    params[f"xattn_{i}"] = jax.tree.map(lambda x, g=g: x[g], cross)
  return params


def media_attention_mask(is_marker: jax.Array, key_image: jax.Array, rule: str,
                         segment_ids: jax.Array | None = None) -> layers.Mask:
  """`media_mask` as the cross-attention's mask: for SEGMENT_RULES as segment ids (a position's
  image, -1 for none; each key's image), which splash reads, else the dense bool[B, T, S]."""
  if rule not in SEGMENT_RULES:
    return layers.Mask(explicit=media_mask(is_marker, key_image, rule, segment_ids))
  seen, _ = media_window(is_marker, rule)
  first = seen > 0
  if segment_ids is not None:  # the latest image must be marked inside the position's example
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                     constant_values=True)
    before = jax.lax.cummax(jnp.where(starts, seen - is_marker, 0), axis=1)
    first = seen > before
  B = is_marker.shape[0]
  return layers.Mask(segment_ids=jnp.where(first, seen - 1, -1),
                     kv_segment_ids=jnp.broadcast_to(key_image, (B, key_image.shape[-1])))


def media_mask(is_marker: jax.Array, key_image: jax.Array, rule: str,
               segment_ids: jax.Array | None = None) -> jax.Array:
  """Which visual keys each text position may attend to.

  is_marker: bool[B, T], True where an image is marked; image k of a row is
  its k-th marker. key_image: int[S] or int[B, S], the image of each key
  (`Model.visual_keys`). -> bool[B, T, S]. "previous": images marked at or
  before t; "latest": only the last of them; "latest_run": the last run of
  adjacent markers. With segment_ids (packed examples), a position sees only
  the images marked inside its own example.
  """
  B = is_marker.shape[0]
  seen, oldest = media_window(is_marker, rule)
  key_image = jnp.broadcast_to(key_image, (B, key_image.shape[-1]))[:, None, :]  # [B, 1, S]
  visible = visible_images(seen, oldest, key_image)  # [B, T, S]
  if segment_ids is not None:
    marks_key = is_marker[..., None] & (seen[..., None] - 1 == key_image)  # [B, T, S]
    key_segment = jnp.sum(marks_key * segment_ids[..., None], axis=1)  # [B, S]
    visible = visible & (key_segment[:, None, :] == segment_ids[..., None])
  return visible


def media_window(is_marker: jax.Array, rule: str) -> tuple[jax.Array, jax.Array]:
  """The images each position may see, as a window [oldest, seen) of image indices.

  is_marker: bool[B, T] -> (seen, oldest): int32[B, T] each; seen counts the
  markers at or before t. Decoding continues the window with `next_window`.
  """
  seen = jnp.cumsum(is_marker, axis=1, dtype=jnp.int32)
  after_marker = jnp.pad(is_marker[:, :-1], ((0, 0), (1, 0)))
  return seen, oldest_image(seen, is_marker, after_marker, None, rule)


def next_window(seen: jax.Array, oldest: jax.Array, after_marker: jax.Array,
                is_marker: jax.Array, rule: str) -> tuple[jax.Array, jax.Array]:
  """One more token: the window of the position before it (int32[B] each), whether that
  position was a marker and whether this one is (bool[B]) -> (seen, oldest) here."""
  seen = seen + is_marker
  return seen, oldest_image(seen, is_marker, after_marker, oldest, rule)


def oldest_image(seen: jax.Array, is_marker: jax.Array, after_marker: jax.Array,
                 before: jax.Array | None, rule: str) -> jax.Array:
  """The first image of the window, from the markers (a sequence when `before` is None,
  else one step after the window whose oldest image was `before`)."""
  if rule == "previous":
    return jnp.zeros_like(seen)
  if rule == "latest":
    return jnp.maximum(seen - 1, 0)
  if rule == "latest_run":  # a marker that follows no marker starts a run
    starts = jnp.where(is_marker & ~after_marker, seen - 1, 0)
    if before is None:
      return jax.lax.cummax(starts, axis=1)
    return jnp.maximum(starts, before)
  raise ValueError(f"media_attention must be one of {MEDIA_ATTENTION}, got {rule!r}")


def visible_images(seen: jax.Array, oldest: jax.Array, image: jax.Array) -> jax.Array:
  """Whether a position whose window is [oldest, seen) may attend to image `image`.

  seen, oldest: int[B, ...]; image: image indices broadcastable against
  seen[..., None] (int[S], or int[B, S] with seen int[B]) -> bool[B, ..., S].
  """
  return (image < seen[..., None]) & (image >= oldest[..., None])


def gate_values(params: dict) -> dict[str, jax.Array]:
  """How open each cross-attention block is: mean |tanh(gate)|, 0 at init, 1 fully open.

  -> {"gate/attn_<i>": ..., "gate/mlp_<i>": ...} for the blocks xattn_<i>.
  """
  if "xattn" in params:  # scanned: the cross blocks stacked in order, named by their place
    stacked = params["xattn"]
    return {f"gate/{kind}_{g}": jnp.mean(jnp.abs(jnp.tanh(stacked[f"{kind}_gate"][g])))
            for g in range(stacked["attn_gate"].shape[0]) for kind in ("attn", "mlp")}
  return {f"gate/{kind}_{name.split('_')[1]}": jnp.mean(jnp.abs(jnp.tanh(block[f"{kind}_gate"])))
          for name, block in params.items() if name.startswith("xattn_")
          for kind in ("attn", "mlp")}


def placeholders_per_image(fields: dict, image_size: int) -> int:
  """One marker per image, whatever its size: resolution never changes the text length."""
  del fields, image_size
  return 1

"""The model families by name (config.family), and the checks of their fields.

  model = models.build("deep_fusion", config.model)

Each family is a module whose `Model` builds it from keyword fields; the
image-text families also say how many placeholder tokens an image takes.
Nothing here reads data or configs beyond the fields it is given.
"""
from collections.abc import Mapping
import functools

from flax import linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import deep_fusion
from mmjax.models import early_fusion
from mmjax.models import lm
from mmjax.models import tiled_vit
from mmjax.models import vit

FAMILIES = {"lm": lm, "vit": vit, "early_fusion": early_fusion, "deep_fusion": deep_fusion}
IMAGE_TEXT = ("early_fusion", "deep_fusion")  # families that read images and text


def _fields(fields) -> dict:
  """A plain dict of model fields, from a dict or an ml_collections.ConfigDict."""
  return fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)


def check_family(family: str):
  if family not in FAMILIES:
    raise ValueError(f"config.family must be one of {sorted(FAMILIES)}, got {family!r}")


def build(family: str, fields: Mapping) -> nn.Module:
  """The unbound model of `family` with these fields (a dict or a ConfigDict)."""
  check_family(family)
  return FAMILIES[family].Model(**_fields(fields))


def abstract_params(family: str, fields: Mapping) -> dict:
  """The parameters' shapes, dtypes and logical axes (flax-boxed ShapeDtypeStructs), computed
  without allocating them: what sharding.param_shardings places on a mesh."""
  model = build(family, fields)
  if family == "vit":
    size = image_size(family, fields)
    inputs = (jnp.zeros((1, size, size, 3)),)
  else:  # parameter shapes do not depend on the text's length or the images' contents
    inputs = (jnp.zeros((1, 8), jnp.int32),)
    vision = _vision(family, fields) if family in IMAGE_TEXT else None
    if isinstance(vision, tiled_vit.Model):
      N, size = vision.max_tiles, vision.image_size
      inputs += (tiled_vit.Tiles(pixels=jnp.zeros((1, 1, N, size, size, 3)),
                                 aspect_ratio_ids=jnp.ones((1, 1), jnp.int32),
                                 tile_mask=jnp.ones((1, 1, N), bool)),)
    elif vision is not None:
      size = vision.image_size
      inputs += (jnp.zeros((1, 1, size, size, 3)),)
  return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), *inputs)["params"]


def towers(family: str, fields: Mapping, key: str = "config.model") -> dict[str, tuple[str, dict]]:
  """The vision towers and LMs a model is made of: config key -> (kind, fields); kind is a
  family ("vit", "lm") or "tiled" (tiled_vit, Llama 3.2 Vision's)."""
  check_family(family)
  fields = _fields(fields)
  if family in IMAGE_TEXT:
    return {f"{key}.vit": (fields.get("vision_tower", "vit"), fields["vit"]),
            f"{key}.lm": ("lm", fields["lm"])}
  return {key: (family, fields)}


# A tower's sizes: each at least 1 where set.
SIZES = ("width", "depth", "num_heads", "mlp_dim", "vocab_size", "max_len", "num_kv_heads",
         "head_dim", "image_size", "patch_size", "num_classes")


def check(family: str, fields: Mapping, key: str = "config.model"):
  """One-line errors naming the config key, raised before anything is built or compiled."""
  for where, (kind, tower_fields) in towers(family, fields, key).items():
    tower = tiled_vit.Model(**tower_fields) if kind == "tiled" else build(kind, tower_fields)
    for name in SIZES:
      size = getattr(tower, name, None)
      if size is not None and size < 1:
        raise ValueError(f"{where}.{name} must be >= 1, got {size}")
    if (kind != "lm" or not tower.head_dim) and tower.width % tower.num_heads:
      raise ValueError(f"{where}.num_heads={tower.num_heads} does not divide "
                       f"{where}.width={tower.width}")
    if kind == "lm" and tower.num_kv_heads and tower.num_heads % tower.num_kv_heads:
      raise ValueError(f"{where}.num_kv_heads={tower.num_kv_heads} does not divide "
                       f"{where}.num_heads={tower.num_heads}")


def language_fields(family: str, fields: Mapping) -> dict:
  """The LM fields of a text family: the model's own, or its language tower's."""
  fields = _fields(fields)
  return fields if family == "lm" else fields["lm"]


def scanned(family: str, fields: Mapping) -> bool:
  """Whether the model's LM (its own, or its language tower) runs its blocks as one scan."""
  return family != "vit" and bool(language_fields(family, fields).get("scan_layers"))


def relayout(family: str, params: dict, source: Mapping, target: Mapping) -> dict:
  """Params of a model with fields `source` for the same model with fields `target`, whose LM
  is scanned where the source's is not, or the reverse: its blocks (and deep fusion's cross
  blocks) stacked or split. Params of models that agree come back unchanged."""
  if scanned(family, source) == scanned(family, target):
    return params
  depth = lm.Model(**language_fields(family, target)).depth
  if family == "deep_fusion":
    module = build(family, target)
    at = deep_fusion.cross_positions(module.cross_layers, module.cross_every, depth)
    convert = deep_fusion.stack_layers if scanned(family, target) else deep_fusion.unstack_layers
    return convert(params, at, depth)
  convert = lm.stack_layers if scanned(family, target) else lm.unstack_layers
  return convert(params, depth) if family == "lm" else {**params, "lm": convert(params["lm"],
                                                                              depth)}


def _vision(family: str, fields: Mapping) -> nn.Module:
  fields = _fields(fields)
  if family in IMAGE_TEXT:
    return deep_fusion.VISION_TOWERS[fields.get("vision_tower", "vit")](**fields["vit"])
  return vit.Model(**fields)


def image_size(family: str, fields: Mapping) -> int:
  """The resolution a ViT or fusion model is laid out for (its ViT's image_size)."""
  return _vision(family, fields).image_size


def patch_size(family: str, fields: Mapping) -> int:
  """The ViT's patch size: image sides must be multiples of it."""
  return _vision(family, fields).patch_size


def has_cls(family: str, fields: Mapping) -> bool:
  """Whether the ViT prepends a cls token to each image's patches (and so needs its slot)."""
  return getattr(_vision(family, fields), "pool", None) == "cls"


def placeholders_per_image(family: str, fields: Mapping, image_size: int) -> int:
  """Tokens the text holds for one image: P placeholders (early fusion) or one marker (deep)."""
  if family not in IMAGE_TEXT:
    raise ValueError(f"a {family} model reads no images in its text")
  return FAMILIES[family].placeholders_per_image(_fields(fields), image_size)


def image_layout(family: str, fields: Mapping) -> tuple[int, list[int]]:
  """-> (the image size, the token ids that stand for one image in the text)."""
  size = image_size(family, fields)
  return size, [_fields(fields)["image_token_id"]] * placeholders_per_image(family, fields, size)

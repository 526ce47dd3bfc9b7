"""The data sources by name (config.data.name): what each feeds, needs and yields.

  source = sources.build(config, "train")  # this process's share of each global batch
  spec = sources.batch_spec(config)        # the global batch's shapes, nothing read

Values that follow from the model are derived here, never stored in the
config: the image size (config.data.image_size, or the model's own when
unset) and the tokens the text holds per image (P placeholders for early
fusion, one marker for deep fusion), so an override of the model's image size
moves everything that depends on it.

tfds and grain are imported only by the sources that read tfds datasets: the
in-memory ones run without them (the GPU benchmark image has neither).
"""
from collections.abc import Callable
import dataclasses

import jax
import ml_collections
import numpy as np

from mmjax import models
from mmjax.data import anyres
from mmjax.data import base
from mmjax.data import patches
from mmjax.data import synthetic
from mmjax.data import tiles
from mmjax.data import tokenizers

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Entry:
  families: tuple[str, ...]  # the model families it feeds
  build: Callable[[Config, str, dict], base.Source]  # (config, split, common keywords)
  required: tuple[str, ...] = ()  # config.data keys that must be set
  packs: bool = False  # takes config.data.pack > 1
  own_sizes: bool = False  # can keep each image's size (data.max_patches, or AnyRes tiles)
  # How its text lays out a prompt (tokenizers.encode_prompt): what generate.py uses for a
  # model trained on it. "<image>" stands for one image's placeholders or marker.
  template: str = "{prompt}"


def image_size(config: Config) -> int:
  """config.data.image_size, or the model's own resolution when it is unset."""
  return config.data.get("image_size") or models.image_size(config.family, config.model)


def placeholders_per_image(config: Config) -> int:
  """Tokens the text holds for one image at the data's image size (AnyRes: the most any
  image can need; each image takes what its size needs)."""
  native = layout(config)
  if isinstance(native, anyres.Layout):
    return native.max_tokens
  return models.placeholders_per_image(config.family, config.model, image_size(config))


def images_per_example(data: Config) -> int:
  """Image slots an example has: data.max_images (llava) or one."""
  return data.max_images if data.name == "llava" else 1


def images_per_row(data: Config) -> int:
  """Image slots in a row: data.pack examples of images_per_example."""
  return data.get("pack", 1) * images_per_example(data)


def layout(config: Config) -> patches.Layout | anyres.Layout | tiles.Layout | None:
  """How images at their own size are laid out: packed patches (config.data.max_patches set),
  AnyRes tiles (an early-fusion model with grid_pinpoints), Llama 3.2 Vision's tiles (a
  tiled vision tower), else None."""
  data = config.data
  if config.model.get("vision_tower") == "tiled":
    vision = config.model.vit
    return tiles.Layout(vision.image_size, vision.get("max_tiles", 4),
                        max_images=images_per_row(data))
  if config.family == "early_fusion" and config.model.get("grid_pinpoints"):
    return anyres.Layout(tuple(map(tuple, config.model.grid_pinpoints)), image_size(config),
                         models.patch_size(config.family, config.model),
                         max_images=images_per_row(data))
  if not data.get("max_patches"):
    return None
  return patches.Layout(patch=models.patch_size(config.family, config.model),
                        slots=data.max_patches, max_images=images_per_row(data),
                        cls=models.has_cls(config.family, config.model))


def _tokens(data: Config) -> dict:
  return dict(tokenizer=data.get("tokenizer", "bytes"), pack=data.get("pack", 1))


def _scenes(config: Config, split: str, common: dict, *, in_memory: bool) -> base.Source:
  data = config.data
  fields = dict(task=data.task, max_shapes=data.max_shapes,
                tokenizer=data.get("tokenizer", "bytes"), prefix_lm=data.get("prefix_lm", False),
                image_token_id=config.model.image_token_id, **common)
  if in_memory:
    return synthetic.ShapeScenes(config.batch_size, data.seq_len, image_size(config),
                                 placeholders_per_image(config), layout=layout(config),
                                 sizes=data.get("scene_sizes", "fixed"), **fields)
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  native = layout(config)
  tiled = native if isinstance(native, tiles.Layout) else None
  return pipeline.TfdsScenes(config.batch_size, data.seq_len, image_size(config),
                             placeholders_per_image(config), data_dir=data.data_dir,
                             train_size=data.train_size, eval_size=data.eval_size,
                             layout=tiled, **fields)


def _annotated(config: Config, split: str, common: dict) -> base.Source:
  """LLaVA conversations or COCO captions: annotations JSON + image folder."""
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  source = {"llava": pipeline.LlavaConversations, "coco_captions": pipeline.CocoCaptions}
  # llava: image slots per example; coco_captions: a separate validation file, if any.
  images = dict(max_images=data.max_images) if data.name == "llava" else dict(
      val_json=data.get("val_json", ""), val_image_dir=data.get("val_image_dir", ""))
  del split  # in common
  return source[data.name](
      config.batch_size, data.seq_len, json_path=data.json, image_dir=data.image_dir,
      image_size=image_size(config), image_tokens=placeholders_per_image(config),
      image_token_id=config.model.image_token_id, data_dir=data.data_dir,
      resize=data.get("resize", "bilinear"), layout=layout(config), **images, **_tokens(data),
      prefix_lm=data.get("prefix_lm", False), **common)


def _image_folder(config: Config, split: str, common: dict) -> base.Source:
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  records, order, num_classes = pipeline.image_folder(config.data.image_dir, split, config.seed,
                                                      config.data.data_dir)
  return pipeline.ImageClasses(config.batch_size, image_size(config), records, order,
                               num_classes, resize=config.data.get("resize", "bilinear"),
                               **common)


def _text(config: Config, split: str, common: dict) -> base.Source:
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  records, order = pipeline.text_files(data.files, data.text_key, split, config.seed,
                                       data.data_dir)
  return pipeline.Documents(config.batch_size, data.seq_len, records, order, text_key="text",
                            **_tokens(data), **common)


def _tfds(config: Config, split: str, common: dict) -> base.Source:
  """A prepared tfds dataset by name: its images and labels for a ViT, else its text."""
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  builder, splits = pipeline.named_builder(data.tfds_name, data.data_dir)
  records, order = pipeline.open_split(builder, splits[split], config.seed, prepare=False)
  if config.family == "vit":
    return pipeline.ImageClasses(
        config.batch_size, image_size(config), records, order,
        builder.info.features[data.label_key].num_classes, image_key=data.image_key,
        label_key=data.label_key, resize=data.get("resize", "bilinear"), **common)
  return pipeline.Documents(config.batch_size, data.seq_len, records, order,
                            text_key=data.text_key, **_tokens(data), **common)


IMAGE_TEXT = models.IMAGE_TEXT
PREFIX_LM = ("shapes", "tfds_scenes", "coco_captions")  # sources of (prompt, answer) pairs
SCENES_TEMPLATE = "<image>{prompt} "  # the image, the question, a space: then the answer
SOURCES = {
    "arithmetic": Entry(("lm",), lambda config, split, common: synthetic.ArithmeticText(
        config.batch_size, config.data.seq_len, **common)),
    "text": Entry(("lm",), _text, required=("files", "seq_len"), packs=True),
    "tfds": Entry(("lm", "vit"), _tfds, required=("tfds_name",), packs=True),
    "shape_classes": Entry(("vit",), lambda config, split, common: synthetic.ShapeClasses(
        config.batch_size, image_size(config), config.data.get("max_shapes", 1), **common)),
    "image_folder": Entry(("vit",), _image_folder, required=("image_dir",)),
    "shapes": Entry(IMAGE_TEXT, lambda config, split, common: _scenes(
        config, split, common, in_memory=True), own_sizes=True, template=SCENES_TEMPLATE),
    "tfds_scenes": Entry(IMAGE_TEXT, lambda config, split, common: _scenes(
        config, split, common, in_memory=False), template=SCENES_TEMPLATE),
    "llava": Entry(IMAGE_TEXT, _annotated, required=("json", "image_dir", "seq_len"),
                   packs=True, own_sizes=True, template=tokenizers.LLAVA_TEMPLATE),
    "coco_captions": Entry(IMAGE_TEXT, _annotated, required=("json", "image_dir", "seq_len"),
                           packs=True, own_sizes=True, template="<image>{prompt}"),
}


def names_for(family: str) -> tuple[str, ...]:
  return tuple(name for name, entry in SOURCES.items() if family in entry.families)


def check(config: Config):
  """One-line errors naming the config.data key, raised before anything is read or compiled."""
  data = config.data
  if data.name not in SOURCES:
    raise ValueError(f"config.data.name must be one of {sorted(SOURCES)}, got {data.name!r}")
  entry = SOURCES[data.name]
  if config.family not in entry.families:
    raise ValueError(f"config.data.name={data.name!r} does not feed a {config.family} model; "
                     f"use one of {names_for(config.family)}")
  for key in entry.required:
    if not data.get(key):
      raise ValueError(f"config.data.{key} must be set for config.data.name={data.name!r}")
  if config.family == "early_fusion" and config.model.get("grid_pinpoints"):
    _check_anyres(config)
  if data.get("prefix_lm"):
    _check_prefix_lm(config)
  if data.get("max_patches"):
    if config.family != "deep_fusion" or not entry.own_sizes:
      raise ValueError("config.data.max_patches (images at their own size, packed) feeds deep "
                       f"fusion from data.name {_own_sizes()}, not {config.family} from "
                       f"{data.name!r}")
    smallest = patches.tokens_per_image((1, 1), models.has_cls(config.family, config.model))
    # Each of an example's images gets its share of a row (llava: data.max_images of them).
    share = data.max_patches // images_per_example(data)
    if share < smallest:
      raise ValueError(f"config.data.max_patches={data.max_patches} holds no image"
                       + (f" in each of data.max_images={data.max_images} shares"
                          if data.name == "llava" else ""))
  if config.family == "vit" and data.get("max_shapes", 1) > 1 and data.name != "shape_classes":
    raise ValueError(f"config.data.max_shapes={data.max_shapes} draws data.name="
                     f"'shape_classes' scenes, not {data.name!r}")
  if data.get("scene_sizes", "fixed") != "fixed" and data.name != "shapes":
    raise ValueError(f"config.data.scene_sizes={data.scene_sizes!r} draws data.name='shapes' "
                     f"scenes, not {data.name!r}")
  if data.get("pack", 1) > 1 and not (entry.packs or data.get("max_patches")):
    packing = [name for name, e in SOURCES.items() if e.packs]
    raise ValueError(f"config.data.pack={data.pack} packs only {packing}, not {data.name!r}")
  if config.family != "lm":
    size = image_size(config)
    patch = models.patch_size(config.family, config.model)
    if size % patch:
      key = "config.data.image_size" if data.get("image_size") else (
          "config.model.vit.image_size" if config.family in IMAGE_TEXT
          else "config.model.image_size")
      raise ValueError(f"{key}={size} is not a multiple of the ViT's patch size {patch}")
  if config.family != "vit":
    vocab = models.build("lm", models.language_fields(config.family, config.model)).vocab_size
    tokenizer = tokenizers.load(data.get("tokenizer", "bytes"))
    if vocab < tokenizer.vocab_size:
      key = "config.model.vocab_size" if config.family == "lm" else "config.model.lm.vocab_size"
      raise ValueError(f"{key}={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
                       f"ids ({tokenizer!r}, config.data.name={data.name!r})")


def _own_sizes() -> str:
  """The sources that can keep each image's size, as an error message names them."""
  return " or ".join(repr(name) for name, e in SOURCES.items() if e.own_sizes)


def _check_prefix_lm(config: Config):
  data = config.data
  if config.family != "early_fusion":
    raise ValueError(f"config.data.prefix_lm (PaliGemma's layout) feeds early fusion, not "
                     f"{config.family}")
  if data.name not in PREFIX_LM:
    raise ValueError(f"config.data.prefix_lm lays out a prompt and its answer: data.name "
                     f"{' or '.join(map(repr, PREFIX_LM))}, not {data.name!r}")
  if data.get("pack", 1) > 1 or data.get("max_patches") or config.model.get("grid_pinpoints"):
    raise ValueError("config.data.prefix_lm reads one example a row, images of one size: unset "
                     "data.pack, data.max_patches and model.grid_pinpoints")


def _check_anyres(config: Config):
  model, data = config.model, config.data
  if not SOURCES[data.name].own_sizes:
    raise ValueError("config.model.grid_pinpoints (AnyRes, LLaVA-NeXT) reads images at their "
                     f"own size from data.name {_own_sizes()}, not {data.name!r}")
  if data.get("max_patches") or data.get("pack", 1) > 1:
    raise ValueError("config.data.max_patches and config.data.pack pack deep fusion's rows; "
                     "AnyRes (config.model.grid_pinpoints) takes one example a row")
  tile = image_size(config)
  for pinpoint in model.grid_pinpoints:
    if len(pinpoint) != 2 or any(side <= 0 or side % tile for side in pinpoint):
      raise ValueError(f"config.model.grid_pinpoints: {tuple(pinpoint)} is not a (height, "
                       f"width) of whole {tile} px tiles (the ViT's image size)")
  if models.has_cls(config.family, model) and not model.get("drop_cls", True):
    raise ValueError("config.model.drop_cls=False: AnyRes tiles give the LM their patches "
                     "only, as LLaVA-NeXT does; set it True")


def build(config: Config, split: str = "train") -> base.Source:
  """This process's share of the global batches of config.data's `split`."""
  check(config)
  data = config.data
  common = dict(seed=config.seed, split=split, process_index=jax.process_index(),
                process_count=jax.process_count())
  if "image_mean" in data:
    common.update(image_mean=data.image_mean, image_std=data.image_std)
  return SOURCES[data.name].build(config, split, common)


def batch_spec(config: Config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's arrays as shapes and dtypes, from the config alone (no data is read).

  Image classification: images float32[B, S, S, 3], labels int32[B] (multi-hot
  float32[B, classes] for shape_classes scenes of several shapes). Text:
  tokens, targets int32[B, T], loss_weights float32[B, T], plus segment_ids and
  positions int32[B, T] when packing, and images float32[B, I, S, S, 3] for
  the image-text families, or with config.data.max_patches the packed patches
  of `patches.Layout.spec` (and segment ids and positions).
  """
  check(config)
  data, B = config.data, config.batch_size
  native = layout(config)
  if config.family == "vit":
    size = image_size(config)
    labels = (jax.ShapeDtypeStruct((B, config.model.num_classes), np.float32)
              if data.get("max_shapes", 1) > 1 else jax.ShapeDtypeStruct((B,), np.int32))
    return {"images": jax.ShapeDtypeStruct((B, size, size, 3), np.float32), "labels": labels}
  seq_len = data.seq_len
  if data.name in ("shapes", "tfds_scenes") and seq_len is None:  # the task's longest example
    seq_len = synthetic.ShapeScenes(B, None, image_size(config), placeholders_per_image(config),
                                    task=data.task, max_shapes=data.max_shapes,
                                    tokenizer=data.get("tokenizer", "bytes"),
                                    layout=native,
                                    sizes=data.get("scene_sizes", "fixed")).seq_len
  text = jax.ShapeDtypeStruct((B, seq_len), np.int32)
  spec = {"tokens": text, "targets": text,
          "loss_weights": jax.ShapeDtypeStruct((B, seq_len), np.float32)}
  pack = data.get("pack", 1)
  if pack > 1 or isinstance(native, patches.Layout):
    spec.update(segment_ids=text, positions=text)
  if data.get("prefix_lm"):
    spec["prefix_len"] = jax.ShapeDtypeStruct((B,), np.int32)
  if native:
    spec.update({k: jax.ShapeDtypeStruct(shape, dtype)
                 for k, (shape, dtype) in native.spec(B).items()})
  elif config.family in IMAGE_TEXT:
    size = image_size(config)
    spec["images"] = jax.ShapeDtypeStruct((B, images_per_row(data), size, size, 3), np.float32)
  return spec


def check_batch(source: base.Source, batch: dict[str, np.ndarray],
                spec: dict[str, jax.ShapeDtypeStruct]):
  """This process's rows of a batch against the global spec the steps were compiled for."""
  rows = source.local_batch_size
  want = {k: ((rows, *v.shape[1:]), np.dtype(v.dtype)) for k, v in spec.items()}
  got = {k: (v.shape, v.dtype) for k, v in batch.items()}
  if got != want:
    raise ValueError(f"{source!r} yields {got}, but batch_spec promised {want} for this "
                     "process's rows: the steps were compiled for the latter")

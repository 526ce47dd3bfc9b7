"""Pretrained towers for the fusion models: config.towers.vision and config.towers.language.

  python train.py --config configs/deep_fusion.py:pretrained --workdir DIR \\
      --config.towers.vision=clip-vit-base-patch16/ --config.towers.language=TinyLlama/

Each tower is a HuggingFace directory (config.json + *.safetensors: a ViT, CLIP or
SigLIP vision model; GPT-2 or Llama), a tools/import_hf.py or export_hf.py
--format=params output (mmjax_config.json + params/), or a train.py workdir (its newest
checkpoint: configs/vit.py:tiny-scenes trains the tiny pair's ViT). `resolve` derives
from them what the config cannot know in advance: the towers' fields, the pixel mean and
std of the vision tower's preprocessor, the language tower's tokenizer and the image
token's id (added to the tokenizer when it has none, with a new row of the LM's
embedding table that trains even when the LM is frozen). `load` reads their weights
straight into the shardings of the training state.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import checkpoint
from mmjax import models
from mmjax.data import tokenizers
from mmjax.interop import hf
from mmjax.models import lm as lm_lib

Config = ml_collections.ConfigDict


def _read(directory: str, key: str) -> tuple[dict, tuple[str, str | None] | None, str]:
  """A tower directory -> ({"family", "model", maybe "pixels"}, where an mmjax tower's
  parameters are: (Orbax directory, subtree or None), None for a HuggingFace tower; its
  tokenizer: a file, "bytes" for a byte-level mmjax run, "" where there is none)."""
  hf_config = os.path.join(directory, "config.json")
  if os.path.exists(os.path.join(directory, "mmjax_config.json")) or os.path.isdir(
      os.path.join(directory, "checkpoints")):
    config, params_dir, subtree, tokenizer = checkpoint.params_location(directory, key)
    return config, (params_dir, subtree), tokenizer
  if not os.path.exists(hf_config):
    raise FileNotFoundError(f"{key}={directory} holds neither config.json (HuggingFace), "
                            "mmjax_config.json (tools/import_hf.py, tools/export_hf.py "
                            "--format=params) nor checkpoints/ (a train.py workdir)")
  with open(hf_config) as f:
    config = hf.mmjax_config(json.load(f))
  preprocessor = os.path.join(directory, "preprocessor_config.json")
  if os.path.exists(preprocessor):
    with open(preprocessor) as f:
      settings = json.load(f)
    if "image_mean" in settings:
      config["pixels"] = {"mean": settings["image_mean"], "std": settings["image_std"]}
  return config, None, checkpoint.tokenizer_file(directory)


# Fields that say how a tower runs, not what it is: the config's own win over the tower's.
RUN_FIELDS = ("attention_impl", "remat_policy", "scan_layers")


def resolve(config: Config) -> Config:
  """config, with what its pretrained towers decide filled in; unchanged without towers."""
  towers = config.get("towers") or Config(dict(vision="", language=""))
  for name, key in (("vit", "vision"), ("lm", "language")):
    fields = config.model.get(name) if config.get("model") else None
    if fields is not None and not (fields.get("variant") or fields.get("width")) and not (
        towers.get(key)):
      raise ValueError(f"config.model.{name} comes from a pretrained tower: set "
                       f"config.towers.{key} to its directory")
  if not (towers.get("vision") or towers.get("language")):
    return config
  config = Config(config.to_dict())
  if towers.vision:
    read, _, _ = _read(towers.vision, "config.towers.vision")
    if read["family"] != "vit":
      raise ValueError(f"config.towers.vision={towers.vision} holds a {read['family']} model, "
                       "not a vision tower (ViT, CLIP or SigLIP)")
    config.model.vit = _with_run_fields(read["model"], config.model.vit, num_classes=None)
    if "pixels" in read:
      config.data.image_mean = tuple(read["pixels"]["mean"])
      config.data.image_std = tuple(read["pixels"]["std"])
  if towers.language:
    read, _, tokenizer_spec = _read(towers.language, "config.towers.language")
    if read["family"] != "lm":
      raise ValueError(f"config.towers.language={towers.language} holds a {read['family']} "
                       "model, not a language model (GPT-2 or Llama)")
    if not tokenizer_spec:
      raise FileNotFoundError(f"config.towers.language={towers.language} has no tokenizer.json "
                              "or tokenizer.model")
    tokenizer = tokenizers.load(tokenizer_spec)
    tower_vocab = read["model"]["vocab_size"]
    # The image token may be new to the tokenizer (then its id is the next one): the table grows.
    config.model.lm = _with_run_fields(read["model"], config.model.lm,
                                       vocab_size=max(tower_vocab, tokenizer.vocab_size))
    config.model.image_token_id = tokenizer.image_id
    config.data.tokenizer = tokenizer_spec
    # A new row for deep fusion's image marker, trained even where the LM is frozen. (Early
    # fusion replaces its placeholders' embeddings with the image's: that row is never read.)
    if tokenizer.image_id >= tower_vocab and config.family == "deep_fusion":
      config.optimizer.trained_rows = (("lm/embedder/embedding", (tokenizer.image_id,)),)
  if config.family == "deep_fusion" and config.model.get("cross_every") is None:
    # A cross block before every 4th block (Flamingo), or every block of a shallower LM.
    config.model.cross_every = min(4, models.build("lm", config.model.lm).depth)
  return config


def _with_run_fields(tower: dict, configured: Config, **fields) -> Config:
  """The tower's fields, with how the config runs it and `fields` over them."""
  run = {k: v for k, v in (configured or {}).items() if k in RUN_FIELDS and v is not None}
  return Config({**tower, **run, **fields})


def load(config: Config, target: dict) -> dict:
  """The towers' weights as parameter subtrees {"vit": ..., "lm": ...}, each placed in the
  shardings of target (the abstract parameters, ShapeDtypeStructs with shardings).

  The LM tables the tokenizer outgrew (a new image token: the embedding's rows, an untied
  head's columns) get their new entries set to the mean of the tower's, as HF's
  resize_token_embeddings starts them.
  """
  parts = {}
  for name, key in (("vit", "vision"), ("lm", "language")):
    directory = config.towers.get(key)
    if not directory:
      continue
    read, mmjax_params, _ = _read(directory, f"config.towers.{key}")
    want = target[name]
    grown = _grown_tables(want, read["model"]["vocab_size"]) if name == "lm" else {}
    tower_target = want
    for path, (axis, vocab) in grown.items():
      leaf = _get(want, path)
      shape = tuple(vocab if i == axis else n for i, n in enumerate(leaf.shape))
      tower_target = _set(tower_target, path, jax.ShapeDtypeStruct(shape, leaf.dtype,
                                                                    sharding=leaf.sharding))
    if mmjax_params is None and name == "lm" and "blocks" in want:
      params = _load_stacked(directory, tower_target)
    elif mmjax_params is None:
      _, params = hf.load(directory, jax.tree.map(lambda s: s.sharding, tower_target))
    else:
      # A classifier serves as a vision tower without its head (resolve drops num_classes).
      unused = ("head",) if name == "vit" and read["model"].get("num_classes") else ()
      params_dir, subtree = mmjax_params
      params = checkpoint.load_params(params_dir, tower_target, unused, subtree)
    for path, (axis, vocab) in grown.items():
      leaf = _get(want, path)
      grow = jax.jit(lambda t, axis=axis, n=leaf.shape[axis] - vocab: jnp.concatenate(
          [t, jnp.repeat(jnp.mean(t, axis=axis, keepdims=True), n, axis=axis)], axis=axis),
                     out_shardings=leaf.sharding)
      params = _set(params, path, grow(_get(params, path)))
    parts[name] = params
  return parts


def _load_stacked(directory: str, target: dict) -> dict:
  """A HuggingFace LM (a tensor per layer) into a scanned LM's target (blocks stacked): each
  layer read into the shards of its slice of the stack, then stacked into the target's."""
  shardings = jax.tree.map(lambda s: s.sharding, target)
  depth = jax.tree.leaves(target["blocks"])[0].shape[0]
  block = jax.tree.map(lambda s: jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(*s.spec[1:])) if isinstance(
          s, jax.sharding.NamedSharding) else s, shardings["blocks"])
  layers = {k: v for k, v in shardings.items() if k != "blocks"}
  layers.update({f"block_{i}": block for i in range(depth)})
  _, params = hf.load(directory, layers)
  return jax.jit(lambda p: lm_lib.stack_layers(p, depth), out_shardings=shardings)(params)


def _grown_tables(want: dict, vocab: int) -> dict[str, tuple[int, int]]:
  """The LM tables with more vocabulary entries than the tower's: path -> (vocab axis, vocab)."""
  out = {}
  for path, axis in (("embedder/embedding", 0), ("head/kernel", 1)):
    leaf = _get(want, path)
    if leaf is not None and leaf.shape[axis] > vocab:
      out[path] = (axis, vocab)
  return out


def _get(tree: dict, path: str):
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set(tree: dict, path: str, value) -> dict:
  head, _, rest = path.partition("/")
  return {**tree, head: _set(tree[head], rest, value) if rest else value}

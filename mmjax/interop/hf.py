"""HuggingFace safetensors <-> mmjax: ViT, CLIP and SigLIP towers, GPT-2, Llama, LLaVA, and
(through the family files beside it: gemma, paligemma, mllama, idefics) Gemma and Gemma 2,
PaliGemma 1 and 2, Llama 3.2 Vision and IDEFICS.

Each architecture's table (mmjax.interop.tables) lists every HuggingFace
tensor and the mmjax parameters it becomes. The mmjax config is derived from
`config.json`; a field mmjax cannot reproduce is an error naming it. Neither
direction needs torch or transformers: tensors are read and written with
safetensors.
"""
import json
import os
import re
import shutil

from flax import linen as nn
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mmjax import lora
from mmjax import models
from mmjax.interop import gemma
from mmjax.interop import idefics
from mmjax.interop import mllama
from mmjax.interop import paligemma
from mmjax.interop.tables import (Entry, activation, attention, conv, dense,
                                  fused_qkv, heads_out, linear, norm, require, reshaped,
                                  rope_config, rope_fields, same)
from mmjax.models import lm
from mmjax.models import vit

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


# ----------------------------------------------------------------------------
# Configs: HuggingFace config.json <-> mmjax model fields.
# ----------------------------------------------------------------------------

VISION_TYPES = ("vit", "clip_vision_model", "siglip_vision_model")
def vit_fields(cfg: dict) -> dict:
  """ViT / CLIP / SigLIP vision config.json -> vit.Model fields."""
  kind = require(cfg, "model_type", VISION_TYPES, "vision tower")
  fields = dict(width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                mlp_dim=cfg["intermediate_size"], num_heads=cfg["num_attention_heads"],
                patch_size=cfg["patch_size"], image_size=cfg["image_size"],
                posemb_resize="bicubic")  # interpolate_pos_encoding's, for other resolutions
  if cfg.get("num_channels", 3) != 3:
    raise ValueError(f"vision tower: config.json field 'num_channels'={cfg['num_channels']} "
                     "is not supported (mmjax handles [3])")
  if kind == "vit":
    if not cfg.get("qkv_bias", True):
      raise ValueError("vision tower: config.json field 'qkv_bias'=False is not supported")
    fields.update(pool="cls", norm_eps=cfg.get("layer_norm_eps", 1e-12),
                  mlp_activation=activation(cfg, "hidden_act", "ViT", ("gelu",)))
  elif kind == "clip_vision_model":
    fields.update(pool="cls", pre_norm=True, patch_bias=False,
                  norm_eps=cfg.get("layer_norm_eps", 1e-5),
                  mlp_activation=activation(cfg, "hidden_act", "CLIP", ("quick_gelu", "gelu")))
  else:
    fields.update(pool="map" if cfg.get("vision_use_head", True) else "gap",
                  norm_eps=cfg.get("layer_norm_eps", 1e-6),
                  mlp_activation=activation(cfg, "hidden_act", "SigLIP",
                                             ("gelu_pytorch_tanh", "gelu")))
  return fields


def lm_fields(cfg: dict) -> dict:
  """GPT-2 / Llama config.json -> lm.Model fields."""
  kind = require(cfg, "model_type", ("gpt2", "llama"), "language model")
  if kind == "gpt2":
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if cfg.get(flag):
        raise ValueError(f"GPT-2: config.json field {flag!r}=True is not supported")
    if not cfg.get("scale_attn_weights", True):
      raise ValueError("GPT-2: config.json field 'scale_attn_weights'=False is not supported")
    return dict(flavour="gpt2", width=cfg["n_embd"], depth=cfg["n_layer"],
                num_heads=cfg["n_head"], mlp_dim=cfg.get("n_inner") or 4 * cfg["n_embd"],
                vocab_size=cfg["vocab_size"], max_len=cfg["n_positions"],
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                mlp_activation=activation(cfg, "activation_function", "GPT-2",
                                           ("gelu_new", "gelu")),
                tie_embeddings=cfg.get("tie_word_embeddings", True))
  for flag in ("attention_bias", "mlp_bias"):
    if cfg.get(flag):
      raise ValueError(f"Llama: config.json field {flag!r}=True is not supported")
  activation(cfg, "hidden_act", "Llama", ("silu",))
  heads = cfg["num_attention_heads"]
  return dict(flavour="llama", width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
              num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
              head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
              mlp_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
              max_len=cfg.get("max_position_embeddings", 2048),
              **rope_fields(cfg, "Llama"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
              tie_embeddings=cfg.get("tie_word_embeddings", False))


def mmjax_config(cfg: dict) -> dict:
  """config.json -> {"family": ..., "model": fields} for mmjax.models.build."""
  kind = cfg.get("model_type")
  if kind in VISION_TYPES:
    fields = vit_fields(cfg)
    if kind == "vit" and "ViTForImageClassification" in cfg.get("architectures", []):
      fields["num_classes"] = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    return {"family": "vit", "model": fields}
  if kind in ("gpt2", "llama"):
    return {"family": "lm", "model": lm_fields(cfg)}
  if kind in gemma.TYPES:
    if cfg.get("use_bidirectional_attention"):
      raise ValueError("Gemma: config.json field 'use_bidirectional_attention'=True (an encoder) "
                       "is not supported")
    return {"family": "lm", "model": gemma.lm_fields(cfg)}
  if kind == "paligemma":
    return paligemma.mmjax_config(cfg, vit_fields(cfg["vision_config"]))
  if kind in ("llava", "llava_next"):
    strategy = require(cfg, "vision_feature_select_strategy",
                        ("default", "full") if kind == "llava" else ("default",), "LLaVA")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or layer == 0:
      raise ValueError(f"LLaVA: config.json field 'vision_feature_layer'={layer!r} is not "
                       "supported (one layer index, not the embeddings' 0)")
    # HF's hidden_states[0] is the embeddings and hidden_states[i + 1] block i's output, which
    # mmjax calls block_i: counted from the end they agree, from the start they are one apart.
    layer = layer - 1 if layer > 0 else layer
    require(cfg, "projector_hidden_act", ("gelu",), "LLaVA")
    if not cfg.get("multimodal_projector_bias", True):
      raise ValueError("LLaVA: config.json field 'multimodal_projector_bias'=False is not "
                       "supported")
    vision = vit_fields(cfg["vision_config"])
    if vision["pool"] != "cls":
      raise ValueError("LLaVA: only a ViT or CLIP vision_config (with a cls token) is supported")
    fields = dict(vit=vision, lm=lm_fields(cfg["text_config"]),
                  image_token_id=cfg.get("image_token_index", cfg.get("image_token_id")),
                  projector="mlp2x_gelu", vision_layer=layer, drop_cls=strategy == "default")
    if kind == "llava_next":  # AnyRes: tiles on a grid of pinpoints, a newline per grid row
      fields["grid_pinpoints"] = tuple(tuple(p) for p in cfg["image_grid_pinpoints"])
    return {"family": "early_fusion", "model": fields}
  if kind == "mllama":
    return mllama.mmjax_config(cfg)
  if kind == "idefics":
    return idefics.mmjax_config(cfg)
  known = [*VISION_TYPES, "gpt2", "llama", *gemma.TYPES, "llava", "llava_next", "paligemma",
           "mllama", "idefics"]
  raise ValueError(f"config.json field 'model_type'={kind!r} is not supported; mmjax imports "
                   f"{known}")


# ----------------------------------------------------------------------------
# Tables: which HuggingFace tensor becomes which mmjax parameter.
# ----------------------------------------------------------------------------


def vit_table(fields: dict, kind: str, hf: str = "", mm: str = "") -> list[Entry]:
  D, N, L = fields["width"], fields["num_heads"], fields["depth"]
  H = D // N
  e = []
  if kind == "vit":
    e += [conv(f"{hf}embeddings.patch_embeddings.projection.weight", f"{mm}embedding/kernel"),
          same(f"{hf}embeddings.patch_embeddings.projection.bias", f"{mm}embedding/bias"),
          same(f"{hf}embeddings.cls_token", f"{mm}cls"),
          same(f"{hf}embeddings.position_embeddings", f"{mm}pos_embedding"),
          *norm(f"{hf}layernorm", f"{mm}final_norm")]
    for i in range(L):
      p, b = f"{mm}block_{i}", f"{hf}encoder.layer.{i}"
      e += [*norm(f"{b}.layernorm_before", f"{p}/attn_norm"),
            *attention(f"{b}.attention", f"{p}/attn",
                       ("attention.query", "attention.key", "attention.value", "output.dense"),
                       N, N, H, bias=True),
            *norm(f"{b}.layernorm_after", f"{p}/mlp_norm"),
            *dense(f"{b}.intermediate.dense", f"{p}/mlp/up"),
            *dense(f"{b}.output.dense", f"{p}/mlp/down")]
    return e
  e += [conv(f"{hf}embeddings.patch_embedding.weight", f"{mm}embedding/kernel"),
        reshaped(f"{hf}embeddings.position_embedding.weight", f"{mm}pos_embedding",
                 (1, -1, D), (-1, D)),
        *norm(f"{hf}post_layernorm", f"{mm}final_norm")]
  if kind == "clip_vision_model":  # no patch bias; a class embedding; a pre-norm
    e += [reshaped(f"{hf}embeddings.class_embedding", f"{mm}cls", (1, 1, D)),
          *norm(f"{hf}pre_layrnorm", f"{mm}pre_norm")]
  else:
    e.append(same(f"{hf}embeddings.patch_embedding.bias", f"{mm}embedding/bias"))
  for i in range(L):
    p, b = f"{mm}block_{i}", f"{hf}encoder.layers.{i}"
    e += [*norm(f"{b}.layer_norm1", f"{p}/attn_norm"),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "out_proj"),
                     N, N, H, bias=True),
          *norm(f"{b}.layer_norm2", f"{p}/mlp_norm"),
          *dense(f"{b}.mlp.fc1", f"{p}/mlp/up"),
          *dense(f"{b}.mlp.fc2", f"{p}/mlp/down")]
  if kind == "siglip_vision_model" and fields["pool"] == "map":
    h, p = f"{hf}head", f"{mm}map_head"
    e += [same(f"{h}.probe", f"{p}/probe"),
          fused_qkv(f"{h}.attention.in_proj_weight",
                    [f"{p}/attn/{n}/kernel" for n in ("query", "key", "value")], N, H, True),
          fused_qkv(f"{h}.attention.in_proj_bias",
                    [f"{p}/attn/{n}/bias" for n in ("query", "key", "value")], N, H, False),
          heads_out(f"{h}.attention.out_proj.weight", f"{p}/attn/out/kernel", N, H),
          same(f"{h}.attention.out_proj.bias", f"{p}/attn/out/bias"),
          *norm(f"{h}.layernorm", f"{p}/norm"),
          *dense(f"{h}.mlp.fc1", f"{p}/mlp/up"),
          *dense(f"{h}.mlp.fc2", f"{p}/mlp/down")]
  return e


def lm_table(fields: dict, hf: str = "", mm: str = "", head: str = "lm_head") -> list[Entry]:
  D, N, L = fields["width"], fields["num_heads"], fields["depth"]
  if fields["flavour"] == "gpt2":
    H = D // N
    e = [same(f"{hf}transformer.wte.weight", f"{mm}embedder/embedding"),
         same(f"{hf}transformer.wpe.weight", f"{mm}pos_embedding"),
         *norm(f"{hf}transformer.ln_f", f"{mm}final_norm")]
    for i in range(L):
      p, b = f"{mm}block_{i}", f"{hf}transformer.h.{i}"
      e += [*norm(f"{b}.ln_1", f"{p}/attn_norm"),
            fused_qkv(f"{b}.attn.c_attn.weight",
                      [f"{p}/attn/{n}/kernel" for n in ("query", "key", "value")], N, H, False),
            fused_qkv(f"{b}.attn.c_attn.bias",
                      [f"{p}/attn/{n}/bias" for n in ("query", "key", "value")], N, H, False),
            Entry(f"{b}.attn.c_proj.weight", (f"{p}/attn/out/kernel",),  # Conv1D: [in, out]
                  lambda t: (t.reshape(N, H, -1),), lambda a: a[0].reshape(N * H, -1)),
            same(f"{b}.attn.c_proj.bias", f"{p}/attn/out/bias"),
            *norm(f"{b}.ln_2", f"{p}/mlp_norm"),
            same(f"{b}.mlp.c_fc.weight", f"{p}/mlp/up/kernel"),
            same(f"{b}.mlp.c_fc.bias", f"{p}/mlp/up/bias"),
            same(f"{b}.mlp.c_proj.weight", f"{p}/mlp/down/kernel"),
            same(f"{b}.mlp.c_proj.bias", f"{p}/mlp/down/bias")]
    if not fields["tie_embeddings"]:
      e.append(linear(f"{head}.weight", f"{mm}head/kernel"))
    return e
  K, H = fields["num_kv_heads"], fields["head_dim"]
  e = [same(f"{hf}embed_tokens.weight", f"{mm}embedder/embedding"),
       *norm(f"{hf}norm", f"{mm}final_norm", bias=False)]
  for i in range(L):
    p, b = f"{mm}block_{i}", f"{hf}layers.{i}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, K, H, bias=False),
          *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False),
          *dense(f"{b}.mlp.gate_proj", f"{p}/mlp/gate", bias=False),
          *dense(f"{b}.mlp.up_proj", f"{p}/mlp/up", bias=False),
          *dense(f"{b}.mlp.down_proj", f"{p}/mlp/down", bias=False)]
  if not fields["tie_embeddings"]:
    e.append(linear(f"{head}.weight", f"{mm}head/kernel"))
  return e


def table(hf_config: dict, mm_config: dict) -> list[Entry]:
  """Every tensor of the HuggingFace checkpoint described by hf_config."""
  kind, fields = hf_config["model_type"], mm_config["model"]
  if kind in VISION_TYPES:
    if fields.get("num_classes"):  # ViTForImageClassification: the ViTModel under "vit."
      return [*vit_table(fields, kind, "vit."), *dense("classifier", "head")]
    return vit_table(fields, kind)
  if kind in ("gpt2", "llama"):
    return lm_table(fields, hf="" if kind == "gpt2" else "model.")
  if kind in gemma.TYPES:
    return gemma.table(fields)
  if kind == "paligemma":
    return [*vit_table(fields["vit"], "siglip_vision_model", "vision_tower.", "vit/"),
            *paligemma.table(fields)]
  if kind == "mllama":
    return mllama.table(fields)
  if kind == "idefics":
    return [*vit_table(fields["vit"], "clip_vision_model", "model.vision_model.", "vit/"),
            *idefics.table(fields)]
  # LLaVA (and LLaVA-NeXT) as written by transformers' save_pretrained.
  newline = [same("image_newline", "image_newline")] if kind == "llava_next" else []
  return [*vit_table(fields["vit"], hf_config["vision_config"]["model_type"], "vision_tower.",
                     "vit/"),
          *dense("multi_modal_projector.linear_1", "projector/dense_0"),
          *dense("multi_modal_projector.linear_2", "projector/dense_1"),
          *lm_table(fields["lm"], "language_model.model.", "lm/", "language_model.lm_head"),
          *newline]


# ----------------------------------------------------------------------------
# Import and export.
# ----------------------------------------------------------------------------

# Other spellings of the same tensors (older transformers, in-memory names) -> names on disk.
ALIASES = (("vision_tower.vision_model.", "vision_tower."),
           ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."),
           ("model.language_model.", "language_model.model."),
           ("model.image_newline", "image_newline"),
           ("model.vision_model.", "vision_model."),
           ("lm_head.", "language_model.lm_head."),
           ("vision_model.", ""))


def _tensor_files(hf_dir: str) -> dict[str, str]:
  """HuggingFace tensor name -> the safetensors file holding it (single file or sharded)."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
  single = os.path.join(hf_dir, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor "
                            "model.safetensors.index.json")
  with safe_open(single, "np") as f:
    return {name: single for name in f.keys()}


def _set(tree: dict, path: str, value):
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def load(hf_dir: str, shardings=None) -> tuple[dict, dict]:
  """Reads a HuggingFace model directory -> (mmjax config dict, params).

  Tensors are read one at a time and placed straight into `shardings` (a tree
  of jax.sharding.Sharding like the params, e.g. from mmjax.sharding), so no
  host holds the whole model at once.
  """
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  config = mmjax_config(hf_config)
  lookup = {name: (file, name) for name, file in _tensor_files(hf_dir).items()}
  for name, (file, _) in list(lookup.items()):
    for alias, canonical in ALIASES:
      if name.startswith(alias):
        lookup.setdefault(canonical + name[len(alias):], (file, name))
  params, handles = {}, {}
  try:
    for entry in table(hf_config, config):
      tensors = []
      for wanted in entry.names:
        if wanted not in lookup:
          raise ValueError(f"{hf_dir}: tensor {wanted!r} is missing from the safetensors files")
        file, name = lookup[wanted]
        if file not in handles:
          handles[file] = safe_open(file, "flax").__enter__()
        tensors.append(np.asarray(handles[file].get_tensor(name), np.float32))
      for path, value in zip(entry.paths, entry.to_mmjax(*tensors)):
        target = _get(shardings, path) if shardings is not None else None
        # From the host straight into its shards: no device ever holds the whole tensor.
        _set(params, path, jax.device_put(np.asarray(value, np.float32), target))
  finally:
    for handle in handles.values():
      handle.__exit__(None, None, None)
  return config, params


def copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the tokenizer files that exist in src; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def hf_config(config: dict) -> dict:
  """{"family", "model"} -> a config.json that transformers' from_pretrained reads."""
  family, fields = config["family"], config["model"]
  if family == "vit":
    return _vision_config(fields, classes=fields.get("num_classes"))
  if family == "lm":
    return _lm_config(fields)
  if family == "early_fusion" and paligemma.is_paligemma(fields):
    return paligemma.hf_config(fields, _vision_config(fields["vit"], classes=None))
  if family == "early_fusion":
    vision = _vision_config(fields["vit"], classes=None)
    if vision["model_type"] == "siglip_vision_model" or fields.get("vision_layer") is None:
      raise ValueError("LLaVA export needs a ViT or CLIP tower with a cls token and "
                       "model.vision_layer set (LLaVA reads hidden_states[vision_layer])")
    if fields.get("projector", "mlp2x_gelu") != "mlp2x_gelu":
      raise ValueError(f"LLaVA export needs model.projector='mlp2x_gelu', got "
                       f"{fields['projector']!r}")
    text = _lm_config(fields["lm"])
    anyres = dict(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                  image_grid_pinpoints=[list(p) for p in fields["grid_pinpoints"]]
                  ) if fields.get("grid_pinpoints") else dict(
                      architectures=["LlavaForConditionalGeneration"], model_type="llava")
    return dict(**anyres, vision_config=vision, text_config=text,
                image_token_index=fields["image_token_id"], projector_hidden_act="gelu",
                vision_feature_layer=(fields["vision_layer"] + 1 if fields["vision_layer"] >= 0
                                      else fields["vision_layer"]),
                vision_feature_select_strategy="default" if fields.get("drop_cls", True)
                else "full", multimodal_projector_bias=True,
                tie_word_embeddings=text.get("tie_word_embeddings", False))
  if family == "deep_fusion" and mllama.is_mllama(fields):
    return mllama.hf_config(fields)
  if family == "deep_fusion" and idefics.is_idefics(fields):
    return idefics.hf_config(fields)
  raise ValueError(f"HuggingFace export covers the vit, lm and early_fusion families, Llama "
                   f"3.2 Vision and IDEFICS (deep fusion with model.adapter_layers=0); family "
                   f"{family!r} exports its towers (tools/export_hf.py writes them)")


def _vision_config(fields: dict, classes) -> dict:
  m = vit.Model(**fields)
  common = dict(hidden_size=m.width, num_hidden_layers=m.depth, intermediate_size=m.mlp_dim,
                num_attention_heads=m.num_heads, patch_size=m.patch_size,
                image_size=m.image_size, num_channels=3, layer_norm_eps=m.norm_eps)
  if m.posemb != "learn":
    raise ValueError(f"HuggingFace vision towers learn their positions: model.posemb="
                     f"{m.posemb!r} has no HuggingFace equivalent")
  if m.pool in ("map", "gap"):  # SigLIP, with its MAP head or without (PaliGemma's tower)
    if m.mlp_activation != "gelu_tanh" or not m.patch_bias or m.pre_norm:
      raise ValueError("SigLIP export needs model.mlp_activation='gelu_tanh', a patch bias "
                       "and no pre-norm")
    return dict(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                hidden_act="gelu_pytorch_tanh", vision_use_head=m.pool == "map", **common)
  if m.pool != "cls":
    raise ValueError(f"HuggingFace vision towers have a cls token, a MAP head or neither "
                     f"(SigLIP): model.pool={m.pool!r} has no HuggingFace equivalent")
  if m.pre_norm != (not m.patch_bias):
    raise ValueError("HuggingFace towers pair a pre-norm with no patch bias (CLIP) or neither "
                     f"(ViT): model.pre_norm={m.pre_norm}, model.patch_bias={m.patch_bias}")
  if m.pre_norm:
    return dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                hidden_act="quick_gelu" if m.mlp_activation == "quick_gelu" else "gelu",
                **common)
  if m.mlp_activation != "gelu":
    raise ValueError("HF ViT export needs model.mlp_activation='gelu'")
  config = dict(model_type="vit", hidden_act="gelu", qkv_bias=True, **common)
  if classes:
    config.update(architectures=["ViTForImageClassification"],
                  id2label={str(i): f"LABEL_{i}" for i in range(classes)},
                  label2id={f"LABEL_{i}": i for i in range(classes)})
  else:
    config["architectures"] = ["ViTModel"]
  return config


def _lm_config(fields: dict) -> dict:
  m = lm.Model(**fields)
  if m.flavour in gemma.TYPES:
    return gemma.hf_config(fields)
  if m.flavour == "gpt2":
    if (m.positions, m.norm, m.use_bias) != ("learned", "layernorm", True):
      raise ValueError("GPT-2 export needs learned positions, LayerNorm and biases")
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=m.width,
                n_layer=m.depth, n_head=m.num_heads, n_inner=m.mlp_dim,
                vocab_size=m.vocab_size, n_positions=m.max_len,
                layer_norm_epsilon=m.norm_eps,
                activation_function="gelu_new" if m.mlp_activation == "gelu_tanh" else "gelu",
                tie_word_embeddings=m.tie_embeddings)
  if (m.positions, m.norm, m.mlp_activation, m.use_bias) != ("rope", "rmsnorm", "swiglu", False):
    raise ValueError("Llama export needs RoPE, RMSNorm, SwiGLU and no biases")
  rope = rope_config(m)
  return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=m.width,
              num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
              num_key_value_heads=m.num_kv_heads or m.num_heads,
              head_dim=m.head_dim or m.width // m.num_heads, intermediate_size=m.mlp_dim,
              vocab_size=m.vocab_size, max_position_embeddings=m.max_len,
              rms_norm_eps=m.norm_eps, rope_parameters=rope, hidden_act="silu",
              attention_bias=False, mlp_bias=False, tie_word_embeddings=m.tie_embeddings)


def save(out_dir: str, config: dict, params: dict, tokenizer=None) -> dict:
  """Writes config.json and model.safetensors that transformers' from_pretrained loads.

  tokenizer: the model's (mmjax.data.tokenizers), whose bos and eos ids config.json gets.
  """
  hf = hf_config(config)
  if tokenizer is not None:
    hf.get("text_config", hf).update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  tensors = {}
  for entry in table(hf, mmjax_config(hf)):
    values = tuple(np.asarray(jax.device_get(_get(params, p)), np.float32) for p in entry.paths)
    written = entry.to_hf(values)
    for name, tensor in zip(entry.names, written if isinstance(entry.hf, tuple) else (written,)):
      tensors[name] = np.ascontiguousarray(tensor)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return hf


def save_flat(path: str, params: dict):
  """Every parameter as a safetensors tensor named by its mmjax path ("lm/block_0/attn/...")."""
  flat = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(jax.device_get(v))
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  save_file(flat, path, metadata={"format": "mmjax", "names": "mmjax parameter paths"})


# ----------------------------------------------------------------------------
# LoRA adapters in the PEFT layout (adapter_model.safetensors + adapter_config.json).
# ----------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
# A LLaVA's LM modules as transformers names them in memory (where PEFT finds them) <- on disk.
IN_MEMORY = (("model.language_model.", "language_model.model."),)


def _module_name(tensor: str) -> str:
  """A weight's name on disk -> its module's name in the model PEFT adapts."""
  name = tensor.removesuffix(".weight")
  for memory, disk in IN_MEMORY:
    if name.startswith(disk):
      return memory + name[len(disk):]
  return name


def _kernels(config: dict) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """Each kernel of the model config describes: {path: (shape, logical axis names)}."""
  boxed = models.abstract_params(config["family"], config["model"])
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): (v.value.shape, tuple(v.names))
          for k, v in leaves if getattr(k[-1], "key", None) == "kernel"}


def _adapter_entries(config: dict, kernels: list[str]) -> dict[str, tuple[Entry, int]]:
  """mmjax kernel path -> (its HuggingFace entry, its number of input axes), for kernels HF
  stores as one [out, in] matrix of their flattened axes (Llama's projections, LLaVA's LM);
  any other is an error naming it."""
  entries = {e.paths[0]: e for e in table(hf_config(config), config)
             if len(e.paths) == 1 and isinstance(e.hf, str)}
  shapes = _kernels(config)
  found = {}
  for path in kernels:
    shape, names = shapes[path]
    stacked, inputs = lora.sides(names)
    entry = entries.get(path)
    probe = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    if stacked or entry is None or not np.array_equal(
        entry.to_hf((probe,)), probe.reshape(int(np.prod(shape[:inputs])), -1).T):
      raise ValueError(f"LoRA on {path} has no PEFT form (HuggingFace does not store that "
                       "kernel as one [out, in] matrix, e.g. GPT-2's fused c_attn): export it "
                       "merged (--format=hf)")
    found[path] = (entry, inputs)
  return found


def save_adapter(out_dir: str, config: dict, params: dict, settings: dict):
  """Writes the LoRA factors of params (unmerged; settings: optimizer.lora's rank and alpha)
  as a PEFT adapter of the HF model `save` writes from the same config, which
  peft.PeftModel.from_pretrained loads."""
  modules = [path.removesuffix("/lora_a") for path in _flat_paths(params)
             if path.endswith("/lora_a")]
  tensors, names = {}, []
  for path, (entry, _) in _adapter_entries(config, [f"{m}/kernel" for m in modules]).items():
    module = path.removesuffix("/kernel")
    a = np.asarray(jax.device_get(_get(params, f"{module}/lora_a")), np.float32)
    b = np.asarray(jax.device_get(_get(params, f"{module}/lora_b")), np.float32)
    r = a.shape[-1]
    name = _module_name(entry.hf)
    names.append(name)
    # W_hf = W.reshape(in, out).T, so delta_hf = (a @ b).T = b.T @ a.T: PEFT's B @ A.
    tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(settings["rank"]),
               "lora_alpha": float(settings["alpha"]), "lora_dropout": 0.0, "bias": "none",
               "target_modules": sorted(names), "fan_in_fan_out": False,
               "inference_mode": True, "base_model_name_or_path": None}, f, indent=2)


def load_adapter(adapter_dir: str, config: dict) -> tuple[dict, dict]:
  """A PEFT LoRA adapter of the model `config` describes -> (optimizer.lora settings
  {"targets", "rank", "alpha"}, the factors as params {module: {"lora_a", "lora_b"}})."""
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    settings = json.load(f)
  if (settings.get("peft_type") != "LORA" or settings.get("use_dora")
      or settings.get("use_rslora")):
    raise ValueError(f"{adapter_dir}/adapter_config.json: only plain LoRA adapters are read")
  by_name = {_module_name(e.hf): e.paths[0] for e in table(hf_config(config), config)
             if len(e.paths) == 1 and isinstance(e.hf, str)}
  with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "np") as f:
    tensors = {k.removeprefix(PEFT_PREFIX): f.get_tensor(k) for k in f.keys()}
  names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"{adapter_dir}: adapter module {unknown[0]!r} is not in the model")
  kernels = [by_name[n] for n in names]
  shapes = _kernels(config)
  params, rank = {}, None
  for name, (kernel, (_, inputs)) in zip(names, _adapter_entries(config, kernels).items()):
    shape = shapes[kernel][0]
    a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]  # [r, in], [out, r]
    rank = a.shape[0]
    module = kernel.removesuffix("/kernel")
    _set(params, f"{module}/lora_a", a.T.reshape(*shape[:inputs], rank))
    _set(params, f"{module}/lora_b", b.T.reshape(rank, *shape[inputs:]))
  targets = "^(" + "|".join(re.escape(k) for k in kernels) + ")$"
  return {"targets": targets, "rank": rank, "alpha": settings["lora_alpha"]}, params


def _flat_paths(params) -> list[str]:
  return [jax.tree_util.keystr(k, simple=True, separator="/")
          for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

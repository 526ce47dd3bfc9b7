"""IDEFICS (transformers' IdeficsForVisionText2Text, the open Flamingo) <-> mmjax deep fusion.

The checkpoint is a deep fusion model with a CLIP vision tower read at its
last block with the cls token (no final norm), an optional Perceiver
resampler in the ViT width (one norm on the latents for queries and keys, a
ReLU MLP, heads of their own size), no adapter (the cross blocks project keys
and values from the ViT width), a gated cross-attention layer before every
`cross_layer_interval`-th Llama layer (0, k, 2k, ...), each text position
attending to the latest image before it, and a vocabulary whose last
`additional_vocab_size` rows (`<fake_token_around_image>`, `<image>`) are
tensors of their own in the embedding and the head.
"""
from mmjax.interop.tables import (Entry, attention, dense, linear, norm, require, reshaped,
                                  rope_config, rope_fields, same, split_rows)
from mmjax.models import lm
from mmjax.models import vit

WHAT = "IDEFICS"
RESAMPLER = dict(mlp_activation="relu", query_norm=False)  # IDEFICS' Perceiver, beyond its sizes


def image_token_id(cfg: dict) -> int:
  """`<image>`: config.json does not say; IDEFICS' tokenizer adds it after
  `<fake_token_around_image>`, as the last of the additional rows."""
  if "image_token_id" in cfg:
    return cfg["image_token_id"]
  if cfg.get("additional_vocab_size", 0) < 2:
    raise ValueError(f"{WHAT}: config.json has no 'image_token_id' and no additional vocabulary "
                     "holding <image>; add 'image_token_id' (the tokenizer's id of <image>)")
  return cfg["vocab_size"] + cfg["additional_vocab_size"] - 1


def mmjax_config(cfg: dict) -> dict:
  """An "idefics" config.json -> {"family": "deep_fusion", "model": fields}."""
  vision = cfg["vision_config"]
  perceiver = cfg.get("perceiver_config") or {}
  require(vision, "hidden_act", ("gelu",), f"{WHAT}'s vision tower")
  require(cfg, "hidden_act", ("silu",), f"{WHAT}'s LM")
  gate = {"float": "scalar", "vector": "channel"}[require(cfg, "alpha_type", ("float", "vector"),
                                                          WHAT)]
  if perceiver.get("qk_layer_norms_perceiver"):
    raise ValueError(f"{WHAT}: config.json field 'perceiver_config.qk_layer_norms_perceiver'="
                     "True is not supported (mmjax handles [False])")
  if vision.get("num_channels", 3) != 3:
    raise ValueError(f"{WHAT}: config.json field 'vision_config.num_channels'="
                     f"{vision['num_channels']} is not supported (mmjax handles [3])")
  depth, interval = cfg["num_hidden_layers"], cfg.get("cross_layer_interval", 1)
  if depth % interval:
    raise ValueError(f"{WHAT}: config.json field 'cross_layer_interval'={interval} does not "
                     f"divide num_hidden_layers={depth}")
  tower = dict(width=vision["embed_dim"], depth=vision["num_hidden_layers"],
               mlp_dim=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
               patch_size=vision["patch_size"], image_size=vision["image_size"], pool="cls",
               pre_norm=True, patch_bias=False, norm_eps=vision.get("layer_norm_eps", 1e-5),
               mlp_activation="gelu", posemb_resize="bicubic")
  heads, extra = cfg["num_attention_heads"], cfg.get("additional_vocab_size", 0)
  language = dict(flavour="llama", width=cfg["hidden_size"], depth=depth, num_heads=heads,
                  num_kv_heads=heads, head_dim=cfg["hidden_size"] // heads,
                  mlp_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"] + extra,
                  max_len=cfg.get("max_position_embeddings", 2048), **rope_fields(cfg, WHAT),
                  norm_eps=cfg.get("rms_norm_eps", 1e-6),
                  tie_embeddings=cfg.get("tie_word_embeddings", False))
  fields = dict(vit=tower, lm=language, image_token_id=image_token_id(cfg),
                cross_layers=tuple(range(0, depth, interval)), adapter_layers=0,
                vision_layer=-1, drop_cls=False, media_attention="latest",
                media_free_rows="mlp_only", gate=gate, qk_norm=bool(cfg.get("qk_layer_norms")),
                additional_vocab=extra)
  if cfg.get("use_resampler"):
    fields.update(resampler_latents=perceiver.get("resampler_n_latents", 64),
                  resampler_depth=perceiver.get("resampler_depth", 6),
                  resampler_options=dict(num_heads=perceiver.get("resampler_n_heads", 16),
                                         head_dim=perceiver.get("resampler_head_dim", 96),
                                         **RESAMPLER))
  return {"family": "deep_fusion", "model": fields}


def is_idefics(fields: dict) -> bool:
  """Whether deep fusion fields describe an IDEFICS layout (and so can be exported)."""
  return fields.get("vision_tower", "vit") == "vit" and fields.get("adapter_layers", 2) == 0


def hf_config(fields: dict) -> dict:
  """Deep fusion fields -> an "idefics" config.json; what IDEFICS cannot hold is an error
  naming the field."""
  expected = dict(vision_layer=-1, drop_cls=False, media_attention="latest",
                  media_free_rows="mlp_only", cross_kv_heads=None)
  for key, value in expected.items():
    if fields.get(key) != value:
      raise ValueError(f"{WHAT} export needs model.{key}={value!r}, got {fields.get(key)!r}")
  v, m = vit.Model(**fields["vit"]), lm.Model(**fields["lm"])
  if (v.pool, v.pre_norm, v.patch_bias, v.mlp_activation, v.posemb) != (
      "cls", True, False, "gelu", "learn"):
    raise ValueError(f"{WHAT} export needs a CLIP tower with GELU (model.vit: pool='cls', "
                     "pre_norm=True, patch_bias=False, mlp_activation='gelu')")
  if (m.positions, m.norm, m.mlp_activation, m.use_bias, m.extra_tokens) != (
      "rope", "rmsnorm", "swiglu", False, 0) or (m.num_kv_heads or m.num_heads) != m.num_heads:
    raise ValueError(f"{WHAT} export needs a Llama LM without grouped-query attention")
  if (m.head_dim or m.width // m.num_heads) * m.num_heads != m.width:
    raise ValueError(f"{WHAT} export needs model.lm.head_dim * num_heads = width")
  cross = tuple(fields["cross_layers"])
  interval = cross[1] - cross[0] if len(cross) > 1 else m.depth
  if cross != tuple(range(0, m.depth, interval)) or m.depth % interval:
    raise ValueError(f"{WHAT} export needs model.cross_layers=(0, k, 2k, ...) with k dividing "
                     f"the LM's {m.depth} blocks, got {cross}")
  options = {**RESAMPLER, **(fields.get("resampler_options") or {})}
  latents = fields.get("resampler_latents")
  if latents and ({k: options[k] for k in RESAMPLER} != RESAMPLER or "mlp_dim" in options):
    raise ValueError(f"{WHAT} export needs model.resampler_options with "
                     f"{RESAMPLER} and no mlp_dim")
  extra = fields.get("additional_vocab", 0)
  perceiver = dict(use_resampler=bool(latents), resampler_n_latents=latents or 64,
                   resampler_depth=fields.get("resampler_depth", 2) if latents else 6,
                   resampler_n_heads=options.get("num_heads", m.num_heads),
                   resampler_head_dim=options.get("head_dim") or (
                       v.width // options.get("num_heads", m.num_heads)),
                   qk_layer_norms_perceiver=False)
  config = dict(
      model_type="idefics", architectures=["IdeficsForVisionText2Text"],
      vocab_size=m.vocab_size - extra, additional_vocab_size=extra, hidden_size=m.width,
      intermediate_size=m.mlp_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
      hidden_act="silu", rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_len,
      rope_parameters=rope_config(m), tie_word_embeddings=m.tie_embeddings,
      cross_layer_interval=interval, qk_layer_norms=bool(fields.get("qk_norm")),
      alpha_type="vector" if fields.get("gate") == "channel" else "float",
      use_resampler=bool(latents), perceiver_config=perceiver,
      vision_config=dict(embed_dim=v.width, num_hidden_layers=v.depth,
                         intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads,
                         patch_size=v.patch_size, image_size=v.image_size, num_channels=3,
                         hidden_act="gelu", layer_norm_eps=v.norm_eps),
      # The LM's own layers stay trainable when transformers loads it (its default freezes them).
      freeze_text_layers=False, freeze_vision_layers=False)
  if extra < 2 or fields["image_token_id"] != m.vocab_size - 1:  # not where image_token_id finds it
    config["image_token_id"] = fields["image_token_id"]
  return config


def gate(hf: str, path: str, width: int, kind: str) -> Entry:
  """alpha_cross_attn / alpha_dense: torch [1] (float) or [1, 1, D] (vector)."""
  if kind == "scalar":
    return reshaped(hf, path, (), (1,))
  return reshaped(hf, path, (width,), (1, 1, width))


def resampler_table(fields: dict, width: int, hf: str, mm: str) -> list[Entry]:
  options = fields.get("resampler_options") or {}
  N = options.get("num_heads", fields["lm"]["num_heads"])
  H = options.get("head_dim") or width // N
  e = [same(f"{hf}latents", f"{mm}latents"), *norm(f"{hf}layer_norm", f"{mm}final_norm")]
  for i in range(fields.get("resampler_depth", 2)):
    b = f"{hf}blocks.{i}"
    e += [*norm(f"{b}.0.context_layer_norm", f"{mm}context_norm_{i}"),
          *norm(f"{b}.0.latents_layer_norm", f"{mm}latent_norm_{i}"),
          *attention(f"{b}.0", f"{mm}attn_{i}", ("q_proj", "k_proj", "v_proj", "output_proj"),
                     N, N, H, bias=False),
          *norm(f"{b}.1.ln", f"{mm}mlp_norm_{i}"),
          *dense(f"{b}.1.fc", f"{mm}mlp_{i}/up", bias=False),
          *dense(f"{b}.1.c_proj", f"{mm}mlp_{i}/down", bias=False)]
  return e


def table(fields: dict) -> list[Entry]:
  """Every tensor of an IDEFICS checkpoint as transformers' save_pretrained writes it, but
  its CLIP tower's ("model.vision_model.": hf.vit_table's CLIP rows)."""
  text, tower = fields["lm"], fields["vit"]
  D, N, V = text["width"], text["num_heads"], text["vocab_size"] - fields.get("additional_vocab", 0)
  H, kind = D // N, fields.get("gate", "scalar")
  split = fields.get("additional_vocab", 0) > 0
  e = norm("model.norm", "lm/final_norm", bias=False)
  if split:
    e.append(split_rows(("model.embed_tokens.weight",
                         "model.embed_tokens.additional_embedding.weight"),
                        "lm/embedder/embedding", V))
  else:
    e.append(same("model.embed_tokens.weight", "lm/embedder/embedding"))
  if not text.get("tie_embeddings", False):
    e.append(split_rows(("lm_head.weight", "lm_head.additional_fc.weight"), "lm/head/kernel", V,
                        transpose=True) if split else linear("lm_head.weight", "lm/head/kernel"))
  if fields.get("resampler_latents"):
    e += resampler_table(fields, tower["width"], "model.perceiver_resampler.", "resampler/")
  mlp = lambda b, p: [x for n in ("gate", "up", "down")
                      for x in dense(f"{b}.mlp.{n}_proj", f"{p}/mlp/{n}", bias=False)]
  for k, block in enumerate(fields["cross_layers"]):
    b, p = f"model.gated_cross_attn_layers.{k}", f"xattn_{block}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
          *attention(f"{b}.cross_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, N, H, bias=False),
          gate(f"{b}.alpha_cross_attn", f"{p}/attn_gate", D, kind),
          *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False),
          *mlp(b, p),
          gate(f"{b}.alpha_dense", f"{p}/mlp_gate", D, kind)]
    if fields.get("qk_norm"):
      e += [same(f"{b}.cross_attn.q_layer_norm.weight", f"{p}/attn/query_norm/scale"),
            same(f"{b}.cross_attn.k_layer_norm.weight", f"{p}/attn/key_norm/scale")]
  for i in range(text["depth"]):
    b, p = f"model.layers.{i}", f"lm/block_{i}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, N, H, bias=False),
          *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False),
          *mlp(b, p)]
  return e

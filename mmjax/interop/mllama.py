"""Llama 3.2 Vision (transformers' MllamaForConditionalGeneration) <-> mmjax deep fusion.

The checkpoint is a deep fusion model with a tiled vision tower
(`models.tiled_vit`), a one-layer adapter (the multi-modal projector) and
a Llama whose layer list holds both kinds of layer: the cross-attention layers
at `cross_attention_layers` replace self-attention layers. mmjax keeps the
self-attention layers as its LM's blocks and puts each cross-attention layer
before the block that follows it, so HF layer c becomes xattn_<c - k>, k being
the number of cross layers before c.
"""
from mmjax.interop.tables import (Entry, attention, conv, dense, linear, norm, require,
                                  reshaped, rope_config, rope_fields, same)
from mmjax.models import lm
from mmjax.models import tiled_vit

EXTRA_TOKENS = 8  # transformers embeds vocab_size + 8 tokens (<|image|> among them)
WHAT = "Llama 3.2 Vision"


def mmjax_config(cfg: dict) -> dict:
  """An "mllama" config.json -> {"family": "deep_fusion", "model": fields}."""
  vision, text = cfg["vision_config"], cfg["text_config"]
  require(vision, "hidden_act", ("gelu",), f"{WHAT}'s vision tower")
  require(text, "hidden_act", ("silu",), f"{WHAT}'s LM")
  tiles = vision.get("max_num_tiles", 4)
  arrangements = [tuple(a) for a in vision.get("supported_aspect_ratios")
                  or tiled_vit.aspect_ratios(tiles)]
  if arrangements != tiled_vit.aspect_ratios(tiles):
    raise ValueError(f"{WHAT}: config.json field 'vision_config.supported_aspect_ratios'="
                     f"{arrangements} is not supported (mmjax handles the processor's own "
                     f"list for max_num_tiles={tiles}: {tiled_vit.aspect_ratios(tiles)})")
  layers = tuple(vision.get("intermediate_layers_indices") or (3, 7, 15, 23, 30))
  width = vision["hidden_size"]
  if vision.get("vision_output_dim", width * (1 + len(layers))) != width * (1 + len(layers)):
    raise ValueError(f"{WHAT}: config.json field 'vision_config.vision_output_dim'="
                     f"{vision['vision_output_dim']} is not hidden_size * (1 + "
                     f"len(intermediate_layers_indices)) = {width * (1 + len(layers))}")
  if vision.get("num_channels", 3) != 3:
    raise ValueError(f"{WHAT}: config.json field 'vision_config.num_channels'="
                     f"{vision['num_channels']} is not supported (mmjax handles [3])")
  vit = dict(width=width, depth=vision["num_hidden_layers"],
             global_depth=vision["num_global_layers"], mlp_dim=vision["intermediate_size"],
             num_heads=vision["attention_heads"], patch_size=vision["patch_size"],
             image_size=vision["image_size"], max_tiles=tiles, feature_layers=layers,
             norm_eps=vision.get("norm_eps", 1e-5))

  cross = sorted(text["cross_attention_layers"])
  depth = text["num_hidden_layers"] - len(cross)
  before = [c - k for k, c in enumerate(cross)]  # the mmjax block each cross layer precedes
  if len(set(before)) < len(before) or (before and before[-1] >= depth):
    raise ValueError(f"{WHAT}: config.json field 'text_config.cross_attention_layers'={cross} "
                     "is not supported: mmjax needs a self-attention layer after each "
                     "cross-attention layer")
  heads = text["num_attention_heads"]
  language = dict(flavour="llama", width=text["hidden_size"], depth=depth, num_heads=heads,
                  num_kv_heads=text.get("num_key_value_heads") or heads,
                  head_dim=text["hidden_size"] // heads, mlp_dim=text["intermediate_size"],
                  vocab_size=text["vocab_size"], extra_tokens=EXTRA_TOKENS,
                  max_len=text.get("max_position_embeddings", 131072),
                  **rope_fields(text, WHAT), norm_eps=text.get("rms_norm_eps", 1e-5),
                  tie_embeddings=text.get("tie_word_embeddings", False))
  fields = dict(vit=vit, lm=language, vision_tower="tiled",
                image_token_id=cfg.get("image_token_index", 128256), cross_layers=tuple(before),
                adapter_layers=1, media_attention="latest_run", media_free_rows="all_keys",
                gate="scalar", qk_norm=True)
  return {"family": "deep_fusion", "model": fields}


def is_mllama(fields: dict) -> bool:
  """Whether deep fusion fields describe a Llama 3.2 Vision layout (and so can be exported)."""
  return fields.get("vision_tower") == "tiled"


def hf_config(fields: dict) -> dict:
  """Deep fusion fields -> an "mllama" config.json; what Llama 3.2 Vision cannot hold is an
  error naming the field."""
  expected = dict(adapter_layers=1, media_attention="latest_run", media_free_rows="all_keys",
                  gate="scalar", qk_norm=True, resampler_latents=None, cross_kv_heads=None)
  for key, value in expected.items():
    if fields.get(key, value) != value:
      raise ValueError(f"{WHAT} export needs model.{key}={value!r}, got {fields[key]!r}")
  v = tiled_vit.Model(**fields["vit"])
  m = lm.Model(**fields["lm"])
  if (m.positions, m.norm, m.mlp_activation, m.use_bias) != ("rope", "rmsnorm", "swiglu", False):
    raise ValueError(f"{WHAT} export needs a Llama LM (RoPE, RMSNorm, SwiGLU, no biases)")
  head_dim = m.head_dim or m.width // m.num_heads
  if m.extra_tokens != EXTRA_TOKENS or head_dim * m.num_heads != m.width:
    raise ValueError(f"{WHAT} export needs model.lm.extra_tokens={EXTRA_TOKENS} and "
                     "head_dim * num_heads = width")
  before = sorted(fields["cross_layers"])
  if not before or len(set(before)) < len(before):
    raise ValueError(f"{WHAT} export needs model.cross_layers: distinct LM blocks")
  cross = [b + k for k, b in enumerate(before)]
  vision = dict(model_type="mllama_vision_model", hidden_size=v.width,
                num_hidden_layers=v.depth, num_global_layers=v.global_depth,
                attention_heads=v.num_heads, intermediate_size=v.mlp_dim,
                vision_output_dim=v.features_dim, image_size=v.image_size,
                patch_size=v.patch_size, max_num_tiles=v.max_tiles,
                intermediate_layers_indices=list(v.feature_layers), norm_eps=v.norm_eps,
                supported_aspect_ratios=[list(a) for a in tiled_vit.aspect_ratios(v.max_tiles)],
                hidden_act="gelu", num_channels=3)
  text = dict(model_type="mllama_text_model", hidden_size=m.width,
              num_hidden_layers=m.depth + len(cross), num_attention_heads=m.num_heads,
              num_key_value_heads=m.num_kv_heads or m.num_heads, intermediate_size=m.mlp_dim,
              vocab_size=m.vocab_size, max_position_embeddings=m.max_len,
              rms_norm_eps=m.norm_eps, rope_parameters=rope_config(m), hidden_act="silu",
              cross_attention_layers=cross, tie_word_embeddings=m.tie_embeddings,
              # mmjax keeps no special ids (hf.save writes the tokenizer's bos and eos); the
              # pad id only marks an embedding row torch never updates.
              pad_token_id=None)
  return dict(model_type="mllama", architectures=["MllamaForConditionalGeneration"],
              vision_config=vision, text_config=text, image_token_index=fields["image_token_id"])


def gate(hf: str, path: str) -> Entry:  # torch [1] <-> a scalar
  return reshaped(hf, path, (), (1,))


def vision_table(fields: dict, hf: str = "vision_model.", mm: str = "vit/") -> list[Entry]:
  D, N = fields["width"], fields["num_heads"]
  e = [conv(f"{hf}patch_embedding.weight", f"{mm}embedding/kernel"),
       same(f"{hf}class_embedding", f"{mm}cls"),
       same(f"{hf}gated_positional_embedding.embedding", f"{mm}pos_embedding"),
       same(f"{hf}gated_positional_embedding.gate", f"{mm}pos_gate"),
       same(f"{hf}gated_positional_embedding.tile_embedding.weight", f"{mm}tile_pos_embedding"),
       *norm(f"{hf}layernorm_pre", f"{mm}pre_norm"),
       *norm(f"{hf}layernorm_post", f"{mm}post_norm")]
  for kind in ("pre", "post"):
    e += [same(f"{hf}{kind}_tile_positional_embedding.embedding.weight",
               f"{mm}{kind}_tile_embedding"),
          same(f"{hf}{kind}_tile_positional_embedding.gate", f"{mm}{kind}_tile_gate")]
  blocks = [(f"transformer.layers.{i}", f"block_{i}") for i in range(fields["depth"])]
  blocks += [(f"global_transformer.layers.{i}", f"global_block_{i}")
             for i in range(fields["global_depth"])]
  for b, p in blocks:
    b, p = f"{hf}{b}", f"{mm}{p}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm"),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, N, D // N, bias=False),
          *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm"),
          *dense(f"{b}.mlp.fc1", f"{p}/mlp/up"),
          *dense(f"{b}.mlp.fc2", f"{p}/mlp/down")]
    if p.startswith(f"{mm}global_"):
      e += [same(f"{b}.gate_attn", f"{p}/attn_gate"), same(f"{b}.gate_ffn", f"{p}/mlp_gate")]
  return e


def language_table(fields: dict, cross_layers: tuple[int, ...], hf: str = "language_model.",
                   mm: str = "lm/") -> list[Entry]:
  """The LM's self-attention blocks and the cross blocks between them, in HF's layer order."""
  N, K = fields["num_heads"], fields.get("num_kv_heads") or fields["num_heads"]
  H = fields["width"] // N
  e = [same(f"{hf}model.embed_tokens.weight", f"{mm}embedder/embedding"),
       *norm(f"{hf}model.norm", f"{mm}final_norm", bias=False)]
  if not fields.get("tie_embeddings", False):
    e.append(linear(f"{hf}lm_head.weight", f"{mm}head/kernel"))
  mlp = lambda b, p: [e for n in ("gate", "up", "down")
                      for e in dense(f"{b}.mlp.{n}_proj", f"{p}/mlp/{n}", bias=False)]
  layer = 0
  for block in range(fields["depth"]):
    if block in cross_layers:
      b, p = f"{hf}model.layers.{layer}", f"xattn_{block}"
      e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
            *attention(f"{b}.cross_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                       N, K, H, bias=False),
            same(f"{b}.cross_attn.q_norm.weight", f"{p}/attn/query_norm/scale"),
            same(f"{b}.cross_attn.k_norm.weight", f"{p}/attn/key_norm/scale"),
            gate(f"{b}.cross_attn_attn_gate", f"{p}/attn_gate"),
            *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False),
            *mlp(b, p),
            gate(f"{b}.cross_attn_mlp_gate", f"{p}/mlp_gate")]
      layer += 1
    b, p = f"{hf}model.layers.{layer}", f"{mm}block_{block}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, K, H, bias=False),
          *norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False),
          *mlp(b, p)]
    layer += 1
  return e


def table(fields: dict) -> list[Entry]:
  """Every tensor of a Llama 3.2 Vision checkpoint as transformers' save_pretrained writes it."""
  return [*vision_table(fields["vit"]),
          *dense("multi_modal_projector", "adapter/dense_0"),
          *language_table(fields["lm"], tuple(fields["cross_layers"]))]

"""Gemma and Gemma 2 (transformers' GemmaForCausalLM, Gemma2ForCausalLM) <-> mmjax's LM.

Gemma is Llama's block with a GeGLU MLP, norms that scale by (1 + weight),
heads of their own size and embeddings scaled by sqrt(width), tied to the
output. Gemma 2 norms each branch before and after (`lm.SandwichBlock`:
its `post_attention_layernorm` is the attention branch's output norm, where
Gemma's and Llama's is the MLP's input norm), soft-caps the attention scores
and the logits, scales scores by `query_pre_attn_scalar` and alternates local
(sliding-window) and global layers (`layer_types`).
"""
from mmjax.interop.tables import (Entry, attention, dense, norm, require, rope_config,
                                  rope_fields, same)
from mmjax.models import lm

TYPES = ("gemma", "gemma2")
LAYER_TYPES = ("sliding_attention", "full_attention")


def global_every(cfg: dict, what: str) -> int:
  """config.json's layer_types -> lm.Model's global_every (layer i global when
  (i + 1) % global_every == 0), or an error naming the field if no such period fits."""
  types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(cfg["num_hidden_layers"])]
  if any(t not in LAYER_TYPES for t in types):
    raise ValueError(f"{what}: config.json field 'layer_types' holds "
                     f"{sorted(set(types) - set(LAYER_TYPES))}; mmjax handles {list(LAYER_TYPES)}")
  for every in range(len(types) + 1):
    if [t == "full_attention" for t in types] == [
        bool(every) and (i + 1) % every == 0 for i in range(len(types))]:
      return every
  raise ValueError(f"{what}: config.json field 'layer_types' is not a repeating pattern of local "
                   "layers ending in a global one, which mmjax handles")


def lm_fields(cfg: dict) -> dict:
  """A "gemma" or "gemma2" config.json -> lm.Model fields."""
  kind = require(cfg, "model_type", TYPES, "language model")
  what = "Gemma" if kind == "gemma" else "Gemma 2"
  if cfg.get("attention_bias"):
    raise ValueError(f"{what}: config.json field 'attention_bias'=True is not supported")
  if kind == "gemma":  # "gelu" is the first releases' name for the same tanh GELU (transformers)
    require(cfg, "hidden_act", ("gelu_pytorch_tanh", "gelu"), what)
  else:
    require(cfg, "hidden_activation", ("gelu_pytorch_tanh",), what)
  heads = cfg["num_attention_heads"]
  fields = dict(flavour=kind, width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                mlp_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                max_len=cfg.get("max_position_embeddings", 8192), **rope_fields(cfg, what),
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_embeddings=cfg.get("tie_word_embeddings", True))
  if kind == "gemma2":
    every = global_every(cfg, what)
    fields.update(query_scalar=cfg.get("query_pre_attn_scalar", 256),
                  attn_soft_cap=cfg.get("attn_logit_softcapping"),
                  final_soft_cap=cfg.get("final_logit_softcapping"),
                  sliding_window=cfg.get("sliding_window") if every != 1 else None,
                  global_every=every)
  return fields


def table(fields: dict, hf: str = "model.", mm: str = "", head: str = "lm_head") -> list[Entry]:
  """Every tensor of a Gemma or Gemma 2 LM under `hf` (a PaliGemma's "language_model.model.")."""
  N, K, H = fields["num_heads"], fields["num_kv_heads"], fields["head_dim"]
  sandwich = fields["flavour"] == "gemma2"
  e = [same(f"{hf}embed_tokens.weight", f"{mm}embedder/embedding"),
       *norm(f"{hf}norm", f"{mm}final_norm", bias=False)]
  for i in range(fields["depth"]):
    p, b = f"{mm}block_{i}", f"{hf}layers.{i}"
    e += [*norm(f"{b}.input_layernorm", f"{p}/attn_norm", bias=False),
          *attention(f"{b}.self_attn", f"{p}/attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     N, K, H, bias=False),
          *dense(f"{b}.mlp.gate_proj", f"{p}/mlp/gate", bias=False),
          *dense(f"{b}.mlp.up_proj", f"{p}/mlp/up", bias=False),
          *dense(f"{b}.mlp.down_proj", f"{p}/mlp/down", bias=False)]
    if sandwich:
      e += [*norm(f"{b}.post_attention_layernorm", f"{p}/post_attn_norm", bias=False),
            *norm(f"{b}.pre_feedforward_layernorm", f"{p}/mlp_norm", bias=False),
            *norm(f"{b}.post_feedforward_layernorm", f"{p}/post_mlp_norm", bias=False)]
    else:
      e += norm(f"{b}.post_attention_layernorm", f"{p}/mlp_norm", bias=False)
  if not fields["tie_embeddings"]:
    e += dense(head, f"{mm}head", bias=False)
  return e


def hf_config(fields: dict) -> dict:
  """lm.Model fields of a Gemma or Gemma 2 -> its config.json."""
  m = lm.Model(**fields)
  gemma = dict(positions="rope", norm="gemma_rmsnorm", mlp_activation="geglu", use_bias=False,
               scale_embeddings=True)
  if any(getattr(m, k) != v for k, v in gemma.items()) or m.flavour not in TYPES:
    raise ValueError(f"Gemma export needs the Gemma fields {gemma}")
  config = dict(model_type=m.flavour, hidden_size=m.width, num_hidden_layers=m.depth,
                num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
                head_dim=m.head_dim or m.width // m.num_heads, intermediate_size=m.mlp_dim,
                vocab_size=m.vocab_size, max_position_embeddings=m.max_len,
                rms_norm_eps=m.norm_eps, rope_parameters=rope_config(m),
                attention_bias=False,
                tie_word_embeddings=m.tie_embeddings)
  if m.flavour == "gemma":
    if (m.block, m.query_scalar, m.attn_soft_cap, m.final_soft_cap, m.sliding_window) != (
        "pre_norm", None, None, None, None):
      raise ValueError("Gemma export needs the pre-norm block, no soft caps and no window "
                       "(those are Gemma 2's)")
    return dict(architectures=["GemmaForCausalLM"], **config, hidden_act="gelu_pytorch_tanh")
  if m.block != "sandwich":
    raise ValueError("Gemma 2 export needs model.block='sandwich'")
  return dict(architectures=["Gemma2ForCausalLM"], **config, hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=m.query_scalar or config["head_dim"],
              attn_logit_softcapping=m.attn_soft_cap, final_logit_softcapping=m.final_soft_cap,
              sliding_window=m.sliding_window,
              layer_types=["sliding_attention" if m.window(i) else "full_attention"
                           for i in range(m.depth)])

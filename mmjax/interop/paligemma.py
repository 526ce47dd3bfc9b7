"""PaliGemma 1 and 2 (transformers' PaliGemmaForConditionalGeneration) <-> mmjax early fusion.

A SigLIP tower read at its final norm (no pooling head), one linear projector
with a bias into the LM width, and a Gemma (PaliGemma 1) or Gemma 2
(PaliGemma 2) LM whose embedding scale applies to text tokens only (image
tokens enter unscaled, as in transformers 5 and big_vision). The prompt is
image tokens, BOS, the task prefix and "\n", read bidirectionally (a
prefix-LM: early fusion's `prefix_len`), then the suffix, causal.
"""
from mmjax.interop import gemma
from mmjax.interop.tables import Entry, dense, require
from mmjax.models import lm

WHAT = "PaliGemma"


def mmjax_config(cfg: dict, vision: dict) -> dict:
  """A "paligemma" config.json and its vision tower's vit.Model fields ->
  {"family": "early_fusion", "model": fields}."""
  require(cfg["vision_config"], "model_type", ("siglip_vision_model",), f"{WHAT}'s vision tower")
  text = cfg["text_config"]
  projection = cfg.get("projection_dim", text["hidden_size"])
  if projection != text["hidden_size"]:
    raise ValueError(f"{WHAT}: config.json field 'projection_dim'={projection} differs from the "
                     f"LM's hidden_size={text['hidden_size']}")
  fields = dict(vit=vision, lm=gemma.lm_fields(text),
                image_token_id=cfg.get("image_token_index", cfg.get("image_token_id")),
                projector="linear", vision_layer=None)
  return {"family": "early_fusion", "model": fields}


def is_paligemma(fields: dict) -> bool:
  """Whether early fusion fields describe a PaliGemma (a Gemma LM)."""
  return lm.Model(**fields["lm"]).flavour in gemma.TYPES


def table(fields: dict) -> list[Entry]:
  """The projector's and the LM's tensors (the tower's are hf.vit_table's, under
  "vision_tower.")."""
  return [*dense("multi_modal_projector.linear", "projector/dense_0"),
          *gemma.table(fields["lm"], "language_model.model.", "lm/", "language_model.lm_head")]


def hf_config(fields: dict, vision: dict) -> dict:
  """Early fusion fields of a PaliGemma and its tower's config.json -> its config.json."""
  if fields.get("projector") != "linear" or fields.get("vision_layer") is not None:
    raise ValueError(f"{WHAT} export needs model.projector='linear' and model.vision_layer=None "
                     "(the tower's final norm)")
  if vision["model_type"] != "siglip_vision_model":
    raise ValueError(f"{WHAT} export needs a SigLIP tower (pool 'map' or 'gap', patch bias)")
  text = gemma.hf_config(fields["lm"])
  text.pop("architectures")
  vision.pop("architectures", None)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              vision_config=vision, text_config=text, image_token_index=fields["image_token_id"],
              projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
              vocab_size=text["vocab_size"], tie_word_embeddings=text["tie_word_embeddings"])

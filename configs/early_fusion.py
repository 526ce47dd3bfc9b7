"""Early fusion (LLaVA-style) configs: `configs/early_fusion.py:BACKBONE[,STAGE]`.

Stages freeze as LLaVA does: "stage1" trains the projector only, "stage2" the
projector and the LM; "all" trains everything. `pretrained` builds the model
from two pretrained towers (mmjax/towers.py), reads the ViT's second-to-last
block as LLaVA does, and defaults to "stage1":

  python train.py --config configs/early_fusion.py:pretrained,stage2 --workdir DIR \\
      --config.towers.vision=CLIP_DIR --config.towers.language=LLAMA_DIR

"tiny-anyres" is "tiny" as LLaVA-NeXT reads images (AnyRes): scenes of varied
sizes and aspect ratios (16 to 64 px a side), each cut into the 32 px base tile
and the tiles of a 1x2, 2x1, 2x2, 1x3 or 3x1 grid chosen by its aspect ratio;
an image takes 16 to 88 tokens by its size (mmjax/data/anyres.py).

"paligemma2-3b-224", "paligemma2-3b-448" and "paligemma2-10b-224" are PaliGemma
2's shapes (SigLIP So400m/14 + Gemma 2 2B or 9B) as tools/import_hf.py lays
out their checkpoints, for dry runs: ",all" fine-tunes everything, ",lora" (the
Colab recipe) trains LoRA adapters on the LM's projections only. Both read a
prefix (image, BOS, prompt) both ways and put the loss on the suffix.
"""
import ml_collections

from configs import common
from mmjax.interop import hf

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}
EXTRAS = ("tiny-anyres",)  # variants of the tiny backbone
SUFFIX = common.stages_suffix(STAGES)
# PaliGemma 2's config.json, as far as the model's shape goes: SigLIP So400m/14, Gemma 2.
SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=27,
              num_attention_heads=16, intermediate_size=4304, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
GEMMA2 = dict(model_type="gemma2", vocab_size=257216, num_key_value_heads=None, head_dim=256,
              hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
              rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
GEMMA2_2B = dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=9216)
GEMMA2_9B = dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=14336)
PALIGEMMA2 = {  # variant -> (image size, Gemma 2's size)
    "paligemma2-3b-224": (224, GEMMA2_2B),
    "paligemma2-3b-448": (448, GEMMA2_2B),
    "paligemma2-10b-224": (224, GEMMA2_9B),
}
PALIGEMMA_STAGES = ("all", "lora")
PALIGEMMA_TEXT = 64  # text tokens after the image's: a prompt and an answer


def variants() -> list[str]:
  return [*common.BACKBONES, *EXTRAS, *PALIGEMMA2]


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg.partition(",")[0] in PALIGEMMA2:
    return paligemma2(*arg.partition(",")[::2])
  anyres = arg.startswith("tiny-anyres")
  config = common.fusion_config(arg, family="early_fusion", stages=STAGES,
                                pretrained_stage="stage1", extras=EXTRAS)
  config.model.update(dict(
      projector="mlp2x_gelu",  # or "linear"
      vision_layer=ml_collections.config_dict.placeholder(int),  # None: final tokens; -2: LLaVA
      drop_cls=True,
  ))
  if arg.startswith("pretrained"):
    config.model.vision_layer = -2
  if anyres:
    tile = config.model.vit.image_size
    config.model.grid_pinpoints = tuple((rows * tile, columns * tile) for rows, columns in
                                        ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1)))  # LLaVA-NeXT's
    config.data.update(dict(name="shapes", scene_sizes="varied"))
    config.model.lm.max_len = 160  # up to 88 image tokens, a question and its answer
  return config


def paligemma2(variant: str, stage: str) -> ml_collections.ConfigDict:
  """PaliGemma 2 as tools/import_hf.py lays out its checkpoint, bfloat16, full remat."""
  stage = stage or "all"
  if stage not in PALIGEMMA_STAGES:
    raise ValueError(f"configs/early_fusion.py:{variant} takes a stage in {PALIGEMMA_STAGES}, "
                     f"got {stage!r}")
  size, shape = PALIGEMMA2[variant]
  text = dict(GEMMA2, **shape)
  fields = hf.mmjax_config(dict(
      model_type="paligemma", image_token_index=257152, projection_dim=text["hidden_size"],
      vision_config=dict(SO400M, image_size=size), text_config=text))["model"]
  config = common.fusion_config("pretrained,all", family="early_fusion", stages=STAGES,
                                pretrained_stage="all")
  run = dict(attention_impl="auto", remat_policy="full")
  fields["vit"].update(run)
  fields["lm"].update(run)
  config.model = ml_collections.ConfigDict(dict(fields, dtype="bfloat16"))
  config.data.seq_len = (size // 14) ** 2 + PALIGEMMA_TEXT
  config.data.image_size = size
  config.data.prefix_lm = True
  config.batch_size = 8
  config.optimizer.learning_rate = 1e-5  # big_vision's PaliGemma fine-tunes: 1e-5 to 3e-5
  if stage == "lora":  # every parameter frozen but the adapters (which always train)
    common.with_lora(config, "lm/")
    config.optimizer.frozen = "."
  return config

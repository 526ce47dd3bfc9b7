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
"""
import ml_collections

from configs import common

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}
EXTRAS = ("tiny-anyres",)  # variants of the tiny backbone
SUFFIX = common.stages_suffix(STAGES)


def variants() -> list[str]:
  return [*common.BACKBONES, *EXTRAS]


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
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

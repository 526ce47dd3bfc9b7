"""Early fusion (LLaVA-style) configs: `configs/early_fusion.py:BACKBONE[,STAGE]`.

Stages freeze as LLaVA does: "stage1" trains the projector only, "stage2" the
projector and the LM; "all" trains everything. `pretrained` builds the model
from two pretrained towers (mmjax/towers.py), reads the ViT's second-to-last
block as LLaVA does, and defaults to "stage1":

  python train.py --config configs/early_fusion.py:pretrained,stage2 --workdir DIR \\
      --config.towers.vision=CLIP_DIR --config.towers.language=LLAMA_DIR
"""
import ml_collections

from configs import common

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = common.fusion_config(arg, family="early_fusion", stages=STAGES,
                                pretrained_stage="stage1")
  config.model.update(dict(
      projector="mlp2x_gelu",  # or "linear"
      vision_layer=ml_collections.config_dict.placeholder(int),  # None: final tokens; -2: LLaVA
      drop_cls=True,
  ))
  if arg.startswith("pretrained"):
    config.model.vision_layer = -2
  return config

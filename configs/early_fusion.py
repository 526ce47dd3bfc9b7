"""Early fusion (LLaVA-style) configs: `configs/early_fusion.py:tiny[,stage]`.

Stages freeze as LLaVA does: "stage1" trains the projector only, "stage2" the
projector and the LM; "all" (the default) trains everything.
"""
import ml_collections

from configs import common

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = common.fusion_config(arg, family="early_fusion", stages=STAGES)
  config.model.update(dict(
      projector="mlp2x_gelu",  # or "linear"
      vision_layer=ml_collections.config_dict.placeholder(int),  # None: final tokens; -2: LLaVA
      drop_cls=True,
  ))
  return config

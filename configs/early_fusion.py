"""Early fusion (LLaVA-style) configs: `configs/early_fusion.py:tiny[,stage]`.

Stages freeze as LLaVA does: "stage1" trains the projector only, "stage2" the
projector and the LM; "all" (the default) trains everything.
"""
import ml_collections

from configs import common
from mmjax.data import tokenizers

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config, pair = common.fusion_config(arg, family="early_fusion", stages=STAGES)
  config.model = ml_collections.ConfigDict(dict(
      vit=pair["vit"], lm=pair["lm"],
      image_token_id=tokenizers.ByteTokenizer.image_id,
      dtype="float32",  # compute dtype of both towers; "bfloat16" on accelerators
      projector="mlp2x_gelu",  # or "linear"
      vision_layer=ml_collections.config_dict.placeholder(int),  # None: final tokens; -2: LLaVA
      drop_cls=True,
  ))
  patch = int(pair["vit"]["variant"].split("/")[1])
  image_tokens = (pair["image_size"] // patch) ** 2  # P placeholders per image
  config.data = ml_collections.ConfigDict(dict(
      name="shapes", image_size=pair["image_size"], image_tokens=image_tokens,
      seq_len=image_tokens + 48))  # BOS + image + the longest caption (29 bytes) fit
  return config

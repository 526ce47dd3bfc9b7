"""Early fusion (LLaVA-style) configs: `configs/early_fusion.py:tiny[,stage]`.

Stages freeze as LLaVA does: "stage1" trains the projector only, "stage2" the
projector and the LM; "all" (the default) trains everything.
"""
import ml_collections

from configs import common
from mmjax.models import early_fusion

STAGES = {"all": "", "stage1": r"^(vit|lm)/", "stage2": r"^vit/"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config, pair = common.fusion_config(arg, family="early_fusion", stages=STAGES)
  config.model.update(dict(
      projector="mlp2x_gelu",  # or "linear"
      vision_layer=ml_collections.config_dict.placeholder(int),  # None: final tokens; -2: LLaVA
      drop_cls=True,
  ))
  image_tokens = early_fusion.num_image_tokens(pair["vit"], pair["image_size"],
                                              config.model.drop_cls)  # P per image
  config.data = ml_collections.ConfigDict(dict(
      # "shapes": generated in memory; "tfds_scenes": the same scenes as a tfds ArrayRecord
      # dataset; "llava": a LLaVA conversation JSON + image folder, converted once by tfds.
      name="shapes",
      data_dir="",  # tfds_scenes, llava: where tfds writes ("" = tfds' default)
      train_size=50_000,  # tfds_scenes: training scenes
      json="", image_dir="",  # llava: the conversations and the folder their images are in
      tokenizer="bytes",  # llava: or a SentencePiece .model / HuggingFace tokenizer.json
      max_images=1,  # llava: image slots per sample
      task="vqa",  # or "caption", "mixed"
      max_shapes=2,  # per image; 1 is easy, 3 makes counting and binding matter
      image_size=pair["image_size"], image_tokens=image_tokens,
      seq_len=ml_collections.config_dict.placeholder(int)))  # None: the task's longest example
  return config

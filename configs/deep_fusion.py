"""Deep fusion (Flamingo-style) configs: `configs/deep_fusion.py:tiny[,stage]`.

"flamingo" freezes both towers and trains the adapter and the cross-attention
blocks only; "all" (the default) trains everything.
"""
import ml_collections

from configs import common

STAGES = {"all": "", "flamingo": r"^(vit|lm)/"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config, pair = common.fusion_config(arg, family="deep_fusion", stages=STAGES)
  config.model.update(dict(
      cross_every=1,  # a cross block before every LM block: the tiny LM has only 2
      adapter_layers=2,
      resampler_latents=ml_collections.config_dict.placeholder(int),  # 64: Flamingo resampler
      media_attention="previous",  # or "latest"
      gate="scalar",  # or "channel"
  ))
  if pair["lm"]["variant"] == "gpt2-124m":
    config.model.cross_every = 4  # 3 cross blocks in GPT-2's 12
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
      image_size=pair["image_size"],
      image_tokens=1,  # one marker per image: resolution never changes the text length
      seq_len=ml_collections.config_dict.placeholder(int)))  # None: the task's longest example
  return config

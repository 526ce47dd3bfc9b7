"""Deep fusion (Flamingo-style) configs: `configs/deep_fusion.py:BACKBONE[,STAGE]`.

"flamingo" freezes both towers and trains the adapter and the cross-attention
blocks only; "all" trains everything. `pretrained` builds the model from two
pretrained towers (mmjax/towers.py) and defaults to "flamingo":

  python train.py --config configs/deep_fusion.py:pretrained --workdir DIR \\
      --config.towers.vision=CLIP_DIR --config.towers.language=LLAMA_DIR

"tiny-native" is "tiny" reading scenes of varied sizes and aspect ratios (16 to
64 px a side) at their own resolution: each row packs whole examples until its
128 patch slots or 256 tokens are full (mmjax/data/patches.py).
"""
import ml_collections

from configs import common

STAGES = {"all": "", "flamingo": r"^(vit|lm)/"}
EXTRAS = ("tiny-native",)  # variants of the tiny backbone
SUFFIX = common.stages_suffix(STAGES)


def variants() -> list[str]:
  return [*common.BACKBONES, *EXTRAS]


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  native = arg.startswith("tiny-native")
  config = common.fusion_config(arg, family="deep_fusion", stages=STAGES,
                                pretrained_stage="flamingo", extras=EXTRAS)
  config.model.update(dict(
      cross_every=1,  # a cross block before every LM block: the tiny LM has only 2
      adapter_layers=2,
      resampler_latents=ml_collections.config_dict.placeholder(int),  # 64: Flamingo resampler
      media_attention="previous",  # or "latest"
      gate="scalar",  # or "channel"
      qk_norm=False,  # RMS-normed cross-attention queries and keys (Llama-3.2-Vision's)
  ))
  if arg.partition(",")[0] in ("tiny", *EXTRAS):
    # The best recipe of tools/showcase.py's ablations (3 seeds each, README): a gate per
    # channel, and the new layers (adapter, cross blocks, gates) learning 3x faster, as
    # Flamingo trains its new layers faster than the frozen LM would allow. Scalar gates at one
    # learning rate: 0.667 +- 0.170 held-out VQA; this: 0.771 +- 0.023 (early fusion 0.741).
    config.model.gate = "channel"
    config.optimizer.lr_multipliers = (("^(xattn|adapter)", 3.0),)
  if config.model.lm.get("variant") == "gpt2-124m":
    config.model.cross_every = 4  # 3 cross blocks in GPT-2's 12
  if arg.startswith("pretrained"):  # from the LM's depth: every 4th block, as Flamingo
    config.model.cross_every = ml_collections.config_dict.placeholder(int)
  if native:
    # About 5 examples a row (96% of the patch slots used): 3 rows see what tiny's 16 do.
    config.data.update(dict(name="shapes", scene_sizes="varied", max_patches=128, pack=8,
                            seq_len=256))
    config.model.lm.max_len = 256
    # Positions as fractions of each image ("top right" is a place in the image, whatever its
    # width): at absolute coordinates position answers fell to chance (0.197; 0.425 overall).
    config.model.vit.posemb_coords = "fractional"
    config.batch_size = 3
  return config

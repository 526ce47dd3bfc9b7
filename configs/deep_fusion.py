"""Deep fusion (Flamingo-style) configs: `configs/deep_fusion.py:BACKBONE[,STAGE]`.

"flamingo" freezes both towers and trains the adapter and the cross-attention
blocks only; "all" trains everything. `pretrained` builds the model from two
pretrained towers (mmjax/towers.py) and defaults to "flamingo":

  python train.py --config configs/deep_fusion.py:pretrained --workdir DIR \\
      --config.towers.vision=CLIP_DIR --config.towers.language=LLAMA_DIR

"tiny-native" is "tiny" reading scenes of varied sizes and aspect ratios (16 to
64 px a side) at their own resolution: each row packs whole examples until its
128 patch slots or 256 tokens are full (mmjax/data/patches.py).

"llama-3.2-11b-vision" is Llama-3.2-11B-Vision's shape (its config.json), for
dry runs and as the layout tools/import_hf.py gives its checkpoint: a tiled
ViT-H/14 (4 tiles of 560 px), 8 cross-attention blocks among 32 Llama blocks.
"llama-3.2-90b-vision" is the 90B's shape with its 80-block LM scanned (20 cross
blocks, one every 4), for dry runs.
"idefics-9b" is IDEFICS-9B's (the open Flamingo): a CLIP ViT-H/14 at 224 px, a
6-layer Perceiver resampler to 64 latents, a cross block before every 4th of
LLaMA-7B's 32 blocks.
"""
import ml_collections

from configs import common
from mmjax.interop import idefics

STAGES = {"all": "", "flamingo": r"^(vit|lm)/"}
EXTRAS = ("tiny-native",)  # variants of the tiny backbone
MLLAMA_11B = "llama-3.2-11b-vision"
MLLAMA_90B = "llama-3.2-90b-vision"
IDEFICS_9B = "idefics-9b"
# HuggingFaceM4/idefics-9b's config.json, as far as the model's shape goes.
IDEFICS_9B_JSON = dict(
    model_type="idefics", vocab_size=32000, additional_vocab_size=2, hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
    rms_norm_eps=1e-6, max_position_embeddings=2048, cross_layer_interval=4, alpha_type="float",
    qk_layer_norms=False, use_resampler=True, tie_word_embeddings=False,
    perceiver_config=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=False),
    vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120,
                       num_attention_heads=16, num_hidden_layers=32, patch_size=14,
                       hidden_act="gelu"))
LLAMA_3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SUFFIX = common.stages_suffix(STAGES)


def variants() -> list[str]:
  return [*common.BACKBONES, *EXTRAS, MLLAMA_11B, MLLAMA_90B, IDEFICS_9B]


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg.partition(",")[0] in (MLLAMA_11B, MLLAMA_90B):
    return mllama(arg.partition(",")[0], arg.partition(",")[2])
  if arg.partition(",")[0] == IDEFICS_9B:
    return idefics_9b(arg.partition(",")[2])
  native = arg.startswith("tiny-native")
  config = common.fusion_config(arg, family="deep_fusion", stages=STAGES,
                                pretrained_stage="flamingo", extras=EXTRAS)
  config.model.update(dict(
      cross_every=1,  # a cross block before every LM block: the tiny LM has only 2
      adapter_layers=2,
      resampler_latents=ml_collections.config_dict.placeholder(int),  # 64: Flamingo resampler
      media_attention="previous",  # or "latest"
      gate="scalar",  # or "channel"
      gate_init=0.0,  # gates start at tanh(gate_init): closed; open for an LM trained from scratch
      qk_norm=False,  # RMS-normed cross-attention queries and keys (Llama-3.2-Vision's)
      attention_sink=False,  # a learned null key in each cross block (see README, Counting)
  ))
  if arg.partition(",")[0] in ("tiny", *EXTRAS):
    # The best recipe of tools/showcase.py's ablations (3 seeds each, README): a gate per
    # channel, and the new layers (adapter, cross blocks, gates) learning 3x faster, as
    # Flamingo trains its new layers faster than the frozen LM would allow. Scalar gates at one
    # learning rate: 0.667 +- 0.170 held-out VQA; this: 0.771 +- 0.023 (early fusion 0.741).
    config.model.gate = "channel"
    config.optimizer.lr_multipliers = (("^(xattn|adapter)", 3.0),)
  if config.model.lm.get("variant") in ("gpt2-124m", "llama-7b"):
    config.model.cross_every = 4  # 3 cross blocks in GPT-2's 12, 8 in Llama-7B's 32
  if arg.partition(",")[0] == "large":
    # IDEFICS' places, before blocks 0, 4, ..., 28: each scanned group starts with its cross
    # block, so a group's 4 blocks stay one slice of the LM's stack (11.96 GiB a chip on
    # v5e:4x4, against 12.78 before blocks 3, 7, ...: BENCHMARKS.md). One image a text:
    # "latest" sees what "previous" does, as segment ids that splash reads.
    config.model.cross_layers = tuple(range(0, 32, 4))
    config.model.media_attention = "latest"
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


def mllama(variant: str, stage: str) -> ml_collections.ConfigDict:
  """Llama-3.2-11B-Vision or -90B-Vision (transformers' MllamaForConditionalGeneration),
  bfloat16, full remat; the 90B's 80-block LM scanned, its 20 cross blocks one every 4."""
  config = common.fusion_config(f"pretrained,{stage or 'all'}", family="deep_fusion",
                                stages=STAGES, pretrained_stage="all")
  run = dict(attention_impl="auto", remat_policy="full")
  config.model = ml_collections.ConfigDict(dict(
      vit=dict(width=1280, depth=32, global_depth=8, mlp_dim=5120, num_heads=16, patch_size=14,
               image_size=560, max_tiles=4, feature_layers=(3, 7, 15, 23, 30), **run),
      lm=dict(flavour="llama", width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128,
              mlp_dim=14336, vocab_size=128256, extra_tokens=8, max_len=131072,
              rope_theta=500000.0, rope_scaling=LLAMA_3_ROPE, norm_eps=1e-5,
              tie_embeddings=False, **run),
      vision_tower="tiled", image_token_id=128256, adapter_layers=1,
      cross_layers=(3, 7, 11, 15, 19, 23, 27, 31),  # its layers 3, 8, ..., 38 of 40
      media_attention="latest_run", media_free_rows="all_keys", gate="scalar", qk_norm=True,
      dtype="bfloat16"))
  config.data.seq_len = 512
  config.batch_size = 8
  if variant == MLLAMA_90B:
    config.model.lm.update(width=8192, depth=80, num_heads=64, mlp_dim=28672, scan_layers=True)
    config.model.cross_layers = tuple(range(3, 80, 4))  # its layers 3, 8, ..., 98 of 100
    config.batch_size = 64
  return config


def idefics_9b(stage: str) -> ml_collections.ConfigDict:
  """IDEFICS-9B (transformers' IdeficsForVisionText2Text) as tools/import_hf.py lays it out,
  bfloat16, full remat."""
  config = common.fusion_config(f"pretrained,{stage or 'all'}", family="deep_fusion",
                                stages=STAGES, pretrained_stage="all")
  fields = idefics.mmjax_config(IDEFICS_9B_JSON)["model"]
  run = dict(attention_impl="auto", remat_policy="full")
  fields["vit"].update(run)
  fields["lm"].update(run)
  config.model = ml_collections.ConfigDict(dict(fields, dtype="bfloat16"))
  config.data.seq_len = 512
  config.batch_size = 8
  return config

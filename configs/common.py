"""Pieces every config file shares: the common keys, the optimizer, paired backbones."""
import copy
import difflib
import importlib

import ml_collections

from mmjax.data import tokenizers

# Fusion configs pair the two schemes on these: an early-vs-deep comparison changes only the fusion.
BACKBONES = {
    # ViT-mu/8 at 32 px (16 patches) + a 2-block byte-level GPT-2: trains on a CPU in minutes.
    # Fixed 2-d sincos positions: with learned ones (init 0.02) the tiny towers barely learn
    # where things are in 3000 steps (position answers at chance instead of ~70%).
    # width and depth are gpt2-tiny's, named so the command line can change them (the
    # counting recipe, configs/vit.py:tiny-scenes, takes width 128).
    "tiny": dict(vit=dict(variant="mu/8", image_size=32, pool="none", posemb="sincos2d",
                          remat_policy="none"),
                 lm=dict(variant="gpt2-tiny", width=64, depth=2, vocab_size=320, max_len=128,
                         remat_policy="none", scan_layers=False),
                 dtype="float32"),
    # The benchmark pair for accelerators: ViT-B/16 at 224 px + GPT-2 124M, bfloat16 compute,
    # cuDNN or splash attention where the mask allows.
    "base": dict(vit=dict(variant="B/16", image_size=224, pool="none", attention_impl="auto",
                          remat_policy="none"),
                 lm=dict(variant="gpt2-124m", attention_impl="auto", remat_policy="none",
                         scan_layers=False), dtype="bfloat16"),
    # The pod pair, LLaVA-1.5-7B's towers: ViT-L/14 at 336 px + Llama-7B, global batch 32 of
    # 2048 tokens, both towers rematerialised in full and the LM scanned: what fits a v5e-16
    # slice (BENCHMARKS.md, "Early vs deep fusion at Llama-7B + ViT-L/14").
    "large": dict(vit=dict(variant="L/14", image_size=336, pool="none", attention_impl="auto",
                           remat_policy="full"),
                  lm=dict(variant="llama-7b", attention_impl="auto", remat_policy="full",
                          scan_layers=True), dtype="bfloat16", batch_size=32, seq_len=2048),
    # Two pretrained towers, --config.towers.vision=DIR and --config.towers.language=DIR
    # (mmjax/towers.py): their configs give the shapes; only how they run is set here.
    "pretrained": dict(vit=dict(attention_impl="auto", remat_policy="none"),
                       lm=dict(attention_impl="auto", remat_policy="none",
                               scan_layers=ml_collections.config_dict.placeholder(bool)),
                       dtype="bfloat16"),  # scan_layers None: as the LM tower is
}


FILES = ("lm.py", "vit.py", "early_fusion.py", "deep_fusion.py", "hf.py")


def load(spec: str) -> ml_collections.ConfigDict:
  """"lm.py:tiny" -> configs/lm.py's get_config("tiny"), as `--config configs/lm.py:tiny` does."""
  file, _, arg = spec.partition(":")
  module = importlib.import_module(f"configs.{file.removesuffix('.py')}")
  return module.get_config(arg) if arg else module.get_config()


def variant(variants: dict, arg: str, file: str) -> dict:
  """The preset named by `arg`, or an error listing the known ones."""
  if arg not in variants:
    near = difflib.get_close_matches(arg, variants, n=1)
    raise ValueError(f"unknown {file} variant {arg!r}"
                     + (f" (did you mean {near[0]!r}?)" if near else "")
                     + f"; known: {', '.join(variants)}")
  return variants[arg]


def listing() -> str:
  """Every config file with its first docstring line, its variants and what a suffix adds:
  what `train.py --list_configs` prints."""
  lines = []
  for file in FILES:
    module = importlib.import_module(f"configs.{file.removesuffix('.py')}")
    lines += [module.__doc__.splitlines()[0], f"  variants: {', '.join(module.variants())}"]
    if getattr(module, "SUFFIX", ""):
      lines.append(f"  {module.SUFFIX}")
  return "\n".join(lines)


def stages_suffix(stages: dict[str, str]) -> str:
  """How a fusion config file's STAGE suffix reads, for `listing`."""
  return (f"VARIANT,STAGE: what trains, STAGE in {', '.join(stages)}; STAGE+lora adds LoRA on "
          "the LM")


def base_config(*, family: str, total_steps: int, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.family = family  # which mmjax.models module builds config.model
  config.seed = 0
  config.total_steps = total_steps
  config.batch_size = batch_size  # global
  config.microbatches = 1  # gradient accumulation: the same update as one batch, less memory
  config.nan_policy = "skip"  # non-finite loss/grads: "skip" the update (counted) or "stop"
  config.init_from = ""  # a directory with params/ to start from (tools/import_hf.py --out)
  config.log_every = 25
  config.eval_every = 200
  config.eval_steps = 4  # validation batches per evaluation
  config.checkpoint_every = 200  # steps between saves; the last step and SIGTERM always save
  config.optimizer = optimizer()
  config.mesh = ml_collections.ConfigDict(dict(
      shape=dict(data=1, fsdp=-1, tensor=1),  # -1: all remaining devices
      rules="fsdp",  # or "dp", "fsdp_tp", or a list of (logical axis, mesh axes) pairs
      # Over several TPU slices: how many slices each axis spans (data-centre network); the
      # rest of each axis stays inside a slice. -1: all slices.
      dcn=dict(data=-1, fsdp=1, tensor=1),
  ))
  config.checkpoint = ml_collections.ConfigDict(dict(
      max_to_keep=3,
      keep_every=0,  # also keep every k-th step for good; 0: off
      async_save=True,
  ))
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",  # "host:port" to start jax.distributed; "" = environment/auto
      num_processes=1,
      process_id=0,
      join_timeout_s=300,  # how long every process waits for all of them to start
      heartbeat_timeout_s=100,  # a process silent this long is declared lost
  ))
  return config


def fusion_config(arg: str, *, family: str, stages: dict[str, str], pretrained_stage: str,
                  extras: tuple[str, ...] = ()):
  """Parses "BACKBONE[,STAGE]" -> the base config with the stage's freezing, towers and data.

  The default stage trains everything, or with pretrained towers `pretrained_stage`. extras:
  the file's own variants of the tiny backbone ("tiny-native"), which the file then adjusts.
  """
  backbone, _, stage = arg.partition(",")
  if backbone not in BACKBONES and backbone not in extras:
    variant(dict.fromkeys([*BACKBONES, *extras]), backbone, f"configs/{family}.py")
  backbone = "tiny" if backbone in extras else backbone
  stage = stage or (pretrained_stage if backbone == "pretrained" else "all")
  # STAGE+lora: the stage's freezing, with LoRA on the LM's projections.
  stage, lora = stage.removesuffix("+lora"), stage.endswith("+lora")
  if stage not in stages:
    raise ValueError(f"configs/{family}.py takes BACKBONE[,STAGE] with STAGE in "
                     f"{', '.join(stages)} (+lora: LoRA on the LM), got {arg!r}")
  # About 2 (early) and 3 (deep) minutes on 2 CPU cores for the tiny pair.
  config = base_config(family=family, total_steps=3000, batch_size=16)
  config.optimizer.learning_rate = 1e-3
  config.eval_every = 500
  config.eval_steps = 8  # x batch_size held-out questions, answered by greedy decoding
  config.optimizer.frozen = stages[stage]
  pair = copy.deepcopy(BACKBONES[backbone])  # a placeholder is an object: one per config
  config.model = ml_collections.ConfigDict(dict(
      vit=pair["vit"], lm=pair["lm"],
      image_token_id=tokenizers.ByteTokenizer.image_id,
      dtype=pair["dtype"],  # compute dtype of every part
  ))
  config.data = image_text_data()
  config.batch_size = pair.get("batch_size", config.batch_size)
  config.data.seq_len = pair.get("seq_len", config.data.seq_len)
  if lora:
    with_lora(config, "lm/")
  config.towers = ml_collections.ConfigDict(dict(
      vision="",  # a HuggingFace ViT/CLIP/SigLIP directory or a tools/import_hf.py output
      language="",  # the same for GPT-2 or Llama, with its tokenizer.json or tokenizer.model
  ))
  return config


def text_data(seq_len: int) -> ml_collections.ConfigDict:
  """config.data of language models: synthetic arithmetic, text files, or a tfds dataset."""
  return ml_collections.ConfigDict(dict(
      # "arithmetic": generated in memory; "text": .txt (a document per paragraph) and .jsonl
      # (a document per line) files, converted once by tfds; "tfds": a prepared tfds dataset.
      name="arithmetic",
      seq_len=seq_len,
      files="",  # text: a glob, or several separated by commas
      tfds_name="",  # tfds: e.g. "lm1b" (prepared beforehand: nothing is downloaded)
      text_key="text",  # text (.jsonl) and tfds: the field holding the text
      tokenizer="bytes",  # or a SentencePiece .model / HuggingFace tokenizer.json
      pack=1,  # documents per row; > 1 packs them with segment ids (see mmjax/data/pipeline.py)
      data_dir=""))  # where tfds writes and reads ("" = tfds' default)


def image_data() -> ml_collections.ConfigDict:
  """config.data of ViT classifiers: synthetic shapes, class folders, or a tfds dataset."""
  return ml_collections.ConfigDict(dict(
      # "shape_classes": generated in memory; "image_folder": image_dir/CLASS/*.jpg (or train/
      # and val/ folders of those), converted once by tfds; "tfds": a prepared tfds dataset.
      name="shape_classes",
      max_shapes=1,  # shape_classes: shapes per scene; > 1 labels each (multi-hot, sigmoid loss)
      image_size=model_image_size(),
      image_dir="",  # image_folder
      tfds_name="", image_key="image", label_key="label",  # tfds: e.g. "cifar10"
      resize="bilinear",  # user images to image_size: or "bicubic", "lanczos", "box", "nearest"
      **pixels(),
      data_dir=""))


def model_image_size():
  """config.data.image_size: None is the resolution of the model's ViT. Set, images are resized
  to it (a multiple of the patch size) and the ViT interpolates its position embeddings."""
  return ml_collections.config_dict.placeholder(int)  # a new reference for every config


def pixels(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> dict:
  """Pixels reach the model as ([0, 1] - image_mean) / image_std, per channel."""
  return dict(image_mean=tuple(mean), image_std=tuple(std))



def image_text_data(max_shapes: int = 2) -> ml_collections.ConfigDict:
  """config.data of the image-text families: generated scenes, LLaVA or COCO-style folders.

  The tokens the text holds per image are derived from the model (mmjax/data/sources.py):
  P placeholders for early fusion, one marker for deep fusion.
  """
  return ml_collections.ConfigDict(dict(
      # "tfds_scenes": generated scenes as a tfds ArrayRecord dataset, built on first use
      # (50k in about a minute); "shapes": the same scenes made in memory, no files;
      # "llava": a LLaVA conversation JSON + image folder; "coco_captions": a COCO-style
      # captions JSON + image folder; both converted once by tfds.
      name="tfds_scenes",
      data_dir="",  # where tfds writes ("" = tfds' default)
      train_size=50_000, eval_size=2_000,  # tfds_scenes: training / validation scenes
      json="", image_dir="",  # llava, coco_captions: the annotations and their image folder
      # coco_captions: a validation file of its own (captions_val2017.json) and its images
      # ("" = image_dir); unset, 2% of json's images are held out.
      val_json="", val_image_dir="",
      tokenizer="bytes",  # or a SentencePiece .model / tokenizer.json (config.towers sets it)
      max_images=1,  # llava: image slots per example
      pack=1,  # llava, coco_captions (and scenes with max_patches): examples per row, > 1 packs
      task="vqa",  # scenes: or "caption", "mixed"
      max_shapes=max_shapes,  # per image; 1 is easy, 3 makes counting and binding matter
      image_size=model_image_size(),
      # Deep fusion at native resolution: each image keeps its aspect ratio, cut into patches
      # packed into this many slots per row, with up to `pack` examples a row (mmjax/data/
      # patches.py); None: every image resized to image_size. Scenes, llava, coco_captions.
      max_patches=ml_collections.config_dict.placeholder(int),
      # scenes: or "varied", sides image_size/2..2*image_size: kept with max_patches, else
      # squashed to image_size
      scene_sizes="fixed",
      resize="bilinear",  # user images to image_size: or "bicubic", "lanczos", "box", "nearest"
      **pixels(),
      # PaliGemma's layout (early fusion; scenes, coco_captions): image, BOS, the prompt and
      # "\n" read both ways (a prefix-LM), then the answer, causal, with the loss.
      prefix_lm=False,
      seq_len=ml_collections.config_dict.placeholder(int)))  # None: the task's longest example


def optimizer(learning_rate: float = 3e-3) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",  # or "sgd", "adafactor"
      learning_rate=learning_rate,  # the peak, reached after the warmup
      schedule="cosine",  # or "linear", "constant": from the peak to 0 at decay_steps
      # Unset, both follow total_steps (mmjax/optim.py:plan): a warmup of min(100,
      # total_steps // 10) steps, decay to 0 at total_steps. Set, they stay as set.
      warmup_steps=ml_collections.config_dict.placeholder(int),
      decay_steps=ml_collections.config_dict.placeholder(int),
      b1=0.9,
      b2=0.95,  # GPT-2/3 practice, steadier than 0.999 at small batch
      momentum=0.9,  # sgd only
      weight_decay=0.1,
      # adamw's first moment: None keeps the parameters' float32; "bfloat16" halves its memory.
      mu_dtype=ml_collections.config_dict.placeholder(str),
      clip_norm=1.0,
      frozen="",  # regex over parameter paths ("lm/block_0/attn/query/kernel"); "" = none
      lr_multipliers=(),  # ((regex, factor), ...): e.g. (("^vit/", 0.1),) for a slower tower
      # Low-rank adapters (mmjax/lora.py) on the kernels `targets` (a regex) names: they train,
      # those kernels are frozen; "" = no LoRA. `with_lora` sets every projection of an LM.
      lora=dict(targets="", rank=16, alpha=32.0,
                base_dtype=ml_collections.config_dict.placeholder(str)),  # "bfloat16": QLoRA-ish
  ))


def projections(prefix: str = "", blocks: str = r"block_\d+|blocks") -> str:
  """A regex for every attention and MLP projection (query, key, value, out, gate, up, down)
  of the blocks matching `blocks` whose parameter paths start with prefix ("lm/" inside a
  fusion model)."""
  return rf"^{prefix}({blocks})/(attn|mlp)/\w+/kernel$"


def with_lora(config: ml_collections.ConfigDict, prefix: str = "") -> ml_collections.ConfigDict:
  """LoRA of rank 16 on every projection of the LM under prefix; the rest as the config says."""
  config.optimizer.lora.targets = projections(prefix)
  return config

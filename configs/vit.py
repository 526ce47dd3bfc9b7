"""ViT classification configs: `configs/vit.py:VARIANT`.

"tiny-scenes" pretrains the tiny fusion pair's vision tower: the pair's ViT (mu/8,
32 px, fixed sincos positions) on the pair's scenes of one or two shapes, labelled
with every shape's colour, quadrant and kind (multi-hot). Trained from scratch
inside a fusion model, the tiny ViT never learns squares from circles; loaded
frozen as `--config.towers.vision=WORKDIR`, it lets early fusion count (README,
"Counting: a pretrained vision tower").
"""
import ml_collections

from configs import common
from mmjax.data import synthetic

VARIANTS = {
    # ViT-mu/8 on 32 px synthetic shapes, 32 classes (colour x quadrant x kind).
    "tiny": dict(variant="mu/8", image_size=32, total_steps=400, batch_size=32,
                 dtype="float32", attention_impl="xla", remat_policy="none"),
    # ViT-B/16 at 224 px, the benchmark shape, for accelerators: bfloat16 compute, cuDNN
    # attention on GPUs. Blocks keep their projections and recompute the rest: 2.2 GiB a chip
    # at B=256 on a v5e:2x4 (dry run) against 4.3 without, and 4.4 for the naive reference.
    "base": dict(variant="B/16", image_size=224, total_steps=10000, batch_size=256,
                 dtype="bfloat16", attention_impl="auto", remat_policy="dots_no_batch"),
}
# tiny, longer, on scenes of one or two shapes (get_config): the tiny fusion pair's ViT tower.
VARIANTS["tiny-scenes"] = dict(VARIANTS["tiny"], total_steps=8000, batch_size=64)


def variants() -> list[str]:
  return list(VARIANTS)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = common.variant(VARIANTS, arg, "configs/vit.py")
  config = common.base_config(family="vit", total_steps=preset["total_steps"],
                              batch_size=preset["batch_size"])
  config.model = ml_collections.ConfigDict(dict(
      variant=preset["variant"], image_size=preset["image_size"],
      num_classes=synthetic.ShapeClasses.num_classes, pool="gap",
      dtype=preset["dtype"], attention_impl=preset["attention_impl"],
      remat_policy=preset["remat_policy"]))
  config.data = common.image_data()
  config.optimizer.learning_rate = 1e-3
  if arg.startswith("tiny"):
    # The tiny fusion pair's: fixed 2-d positions learn places fast.
    config.model.posemb = "sincos2d"
  if arg == "tiny-scenes":
    config.data.max_shapes = 2
    # Kinds are learned last, after a plateau of ~2000 steps: a decaying rate never gets there
    # (held-out kinds at chance after 3000 steps of cosine decay; 100% at a constant rate).
    config.optimizer.schedule = "constant"
  return config

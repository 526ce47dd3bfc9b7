"""Every config file and variant builds a consistent model and data source."""
import importlib

import jax
import pytest

from mmjax import models
from mmjax import optim
from mmjax import sharding
from mmjax import steps
from mmjax import trainer
from mmjax.data import sources

CONFIGS = [("lm", "tiny"), ("lm", "gpt2-124m"), ("lm", "llama-1b"), ("lm", "llama-7b"),
           ("vit", "tiny"), ("vit", "base"), ("early_fusion", "tiny"), ("early_fusion", "tiny,stage1"),
           ("early_fusion", "tiny,stage2"), ("early_fusion", "base"), ("deep_fusion", "tiny"),
           ("deep_fusion", "tiny,flamingo"), ("deep_fusion", "base"),
           ("deep_fusion", "tiny-native"), ("early_fusion", "tiny-anyres")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_builds(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  if config.data.name == "tfds_scenes":  # the default scenes, fewer of them
    config.data.update(train_size=64, eval_size=16)
  model = models.build(config.family, config.model)
  data = sources.build(config)
  batch = jax.tree.map(lambda x: x[:1], data.batch(0))
  shapes = jax.eval_shape(model.init, jax.random.key(0), *steps.init_inputs(batch))
  optim.make_optimizer(config.optimizer, shapes["params"], config.total_steps)
  # On 8 devices where the batch splits over them (tiny-native's 3 long rows do not).
  trainer.validate(config, num_devices=8 if config.batch_size % 8 == 0 else 1)
  assert config.family == name


@pytest.mark.parametrize("name", ["lm", "vit", "early_fusion", "deep_fusion"])
def test_unknown_variant_is_a_clear_error(name):
  with pytest.raises(ValueError, match=f"configs/{name}.py"):
    importlib.import_module(f"configs.{name}").get_config("huge")


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_batch_spec_is_the_batch(name, arg):
  # steps.setup compiles for sources.batch_spec, read from the config alone: it must be exactly
  # what the source then yields (one process: its rows are the global batch).
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  if config.data.name == "tfds_scenes":
    config.data.update(train_size=64, eval_size=16)
  batch = sources.build(config).batch(0)
  spec = sources.batch_spec(config)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in spec.items()}


def fusion_config(name: str, **overrides):
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  config.update_from_flattened_dict({"data.name": "shapes", "batch_size": 8, **overrides})
  return config


@pytest.mark.parametrize("name,placeholders", [("early_fusion", (64 // 8) ** 2),
                                               ("deep_fusion", 1)])
def test_model_image_size_moves_the_data(name, placeholders):
  # --config.model.vit.image_size=64: the data follows the model (64 px images, and for early
  # fusion 64 placeholders per image), and one train step runs on it.
  config = fusion_config(name, **{"model.vit.image_size": 64})
  batch = sources.build(config).batch(0)
  assert batch["images"].shape == (8, 1, 64, 64, 3)
  image_id = config.model.image_token_id
  assert [int((row == image_id).sum()) for row in batch["tokens"]] == [placeholders] * 8
  run = steps.setup(config)
  train_step, _ = run.compile()
  state, metrics = train_step(run.init(jax.random.key(0)), sharding.global_batch(batch, run.mesh))
  assert jax.numpy.isfinite(metrics["loss"]) and int(state["step"]) == 1


@pytest.mark.parametrize("name,placeholders", [("early_fusion", (48 // 8) ** 2),
                                               ("deep_fusion", 1)])
def test_data_image_size_is_derived_from_or_checked(name, placeholders):
  # data.image_size set on its own: the placeholders follow it (the ViT interpolates its
  # positions); one that the patch size does not divide is a one-line error naming the key.
  config = fusion_config(name, **{"data.image_size": 48})
  assert sources.placeholders_per_image(config) == placeholders
  assert sources.batch_spec(config)["images"].shape == (8, 1, 48, 48, 3)
  with pytest.raises(ValueError, match=r"^config.data.image_size=30 is not a multiple of the "
                                       r"ViT's patch size 8$"):
    trainer.validate(fusion_config(name, **{"data.image_size": 30}), num_devices=8)
  with pytest.raises(ValueError, match=r"^config.model.vit.image_size=36 is not a multiple"):
    trainer.validate(fusion_config(name, **{"model.vit.image_size": 36}), num_devices=8)

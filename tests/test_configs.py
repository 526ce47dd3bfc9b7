"""Every config file and variant builds a consistent model and data source."""
import importlib

import jax
import pytest

from mmjax import optim
from mmjax import trainer

CONFIGS = [("lm", "tiny"), ("lm", "gpt2-124m"), ("lm", "llama-1b"), ("vit", "tiny"),
           ("vit", "base"), ("early_fusion", "tiny"), ("early_fusion", "tiny,stage1"),
           ("early_fusion", "tiny,stage2"), ("early_fusion", "base"), ("deep_fusion", "tiny"),
           ("deep_fusion", "tiny,flamingo"), ("deep_fusion", "base")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_builds(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  if config.data.name == "tfds_scenes":  # the default scenes, fewer of them
    config.data.update(train_size=64, eval_size=16)
  model = trainer.build_model(config)
  data = trainer.build_data(config)
  batch = jax.tree.map(lambda x: x[:1], data.batch(0))
  shapes = jax.eval_shape(model.init, jax.random.key(0), *trainer.init_inputs(batch))
  optim.make_optimizer(config.optimizer, shapes["params"])
  trainer.validate(config, num_devices=8)
  assert config.family == name


@pytest.mark.parametrize("name", ["lm", "vit", "early_fusion", "deep_fusion"])
def test_unknown_variant_is_a_clear_error(name):
  with pytest.raises(ValueError, match=f"configs/{name}.py"):
    importlib.import_module(f"configs.{name}").get_config("huge")

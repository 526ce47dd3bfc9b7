"""Tests of the training loop and its loss."""
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import deep_fusion as deep_fusion_config
from configs import early_fusion as early_fusion_config
from configs import lm as lm_config
from mmjax import trainer
from mmjax.data import synthetic


def test_cross_entropy_sum_and_count_split_invariant():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 6, 11), jnp.float32)
  targets = jnp.asarray(np.random.RandomState(1).randint(0, 11, (4, 6)))
  weights = jnp.asarray(np.random.RandomState(2).rand(4, 6) > 0.3, jnp.float32)
  total, count = trainer.cross_entropy(logits, targets, weights)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(total, np.sum(np.asarray(per_token) * np.asarray(weights)), rtol=1e-6)
  assert count == np.sum(np.asarray(weights))
  # Summing over two halves then dividing once gives the full-batch mean.
  halves = [trainer.cross_entropy(logits[i:i + 2], targets[i:i + 2], weights[i:i + 2])
            for i in (0, 2)]
  np.testing.assert_allclose(sum(h[0] for h in halves) / sum(h[1] for h in halves),
                             total / count, rtol=1e-6)


def test_arithmetic_text_is_deterministic_and_correct():
  source = synthetic.ArithmeticText(batch_size=3, seq_len=40, seed=1)
  batch = source.batch(7)
  np.testing.assert_array_equal(batch["tokens"], source.batch(7)["tokens"])
  assert batch["tokens"].shape == batch["targets"].shape == (3, 40)
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["loss_weights"], 1.0)
  assert not np.array_equal(batch["tokens"], source.batch(8)["tokens"])
  assert np.all(batch["tokens"][:, 0] == source.tokenizer.bos_id)
  text = source.tokenizer.decode(batch["targets"][0])
  for sentence in text.split(". ")[:-1]:
    lhs, rhs = sentence.split("=")
    x, y = lhs.split("+")
    assert int(x) + int(y) == int(rhs)


def test_tiny_lm_trains(tmp_path):
  config = lm_config.get_config("tiny")
  config.total_steps = 120
  config.log_every = 20
  config.optimizer.decay_steps = 120
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
  # Uniform over 256 bytes is 5.5 nats; the digit/symbol alphabet alone gets below 2.6.
  assert rows[0]["loss"] < 5.5 and rows[-1]["loss"] < 2.0
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5


@pytest.mark.parametrize("config_module", [early_fusion_config, deep_fusion_config])
def test_fusion_models_learn_from_the_image(tmp_path, config_module):
  config = config_module.get_config("tiny")
  config.total_steps = 250
  config.log_every = 50
  config.optimizer.decay_steps = 250
  last = trainer.train_and_evaluate(config, str(tmp_path))
  # A model blind to the image pays at least log(16) nats per caption (4 colours x 4 places);
  # spread over the caption's tokens, that bounds its mean token loss from below.
  batch = trainer.build_data(config).batch(config.total_steps)
  blind_bound = np.log(16) * config.batch_size / batch["loss_weights"].sum()
  assert last["loss"] < 0.6 * blind_bound, (last["loss"], blind_bound)

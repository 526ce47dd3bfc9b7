"""Tests of the in-memory synthetic sources: determinism, layouts, per-process rows."""
import re

import numpy as np
import pytest

from mmjax.data import synthetic


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


@pytest.mark.parametrize("make", [
    lambda **kw: synthetic.ArithmeticText(8, 32, **kw),
    lambda **kw: synthetic.ShapeCaptions(8, 40, 16, 4, **kw),
    lambda **kw: synthetic.ShapeClasses(8, 16, **kw),
])
def test_processes_split_the_global_batch(make):
  whole = make().batch(3)
  parts = [make(process_index=i, process_count=4).batch(3) for i in range(4)]
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  validation = make(split="validation").batch(3)
  assert not all(np.array_equal(validation[k], whole[k]) for k in whole)


def test_shape_classes_label_matches_the_caption():
  captions = synthetic.ShapeCaptions(16, 40, 16, 4, seed=5).batch(2)
  classes = synthetic.ShapeClasses(16, 16, seed=5).batch(2)
  np.testing.assert_array_equal(classes["images"], captions["images"][:, 0])
  tokenizer = synthetic.tokenizers.ByteTokenizer()
  for label, targets, weights in zip(classes["labels"], captions["targets"],
                                     captions["loss_weights"]):
    colour, place = re.fullmatch(r"a (\w+) square, (.+)\.",
                                 tokenizer.decode(targets[weights > 0])).groups()
    assert label == list(synthetic.COLOURS).index(colour) * 4 + synthetic.PLACES.index(place)


def test_errors():
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by 4 processes"):
    synthetic.ArithmeticText(6, 8, process_count=4)
  with pytest.raises(ValueError, match="split must be one of"):
    synthetic.ArithmeticText(4, 8, split="test")
  with pytest.raises(ValueError, match="data.seq_len=10 is too short for 4 image tokens"):
    synthetic.ShapeCaptions(2, 10, 16, 4).batch(0)

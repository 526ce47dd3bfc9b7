"""Tests of the in-memory synthetic sources: determinism, layouts, per-process rows."""

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
    lambda **kw: synthetic.ShapeScenes(8, None, 16, 4, task="mixed", **kw),
    lambda **kw: synthetic.ShapeClasses(8, 16, **kw),
])
def test_processes_split_the_global_batch(make):
  whole = make().batch(3)
  parts = [make(process_index=i, process_count=4).batch(3) for i in range(4)]
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  validation = make(split="validation").batch(3)
  assert not all(np.array_equal(validation[k], whole[k]) for k in whole)


def test_scenes_draw_what_they_describe():
  rng = np.random.default_rng(0)
  for _ in range(50):
    image, shapes = synthetic.draw_scene(rng, 32, 3)
    for shape in shapes:
      ys, xs = np.nonzero(np.all(image == np.float32(synthetic.COLOURS[shape.colour]), axis=-1))
      quadrant = synthetic.PLACES[2 * int(ys.mean() >= 16) + int(xs.mean() >= 16)]
      assert quadrant == shape.place
      assert ys.max() < 16 if "top" in shape.place else ys.min() >= 16
      fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # a square fills its bounding box
      assert fill == 1.0 if shape.kind == "square" else fill < 0.9


def test_shape_classes_label_every_shape_the_image_shows():
  # (colour green = 1, quadrant top right = 1, kind circle = 1): (1 * 4 + 1) * 2 + 1
  assert synthetic.ShapeClasses.label(synthetic.Shape("circle", "green", "top right")) == 11
  one = synthetic.ShapeClasses(32, 32).batch(0)
  assert one["labels"].shape == (32,) and one["labels"].dtype == np.int32
  several = synthetic.ShapeClasses(32, 32, max_shapes=2).batch(0)
  assert several["labels"].shape == (32, 32) and several["labels"].dtype == np.float32
  assert set(several["labels"].sum(-1)) == {1.0, 2.0}
  multi_hot = [np.eye(32)[one["labels"]], several["labels"]]
  for images, labels in zip((one["images"], several["images"]), multi_hot):
    for image, row in zip(images, labels):
      colours = [c for c, rgb in synthetic.COLOURS.items()
                 if np.all(image == np.float32(rgb), axis=-1).any()]
      assert len(colours) == row.sum()
      for c in np.flatnonzero(row):  # decoded by hand: class = (colour * 4 + place) * 2 + kind
        colour, place = list(synthetic.COLOURS)[c // 8], synthetic.PLACES[c // 2 % 4]
        ys, xs = np.nonzero(np.all(image == np.float32(synthetic.COLOURS[colour]), axis=-1))
        assert synthetic.PLACES[2 * int(ys.mean() >= 16) + int(xs.mean() >= 16)] == place
        fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert (fill == 1.0) == (synthetic.KINDS[c % 2] == "square")


def test_questions_have_the_right_answers():
  shapes = [synthetic.Shape("square", "red", "top left"),
            synthetic.Shape("circle", "blue", "top right"),
            synthetic.Shape("square", "green", "bottom right")]
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(200):
    seen.add(synthetic.ask(rng, shapes))
  assert seen == {
      ("colour", "what colour is the circle?", "blue"),
      ("count", "how many squares are there?", "two"),
      ("count", "how many circles are there?", "one"),
      ("position", "where is the red square?", "top left"),
      ("position", "where is the blue circle?", "top right"),
      ("position", "where is the green square?", "bottom right")}
  assert synthetic.caption(shapes) == ("a red square top left, a blue circle top right, "
                                       "a green square bottom right.")


def test_text_alone_cannot_answer():
  # The best a text-only model can do is the commonest answer to each question.
  source = synthetic.ShapeScenes(64, None, 16, 1, task="vqa", seed=3)
  answers = {}
  for step in range(60):
    for example in source.examples(step):
      answers.setdefault(example["question"], []).append(example["answer"])
  by_type = {}
  for question, given in answers.items():
    kind = "colour" if "colour" in question else "count" if "many" in question else "position"
    best = max(given.count(a) for a in set(given))
    hits, total = by_type.get(kind, (0, 0))
    by_type[kind] = (hits + best, total + len(given))
  chance = {kind: hits / total for kind, (hits, total) in by_type.items()}
  assert chance["colour"] < 0.35 and chance["position"] < 0.35 and chance["count"] < 0.55, chance


def test_layout_of_a_question():
  source = synthetic.ShapeScenes(4, None, 16, 4, task="vqa")
  batch, examples = source.batch(1), source.examples(1)
  tokenizer = source.tokenizer
  for b, example in enumerate(examples):
    prompt = [tokenizer.bos_id] + [tokenizer.image_id] * 4 + tokenizer.encode(
        example["question"] + " ")
    assert example["prompt"] == prompt
    n = len(prompt)
    np.testing.assert_array_equal(batch["tokens"][b, :n], prompt)
    answer = tokenizer.encode(example["answer"]) + [tokenizer.eos_id]
    np.testing.assert_array_equal(batch["targets"][b, n - 1:n - 1 + len(answer)], answer)
    expected = np.zeros(source.seq_len)
    expected[n - 1:n - 1 + len(answer)] = 1.0
    np.testing.assert_array_equal(batch["loss_weights"][b], expected)


def test_errors():
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by 4 processes"):
    synthetic.ArithmeticText(6, 8, process_count=4)
  with pytest.raises(ValueError, match="split must be one of"):
    synthetic.ArithmeticText(4, 8, split="dev")
  with pytest.raises(ValueError, match="data.seq_len=10 is too short for 4 image tokens"):
    synthetic.ShapeScenes(2, 10, 16, 4)
  with pytest.raises(ValueError, match="config.data.task must be one of"):
    synthetic.ShapeScenes(2, None, 16, 4, task="vqa2")

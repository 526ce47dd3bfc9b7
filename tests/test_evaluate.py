"""Evaluators: exact match, caption metrics and loss scores against hand-computed values."""
import numpy as np
import pytest

from mmjax import evaluate


def test_normalise():
  assert evaluate.normalise("  Top   Left. ") == "top left"
  assert evaluate.normalise("red!") == "red"


def test_vqa_scores_overall_and_per_type():
  answers = ["red", "Two.", "top left", "blue", "one"]
  truths = ["red", "two", "top right", "green", "one"]
  types = ["colour", "count", "position", "colour", "count"]
  assert evaluate.vqa_scores(answers, truths, types) == {
      "vqa/accuracy": 3 / 5, "vqa/accuracy_colour": 1 / 2, "vqa/accuracy_count": 1.0,
      "vqa/accuracy_position": 0.0}


def test_bleu4_by_hand():
  # Matching n-grams: 4/5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams; equal lengths, so no
  # brevity penalty: BLEU-4 = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4).
  scores = evaluate.caption_scores(["a red square top left"], [["a red square top right"]])
  assert scores["caption/bleu4"] == pytest.approx(0.2 ** 0.25, rel=1e-6)
  # Half as long: brevity penalty exp(1 - 10/5) on the same precisions of a doubled reference.
  short = evaluate.caption_scores(["a red square top left"],
                                  [["a red square top left and a blue circle bottom right"]])
  assert short["caption/bleu4"] == pytest.approx(np.exp(1 - 11 / 5), rel=1e-6)


def test_cider_rewards_the_right_caption_for_each_image():
  references = [["a red square top left."], ["a blue circle bottom right."]]
  right = evaluate.caption_scores(["a red square top left", "a blue circle bottom right"],
                                  references)
  # Every n-gram is specific to one image, so perfect captions score CIDEr-D's maximum, 10.
  assert right["caption/cider"] == pytest.approx(10.0)
  swapped = evaluate.caption_scores(["a blue circle bottom right", "a red square top left"],
                                    references)
  assert swapped["caption/cider"] == pytest.approx(0.0, abs=1e-9)
  assert swapped["caption/bleu4"] < 1e-6


def test_loss_scores():
  sums = np.array([6.0, 3.0, 2.0])
  assert evaluate.loss_scores(sums, classification=False) == pytest.approx(
      {"eval_loss": 2.0, "eval_perplexity": np.exp(2.0), "eval_accuracy": 2 / 3})
  assert evaluate.loss_scores(sums, classification=True) == pytest.approx(
      {"eval_loss": 2.0, "eval_top1": 2 / 3})

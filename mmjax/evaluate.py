"""Evaluators: what a model gets right on held-out data, during training and from tools.

  loss-based, every family   eval_loss, eval_perplexity, eval_accuracy (next token);
                             eval_top1 for ViT classification
  generative, image-text     vqa/accuracy and vqa/accuracy_<type>: exact match of the
                             greedy answer; caption/bleu4 and caption/cider: the COCO
                             caption metrics (pycocoevalcap's scorers); a few samples
                             to DIR/samples.jsonl and TensorBoard

Generation uses `mmjax.generation` with the training mesh: parameters stay sharded as
they were trained and the prompts are sharded over the batch axes.
"""
import dataclasses
import re

from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

from mmjax import generation
from mmjax import sharding
from mmjax import steps
from mmjax.data import patches


def loss_scores(sums: np.ndarray, classification: bool) -> dict[str, float]:
  """(summed loss, weight count, summed correct) over the eval batches -> metrics."""
  total, count, correct = sums
  count = max(count, 1.0)
  if classification:
    return {"eval_loss": total / count, "eval_top1": correct / count}
  return {"eval_loss": total / count, "eval_perplexity": float(np.exp(total / count)),
          "eval_accuracy": correct / count}


def normalise(text: str) -> str:
  """Lower case, punctuation dropped, single spaces: "Top left." -> "top left"."""
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def vqa_scores(answers: list[str], truths: list[str], types: list[str]) -> dict[str, float]:
  """Exact match after `normalise`, overall and per question type."""
  hits = [normalise(a) == normalise(t) for a, t in zip(answers, truths)]
  scores = {"vqa/accuracy": float(np.mean(hits))}
  for kind in sorted(set(types)):
    scores[f"vqa/accuracy_{kind}"] = float(np.mean([h for h, t in zip(hits, types) if t == kind]))
  return scores


def caption_scores(captions: list[str], references: list[list[str]]) -> dict[str, float]:
  """Corpus BLEU-4 and CIDEr-D of captions against their reference captions.

  The text is normalised here instead of by COCO's PTB tokenizer, which needs Java: the
  scores are close to COCO's official ones, not equal (the README says so too).
  """
  # Imported here: only caption scoring needs it, and the GPU benchmark image lacks it.
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  hypotheses = {i: [normalise(c) or "<empty>"] for i, c in enumerate(captions)}
  truths = {i: [normalise(r) for r in refs] for i, refs in enumerate(references)}
  bleu, _ = Bleu(4).compute_score(truths, hypotheses, verbose=0)
  cider, _ = Cider().compute_score(truths, hypotheses)
  return {"caption/bleu4": float(bleu[3]), "caption/cider": float(cider)}


class Generative:
  """Greedy answers to the held-out prompts of a source (`example_types` non-empty), scored.

  The source's rows are this process's share of each global batch; generated
  tokens and references are gathered so every process computes the same scores.
  """

  def __init__(self, model: nn.Module, source, mesh, rules, params_sharding, *,
               num_batches: int, num_samples: int = 8, merge=lambda params: params):
    self.source = source
    self.mesh, self.rules = mesh, rules
    self.num_batches = num_batches
    self.num_samples = num_samples
    self.tokenizer = source.tokenizer
    self.prompt_len = source.longest_prompt()
    self.answer_len = source.longest_answer() + 1  # and EOS
    self.max_references = source.max_references
    generate = generation.make_generate(model, generation.Sampling(
        method="greedy", max_new_tokens=self.answer_len, eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id), prefix_lm=source.prefix_lm)
    batch = sharding.batch_sharding(mesh)
    self.generate = jax.jit(
        # merge: the state's parameters -> the model's (LoRA factors into their kernels).
        lambda params, tokens, lengths, images: generate(merge(params), tokens, lengths, images,
                                                         jax.random.key(0))["tokens"],
        in_shardings=(params_sharding, batch, batch, batch))

  def __call__(self, params) -> tuple[dict[str, float], list[dict]]:
    """-> (scores, samples: the first num_samples examples with their generated answers)."""
    rows = []
    for i in range(self.num_batches):
      examples = self.source.examples(i)
      tokens, lengths = generation.left_pad([e["prompt"] for e in examples], self.tokenizer.pad_id,
                                        width=self.prompt_len)
      local = {"tokens": tokens, "lengths": lengths, **self._images(examples)}
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        inputs = sharding.global_batch(local, self.mesh)
        generated = self.generate(params, inputs["tokens"], inputs["lengths"],
                                  steps.batch_images(inputs))
      # Every reference answer, padded: [b, references, answer_len] (one for questions).
      truths = np.full((len(examples), self.max_references, self.answer_len),
                       self.tokenizer.pad_id, np.int32)
      for b, e in enumerate(examples):
        for r, reference in enumerate(e.get("references", [e["answer"]])[:self.max_references]):
          truth = self.tokenizer.encode(reference)[:self.answer_len]
          truths[b, r, :len(truth)] = truth
      kinds = np.array([self.source.example_types.index(e["type"]) for e in examples], np.int32)
      generated, truths, kinds, prompts = (
          np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for x in (generated, truths, kinds, tokens))
      images = {k: np.asarray(multihost_utils.process_allgather(local[k], tiled=True))
                for k in local if k not in ("tokens", "lengths")}
      for b in range(len(generated)):
        references = [self.tokenizer.decode(t) for t in truths[b]
                      if (t != self.tokenizer.pad_id).any()]
        rows.append({"prompt": self.tokenizer.decode(prompts[b]),  # special tokens dropped
                     "answer": self.tokenizer.decode(_until_eos(generated[b],
                                                                self.tokenizer.eos_id)),
                     "truth": references[0], "references": references,
                     "type": self.source.example_types[kinds[b]],
                     # Back to [0, 1] pixels for pictures of the samples.
                     "image": picture(images, b) * self.source.image_std
                              + self.source.image_mean})
    scores = {}
    questions = [r for r in rows if r["type"] != "caption"]
    if questions:
      scores.update(vqa_scores([r["answer"] for r in questions], [r["truth"] for r in questions],
                               [r["type"] for r in questions]))
    captions = [r for r in rows if r["type"] == "caption"]
    if captions:
      scores.update(caption_scores([r["answer"] for r in captions],
                                   [r["references"] for r in captions]))
    return scores, rows[:self.num_samples]

  def example(self) -> tuple[np.ndarray, str] | None:
    """This process's first held-out example with an image, as a user would give it to
    tools/generate.py: (its first image, float[H, W, 3] in [0, 1]; its question, "" for a
    caption); None when the first batch has none."""
    for example in self.source.examples(0):
      image = picture(self._images([example]), 0)
      if image.size:  # an example without images has an empty picture
        return image * self.source.image_std + self.source.image_mean, example["question"]
    return None

  def _images(self, examples: list[dict]) -> dict[str, np.ndarray]:
    """The examples' images (each "image" float32[I, H, W, 3], or AnyRes tiles) as the model
    takes them: dense, or laid out one example a row when the source keeps each image's size."""
    layout = getattr(self.source, "layout", None)
    if layout is None:
      return {"images": np.stack([e["image"] for e in examples])}
    # One example a row: its own images (a LLaVA conversation's max_images slots, else one).
    return dataclasses.replace(layout, max_images=getattr(self.source, "max_images", 1)).pack(
        [list(e["image"]) for e in examples])


def picture(images: dict[str, np.ndarray], row: int) -> np.ndarray:
  """The first image of a row of the model's image inputs, float[H, W, 3] (AnyRes: its base
  tile, the whole image at the ViT's resolution)."""
  if "patches" in images:
    return patches.unpack(images, row, 0)
  if "image_sources" in images:
    return images["images"][row, 0, 0]
  return images["images"][row, 0]


def _until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
  stop = np.flatnonzero(ids == eos_id)
  return ids[:stop[0]] if len(stop) else ids

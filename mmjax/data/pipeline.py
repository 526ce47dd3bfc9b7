"""Sources that read tfds ArrayRecord datasets by index, in a seeded order.

  TfdsScenes          the generated scenes (data.name="tfds_scenes")
  LlavaConversations  a LLaVA JSON + image folder (data.name="llava")

Row r of global batch s is record order[s * B + r], where `order` is a grain
shuffle of the split's indices, reshuffled every epoch. Each process reads
only its own rows, so P processes together read every record exactly once
per epoch, and batch s is a pure function of (seed, split, s): the trainer's
checkpointed `next_step` is the whole iterator state, and a resumed run sees
exactly the batches an uninterrupted one would have.
"""
import json

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import builders
from mmjax.data import images as image_codec
from mmjax.data import synthetic
from mmjax.data import tokenizers


def open_split(builder: tfds.core.DatasetBuilder, split: str, seed: int):
  """Builds the dataset if it is not yet built -> (the split, read by index; its record order).

  order[g] is the record at global position g: a grain shuffle of the split,
  reshuffled every epoch.
  """
  builder.download_and_prepare()
  records = builder.as_data_source(split=split)
  return records, grain.MapDataset.range(len(records)).shuffle(seed=seed).repeat()


class TfdsScenes(synthetic.ShapeScenes):
  """`synthetic.ShapeScenes`, read from its tfds build (made on first use in data_dir)."""

  def __init__(self, batch_size: int, seq_len: int | None, image_size: int, image_tokens: int,
               *, data_dir: str | None = None, train_size: int = 50_000, **kwargs):
    super().__init__(batch_size, seq_len, image_size, image_tokens, **kwargs)
    builder = builders.MmjaxShapeScenes(
        config=builders.ShapeScenesConfig(image_size=image_size, max_shapes=self.max_shapes,
                                          train_size=train_size, seed=self.seed),
        data_dir=data_dir or None, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    self.records, self.order = open_split(builder, self.split, self.seed)

  def __repr__(self):
    return (f"TfdsScenes({self.records!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, task={self.task!r}, seed={self.seed}, "
            f"rows from {self.first_row})")

  def record_index(self, step: int, row: int) -> int:
    return int(self.order[step * self.batch_size + row])

  def scene(self, step: int, row: int, rng) -> dict:
    del rng  # the record is fixed; rng still picks the task of a "mixed" example
    record = self.records[self.record_index(step, row)]
    text = {k: record[k].decode("utf-8") for k in ("question", "answer", "type", "caption")}
    return {"image": image_codec.decode(record["images"][0]), **text}


class LlavaConversations(synthetic.Source):
  """LLaVA conversations from their tfds build, laid out by `tokenizers.encode_conversation`.

  Every sample has `max_images` image slots (unused ones stay black and are
  never read: no placeholder points at them); images are resized to
  image_size and scaled to [0, 1]. A conversation longer than seq_len is
  truncated, and counted in a warning.
  """

  def __init__(self, batch_size: int, seq_len: int, *, json_path: str, image_dir: str,
               image_size: int, image_tokens: int, image_token_id: int, tokenizer: str = "bytes",
               max_images: int = 1, data_dir: str | None = None, **kwargs):
    super().__init__(batch_size, **kwargs)
    self.seq_len = seq_len
    self.image_size = image_size
    self.image_ids = [image_token_id] * image_tokens
    self.max_images = max_images
    self.tokenizer = tokenizers.load(tokenizer)
    builder = builders.MmjaxLlava(
        config=builders.LlavaConfig(json_path=json_path, image_dir=image_dir),
        data_dir=data_dir or None, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    self.records, self.order = open_split(builder, self.split, self.seed)
    if not len(self.records):
      raise ValueError(f"LLaVA JSON {json_path} has no usable {self.split} examples")
    self.truncated = 0

  def __repr__(self):
    return (f"LlavaConversations({self.records!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, tokenizer={self.tokenizer!r}, seed={self.seed}, "
            f"rows from {self.first_row})")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """-> images float32[b, max_images, S, S, 3], tokens/targets int32[b, T], loss_weights."""
    rows = list(self.rows(step))
    images = np.zeros((len(rows), self.max_images, self.image_size, self.image_size, 3),
                      np.float32)
    tokens = np.full((len(rows), self.seq_len + 1), self.tokenizer.pad_id, np.int32)
    weights = np.zeros((len(rows), self.seq_len + 1), np.float32)
    for b, (row, _) in enumerate(rows):
      record = self.records[int(self.order[step * self.batch_size + row])]
      for i, data in enumerate(record["images"][:self.max_images]):
        images[b, i] = image_codec.decode(data, self.image_size)
      ids, mask = tokenizers.encode_conversation(json.loads(record["conversation"]),
                                                 self.tokenizer, self.image_ids)
      if len(ids) > self.seq_len + 1:
        self.truncated += 1
        if self.truncated & (self.truncated - 1) == 0:  # 1, 2, 4, 8, ...: counted, not spammed
          logging.warning("truncated conversation %s (%d tokens) to data.seq_len=%d; %d so far",
                          record["id"].decode(), len(ids), self.seq_len, self.truncated)
        ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
      tokens[b, :len(ids)] = ids
      weights[b, :len(mask)] = mask
    # The loss is on targets: weight t belongs to token t + 1.
    return {"images": images, "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_weights": weights[:, 1:]}

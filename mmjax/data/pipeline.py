"""Sources that read tfds ArrayRecord datasets by index, in a seeded order.

Row r of global batch s is record order[s * B + r], where `order` is a grain
shuffle of the split's indices, reshuffled every epoch. Each process reads
only its own rows, so P processes together read every record exactly once
per epoch, and batch s is a pure function of (seed, split, s): the trainer's
checkpointed `next_step` is the whole iterator state, and a resumed run sees
exactly the batches an uninterrupted one would have.
"""
import grain
import tensorflow_datasets as tfds

from mmjax.data import builders
from mmjax.data import synthetic


class TfdsScenes(synthetic.ShapeScenes):
  """`synthetic.ShapeScenes`, read from its tfds build (made on first use in data_dir)."""

  def __init__(self, batch_size: int, seq_len: int | None, image_size: int, image_tokens: int,
               *, data_dir: str | None = None, train_size: int = 50_000, **kwargs):
    super().__init__(batch_size, seq_len, image_size, image_tokens, **kwargs)
    builder = builders.MmjaxShapeScenes(
        config=builders.ShapeScenesConfig(image_size=image_size, max_shapes=self.max_shapes,
                                          train_size=train_size, seed=self.seed),
        data_dir=data_dir or None, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    builder.download_and_prepare()
    self.records = builder.as_data_source(split=self.split)
    self.order = grain.MapDataset.range(len(self.records)).shuffle(seed=self.seed).repeat()

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
    return {"image": builders.decode_image(record["images"][0]), **text}

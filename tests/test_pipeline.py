"""The tfds-backed scenes: built without TensorFlow, read by index, resumable, split by process."""
import numpy as np
import pytest

from mmjax.data import builders
from mmjax.data import pipeline
from mmjax.data import synthetic

SIZE = 96  # training scenes in these tests


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  pipeline.TfdsScenes(8, None, 32, 4, data_dir=directory, train_size=SIZE)  # builds once
  return directory


def source(data_dir, **kwargs):
  return pipeline.TfdsScenes(kwargs.pop("batch_size", 8), None, 32, 4, data_dir=data_dir,
                             train_size=SIZE, **kwargs)


def test_records_are_the_generated_scenes(data_dir):
  records = source(data_dir).records
  assert len(records) == SIZE
  ids = sorted(int(records[i]["id"].decode().split("/")[1]) for i in range(SIZE))
  assert ids == list(range(SIZE))
  for index in (0, 17, SIZE - 1):
    record = records[index]
    i = int(record["id"].decode().split("/")[1])
    rng = np.random.default_rng((0, builders.SPLIT_SEEDS["train"], i))
    image, shapes = synthetic.draw_scene(rng, 32, int(rng.integers(1, 4)))
    kind, question, answer = synthetic.ask(rng, shapes)
    np.testing.assert_allclose(builders.decode_image(record["images"][0]), image, atol=0.5 / 255)
    assert record["question"].decode() == question and record["answer"].decode() == answer
    assert record["type"].decode() == kind
    assert record["caption"].decode() == synthetic.caption(shapes)


def test_batches_are_a_function_of_the_step_so_resuming_repeats_nothing(data_dir):
  first = source(data_dir)
  seen = [first.batch(step) for step in range(5)]
  resumed = source(data_dir)  # a fresh reader, as after a restart: continue from step 3
  for step in (3, 4):
    for key, value in seen[step].items():
      np.testing.assert_array_equal(resumed.batch(step)[key], value)
  assert not np.array_equal(seen[0]["images"], seen[1]["images"])


def test_processes_cover_every_record_once_per_epoch(data_dir):
  readers = [source(data_dir, process_index=p, process_count=2) for p in range(2)]
  steps = SIZE // 8  # one epoch of global batches of 8
  epoch = [r.record_index(step, row) for step in range(steps) for reader in readers
           for row, _ in reader.rows(step) for r in [reader]]
  assert sorted(epoch) == list(range(SIZE))
  # Each process reads its own half of every global batch.
  whole = source(data_dir).batch(2)
  halves = [r.batch(2) for r in readers]
  np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), whole["tokens"])
  # The next epoch is another order of the same records.
  second = [readers[0].record_index(steps + s, 0) for s in range(steps)]
  first = [readers[0].record_index(s, 0) for s in range(steps)]
  assert second != first


def test_layout_matches_the_in_memory_source(data_dir):
  tfds_source = source(data_dir, task="vqa")
  batch, examples = tfds_source.batch(1), tfds_source.examples(1)
  tokenizer = tfds_source.tokenizer
  for b, example in enumerate(examples):
    prompt = [tokenizer.bos_id] + [tokenizer.image_id] * 4 + tokenizer.encode(
        example["question"] + " ")
    assert example["prompt"] == prompt
    answer = tokenizer.encode(example["answer"]) + [tokenizer.eos_id]
    n = len(prompt)
    np.testing.assert_array_equal(batch["targets"][b, n - 1:n - 1 + len(answer)], answer)
    assert batch["loss_weights"][b].sum() == len(answer)
  assert "ArrayRecordDataSource(name=mmjax_shape_scenes, split='train'" in repr(tfds_source)
  assert "0x" not in repr(tfds_source)  # stable: no memory addresses


def test_trainer_reads_tfds_scenes(tmp_path, data_dir, run_train):
  rows = run_train(tmp_path, "early_fusion.py:tiny", {
      "data.name": "tfds_scenes", "data.data_dir": data_dir, "data.train_size": SIZE,
      "data.max_shapes": 3, "total_steps": 4, "log_every": 2, "eval_every": 0})
  assert [r["step"] for r in rows] == [2, 4] and np.isfinite(rows[-1]["loss"])

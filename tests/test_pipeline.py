"""tfds-backed sources: built without TensorFlow, read by index, resumable, split by process."""
import itertools
import json
import logging
import pathlib

import numpy as np
from PIL import Image
import pytest

from mmjax.data import anyres
from mmjax.data import base
from mmjax.data import builders
from mmjax.data import images
from mmjax.data import patches
from mmjax.data import pipeline
from mmjax.data import synthetic
from mmjax.models import early_fusion

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
    rng = np.random.default_rng((0, base.SPLITS["train"], i))
    image, shapes = synthetic.draw_scene(rng, 32, int(rng.integers(1, 4)))
    kind, question, answer = synthetic.ask(rng, shapes)
    np.testing.assert_allclose(images.from_bytes(record["images"][0]), image, atol=0.5 / 255)
    assert record["question"].decode() == question and record["answer"].decode() == answer
    assert record["type"].decode() == kind
    assert record["caption"].decode() == synthetic.caption(shapes)


def test_a_build_finished_by_another_process_is_read(tmp_path):
  # Two hosts (or runs) that build the same dataset at once: the one that finishes second finds
  # the other's complete copy where it meant to rename its own, and reads that copy.
  config = builders.ShapeScenesConfig(image_size=16, max_shapes=1, train_size=6, eval_size=2)
  late = pipeline.arrayrecord(builders.MmjaxShapeScenes, config, str(tmp_path))
  build = late._download_and_prepare  # pylint: disable=protected-access

  def overtaken(*args, **kwargs):
    pipeline.arrayrecord(builders.MmjaxShapeScenes, config, str(tmp_path)).download_and_prepare()
    return build(*args, **kwargs)

  late._download_and_prepare = overtaken  # pylint: disable=protected-access
  records, order = pipeline.open_split(late, "train", seed=0)
  assert len(records) == 6 and sorted(int(order[i]) for i in range(6)) == list(range(6))


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


# ----------------------------------------------------------------------------
# LLaVA folders.
# ----------------------------------------------------------------------------


def write_llava(root, long_answer_bytes=200, two_images=False):
  """A LLaVA folder with good, greyscale, RGBA, missing, corrupt and malformed examples (and
  with two_images, "two": the RGB and the greyscale image in one question)."""
  (root / "img").mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((20, 10, 3), [200, 100, 50], np.uint8)).save(root / "img" / "rgb.png")
  Image.fromarray(np.full((8, 8), 90, np.uint8), "L").save(root / "img" / "grey.png")
  Image.fromarray(np.full((8, 8, 4), [10, 20, 30, 0], np.uint8), "RGBA").save(
      root / "img" / "rgba.png")
  good = (root / "img" / "rgb.png").read_bytes()
  (root / "img" / "corrupt.png").write_bytes(good[:len(good) // 2])

  def conv(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

  entries = [
      {"id": "rgb", "image": "rgb.png", "conversations": conv("<image>\nWhat colour?", "Orange.")},
      {"id": "grey", "image": "grey.png", "conversations": conv("<image>\nAnd this?", "Grey.")},
      {"id": "rgba", "image": "rgba.png", "conversations": conv("<image>\nThis?", "Blue.")},
      {"id": "text", "conversations": conv("Hi", "Hello.") + conv("More?", "No.")},
      {"id": "long", "image": "rgb.png", "conversations": conv("<image>", "x" * long_answer_bytes)},
      {"id": "missing", "image": "nope.png", "conversations": conv("<image>", "?")},
      {"id": "corrupt", "image": "corrupt.png", "conversations": conv("<image>", "?")},
      {"id": "empty", "image": "rgb.png", "conversations": []},
      {"id": "order", "conversations": [{"from": "gpt", "value": "first"}]},
      # Its id hashes lowest: the one example held out for validation.
      {"id": "held-0", "conversations": conv("Held out?", "Yes.")},
  ]
  if two_images:
    entries.append({"id": "two", "image": ["rgb.png", "grey.png"],
                    "conversations": conv("<image><image>Same?", "No.")})
  (root / "llava.json").write_text(json.dumps(entries))
  return str(root / "llava.json"), str(root / "img")


def llava_source(tmp_path, seq_len=64, **kwargs):
  json_path, image_dir = write_llava(tmp_path / "llava")
  return pipeline.LlavaConversations(
      4, seq_len, json_path=json_path, image_dir=image_dir, image_size=4, image_tokens=2,
      image_token_id=258, data_dir=str(tmp_path / "tfds"), **kwargs)


def test_llava_skips_bad_examples_and_converts_images(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    source = llava_source(tmp_path)
  records = {source.records[i]["id"].decode(): source.records[i]
             for i in range(len(source.records))}
  assert sorted(records) == ["grey", "long", "rgb", "rgba", "text"]
  validation = llava_source(tmp_path, split="validation").records
  assert len(validation) == 1 and validation[0]["id"] == b"held-0"
  warning = " ".join(r.getMessage() for r in caplog.records)
  for why, example in [("missing image file", "missing"), ("unreadable image", "corrupt"),
                       ("empty conversation", "empty"), ("not alternating", "order")]:
    assert f"1 with {why}" in warning or f"1 with turns {why}" in warning, warning
    assert f"'{example}'" in warning
  grey = images.from_bytes(records["grey"]["images"][0], 4)
  np.testing.assert_allclose(grey, 90 / 255, atol=1e-6)  # L -> RGB, all three channels
  rgba = images.from_bytes(records["rgba"]["images"][0])
  np.testing.assert_allclose(rgba[0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)


def test_llava_entries_that_are_not_objects_or_lack_values_are_skipped(tmp_path, caplog):
  json_path, image_dir = write_llava(tmp_path / "llava")
  entries = json.loads(pathlib.Path(json_path).read_text())
  entries += ["a string", 17, {"id": "novalue", "conversations": [
      {"from": "human", "value": "Hi"}, {"from": "gpt"}]},
      {"id": "twotags", "image": "rgb.png", "conversations": [
          {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "?"}]},
      {"id": "notag", "image": "rgb.png", "conversations": [
          {"from": "human", "value": "What?"}, {"from": "gpt", "value": "?"}]}]
  pathlib.Path(json_path).write_text(json.dumps(entries))
  with caplog.at_level(logging.WARNING):
    source = pipeline.LlavaConversations(4, 64, json_path=json_path, image_dir=image_dir,
                                         image_size=4, image_tokens=2, image_token_id=258,
                                         data_dir=str(tmp_path / "tfds"))
  assert sorted(records_ids(source)) == ["grey", "long", "rgb", "rgba", "text"]
  assert "2 with an entry that is not a JSON object (first: ['#10', '#11'])" in caplog.text
  assert "1 with a turn without a \"value\" string (first: ['novalue'])" in caplog.text
  assert ("2 with a number of <image> tags other than of images (first: ['twotags', 'notag'])"
          in caplog.text)


def test_an_edited_source_is_converted_again(tmp_path):
  # The conversion is keyed by what it read: an answer edited in place (same length, same
  # file name) is seen by the next run, not served from the earlier conversion.
  json_path, image_dir = write_llava(tmp_path / "llava")
  read = lambda: {i: json.loads(r["conversation"])[1]["value"] for i, r in records_of(
      pipeline.LlavaConversations(4, 64, json_path=json_path, image_dir=image_dir,
                                  image_size=4, image_tokens=2, image_token_id=258,
                                  data_dir=str(tmp_path / "tfds"))).items()}
  assert read()["rgb"] == "Orange."
  path = pathlib.Path(json_path)
  path.write_text(path.read_text().replace("Orange.", "Yellow"))
  assert read()["rgb"] == "Yellow"


def test_llava_examples_with_more_images_than_slots_are_skipped(tmp_path, caplog):
  json_path, image_dir = write_llava(tmp_path / "llava", two_images=True)
  kwargs = dict(json_path=json_path, image_dir=image_dir, image_size=4, image_tokens=2,
                image_token_id=258, data_dir=str(tmp_path / "tfds"))
  one = pipeline.LlavaConversations(4, 64, max_images=1, **kwargs)
  two = pipeline.LlavaConversations(4, 64, max_images=2, **kwargs)
  rows = lambda source: [source.batch(s) for s in range(2)]  # the first epoch, 6 records
  with caplog.at_level(logging.WARNING):
    one_rows = rows(one)
  assert one.counts["more images than data.max_images"] == 1
  assert "example two more images than data.max_images" in caplog.text
  placeholders = lambda batches: sum(int((b["tokens"] == 258).sum()) for b in batches)
  # With two slots the example trains, its 4 placeholders with it; with one it is left out.
  assert placeholders(rows(two)) == placeholders(one_rows) + 4


def records_of(source) -> dict:
  return {source.records[i]["id"].decode(): source.records[i] for i in range(len(source.records))}


def records_ids(source) -> list[str]:
  return list(records_of(source))


def test_llava_batch_layout(tmp_path):
  source = llava_source(tmp_path, seq_len=64)
  text = lambda s: list(s.encode())
  for position in range(5):  # the first epoch: batches of 4 in the shuffled order
    batch, row = source.batch(position // 4), position % 4
    name = source.records[int(source.order[position])]["id"].decode()
    if name == "rgb":
      expected = ([256] + text("USER: ") + [258, 258] + text("\nWhat colour? ASSISTANT:")
                  + text(" Orange.") + [257])
      np.testing.assert_array_equal(batch["tokens"][row, :len(expected)], expected)
      np.testing.assert_array_equal(batch["tokens"][row, len(expected):], 0)
      weighted = batch["targets"][row][batch["loss_weights"][row] > 0]
      np.testing.assert_array_equal(weighted, text(" Orange.") + [257])
      np.testing.assert_allclose(batch["images"][row, 0],
                                 np.broadcast_to(np.array([200, 100, 50]) / 255, (4, 4, 3)),
                                 atol=1e-6)
    if name == "text":
      np.testing.assert_array_equal(batch["images"][row], 0)  # no image: an empty slot
      weighted = batch["targets"][row][batch["loss_weights"][row] > 0]
      np.testing.assert_array_equal(weighted, text(" Hello.") + [257] + text(" No.") + [257])
    if name == "long":
      assert batch["loss_weights"][row, -1] == 1  # cut off mid-answer, still trained on
  assert source.counts["truncated to data.seq_len"] >= 1  # "long", counted


def test_llava_anyres_cuts_each_image_at_its_own_size(tmp_path):
  # LLaVA-NeXT training data: 8 px tiles of 2 x 2 patches. The 20 x 10 px "rgb" image fits the
  # 16 x 8 pinpoint best (a 2 x 1 grid: 4 x 2 patches, nothing to unpad): 4 base-tile tokens,
  # then 4 rows of 2 patches and a newline: 16 placeholders. The 8 x 8 images fit 8 x 16 and
  # 16 x 8 equally, keep the first (1 x 2 tiles: 2 x 4 patches), and are unpadded to 2 x 2:
  # 4 + 2 * 3 = 10.
  json_path, image_dir = write_llava(tmp_path / "llava", two_images=True)
  layout = anyres.Layout(((8, 16), (16, 8), (16, 16)), tile=8, patch=4, max_images=2)
  source = pipeline.LlavaConversations(
      4, 64, json_path=json_path, image_dir=image_dir, image_size=8,
      image_tokens=layout.max_tokens, image_token_id=258, max_images=2, layout=layout,
      data_dir=str(tmp_path / "tfds"))
  assert layout.max_tokens == 4 + 4 * (4 + 1)  # the 16 x 16 grid's 4 rows of 4 and a newline
  text = lambda s: list(s.encode())
  counts = {"rgb": [16], "grey": [10], "rgba": [10], "text": [], "two": [16, 10]}
  seen = set()
  for position in range(6):  # the first epoch
    batch, row = source.batch(position // 4), position % 4
    record = source.records[int(source.order[position])]
    name = record["id"].decode()
    if name == "long":
      continue
    seen.add(name)
    placeholders = (batch["tokens"][row] == 258).sum()
    present = (batch["image_sources"][row] != early_fusion.PAD).sum(axis=1)
    assert placeholders == sum(counts[name]) and list(present[:len(counts[name])]) == counts[name]
    assert not present[len(counts[name]):].any()
    for i, data in enumerate(record["images"]):  # tiles as LLaVA-NeXT's processor cuts them
      pixels = np.round(images.from_bytes(data) * 255).astype(np.uint8)
      tiles = anyres.tiles(pixels, layout.pinpoints, 8)
      np.testing.assert_allclose(batch["images"][row, i, :len(tiles)], tiles, atol=1e-6)
      assert not batch["images"][row, i, len(tiles):].any()
    if name == "rgb":
      expected = ([256] + text("USER: ") + [258] * 16 + text("\nWhat colour? ASSISTANT:")
                  + text(" Orange.") + [257])
      np.testing.assert_array_equal(batch["tokens"][row, :len(expected)], expected)
  assert seen == set(counts)
  # Held out: the evaluator's prompts carry the same per-image placeholders.
  validation = pipeline.LlavaConversations(
      4, 64, json_path=json_path, image_dir=image_dir, image_size=8,
      image_tokens=layout.max_tokens, image_token_id=258, max_images=2, layout=layout,
      data_dir=str(tmp_path / "tfds"), split="validation")
  assert validation.examples(0)[0]["image"] == []  # "held-0" has no image


def test_llava_at_native_resolution_packs_rows_by_tokens_and_patch_slots(tmp_path, caplog):
  # Deep fusion at native resolution (data.max_patches=8, pack=2, max_images=2): each image
  # keeps its aspect ratio within its share of a row, 8 / 2 = 4 patches of 2 px. The 20 x 10
  # px "rgb" (10 x 5 patches) shrinks to 2 x 1; the 8 x 8 px images (4 x 4) to 2 x 2. A row
  # packs two examples unless the second's tokens or patches no longer fit.
  json_path, image_dir = write_llava(tmp_path / "llava", two_images=True)
  layout = patches.Layout(patch=2, slots=8, max_images=2 * 2, cls=False)
  source = pipeline.LlavaConversations(
      4, 128, json_path=json_path, image_dir=image_dir, image_size=4, image_tokens=1,
      image_token_id=258, max_images=2, pack=2, layout=layout, data_dir=str(tmp_path / "tfds"))
  colours = {"rgb": [200, 100, 50], "grey": [90] * 3, "rgba": [10, 20, 30]}
  grids = {"rgb": (2, 1), "grey": (2, 2), "rgba": (2, 2)}
  files = {"rgb": ["rgb"], "long": ["rgb"], "grey": ["grey"], "rgba": ["rgba"], "text": [],
           "two": ["rgb", "grey"]}  # each example's images, in order
  kept = 0
  with caplog.at_level(logging.WARNING):
    batches = [source.batch(step) for step in range(3)]
  for step, row in itertools.product(range(3), range(4)):
    batch = batches[step]
    assert batch["patches"].shape == (4, 8, 12) and batch["image_grids"].shape == (4, 4, 2)
    names = [source.record((step * 4 + row) * 2 + k)["id"].decode() for k in range(2)]
    segments = sorted(set(batch["segment_ids"][row]) - {0})
    kept += len(segments)
    # The row's examples in order (the second only if it fit), each image with its own grid
    # and colour, one marker each.
    expected = [image for name in names[:len(segments)] for image in files[name]]
    assert (batch["tokens"][row] == 258).sum() == len(expected)
    for i, name in enumerate(expected):
      assert tuple(batch["image_grids"][row, i]) == grids[name]
      pixels = patches.unpack(batch, row, i)
      np.testing.assert_allclose(pixels, np.broadcast_to(np.array(colours[name]) / 255,
                                                         pixels.shape), atol=1e-6)
    assert (batch["patch_images"][row] > 0).sum() <= 8
  dropped = sum(n for why, n in source.counts.items() if why.startswith("dropped"))
  assert kept + dropped == 3 * 8  # every record trains or is counted
  assert "patch slots are full" in caplog.text  # e.g. "two" (6 patches) before a 2 x 2 image


def test_llava_errors_name_the_thing(tmp_path):
  with pytest.raises(FileNotFoundError, match="LLaVA JSON .*absent.json does not exist"):
    pipeline.LlavaConversations(4, 32, json_path=str(tmp_path / "absent.json"),
                                image_dir=str(tmp_path), image_size=4, image_tokens=1,
                                image_token_id=258, data_dir=str(tmp_path / "tfds"))


@pytest.mark.parametrize("config,overrides", [
    ("early_fusion.py:tiny", {"data.seq_len": 96}),
    # LLaVA-NeXT: each image cut into AnyRes tiles at its own size (up to 88 placeholders).
    ("early_fusion.py:tiny-anyres", {"data.seq_len": 150, "data.scene_sizes": "fixed"}),
    # Deep fusion at native resolution: two examples a row, their images in 32 patch slots.
    ("deep_fusion.py:tiny", {"data.seq_len": 96, "data.max_patches": 32, "data.pack": 2})])
def test_trainer_reads_a_llava_folder(tmp_path, run_train, config, overrides):
  json_path, image_dir = write_llava(tmp_path / "llava")
  rows = run_train(tmp_path / "run", config, {
      "data.name": "llava", "data.json": json_path, "data.image_dir": image_dir,
      "data.data_dir": str(tmp_path / "tfds"), "batch_size": 4,
      "total_steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1, **overrides})
  assert [r["step"] for r in rows] == [2, 4] and np.isfinite(rows[-1]["loss"])
  # Held-out conversations are answered and scored, not only given a loss: the one held-out
  # example ("held-0"), four times over a batch of 4, each against its own first answer.
  assert 0 <= rows[-1]["vqa/accuracy"] <= 1 and "eval_loss" in rows[-1]
  samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text()
             .splitlines()]
  assert {s["truth"] for s in samples} == {"Yes."} and len(samples) == 4
  assert all(s["prompt"] == "USER: Held out? ASSISTANT:" for s in samples)


def test_llava_held_out_prompts_end_where_the_answer_starts(tmp_path):
  source = llava_source(tmp_path, split="validation")
  (example,) = {e["question"]: e for e in source.examples(0)}.values()  # one example, 4 rows
  assert example["question"] == "Held out?" and example["answer"] == "Yes."
  assert example["prompt"] == [256] + list(b"USER: Held out? ASSISTANT:")
  assert example["image"].shape == (1, 4, 4, 3) and example["type"] == "conversation"

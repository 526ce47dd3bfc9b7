"""User data converted once by tfds: COCO captions, class folders, text files, any prepared
tfds dataset by name; packing; pixel normalisation."""
import io
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import lm as lm_config
from configs import vit as vit_config
from mmjax import trainer
from mmjax.data import anyres
from mmjax.data import images
from mmjax.data import patches
from mmjax.data import pipeline
from mmjax.data import sources
from mmjax.data import synthetic
from mmjax.models import deep_fusion
from mmjax.models import lm

BOS, EOS, IMAGE = 256, 257, 258


def text(s: str) -> list[int]:
  return list(s.encode())


def save(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def records_by_id(source) -> dict:
  return {source.records[i]["id"].decode(): source.records[i] for i in range(len(source.records))}


# ----------------------------------------------------------------------------
# COCO-style captions.
# ----------------------------------------------------------------------------


def write_coco(root):
  save(root / "img" / "red.png", np.full((6, 6, 3), [255, 0, 0]))
  save(root / "img" / "grey.png", np.full((6, 6), 128), "L")
  save(root / "img" / "blue.png", np.full((6, 6, 3), [0, 0, 255]))
  (root / "img" / "bad.png").write_bytes(b"not a png")
  # Image 4 has the lowest id hash: the one held out for validation.
  files = {1: "red.png", 4: "grey.png", 3: "blue.png", 2: "bad.png", 5: "gone.png", 6: "red.png"}
  captions = [(1, "a red square"), (1, "all red"), (4, "grey"), (3, "blue"), (2, "?"), (5, "?")]
  (root / "captions.json").write_text(json.dumps({
      "images": [{"id": i, "file_name": f} for i, f in files.items()],
      "annotations": [{"id": n, "image_id": i, "caption": c}
                      for n, (i, c) in enumerate(captions)]}))
  return str(root / "captions.json"), str(root / "img")


def coco(tmp_path, split="train", image_tokens=2, **kwargs):
  json_path, image_dir = write_coco(tmp_path / "coco")
  return pipeline.CocoCaptions(2, 24, json_path=json_path, image_dir=image_dir, image_size=4,
                               image_tokens=image_tokens, image_token_id=IMAGE, split=split,
                               data_dir=str(tmp_path / "tfds"), **kwargs)


def test_coco_captions_convert_skip_and_lay_out(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    train = coco(tmp_path)
  validation = coco(tmp_path, split="validation")
  records = {**records_by_id(train), **records_by_id(validation)}
  assert sorted(records) == ["1", "3", "4"] and len(validation.records) == 1
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert "1 with unreadable image (first: ['2'])" in warning
  assert "1 with missing image file (first: ['5'])" in warning
  assert "1 with no caption (first: ['6'])" in warning
  # Every row: BOS, 2 placeholders, one of its captions, EOS; the loss on caption and EOS.
  drawn = set()
  for step in range(12):
    batch = train.batch(step)
    for row in range(2):
      record = train.record(step * 2 + row)
      caption = [c.decode() for c in record["captions"]]
      ids = [int(t) for t in batch["tokens"][row]]
      said = bytes(ids[3:ids.index(EOS)]).decode()
      assert said in caption, (said, caption)
      expected = [BOS, IMAGE, IMAGE] + text(said) + [EOS]
      np.testing.assert_array_equal(ids, expected + [0] * (24 - len(expected)))
      np.testing.assert_array_equal(batch["targets"][row][batch["loss_weights"][row] > 0],
                                    text(said) + [EOS])
      drawn.add(said)
      colour = {"1": [1, 0, 0], "4": [128 / 255] * 3, "3": [0, 0, 1]}[record["id"].decode()]
      np.testing.assert_allclose(batch["images"][row, 0], np.broadcast_to(colour, (4, 4, 3)),
                                 atol=1e-6)
  assert {"a red square", "all red"} <= drawn  # each epoch draws again among the captions
  example = validation.examples(0)[0]
  assert example["prompt"] == [BOS, IMAGE, IMAGE] and example["type"] == "caption"
  assert example["references"] == [c.decode() for c in validation.records[0]["captions"]]


def test_coco_anyres_prompts_hold_each_images_tokens(tmp_path):
  # LLaVA-NeXT captioning: 4 px tiles of 2 x 2 patches. A 6 x 6 px image keeps the most pixels
  # in the 8 x 8 pinpoint (2 x 2 tiles, 4 x 4 patches, nothing to unpad): the base tile's 4
  # tokens, then 4 rows of 4 patches and a newline: 24 placeholders.
  layout = anyres.Layout(((4, 8), (8, 4), (8, 8)), tile=4, patch=2)
  json_path, image_dir = write_coco(tmp_path / "coco")
  train, validation = (pipeline.CocoCaptions(
      2, 40, json_path=json_path, image_dir=image_dir, image_size=4,
      image_tokens=layout.max_tokens, image_token_id=IMAGE, split=split, layout=layout,
      data_dir=str(tmp_path / "tfds")) for split in ("train", "validation"))
  assert validation.longest_prompt() == 1 + 4 + 4 * (4 + 1)  # the largest grid's, 8 x 8 px
  batch = train.batch(0)
  for row in range(2):
    ids = [int(t) for t in batch["tokens"][row]]
    assert ids[:25] == [BOS] + [IMAGE] * 24 and IMAGE not in ids[25:]
    record = train.record(row)
    pixels = np.round(images.from_bytes(record["images"][0]) * 255).astype(np.uint8)
    np.testing.assert_allclose(batch["images"][row, 0], anyres.tiles(pixels, layout.pinpoints, 4),
                               atol=1e-6)
    np.testing.assert_array_equal(batch["image_sources"][row, 0],
                                  anyres.token_sources((6, 6), layout.pinpoints, 4, 2))
  example = validation.examples(0)[0]
  assert example["prompt"] == [BOS] + [IMAGE] * 24 and len(example["image"]) == 1


def test_coco_at_native_resolution_for_deep_fusion(tmp_path):
  # data.max_patches=4 with 2 px patches: a 6 x 6 px image (3 x 3 patches) shrinks to 2 x 2,
  # one marker in the text; its colour survives the resize.
  layout = patches.Layout(patch=2, slots=4, max_images=1, cls=False)
  train = coco(tmp_path, layout=layout, image_tokens=1)
  batch = train.batch(0)
  assert batch["patches"].shape == (2, 4, 12) and batch["segment_ids"].shape == (2, 24)
  for row in range(2):
    record = train.record(row)
    assert list(batch["tokens"][row, :2]) == [BOS, IMAGE] and (batch["tokens"][row] == IMAGE
                                                               ).sum() == 1
    assert tuple(batch["image_grids"][row, 0]) == (2, 2)
    colour = {"1": [1, 0, 0], "4": [128 / 255] * 3, "3": [0, 0, 1]}[record["id"].decode()]
    np.testing.assert_allclose(patches.unpack(batch, row, 0),
                               np.broadcast_to(colour, (4, 4, 3)), atol=1e-6)


def test_coco_with_its_own_validation_file(tmp_path):
  # captions_train2017.json and captions_val2017.json in one run: every training image trains
  # (nothing held out by hash), and validation reads the other file's images.
  json_path, image_dir = write_coco(tmp_path / "coco")
  save(tmp_path / "val" / "green.png", np.full((6, 6, 3), [0, 255, 0]))
  (tmp_path / "val.json").write_text(json.dumps({
      "images": [{"id": 9, "file_name": "green.png"}],
      "annotations": [{"id": 0, "image_id": 9, "caption": "green"}]}))
  kwargs = dict(json_path=json_path, image_dir=image_dir, image_size=4, image_tokens=2,
                image_token_id=IMAGE, data_dir=str(tmp_path / "tfds"),
                val_json=str(tmp_path / "val.json"), val_image_dir=str(tmp_path / "val"))
  train = pipeline.CocoCaptions(2, 24, **kwargs)
  validation = pipeline.CocoCaptions(2, 24, split="validation", **kwargs)
  assert sorted(records_by_id(train)) == ["1", "3", "4"]
  assert sorted(records_by_id(validation)) == ["9"]
  assert validation.examples(0)[0]["references"] == ["green"]


def test_coco_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match="bad.json needs top-level \"images\" and \"annotations\""):
    pipeline.CocoCaptions(2, 24, json_path=str(bad), image_dir=str(tmp_path), image_size=4,
                          image_tokens=1, image_token_id=IMAGE, data_dir=str(tmp_path / "t"))


# ----------------------------------------------------------------------------
# Image-classification folders.
# ----------------------------------------------------------------------------


def test_image_folder_classes_splits_and_pixels(tmp_path, caplog):
  root = tmp_path / "classes"
  colours = {"cat": [255, 0, 0], "dog": [0, 255, 0], "emu": [0, 0, 255]}
  for name, colour in colours.items():
    for n in range(4):
      save(root / name / f"{n}.png", np.full((5, 7, 3), colour))
  save(root / "dog" / "grey.png", np.full((5, 5), 0), "L")  # greyscale -> RGB black
  (root / "emu" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
  with caplog.at_level(logging.WARNING):
    records, order, classes = pipeline.image_folder(str(root), "train", 0, str(tmp_path / "t"))
  held, _, _ = pipeline.image_folder(str(root), "validation", 0, str(tmp_path / "t"))
  assert classes == 3 and len(records) + len(held) == 13  # 12 colours + grey, not the broken
  assert "1 with unreadable image (first: ['emu/broken.jpg'])" in caplog.text
  source = pipeline.ImageClasses(4, 3, records, order, classes)
  for step in range(3):
    batch = source.batch(step)
    for row in range(4):
      record = source.records[int(source.order[step * 4 + row])]
      name = record["id"].decode().split("/")[0]
      assert batch["labels"][row] == sorted(colours).index(name) == record["label"]
      colour = [0, 0, 0] if record["id"] == b"dog/grey.png" else colours[name]
      np.testing.assert_allclose(batch["images"][row], np.broadcast_to(np.divide(colour, 255),
                                                                       (3, 3, 3)), atol=1e-6)


def test_image_folder_with_train_and_val_folders(tmp_path):
  for split, count in (("train", 3), ("val", 2)):
    for name in ("a", "b"):
      for n in range(count):
        save(tmp_path / "root" / split / name / f"{n}.png", np.zeros((4, 4, 3)))
  sizes = [len(pipeline.image_folder(str(tmp_path / "root"), split, 0, str(tmp_path / "t"))[0])
           for split in ("train", "validation")]
  assert sizes == [6, 4]
  with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
    pipeline.image_folder(str(tmp_path / "nowhere"), "train", 0, str(tmp_path / "t"))


# ----------------------------------------------------------------------------
# Text files, packing.
# ----------------------------------------------------------------------------


def write_text(root):
  root.mkdir(parents=True, exist_ok=True)
  (root / "a.txt").write_text("one fish\n\ntwo fish\n\n\n  \n\nred fish")
  (root / "b.jsonl").write_text("\n".join([json.dumps({"text": "blue fish"}), "{not json",
                                           json.dumps({"body": "no text key"}),
                                           json.dumps({"text": "x" * 40})]))
  (root / "c.txt").write_bytes(b"\xff\xfe bad bytes")
  return f"{root}/*.txt,{root}/*.jsonl"


def test_text_files_convert_and_skip(tmp_path, caplog):
  files = write_text(tmp_path / "corpus")
  with caplog.at_level(logging.WARNING):
    train = pipeline.text_files(files, "text", "train", 0, str(tmp_path / "t"))[0]
  validation = pipeline.text_files(files, "text", "validation", 0, str(tmp_path / "t"))[0]
  documents = {r["id"].decode(): r["text"].decode() for records in (train, validation)
               for r in (records[i] for i in range(len(records)))}
  assert documents == {"a.txt:1": "one fish", "a.txt:2": "two fish", "a.txt:3": "red fish",
                       "b.jsonl:1": "blue fish", "b.jsonl:4": "x" * 40}
  for why, where in [("a line that is not a JSON object", "b.jsonl:2"),
                     ("no 'text' text", "b.jsonl:3"), ("text that is not UTF-8", "c.txt")]:
    assert f"1 with {why} (first: ['{where}'])" in caplog.text


def test_text_files_of_the_same_name_in_two_folders_stay_apart(tmp_path):
  for folder, words in (("a", "one fish\n\ntwo fish"), ("b", "red fish\n\nblue fish")):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "x.txt").write_text(words)
  files = f"{tmp_path}/a/*.txt,{tmp_path}/b/*.txt"
  texts = {r["id"].decode(): r["text"].decode()
           for split in ("train", "validation")
           for records in [pipeline.text_files(files, "text", split, 0, str(tmp_path / "t"))[0]]
           for r in (records[i] for i in range(len(records)))}
  assert texts == {"a/x.txt:1": "one fish", "a/x.txt:2": "two fish", "b/x.txt:1": "red fish",
                   "b/x.txt:2": "blue fish"}


def test_truncation_never_cuts_an_image_in_two():
  # A cut through an image's placeholders drops that image whole, pixels and all: no
  # placeholder is left to read the next packed example's image.
  source = pipeline.Documents(1, 4, *documents(["x"]))
  source.image_ids = [IMAGE, IMAGE]
  pixels = [np.zeros((2, 2, 3)), np.ones((2, 2, 3))]
  example = pipeline.Example("e", [BOS, IMAGE, IMAGE, 5, IMAGE, IMAGE, 6], [0] * 6 + [1], pixels)
  cut = source._truncate(example, 5)  # pylint: disable=protected-access
  assert cut.ids == [BOS, IMAGE, IMAGE, 5] and cut.loss == [0] * 4 and len(cut.images) == 1
  whole = source._truncate(example, 6)  # pylint: disable=protected-access
  assert whole.ids == [BOS, IMAGE, IMAGE, 5, IMAGE, IMAGE] and len(whole.images) == 2


def documents(texts: list[str]):
  """An in-memory stand-in for a tfds split: records by index, in the given order."""
  records = [{"id": f"doc{i}".encode(), "text": t.encode()} for i, t in enumerate(texts)]
  return records, np.arange(10 * len(texts))


def test_packing_layout_by_hand(caplog):
  records, order = documents(["ab", "cde", "f", "ghijklmnop", "q", "rs"])
  source = pipeline.Documents(1, 12, records, order, pack=3)
  # Row 0 packs "ab", "cde", "f": each BOS text EOS, its own segment, positions from 0.
  batch = source.batch(0)
  row = [BOS] + text("ab") + [EOS, BOS] + text("cde") + [EOS, BOS] + text("f") + [EOS]
  np.testing.assert_array_equal(batch["tokens"][0], row)
  np.testing.assert_array_equal(batch["targets"][0], row[1:] + [0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 4 + [2] * 5 + [3] * 3)
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2])
  # No loss on a target that starts the next example (its BOS), nor on padding.
  np.testing.assert_array_equal(batch["loss_weights"][0], [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0])
  # Row 1: "ghijklmnop" takes 12 of 13 slots; "q" and "rs" no longer fit: dropped, counted.
  with caplog.at_level(logging.WARNING):
    batch = source.batch(1)
  np.testing.assert_array_equal(batch["tokens"][0], [BOS] + text("ghijklmnop") + [EOS])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 12)
  dropped = "dropped from a full packed row (lower data.pack or raise data.seq_len)"
  assert source.counts[dropped] == 2
  assert "example doc4 dropped" in caplog.text


def test_packed_examples_do_not_see_each_other():
  """Each example's logits in a packed row == its logits alone (GPT-2: learned positions)."""
  records, order = documents(["the cat", "sat on", "a mat!"])
  packed = pipeline.Documents(1, 28, records, order, pack=3).batch(0)
  alone = pipeline.Documents(3, 10, records, order).batch(0)
  model = lm.Model(variant="gpt2-tiny", vocab_size=320, max_len=32)
  params = model.init(jax.random.key(0), jnp.asarray(alone["tokens"]))["params"]
  logits, _ = model.apply({"params": params}, jnp.asarray(packed["tokens"]),
                          positions=jnp.asarray(packed["positions"]),
                          segment_ids=jnp.asarray(packed["segment_ids"]))
  expected, _ = model.apply({"params": params}, jnp.asarray(alone["tokens"]))
  start = 0
  for i in range(3):
    n = int((packed["segment_ids"][0] == i + 1).sum())
    np.testing.assert_allclose(logits[0, start:start + n], expected[i, :n], atol=2e-5)
    start += n


def test_packed_deep_fusion_examples_see_only_their_own_images(tmp_path):
  """LLaVA conversations packed two to a row: each one's logits == its logits alone."""
  root = tmp_path / "llava"
  save(root / "img" / "red.png", np.full((8, 8, 3), [255, 0, 0]))
  save(root / "img" / "blue.png", np.full((8, 8, 3), [0, 0, 255]))
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  entries = [{"id": f"e{i}", "image": f, "conversations": conv("<image>Colour?", a)}
             for i, (f, a) in enumerate([("red.png", "red"), ("blue.png", "blue")] * 3)]
  (root / "llava.json").write_text(json.dumps(entries))
  kwargs = dict(json_path=str(root / "llava.json"), image_dir=str(root / "img"), image_size=8,
                image_tokens=1, image_token_id=IMAGE, data_dir=str(tmp_path / "t"))
  packed = pipeline.LlavaConversations(1, 80, pack=2, **kwargs).batch(0)
  alone = pipeline.LlavaConversations(2, 40, **kwargs).batch(0)
  assert packed["images"].shape == (1, 2, 8, 8, 3)
  np.testing.assert_array_equal(packed["images"][0], alone["images"][:, 0])
  model = deep_fusion.Model(vit=dict(variant="mu/8", image_size=8, pool="none"),
                            lm=dict(variant="gpt2-tiny", vocab_size=320, max_len=96),
                            image_token_id=IMAGE, cross_every=1)
  params = model.init(jax.random.key(0), jnp.asarray(alone["tokens"]),
                      jnp.asarray(alone["images"]))["params"]
  # Open the gates: with them at their initial zero the images would not matter at all.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) if "gate" in jax.tree_util.keystr(path) else x, params)
  logits, _ = model.apply({"params": params}, *(jnp.asarray(packed[k]) for k in
                                                ("tokens", "images")),
                          positions=jnp.asarray(packed["positions"]),
                          segment_ids=jnp.asarray(packed["segment_ids"]))
  expected, _ = model.apply({"params": params}, jnp.asarray(alone["tokens"]),
                            jnp.asarray(alone["images"]))
  n = int((packed["segment_ids"][0] == 1).sum())
  np.testing.assert_allclose(logits[0, :n], expected[0, :n], atol=2e-5)
  m = int((packed["segment_ids"][0] == 2).sum())
  np.testing.assert_allclose(logits[0, n:n + m], expected[1, :m], atol=2e-5)
  assert not np.allclose(expected[0, :n], expected[1, :n], atol=1e-3)  # the images matter


def test_trainer_packs_text_files(tmp_path):
  config = lm_config.get_config("tiny")
  config.update_from_flattened_dict({
      "data.name": "text", "data.files": write_text(tmp_path / "corpus"), "data.pack": 2,
      "data.seq_len": 32, "data.data_dir": str(tmp_path / "t"), "batch_size": 8,
      "total_steps": 4, "log_every": 2, "eval_every": 4, "eval_steps": 1,
      "checkpoint_every": 0, "checkpoint.async_save": False})
  last = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])


# ----------------------------------------------------------------------------
# Any prepared tfds dataset by name.
# ----------------------------------------------------------------------------


class TinyDigits(tfds.core.GeneratorBasedBuilder):
  """A dataset with tfds' standard Image and ClassLabel features, like mnist or cifar10."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 1)),
        "digit": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):  # PNG bytes: encoding arrays would need TensorFlow
      png = io.BytesIO()
      Image.fromarray(np.full((5, 5), 40 * i, np.uint8), "L").save(png, "PNG")
      yield i, {"picture": png.getvalue(), "digit": i % 3}


def test_any_prepared_tfds_dataset_by_name(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds_name='tiny_digits'"):
    pipeline.named_builder("tiny_digits", str(tmp_path))
  builder = TinyDigits(data_dir=str(tmp_path), file_format=tfds.core.FileFormat.ARRAY_RECORD)
  builder.download_and_prepare()
  config = vit_config.get_config("tiny")
  config.data.update(name="tfds", tfds_name="tiny_digits", image_key="picture",
                     label_key="digit", image_size=8, data_dir=str(tmp_path),
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
  config.batch_size = 3
  trainer.validate(config, num_devices=1)
  source = sources.build(config, "validation")  # no validation split: reads "test"
  assert len(source.records) == 3 and source.num_classes == 3
  batch = source.batch(0)
  for row in range(3):
    record = source.records[int(source.order[row])]
    grey = record["picture"][0, 0, 0] / 255
    np.testing.assert_allclose(batch["images"][row], (grey - 0.5) / 0.25, atol=1e-5)
    assert batch["labels"][row] == record["digit"]


def test_pixels_are_normalised_per_channel():
  plain = synthetic.ShapeClasses(4, 16).batch(0)["images"]
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  normalised = synthetic.ShapeClasses(4, 16, image_mean=mean, image_std=std).batch(0)["images"]
  np.testing.assert_allclose(normalised, (plain - np.array(mean)) / np.array(std), atol=1e-6)


def test_data_config_errors_name_the_key():
  config = lm_config.get_config("tiny")
  config.data.name = "text"
  with pytest.raises(ValueError, match="config.data.files must be set"):
    trainer.validate(config, num_devices=1)
  config.data.name = "shapes"
  with pytest.raises(ValueError, match="config.data.name='shapes' does not feed a lm model"):
    trainer.validate(config, num_devices=1)


def test_resize_method_is_configurable(tmp_path):
  root = tmp_path / "classes"
  checker = np.indices((8, 8)).sum(axis=0) % 2 * 255  # a 1-pixel checkerboard
  for name in ("a", "b"):
    for n in range(2):
      save(root / name / f"{n}.png", np.stack([checker] * 3, axis=-1))
  records, order, classes = pipeline.image_folder(str(root), "train", 0, str(tmp_path / "t"))
  box = pipeline.ImageClasses(2, 4, records, order, classes, resize="box").batch(0)["images"]
  nearest = pipeline.ImageClasses(2, 4, records, order, classes, resize="nearest")
  np.testing.assert_allclose(box, 0.5, atol=1 / 255)  # each 2 x 2 block averages to grey
  assert set(np.unique(nearest.batch(0)["images"])) <= {0.0, 1.0}  # picks pixels
  with pytest.raises(ValueError, match="config.data.resize must be one of"):
    pipeline.ImageClasses(2, 4, records, order, classes, resize="fancy")

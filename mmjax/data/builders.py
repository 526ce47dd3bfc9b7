"""tensorflow-datasets builders, written as ArrayRecord and read by index without TensorFlow.

Images are stored as encoded bytes (PNG here; a source's own JPEG/PNG bytes
for user data) in a `Tensor(shape=(), dtype=object)` sequence rather than an
`Image` feature: building `Image` features needs TensorFlow, these need only
tfds and array_record, and reading decodes them with Pillow.
"""
import collections
import glob
import hashlib
import json
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import base
from mmjax.data import images as image_codec
from mmjax.data import synthetic

log = logging.getLogger(__name__)


class ShapeScenesConfig(tfds.core.BuilderConfig):
  """Which scenes to generate; each setting builds its own dataset directory."""

  def __init__(self, *, image_size: int = 32, max_shapes: int = 2, train_size: int = 50_000,
               eval_size: int = 2_000, seed: int = 0):
    super().__init__(name=(f"{image_size}px_{max_shapes}shapes_{train_size}_{eval_size}"
                           f"_seed{seed}"),
                     version="1.0.0",
                     description="generated shape scenes with one question and a caption each")
    self.image_size = image_size
    self.max_shapes = max_shapes
    self.train_size = train_size
    self.eval_size = eval_size
    self.seed = seed


class MmjaxShapeScenes(tfds.core.GeneratorBasedBuilder):
  """The generated scenes of `synthetic.ShapeScenes` as a tfds dataset: train, validation, test.

  Example i of a split ("id": "train/i") is drawn from np.random.default_rng((seed,
  split, i)): the same config always builds the same dataset (tfds stores the
  examples in its own shuffled order). At 32 px about 1,200 scenes a second
  build on a 2-core CPU.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),  # "train/17": example 17 of the train split
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "type": tfds.features.Text(),
        "caption": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    sizes = {"train": self.builder_config.train_size, "validation": self.builder_config.eval_size,
             "test": self.builder_config.eval_size}
    return {split: self._generate_examples(split, size) for split, size in sizes.items()}

  def _generate_examples(self, split: str, size: int):
    config = self.builder_config
    for i in range(size):
      rng = np.random.default_rng((config.seed, base.SPLITS[split], i))
      image, shapes = synthetic.draw_scene(rng, config.image_size,
                                           int(rng.integers(1, config.max_shapes + 1)))
      kind, question, answer = synthetic.ask(rng, shapes)
      yield i, {"id": f"{split}/{i}", "images": [image_codec.to_png(image)],
                "question": question, "answer": answer,
                "type": kind, "caption": synthetic.caption(shapes)}


def _config_name(path: str, *settings) -> str:
  """A builder config name unique to a source and its settings: "<file stem>_<hash>".

  settings hold what the conversion depends on (`_contents`), so an edited
  source is converted again instead of read from a stale copy.
  """
  digest = hashlib.sha1("|".join(map(str, (path, *settings))).encode()).hexdigest()
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(path))[0].lower())
  return f"{stem.strip('_') or 'files'}_{digest[:10]}"


def _contents(*paths: str, hash_files: bool = False) -> str:
  """A fingerprint of files and folders (walked): each file's path, size and modification time,
  or with hash_files its bytes' hash (annotation files, which an edit may keep the same size)."""
  digest = hashlib.sha1()
  for path in paths:
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names) if (
        os.path.isdir(path)) else [path]
    for file in files:
      if not os.path.exists(file):
        digest.update(f"{file}|missing".encode())
      elif hash_files:
        with open(file, "rb") as f:
          digest.update(f"{file}|".encode() + hashlib.sha1(f.read()).digest())
      else:
        stat = os.stat(file)
        digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return digest.hexdigest()


def held_out(ids: list[str], percent: int) -> set[str]:
  """The validation ids: the lowest-hash `percent` of them (at least one), stable across runs."""
  by_hash = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
  return set(by_hash[:max(1, len(ids) * percent // 100)])


def _warn_skipped(source: str, skipped: dict[str, list[str]]):
  """One warning for a whole split: how many examples were skipped, why, and the first ids."""
  if skipped:
    log.warning("%s: skipped %s", source, "; ".join(
        f"{len(ids)} with {why} (first: {ids[:3]})" for why, ids in skipped.items()))


def _read_image(path: str, example_id: str, skipped: dict[str, list[str]]) -> bytes | None:
  """The file's own bytes, or None (and the reason recorded) when it is missing or unreadable."""
  if not os.path.exists(path):
    skipped["missing image file"].append(example_id)
    return None
  with open(path, "rb") as f:
    data = f.read()
  try:
    image_codec.from_bytes(data)
  except (OSError, ValueError, SyntaxError):
    skipped["unreadable image"].append(example_id)
    return None
  return data


def _load_json(path: str, what: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


class AnnotationsConfig(tfds.core.BuilderConfig):
  """An annotations JSON file (LLaVA conversations, COCO captions) and the folder its image
  paths are relative to."""

  def __init__(self, *, json_path: str, image_dir: str, validation_percent: int = 2,
               validation_json: str = "", validation_image_dir: str = ""):
    json_path, image_dir = os.path.abspath(json_path), os.path.abspath(image_dir)
    if validation_json:  # COCO's captions_val2017.json beside captions_train2017.json
      validation_json = os.path.abspath(validation_json)
      validation_image_dir = os.path.abspath(validation_image_dir or image_dir)
    sources = [p for p in (json_path, validation_json) if p]
    contents = _contents(*sources, hash_files=True) + _contents(image_dir, validation_image_dir)
    super().__init__(name=_config_name(json_path, image_dir, validation_percent, contents),
                     version="1.0.0", description=f"annotations {', '.join(sources)}, images "
                     f"{image_dir}")
    self.json_path = json_path
    self.image_dir = image_dir
    self.validation_percent = validation_percent
    self.validation_json = validation_json  # "": hold out validation_percent of json_path's
    self.validation_image_dir = validation_image_dir


class MmjaxLlava(tfds.core.GeneratorBasedBuilder):
  """LLaVA-format conversations with their image files' bytes, converted once.

  The JSON is a list of {"id", "image" (optional; a path or a list of paths
  under image_dir), "conversations": [{"from": "human"|"gpt", "value"}, ...]}.
  An example whose image is missing or unreadable, or whose conversation is
  empty or does not alternate human/gpt, is skipped; one warning gives the
  count of each kind and the first few ids. The validation split holds out
  validation_percent of the ids (at least one), chosen by hash so it is stable.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "conversation": tfds.features.Text(),  # the turns, as JSON
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    entries = _load_json(config.json_path, "LLaVA JSON")
    if not isinstance(entries, list):
      raise ValueError(f"LLaVA JSON {config.json_path} must hold a list of examples, not a "
                       f"{type(entries).__name__}")
    if len(entries) < 2:
      raise ValueError(f"LLaVA JSON {config.json_path} needs at least 2 examples (train and "
                       f"validation), has {len(entries)}")
    # An entry that is not an object is named by its place in the list, and skipped later.
    ids = [str(e.get("id", n)) if isinstance(e, dict) else f"#{n}" for n, e in enumerate(entries)]
    held = held_out(ids, config.validation_percent)
    return {
        "train": self._generate_examples([(i, e) for i, e in zip(ids, entries)
                                          if i not in held]),
        "validation": self._generate_examples([(i, e) for i, e in zip(ids, entries)
                                               if i in held]),
    }

  def _generate_examples(self, entries: list[tuple[str, dict]]):
    skipped = collections.defaultdict(list)
    for example_id, entry in entries:
      if not isinstance(entry, dict):
        skipped["an entry that is not a JSON object"].append(example_id)
        continue
      turns = entry.get("conversations") or []
      if not turns or not isinstance(turns, list):
        skipped["empty conversation"].append(example_id)
        continue
      if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        skipped["a turn without a \"value\" string"].append(example_id)
        continue
      if any(t.get("from") != ("human", "gpt")[n % 2] for n, t in enumerate(turns)):
        skipped["turns not alternating human, gpt"].append(example_id)
        continue
      paths = entry.get("image") or []
      paths = [paths] if isinstance(paths, str) else paths
      # Each image is read where its "<image>" tag stands: a tag without an image, or an image
      # without a tag, would give the model another example's image or none.
      tags = sum(t["value"].count("<image>") for t in turns if t["from"] == "human")
      if tags != len(paths):
        skipped["a number of <image> tags other than of images"].append(example_id)
        continue
      images = []
      for path in paths:
        images.append(_read_image(os.path.join(self.builder_config.image_dir, path), example_id,
                                  skipped))
        if images[-1] is None:
          break
      if None in images:
        continue
      yield example_id, {"id": example_id, "images": images, "conversation": json.dumps(turns)}
    _warn_skipped(f"LLaVA {self.builder_config.json_path}", skipped)


class MmjaxCoco(tfds.core.GeneratorBasedBuilder):
  """Images with their captions, from {"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]} (the layout of COCO's captions_*.json), converted once.

  One example per image, with all its captions. Images that are missing,
  unreadable or have no caption are skipped and counted in one warning;
  validation_percent of the images (at least one) are held out by hash.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),  # the image's id in the annotations file
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    images = self._images(config.json_path)
    if config.validation_json:
      return {"train": self._generate_examples(images, config.image_dir),
              "validation": self._generate_examples(self._images(config.validation_json),
                                                    config.validation_image_dir)}
    if len(images) < 2:
      raise ValueError(f"COCO captions file {config.json_path} needs at least 2 images (train "
                       f"and validation), has {len(images)}")
    held = held_out(list(images), config.validation_percent)
    return {"train": self._generate_examples({i: v for i, v in images.items() if i not in held},
                                             config.image_dir),
            "validation": self._generate_examples({i: v for i, v in images.items() if i in held},
                                                  config.image_dir)}

  def _images(self, json_path: str) -> dict[str, tuple[str, list[str]]]:
    """{image id: (file name, its captions)} of one captions file."""
    annotations = _load_json(json_path, "COCO captions file")
    if not isinstance(annotations, dict) or not {"images", "annotations"} <= annotations.keys():
      raise ValueError(f"COCO captions file {json_path} needs top-level \"images\" and "
                       f"\"annotations\" lists")
    captions = collections.defaultdict(list)
    for a in annotations["annotations"]:
      captions[str(a["image_id"])].append(a["caption"].strip())
    return {str(i["id"]): (i["file_name"], captions[str(i["id"])])
            for i in annotations["images"]}

  def _generate_examples(self, images: dict[str, tuple[str, list[str]]], image_dir: str):
    skipped = collections.defaultdict(list)
    for image_id, (file_name, captions) in images.items():
      captions = [c for c in captions if c]
      if not captions:
        skipped["no caption"].append(image_id)
        continue
      data = _read_image(os.path.join(image_dir, file_name), image_id, skipped)
      if data is not None:
        yield image_id, {"id": image_id, "images": [data], "captions": captions}
    _warn_skipped(f"COCO captions {self.builder_config.json_path}", skipped)


class ImageFolderConfig(tfds.core.BuilderConfig):
  """A folder with one sub-folder of images per class (or train/ and val/ folders of those)."""

  def __init__(self, *, image_dir: str, validation_percent: int = 2):
    image_dir = os.path.abspath(image_dir)
    super().__init__(name=_config_name(image_dir, validation_percent, _contents(image_dir)),
                     version="1.0.0",
                     description=f"image classes from {image_dir}")
    self.image_dir = image_dir
    self.validation_percent = validation_percent


EVAL_FOLDERS = ("validation", "val", "test")


class MmjaxImageFolder(tfds.core.GeneratorBasedBuilder):
  """Labelled images from class sub-folders: image_dir/CLASS/*.jpg, converted once.

  When image_dir holds train/ and one of validation/, val/ or test/, those are
  the splits; otherwise validation_percent of the files (at least one) are held
  out by hash. Labels index the sorted class names of the training folder.
  Unreadable files are skipped and counted in one warning.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),  # CLASS/file name
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "label": tfds.features.ClassLabel(names=self._class_names()),
    }))

  def _folders(self) -> tuple[str, str | None]:
    """-> (the training folder, the validation folder or None to hold out by hash)."""
    root = self.builder_config.image_dir
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root} does not exist")
    held = [d for d in EVAL_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if os.path.isdir(os.path.join(root, "train")) and held:
      return os.path.join(root, "train"), os.path.join(root, held[0])
    return root, None

  def _class_names(self) -> list[str]:
    train, _ = self._folders()
    names = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    if len(names) < 2:
      raise ValueError(f"image folder {train} needs at least 2 class sub-folders, has {names}")
    return names

  def _split_generators(self, dl_manager):
    del dl_manager
    train, validation = self._folders()
    if validation:
      return {"train": self._generate_examples(self._files(train)),
              "validation": self._generate_examples(self._files(validation))}
    files = self._files(train)
    held = held_out(list(files), self.builder_config.validation_percent)
    return {"train": self._generate_examples({k: v for k, v in files.items() if k not in held}),
            "validation": self._generate_examples({k: v for k, v in files.items() if k in held})}

  def _files(self, folder: str) -> dict[str, tuple[str, str]]:
    """{"CLASS/file": (path, CLASS)} for every file in the known class folders under `folder`."""
    files = {}
    for name in self._class_names():
      directory = os.path.join(folder, name)
      for file in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        files[f"{name}/{file}"] = (os.path.join(directory, file), name)
    return files

  def _generate_examples(self, files: dict[str, tuple[str, str]]):
    skipped = collections.defaultdict(list)
    for example_id, (path, name) in files.items():
      data = _read_image(path, example_id, skipped)
      if data is not None:
        yield example_id, {"id": example_id, "image": data, "label": name}
    _warn_skipped(f"image folder {self.builder_config.image_dir}", skipped)


class TextConfig(tfds.core.BuilderConfig):
  """Text files for language-model training: a glob, or several separated by commas."""

  def __init__(self, *, files: str, text_key: str = "text", validation_percent: int = 2):
    patterns = [os.path.abspath(p) for p in files.split(",") if p]
    matched = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    super().__init__(name=_config_name(patterns[0] if patterns else "text", *patterns, text_key,
                                       validation_percent, _contents(*matched)),
                     version="1.0.0", description=f"documents from {files}")
    self.patterns = patterns
    self.text_key = text_key
    self.validation_percent = validation_percent


class MmjaxText(tfds.core.GeneratorBasedBuilder):
  """Documents from .txt files (one per paragraph: blank lines separate them) and .jsonl files
  (one per line, its text_key field), converted once.

  A line that is not JSON or lacks text_key, a file that is not UTF-8 and an
  empty document are skipped and counted in one warning; validation_percent of
  the documents (at least one) are held out by hash.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),  # file:paragraph or file:line
        "text": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    paths = sorted({p for pattern in config.patterns for p in glob.glob(pattern)})
    if not paths:
      raise FileNotFoundError(f"no text files match {','.join(config.patterns)}")
    skipped = collections.defaultdict(list)
    # Documents are named by their file's path under the files' common folder: a/x.txt and
    # b/x.txt stay apart.
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    documents = dict(kv for path in paths
                     for kv in self._documents(path, os.path.relpath(path, root), skipped))
    _warn_skipped(f"text {','.join(config.patterns)}", skipped)
    if len(documents) < 2:
      raise ValueError(f"text files {','.join(config.patterns)} need at least 2 documents "
                       f"(train and validation), have {len(documents)}")
    held = held_out(list(documents), config.validation_percent)
    return {"train": self._generate_examples({k: v for k, v in documents.items() if k not in held}),
            "validation": self._generate_examples({k: v for k, v in documents.items()
                                                   if k in held})}

  def _documents(self, path: str, name: str, skipped: dict[str, list[str]]):
    """(id, text) of each document in one file; ids are "name:paragraph" or "name:line"."""
    with open(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      skipped["text that is not UTF-8"].append(name)
      return
    if path.endswith(".jsonl"):
      for n, line in enumerate(text.splitlines()):
        if not line.strip():
          continue
        try:
          document = json.loads(line).get(self.builder_config.text_key)
        except (json.JSONDecodeError, AttributeError):
          skipped["a line that is not a JSON object"].append(f"{name}:{n + 1}")
          continue
        if not isinstance(document, str) or not document.strip():
          skipped[f"no {self.builder_config.text_key!r} text"].append(f"{name}:{n + 1}")
          continue
        yield f"{name}:{n + 1}", document
    else:
      for n, paragraph in enumerate(re.split(r"\n\s*\n", text)):
        if paragraph.strip():
          yield f"{name}:{n + 1}", paragraph.strip()

  def _generate_examples(self, documents: dict[str, str]):
    for example_id, text in documents.items():
      yield example_id, {"id": example_id, "text": text}

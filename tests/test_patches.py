"""Images at their own resolution on the host: grids, packing, the varied-size scenes, AnyRes
tiles of them."""
import numpy as np
import pytest

from configs import common
from mmjax.data import anyres
from mmjax.data import images
from mmjax.data import patches
from mmjax.data import sources
from mmjax.data import synthetic
from mmjax.models import early_fusion


@pytest.mark.parametrize("size,budget,grid", [
    ((32, 32), 64, (4, 4)),  # fits: its own size
    ((30, 35), 64, (4, 4)),  # rounded to whole patches
    ((16, 64), 64, (2, 8)),  # a 1:4 panorama keeps its aspect ratio
    ((64, 64), 16, (4, 4)),  # shrunk to the budget
    ((8, 256), 16, (1, 16)),  # shrunk, its short side already 1 patch
    ((512, 8), 16, (16, 1)),
])
def test_fit_grid_keeps_aspect_ratio_within_the_budget(size, budget, grid):
  assert patches.fit_grid(*size, patch=8, max_patches=budget) == grid


def test_pack_cuts_places_and_unpacks_every_image():
  rng = np.random.default_rng(0)
  a, b, c = (rng.random((h, w, 3)).astype(np.float32) for h, w in [(8, 12), (4, 4), (12, 8)])
  batch = patches.pack([[a, b], [c]], 4, slots=12, max_images=2, cls=True)
  # Row 0: a's cls slot, its 2 x 3 patches, b's cls slot, its patch, then padding.
  np.testing.assert_array_equal(batch["patch_images"][0], [1] * 7 + [2] * 2 + [0] * 3)
  np.testing.assert_array_equal(batch["patch_coords"][0, :7],
                                [[-1, -1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
  np.testing.assert_array_equal(batch["image_grids"], [[[2, 3], [1, 1]], [[3, 2], [0, 0]]])
  # Patch (1, 2) of a is its pixels [4:8, 8:12], in (y, x, channel) order.
  np.testing.assert_array_equal(batch["patches"][0, 6], a[4:8, 8:12].reshape(-1))
  assert not batch["patches"][0, 0].any() and not batch["patches"][0, 9:].any()
  for row, index, image in [(0, 0, a), (0, 1, b), (1, 0, c)]:
    np.testing.assert_array_equal(patches.unpack(batch, row, index), image)


def test_image_files_fit_the_budget_as_training_fits_them(tmp_path):
  # A 64 x 64 px file at 8 px patches is 64 patches: with 16 slots and a cls slot it is shrunk
  # to 3 x 3 (+ cls = 10 slots), as a training row of 16 slots would take it, not to 4 x 4.
  path = tmp_path / "square.png"
  path.write_bytes(images.to_png(np.random.default_rng(0).random((64, 64, 3))))
  layout = patches.Layout(patch=8, slots=16, max_images=1, cls=True)
  batch = patches.read_rows([[str(path)]], 8, max_patches=16, cls=True)
  assert tuple(batch["image_grids"][0, 0]) == layout.fit_grid(64, 64) == (3, 3)
  assert patches.unpack(batch, 0, 0).shape == (24, 24, 3)


def test_pack_refuses_what_does_not_fit():
  image = np.zeros((8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="in a row of 4 slots"):
    patches.pack([[image, image]], 4, slots=4, max_images=2, cls=True)  # 2 x (1 + 4)
  with pytest.raises(ValueError, match="a row of 3 images; the batch holds 2"):
    patches.pack([[image] * 3], 4, slots=64, max_images=2, cls=False)
  with pytest.raises(ValueError, match="not whole 4-pixel patches"):
    patches.pack([[np.zeros((6, 8, 3))]], 4, slots=64, max_images=1, cls=False)


def test_varied_scenes_pack_whole_examples_with_their_own_images():
  layout = patches.Layout(patch=8, slots=128, max_images=8, cls=False)
  source = synthetic.ShapeScenes(4, 256, 32, 1, layout=layout, sizes="varied", max_shapes=2,
                                 image_token_id=3)
  batch = source.batch(0)
  assert source.batch(0)["patches"].tobytes() == batch["patches"].tobytes()  # a function of step
  shapes = set()
  for row in range(4):
    segments = batch["segment_ids"][row]
    count = int(segments.max())
    assert count == int(np.sum(batch["image_grids"][row, :, 0] > 0)) >= 2
    for k in range(1, count + 1):
      where = np.flatnonzero(segments == k)
      np.testing.assert_array_equal(np.diff(where), 1)  # one contiguous span
      np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
      ids = batch["tokens"][row, where]
      assert ids[1] == 3 and np.sum(ids == 3) == 1  # BOS, then one image marker
      assert batch["loss_weights"][row, where[0]] == 0  # never a target from the last example
      shapes.add(tuple(batch["image_grids"][row, k - 1]))
  assert len(shapes) >= 6  # sizes and aspect ratios vary
  assert np.mean(batch["patch_images"] > 0) >= 0.85


def test_native_resolution_config_errors():
  config = common.load("deep_fusion.py:tiny-native")
  spec = sources.batch_spec(config)
  assert spec["patches"].shape == (3, 128, 192) and spec["image_grids"].shape == (3, 8, 2)
  assert spec["segment_ids"].shape == spec["tokens"].shape == (3, 256)
  config.data.name = "tfds_scenes"
  with pytest.raises(ValueError, match=r"config.data.max_patches .* 'coco_captions', not "
                     r"deep_fusion from 'tfds_scenes'"):
    sources.check(config)
  config = common.load("early_fusion.py:tiny")
  config.data.max_patches = 64
  with pytest.raises(ValueError, match="feeds deep fusion"):
    sources.check(config)
  config.data.update(max_patches=None, scene_sizes="varied")
  with pytest.raises(ValueError, match=r"scene_sizes='varied' draws data.name='shapes' scenes"):
    sources.check(config)
  config.data.update(name="shapes", scene_sizes="sizes")
  with pytest.raises(ValueError, match=r"config.data.scene_sizes must be one of"):
    sources.build(config)


def test_varied_scenes_in_a_dense_batch_are_squashed_to_one_size():
  config = common.load("deep_fusion.py:tiny")
  config.data.update(name="shapes", scene_sizes="varied")
  batch = sources.build(config).batch(0)
  assert batch["images"].shape == (16, 1, 32, 32, 3)
  # Row 0 of step 0, drawn by hand: its size, the scene at that size, squashed through PNG.
  rng = np.random.default_rng((config.seed, 0, 0, 0))
  height, width = rng.integers(16, 65, size=2)
  scene, _ = synthetic.draw_scene(rng, (height, width), int(rng.integers(1, 3)))
  assert (height, width) != (32, 32)
  np.testing.assert_array_equal(batch["images"][0, 0],
                                images.from_bytes(images.to_png(scene), 32))


TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64), (32, 96), (96, 32))


def test_anyres_scenes_cut_each_image_at_its_own_size():
  config = common.load("early_fusion.py:tiny-anyres")
  config.batch_size = 4
  assert config.model.grid_pinpoints == TINY_PINPOINTS
  layout = sources.layout(config)
  # At most 1 + 2 x 2 tiles; tokens: the base tile's 4 x 4 patches, then the 2 x 2 grid's 8
  # rows of 8 patches and a newline.
  assert (layout.max_tiles, layout.max_tokens) == (5, 16 + 8 * (8 + 1))
  batch = sources.build(config).batch(0)
  assert batch["images"].shape == (4, 1, 5, 32, 32, 3)
  assert batch["image_sources"].shape == (4, 1, 88)
  # Row 0 of step 0, drawn by hand at its own size, then cut as LLaVA-NeXT's processor cuts.
  rng = np.random.default_rng((config.seed, 0, 0, 0))
  height, width = rng.integers(16, 65, size=2)
  scene, _ = synthetic.draw_scene(rng, (height, width), int(rng.integers(1, 3)))
  tiles = anyres.tiles(np.round(scene * 255).astype(np.uint8), TINY_PINPOINTS, 32)
  tokens = anyres.token_sources((height, width), TINY_PINPOINTS, 32, 8)
  np.testing.assert_array_equal(batch["images"][0, 0, :len(tiles)], tiles)
  assert not batch["images"][0, 0, len(tiles):].any()
  np.testing.assert_array_equal(batch["image_sources"][0, 0, :len(tokens)], tokens)
  assert (batch["image_sources"][0, 0, len(tokens):] == early_fusion.PAD).all()
  # Every row's text holds exactly as many placeholders as its image has tokens, and the
  # sizes differ (16 to 88 tokens an image).
  placeholders = (batch["tokens"] == config.model.image_token_id).sum(axis=1)
  present = (batch["image_sources"][:, 0] != early_fusion.PAD).sum(axis=1)
  np.testing.assert_array_equal(placeholders, present)
  assert present[0] == len(tokens) and len(set(present)) > 1


def test_anyres_config_errors():
  config = common.load("early_fusion.py:tiny-anyres")
  config.data.name = "tfds_scenes"
  with pytest.raises(ValueError, match=r"grid_pinpoints .* 'coco_captions', not 'tfds_scenes'"):
    sources.check(config)
  config = common.load("early_fusion.py:tiny-anyres")
  config.model.grid_pinpoints = ((32, 64), (48, 32))
  with pytest.raises(ValueError, match=r"grid_pinpoints: \(48, 32\) is not .* whole 32 px"):
    sources.check(config)
  config = common.load("early_fusion.py:tiny-anyres")
  config.model.update(dict(drop_cls=False))
  config.model.vit.pool = "cls"
  with pytest.raises(ValueError, match="config.model.drop_cls=False"):
    sources.check(config)

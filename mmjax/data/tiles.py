"""Llama 3.2 Vision's image processing on the host: images -> `tiled_vit.Tiles`.

Each image is resized (keeping its aspect ratio, bilinear as PIL does it) to
fit the canvas of the best arrangement of at most N tiles (`canvas`), padded
with black at the bottom and right, scaled to [0, 1], normalised, and cut into
tiles row-major. The arrangement is named by its aspect_ratio_id (1 + its
index in `tiled_vit.aspect_ratios`); an image slot without an image has id 0.
This is transformers' MllamaImageProcessor, step for step.

  tiles = prepare([[image_a, image_b], [image_c]], tile=560, max_tiles=4)

A batch (`Layout`) gives every image slot N tiles, so one compiled step serves
every mix of sizes.
"""
import dataclasses
import math

import numpy as np

from mmjax.models import tiled_vit

# Meta's checkpoints normalise with CLIP's statistics (their preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def canvas(size: tuple[int, int], tile: int, max_tiles: int) -> tuple[int, int]:
  """The (rows, columns) of tiles an image of (height, width) pixels is laid on: the
  arrangement that upscales it least, or else downscales it least; the smaller canvas on a tie."""
  height, width = size
  arrangements = tiled_vit.aspect_ratios(max_tiles)
  scales = [min(rows * tile / height, columns * tile / width) for rows, columns in arrangements]
  upscales = [s for s in scales if s >= 1]
  chosen = min(upscales) if upscales else max(scales)
  return min((a for a, s in zip(arrangements, scales) if s == chosen), key=lambda a: a[0] * a[1])


def fitted_size(size: tuple[int, int], rows: int, columns: int, tile: int) -> tuple[int, int]:
  """The (height, width) the image is resized to inside its canvas (aspect ratio kept, each
  side clipped to [tile, canvas side] first)."""
  height, width = size
  target_height = min(max(height, tile), rows * tile)
  target_width = min(max(width, tile), columns * tile)
  scale_height, scale_width = target_height / height, target_width / width
  if scale_width < scale_height:
    return min(math.floor(height * scale_width) or 1, target_height), target_width
  return target_height, min(math.floor(width * scale_height) or 1, target_width)


def image_tiles(image: np.ndarray, tile: int, max_tiles: int, mean=CLIP_MEAN,
                std=CLIP_STD) -> tuple[np.ndarray, int]:
  """uint8[H, W, 3] -> (float32[n, tile, tile, 3] normalised tiles, aspect_ratio_id)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (the GPU image may lack Pillow)
  rows, columns = canvas(image.shape[:2], tile, max_tiles)
  height, width = fitted_size(image.shape[:2], rows, columns, tile)
  with Image.fromarray(image) as picture:
    resized = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR))
  padded = np.zeros((rows * tile, columns * tile, 3), np.float32)
  padded[:height, :width] = resized
  # Black padding is normalised with the image, as the reference pads before normalising.
  pixels = (padded * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)
  pixels = pixels.reshape(rows, tile, columns, tile, 3).transpose(0, 2, 1, 3, 4)
  arrangement = tiled_vit.aspect_ratios(max_tiles).index((rows, columns))
  return pixels.reshape(rows * columns, tile, tile, 3).astype(np.float32), arrangement + 1


def prepare(images: list[list[np.ndarray]], tile: int, max_tiles: int,
            num_images: int | None = None, mean=CLIP_MEAN, std=CLIP_STD) -> tiled_vit.Tiles:
  """Each sample's images (uint8[H, W, 3]) -> Tiles of numpy arrays, I = num_images slots
  (default: the most any sample has); slots past a sample's images are empty (id 0)."""
  layout = Layout(tile, max_tiles, num_images or max(1, max(len(row) for row in images)))
  packed = layout.pack([[image_tiles(np.asarray(image, np.uint8), tile, max_tiles, mean, std)
                         for image in row] for row in images])
  return tiled_vit.Tiles(*(packed[key] for key in KEYS))


KEYS = ("images", "aspect_ratio_ids", "tile_mask")  # a batch's tiled_vit.Tiles, in field order


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a batch holds tiled images: N tile slots per image slot, each image's arrangement and
  the tiles it uses (fixed shapes: one compile for every mix of sizes)."""

  tile: int  # a tile's side: the tiled ViT's image_size
  max_tiles: int  # N
  max_images: int = 1  # image slots per row

  def cut(self, image: np.ndarray) -> tuple[np.ndarray, int]:
    """float[H, W, 3] in [0, 1] -> (its tiles float32[n, S, S, 3] in [0, 1], black padding
    included, to be normalised by the source; its aspect_ratio_id)."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image_tiles(pixels, self.tile, self.max_tiles, mean=0.0, std=1.0)

  def pack(self, rows: list[list[tuple[np.ndarray, int]]]) -> dict[str, np.ndarray]:
    """Each row's images as (tiles, aspect_ratio_id) -> {"images": float32[B, I, N, S, S, 3],
    "aspect_ratio_ids": int32[B, I], "tile_mask": bool[B, I, N]}; unused tile slots are
    zeros, and an empty image slot has id 0 with its first tile marked used, as the
    reference processor has it."""
    B, I, N, S = len(rows), self.max_images, self.max_tiles, self.tile
    out = {"images": np.zeros((B, I, N, S, S, 3), np.float32),
           "aspect_ratio_ids": np.zeros((B, I), np.int32),
           "tile_mask": np.zeros((B, I, N), bool)}
    out["tile_mask"][:, :, 0] = True
    for b, images in enumerate(rows):
      if len(images) > I:
        raise ValueError(f"a row of {len(images)} images; the batch holds {I}")
      for i, (tiles, ratio) in enumerate(images):
        out["images"][b, i, :len(tiles)] = tiles
        out["aspect_ratio_ids"][b, i] = ratio
        out["tile_mask"][b, i, :len(tiles)] = True
    return out

  def spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """The packed arrays' shapes and dtypes for batch_size rows."""
    B, I, N, S = batch_size, self.max_images, self.max_tiles, self.tile
    return {"images": ((B, I, N, S, S, 3), np.float32), "aspect_ratio_ids": ((B, I), np.int32),
            "tile_mask": ((B, I, N), bool)}

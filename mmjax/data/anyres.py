"""LLaVA-NeXT's "AnyRes" on the host: an image's tile grid and where each of its tokens comes from.

An image of (height, width) pixels is read as a base tile (the whole image at
the ViT's resolution S) plus the tiles of a grid chosen among `grid_pinpoints`
by its aspect ratio (HF's select_best_resolution). Its tokens are the base
tile's P patches, then the grid's patches row by row with the rows and columns
that only hold the grid's padding removed ("unpadding"), each row ended by a
learned newline embedding. So the number of placeholders an image needs depends
on its size: `num_tokens` is what the text reserves, and `token_sources` tells
the model (`early_fusion.Tiles`) which tile patch fills each of them.

  sources = token_sources((480, 640), [(336, 672), (672, 336), (672, 672)], tile=336, patch=14)
  pixels = tiles(image, [(336, 672), (672, 336), (672, 672)], tile=336)  # the same image's tiles

A batch (`Layout`) pads every image to the most tiles and tokens any pinpoint
can need, so one compiled step serves every mix of sizes.
"""
import dataclasses
import math

import numpy as np

from mmjax.models import early_fusion


def best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
  """The (height, width) of grid_pinpoints an image of size (height, width) is resized into:
  the most of its pixels kept, then the least padding (HF's select_best_resolution)."""
  height, width = size
  best, most_kept, least_wasted = None, 0, float("inf")
  for pin_height, pin_width in pinpoints:
    scale = min(pin_width / width, pin_height / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    wasted = pin_width * pin_height - kept
    if kept > most_kept or (kept == most_kept and wasted < least_wasted):
      best, most_kept, least_wasted = (pin_height, pin_width), kept, wasted
  return best


def tile_grid(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
  """(rows, columns) of S x S tiles an image's grid has."""
  height, width = best_resolution(size, pinpoints)
  return height // tile, width // tile


def token_sources(size: tuple[int, int], pinpoints, tile: int, patch: int) -> np.ndarray:
  """int32[L]: for each of an image's tokens, tile * P + patch (tile 0: the base image, then
  the grid's tiles row-major; P = (tile / patch)^2 patches a tile, row-major), or
  early_fusion.NEWLINE."""
  side = tile // patch  # patches along a tile's side
  per_tile = side * side
  rows, columns = tile_grid(size, pinpoints, tile)
  height, width = rows * side, columns * side  # the grid in patches
  # Unpadding, exactly as HF's unpad_image: the image was resized into the grid keeping its
  # aspect ratio and centred; the rows (or columns) of padding on both sides are dropped.
  original_height, original_width = size
  first_row, last_row, first_column, last_column = 0, height, 0, width
  if original_width / original_height > width / height:
    kept = int(round(original_height * (width / original_width), 7))
    padding = (height - kept) // 2
    first_row, last_row = padding, height - padding
  else:
    kept = int(round(original_width * (height / original_height), 7))
    padding = (width - kept) // 2
    first_column, last_column = padding, width - padding
  grid = []
  for r in range(first_row, last_row):
    for c in range(first_column, last_column):
      tile_index = 1 + (r // side) * columns + c // side
      grid.append(tile_index * per_tile + (r % side) * side + c % side)
    grid.append(early_fusion.NEWLINE)
  return np.array([*range(per_tile), *grid], np.int32)


def num_tokens(size: tuple[int, int], pinpoints, tile: int, patch: int) -> int:
  """The placeholders the text reserves for an image of size (height, width)."""
  return len(token_sources(size, pinpoints, tile, patch))


def tiles(image: np.ndarray, pinpoints, tile: int) -> np.ndarray:
  """uint8[H, W, 3] -> float32[1 + rows * columns, S, S, 3] in [0, 1]: the whole image resized
  to S x S, then the tiles of its grid, row-major. As HF's LLaVA-NeXT processor: resized
  (bicubic, with Pillow) to fit the best pinpoint keeping its aspect ratio, centred on zero
  padding, cut into S x S tiles."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  target_height, target_width = best_resolution((height, width), pinpoints)
  if target_width / width < target_height / height:
    new_height, new_width = min(math.ceil(height * target_width / width), target_height), \
        target_width
  else:
    new_height, new_width = target_height, min(math.ceil(width * target_height / height),
                                               target_width)
  with Image.fromarray(image) as picture:
    resized = np.asarray(picture.resize((new_width, new_height), Image.Resampling.BICUBIC))
    base = np.asarray(picture.resize((tile, tile), Image.Resampling.BICUBIC))
  padded = np.zeros((target_height, target_width, 3), np.uint8)
  top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
  padded[top:top + new_height, left:left + new_width] = resized
  grid = [padded[r:r + tile, c:c + tile] for r in range(0, target_height, tile)
          for c in range(0, target_width, tile)]
  return np.stack([base, *grid]).astype(np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a batch holds AnyRes images: per image slot its tiles and token sources, padded to the
  most that any of the pinpoints needs (fixed shapes: one compile for every mix of sizes)."""

  pinpoints: tuple[tuple[int, int], ...]
  tile: int  # S, the ViT's resolution
  patch: int
  max_images: int = 1  # image slots per row

  @property
  def max_tiles(self) -> int:
    return 1 + max((h // self.tile) * (w // self.tile) for h, w in self.pinpoints)

  @property
  def max_tokens(self) -> int:
    """The most placeholders an image can need: the base tile's patches and a whole grid's,
    a newline a row (unpadding only removes)."""
    side = self.tile // self.patch
    return side * side + max((h // self.tile * side) * (w // self.tile * side + 1)
                             for h, w in self.pinpoints)

  def cut(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float[H, W, 3] in [0, 1] -> (its tiles float32[n, S, S, 3], its token_sources int32[L])."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return (tiles(pixels, self.pinpoints, self.tile),
            token_sources(image.shape[:2], self.pinpoints, self.tile, self.patch))

  def pack(self, rows: list[list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Each row's images as (tiles, sources), from `cut` -> {"images": float32[B, I, N, S, S, 3],
    "image_sources": int32[B, I, L]} (early_fusion.Tiles' fields; unused slots PAD)."""
    B, S = len(rows), self.tile
    out = {"images": np.zeros((B, self.max_images, self.max_tiles, S, S, 3), np.float32),
           "image_sources": np.full((B, self.max_images, self.max_tokens), early_fusion.PAD,
                                    np.int32)}
    for b, images in enumerate(rows):
      if len(images) > self.max_images:
        raise ValueError(f"a row of {len(images)} images; the batch holds {self.max_images}")
      for i, (pixels, sources) in enumerate(images):
        out["images"][b, i, :len(pixels)] = pixels
        out["image_sources"][b, i, :len(sources)] = sources
    return out

  def spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """The packed arrays' shapes and dtypes for batch_size rows."""
    B, I, S = batch_size, self.max_images, self.tile
    return {"images": ((B, I, self.max_tiles, S, S, 3), np.float32),
            "image_sources": ((B, I, self.max_tokens), np.int32)}

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
"""
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


def batch_sources(sizes: list[list[tuple[int, int]]], pinpoints, tile: int, patch: int,
                  max_images: int, length: int) -> np.ndarray:
  """int32[B, max_images, length]: each row's images' token_sources, early_fusion.PAD after
  them."""
  out = np.full((len(sizes), max_images, length), early_fusion.PAD, np.int32)
  for b, row in enumerate(sizes):
    for i, size in enumerate(row):
      sources = token_sources(size, pinpoints, tile, patch)
      if len(sources) > length:
        raise ValueError(f"an image of {size[0]} x {size[1]} px takes {len(sources)} tokens; "
                         f"the batch holds {length} an image")
      out[b, i, :len(sources)] = sources
  return out


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

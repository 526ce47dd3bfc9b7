"""Images at their own resolution: fit to a patch budget, cut into patches, pack into rows.

The host side of the ViT's native-resolution input (`vit.Patches`, NaViT's
"patch n' pack"). An image keeps its aspect ratio and is shrunk only as far as
a budget of patches needs (and to whole patches); each row of a batch holds the
patches of its images back to back in a fixed number of slots, so one compiled
step serves every mix of sizes.

  grid = fit_grid(height, width, patch=16, max_patches=256)  # (rows, columns) of patches
  batch = pack([[image_a, image_b], [image_c]], patch=16, slots=512, max_images=2, cls=False)
"""
import dataclasses
import math

import numpy as np

from mmjax.data import images as image_codec

KEYS = ("patches", "patch_images", "patch_coords", "image_grids")  # the batch's arrays


def fit_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
  """The patch grid (rows, columns) an image of height x width pixels is resized to: its own
  size rounded to whole patches, shrunk keeping the aspect ratio to at most max_patches."""
  if max_patches < 1:
    raise ValueError(f"config.data.max_patches must be at least 1, got {max_patches}")
  rows, columns = max(1, round(height / patch)), max(1, round(width / patch))
  if rows * columns > max_patches:
    scale = math.sqrt(max_patches / (rows * columns))
    rows, columns = max(1, int(rows * scale)), max(1, int(columns * scale))
    while rows * columns > max_patches:  # a side floored to 1 can leave the other too long
      columns, rows = (columns - 1, rows) if columns >= rows else (columns, rows - 1)
  return rows, columns


def cut(image: np.ndarray, patch: int) -> np.ndarray:
  """float[gh * p, gw * p, 3] -> float[gh * gw, p * p * 3], patches row-major, each patch's
  pixels in (y, x, channel) order (the layout of the ViT's patch-embedding kernel)."""
  height, width, channels = image.shape
  if height % patch or width % patch:
    raise ValueError(f"image of {height} x {width} pixels is not whole {patch}-pixel patches")
  gh, gw = height // patch, width // patch
  grid = image.reshape(gh, patch, gw, patch, channels).transpose(0, 2, 1, 3, 4)
  return grid.reshape(gh * gw, patch * patch * channels)


def tokens_per_image(grid: tuple[int, int], cls: bool) -> int:
  return grid[0] * grid[1] + int(cls)


def pack(rows: list[list[np.ndarray]], patch: int, slots: int, max_images: int,
         cls: bool) -> dict[str, np.ndarray]:
  """Each row's images (float[h, w, 3], whole patches) into `slots` patch slots.

  cls: each image also gets a slot for the ViT's cls token, before its patches.
  -> {"patches": float32[B, slots, p * p * 3], "patch_images": int32[B, slots]
  (1 + the image's index in its row, 0: padding), "patch_coords": int32[B,
  slots, 2] ((row, column), (-1, -1) for a cls slot), "image_grids": int32[B,
  max_images, 2]}: the fields of `vit.Patches`.
  """
  B = len(rows)
  out = {"patches": np.zeros((B, slots, patch * patch * 3), np.float32),
         "patch_images": np.zeros((B, slots), np.int32),
         "patch_coords": np.zeros((B, slots, 2), np.int32),
         "image_grids": np.zeros((B, max_images, 2), np.int32)}
  for b, images in enumerate(rows):
    if len(images) > max_images:
      raise ValueError(f"a row of {len(images)} images; the batch holds {max_images} per row")
    start = 0
    for i, image in enumerate(images):
      grid = (image.shape[0] // patch, image.shape[1] // patch)
      end = start + tokens_per_image(grid, cls)
      if end > slots:
        raise ValueError(f"images of {end} patches or more in a row of {slots} slots")
      first = start + int(cls)
      out["patches"][b, first:end] = cut(image, patch)
      out["patch_images"][b, start:end] = i + 1
      out["patch_coords"][b, start:first] = -1
      y, x = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
      out["patch_coords"][b, first:end] = np.stack([y, x], axis=1)
      out["image_grids"][b, i] = grid
      start = end
  return out


def unpack(batch: dict[str, np.ndarray], row: int, image: int) -> np.ndarray:
  """Image `image` of row `row` of a packed batch, back to float[gh * p, gw * p, 3]."""
  gh, gw = batch["image_grids"][row, image]
  where = (batch["patch_images"][row] == image + 1) & (batch["patch_coords"][row, :, 0] >= 0)
  p = math.isqrt(batch["patches"].shape[-1] // 3)
  grid = batch["patches"][row, where].reshape(gh, gw, p, p, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(gh * p, gw * p, 3)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a source packs native-resolution images: the model's patch size and cls slot, the
  batch's slots per row (config.data.max_patches) and images per row."""

  patch: int
  slots: int
  max_images: int
  cls: bool

  def fit_grid(self, height: int, width: int, room: int | None = None) -> tuple[int, int]:
    """The grid of an image of height x width pixels in a row with `room` free slots."""
    return fit_grid(height, width, self.patch, (self.slots if room is None else room) - self.cls)

  def pack(self, rows: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    return pack(rows, self.patch, self.slots, self.max_images, self.cls)

  def spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """The packed arrays' shapes and dtypes for batch_size rows."""
    B, P = batch_size, self.slots
    return {"patches": ((B, P, self.patch * self.patch * 3), np.float32),
            "patch_images": ((B, P), np.int32), "patch_coords": ((B, P, 2), np.int32),
            "image_grids": ((B, self.max_images, 2), np.int32)}


def read_rows(rows: list[list[str]], patch: int, max_patches: int, cls: bool,
              mean=0.0, std=1.0) -> dict[str, np.ndarray]:
  """Image files at their own sizes (each shrunk to fit max_patches slots, its cls slot
  included, as training fits them), normalised and packed, a row per list: what a model
  trained with config.data.max_patches reads (tools/generate.py)."""
  layout = Layout(patch, max_patches, max_images=1, cls=cls)

  def size(height: int, width: int) -> tuple[int, int]:
    rows, columns = layout.fit_grid(height, width)
    return rows * patch, columns * patch

  images = [[image_codec.normalise(image_codec.read(path, size), mean, std) for path in row]
            for row in rows]
  slots = max(sum(tokens_per_image((x.shape[0] // patch, x.shape[1] // patch), cls) for x in row)
              for row in images)
  return pack(images, patch, max(slots, 1), max(1, max(len(row) for row in images)), cls)

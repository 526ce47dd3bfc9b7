"""Image bytes (or a tfds dataset's uint8 arrays) <-> float32 arrays in [0, 1], with Pillow.

Pillow is imported by the functions that decode or encode, so the in-memory
sources, which only `normalise`, run where it is not installed (the GPU image).
"""
from collections.abc import Callable
import io

import numpy as np

RESIZE = ("bilinear", "bicubic", "lanczos", "box", "nearest")  # Pillow's resampling filters


def from_bytes(data: bytes | np.ndarray,
               size: int | tuple[int, int] | Callable[[int, int], tuple[int, int]] | None = None,
               resize: str = "bilinear") -> np.ndarray:
  """Encoded image bytes, or uint8[H, W, C], -> float32[H, W, 3] in [0, 1], resized to
  size x size, size = (height, width), or size(height, width) -> (height, width) (by a RESIZE
  method) if size is given.

  Greyscale, palette and RGBA images become RGB. A truncated or unreadable file
  raises OSError or ValueError.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(data, np.ndarray):
    image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  else:
    try:
      image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
      raise ValueError("not an image file Pillow reads (PNG, JPEG, GIF, WebP, ...)") from None
  with image:
    image = image.convert("RGB")
    if callable(size):
      size = size(image.height, image.width)
    if size is not None:
      height, width = (size, size) if isinstance(size, int) else size
      image = image.resize((width, height), Image.Resampling[resize.upper()])
    return np.asarray(image, np.float32) / 255.0


def to_png(image: np.ndarray) -> bytes:
  """float[H, W, 3] in [0, 1] -> PNG bytes (8 bits per channel)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def read(path: str, size: int | Callable[[int, int], tuple[int, int]] | None) -> np.ndarray:
  """An image file -> float32[size, size, 3] in [0, 1], or at size(height, width) -> the
  (height, width) to resize to, or at its own size (None); unreadable: one error naming the
  file."""
  try:
    with open(path, "rb") as f:
      return from_bytes(f.read(), size)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def normalise(images: np.ndarray, mean=0.0, std=1.0) -> np.ndarray:
  """[0, 1] pixels -> (pixels - mean) / std per channel, as config.data.image_mean/std."""
  return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

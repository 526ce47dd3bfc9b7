"""Image bytes <-> float32 arrays in [0, 1], with Pillow."""
import io

import numpy as np
from PIL import Image


def decode(data: bytes, size: int | None = None) -> np.ndarray:
  """Encoded image bytes -> float32[H, W, 3] in [0, 1], resized (bilinear) to size x size if given.

  Greyscale, palette and RGBA files become RGB. A truncated or unreadable file
  raises OSError or ValueError.
  """
  with Image.open(io.BytesIO(data)) as image:
    image = image.convert("RGB")
    if size is not None:
      image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def encode_png(image: np.ndarray) -> bytes:
  """float[H, W, 3] in [0, 1] -> PNG bytes (8 bits per channel)."""
  buffer = io.BytesIO()
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()

"""Tokenizers: byte-level (the default, needs no files)."""


class ByteTokenizer:
  """UTF-8 bytes are ids 0-255; special tokens follow them.

  Id 0 (the NUL byte, absent from real text) doubles as padding.
  """

  pad_id = 0
  bos_id = 256
  eos_id = 257
  image_id = 258  # image placeholder (early fusion) or image marker (deep fusion)
  vocab_size = 320  # 259 ids used, rounded up to a multiple of 64 for the matmuls

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

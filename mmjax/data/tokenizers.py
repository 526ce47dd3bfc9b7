"""Tokenizers: byte-level (the default, needs no files), SentencePiece, HuggingFace tokenizer.json.

All three have the same small interface:

  encode(text) -> list[int]     decode(ids) -> str (special tokens dropped)
  vocab_size, pad_id, bos_id, eos_id, image_id

image_id is the image placeholder (early fusion) or image marker (deep fusion).
`load(spec)` builds one from a config string: "bytes", a SentencePiece
".model" file, or a HuggingFace "tokenizer.json"; `tools/train_tokenizer.py`
trains either kind offline with the special tokens below.
"""
import os

# Special tokens of the trained tokenizers, in id order.
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}


class ByteTokenizer:
  """UTF-8 bytes are ids 0-255; special tokens follow them.

  Id 0 (the NUL byte, absent from real text) doubles as padding.
  """

  pad_id = 0
  bos_id = 256
  eos_id = 257
  image_id = 258  # image placeholder (early fusion) or image marker (deep fusion)
  vocab_size = 320  # 259 ids used, rounded up to a multiple of 64 for the matmuls

  def __repr__(self):
    return "ByteTokenizer()"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file; its pad/bos/eos settings, and "<image>" as a user symbol."""

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.path = path
    self.model = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.model.get_piece_size()
    ids = {"pad": self.model.pad_id(), "bos": self.model.bos_id(), "eos": self.model.eos_id()}
    for name in ("pad", "bos", "eos", "image"):
      if ids.get(name, -1) < 0:
        ids[name] = self.model.piece_to_id(SPECIAL_TOKENS[name])
        if ids[name] == self.model.unk_id():
          raise ValueError(f"SentencePiece model {path} has no {SPECIAL_TOKENS[name]!r} ({name}) "
                           "token")
    self.pad_id, self.bos_id, self.eos_id, self.image_id = (
        ids["pad"], ids["bos"], ids["eos"], ids["image"])
    self._special = {self.pad_id, self.bos_id, self.eos_id, self.image_id}

  def __repr__(self):
    return f"SentencePieceTokenizer({self.path!r})"

  def encode(self, text: str) -> list[int]:
    return self.model.encode(text)

  def decode(self, ids) -> str:
    return self.model.decode([int(i) for i in ids if int(i) not in self._special])


class HuggingFaceTokenizer:
  """A HuggingFace `tokenizers` tokenizer.json with the special tokens above in its vocabulary."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self.tokenizer.get_vocab_size()
    ids = {}
    for name in ("pad", "bos", "eos", "image"):
      ids[name] = self.tokenizer.token_to_id(SPECIAL_TOKENS[name])
      if ids[name] is None:
        raise ValueError(f"tokenizer {path} has no {SPECIAL_TOKENS[name]!r} ({name}) token")
    self.pad_id, self.bos_id, self.eos_id, self.image_id = (
        ids["pad"], ids["bos"], ids["eos"], ids["image"])

  def __repr__(self):
    return f"HuggingFaceTokenizer({self.path!r})"

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load(spec: str):
  """"bytes" | "path/to/file.model" (SentencePiece) | "path/to/tokenizer.json" (HuggingFace)."""
  if spec == "bytes":
    return ByteTokenizer()
  if not os.path.exists(spec):
    raise FileNotFoundError(f"tokenizer file {spec} does not exist")
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  if spec.endswith(".json"):
    return HuggingFaceTokenizer(spec)
  raise ValueError(f"tokenizer {spec!r}: expected 'bytes', a SentencePiece .model file or a "
                   "HuggingFace tokenizer.json")


def encode_conversation(turns: list[dict], tokenizer, image_ids: list[int]) -> tuple[list[int],
                                                                                     list[int]]:
  """A LLaVA conversation -> (token ids, loss mask), the loss on the assistant's turns only.

  turns: [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
  ...]. Laid out as LLaVA-1.5's template does:

    BOS "USER: " human " ASSISTANT: " gpt EOS "USER: " human " ASSISTANT: " gpt EOS ...

  with each "<image>" in a human turn replaced by image_ids (P placeholders, or
  one marker). The mask is 1 on the tokens of every gpt turn and its EOS.
  """
  if not turns:
    raise ValueError("empty conversation")
  ids, mask = [tokenizer.bos_id], [0]
  for n, turn in enumerate(turns):
    role, text = turn.get("from"), turn.get("value", "")
    expected = "human" if n % 2 == 0 else "gpt"
    if role != expected:
      raise ValueError(f"conversation turn {n} is from {role!r}; expected {expected!r} "
                       "(turns alternate human, gpt, ...)")
    if role == "human":
      pieces = ("USER: " + text + " ASSISTANT:").split("<image>")
      prompt = tokenizer.encode(pieces[0])
      for piece in pieces[1:]:
        prompt += list(image_ids) + tokenizer.encode(piece)
      ids += prompt
      mask += [0] * len(prompt)
    else:
      answer = tokenizer.encode(" " + text) + [tokenizer.eos_id]
      ids += answer
      mask += [1] * len(answer)
  return ids, mask


IMAGE = "<image>"


def encode_prompt(prompt: str, num_images: int, template: str, image_ids: list[int],
                  tokenizer) -> list[int]:
  """BOS + the template with "{prompt}" filled in, each "<image>" replaced by image_ids.

  A prompt that places its images itself ("<image>" inside it) overrides the
  template's image positions; images without a marker go first.
  """
  if IMAGE in prompt:
    template = template.replace(IMAGE, "")
  text = template.replace("{prompt}", prompt)
  missing = num_images - text.count(IMAGE)
  if missing < 0:
    raise ValueError(f"the prompt has {text.count(IMAGE)} {IMAGE} markers for {num_images} images")
  text = IMAGE * missing + text
  ids = [tokenizer.bos_id]
  for i, part in enumerate(text.split(IMAGE)):
    ids += (image_ids if i else []) + tokenizer.encode(part)
  return ids

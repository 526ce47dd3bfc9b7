"""Tokenizers: byte-level (the default, needs no files), SentencePiece, HuggingFace tokenizer.json.

All three have the same small interface:

  encode(text) -> list[int]     decode(ids) -> str (special tokens dropped)
  vocab_size, pad_id, bos_id, eos_id, image_id

image_id is the image placeholder (early fusion) or image marker (deep fusion).
`load(spec)` builds one from a config string: "bytes", a SentencePiece
".model" file, or a HuggingFace "tokenizer.json"; `tools/train_tokenizer.py`
trains either kind offline with the special tokens below.
"""
import json
import os

# Special tokens of the trained tokenizers, in id order.
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
IMAGE = SPECIAL_TOKENS["image"]


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


def save_bytes_for_huggingface(directory: str, max_len: int):
  """ByteTokenizer as a HuggingFace tokenizer (tokenizer.json, tokenizer_config.json) with the
  same ids: byte-level BPE without merges, each byte one token of GPT-2's byte alphabet, then
  "<s>", "</s>" and "<image>". transformers' AutoTokenizer (which adds BOS, as mmjax's prompts
  start) and mmjax's HuggingFaceTokenizer load it; padding is the NUL byte, id 0."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  alphabet = _byte_alphabet()
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={alphabet[b]: b for b in range(256)}, merges=[]))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  specials = {"bos": SPECIAL_TOKENS["bos"], "eos": SPECIAL_TOKENS["eos"], "image": IMAGE}
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True)
                                for t in specials.values()])  # ids 256, 257, 258
  # Texts start with BOS, as mmjax's training rows and prompts do.
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{specials['bos']} $A", special_tokens=[(specials["bos"], ByteTokenizer.bos_id)])
  assert [tokenizer.token_to_id(t) for t in specials.values()] == [
      ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.image_id]
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials["bos"],
               "eos_token": specials["eos"], "pad_token": alphabet[ByteTokenizer.pad_id],
               "model_max_length": max_len}, f, indent=2)


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable character for each byte (its bytes_to_unicode), as HuggingFace's
  byte-level pre-tokenizer and decoder use."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


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
  """A HuggingFace `tokenizers` tokenizer.json, as tools/train_tokenizer.py or a pretrained
  model ships it.

  Special tokens: those a tokenizer_config.json beside the file names (bos_token,
  eos_token, pad_token, as pretrained models have), else the ones above, else
  GPT-2's "<|endoftext|>" as both bos and eos. Without a pad token, padding uses
  unk or eos: padded positions carry no loss and no attention, so any id serves.
  Without "<image>" it is added after the vocabulary (id = the old vocab size),
  as LLaVA adds it; the LM's embedding table then needs that new row.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    named = _named_special_tokens(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    ids = {}
    for name in ("pad", "bos", "eos", "unk", "image"):
      for token in (named.get(name), SPECIAL_TOKENS[name], *_FALLBACK_TOKENS.get(name, ())):
        if token and self.tokenizer.token_to_id(token) is not None:
          ids[name] = self.tokenizer.token_to_id(token)
          break
    if "image" not in ids:
      self.tokenizer.add_special_tokens([tokenizers.AddedToken(IMAGE, special=True)])
      ids["image"] = self.tokenizer.token_to_id(IMAGE)
    ids.setdefault("pad", ids.get("unk", ids.get("eos")))
    for name in ("pad", "bos", "eos"):
      if ids.get(name) is None:
        raise ValueError(f"tokenizer {path} has no {name} token (looked for "
                         f"{SPECIAL_TOKENS[name]!r} and tokenizer_config.json's {name}_token)")
    self.pad_id, self.bos_id, self.eos_id, self.image_id = (
        ids["pad"], ids["bos"], ids["eos"], ids["image"])
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

  def __repr__(self):
    return f"HuggingFaceTokenizer({self.path!r})"

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# GPT-2's one special token stands for both ends of a text.
_FALLBACK_TOKENS = {"bos": ("<|endoftext|>",), "eos": ("<|endoftext|>",)}


def _named_special_tokens(config_path: str) -> dict[str, str]:
  """tokenizer_config.json's {"bos": "<s>", ...} (its tokens are strings or {"content": ...})."""
  if not os.path.exists(config_path):
    return {}
  with open(config_path) as f:
    config = json.load(f)
  named = {}
  for name in ("pad", "bos", "eos", "unk"):
    token = config.get(f"{name}_token")
    named[name] = token.get("content") if isinstance(token, dict) else token
  return named


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


# LLaVA-1.5's layout of one human turn, as encode_conversation writes it and HF's chat
# template for llava-1.5 does ("USER: <image>\nWhat is it? ASSISTANT:").
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def encode_conversation(turns: list[dict], tokenizer, image_ids: list[int] | list[list[int]]
                        ) -> tuple[list[int], list[int]]:
  """A LLaVA conversation -> (token ids, loss mask), the loss on the assistant's turns only.

  turns: [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
  ...]. Laid out as LLaVA-1.5's template does:

    BOS "USER: " human " ASSISTANT: " gpt EOS "USER: " human " ASSISTANT: " gpt EOS ...

  with each "<image>" in a human turn replaced by image_ids (P placeholders, or
  one marker; or a list per image, in order: AnyRes images take as many as
  their size needs). The mask is 1 on the tokens of every gpt turn and its EOS.
  """
  if not turns:
    raise ValueError("empty conversation")
  per_image = iter(image_ids) if image_ids and isinstance(image_ids[0], list) else None
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
        prompt += list(image_ids if per_image is None else next(per_image, [])) + \
            tokenizer.encode(piece)
      ids += prompt
      mask += [0] * len(prompt)
    else:
      answer = tokenizer.encode(" " + text) + [tokenizer.eos_id]
      ids += answer
      mask += [1] * len(answer)
  return ids, mask


# PaliGemma's task prefix for captions (big_vision's "caption en"): what a prefix-LM caption
# prompt says.
CAPTION_PREFIX = "caption en"


def encode_prefix_lm(prompt: str, answer: str | None, image_ids: list[int], tokenizer
                     ) -> tuple[list[int], list[int]]:
  """PaliGemma's layout -> (token ids, loss mask): the image's ids, BOS, the prompt and "\n"
  (the prefix, read both ways, no loss), then the answer and EOS (the suffix, causal, the
  loss on it), as transformers' PaliGemmaProcessor writes input_ids and token_type_ids.
  answer None: the prefix alone (a prompt to generate from)."""
  prefix = list(image_ids) + [tokenizer.bos_id] + tokenizer.encode(prompt + "\n")
  suffix = [] if answer is None else tokenizer.encode(answer) + [tokenizer.eos_id]
  return prefix + suffix, [0] * len(prefix) + [1] * len(suffix)


def encode_prompt(prompt: str, num_images: int, template: str,
                  image_ids: list[int] | list[list[int]], tokenizer) -> list[int]:
  """BOS + the template with "{prompt}" filled in, each "<image>" replaced by image_ids (the
  same for every image, or a list per image: AnyRes images take as many as their size needs).

  A prompt that places its images itself ("<image>" inside it) overrides the
  template's image positions. Where neither places them the images go first;
  otherwise the markers must be as many as the images (an error names both).
  """
  per_image = (image_ids if image_ids and isinstance(image_ids[0], list)
               else [image_ids] * num_images)
  if IMAGE in prompt:
    template = template.replace(IMAGE, "")
  text = template.replace("{prompt}", prompt)
  if IMAGE not in text:  # neither places them: the images go first
    text = IMAGE * num_images + text
  if text.count(IMAGE) != num_images:
    raise ValueError(f"the prompt places {text.count(IMAGE)} images ({IMAGE} markers) but "
                     f"{num_images} were given")
  ids = [tokenizer.bos_id]
  for i, part in enumerate(text.split(IMAGE)):
    ids += (per_image[i - 1] if i else []) + tokenizer.encode(part)
  return ids

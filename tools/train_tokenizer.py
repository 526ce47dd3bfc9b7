"""Trains a SentencePiece or byte-level BPE tokenizer on local text, offline.

  python tools/train_tokenizer.py --input corpus.txt --out tok/ --kind sentencepiece --vocab_size 8000
  python tools/train_tokenizer.py --input data.jsonl --out tok/ --kind bpe --vocab_size 8000

--input takes text files (one example per line) or JSONL files whose objects
have a "text" field; repeat it for several files. The special tokens
<pad>, <unk>, <s>, </s>, <image> get ids 0-4. Writes OUT/tokenizer.model
(SentencePiece, with byte fallback, so no text is ever unknown) or
OUT/tokenizer.json (HuggingFace byte-level BPE); pass that path as the
tokenizer to mmjax (`tokenizers.load`).
"""
import json
import os

from absl import flags

from mmjax import console
from mmjax.data import tokenizers

_INPUT = flags.DEFINE_multi_string("input", None, "Text or JSONL file(s).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_KIND = flags.DEFINE_enum("kind", "sentencepiece", ["sentencepiece", "bpe"], "Tokenizer type.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000,
                                   "Largest vocabulary, special tokens included.")


def read_lines(paths: list[str]):
  """Yields the training texts of text and JSONL files."""
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"--input {path} does not exist")
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if path.endswith(".jsonl"):
          try:
            line = json.loads(line)["text"]
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n} is not a JSON object with a \"text\" field") from e
        yield line.rstrip("\n")


def train_sentencepiece(paths: list[str], out: str, vocab_size: int) -> str:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  specials = tokenizers.SPECIAL_TOKENS
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=read_lines(paths), model_prefix=os.path.join(out, "tokenizer"),
      vocab_size=vocab_size, hard_vocab_limit=False,  # at most, as for BPE: small corpora
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=specials["pad"],
      unk_piece=specials["unk"], bos_piece=specials["bos"], eos_piece=specials["eos"],
      user_defined_symbols=[specials["image"]], minloglevel=2)
  return os.path.join(out, "tokenizer.model")


def train_bpe(paths: list[str], out: str, vocab_size: int) -> str:
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tokenizer = hf.Tokenizer(hf.models.BPE(unk_token=tokenizers.SPECIAL_TOKENS["unk"]))
  tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(tokenizers.SPECIAL_TOKENS.values()),
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(read_lines(paths), trainer)
  path = os.path.join(out, "tokenizer.json")
  tokenizer.save(path)
  return path


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  train = train_sentencepiece if _KIND.value == "sentencepiece" else train_bpe
  path = train(_INPUT.value, _OUT.value, _VOCAB_SIZE.value)
  tokenizer = tokenizers.load(path)
  print(f"wrote {path}: {tokenizer.vocab_size} tokens; pad {tokenizer.pad_id}, bos "
        f"{tokenizer.bos_id}, eos {tokenizer.eos_id}, image {tokenizer.image_id}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "out"])
  console.app_run(main)

"""Tokenizers: byte, SentencePiece and HuggingFace round trips, special tokens, chat layout."""
import random
import sys

import pytest

from mmjax.data import tokenizers
import train_cli

sys.path.insert(0, str(train_cli.ROOT / "tools"))
import train_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

TEXT = "where is the red circle? Ünïcode ✓ and <image> here"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  words = "the a red blue circle square top bottom left right is what where how many".split()
  rng = random.Random(0)
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
  return str(path)


@pytest.mark.parametrize("train", [train_tokenizer.train_sentencepiece, train_tokenizer.train_bpe])
def test_trained_tokenizers_round_trip_with_special_tokens(tmp_path, corpus, train):
  tokenizer = tokenizers.load(train([corpus], str(tmp_path), 400))
  assert 261 < tokenizer.vocab_size <= 400  # 256 bytes + 5 special tokens + merges
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id) == (0, 2, 3, 4)
  ids = tokenizer.encode(TEXT)
  assert ids.count(tokenizer.image_id) == 1  # "<image>" in text is the image token, never split
  plain = TEXT.replace("<image> ", "")
  assert tokenizer.decode(tokenizer.encode(plain)) == plain  # unseen characters survive (bytes)
  with_specials = [tokenizer.bos_id] + tokenizer.encode(plain) + [tokenizer.eos_id,
                                                                  tokenizer.pad_id]
  assert tokenizer.decode(with_specials) == plain
  # Trained merges make frequent words shorter than their bytes.
  assert len(tokenizer.encode("where is the red circle")) < len("where is the red circle") / 2


def test_byte_tokenizer():
  tokenizer = tokenizers.load("bytes")
  assert tokenizer.encode("hé") == [104, 195, 169]
  assert tokenizer.decode([256, 104, 195, 169, 257, 0, 258]) == "hé"
  assert len({tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id}) == 4


def test_bad_tokenizer_files_are_named(tmp_path, corpus):
  with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.model does not exist"):
    tokenizers.load(str(tmp_path / "nope.model"))
  (tmp_path / "vocab.txt").write_text("a")
  with pytest.raises(ValueError, match="expected 'bytes', a SentencePiece .model file"):
    tokenizers.load(str(tmp_path / "vocab.txt"))
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  bare = hf.Tokenizer(hf.models.BPE(unk_token="<unk>"))
  bare.train_from_iterator(["a b c"], hf.trainers.BpeTrainer(special_tokens=["<unk>", "<pad>"]))
  bare.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json has no '<s>' \(bos\) token"):
    tokenizers.load(str(tmp_path / "tokenizer.json"))


def test_conversation_layout_and_loss_mask():
  tokenizer = tokenizers.ByteTokenizer()
  turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"},
           {"from": "human", "value": "and?"}, {"from": "gpt", "value": "no"}]
  ids, mask = tokenizers.encode_conversation(turns, tokenizer, [258, 258])
  text = lambda s: list(s.encode())
  expected = ([256] + text("USER: ") + [258, 258] + text("\nhi ASSISTANT:") + text(" ok") + [257]
              + text("USER: and? ASSISTANT:") + text(" no") + [257])
  assert ids == expected
  loss_on = [i for i, m in enumerate(mask) if m]
  assert [ids[i] for i in loss_on] == text(" ok") + [257] + text(" no") + [257]
  with pytest.raises(ValueError, match="empty conversation"):
    tokenizers.encode_conversation([], tokenizer, [258])
  with pytest.raises(ValueError, match="turn 1 is from 'human'; expected 'gpt'"):
    tokenizers.encode_conversation(turns[:1] * 2, tokenizer, [258])

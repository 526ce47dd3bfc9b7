"""Tokenizers: byte, SentencePiece and HuggingFace round trips, special tokens, chat layout."""
import json
import random
import re
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
  with pytest.raises(ValueError,
                     match=r"tokenizer .*tokenizer.json has no bos token \(looked for '<s>'"):
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


def test_llava_layout_is_the_prompt_transformers_documents_for_llava_1_5():
  """transformers' LlavaForConditionalGeneration documents LLaVA-1.5's prompt (no system
  prompt): the template generate.py uses and the training layout give exactly it."""
  import inspect  # pylint: disable=g-import-not-at-top
  from transformers.models.llava import modeling_llava  # pylint: disable=g-import-not-at-top
  documented = re.search(r'prompt = "(USER: <image>.*? ASSISTANT:)"',
                         inspect.getsource(modeling_llava)).group(1).replace("\\n", "\n")
  question = documented.removeprefix("USER: <image>\n").removesuffix(" ASSISTANT:")
  assert tokenizers.LLAVA_TEMPLATE.replace("{prompt}", question) == documented
  tokenizer = tokenizers.ByteTokenizer()
  ids, mask = tokenizers.encode_conversation(
      [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "A"}],
      tokenizer, [258])
  prompt = ids[1:mask.index(1)]  # after BOS, up to the answer
  assert bytes(i for i in prompt if i != 258).decode() == documented.replace("<image>", "")
  assert prompt.index(258) == len("USER: ")


def test_prompts_place_as_many_images_as_they_are_given():
  bytes_ = tokenizers.ByteTokenizer()
  image = [258, 258]
  # The template places one image; a prompt with its own markers places them itself.
  assert tokenizers.encode_prompt("hi", 1, "<image>{prompt}", image, bytes_) == [
      256, 258, 258, 104, 105]
  assert tokenizers.encode_prompt("a<image>b<image>", 2, "<image>{prompt}", image, bytes_) == [
      256, 97, 258, 258, 98, 258, 258]
  # No marker anywhere: the images go first.
  assert tokenizers.encode_prompt("hi", 2, "{prompt}", image, bytes_)[:5] == [256] + image * 2
  for prompt, count in (("a<image>b<image>", 1), ("a<image>", 2), ("hi", 2), ("hi", 0)):
    with pytest.raises(ValueError, match=r"the prompt places \d images \(<image> markers\) but "
                                         rf"{count} were given"):
      tokenizers.encode_prompt(prompt, count, "<image>{prompt}", image, bytes_)


def test_a_gpt2_style_tokenizer_json_gets_its_specials_and_an_image_token(tmp_path):
  """GPT-2 ships one special token and no tokenizer_config.json names; Llama-style files name
  theirs there. Neither has "<image>" or a pad token."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  tokenizer.train_from_iterator(["a red circle top left", "two squares"] * 20,
                                hf_tokenizers.trainers.BpeTrainer(
                                    vocab_size=300, special_tokens=["<|endoftext|>"],
                                    initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel
                                    .alphabet()))
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  vocab = tokenizer.get_vocab_size()
  loaded = tokenizers.load(str(tmp_path / "tokenizer.json"))
  end = tokenizer.token_to_id("<|endoftext|>")
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (end, end, end)
  assert (loaded.image_id, loaded.vocab_size) == (vocab, vocab + 1)
  ids = tokenizers.encode_prompt("a red circle", 1, "<image>{prompt} ", [loaded.image_id],
                                 loaded)
  assert ids[:2] == [end, vocab] and vocab not in ids[2:]
  assert loaded.decode(ids + [end]) == "a red circle "

  # A tokenizer_config.json beside it names the specials (strings or {"content": ...}).
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>",
       "pad_token": "a"}))
  assert tokenizers.load(str(tmp_path / "tokenizer.json")).pad_id == tokenizer.token_to_id("a")

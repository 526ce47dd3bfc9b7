"""Gemma, Gemma 2 and PaliGemma 1 and 2 in and out, proven against transformers.

Tiny random models are built from configs (no network): Gemma with multi-query
attention, Gemma 2 with grouped-query attention, soft caps that bite, a
query_pre_attn_scalar that is not the head dim and a window shorter than the
prompts, and PaliGemma on each; every norm moved off its initial value. A
PaliGemma prompt is image tokens, BOS, a prefix read both ways and a suffix
read causally.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax import generation
from mmjax import models
from mmjax.data import images as images_lib
from mmjax.data import tokenizers as tokenizers_lib
from mmjax.interop import hf
import hf_parity

RTOL = 1e-4  # max |mmjax - transformers| / max |transformers|
VOCAB, IMAGE, SIZE, PATCH = 120, 119, 28, 14
P = (SIZE // PATCH) ** 2  # image tokens per image
WINDOW = 5  # Gemma 2's local layers: shorter than every prompt below

TEXT = {
    "gemma": dict(model_type="gemma", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, intermediate_size=80, vocab_size=VOCAB),
    # Soft caps of the scores' and logits' own size, so tanh is far from linear.
    "gemma2": dict(model_type="gemma2", hidden_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=80, vocab_size=VOCAB, sliding_window=WINDOW,
                   query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                   final_logit_softcapping=2.0),
}
VISION = dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=48, image_size=SIZE, patch_size=PATCH,
              vision_use_head=False)


def perturbed(model):
  """Norm weights off their initial zeros, so (1 + weight) and a swapped norm would show; the
  LMs' queries and keys scaled up, so attention scores reach the soft cap and the softmax is
  far from uniform (random init's scores are near 0)."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.3 * torch.randn_like(param))
      if ("q_proj" in name or "k_proj" in name) and "vision" not in name:
        param.mul_(8.0)
  return model.eval()


@pytest.fixture(scope="module", params=sorted(TEXT))
def gemma(request, tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.AutoConfig.for_model(**TEXT[request.param])
  model = perturbed(transformers.AutoModelForCausalLM.from_config(config))
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module", params=sorted(TEXT))
def paligemma(request, tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.PaliGemmaConfig(vision_config=VISION, text_config=TEXT[request.param],
                                        image_token_index=IMAGE, vocab_size=VOCAB,
                                        projection_dim=TEXT[request.param]["hidden_size"])
  model = perturbed(transformers.PaliGemmaForConditionalGeneration(config))
  path = str(tmp_path_factory.mktemp(f"pali{request.param}"))
  model.save_pretrained(path)
  return model, path


def build(config):
  return models.build(config["family"], config["model"])


TOKENS = np.random.RandomState(1).randint(3, 110, (2, 13))


def lm_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_gemma_parity(gemma):
  model, path = gemma
  config, params = hf.load(path)
  assert config["model"]["flavour"] == model.config.model_type
  logits, _ = build(config).apply({"params": params}, jnp.asarray(TOKENS))
  expected = lm_logits(model, TOKENS)
  assert hf_parity.relative_error(logits, expected) < RTOL
  if model.config.model_type == "gemma2":  # each Gemma 2 rule is needed to match
    for wrong in (dict(sliding_window=None), dict(attn_soft_cap=None),
                  dict(final_soft_cap=None), dict(query_scalar=None)):
      logits, _ = models.build("lm", {**config["model"], **wrong}).apply(
          {"params": params}, jnp.asarray(TOKENS))
      assert hf_parity.relative_error(logits, expected) > 10 * RTOL, wrong


def test_gemma_export_round_trip(gemma, tmp_path):
  model, path = gemma
  reloaded = hf_parity.export_and_reload(model, path, tmp_path)
  hf_parity.assert_same_tensors(path, str(tmp_path))
  assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types",
                                                                  None)
  np.testing.assert_array_equal(lm_logits(reloaded, TOKENS), lm_logits(model, TOKENS))


def test_gemma_kv_cache_generation_matches_transformers(gemma):
  """Greedy decoding through the cache past the window: the local layers' mask counts
  cache slots."""
  model, path = gemma
  config, params = hf.load(path)
  prompt, n = TOKENS[:, :4], 2 * WINDOW
  with torch.no_grad():
    theirs = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, pad_token_id=0)
  generate = jax.jit(generation.make_generate(build(config),
                                              generation.Sampling(max_new_tokens=n)))
  out = generate(params, jnp.asarray(prompt), jnp.full((2,), 4), None, jax.random.key(0))
  np.testing.assert_array_equal(out["tokens"], theirs[:, 4:].numpy())


def inputs():
  """Two prompts: image tokens, BOS, then text; prefixes of 6 and 9 text tokens (longer than
  the window), the rest the suffix."""
  rs = np.random.RandomState(0)
  images = rs.randn(2, SIZE, SIZE, 3).astype(np.float32)
  tokens = np.concatenate([np.full((2, P), IMAGE), np.full((2, 1), 2),
                           rs.randint(3, 110, (2, 12))], axis=1)
  prefix = np.array([P + 1 + 6, P + 1 + 9])
  return tokens, images, prefix


def hf_logits(model, tokens, images, prefix):
  token_types = np.arange(tokens.shape[1])[None] >= prefix[:, None]
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens),
                 pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                 token_type_ids=torch.tensor(token_types.astype(np.int64))).logits.numpy()


def test_paligemma_parity_with_prefix_and_suffix(paligemma):
  model, path = paligemma
  config, params = hf.load(path)
  assert config["family"] == "early_fusion"
  assert config["model"]["lm"]["flavour"] == model.config.text_config.model_type
  tokens, images, prefix = inputs()
  ours = build(config)
  logits, _ = ours.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(images[:, None]),
                         prefix_len=jnp.asarray(prefix))
  expected = hf_logits(model, tokens, images, prefix)
  assert hf_parity.relative_error(logits, expected) < RTOL
  # The prefix's two-way attention is what matches: the causal mask misses.
  causal, _ = ours.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(images[:, None]))
  assert hf_parity.relative_error(causal, expected) > 10 * RTOL


def test_prefix_lm_sees_later_prefix_tokens_never_later_suffix_ones(paligemma):
  _, path = paligemma
  config, params = hf.load(path)
  tokens, images, prefix = inputs()
  run = jax.jit(lambda t: build(config).apply(
      {"params": params}, t, jnp.asarray(images[:, None]), prefix_len=jnp.asarray(prefix))[0])
  base = run(jnp.asarray(tokens))
  last_prefix = prefix[0] - 1
  changed = run(jnp.asarray(tokens).at[0, last_prefix].set(7 if tokens[0, last_prefix] != 7
                                                           else 8))
  differs = np.abs(np.asarray(changed - base)[0]).max(-1) > 1e-6
  assert differs[:last_prefix].all()  # every earlier position, image tokens included
  suffix_token = prefix[0] + 2
  changed = run(jnp.asarray(tokens).at[0, suffix_token].set(7 if tokens[0, suffix_token] != 7
                                                            else 8))
  np.testing.assert_array_equal(np.asarray(changed)[0, :suffix_token],
                                np.asarray(base)[0, :suffix_token])
  np.testing.assert_array_equal(np.asarray(changed)[1], np.asarray(base)[1])


def test_paligemma_export_round_trip(paligemma, tmp_path):
  model, path = paligemma
  reloaded = hf_parity.export_and_reload(model, path, tmp_path)
  hf_parity.assert_same_tensors(path, str(tmp_path))
  tokens, images, prefix = inputs()
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, images, prefix),
                                hf_logits(model, tokens, images, prefix))


def test_paligemma_greedy_generation_matches_transformers(paligemma):
  """The prompt (image, BOS, prefix) prefilled both ways, the answer decoded causally past the
  window, prompts of two lengths left-padded."""
  model, path = paligemma
  config, params = hf.load(path)
  tokens, images, prefix = inputs()
  n = 2 * WINDOW
  theirs = []
  for row in range(2):
    prompt = tokens[row:row + 1, :prefix[row]]
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor(prompt),
                           pixel_values=torch.tensor(images[row:row + 1].transpose(0, 3, 1, 2)),
                           token_type_ids=torch.zeros_like(torch.tensor(prompt)),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    theirs.append(out[0, prompt.shape[1]:].numpy())
  prompts, lengths = generation.left_pad([list(tokens[r, :prefix[r]]) for r in range(2)], 0)
  generate = jax.jit(generation.make_generate(
      build(config), generation.Sampling(max_new_tokens=n), prefix_lm=True))
  out = generate(params, jnp.asarray(prompts), jnp.asarray(lengths),
                 jnp.asarray(images[:, None]), jax.random.key(0))
  np.testing.assert_array_equal(out["tokens"], np.stack(theirs))


def test_unsupported_fields_name_the_field(paligemma):
  _, path = paligemma
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  text = {**config["text_config"], "use_bidirectional_attention": None}  # a plain LM's
  if text["model_type"] == "gemma2":
    with pytest.raises(ValueError, match="layer_types"):
      hf.mmjax_config({**text, "layer_types": ["full_attention", "sliding_attention",
                                               "sliding_attention"]})
  with pytest.raises(ValueError, match="projection_dim"):
    hf.mmjax_config({**config, "projection_dim": 7})
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    hf.mmjax_config({**text, "use_bidirectional_attention": True})



def byte_tokenizer(directory) -> str:
  """A tokenizer.json of bytes (no merges) with Gemma's <pad> <eos> <bos> and PaliGemma's
  <image>, a pair typed 0 (prefix) and 1 (suffix) as Gemma's tokenizer types them."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  model = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                            use_regex=False)
  model.decoder = tokenizers.decoders.ByteLevel()
  model.add_special_tokens([tokenizers.AddedToken(t, special=True)
                            for t in ("<pad>", "<eos>", "<bos>", "<image>")])
  model.post_processor = tokenizers.processors.TemplateProcessing(single="$A:0",
                                                                  pair="$A:0 $B:1")
  model.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
               "eos_token": "<eos>", "pad_token": "<pad>"}, f)
  return os.path.join(directory, "tokenizer.json")


def test_inputs_match_paligemma_processor(tmp_path):
  """PaliGemmaProcessor's input_ids, token types and pixels; mmjax's layout
  (tokenizers.encode_prefix_lm, images.from_bytes + normalise) gives the same."""
  from transformers.models.siglip import image_processing_pil_siglip  # pylint: disable=g-import-not-at-top
  path = byte_tokenizer(str(tmp_path))
  image_processor = image_processing_pil_siglip.SiglipImageProcessorPil(
      size={"height": SIZE, "width": SIZE})
  image_processor.image_seq_length = P
  processor = transformers.PaliGemmaProcessor(
      image_processor=image_processor,
      tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<bos>",
                                                     eos_token="<eos>", pad_token="<pad>"))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 17), (28, 60))]
  prompts, answers = ["caption en", "answer en what is it?"], ["a cat on a mat", "two dogs"]
  theirs = processor(images=images, text=prompts, suffix=answers, padding="longest",
                     return_tensors="np")
  mine = tokenizers_lib.load(path)
  for b in range(2):
    ids, loss = tokenizers_lib.encode_prefix_lm(prompts[b], answers[b], [mine.image_id] * P,
                                                mine)
    real = theirs["attention_mask"][b].astype(bool)
    np.testing.assert_array_equal(theirs["input_ids"][b][real], ids)
    np.testing.assert_array_equal(theirs["token_type_ids"][b][real], loss)
    pixels = images_lib.normalise(images_lib.from_bytes(images[b], SIZE, resize="bicubic"),
                                  0.5, 0.5)
    np.testing.assert_allclose(pixels, theirs["pixel_values"][b].transpose(1, 2, 0), atol=1e-5)
  assert processor.image_token_id == mine.image_id


def test_scenes_in_paligemma_layout():
  """data.prefix_lm: image tokens, BOS, the question (a caption's "caption en") and "\\n", read
  both ways up to prefix_len; the loss from the answer's first token on."""
  from mmjax.data import synthetic  # pylint: disable=g-import-not-at-top
  source = synthetic.ShapeScenes(8, None, 16, P, task="mixed", prefix_lm=True)
  batch = source.batch(0)
  tokenizer = source.tokenizer
  assert batch["prefix_len"].shape == (8,) and batch["prefix_len"].dtype == np.int32
  kinds = set()
  for b, prefix in enumerate(batch["prefix_len"]):
    tokens, weights = batch["tokens"][b], batch["loss_weights"][b]
    assert (tokens[:P] == tokenizer.image_id).all() and tokens[P] == tokenizer.bos_id
    assert tokens[prefix - 1] == ord("\n")
    prompt = tokenizer.decode(tokens[P + 1:prefix - 1])
    kinds.add("caption" if prompt == tokenizers_lib.CAPTION_PREFIX else "question")
    assert not weights[:prefix - 1].any() and weights[prefix - 1] == 1  # target: the answer's
  assert kinds == {"caption", "question"}


def test_prefix_lm_data_is_checked_before_reading():
  from configs import early_fusion  # pylint: disable=g-import-not-at-top
  from mmjax.data import sources  # pylint: disable=g-import-not-at-top
  config = early_fusion.get_config("paligemma2-3b-224,lora")
  spec = sources.batch_spec(config)
  assert spec["prefix_len"].shape == (config.batch_size,)
  assert spec["tokens"].shape == (config.batch_size, 256 + 64)
  for key, value, message in (("name", "llava", "lays out a prompt and its answer"),
                              ("pack", 2, "one example a row")):
    bad = early_fusion.get_config("paligemma2-3b-224")
    bad.data[key] = value
    bad.data.json = bad.data.image_dir = "x"
    with pytest.raises(ValueError, match=message):
      sources.check(bad)

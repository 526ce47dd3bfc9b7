"""Decoding: the cached path equals the full forward pass; batching, beams and sampling."""
import itertools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import generation
from mmjax.data import anyres
from mmjax.data import patches
from mmjax.models import deep_fusion
from mmjax.models import early_fusion
from mmjax.models import lm
from mmjax.models import vit

IMG = 9  # image token id in these tests
VIT = dict(variant="mu/8", image_size=16, pool="none")  # 4 tokens per 16 px image


def init(model, *inputs):
  return nn.unbox(model.init(jax.random.key(0), *inputs))["params"]


def open_gates(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) if "gate" in jax.tree_util.keystr(path) else x, params)


def cached_logits(model, params, prompts, images, continuation):
  """Logits predicting continuation[:, i] through prefill + extend: float32[B, N, V]."""
  tokens, lengths = generation.left_pad(prompts, pad_id=0)
  N = continuation.shape[1]
  logits, state = generation.prefill(model, params, tokens, lengths, images, tokens.shape[1] + N)
  steps = [logits]
  for i in range(N - 1):
    logits, state = generation.extend(model, params, continuation[:, i], state)
    steps.append(logits)
  return np.stack(steps, axis=1)


def full_logits(model, params, prompt, images, continuation):
  """One row alone, no cache: logits at the positions that predict the continuation."""
  sequence = jnp.array([list(prompt) + list(continuation)])
  inputs = (sequence,) if images is None else (sequence, images)
  logits, _ = model.apply({"params": params}, *inputs)
  return np.asarray(logits[0, len(prompt) - 1:len(prompt) - 1 + len(continuation)])


def check_consistency(model, params, prompts, images, generated):
  """At every generated position: cached logits == full-pass logits, and greedy tokens agree."""
  cached = cached_logits(model, params, prompts, images, generated)
  for b, prompt in enumerate(prompts):
    row_images = None if images is None else jax.tree.map(lambda x: x[b:b + 1], images)
    full = full_logits(model, params, prompt, row_images, np.asarray(generated[b]))
    np.testing.assert_allclose(cached[b], full, atol=2e-5, rtol=1e-5)
  return cached


def greedy(model, params, prompts, images, n, **sampling):
  tokens, lengths = generation.left_pad(prompts, pad_id=0)
  generate = jax.jit(generation.make_generate(model, generation.Sampling(max_new_tokens=n,
                                                                        **sampling)))
  return generate(params, tokens, lengths, images, jax.random.key(0))


@pytest.mark.parametrize("fields", [
    dict(variant="gpt2-tiny"),
    dict(variant="llama-tiny"),
    dict(variant="llama-tiny", scan_layers=True),
], ids=["gpt2", "llama", "llama-scan"])
def test_lm_cached_logits_equal_full_pass(fields):
  model = lm.Model(**fields)
  params = init(model, jnp.ones((1, 8), jnp.int32))
  prompts = [[256, 72, 105, 33, 10], [256, 65], [256, 1, 2, 3]]
  out = greedy(model, params, prompts, None, 6)
  cached = check_consistency(model, params, prompts, None, out["tokens"])
  # The while_loop chose the argmax of the (equal) logits at every step.
  np.testing.assert_array_equal(out["tokens"], np.argmax(cached, axis=-1))
  expected = np.take_along_axis(jax.nn.log_softmax(cached), np.asarray(out["tokens"])[..., None],
                                axis=-1).sum(axis=(1, 2))
  np.testing.assert_allclose(out["logprobs"], expected, rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_prefix_lm_generation_equals_the_prefix_lm_forward_pass(method):
  # A model trained with a bidirectional prompt (prefix_len) decodes with that mask: the
  # cached logits equal a full pass with prefix_len = the prompt, and differ from causal ones.
  model = early_fusion.Model(vit=VIT, lm=dict(variant="llama-tiny"), image_token_id=IMG)
  P = 4
  prompts = [[256] + [IMG] * P + [70, 71, 72], [256] + [IMG] * P + [80]]
  images = jax.random.normal(jax.random.key(1), (2, 1, 16, 16, 3))
  params = init(model, jnp.array(prompts[:1]), images[:1])
  tokens, lengths = generation.left_pad(prompts, pad_id=0)
  sampling = generation.Sampling(method=method, max_new_tokens=4, beam_size=2)
  out = jax.jit(generation.make_generate(model, sampling, prefix_lm=True))(
      params, tokens, lengths, images, jax.random.key(0))
  for b, prompt in enumerate(prompts):
    answer = list(np.asarray(out["tokens"][b]))
    sequence = jnp.array([prompt + answer])
    full, _ = model.apply({"params": params}, sequence, images[b:b + 1],
                          prefix_len=jnp.array([len(prompt)]))
    causal, _ = model.apply({"params": params}, sequence, images[b:b + 1])
    logits, state = generation.prefill(model, params, tokens[b:b + 1], lengths[b:b + 1],
                                       images[b:b + 1], tokens.shape[1] + 4, prefix_lm=True)
    cached = [logits]
    for token in answer[:-1]:
      logits, state = generation.extend(model, params, jnp.array([token]), state)
      cached.append(logits)
    want = full[0, len(prompt) - 1:len(prompt) + 3]
    np.testing.assert_allclose(np.concatenate(cached), want, atol=2e-5, rtol=1e-5)
    assert np.abs(causal[0, len(prompt) - 1] - want[0]).max() > 1e-3  # the mask matters


def test_early_fusion_cached_logits_equal_full_pass():
  model = early_fusion.Model(vit=VIT, lm=dict(variant="gpt2-tiny"), image_token_id=IMG)
  P = 4
  prompts = [[256] + [IMG] * P + [70, 71, 72], [256] + [IMG] * P + [80]]
  images = jax.random.normal(jax.random.key(1), (2, 1, 16, 16, 3))
  params = init(model, jnp.array(prompts[:1]), images[:1])
  out = greedy(model, params, prompts, images, 5)
  cached = check_consistency(model, params, prompts, images, out["tokens"])
  np.testing.assert_array_equal(out["tokens"], np.argmax(cached, axis=-1))
  # The images matter: other images give other logits.
  other = cached_logits(model, params, prompts, -images, out["tokens"])
  assert np.abs(other - cached).max() > 1e-3


def test_anyres_early_fusion_decodes_images_of_two_sizes():
  # LLaVA-NeXT's AnyRes: a 16 x 40 and a 36 x 12 px image, 2 x 2 patches a 16 px tile.
  pinpoints = ((16, 32), (32, 16), (16, 48))
  model = early_fusion.Model(vit=VIT, lm=dict(variant="gpt2-tiny"), image_token_id=IMG,
                             grid_pinpoints=pinpoints)
  sizes = [(16, 40), (36, 12)]
  counts = [anyres.num_tokens(size, pinpoints, 16, 8) for size in sizes]
  prompts = [[256] + [IMG] * counts[0] + [70, 71], [256] + [IMG] * counts[1] + [80]]
  pixels = np.asarray(jax.random.normal(jax.random.key(1), (2, 4, 16, 16, 3)))
  packed = anyres.Layout(pinpoints, 16, 8).pack(
      [[(pixels[b], anyres.token_sources(size, pinpoints, 16, 8))] for b, size in enumerate(sizes)])
  images = early_fusion.Tiles(jnp.asarray(packed["images"]), jnp.asarray(packed["image_sources"]))
  params = init(model, jnp.array(prompts[:1]), jax.tree.map(lambda x: x[:1], images))
  out = greedy(model, params, prompts, images, 4)
  cached = check_consistency(model, params, prompts, images, out["tokens"])
  np.testing.assert_array_equal(out["tokens"], np.argmax(cached, axis=-1))
  assert counts[0] != counts[1]


@pytest.mark.parametrize("rule", ["previous", "latest"])
def test_deep_fusion_cached_logits_equal_full_pass(rule):
  model = deep_fusion.Model(vit=VIT, lm=dict(variant="llama-tiny"), image_token_id=IMG,
                            cross_every=1, media_attention=rule)
  images = jax.random.normal(jax.random.key(1), (2, 2, 16, 16, 3))
  prompts = [[256, IMG, 40, 41, 42], [256, 50, IMG, 51]]
  params = open_gates(init(model, jnp.array(prompts[:1]), images[:1]))
  out = greedy(model, params, prompts, images, 5)
  check_consistency(model, params, prompts, images, out["tokens"])
  # A marker generated mid-answer brings in the second image from that token on.
  forced = jnp.array([[60, IMG, 61, 62], [IMG, 63, 64, 65]])
  cached = check_consistency(model, params, prompts, images, forced)
  only_first = images.at[:, 1].set(0.0)
  before = cached_logits(model, params, prompts, only_first, forced)
  np.testing.assert_allclose(before[0, :2], cached[0, :2], atol=1e-6)  # image 2 not yet seen
  assert np.abs(before[0, 2:] - cached[0, 2:]).max() > 1e-3


def test_deep_fusion_decodes_mixed_size_images():
  # Native-resolution images, packed: row 0 a 16 x 8 then a 16 x 16 image, row 1 a 8 x 24 one.
  model = deep_fusion.Model(vit={**VIT, "variant": "mu/4"}, lm=dict(variant="llama-tiny"),
                            image_token_id=IMG, cross_every=1)
  rng = np.random.default_rng(1)
  tall, square, wide = (rng.standard_normal((h, w, 3)).astype(np.float32)
                        for h, w in [(16, 8), (16, 16), (8, 24)])
  images = vit.Patches(*(jnp.asarray(x) for x in patches.pack(
      [[tall, square], [wide]], 4, slots=28, max_images=2, cls=False).values()))
  prompts = [[256, IMG, 40, IMG, 41], [256, 50, IMG, 51]]
  params = open_gates(init(model, jnp.array(prompts[:1]), jax.tree.map(lambda x: x[:1], images)))
  out = greedy(model, params, prompts, images, 5)
  cached = check_consistency(model, params, prompts, images, out["tokens"])
  np.testing.assert_array_equal(out["tokens"], np.argmax(cached, axis=-1))


def test_deep_fusion_projects_visual_keys_once():
  model = deep_fusion.Model(vit=VIT, lm=dict(variant="llama-tiny"), image_token_id=IMG,
                            cross_every=1)
  images = jax.random.normal(jax.random.key(1), (1, 1, 16, 16, 3))
  prompt = jnp.array([[256, IMG, 40]])
  params = open_gates(init(model, prompt, images))
  _, state = generation.prefill(model, params, prompt, jnp.array([3]), images, 8)
  # One cache per cross block, holding the 4 visual tokens' keys; extending reuses them.
  assert [c.k.shape for c in state["cross"]] == [(1, 4, 2, 16)] * 2
  _, after = generation.extend(model, params, jnp.array([41]), state)
  assert all(a is b for a, b in zip(after["cross"], state["cross"]))


def test_batch_decodes_like_each_prompt_alone():
  model = lm.Model("llama-tiny")
  params = init(model, jnp.ones((1, 8), jnp.int32))
  prompts = [[256, 10, 11, 12, 13, 14, 15], [256], [256, 20, 21]]
  batch = greedy(model, params, prompts, None, 8)
  for b, prompt in enumerate(prompts):
    alone = greedy(model, params, [prompt], None, 8)
    np.testing.assert_array_equal(batch["tokens"][b], alone["tokens"][0])
    np.testing.assert_allclose(batch["logprobs"][b], alone["logprobs"][0], rtol=1e-5)


def test_eos_stops_a_row_and_pads_the_rest():
  model = lm.Model("gpt2-tiny")
  params = init(model, jnp.ones((1, 8), jnp.int32))
  prompts = [[256, 10, 11], [256, 30], [256, 99, 98, 97]]
  free = np.asarray(greedy(model, params, prompts, None, 6)["tokens"])
  eos = int(free[0, 2])  # row 0 emits it by its third token; make it the EOS
  out = greedy(model, params, prompts, None, 6, eos_id=eos, pad_id=0)
  stopped = 0
  for b, row in enumerate(free):
    stop = int(np.argmax(row == eos)) + 1 if eos in row else 6
    stopped += stop < 6
    assert int(out["lengths"][b]) == stop
    np.testing.assert_array_equal(out["tokens"][b, :stop], row[:stop])
    np.testing.assert_array_equal(out["tokens"][b, stop:], 0)
  assert stopped  # row 0 at least


def test_beam_search_is_exact_with_enough_beams():
  # With V ** (N - 1) beams nothing is ever pruned: the result is the best sequence overall.
  model = lm.Model("llama-tiny", vocab_size=6)
  params = init(model, jnp.ones((1, 4), jnp.int32))
  prompt, N = [1, 2], 3
  out = greedy(model, params, [prompt], None, N, method="beam", beam_size=36)
  candidates = jnp.array([prompt + list(c) for c in itertools.product(range(6), repeat=N)])
  logprobs = jax.nn.log_softmax(model.apply({"params": params}, candidates)[0])
  scores = sum(logprobs[:, len(prompt) - 1 + i][jnp.arange(len(candidates)), candidates[:, 2 + i]]
               for i in range(N))
  best = int(jnp.argmax(scores))
  np.testing.assert_array_equal(out["tokens"][0], candidates[best, 2:])
  np.testing.assert_allclose(out["logprobs"][0], scores[best], rtol=1e-5)
  # One beam is greedy search.
  np.testing.assert_array_equal(
      greedy(model, params, [prompt], None, N, method="beam", beam_size=1)["tokens"],
      greedy(model, params, [prompt], None, N)["tokens"])


def test_filter_logits_keeps_what_top_k_and_top_p_promise():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(generation.filter_logits(logits, generation.Sampling(
      method="sample", **kw)))[0].tolist()
  assert keep(top_k=3) == [True, True, True, False]
  assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 needs the 0.3 too
  assert keep(top_p=0.5) == [True, False, False, False]
  assert keep(top_p=0.1) == [True, False, False, False]  # the top token always survives
  scaled = generation.filter_logits(logits, generation.Sampling(method="sample", temperature=0.5))
  np.testing.assert_allclose(scaled, logits * 2)


def test_sampling_follows_the_filtered_distribution():
  model = lm.Model("gpt2-tiny", vocab_size=8)
  params = init(model, jnp.ones((1, 4), jnp.int32))
  prompt = [[1, 2]] * 2000
  out = greedy(model, params, prompt, None, 1, method="sample", top_k=3)
  logits = model.apply({"params": params}, jnp.array(prompt[:1]))[0][0, -1]
  top3 = np.argsort(-np.asarray(logits))[:3]
  expected = np.asarray(jax.nn.softmax(logits[top3]))
  counts = np.bincount(np.asarray(out["tokens"][:, 0]), minlength=8)
  assert counts[np.setdiff1d(np.arange(8), top3)].sum() == 0
  np.testing.assert_allclose(counts[top3] / 2000, expected, atol=0.04)
  # top_k=1 is greedy.
  one = greedy(model, params, prompt[:2], None, 4, method="sample", top_k=1)
  np.testing.assert_array_equal(one["tokens"], greedy(model, params, prompt[:2], None, 4)["tokens"])


def test_bad_sampling_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="sampling method must be one of"):
    generation.Sampling(method="nucleus")
  with pytest.raises(ValueError, match="top_p must be in"):
    generation.Sampling(method="sample", top_p=0.0)
  with pytest.raises(ValueError, match="needs at least one token"):
    generation.left_pad([[1], []], 0)


def test_generating_past_the_lms_positions_is_an_error_before_compiling():
  model = lm.Model("gpt2-tiny", max_len=16)
  params = init(model, jnp.ones((1, 8), jnp.int32))
  tokens, lengths = generation.left_pad([[256, 1, 2, 3, 4, 5]], pad_id=0)
  generate = generation.make_generate(model, generation.Sampling(max_new_tokens=11))
  with pytest.raises(ValueError, match=r"prompts of 6 tokens and 11 new ones need 17 positions; "
                                       r"the LM has max_len=16"):
    jax.jit(generate).lower(params, tokens, lengths, None, jax.random.key(0))
  # Within the table: runs, and every logit is finite.
  out = jax.jit(generation.make_generate(model, generation.Sampling(max_new_tokens=10)))(
      params, tokens, lengths, None, jax.random.key(0))
  assert out["tokens"].shape == (1, 10) and np.isfinite(out["logprobs"]).all()


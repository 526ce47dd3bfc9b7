"""Generation for every mmjax model: prefill a KV cache once, then extend it a token at a time.

Einsum letters as in `models.layers`: B batch, T prompt length, S cache slots,
V vocabulary, W beams, N new tokens.

Prompts of different lengths are left-padded to one length T: row b's prompt
fills slots [T - len_b, T) and every row writes its next token to the same
slot. Masks hide the padding and positions count from each row's first real
token, so a row decodes exactly as it would alone. The whole generation is one
`lax.while_loop` inside one jitted function: no Python runs per token.

  generate = generation.make_generate(model, generation.Sampling(method="greedy", eos_id=257))
  out = jax.jit(generate)(params, tokens, lengths, images, jax.random.key(0))
  out["tokens"]  # int32[B, N], pad_id after each row's EOS

Early fusion runs the ViT and projector once, in the prefill. Deep fusion
encodes the images once and projects each cross block's visual keys and values
once; each new token sees the images its position may see (a generated image
marker counts as one).
"""
import dataclasses

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import deep_fusion
from mmjax.models import early_fusion
from mmjax.models import layers
from mmjax.models import lm as lm_lib

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to choose each next token."""

  method: str = "greedy"  # or "sample", "beam"
  max_new_tokens: int = 32
  eos_id: int | None = None  # None: always generate max_new_tokens
  pad_id: int = 0  # written after a row's EOS
  temperature: float = 1.0  # "sample": logits are divided by it
  top_k: int = 0  # "sample": keep the k most likely tokens; 0 keeps all
  top_p: float = 1.0  # "sample": keep the smallest set holding this much probability
  beam_size: int = 4  # "beam"
  length_penalty: float = 1.0  # "beam": the best beam maximises logprob / length ** this

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"sampling method must be one of {METHODS}, got {self.method!r}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use method='greedy'), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0 or self.beam_size < 1:
      raise ValueError(f"top_k must be >= 0 and beam_size >= 1, got {self.top_k}, "
                       f"{self.beam_size}")


def left_pad(prompts: list[list[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens int32[B, T] right-aligned, lengths int32[B]).

  T = width (a fixed width compiles once for every batch), else the longest prompt.
  """
  if not all(prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  longest = max(len(p) for p in prompts)
  if width is not None and longest > width:
    raise ValueError(f"a prompt of {longest} tokens does not fit the prompt width {width}")
  width = width or longest
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, prompt in enumerate(prompts):
    tokens[b, width - len(prompt):] = prompt
  return tokens, np.array([len(p) for p in prompts], np.int32)


# ----------------------------------------------------------------------------
# Prefill and extend: the cached forward pass of each model family.
# ----------------------------------------------------------------------------


def prefill(model: nn.Module, params, tokens: jax.Array, lengths: jax.Array,
            images: jax.Array | None, cache_len: int,
            prefix_lm: bool = False) -> tuple[jax.Array, dict]:
  """Runs the prompts into fresh caches of cache_len slots.

  tokens: int[B, T] left-padded; lengths: int[B]; images: float[B, I, H, W, 3]
  or None (text only; not for the LM). prefix_lm: the prompt attends to itself
  both ways, as a model trained with `prefix_len` over image + prompt
  (PaliGemma) saw it; new tokens stay causal. -> (logits float32[B, V] for the
  next token, state for `extend`).
  """
  B, T = tokens.shape
  if cache_len < T:
    raise ValueError(f"cache_len={cache_len} is shorter than the prompts ({T} tokens)")
  # Positions past the LM's table would read outside it (NaN logits, silently): say so first.
  max_len = model.apply({"params": params}, method=lambda m: m.language.max_len)
  if cache_len > max_len:
    raise ValueError(f"prompts of {T} tokens and {cache_len - T} new ones need {cache_len} "
                     f"positions; the LM has max_len={max_len}: shorten them")
  start = (T - lengths).astype(jnp.int32)  # first real slot of each row
  slots = jnp.arange(T)
  # Causal over cache slots (a local layer's window counts slots, which in a row are its
  # positions), the prompt bidirectional when prefix_lm, the left padding never seen.
  mask = layers.Mask(causal=True, prefix_len=jnp.full((B,), T) if prefix_lm else None,
                     explicit=jnp.arange(cache_len) >= start[:, None, None])  # [B, 1, S]
  positions = jnp.maximum(slots[None, :] - start[:, None], 0)
  state = {"start": start}

  if isinstance(model, deep_fusion.Model) and images is not None:
    def run(m):
      keys, key_image = m.visual_keys(images, m.encode_images(images))
      is_marker = tokens == m.image_token_id
      media = deep_fusion.media_attention_mask(is_marker, key_image, m.media_attention)
      logits, aux = m.run_language(tokens, keys, media, positions=positions, mask=mask,
                                   caches=lm_lib.empty_caches(m.language, B, cache_len))
      seen, oldest = deep_fusion.media_window(is_marker, m.media_attention)
      return logits, aux, (seen[:, -1], oldest[:, -1], is_marker[:, -1]), key_image
    logits, aux, window, key_image = model.apply({"params": params}, method=run)
    state.update(cross=aux["cross_caches"], window=window,
                 image_of_key=jnp.broadcast_to(key_image, (B, key_image.shape[-1])))
  else:
    def run(m):
      x = m.language.embed_tokens(tokens)
      if isinstance(m, early_fusion.Model) and images is not None:
        x = early_fusion.splice(x, m.embed_images(images), tokens == m.image_token_id,
                                early_fusion.present(images))
      return m.language.from_embeddings(x, mask=mask, positions=positions,
                                        caches=lm_lib.empty_caches(m.language, B, cache_len))
    logits, aux = model.apply({"params": params}, method=run)
  state["caches"] = aux["caches"]
  return logits[:, -1], state


def extend(model: nn.Module, params, token: jax.Array, state: dict) -> tuple[jax.Array, dict]:
  """Feeds one new token per row: token int[B] -> (logits float32[B, V], state)."""
  caches = state["caches"]
  first = caches[0] if isinstance(caches, list) else caches
  end = first.end.reshape(-1)[0]  # stacked (scanned) caches carry one end per layer
  cache_len = first.k.shape[-3]
  start = state["start"]
  mask = layers.Mask(causal=True, q_offset=end,
                     explicit=jnp.arange(cache_len) >= start[:, None, None])  # [B, 1, S]
  positions = (end - start)[:, None]
  tokens = token[:, None]
  state = dict(state)

  if "cross" in state:
    def run(m):
      seen, oldest, after_marker = state["window"]
      is_marker = token == m.image_token_id
      seen, oldest = deep_fusion.next_window(seen, oldest, after_marker, is_marker,
                                             m.media_attention)
      media = deep_fusion.visible_images(seen, oldest, state["image_of_key"])
      media = layers.Mask(explicit=media[:, None])  # [B, 1, I * R]
      logits, aux = m.run_language(tokens, state["cross"], media, positions=positions,
                                   mask=mask, caches=caches)
      return logits, aux, (seen, oldest, is_marker)
    logits, aux, state["window"] = model.apply({"params": params}, method=run)
  else:
    def run(m):
      return m.language.from_embeddings(m.language.embed_tokens(tokens), mask=mask,
                                        positions=positions, caches=caches)
    logits, aux = model.apply({"params": params}, method=run)
  state["caches"] = aux["caches"]
  return logits[:, -1], state


# ----------------------------------------------------------------------------
# Choosing tokens.
# ----------------------------------------------------------------------------


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature, then top-k, then top-p: logits float32[B, V] with dropped tokens at -inf."""
  logits = logits / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    drop_sorted = before >= sampling.top_p  # the most likely token is always kept
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


# ----------------------------------------------------------------------------
# The loops.
# ----------------------------------------------------------------------------


def make_generate(model: nn.Module, sampling: Sampling, prefix_lm: bool = False):
  """-> generate(params, tokens, lengths, images, rng) -> {"tokens", "lengths", "logprobs"}.

  tokens: int[B, T] left-padded prompts, lengths: int[B], images: float[B, I, H,
  W, 3] or None, rng: a key (used by "sample"). Returns tokens int32[B, N] (N =
  max_new_tokens, pad_id after EOS), lengths int32[B] (EOS included) and the
  summed model log-probabilities float32[B] of the generated tokens. Jit it;
  its shapes are static. prefix_lm: see `prefill`.
  """
  if isinstance(model, deep_fusion.Model):
    model, decoding_params = deep_fusion.for_decoding(model)
  else:
    decoding_params = lambda params: params
  if sampling.method == "beam":
    search = _beam_search(model, sampling, prefix_lm)
    return lambda params, *args: search(decoding_params(params), *args)

  def generate(params, tokens, lengths, images, rng):
    params = decoding_params(params)
    B, T = tokens.shape
    N = sampling.max_new_tokens
    logits, state = prefill(model, params, tokens, lengths, images, T + N, prefix_lm)

    def cond(carry):
      return (carry["i"] < N) & ~jnp.all(carry["done"])

    def body(carry):
      logprobs = jax.nn.log_softmax(carry["logits"], axis=-1)
      if sampling.method == "greedy":
        token = jnp.argmax(carry["logits"], axis=-1)
      else:
        key = jax.random.fold_in(rng, carry["i"])
        token = jax.random.categorical(key, filter_logits(carry["logits"], sampling))
      token = jnp.where(carry["done"], sampling.pad_id, token).astype(jnp.int32)
      chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
      live = ~carry["done"]
      done = carry["done"] | (token == sampling.eos_id if sampling.eos_id is not None else False)
      logits, state = extend(model, params, token, carry["state"])
      return {"i": carry["i"] + 1, "logits": logits, "state": state, "done": done,
              "tokens": carry["tokens"].at[:, carry["i"]].set(token),
              "lengths": carry["lengths"] + live,
              "logprobs": carry["logprobs"] + jnp.where(live, chosen, 0.0)}

    carry = {"i": jnp.zeros((), jnp.int32), "logits": logits, "state": state,
             "done": jnp.zeros((B,), bool), "tokens": jnp.full((B, N), sampling.pad_id, jnp.int32),
             "lengths": jnp.zeros((B,), jnp.int32), "logprobs": jnp.zeros((B,), jnp.float32)}
    carry = jax.lax.while_loop(cond, body, carry)
    return {k: carry[k] for k in ("tokens", "lengths", "logprobs")}

  return generate


def _take_rows(state: dict, rows: jax.Array) -> dict:
  """The decoding state of batch rows `rows` (int[B']), e.g. the parents of new beams."""
  def take_cache(cache: layers.KVCache) -> layers.KVCache:
    axis = cache.k.ndim - 4  # stacked caches lead with a layer axis
    return cache.replace(k=jnp.take(cache.k, rows, axis=axis), v=jnp.take(cache.v, rows, axis=axis))

  state = dict(state)
  for key in ("caches", "cross"):
    if key in state:
      state[key] = jax.tree.map(take_cache, state[key],
                                is_leaf=lambda x: isinstance(x, layers.KVCache))
  for key in ("start", "window", "image_of_key"):
    if key in state:
      state[key] = jax.tree.map(lambda x: x[rows], state[key])
  return state


def _beam_search(model: nn.Module, sampling: Sampling, prefix_lm: bool):
  """Beam search over W = beam_size beams per prompt, all of them in the batch at once.

  A finished beam keeps its score and may only continue with padding, so it
  competes with the live beams until the loop ends; the best beam then
  maximises logprob / length ** length_penalty.
  """
  W, N = sampling.beam_size, sampling.max_new_tokens

  def generate(params, tokens, lengths, images, rng):
    del rng  # beam search is deterministic
    B, T = tokens.shape
    logits, state = prefill(model, params, tokens, lengths, images, T + N, prefix_lm)
    rows = jnp.repeat(jnp.arange(B), W)  # beam w of prompt b is row b * W + w
    logits, state = logits[rows], _take_rows(state, rows)
    V = logits.shape[-1]
    # Every beam starts identical: only the first may expand, or all W would pick the same tokens.
    scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (W - 1), jnp.float32), (B, 1))

    def cond(carry):
      return (carry["i"] < N) & ~jnp.all(carry["done"])

    def body(carry):
      logprobs = jax.nn.log_softmax(carry["logits"], axis=-1).reshape(B, W, V)
      only_pad = jnp.full((V,), -jnp.inf).at[sampling.pad_id].set(0.0)
      logprobs = jnp.where(carry["done"][..., None], only_pad, logprobs)
      candidates = (carry["scores"][..., None] + logprobs).reshape(B, W * V)
      scores, best = jax.lax.top_k(candidates, W)  # [B, W]
      parent, token = best // V, (best % V).astype(jnp.int32)
      was_done = jnp.take_along_axis(carry["done"], parent, axis=1)
      done = was_done | (token == sampling.eos_id if sampling.eos_id is not None else False)
      beam_tokens = jnp.take_along_axis(carry["tokens"], parent[..., None], axis=1)
      beam_tokens = beam_tokens.at[:, :, carry["i"]].set(token)
      beam_lengths = jnp.take_along_axis(carry["lengths"], parent, axis=1) + ~was_done
      rows = (jnp.arange(B)[:, None] * W + parent).reshape(-1)
      logits, state = extend(model, params, token.reshape(-1), _take_rows(carry["state"], rows))
      return {"i": carry["i"] + 1, "logits": logits, "state": state, "done": done,
              "scores": scores, "tokens": beam_tokens, "lengths": beam_lengths}

    carry = {"i": jnp.zeros((), jnp.int32), "logits": logits, "state": state,
             "done": jnp.zeros((B, W), bool), "scores": scores,
             "tokens": jnp.full((B, W, N), sampling.pad_id, jnp.int32),
             "lengths": jnp.zeros((B, W), jnp.int32)}
    carry = jax.lax.while_loop(cond, body, carry)
    normalised = carry["scores"] / jnp.maximum(carry["lengths"], 1) ** sampling.length_penalty
    best = jnp.argmax(normalised, axis=1)[:, None]  # [B, 1]
    pick = lambda x: jnp.take_along_axis(x, best.reshape(B, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]
    return {"tokens": pick(carry["tokens"]), "lengths": pick(carry["lengths"]),
            "logprobs": pick(carry["scores"])}

  return generate

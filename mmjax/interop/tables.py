"""The table machinery every HuggingFace family's mapping is written in.

One table per architecture lists, for every HuggingFace tensor (by its name on
disk), the mmjax parameter paths it becomes and the two conversions, so import
and export cannot drift apart.

Layout conventions: torch Linear weights are [out, in], mmjax kernels [in, out];
attention kernels are split into heads, [D, N, H] in and [N, H, D] out; conv
kernels are [D, 3, p, p] in torch and [p, p, 3, D] here.
"""
from collections.abc import Callable
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HuggingFace tensor <-> one or more mmjax parameters (or, with a tuple of names,
  several HuggingFace tensors <-> one parameter)."""
  hf: str | tuple[str, ...]
  paths: tuple[str, ...]  # "/"-joined mmjax parameter paths
  to_mmjax: Callable  # hf array(s) -> tuple of mmjax arrays
  to_hf: Callable  # tuple of mmjax arrays -> hf array (a tuple of them for a tuple of names)

  @property
  def names(self) -> tuple[str, ...]:
    return self.hf if isinstance(self.hf, tuple) else (self.hf,)


def same(hf, path):
  return Entry(hf, (path,), lambda t: (t,), lambda a: a[0])


def linear(hf, path):  # torch [out, in] <-> [in, out]
  return Entry(hf, (path,), lambda t: (t.T,), lambda a: a[0].T)


def reshaped(hf, path, shape, hf_shape=(-1,)):
  return Entry(hf, (path,), lambda t: (t.reshape(shape),), lambda a: a[0].reshape(hf_shape))


def heads_in(hf, path, heads, head_dim):  # [N*H, D] <-> [D, N, H]
  return Entry(hf, (path,), lambda t: (t.T.reshape(-1, heads, head_dim),),
               lambda a: a[0].reshape(a[0].shape[0], -1).T)


def heads_out(hf, path, heads, head_dim):  # [D, N*H] <-> [N, H, D]
  return Entry(hf, (path,), lambda t: (t.T.reshape(heads, head_dim, -1),),
               lambda a: a[0].reshape(heads * head_dim, -1).T)


def fused_qkv(hf, paths, heads, head_dim, transpose):
  """One [3D, D] (torch) or [D, 3D] (GPT-2's Conv1D) tensor <-> query/key/value [D, N, H]."""
  def to_mmjax(t):
    t = t.T if transpose else t  # -> [D, 3D] for matrices; biases stay [3D]
    return tuple(part.reshape(*part.shape[:-1], heads, head_dim)
                 for part in np.split(t, 3, axis=-1))

  def to_hf(parts):
    t = np.concatenate([p.reshape(*p.shape[:-2], -1) for p in parts], axis=-1)
    return t.T if transpose else t

  return Entry(hf, tuple(paths), to_mmjax, to_hf)


def split_rows(hf: tuple[str, str], path, rows: int, transpose=False):
  """Two torch tensors whose rows continue one another (IDEFICS' decoupled vocabulary: the
  base rows, then the additional ones) <-> one parameter ([V, D], or [D, V] transposed)."""
  def to_mmjax(base, extra):
    table = np.concatenate([base, extra], axis=0)
    return (table.T if transpose else table,)

  def to_hf(a):
    table = a[0].T if transpose else a[0]
    return table[:rows], table[rows:]

  return Entry(tuple(hf), (path,), to_mmjax, to_hf)


def conv(hf, path):  # [D, 3, p, p] <-> [p, p, 3, D]
  return Entry(hf, (path,), lambda t: (t.transpose(2, 3, 1, 0),),
               lambda a: a[0].transpose(3, 2, 0, 1))


def norm(hf, path, bias=True):
  entries = [same(f"{hf}.weight", f"{path}/scale")]
  if bias:
    entries.append(same(f"{hf}.bias", f"{path}/bias"))
  return entries


def dense(hf, path, bias=True):
  entries = [linear(f"{hf}.weight", f"{path}/kernel")]
  if bias:
    entries.append(same(f"{hf}.bias", f"{path}/bias"))
  return entries


def attention(hf, path, names, heads, kv_heads, head_dim, bias):
  """Separate q/k/v/o projections (ViT, CLIP, SigLIP, Llama)."""
  q, k, v, o = names
  entries = [heads_in(f"{hf}.{q}.weight", f"{path}/query/kernel", heads, head_dim),
             heads_in(f"{hf}.{k}.weight", f"{path}/key/kernel", kv_heads, head_dim),
             heads_in(f"{hf}.{v}.weight", f"{path}/value/kernel", kv_heads, head_dim),
             heads_out(f"{hf}.{o}.weight", f"{path}/out/kernel", heads, head_dim)]
  if bias:
    entries += [reshaped(f"{hf}.{q}.bias", f"{path}/query/bias", (heads, head_dim)),
                reshaped(f"{hf}.{k}.bias", f"{path}/key/bias", (kv_heads, head_dim)),
                reshaped(f"{hf}.{v}.bias", f"{path}/value/bias", (kv_heads, head_dim)),
                same(f"{hf}.{o}.bias", f"{path}/out/bias")]
  return entries



ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "silu": "swiglu"}


def require(cfg: dict, field: str, allowed, what: str):
  value = cfg.get(field)
  if value not in allowed:
    raise ValueError(f"{what}: config.json field {field!r}={value!r} is not supported "
                     f"(mmjax handles {list(allowed)})")
  return value


def activation(cfg: dict, field: str, what: str, allowed: tuple) -> str:
  return ACTIVATIONS[require(cfg, field, allowed, what)]


def rope_fields(cfg: dict, what: str) -> dict:
  """A Llama-style config.json's RoPE -> lm.Model's rope_theta and rope_scaling."""
  rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "linear", "llama3"):
    raise ValueError(f"{what}: config.json field 'rope_parameters.rope_type'={kind!r} is not "
                     "supported (mmjax handles ['default', 'linear', 'llama3'])")
  scaling = None if kind == "default" else {"rope_type": kind, **{
      k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k in rope}}
  return dict(rope_theta=float(theta), rope_scaling=scaling)


def rope_config(fields) -> dict:
  """An lm.Model's RoPE fields -> config.json's rope_parameters."""
  theta, scaling = fields.rope_theta, fields.rope_scaling
  return {"rope_theta": theta, **(scaling or {"rope_type": "default"})}

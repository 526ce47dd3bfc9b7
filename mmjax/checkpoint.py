"""Checkpoint helpers: loading pretrained parts into a larger model."""
import jax


def graft(params: dict, parts: dict) -> dict:
  """Returns params with top-level subtrees replaced, e.g. parts={"vit": vit_params, "lm": lm_params}.

  Loads a pretrained ViT or LM into a fusion model, whose "vit" and "lm"
  subtrees carry the plain models' names. Every path and shape must match; a
  mismatch is an error naming the parameter.
  """
  params = dict(params)
  for name, part in parts.items():
    if name not in params:
      raise ValueError(f"model has no parameter subtree {name!r}; it has {sorted(params)}")
    want = dict(jax.tree_util.tree_flatten_with_path(params[name])[0])
    got = dict(jax.tree_util.tree_flatten_with_path(part)[0])
    for path in [*want, *(p for p in got if p not in want)]:  # model order: first error first
      where = f"{name}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
      if path not in got:
        raise ValueError(f"pretrained {name!r} lacks parameter {where}")
      if path not in want:
        raise ValueError(f"pretrained {name!r} has unexpected parameter {where}")
      if want[path].shape != got[path].shape:
        raise ValueError(f"parameter {where}: model expects shape {want[path].shape}, "
                         f"pretrained has {got[path].shape}")
    params[name] = jax.tree.map(lambda new, old: new.astype(old.dtype), part, params[name])
  return params

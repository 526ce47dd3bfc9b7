"""Checkpoints: an Orbax CheckpointManager under DIR/checkpoints, and loading pretrained parts.

A checkpoint holds the train state (params, optimizer state, step, NaN counters), the
data iterator's state and the config, each as an Orbax item. Orbax lists a
step folder even without its commit marker and raises on a corrupt latest
step; `Checkpointer.restore_latest` checks and falls back to older steps
itself, warning with the name of each step it passes over, and moves those
aside so the run can write them again. A save that fails (a full disk) is an
error in a line naming the step and the newest complete one, which it leaves
intact.
"""
import contextlib
import functools
import json
import logging
import os
import re

from etils import epath
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mmjax import distributed
from mmjax import lora
from mmjax import models
from mmjax import sharding
from mmjax.data import sources

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
# Beside checkpoints/: where the steps a restore passed over go (kept, not deleted).
SET_ASIDE = "checkpoints.unreadable"


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


class Checkpointer:
  """Saves and restores train state + data state + config under workdir/checkpoints."""

  def __init__(self, workdir: str, *, max_to_keep: int, keep_every: int | None,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        # The directory is made by the first save: a run that stops on an error first leaves none.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, create=False))
    self.pending = None  # the step of the save that may still be writing

  def save(self, step: int, state, data_state: dict, config: dict):
    """Saves asynchronously; a non-finite state is refused, never written. The previous save's
    failure, if it failed in the background, is raised here (and by `check` and `close`)."""
    finite = jax.device_get(_finite_leaves(state))  # one transfer of one bool per leaf
    if not all(jax.tree.leaves(finite)):
      bad = [_path(p) for p, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
      raise FloatingPointError(f"refusing to save checkpoint step {step}: non-finite values in "
                               f"{bad[:3]}")
    with self._saving(self.pending):
      self.manager.wait_until_finished()
    with self._saving(step):
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config)), force=True)
    self.pending = step
    if not saved and step not in self.manager.all_steps():
      raise RuntimeError(f"Orbax declined to save checkpoint step {step} in {self.directory} "
                         f"(latest is {self.manager.latest_step()})")

  def restore_latest(self, abstract_state):
    """-> (state, data_state, step) from the newest restorable step, or None when there is none.

    abstract_state: jax.ShapeDtypeStructs carrying the target shardings, so a
    checkpoint written on another mesh or device count restores onto this one.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for n, step in enumerate(steps):
      step_dir = os.path.join(self.directory, str(step))
      problem = None
      if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
        problem = "incomplete (no commit marker)"
      else:
        self.check_tree(step, abstract_state)
        try:
          restored = _read_step(step_dir, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"unreadable ({_cause(e)})"
      # Each process reads its own shards: one that cannot must take every process back with it.
      # (Orbax's own restore ends in a barrier the failing process never reaches, so the read
      # above is its handlers' alone, and this is the only collective.)
      failing = distributed.processes_without(problem is None)
      if failing:
        log.warning("checkpoint step %d (%s) is %s; falling back to an older step", step,
                    step_dir, problem or f"unreadable on process {failing[0]} (its log says why)")
        continue
      if n:
        aside = self._set_aside(steps[:n])
        log.warning("resuming from checkpoint step %d, not the newer %s (above), which moved "
                    "to %s so the run can write them again", step, steps[:n], aside)
      return restored["state"], restored["data"], step
    if steps:
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored (steps {steps}); "
                         "move them away to start afresh")
    return None

  def resume_point(self) -> str:
    """What the same command run again resumes from, in words."""
    steps = complete_steps(self.directory)
    if not steps:
      return "no checkpoint is complete yet: the same command on every process starts at step 0"
    return (f"the same command on every process resumes from checkpoint step {steps[0]} "
            f"({self.directory}/{steps[0]})")

  def check_tree(self, step: int, abstract_state):
    """Raises, naming the parameter, when the checkpoint's tree differs from the model's."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return  # unreadable metadata: the restore itself reports and falls back
    saved = getattr(saved, "tree", saved)
    if saved is None:
      return
    try:
      _compare_trees(f"checkpoint step {step}", saved, abstract_state)
    except ValueError as e:
      raise ValueError(f"{e}: {self.directory} holds the run of another model or optimizer; "
                       "give this one a new --workdir (or move that checkpoints/ away)") from None

  def saved_config(self, step: int) -> dict:
    """The config a checkpoint was saved with, as JSON."""
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def check(self):
    """Raises a background save's failure, if one has failed by now; does not wait."""
    with self._saving(self.pending):
      self.manager.check_for_errors()

  def close(self):
    """Waits for pending saves; their errors surface here, never swallowed."""
    with self._saving(self.pending):
      self.manager.close()

  @contextlib.contextmanager
  def _saving(self, step: int | None):
    """Orbax's failure to write `step` as one line naming the newest complete step, intact."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      complete = complete_steps(self.directory)
      intact = (f"checkpoint step {complete[0]} ({self.directory}/{complete[0]}) is intact and "
                "the same command resumes from it" if complete else "no checkpoint is complete")
      raise OSError(f"saving checkpoint step {step} in {self.directory} failed ({_cause(e)}); "
                    f"{intact} once the storage is fixed") from None

  def _set_aside(self, steps: list[int]) -> str:
    """Moves the step folders a restore passed over to checkpoints.unreadable/ (process 0, every
    process waiting for it) -> that directory."""
    aside = os.path.join(os.path.dirname(self.directory), SET_ASIDE)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target, copy = os.path.join(aside, str(step)), 1
        while os.path.exists(target):  # set aside before: keep both
          copy += 1
          target = os.path.join(aside, f"{step}.{copy}")
        os.rename(os.path.join(self.directory, str(step)), target)
    distributed.wait_for_everyone("mmjax/set_aside")
    self.manager.reload()
    return aside


FSDP_OVER_ALL_DEVICES = {"data": 1, "fsdp": -1, "tensor": 1}


def _read_step(step_dir: str, abstract_state) -> dict:
  """A step's train state and data state, read by this process alone (no barrier)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    state = handler.restore(epath.Path(step_dir) / "state",
                            args=ocp.args.StandardRestore(abstract_state))
  finally:
    handler.close()
  data = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / "data",
                                             args=ocp.args.JsonRestore())
  return {"state": state, "data": data}


def _cause(error: Exception) -> str:
  """The part of an Orbax or TensorStore error a person reads: the OS error where there is one
  (TensorStore appends it to a long spec), else the first line of the first cause, cut short."""
  while error.__cause__ is not None:  # Orbax wraps TensorStore's error in a vaguer one
    error = error.__cause__
  text = str(error).strip()
  os_error = re.search(r"([^:]+) \[os_error_code='(\d+)'\]", text)
  if os_error:
    return f"{os_error.group(1).strip()}, errno {os_error.group(2)}"
  first = text.splitlines()[0] if text else type(error).__name__
  first = first.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
  return first if len(first) <= 240 else first[:240] + "..."


def complete_steps(checkpoints: str) -> list[int]:
  """The steps under a checkpoints/ directory with their commit marker, newest first."""
  names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
  return sorted((int(n) for n in names
                 if n.isdigit() and os.path.exists(os.path.join(checkpoints, n, COMMIT_MARKER))),
                reverse=True)


def model_files(directory: str) -> tuple[dict, str, str | None, str]:
  """Where read_model finds a model, its parameters left unread: a training workdir (its newest
  committed checkpoint) or a params-only export -> (the config read_model returns, before
  adapters are merged; the Orbax directory of the parameters; the subtree holding them there,
  "params" of a train state, or None; the tokenizer)."""
  imported = os.path.join(directory, "mmjax_config.json")
  if os.path.exists(imported):
    with open(imported) as f:
      config = json.load(f)
    params_dir, subtree = os.path.join(directory, "params"), None
    tokenizer = tokenizer_file(directory) or "bytes"
  else:
    checkpoints = os.path.abspath(os.path.join(directory, "checkpoints"))
    steps = complete_steps(checkpoints)
    if not steps:
      raise FileNotFoundError(f"{directory} has neither mmjax_config.json nor a complete "
                              "checkpoints/<step>")
    with ocp.CheckpointManager(checkpoints, item_handlers={
        "config": ocp.JsonCheckpointHandler()}) as manager:
      run_config = manager.restore(steps[0], args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    config = {"family": run_config["family"], "model": run_config["model"]}
    data = run_config.get("data", {})
    if "image_mean" in data:
      config["pixels"] = {"mean": data["image_mean"], "std": data["image_std"]}
    if data.get("name") in sources.SOURCES:
      config["template"] = sources.SOURCES[data["name"]].template
    if data.get("max_patches"):  # trained on images at their own sizes
      config["max_patches"] = data["max_patches"]
    if data.get("prefix_lm"):  # trained on PaliGemma's layout
      config["prefix_lm"] = True
    adapters = lora.settings(ml_collections.ConfigDict(run_config.get("optimizer", {})))
    if adapters is not None:
      config["lora"] = adapters.to_dict()
    params_dir, subtree = os.path.join(checkpoints, str(steps[0]), "state"), "params"
    tokenizer = data.get("tokenizer") or "bytes"
    if tokenizer == "bytes" and run_config.get("init_from"):  # started from an import
      tokenizer = tokenizer_file(run_config["init_from"]) or "bytes"
  return config, params_dir, subtree, tokenizer


def params_location(directory: str, key: str) -> tuple[dict, str, str | None, str]:
  """model_files for config `key` (config.init_from, a tower): one-line errors for a directory
  that holds no model, and for a run of LoRA adapters (they must be merged first)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{key}={directory} is not a directory")
  try:
    found = model_files(directory)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{key}: {e} (tools/import_hf.py or export_hf.py --format=params "
                            "writes the first, train.py the second)") from None
  if "lora" in found[0]:
    raise ValueError(f"{key}={directory} trained LoRA adapters: merge them first "
                     "(tools/export_hf.py --format=params) and give that directory")
  return found


def read_model(directory: str, mesh: jax.sharding.Mesh | None = None,
               merge_adapters: bool = True) -> tuple[dict, dict, str]:
  """A model to run or export: its parameters only (never the optimizer state), sharded.

  directory: a training workdir (its newest committed checkpoint) or a
  params-only export (mmjax_config.json + params/, from tools/export_hf.py
  --format=params or tools/import_hf.py).
  mesh: where the parameters go, by the "fsdp" rules; default: all devices, so
  a model too large for one device is read straight into its shards.
  -> ({"family", "model", "pixels": {"mean", "std"} when images were
  normalised, "template": how the training data laid out a prompt, "lora": the run's
  optimizer.lora when it trained adapters, "max_patches": when it read images at their own
  sizes, "prefix_lm": when it read PaliGemma's layout}, params (adapters merged into their kernels
  unless merge_adapters=False), the tokenizer: the run's config.data.tokenizer, the
  import's tokenizer file, or "bytes").
  """
  config, params_dir, subtree, tokenizer = model_files(directory)
  mesh = mesh or sharding.make_mesh(FSDP_OVER_ALL_DEVICES)
  optimizer = ml_collections.ConfigDict({"lora": config.get("lora")})
  boxed = lora.add(models.abstract_params(config["family"], config["model"]), optimizer)
  target = _placed(boxed, mesh, sharding.rules("fsdp"))
  params = _restore_params(os.path.abspath(params_dir), target, subtree)
  if merge_adapters and "lora" in config:
    params = jax.jit(functools.partial(lora.merge, optimizer=optimizer))(params)
    del config["lora"]  # what is returned is a plain model
  return config, params, tokenizer


def _placed(boxed: dict, mesh: jax.sharding.Mesh, rules) -> dict:
  """Boxed abstract params -> ShapeDtypeStructs carrying their shardings by `rules`: what a
  restore reads straight into each device's shards."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), sharding.param_shardings(boxed, mesh, rules))


def _restore_params(directory: str, target, subtree: str | None, unused: tuple[str, ...] = ()):
  """Reads target's arrays (ShapeDtypeStructs with shardings) from an Orbax tree, or from its
  `subtree` only (the params of a train state: its other items are never read), never reading
  the top-level subtrees named in `unused`."""
  with ocp.PyTreeCheckpointer() as ckpt:
    saved = ckpt.metadata(directory).item_metadata.tree
    saved = saved[subtree] if subtree else saved
    _compare_trees(f"params checkpoint {directory}",
                   {k: v for k, v in saved.items() if k not in unused}, target)
    item = {subtree: target} if subtree else target
    restored = ckpt.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=bool(subtree or unused)))
  return restored[subtree] if subtree else restored


def tokenizer_file(directory: str) -> str:
  """A model directory's tokenizer: tokenizer.json (HuggingFace) or tokenizer.model
  (SentencePiece), or "" when it has none."""
  return next((os.path.join(directory, name) for name in ("tokenizer.json", "tokenizer.model")
               if os.path.exists(os.path.join(directory, name))), "")


def save_params(directory: str, params) -> None:
  """A params-only Orbax checkpoint (for serving, or to start another run from)."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(directory), params)


def load_params(directory: str, target, unused: tuple[str, ...] = (),
                subtree: str | None = None):
  """Reads a params-only checkpoint (or the `subtree` of one, "params" of a train state) into
  target (ShapeDtypeStructs with shardings), skipping the top-level subtrees named in `unused`
  (a classifier's "head" when its ViT serves as a vision tower).

  A tree that differs from the model's is an error naming the parameter.
  """
  return _restore_params(os.path.abspath(directory), target, subtree, unused)


def load_model_params(directory: str, target, subtree: str | None, family: str,
                      saved_fields: dict, fields: dict, mesh: jax.sharding.Mesh, rules) -> dict:
  """load_params of a whole model (config.init_from) saved with `saved_fields` into one with
  `fields`: where one's LM is scanned and the other's is not, read in the saved layout, sharded
  by `rules`, then stacked or split into the target's shards (models.relayout)."""
  if models.scanned(family, saved_fields) == models.scanned(family, fields):
    return load_params(directory, target, subtree=subtree)
  saved = load_params(directory, _placed(models.abstract_params(family, saved_fields), mesh,
                                         rules), subtree=subtree)
  relaid = lambda p: jax.tree.map(lambda x, t: x.astype(t.dtype), models.relayout(
      family, p, saved_fields, fields), target)
  return jax.jit(relaid, out_shardings=jax.tree.map(lambda t: t.sharding, target))(saved)


def _compare_trees(what: str, saved, target):
  saved_shapes = {_path(p): m.shape for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = _path(path)
    if name not in saved_shapes:
      raise ValueError(f"{what} lacks {name!r}, which the model has")
    if tuple(saved_shapes.pop(name)) != tuple(leaf.shape):
      raise ValueError(f"{what}: {name!r} has another shape than the model's {leaf.shape}")
  if saved_shapes:
    raise ValueError(f"{what} has {sorted(saved_shapes)[0]!r}, which the model lacks")


def graft(params: dict, parts: dict) -> dict:
  """params with top-level subtrees replaced: parts={"vit": vit_params, "lm": lm_params}.

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
      where = f"{name}/{_path(path)}"
      if path not in got:
        raise ValueError(f"pretrained {name!r} lacks parameter {where}")
      if path not in want:
        raise ValueError(f"pretrained {name!r} has unexpected parameter {where}")
      if want[path].shape != got[path].shape:
        raise ValueError(f"parameter {where}: model expects shape {want[path].shape}, "
                         f"pretrained has {got[path].shape}")
    params[name] = jax.tree.map(lambda new, old: new.astype(old.dtype), part, params[name])
  return params

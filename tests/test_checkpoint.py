"""Tests of the Orbax checkpointer: fallback, tree checks, cross-mesh restore, refusal of NaN."""
import os
import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax import sharding


def make_state(value: float):
  return {"params": {"dense": {"kernel": jnp.full((8, 16), value), "bias": jnp.full((16,), value)}},
          "step": jnp.array(int(value), jnp.int32)}


def abstract(state, shardings=None):
  return jax.tree.map(lambda x, s=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      *([shardings] if shardings is not None else []))


def single_device(state):
  return jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)


def saved(tmp_path, steps, **kwargs):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=kwargs.pop("max_to_keep", 5),
                                 keep_every=None, **kwargs)
  for step in steps:
    ckpt.save(step, make_state(float(step)), {"next_step": step + 1}, {"note": "test"})
  ckpt.close()
  return pathlib.Path(ckpt.directory)


def restore(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, keep_every=None)
  state = make_state(0.0)
  try:
    return ckpt.restore_latest(abstract(state, single_device(state)))
  finally:
    ckpt.close()


def test_roundtrip_with_data_state(tmp_path):
  saved(tmp_path, [1, 2])
  state, data_state, step = restore(tmp_path)
  assert step == 2 and data_state == {"next_step": 3}
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], 2.0)
  assert (pathlib.Path(tmp_path) / "checkpoints" / "2" / "config").exists()


def test_nothing_to_restore(tmp_path):
  assert restore(tmp_path) is None


def test_incomplete_latest_falls_back(tmp_path, caplog):
  directory = saved(tmp_path, [1, 2])
  os.remove(directory / "2" / checkpoint.COMMIT_MARKER)
  state, _, step = restore(tmp_path)
  assert step == 1
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], 1.0)
  assert "checkpoint step 2" in caplog.text and "incomplete" in caplog.text


def test_corrupt_latest_falls_back(tmp_path, caplog):
  directory = saved(tmp_path, [1, 2])
  for path in (directory / "2" / "state").rglob("*"):
    if path.is_file() and path.name != checkpoint.COMMIT_MARKER:
      path.write_bytes(b"garbage")
  state, _, step = restore(tmp_path)
  assert step == 1
  np.testing.assert_array_equal(state["params"]["dense"]["bias"], 1.0)
  assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text


def truncate_array_files(step_dir):
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64 and "metadata" not in path.name.lower():
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def remove_manifests(step_dir):  # OCDBT's index of where each array's bytes are
  for path in (step_dir / "state").rglob("manifest.ocdbt"):
    path.unlink()


def empty_step(step_dir):
  step_dir.parent.joinpath("3").mkdir()  # a newer step folder with nothing in it


@pytest.mark.parametrize("breakage,newest,expected", [
    (truncate_array_files, 2, 1), (remove_manifests, 2, 1), (empty_step, 3, 2)],
                         ids=["truncated", "no_manifest", "empty_step"])
def test_broken_newest_step_falls_back_naming_both_steps(tmp_path, caplog, breakage, newest,
                                                         expected):
  """What a half-written save on shared storage leaves: restore warns, naming the step it skips
  and the one it resumes from, and never starts from step 0 while an older step is readable."""
  directory = saved(tmp_path, [1, 2])
  breakage(directory / "2")
  state, data_state, step = restore(tmp_path)
  assert step == expected and data_state == {"next_step": expected + 1}
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], float(expected))
  assert f"checkpoint step {newest}" in caplog.text
  assert f"resuming from checkpoint step {expected}, not the newer {[newest]}" in caplog.text
  # The step passed over is kept aside, and the run can write that step again.
  assert sorted(os.listdir(tmp_path / checkpoint.SET_ASIDE)) == [str(newest)]
  saved(tmp_path, [newest])
  assert restore(tmp_path)[2] == newest


def test_missing_tree_metadata_still_restores_exactly(tmp_path):
  # Orbax's tree metadata files gone, the arrays and their index intact: the model gives the
  # tree, so the step restores, bit for bit.
  directory = saved(tmp_path, [1, 2])
  for path in (directory / "2" / "state").rglob("*metadata*"):
    if path.is_file():
      path.unlink()
  state, _, step = restore(tmp_path)
  assert step == 2
  np.testing.assert_array_equal(state["params"]["dense"]["kernel"], 2.0)


def test_all_unrestorable_is_an_error(tmp_path):
  directory = saved(tmp_path, [1])
  os.remove(directory / "1" / checkpoint.COMMIT_MARKER)
  with pytest.raises(RuntimeError, match=r"could be restored \(steps \[1\]\)"):
    restore(tmp_path)


def test_mismatched_tree_names_the_parameter(tmp_path):
  saved(tmp_path, [1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, keep_every=None)
  other = make_state(0.0)
  other["params"]["dense"]["kernel"] = jnp.zeros((8, 32))
  with pytest.raises(ValueError, match=r"'params/dense/kernel' has another shape"):
    ckpt.restore_latest(abstract(other, single_device(other)))
  other = make_state(0.0)
  other["params"]["extra"] = {"scale": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"lacks 'params/extra/scale'"):
    ckpt.restore_latest(abstract(other, single_device(other)))
  ckpt.close()


def test_non_finite_state_is_never_saved(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, keep_every=None)
  bad = make_state(1.0)
  bad["params"]["dense"]["bias"] = bad["params"]["dense"]["bias"].at[3].set(jnp.nan)
  with pytest.raises(FloatingPointError, match=r"step 7: non-finite values in \['params/dense/bias'\]"):
    ckpt.save(7, bad, {}, {})
  ckpt.close()
  assert 7 not in ckpt.manager.all_steps()


def test_keep_every_keeps_old_steps(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=4)
  for step in range(1, 10):
    ckpt.save(step, make_state(float(step)), {}, {})
  ckpt.close()
  assert sorted(ckpt.manager.all_steps()) == [4, 8, 9]


def test_restore_fsdp8_onto_fsdp_tp4(tmp_path):
  # Written on 8 devices with FSDP, read on 4 devices with FSDP x TP: the same values.
  mesh8 = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  state = {"params": {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)}}
  written = jax.device_put(state, {"params": {"w": NamedSharding(mesh8, P("fsdp", None))}})
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=None)
  ckpt.save(3, written, {"next_step": 4}, {})
  ckpt.close()

  mesh4 = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
  target = {"params": {"w": NamedSharding(mesh4, P("fsdp", "tensor"))}}
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=None)
  restored, _, step = ckpt.restore_latest(abstract(state, target))
  ckpt.close()
  assert step == 3
  w = restored["params"]["w"]
  assert w.sharding == target["params"]["w"] and len(w.sharding.device_set) == 4
  assert {s.data.shape for s in w.addressable_shards} == {(32, 16)}
  np.testing.assert_array_equal(w, state["params"]["w"])


def test_graft_errors_name_the_subtree():
  params = {"lm": {"w": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"model has no parameter subtree 'vit'"):
    checkpoint.graft(params, {"vit": {}})
  with pytest.raises(ValueError, match=r"pretrained 'lm' has unexpected parameter lm/v"):
    checkpoint.graft(params, {"lm": {"w": jnp.zeros(2), "v": jnp.zeros(1)}})
  with pytest.raises(ValueError, match=r"pretrained 'lm' lacks parameter lm/w"):
    checkpoint.graft(params, {"lm": {}})

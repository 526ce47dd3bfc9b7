"""Checks shared by the tests that compare an import or export with transformers."""
import os

import jax
import numpy as np
from safetensors.numpy import load_file

from mmjax.interop import hf


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: errors against the scale of what is compared."""
  theirs = np.asarray(theirs)
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def export_and_reload(model, path, out):
  """hf.load -> hf.save -> hf.load gives identical params; returns transformers' reload."""
  config, params = hf.load(path)
  hf.save(str(out), config, params)
  again_config, again = hf.load(str(out))
  assert again_config == config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  return type(model).from_pretrained(str(out)).eval()


def assert_same_tensors(original_dir: str, exported_dir: str):
  """Every tensor of original_dir/model.safetensors, and no other, bit for bit in exported_dir's."""
  original, exported = (load_file(os.path.join(d, "model.safetensors"))
                        for d in (original_dir, exported_dir))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def open_gates(model, gate: str):
  """transformers starts every tanh gate at 0, which would hide the image path: sets the
  parameters whose name holds `gate` uniform in [-1, 1], and moves the norms and embeddings
  off their initial values so a mapping that swapped them would show."""
  import torch  # pylint: disable=g-import-not-at-top: only the parity tests have it
  with torch.no_grad():
    for name, param in model.named_parameters():
      if gate in name:
        param.uniform_(-1, 1)
      elif "norm" in name or "embedding" in name:
        param.add_(0.1 * torch.randn_like(param))

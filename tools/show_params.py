"""Prints a config's parameters: path, shape, count, logical axes and sharding on a mesh.

  python tools/show_params.py --config configs/deep_fusion.py:base
  python tools/show_params.py --config configs/lm.py:tiny --config.mesh.rules=fsdp_tp \\
      --config.mesh.shape.tensor=2

Nothing is allocated: shapes come from jax.eval_shape. The sharding column is
the PartitionSpec each parameter gets on this machine's devices.
"""
import pathlib
import sys

import jax
from ml_collections import config_flags

from mmjax import console
from mmjax import steps

# Config files import their siblings as `configs.common`: the repository root must be importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].")


def rows(config) -> list[tuple[str, tuple[int, ...], int, tuple, str]]:
  """(path, shape, size, logical axes, mesh PartitionSpec) for every parameter."""
  run = steps.setup(config)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  out = []
  for (path, leaf), axes, placed in zip(
      jax.tree_util.tree_flatten_with_path(run.abstract_state["params"])[0],
      jax.tree.leaves(run.param_axes, is_leaf=is_spec), jax.tree.leaves(run.params_sharding)):
    out.append((jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape, leaf.size,
                tuple(axes), str(placed.spec)))
  return out


def main(argv):
  del argv
  table = rows(_CONFIG.value)
  width = max(len(r[0]) for r in table)
  for path, shape, size, axes, spec in table:
    print(f"{path:<{width}}  {str(shape):<22} {size:>12,}  {str(axes):<34} {spec}")
  print(f"{'total':<{width}}  {'':<22} {sum(r[2] for r in table):>12,}  on "
        f"{jax.device_count()} device(s), rules {_CONFIG.value.mesh.rules!r}")


if __name__ == "__main__":
  console.app_run(main)

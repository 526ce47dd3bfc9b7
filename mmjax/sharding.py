"""Meshes and logical-axis rules: the one place that maps model axes to devices.

Models name their axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`;
activations `act_batch`, `act_len`, `act_embed`); a preset of rules maps the
names onto the mesh axes `data`, `fsdp` and `tensor`.
"""
from collections.abc import Sequence
import logging
import math

from flax import linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both

RULES = {
    # Replicated parameters, batch split over every device.
    "dp": (("act_batch", BATCH_AXES),),
    # ZeRO-3 style: parameters split on their width axis over `fsdp`, gathered per layer.
    "fsdp": (("act_batch", BATCH_AXES), ("embed", "fsdp")),
    # FSDP plus Megatron tensor parallelism over heads, MLP and vocabulary.
    "fsdp_tp": (("act_batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"),
                ("heads", "tensor"), ("vocab", "tensor")),
}


def mesh_shape(shape: dict, num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh.shape (one axis may be -1 = the rest) against the device count."""
  sizes = [int(shape[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh.shape: at most one axis may be -1, got {dict(shape)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape {dict(shape)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh.shape {dict(shape)} needs {math.prod(sizes)} devices, "
                     f"but there are {num_devices}")
  return tuple(sizes)


def make_mesh(shape: dict, devices: Sequence[jax.Device] | None = None,
              dcn: dict | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all processes' devices.

  Over several TPU slices (devices with distinct slice_index) the mesh is hybrid: `dcn` (like
  config.mesh.dcn, default all slices on `data`) says how many slices each axis spans, across
  the data-centre network; the rest of each axis lies inside a slice, on its fast ICI links.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(shape, len(devices))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  across = mesh_shape(dcn or {"data": -1, "fsdp": 1, "tensor": 1}, slices)
  if any(size % n for size, n in zip(sizes, across)):
    raise ValueError(f"config.mesh.dcn {dict(zip(MESH_AXES, across))} does not divide the mesh "
                     f"{dict(zip(MESH_AXES, sizes))} over {slices} slices: make each axis of "
                     f"config.mesh.shape a multiple of its slices (e.g. "
                     f"--config.mesh.shape.data={across[0]})")
  inside = [size // n for size, n in zip(sizes, across)]
  grid = mesh_utils.create_hybrid_device_mesh(inside, across, devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules(preset_or_rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """config.mesh.rules: a preset name or explicit (logical, mesh axes) pairs."""
  if isinstance(preset_or_rules, str):
    if preset_or_rules not in RULES:
      raise ValueError(f"config.mesh.rules must be one of {sorted(RULES)} or a list of pairs, "
                       f"got {preset_or_rules!r}")
    return RULES[preset_or_rules]
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in preset_or_rules)


def param_shardings(abstract_boxed, mesh, logical_rules):
  """NamedShardings for a tree of logically partitioned abstract values.

  A dimension that the mesh axes do not divide stays unsharded (logged once),
  so tiny test models run on any mesh.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, logical_rules)
  values = nn.unbox(abstract_boxed)
  unevenly = []

  def fit(path, spec, value):
    if not isinstance(spec, PartitionSpec):
      spec = PartitionSpec()
    dims = []
    for dim, axes in zip(value.shape, tuple(spec) + (None,) * (value.ndim - len(spec))):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      if size > 1 and dim % size:
        unevenly.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {value.shape}")
        axes = None
      dims.append(axes)
    return NamedSharding(mesh, PartitionSpec(*dims))

  shardings = jax.tree_util.tree_map_with_path(
      fit, mesh_specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
  if unevenly:
    log.info("%d parameter dimension(s) left unsharded (not divisible by their mesh "
                 "axes), e.g. %s", len(unevenly), unevenly[:3])
  return shardings


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def state_shardings(abstract_state, params_sharding, mesh):
  """Shardings for a train state: "params" as given; optimizer moments like their parameters.

  Optax states mirror the parameter tree (Adam's mu and nu), so a state leaf
  whose key path ends in a parameter's path and has its shape is sharded like
  that parameter; everything else (counts, factored Adafactor statistics) is
  replicated.
  """
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]:
    by_path[tuple(k.key for k in path)] = s
  shapes = {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = []
    for key in reversed(path):
      if not isinstance(key, jax.tree_util.DictKey):
        break
      keys.insert(0, key.key)
    for start in range(len(keys)):
      suffix = tuple(keys[start:])
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return replicated

  return {**jax.tree_util.tree_map_with_path(pick, abstract_state),
          "params": params_sharding}

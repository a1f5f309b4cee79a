"""The device mesh and the mapping from logical parameter axes to mesh axes.

The model names axes ("embed", "mlp", "heads", ...); this module alone turns those names into
`NamedSharding`s using the config's rules, so model code never sees the mesh. The batch is split
over ("data", "fsdp"); parameters and optimizer state are split over "fsdp" and "tensor".
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so the product is the device count; errors name the bad sizes."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  bad = {a: s for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1}
  if bad or shape.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} are invalid: each must be a "
                     "positive integer, and at most one may be -1 (fill the remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not "
                       f"divisible by the fixed axes' product {known}.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} use {math.prod(shape)} devices, "
                     f"but {num_devices} are available.")
  return tuple(shape)


def create_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):  # e.g. a device subset on CPU.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int],
                         rules: dict[str, str | None], mesh: Mesh) -> P:
  """Maps logical axis names to mesh axes; a dim that does not divide its mesh axis (or whose
  mesh axis is already used by an earlier dim) stays replicated."""
  used = set()
  spec = []
  for name, dim in zip(logical, shape):
    axis = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no entry in mesh.logical_axis_rules "
                       f"(rules cover {sorted(rules)}).")
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def tree_shardings(logical_specs, abstract, rules, mesh: Mesh):
  """NamedShardings for a pytree of arrays given the matching pytree of logical PartitionSpecs."""
  rules = dict(rules)

  def one(logical, leaf):
    names = tuple(logical) + (None,) * (len(leaf.shape) - len(tuple(logical)))
    return NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, rules, mesh))

  return jax.tree.map(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))

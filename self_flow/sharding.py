"""The device mesh and the mapping from logical axis names to mesh axes.

The model names axes of parameters ("embed", "mlp", "heads", ...) and of its main activations
("activation_batch", "activation_mlp", ...); this module alone turns those names into
`NamedSharding`s using the config's rules, so model code never sees the mesh. The batch is split
over ("data", "fsdp"); parameters and optimizer state are split over "fsdp" and "tensor".

Rules are (logical name, mesh axes) pairs, where mesh axes is a mesh axis, a tuple of mesh axes
(one dim split over several), or None (replicated). A name may appear several times: its entries
are candidates tried in order, and the first whose axes are still free in that array and divide
the dim wins (as in maxtext); a dim with no fitting candidate stays replicated.
"""

import contextlib
import math
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PARAM_AXES = ("fsdp", "tensor")  # The axes that split parameters; "data" replicates them.

Rules = Sequence[tuple[str, Any]]

# Activations: the batch always follows the input batch sharding; tokens and width stay whole.
_ACTIVATIONS = (("activation_batch", BATCH_AXES), ("activation_length", None),
                ("activation_embed", None), ("activation_kv", None))
_UNSPLIT_PARAMS = (("layers", None), ("classes", None), ("vocab", None), ("patch", None))
# Named rule sets for config.mesh.rules; config.mesh.logical_axis_rules overrides names in them.
RULE_PRESETS = {
    # Pure data parallelism: every parameter replicated, the batch over (data, fsdp).
    "dp": _UNSPLIT_PARAMS + (("embed", None), ("mlp", None), ("heads", None),
                             ("modulation", None), ("activation_mlp", None),
                             ("activation_heads", None)) + _ACTIVATIONS,
    # ZeRO-3 / FSDP: each weight split over fsdp along its first named dim (width, MLP, heads or
    # modulation) that the fsdp size divides.
    "fsdp": _UNSPLIT_PARAMS + (("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
                               ("modulation", "fsdp"), ("activation_mlp", None),
                               ("activation_heads", None)) + _ACTIVATIONS,
    # FSDP + tensor parallelism: width over fsdp; heads, MLP and modulation over tensor (Megatron
    # layout), and the MLP hidden and attention heads activations with them.
    "fsdp_tp": _UNSPLIT_PARAMS + (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                                  ("modulation", "tensor"), ("activation_mlp", "tensor"),
                                  ("activation_heads", "tensor")) + _ACTIVATIONS,
}


def axis_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  """The rules of `config.mesh`: the preset `rules`, where every name listed in
  `logical_axis_rules` drops the preset's entries for that name (explicit pairs come first)."""
  if mesh_config.rules not in RULE_PRESETS:
    raise ValueError(f"config.mesh.rules={mesh_config.rules!r}; allowed: {sorted(RULE_PRESETS)}.")
  overrides = tuple((name, axes) for name, axes in mesh_config.logical_axis_rules)
  named = {name for name, _ in overrides}
  return overrides + tuple(r for r in RULE_PRESETS[mesh_config.rules] if r[0] not in named)


def check_rules(rules: Rules) -> None:
  """Each rule is a (name, axes) pair; axes is None, a mesh axis or a tuple of distinct ones."""
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    if ok and rule[1] is not None:
      parts = tuple(rule[1]) if isinstance(rule[1], (tuple, list)) else (rule[1],)
      ok = all(a in MESH_AXES for a in parts) and len(set(parts)) == len(parts)
    if not ok:
      raise ValueError(f"config.mesh.logical_axis_rules entry {rule!r} must be (name, axes) "
                       f"with axes None, one of {list(MESH_AXES)}, or a tuple of distinct ones.")


def mesh_shape(sizes, num_devices: int) -> tuple[int, ...]:
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


def dcn_shape(sizes, shape: Sequence[int], num_slices: int) -> tuple[int, ...]:
  """How the global mesh `shape` splits across slices: only "data" crosses the slow DCN links
  (its gradient all-reduce is once per step), so the DCN shape is (dcn_data, 1, 1)."""
  dcn_data = int(sizes.get("dcn_data", -1))
  dcn_data = num_slices if dcn_data == -1 else dcn_data
  if dcn_data != num_slices or shape[0] % dcn_data:
    raise ValueError(f"config.mesh.dcn_data={sizes.get('dcn_data', -1)}: the devices form "
                     f"{num_slices} slice(s), and data={shape[0]} must split evenly over them "
                     "(set dcn_data to -1 or to the slice count).")
  return (dcn_data,) + (1,) * (len(shape) - 1)


def device_grid(sizes, devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as the (data, fsdp, tensor) mesh: a hybrid ICI x DCN mesh when the devices
  report several `slice_index`es (multi-slice TPU), else the topology-aware single-slice one."""
  shape = mesh_shape(sizes, len(devices))
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    dcn = dcn_shape(sizes, shape, num_slices)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  if int(sizes.get("dcn_data", -1)) not in (-1, 1):
    dcn_shape(sizes, shape, 1)  # raises: a multi-slice config on one slice
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):  # e.g. a device subset on CPU.
    return np.asarray(devices).reshape(shape)


def create_mesh(sizes, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` (or a dict of sizes) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(sizes, devices), MESH_AXES)


# libtpu's switches for collective matmuls (the all-gather before a matmul, the reduce-scatter
# after one), as `mesh.collective_matmul=False` sets them.
_NO_COLLECTIVE_MATMUL = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compiler_options(mesh_config, mesh: Mesh) -> dict[str, Any]:
  """XLA options for programs over `mesh` that the mesh config asks for: only TPU compilers
  know the collective-matmul switches, so elsewhere none."""
  platform = next(iter(mesh.devices.flat)).platform
  if platform == "tpu" and not mesh_config.collective_matmul:
    return dict(_NO_COLLECTIVE_MATMUL)
  return {}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _candidates(rules: Rules, name: str) -> list[tuple[str, ...]]:
  found = [axes for rule_name, axes in rules if rule_name == name]
  if not found:
    raise ValueError(f"logical axis {name!r} has no entry in the mesh rules (config.mesh.rules "
                     f"preset + logical_axis_rules cover {sorted({n for n, _ in rules})}).")
  return [tuple(a) if isinstance(a, (tuple, list)) else (a,) for a in found if a is not None]


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules,
                         mesh: Mesh) -> P:
  """Maps logical axis names to mesh axes: per dim, the first candidate whose mesh axes are
  unused by earlier dims and whose size divides the dim; otherwise that dim stays replicated."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    chosen = None
    for axes in _candidates(rules, name) if name is not None else ():
      if not used.intersection(axes) and dim % math.prod(mesh.shape[a] for a in axes) == 0:
        chosen = axes
        break
    used.update(chosen or ())
    spec.append(chosen[0] if chosen and len(chosen) == 1 else chosen)
  return P(*spec)


def tree_shardings(logical_specs, abstract, rules: Rules, mesh: Mesh):
  """NamedShardings for a pytree of arrays given the matching pytree of logical PartitionSpecs."""
  rules = tuple(rules)

  def one(logical, leaf):
    names = tuple(logical) + (None,) * (len(leaf.shape) - len(tuple(logical)))
    return NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, rules, mesh))

  return jax.tree.map(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))


# --- Activation constraints: model code names axes, the trainer says which mesh and rules. ---

_active = threading.local()  # .value: (mesh, rules) while `activation_sharding` is entered.


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
  """While entered, `constrain` pins activations to `rules` on `mesh`; outside it is a no-op,
  so plain model calls (tests, tools) need no mesh. jit traces inside the context when the step
  is decorated with it: `jax.jit(activation_sharding(mesh, rules)(step))`.

  It also makes `mesh` jax's ambient (abstract) mesh while tracing, which is how kernels that
  XLA cannot partition (TPU splash attention, `models.attention`) find the axes for their
  shard_map without the model naming any."""
  previous = getattr(_active, "value", None)
  _active.value = (mesh, tuple(rules))
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _active.value = previous


def target_devices() -> list[Any]:
  """The devices the step being traced is compiled for: the active mesh's while
  `activation_sharding` is entered, else this process's default devices.

  Kernel choices (`models.attention`) ask this instead of `jax.default_backend()`: a step
  compiled ahead of time for a TPU topology from a CPU host must pick the TPU kernels."""
  active = getattr(_active, "value", None)
  return list(active[0].devices.flat) if active is not None else jax.devices()


def constrain(x: jax.Array, logical: Sequence[str]) -> jax.Array:
  """`x` with a sharding constraint from its logical axis names (one per dim), if rules are
  active; dims that do not divide their mesh axes stay unconstrained-replicated."""
  active = getattr(_active, "value", None)
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_mesh_spec(logical, x.shape, rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --- How much of the model stays replicated (maxtext's "sufficiently sharded" check). ---


class ReplicationReport(NamedTuple):
  """Parameter bytes and how the mesh splits them (parameter dtype; EMA/optimizer state follow
  the same shardings, so the fractions carry over)."""

  mesh_shape: dict[str, int]
  total_bytes: int
  bytes_per_device: int  # What one device holds of the parameters.
  replicated_bytes: int  # Leaves split over none of the non-trivial PARAM_AXES.
  largest_replicated: tuple[tuple[str, int, Any], ...]  # (path, bytes, spec), largest first.

  @property
  def replicated_fraction(self) -> float:
    return self.replicated_bytes / max(self.total_bytes, 1)

  def summary(self, top: int = 5) -> str:
    param_devices = math.prod(self.mesh_shape[a] for a in PARAM_AXES)
    leaves = "; ".join(f"{path} {_size(size)} {spec}"
                       for path, size, spec in self.largest_replicated[:top])
    return (f"parameters {_size(self.total_bytes)} on mesh {self.mesh_shape}: "
            f"{_size(self.bytes_per_device)} per device (ideal "
            f"{_size(self.total_bytes / param_devices)} over fsdp x tensor); replicated "
            f"{_size(self.replicated_bytes)} = {self.replicated_fraction:.2%}; largest "
            f"replicated: {leaves or 'none'}")


def _size(num_bytes: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes:.0f} B"


def replication_report(abstract, shardings) -> ReplicationReport:
  """Report for a pytree of arrays / ShapeDtypeStructs and the matching NamedShardings."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  shards = jax.tree.leaves(shardings)
  mesh = shards[0].mesh
  split_axes = {a for a in PARAM_AXES if mesh.shape[a] > 1}
  total = per_device = 0
  replicated_leaves = []
  for (path, leaf), sharding in zip(leaves, shards):
    itemsize = np.dtype(leaf.dtype).itemsize
    size = math.prod(leaf.shape) * itemsize
    total += size
    per_device += math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    used = {a for entry in sharding.spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    if not split_axes & used:
      replicated_leaves.append((jax.tree_util.keystr(path, simple=True, separator="/"), size,
                                sharding.spec))
  replicated_leaves.sort(key=lambda leaf: -leaf[1])
  return ReplicationReport(dict(mesh.shape), total, per_device,
                           sum(size for _, size, _ in replicated_leaves), tuple(replicated_leaves))


def check_replication(report: ReplicationReport, tolerance: float) -> None:
  """On an FSDP mesh (fsdp > 1) the point is to split the weights, so more than `tolerance` of
  the parameter bytes left whole on every device is a config error (rules that miss the
  model's names, or sizes that no dim divides), caught before the run spends memory on it."""
  if report.mesh_shape["fsdp"] > 1 and report.replicated_fraction > tolerance:
    raise ValueError(
        f"{report.replicated_fraction:.2%} of the parameter bytes are replicated on every device "
        f"of the FSDP mesh {report.mesh_shape}, above config.mesh.max_replicated_fraction="
        f"{tolerance}. Choose rules that split them (config.mesh.rules 'fsdp' or 'fsdp_tp', or "
        f"config.mesh.logical_axis_rules) or mesh sizes that divide the weights. "
        f"{report.summary()}")

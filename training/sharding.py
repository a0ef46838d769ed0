"""Where the train state and the batches lie: a 2-D ("data", "fsdp") mesh and one rule.

The batch is split along both axes, over every device. Each array of at least
config.mesh.fsdp_min_size elements is split along "fsdp" on its largest dimension divisible by the
fsdp size (ties: the last); everything else (biases, norms, scalars) is replicated. The same rule
lays out the parameters, their EMA and Adam's moments (which have the parameters' shapes), so each
device holds about 1/fsdp of the large weights (fully sharded data parallelism, ZeRO-3; Rajbhandari
et al. 2020). The jitted step is unchanged: XLA gathers each weight where it is used and
reduce-scatters its gradient.

A large weight with no dimension divisible by the fsdp size stays replicated, with one warning
naming it (rather than an error): the run still fits wherever the replicated one did.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
DEFAULT_FSDP_MIN_SIZE = 2**16  # configs/default.py's config.mesh.fsdp_min_size.

_warned: set[str] = set()  # Warnings already logged in this process.


def mesh_shape(mesh_config: ml_collections.ConfigDict | None, *,
               device_count: int) -> tuple[int, int]:
  """(data, fsdp) of config.mesh on device_count devices, -1 resolved; ValueError naming the key."""
  sizes = {axis: -1 if axis == DATA else 1 for axis in AXES}  # The default: pure data parallelism.
  if mesh_config is not None:
    sizes = {axis: mesh_config.get(axis, sizes[axis]) for axis in AXES}
  for axis, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
      raise ValueError(f"config.mesh.{axis}={size!r} must be a positive integer or -1 (the rest "
                       "of the devices).")
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh.data={sizes[DATA]} and config.mesh.fsdp={sizes[FSDP]}: at most "
                     "one of them may be -1 (the rest of the devices).")
  known = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if device_count % known:
      fixed = next(axis for axis in AXES if axis not in rest)
      raise ValueError(f"config.mesh.{fixed}={known} does not divide the {device_count} devices, "
                       f"so config.mesh.{rest[0]}=-1 has no size.")
    sizes[rest[0]] = device_count // known
  if sizes[DATA] * sizes[FSDP] != device_count:
    raise ValueError(f"config.mesh.data x config.mesh.fsdp = {sizes[DATA]} x {sizes[FSDP]} = "
                     f"{sizes[DATA] * sizes[FSDP]} is not the {device_count} devices "
                     "(jax.device_count()); set one of them to -1 for the rest.")
  return sizes[DATA], sizes[FSDP]


def create_mesh(mesh_config: ml_collections.ConfigDict | None = None, *,
                devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ("data", "fsdp") mesh of config.mesh over devices (default: all devices of all processes).

  jax.make_mesh orders the devices for the interconnect (each process's devices together, fsdp
  innermost); both axes are Auto (sharding follows in_shardings/out_shardings), as jax.make_mesh's
  default differs by version. mesh_config None is pure data parallelism (data=-1, fsdp=1).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, device_count=len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The batch dimension split over every axis of mesh: P(("data", "fsdp")) on the training mesh."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def fsdp_dim(shape: tuple[int, ...], *, fsdp_size: int, min_size: int) -> int | None:
  """The dimension of an array of this shape split along "fsdp", or None if it is replicated.

  Arrays of at least min_size elements are split on their largest dimension divisible by fsdp_size
  (ties: the last); smaller ones, scalars, and large ones with no such dimension are replicated.
  """
  if fsdp_size == 1 or not shape or math.prod(shape) < min_size:
    return None
  divisible = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  return max(divisible, key=lambda i: (shape[i], i)) if divisible else None


def array_spec(shape: tuple[int, ...], *, fsdp_size: int, min_size: int) -> P:
  """The PartitionSpec the rule (fsdp_dim) gives an array of this shape."""
  dim = fsdp_dim(shape, fsdp_size=fsdp_size, min_size=min_size)
  return P() if dim is None else P(*(FSDP if i == dim else None for i in range(len(shape))))


def state_shardings(abstract_state: Any, *, mesh: jax.sharding.Mesh, fsdp_min_size: int) -> Any:
  """NamedShardings of every leaf of a state (params, EMA, optimizer state, step) by the rule.

  abstract_state: any pytree of arrays or ShapeDtypeStructs. A mesh without an "fsdp" axis (or with
  fsdp 1) replicates everything. Large leaves that cannot be split are logged once, by path.
  """
  fsdp_size = dict(mesh.shape).get(FSDP, 1)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  shardings, unsplit = [], []
  for path, leaf in leaves:
    shape = tuple(leaf.shape)
    spec = array_spec(shape, fsdp_size=fsdp_size, min_size=fsdp_min_size)
    if spec == P() and fsdp_size > 1 and shape and math.prod(shape) >= fsdp_min_size:
      unsplit.append(f"{jax.tree_util.keystr(path)} {list(shape)}")
    shardings.append(NamedSharding(mesh, spec))
  if unsplit:
    message = (f"{len(unsplit)} arrays of >= {fsdp_min_size} elements (config.mesh.fsdp_min_size) "
               f"have no dimension divisible by config.mesh.fsdp={fsdp_size} and stay replicated: "
               + ", ".join(unsplit))
    if message not in _warned:
      _warned.add(message)
      logging.warning(message)
  return jax.tree_util.tree_unflatten(treedef, shardings)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of tree's arrays (or ShapeDtypeStructs with shardings)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))

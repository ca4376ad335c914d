"""Device mesh, logical-axis rules and global arrays: the only module that knows mesh axis names.

Parameters carry logical axis names (model.py: "embed", "heads", "mlp", and the
"decoder_*" twins); `config.mesh.rules` maps them to the mesh axes `data`,
`fsdp` and `tensor`. The batch is split over (`data`, `fsdp`).
"""

import json
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP shards the model width, tensor parallelism the heads and MLP hidden units.
DEFAULT_RULES = (
    ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
    ("decoder_embed", "fsdp"), ("decoder_heads", "tensor"), ("decoder_mlp", "tensor"),
)


def mesh_shape(mesh_config, num_devices):
  """(data, fsdp, tensor) sizes; one entry may be -1 = all remaining devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {tuple(sizes)}")
  if known > num_devices:
    raise ValueError(f"config.mesh (data, fsdp, tensor) = {tuple(sizes)} needs {known} "
                     f"devices but {num_devices} are available")
  if -1 in sizes and num_devices % known:
    raise ValueError(f"config.mesh (data, fsdp, tensor) = {tuple(sizes)}: {num_devices} "
                     f"devices cannot be split into groups of {known}")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all).

  A mesh smaller than the device count uses the first devices (single process only).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  if math.prod(shape) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"config.mesh {shape} must use all {len(devices)} devices of a "
                       "multi-process run")
    devices = devices[:math.prod(shape)]
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names, shape, mesh, rules=DEFAULT_RULES):
  """Logical axis names of one array -> a PartitionSpec on `mesh`.

  A dimension stays replicated when its rule's mesh axis is already used by an
  earlier dimension or does not divide it (tiny test models, odd widths).
  """
  rules = dict(rules)
  spec, used = [], set()
  for name, size in zip(names or (), shape):
    axis = rules.get(name) if name else None
    if axis is None or axis in used or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def state_shardings(abstract_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree (params, optimizer state, ...), same structure as the tree.

  nnx Variables use their logical `out_sharding` metadata (optax moments copy
  it from the params); every other array is replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      if not hasattr(x, "shape"):  # e.g. optax's MaskedNode for a frozen parameter: no array
        return x
      names = x.get_metadata().get("out_sharding")
      return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) dimension split over (data, fsdp)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh):
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch, mesh, process_count=None):
  """Clear error (before compile) unless the global batch splits over shards and processes."""
  shards = num_batch_shards(mesh)
  if global_batch % shards:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{shards} data shards of the mesh (data x fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")


def global_batch(local_batch, mesh):
  """Assemble each process's share of the batch into global arrays sharded over (data, fsdp)."""
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(one, local_batch)


def per_device_bytes(tree):
  """Bytes of `tree` held by the most loaded addressable device."""
  totals = {}
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return max(totals.values()) if totals else 0


def to_host(tree):
  """Arrays -> numpy on every process (gathering shards held by other processes)."""
  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return jax.device_get(x)
    if x.is_fully_replicated:  # also covers typed PRNG keys, which cannot be gathered
      return x.addressable_data(0)
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(one, tree)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying target shardings (restore straight onto any mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def allgather_json(obj):
  """[obj of process 0, obj of process 1, ...]: a JSON-able value from every process.

  For per-process state (each process's data-iterator position) that one process writes.
  """
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(rows[i, :sizes[i]])) for i in range(len(sizes))]

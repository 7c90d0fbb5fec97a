"""Device meshes, logical-axis rule presets and sharded initialisation.

A mesh has three axes: ``data`` (replicas), ``fsdp`` (replicas that also shard
parameters and optimizer state) and ``tensor`` (heads / MLP / vocab). Model code
names logical axes (``cai_jax.axes``); a rule preset maps them to mesh axes.
Rules are tried in order and a mesh axis is used at most once per array, so an
activation [batch, length, embed] gets batch on (data, fsdp) and embed replicated
while a weight [embed, mlp] gets embed on fsdp.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cai_jax import axes
from cai_jax.configs import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
_BATCH_AXES = ("data", "fsdp")

RULE_PRESETS = {
    # Parameters replicated; batch split over every data-like axis.
    "dp": ((axes.BATCH, _BATCH_AXES),),
    # ZeRO-3 style: parameters and optimizer state sharded over fsdp along embed.
    "fsdp": ((axes.BATCH, _BATCH_AXES), (axes.EMBED, "fsdp")),
    # fsdp plus Megatron-style tensor parallelism over heads / MLP / vocab, and sequence
    # parallelism: the residual stream between blocks (what remat keeps per layer, and the
    # norms) is split over tensor along its positions, so those collectives become
    # all-gather / reduce-scatter pairs instead of all-reduces of a replicated stream.
    "fsdp_tp": (
        (axes.BATCH, _BATCH_AXES),
        (axes.ACTIVATION_LENGTH, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.KV_HEADS, "tensor"),
        (axes.MLP, "tensor"),
        (axes.VOCAB, "tensor"),
        (axes.EMBED, "fsdp"),
    ),
}

Rules = Tuple[Tuple[str, Any], ...]


def rules_for(name: str) -> Rules:
  try:
    return RULE_PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown sharding rules {name!r}; expected one of {sorted(RULE_PRESETS)}") from None


def mesh_shape(config: MeshConfig, num_devices: int) -> Tuple[int, int, int]:
  """Resolves the -1 entry of (data, fsdp, tensor) against the device count."""
  dims = [config.data, config.fsdp, config.tensor]
  if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d == 0 or d < -1
         for d in dims):
    raise ValueError(f"MeshConfig: data, fsdp and tensor must be positive integers or -1, got "
                     f"data={dims[0]!r} fsdp={dims[1]!r} tensor={dims[2]!r}")
  dims = [int(d) for d in dims]
  free = [i for i, d in enumerate(dims) if d == -1]
  if len(free) > 1:
    raise ValueError(f"MeshConfig: at most one dim may be -1, got data={dims[0]} fsdp={dims[1]} tensor={dims[2]}")
  known = int(np.prod([d for d in dims if d != -1]))
  if free:
    if num_devices % known:
      raise ValueError(f"MeshConfig: {num_devices} devices are not divisible by the fixed dims {dims}")
    dims[free[0]] = num_devices // known
  if int(np.prod(dims)) > num_devices:
    raise ValueError(
        f"MeshConfig: data*fsdp*tensor = {int(np.prod(dims))} but there are only {num_devices} devices")
  return tuple(dims)


def make_mesh(config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all).

  A fully specified mesh smaller than the device count uses the first devices. In a
  multi-process run the default mesh must reach a device of every process (each process
  runs the same program on its part of one global mesh); a smaller one is a ValueError.
  """
  explicit = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  devices = devices[:int(np.prod(shape))]
  if not explicit and jax.process_count() > 1:
    missing = sorted({d.process_index for d in jax.devices()} - {d.process_index for d in devices})
    if missing:
      raise ValueError(
          f"the mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} uses {len(devices)} of "
          f"{jax.device_count()} devices and none of process {missing[0]}'s; a multi-process run "
          "needs a mesh over every process (e.g. --gin_file=gin/mesh/fsdp.gin, or "
          "MeshConfig.data = -1)")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
  """Context in which model code traces: mesh set globally and logical rules active."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def fit_spec(spec: P, shape: Tuple[int, ...], mesh: Any) -> P:
  """Drops mesh axes that do not divide their array dim (e.g. 3 kv heads on tensor=2).

  mesh: a Mesh or AbstractMesh (anything with ``.shape``: {axis name: size}).
  """
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
      else:
        logging.info("sharding: dim %d not divisible by mesh axis %s; replicating it", dim, name)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def unbox_shapes(tree: Any) -> Any:
  """Strips nn.Partitioned boxes without applying sharding constraints."""
  return jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a boxed abstract pytree (from jax.eval_shape of a Flax init)."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = unbox_shapes(abstract_boxed)
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda s: isinstance(s, P))


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules):
  """Initialises a pytree directly into its sharded layout.

  init_fn: zero-argument function returning a pytree that may hold nn.Partitioned
  boxes (Flax params, or a train state built from them). Returns (unboxed pytree,
  its NamedShardings). Nothing is materialised on one device first.
  """
  with use_mesh(mesh, rules):
    abstract = jax.eval_shape(init_fn)
    shardings = logical_shardings(abstract, mesh, rules)
    out = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return out, shardings


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, shape: Optional[Tuple[int, ...]] = None) -> NamedSharding:
  """Sharding of a [batch, length, ...] array: batch over (data, fsdp)."""
  logical = (axes.BATCH, axes.LENGTH) + (None,) * (ndim - 2) if ndim >= 2 else (axes.BATCH,)
  spec = P(*nn.logical_to_mesh_axes(logical, rules))
  if shape is not None:
    spec = fit_spec(spec, shape, mesh)
  return NamedSharding(mesh, spec)


def process_rows(sharding: jax.sharding.Sharding, global_shape: Tuple[int, ...]) -> np.ndarray:
  """Indices of the leading-dim rows that this process's devices hold, ascending.

  For the batch sharding of a mesh built by ``make_mesh`` (devices in process order)
  with the batch split over all devices, process p of P holds rows
  [p * B/P, (p + 1) * B/P). A leading dim that is not split over processes gives all rows.
  Returns an int64 array of row indices (length <= global_shape[0]).
  """
  n = int(global_shape[0])
  held = np.zeros(n, dtype=bool)
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    held[index[0] if index else slice(None)] = True
  return np.flatnonzero(held)


def put_process_rows(local: Any, sharding: jax.sharding.Sharding,
                     global_shape: Tuple[int, ...]) -> jax.Array:
  """The global array of shape `global_shape` from this process's rows of it.

  local: the rows ``process_rows(sharding, global_shape)`` of the global value, in that
  order (the whole value in a single-process run, or when the rows are not split over
  processes). Several processes: ``jax.make_array_from_process_local_data``.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    if tuple(local.shape) != tuple(global_shape):
      raise ValueError(f"single-process batch of shape {local.shape}, expected {global_shape}")
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """Places host array `x` (the GLOBAL value, identical on every process) with `sharding`.

  Single process: ``jax.device_put``. Several processes: each passes only its own rows
  (``process_rows``) to ``jax.make_array_from_process_local_data``, so no process
  copies rows that other processes' devices hold.
  """
  x = np.asarray(x)
  local = x
  if x.ndim and jax.process_count() > 1:
    rows = process_rows(sharding, x.shape)
    local = x if len(rows) == x.shape[0] else x[rows]
  return put_process_rows(local, sharding, x.shape)


def hashable_rules(rules: Optional[Rules]) -> Optional[Rules]:
  """Logical rules as nested tuples, so they can key a cache (None stays None)."""
  if rules is None:
    return None
  return tuple((name, tuple(target) if isinstance(target, list) else target)
               for name, target in rules)


def mesh_and_rules(config: Optional[MeshConfig]) -> Tuple[Optional[Mesh], Optional[Rules]]:
  """(make_mesh(config), rules_for(config.rules)), or (None, None) without a config."""
  if config is None:
    return None, None
  return make_mesh(config), rules_for(config.rules)


def batch_shards(mesh: Optional[Mesh], rules: Optional[Rules]) -> int:
  """Number of shards the batch dim is split into: the product of the mesh axes the rules
  map `batch` to (1 without a mesh). Batches must have a multiple of it rows."""
  if mesh is None:
    return 1
  entry = nn.logical_to_mesh_axes((axes.BATCH,), rules)[0]
  names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
  return int(np.prod([mesh.shape[a] for a in names]))


def place_tree(tree: Any, shardings: Any) -> Any:
  """Places every leaf of `tree` with the matching leaf of `shardings` (same structure).

  Leaves are host arrays holding the GLOBAL value (the same on every process; placed
  with ``put_global``) or jax.Arrays (moved with ``jax.device_put``, no copy when
  already so placed). Safe in multi-process runs.
  """
  def leaf(x, s):
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
      return jax.device_put(x, s)
    return put_global(np.asarray(x), s)
  return jax.tree_util.tree_map(leaf, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules, shardings: Any = None) -> Any:
  """Places a host batch (dict of numpy arrays, leading dim = batch) on the mesh.

  batch: the GLOBAL batch, the same on every process (each process reads the same
    deterministic stream); in a multi-process run each process contributes only its
    rows (see ``put_global``), and the result is one global jax.Array per field.
  shardings: per-field shardings (same structure as `batch`); default ``batch_sharding``
    of each field's shape.
  """
  if shardings is None:
    shardings = jax.tree_util.tree_map(
        lambda x: batch_sharding(mesh, rules, max(np.ndim(x), 1), np.shape(x)), batch)
  return jax.tree_util.tree_map(put_global, batch, shardings)

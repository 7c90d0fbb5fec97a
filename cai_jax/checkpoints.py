"""Orbax checkpoints: periodic async saves, restore into any sharded layout, params export.

Training-run directory (``CheckpointManager``), one sub-directory per finished step::

  <root>/
    <step>/                        e.g. 1000/; a plain integer, no zero padding
      _CHECKPOINT_METADATA         orbax step metadata (commit time, item handlers)
      state/                       the TrainState (step, params, opt_state) as an orbax PyTree
        _METADATA                  tree structure, shapes and dtypes (read by the mismatch check)
        _sharding, manifest.ocdbt, d/, ...   array data (OCDBT / zarr), layout-independent
      data_state/                  only when a data-iterator state was given
        data_state.json            the JSON dict (e.g. a grain iterator's get_state())
    <step>.orbax-checkpoint-tmp*/  a save in progress, or one killed by a crash

Orbax writes every step into the ``*.orbax-checkpoint-tmp*`` directory and renames it to
``<step>/`` only once all items are written, so a crash mid-save never leaves a directory
that looks complete. Such leftovers are never listed by ``all_steps`` / ``latest_step``
(which also skip a save still in flight) and are deleted when the next
``CheckpointManager`` opens the root.

Params export (``export_params`` / ``load_params``): the params pytree alone, one orbax
PyTree directory (``_METADATA``, ``manifest.ocdbt``, ``d/``, ...) written the same atomic
way (``<dir>.orbax-checkpoint-tmp*`` then renamed to ``<dir>``).

Restores take an abstract target: a pytree of ``jax.ShapeDtypeStruct(shape, dtype,
sharding=NamedSharding)`` (see ``abstract_state``) or of live ``jax.Array`` s, and return
arrays in exactly that layout, whatever mesh the checkpoint was written from. Before any
array is read the saved tree is compared with the target; the first difference raises
``CheckpointMismatchError``. Only orbax array storage and JSON are written; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding

from cai_jax import sharding

STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
DATA_STATE_FILE = "data_state.json"

PyTree = Any
Signature = Dict[str, Tuple[Tuple[int, ...], np.dtype]]


class CheckpointMismatchError(ValueError):
  """A saved tree does not match the target: a key is missing or extra, or a shape/dtype differs.

  Attributes:
    path: '/'-joined path of the first mismatching leaf, e.g. 'params/layers/attn/q_proj/kernel'.
    saved: (shape, dtype) in the checkpoint, or None if the leaf is not saved.
    expected: (shape, dtype) of the target, or None if the target has no such leaf.
  """

  def __init__(self, message: str, path: str, saved: Optional[Tuple], expected: Optional[Tuple]):
    super().__init__(message)
    self.path = path
    self.saved = saved
    self.expected = expected


class CheckpointNotFoundError(FileNotFoundError):
  """There is no finished checkpoint (or no requested step) in a directory."""


# --------------------------------------------------------------------------- abstract trees


def with_shardings(shapes: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying `shardings` (same tree structure as `shapes`)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_state(init_fn: Callable[[], PyTree], mesh: Mesh, rules: sharding.Rules) -> PyTree:
  """What ``sharding.sharded_init(init_fn, mesh, rules)`` would build, as ShapeDtypeStructs.

  init_fn: zero-argument function returning a pytree that may hold nn.Partitioned boxes
  (e.g. ``lambda: steps.init_state_boxed(cfg, tx, rng)``). Nothing is allocated. Each leaf
  is ``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))``.
  """
  with sharding.use_mesh(mesh, rules):
    boxed = jax.eval_shape(init_fn)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return with_shardings(sharding.unbox_shapes(boxed), shardings)


def shardings_of(tree: PyTree) -> PyTree:
  """The `.sharding` of every leaf (ShapeDtypeStructs or arrays): the inverse of with_shardings."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def abstract_train_state(config: Any, tx: Any, mesh: Mesh, rules: sharding.Rules,
                         head: str = "lm") -> PyTree:
  """``abstract_state`` of a model's TrainState (``steps.init_state_boxed``: params, optax
  state of `tx`, step) laid out by the logical-axis `rules` on `mesh`; nothing is allocated."""
  from cai_jax import steps
  return abstract_state(lambda: steps.init_state_boxed(config, tx, jax.random.PRNGKey(0), head),
                        mesh, rules)


def as_abstract(tree: PyTree) -> PyTree:
  """Restore target from abstract or live leaves: jax.Array -> ShapeDtypeStruct with its sharding.

  nn.Partitioned boxes are stripped. A ShapeDtypeStruct without a sharding gets this
  process's first device (rather than the saved layout, whose devices may not exist here).
  """
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(jax.local_devices()[0]))
    return x
  return jax.tree_util.tree_map(leaf, sharding.unbox_shapes(tree))


# --------------------------------------------------------------------------- mismatch check


def _key_name(key: Any) -> str:
  """'a' for DictKey('a'), GetAttrKey('a'), SequenceKey(0) -> '0', FlattenedIndexKey -> its index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined key names of a jax key path, e.g. 'params/layers/attn/q_proj/kernel'."""
  return "/".join(_key_name(k) for k in path)


def tree_signature(tree: PyTree) -> Signature:
  """{path: (shape, dtype)} for every array-like leaf, in flattening order.

  Works on arrays, ShapeDtypeStructs and orbax's saved-tree metadata (ArrayMetadata).
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out[path_name(path)] = (tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype))
  return out


def _fmt(entry: Tuple[Tuple[int, ...], np.dtype]) -> str:
  return f"{entry[0]} {entry[1].name}"


def _mismatches(saved: Signature, expected: Signature, allow_dtype_cast: bool) -> List[Tuple[str, str]]:
  """(path, description) of every difference: target order first, then extra saved leaves."""
  out = []
  for path, exp in expected.items():
    got = saved.get(path)
    if got is None:
      out.append((path, f"{path} is expected with shape {_fmt(exp)} but is not in the checkpoint"))
    elif got[0] != exp[0]:
      out.append((path, f"{path} has shape {got[0]} in the checkpoint but {exp[0]} is expected"))
    elif got[1] != exp[1] and not allow_dtype_cast:
      out.append((path, f"{path} has dtype {got[1].name} in the checkpoint but {exp[1].name} "
                        "is expected (pass allow_dtype_cast=True to convert)"))
  for path in _extra_paths(saved, expected):
    out.append((path, f"{path} (shape {_fmt(saved[path])}) is in the checkpoint but not in the target"))
  return out


def _extra_paths(saved: Signature, expected: Signature) -> List[str]:
  """Saved paths the target lacks, ordered by the target's top-level keys (params first)."""
  rank = {}
  for path in expected:
    rank.setdefault(path.split("/")[0], len(rank))
  extra = [p for p in saved if p not in expected]
  return sorted(extra, key=lambda p: rank.get(p.split("/")[0], len(rank)))


def check_compatible(saved_tree: PyTree, target: PyTree, source: str,
                     allow_dtype_cast: bool = False) -> None:
  """Raises CheckpointMismatchError naming the first leaf where `saved_tree` and `target` differ.

  saved_tree: orbax metadata (or any tree of shaped leaves); target: the restore target.
  source: what was read, for the message (e.g. 'checkpoint /runs/a/checkpoints/100').
  """
  saved, expected = tree_signature(saved_tree), tree_signature(target)
  problems = _mismatches(saved, expected, allow_dtype_cast)
  if not problems:
    return
  path, first = problems[0]
  more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
  raise CheckpointMismatchError(
      f"{source} does not match the target: {first}{more}",
      path, saved.get(path), expected.get(path))


def _check_json(data_state: Mapping[str, Any]) -> Dict[str, Any]:
  """A deep copy of `data_state` as JSON reads it back (what the checkpoint will hold, taken
  now: an async save writes it later), or TypeError if it is not a JSON object."""
  if not isinstance(data_state, Mapping):
    raise TypeError(f"data_state must be a JSON object (dict) or None, got {type(data_state).__name__}")
  try:
    return json.loads(json.dumps(data_state, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(f"data_state is not JSON-serialisable: {e}") from None


def _is_finished(path: epath.Path) -> bool:
  """True for a step / export directory that orbax has finalised (renamed from its tmp name)."""
  return path.exists() and ocp.step.is_path_finalized(path)


# --------------------------------------------------------------------------- training runs


class CheckpointManager:
  """Periodic async checkpoints of a TrainState plus a JSON data-iterator state.

  Wraps ``orbax.checkpoint.CheckpointManager`` with two items per step: ``state``
  (StandardSave of the sharded TrainState) and, when given, ``data_state`` (JSON).
  See the module docstring for the directory layout.

  Args:
    directory: root of the run's checkpoints (created unless read_only); a relative
      local path is taken from the working directory.
    save_every: K; a non-forced ``save`` writes only steps that are multiples of K
      (or when a preemption was signalled to jax.distributed).
    keep: N; only the newest N finished steps are kept (None keeps all). Old steps are
      deleted only after a newer one is finished.
    async_save: write in a background thread. ``save`` returns once arrays are copied to
      host memory, so the caller may donate / overwrite the state right away.
    read_only: never write or delete (e.g. an evaluator reading a training run).
  """

  def __init__(self, directory: epath.PathLike, save_every: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True, read_only: bool = False):
    if save_every <= 0:
      raise ValueError(f"save_every must be positive, got {save_every}")
    if keep is not None and keep <= 0:
      raise ValueError(f"keep must be positive or None, got {keep}")
    self._directory = _absolute(directory)
    self._read_only = read_only
    self._mngr = ocp.CheckpointManager(
        self._directory, options=self._options(save_every, keep, async_save, read_only),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_STATE_ITEM: ocp.JsonCheckpointHandler(filename=DATA_STATE_FILE)})

  @staticmethod
  def _options(save_every: int, keep: Optional[int], async_save: bool,
               read_only: bool) -> ocp.CheckpointManagerOptions:
    policies = ocp.checkpoint_managers
    return ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(keep),
        save_interval_steps=0 if read_only else 1,  # unused with a policy; 0 avoids a warning
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only)

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def step_directory(self, step: int) -> epath.Path:
    """<root>/<step> (whether or not it exists)."""
    return self._directory / str(step)

  def all_steps(self) -> List[int]:
    """Finished steps, ascending; excludes a save still in flight and crashed leftovers."""
    return sorted(s for s in self._mngr.all_steps() if _is_finished(self.step_directory(s)))

  def latest_step(self) -> Optional[int]:
    """Newest finished step, or None."""
    steps = self.all_steps()
    return max(steps) if steps else None

  def should_save(self, step: int) -> bool:
    """Whether a non-forced ``save(step, ...)`` would write (multiple of K, newer than the last)."""
    return self._mngr.should_save(step)

  def save(self, step: int, state: PyTree, data_state: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Starts writing `state` (+ `data_state`) as `step` if due (or `force`); returns whether it did.

    state: the TrainState (or any pytree of jax arrays), in whatever sharding it lives.
    data_state: JSON object restoring the input pipeline at the next example (a grain
      ``DatasetIterator.get_state()`` dict; for a ``grain.DataLoader`` iterator, whose
      state is JSON bytes, pass ``json.loads(it.get_state())``), or None.
    force: save even if `step` is not a multiple of K (the end of training); a step that
      is already saved is skipped rather than overwritten.
    Call only with finite, good states: every saved step may become the one resumed from.
    """
    if self._read_only:
      raise ValueError(f"CheckpointManager({self._directory}) is read-only")
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[DATA_STATE_ITEM] = ocp.args.JsonSave(_check_json(data_state))
    if force and step in self._mngr.all_steps():
      return False
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def _resolve_step(self, step: Optional[int]) -> int:
    """`step`, or the latest finished one; CheckpointNotFoundError naming the directory."""
    steps = self.all_steps()
    if step is None:
      if not steps:
        missing = "" if self._directory.exists() else " (the directory does not exist)"
        raise CheckpointNotFoundError(f"no finished checkpoint to restore in {self._directory}{missing}")
      return steps[-1]
    if step not in steps:
      raise CheckpointNotFoundError(
          f"no finished checkpoint for step {step} in {self._directory}; finished steps: {steps}")
    return step

  def saved_tree(self, step: int) -> PyTree:
    """Metadata tree of the saved TrainState at `step` (leaves have .shape and .dtype)."""
    meta = self._mngr.metadata(step).item_metadata[STATE_ITEM]
    if meta is None:
      raise CheckpointNotFoundError(f"{self.step_directory(step)} has no '{STATE_ITEM}' item")
    return getattr(meta, "tree", meta)

  def restore(self, target: PyTree, step: Optional[int] = None,
              allow_dtype_cast: bool = False) -> Tuple[PyTree, Optional[Dict[str, Any]]]:
    """(state, data_state) of `step` (default: the latest finished step).

    target: the TrainState as ShapeDtypeStructs with NamedShardings (``abstract_state``)
      or as live arrays; the result has exactly its structure, shapes and shardings, on any
      mesh. data_state is the saved JSON dict, or None if none was saved.
    Raises CheckpointNotFoundError if there is nothing to restore, CheckpointMismatchError
    (before reading arrays) if the saved tree differs from `target`.
    """
    step = self._resolve_step(step)
    target = as_abstract(target)
    check_compatible(self.saved_tree(step), target, f"checkpoint {self.step_directory(step)}",
                     allow_dtype_cast)
    items = {STATE_ITEM: ocp.args.StandardRestore(target)}
    has_data = (self.step_directory(step) / DATA_STATE_ITEM).exists()
    if has_data:
      items[DATA_STATE_ITEM] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return out[STATE_ITEM], (out[DATA_STATE_ITEM] if has_data else None)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is finished and old steps are deleted."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending work and releases orbax's threads; call once at the end of a run."""
    self._mngr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------- params export


def _params_checkpointer(this_process_only: bool = False) -> ocp.Checkpointer:
  """Collective checkpointer (every process calls it), or one for this process alone."""
  if not this_process_only or jax.process_count() == 1:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())
  me = jax.process_index()
  options = ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"export{me}")
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=options),
                          multiprocessing_options=options)


def _is_host_local(tree: PyTree) -> bool:
  """True when no leaf is a jax.Array with shards on other processes' devices."""
  return all(not isinstance(x, jax.Array) or x.is_fully_addressable
             for x in jax.tree_util.tree_leaves(tree))


def _absolute(directory: epath.PathLike) -> epath.Path:
  """orbax needs absolute paths; local relative paths resolve against the working directory."""
  text = os.fspath(directory)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def export_params(params: PyTree, directory: epath.PathLike, overwrite: bool = False) -> epath.Path:
  """Writes the params pytree (sharded jax arrays, any mesh) to `directory`; returns it.

  Synchronous and atomic (written to ``<directory>.orbax-checkpoint-tmp*``, then renamed).
  An existing `directory` is an error unless `overwrite`, which deletes it before the new
  one is written (so a crash in between leaves neither; ``model_dir.save_model`` replaces
  a model directory atomically).
  Multi-process runs: params with shards on several processes are saved collectively
  (every process calls this); params held whole by this process (numpy arrays or fully
  addressable jax.Arrays, e.g. from ``distributed.gather_to_host``) are written by the
  calling process alone, so call it from one process only (process 0).
  """
  path = _absolute(directory)
  if path.exists() and not overwrite:
    raise FileExistsError(f"params export {path} already exists (pass overwrite=True to replace it)")
  params = nn.meta.unbox(params)
  with _params_checkpointer(this_process_only=_is_host_local(params)) as ckptr:
    ckptr.save(path, args=ocp.args.StandardSave(params), force=overwrite)
  return path


def load_params(directory: epath.PathLike, target: PyTree, allow_dtype_cast: bool = False) -> PyTree:
  """Params exported by ``export_params``, restored into `target`'s structure and shardings.

  target: abstract params (ShapeDtypeStructs with NamedShardings, e.g. ``.params`` of
  ``abstract_state``) or live arrays. Raises CheckpointNotFoundError if `directory` holds
  no finished export, CheckpointMismatchError if its tree differs from `target`.
  """
  path = _absolute(directory)
  if not _is_finished(path) or not (path / "_METADATA").exists():
    raise CheckpointNotFoundError(f"no finished params export in {path}")
  target = as_abstract(target)
  with _params_checkpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    check_compatible(getattr(meta, "tree", meta), target, f"params export {path}", allow_dtype_cast)
    return ckptr.restore(path, args=ocp.args.StandardRestore(target))

"""Sharded, resumable stage outputs: the on-disk interface between stages.

A generating stage (``critique_revision``, ``feedback``) writes its rows to a run
directory; later stages read the finished directory with ``read_run``:

  out_dir/
    shard-00000.jsonl, ...   one JSON object per line, in input order (a stage may use
                             further prefixes, e.g. helpful-00000.jsonl, ...)
    manifest.json            {"stage", "config_hash", "config", <stage counts such as
                             "num_prompts">, "shard_files", "shards_done", "shard_sums",
                             "complete", "stats"}

Every file is written to a ``.tmp`` name, fsynced, renamed and its directory fsynced
(``write_atomic``), so a file that exists is complete and a kill -9 (or a power loss) loses
at most the shard in flight; ``.tmp`` leftovers are removed when the directory is opened
again.

Multi-process runs (``cai_jax.distributed``): every process opens the run and computes
the same rows; process 0 alone writes files, and each write ends in a barrier, so all
processes see the same shards on disk.

Resumption (``open_run``): the shard files on disk are the truth, the manifest's
per-shard counters ("shard_sums") a cache of them. A run whose stored config hash
differs from the new one is refused with a one-line ValueError naming the differing
config keys (unless it has no shard on disk yet: then it holds no work and starts
afresh); so is a directory of another stage, or one holding shard files but no
manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from cai_jax import data, distributed

MANIFEST = "manifest.json"
SHARD_PREFIX = "shard-"

# recount(shard_name, rows) -> the shard's counters (a shard on disk the manifest lacks).
Recount = Callable[[str, List[dict]], Dict[str, Any]]
# stats(shard_sums) -> the run's stats, stored in the manifest.
StatsFn = Callable[[Dict[str, Dict[str, Any]]], Dict[str, Any]]


def sha(obj: Any) -> str:
  """Hex SHA-256 of obj's canonical JSON (sorted keys, UTF-8)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def config_hash(config: Dict[str, Any]) -> str:
  """The 16-hex-digit hash a run's manifest stores for its config."""
  return sha(config)[:16]


def config_diff(new: Dict[str, Any], old: Dict[str, Any]) -> List[str]:
  """Sorted keys whose values differ between two configs (absent = None), as dotted paths
  into values that are dicts on both sides ('optimizer.learning_rate')."""
  out = []
  for k in sorted(set(new) | set(old), key=str):
    a, b = new.get(k), old.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{k}.{sub}" for sub in config_diff(a, b)]
    elif a != b:
      out.append(str(k))
  return out


def _fsync_dir(directory: str) -> None:
  """fsyncs a directory, so that a rename in it survives a power loss; a no-op where the OS
  or file system refuses to open or fsync a directory (Windows, some network mounts)."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF,
                       errno.EACCES, errno.EPERM):
      raise
  finally:
    os.close(fd)


def write_atomic(path: str, text: Union[str, bytes], tmp: Optional[str] = None) -> None:
  """Writes text (str: as UTF-8; or bytes) to `tmp` (default path + '.tmp', a name in
  path's directory), fsyncs it, renames it over path and fsyncs path's directory. When the
  write or rename raises, the temporary file is removed and path is left as it was."""
  tmp = tmp or path + ".tmp"
  try:
    with (open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8")) as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def shard_name(prefix: str, k: int) -> str:
  """'{prefix}{k:05d}.jsonl', e.g. shard-00003.jsonl."""
  return f"{prefix}{k:05d}.jsonl"


def partition(items: Sequence[Any], shard_size: int) -> List[List[Tuple[int, Any]]]:
  """Items cut into shards of shard_size (the last may be shorter): shard k holds the
  (index, item) pairs of items[k * shard_size:(k + 1) * shard_size]."""
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  indexed = list(enumerate(items))
  return [indexed[s:s + shard_size] for s in range(0, len(indexed), shard_size)]


def read_jsonl(path: str) -> List[dict]:
  """The JSON objects of a shard file, one per non-blank line (``data.iter_jsonl``):
  DataError "FILE:LINE: ..." for a line that is not a JSON object (e.g. a file cut short
  by something other than this module)."""
  return [row for _, row in data.iter_jsonl(path)]


def _read_manifest(path: str) -> Dict[str, Any]:
  """The manifest's object; ValueError naming the file when it is not a JSON object."""
  with open(path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
  return manifest


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """Writes rows as JSON lines, atomically."""
  write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Run:
  """An opened run directory (see ``open_run``).

  Attributes:
    out_dir, stage, config, config_hash: as given to / computed by ``open_run``.
    names: every shard file of the run, in order.
    done: names of the shards on disk.
    sums: per-shard counters of the done shards.
  """

  def __init__(self, out_dir: str, stage: str, config: Dict[str, Any], names: Sequence[str],
               counts: Dict[str, Any], stats: StatsFn):
    self.out_dir = out_dir
    self.stage = stage
    self.config = config
    self.config_hash = config_hash(config)
    self.names = list(names)
    self.counts = dict(counts)
    self.stats = stats
    self.done: set = set()
    self.sums: Dict[str, Dict[str, Any]] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  @property
  def complete(self) -> bool:
    return len(self.done) == len(self.names)

  def write_manifest(self) -> None:
    """Writes manifest.json from the current state."""
    manifest = {"stage": self.stage, "config_hash": self.config_hash, "config": self.config}
    manifest.update(self.counts)
    manifest.update(shard_files=self.names,
                    shards_done=[n for n in self.names if n in self.done],
                    shard_sums=self.sums, complete=self.complete, stats=self.stats(self.sums))
    write_atomic(self.path(MANIFEST), json.dumps(manifest, indent=1) + "\n")

  def write_shard(self, name: str, rows: Sequence[dict], sums: Dict[str, Any]) -> None:
    """Writes one finished shard (atomically), then the manifest recording it.

    Multi-process runs: every process calls it with the same rows; process 0 writes,
    and all return once the files are on disk."""
    self.done.add(name)
    self.sums[name] = sums
    if distributed.is_primary():
      write_jsonl(self.path(name), rows)
      self.write_manifest()
    distributed.barrier(f"shard:{self.path(name)}")


def open_run(out_dir: str, stage: str, config: Dict[str, Any], names: Sequence[str],
             prefixes: Sequence[str], recount: Recount, stats: StatsFn,
             counts: Optional[Dict[str, Any]] = None, hint: str = "use a new out_dir") -> Run:
  """Creates out_dir, or resumes the run in it, and writes its manifest.

  Args:
    out_dir: the run directory (created when missing).
    stage: the stage's name, stored in the manifest.
    config: everything that changes the rows (JSON-serializable); its hash must match
      a stored run's.
    names: the run's shard files in order (``shard_name``).
    prefixes: the shard name prefixes (a directory with such .jsonl files but no
      manifest is refused).
    recount: the counters of a shard found on disk but missing from the manifest's.
    stats: run stats from the per-shard counters.
    counts: extra manifest fields written after "config" (e.g. {"num_prompts": n}).
    hint: what the error messages tell the user to do instead.
  A run with a different config but no shard file on disk holds no work: it is started
  afresh (a failed first attempt does not block a corrected rerun).
  Raises:
    ValueError (one line, naming out_dir) for a run of another stage, a different
    config with shards on disk (naming the differing keys) or shard files without a
    manifest.
  """
  run = Run(out_dir, stage, config, names, counts or {}, stats)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = run.path(MANIFEST)
  if os.path.exists(manifest_path):
    old = _read_manifest(manifest_path)
    has_shards = any(n.startswith(tuple(prefixes)) and n.endswith(".jsonl")
                     for n in os.listdir(out_dir))
    if old.get("stage") != stage:
      raise ValueError(f"{out_dir} holds a {old.get('stage')!r} run; {hint}")
    if old.get("config_hash") != run.config_hash and has_shards:
      diff = config_diff(config, old.get("config", {}))
      raise ValueError(f"{out_dir} holds a {stage} run with a different config "
                       f"(differs in: {', '.join(diff) or 'config_hash'}); {hint}")
    if old.get("config_hash") == run.config_hash:
      run.sums = {k: v for k, v in old.get("shard_sums", {}).items() if k in run.names}
  elif any(n.startswith(tuple(prefixes)) and n.endswith(".jsonl") for n in os.listdir(out_dir)):
    raise ValueError(f"{out_dir} has shard files but no {MANIFEST}; {hint}")
  primary = distributed.is_primary()
  for n in os.listdir(out_dir):   # leftovers of a killed run
    if n.endswith(".tmp") and primary:
      os.remove(os.path.join(out_dir, n))
  for name in run.names:
    path = run.path(name)
    if os.path.exists(path):
      run.done.add(name)
      if name not in run.sums:
        run.sums[name] = recount(name, read_jsonl(path))
    else:
      run.sums.pop(name, None)
  if primary:
    run.write_manifest()
  # Every process has read the same shards before any writes a new one.
  distributed.barrier(f"open_run:{os.path.abspath(out_dir)}")
  return run


def read_run(out_dir: str, stage: Optional[str] = None) -> Dict[str, List[dict]]:
  """The rows of a complete run, per shard file, in the manifest's order.

  A manifest without "shard_files" stands for every .jsonl file in out_dir, sorted.
  Raises:
    FileNotFoundError without a manifest; ValueError naming out_dir when the run is of
    another stage than `stage` (None: any) or not complete.
  """
  manifest_path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(f"{out_dir}: no {MANIFEST} (not a stage output directory)")
  manifest = _read_manifest(manifest_path)
  if stage is not None and manifest.get("stage") != stage:
    raise ValueError(f"{out_dir}: not a {stage} run (stage {manifest.get('stage')!r})")
  names = manifest.get("shard_files")
  if names is None:
    names = sorted(n for n in os.listdir(out_dir) if n.endswith(".jsonl"))
  if not manifest.get("complete"):
    label = stage or manifest.get("stage")
    what = f"{label} run" if label else "run"
    done = len(manifest.get("shards_done", []))
    raise ValueError(f"{out_dir}: {what} is not complete ({done}/{len(names)} shards; "
                     f"rerun {label or 'the stage'} to finish the incomplete run)")
  return {name: read_jsonl(os.path.join(out_dir, name)) for name in names}

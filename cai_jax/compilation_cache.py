"""The persistent XLA compilation cache every `cai-jax` command uses.

Each stage is its own process (`cai-jax pipeline` starts one per stage), and most of them
compile the same programs for the same model: the sampler's prefill and decode loop, the
scoring and training steps. JAX's persistent cache stores each compiled executable on
disk (XLA's own serialization, no pickle), keyed by the program, the compile options and
the backend version, so a later process, or a rerun, loads it instead of compiling it
again. On the tiny CPU pipeline a warm cache cuts the run from 139 s to 75 s
(bench/RESULTS.md).

Where it lives, in order: `--compilation_cache=DIR`; the JAX_COMPILATION_CACHE_DIR
environment variable; $XDG_CACHE_HOME/cai_jax/xla (~/.cache/cai_jax/xla). The cache is
trusted code: keep it in a directory only you can write; delete it at any time.
`--compilation_cache=none` turns it off. Only programs that took at least
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (default here 0.5 s) to compile are stored.
The directory is kept under JAX_COMPILATION_CACHE_MAX_SIZE bytes (default here 8 GiB; -1
means no limit): storing a program first deletes the least recently used ones (JAX's LRU
eviction, under a file lock shared by the processes that use the directory; each store
scans the directory, which costs time with many thousands of entries: -1 skips it). In a
multi-process run only process 0 writes (a JAX rule); every process reads.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_ENABLE = "JAX_ENABLE_COMPILATION_CACHE"
ENV_MIN_SECS = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
ENV_MAX_SIZE = "JAX_COMPILATION_CACHE_MAX_SIZE"
DEFAULT_MIN_COMPILE_SECS = 0.5
DEFAULT_MAX_BYTES = 8 * 2**30
# File names of one entry in JAX's cache directory (jax._src.lru_cache).
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"
OFF = "none"
# The values JAX reads as false in JAX_ENABLE_COMPILATION_CACHE (jax's bool_env).
_FALSE = ("n", "no", "f", "false", "off", "0")


def default_dir(environ: Optional[dict] = None) -> str:
  """$XDG_CACHE_HOME/cai_jax/xla, or ~/.cache/cai_jax/xla."""
  env = os.environ if environ is None else environ
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cai_jax", "xla")


def choose_dir(flag: Optional[str], environ: Optional[dict] = None) -> Optional[str]:
  """The cache directory for a --compilation_cache value (None: not given), or None = off.

  An explicit flag wins; then JAX_COMPILATION_CACHE_DIR; then default_dir(). A
  JAX_ENABLE_COMPILATION_CACHE of false / 0 in the environment turns it off unless the
  flag names a directory (the values JAX reads as false: 0, false, f, no, n, off).
  """
  env = os.environ if environ is None else environ
  if flag is not None:
    if not flag.strip():
      raise ValueError("--compilation_cache is empty; give a directory or 'none'")
    return None if flag.strip().lower() == OFF else os.path.abspath(os.path.expanduser(flag))
  if env.get(ENV_ENABLE, "").strip().lower() in _FALSE:
    return None
  return os.path.abspath(os.path.expanduser(env.get(ENV_DIR) or default_dir(env)))


def max_bytes(environ: Optional[dict] = None) -> int:
  """The cache's size limit in bytes: JAX_COMPILATION_CACHE_MAX_SIZE, else DEFAULT_MAX_BYTES.

  -1 means no limit. Raises ValueError (one line) for anything but an integer >= -1, and for
  0 (JAX would silently store nothing; --compilation_cache=none turns the cache off).
  """
  env = os.environ if environ is None else environ
  text = env.get(ENV_MAX_SIZE, "").strip()
  if not text:
    return DEFAULT_MAX_BYTES
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < -1 or value == 0:
    raise ValueError(f"{ENV_MAX_SIZE}={text!r}: expected a size in bytes > 0, or -1 for no "
                     "limit (--compilation_cache=none turns the cache off)")
  return value


def add_missing_access_times(directory: str) -> int:
  """Gives every entry of `directory` without one an access-time file (its mtime).

  JAX's eviction reads a ``KEY-atime`` file beside each ``KEY-cache`` entry and fails on an
  entry that has none: one stored while the cache had no size limit (-1). Runs under
  JAX's lock of the directory. Returns how many it wrote.
  """
  import filelock
  written = 0
  with filelock.FileLock(os.path.join(directory, ".lockfile"), timeout=60):
    names = set(os.listdir(directory))
    for name in names:
      if not name.endswith(_CACHE_SUFFIX):
        continue
      atime = name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX
      if atime in names:
        continue
      try:
        mtime_ns = os.stat(os.path.join(directory, name)).st_mtime_ns
      except FileNotFoundError:   # evicted by another process meanwhile
        continue
      with open(os.path.join(directory, atime), "wb") as f:
        f.write(int(mtime_ns).to_bytes(8, "little"))
      written += 1
  return written


def configure(flag: Optional[str]) -> Optional[str]:
  """Turns the cache on (or off) for this process and the processes it starts.

  Sets the environment variables JAX reads at import (so a pipeline's stage processes
  inherit the choice) and, when jax is already imported, its config. Call before the
  first compile. Returns the directory in use, or None when off.
  Raises ValueError (one line) when a directory given by the flag or JAX_COMPILATION_CACHE_DIR
  cannot be created, or for a bad JAX_COMPILATION_CACHE_MAX_SIZE (``max_bytes``); when the
  default directory cannot be created, warns on stderr and runs without a cache.
  """
  directory = choose_dir(flag)
  if directory is not None:
    limit = max_bytes()
    try:
      os.makedirs(directory, exist_ok=True)
      if limit != -1:
        add_missing_access_times(directory)
    except OSError as e:
      reason = e.strerror or str(e)
      if flag is not None or os.environ.get(ENV_DIR):
        source = "--compilation_cache" if flag is not None else ENV_DIR
        raise ValueError(f"{source}: cannot create or write {directory}: {reason}; "
                         f"give another directory or --compilation_cache=none "
                         f"({ENV_MAX_SIZE}=-1 reads a read-only one)") from None
      # The default place: a read-only home directory costs the cache, not the command.
      print(f"cai-jax: warning: cannot create the compilation cache {directory} ({reason}); "
            "running without it (--compilation_cache=DIR picks another place)", file=sys.stderr)
      directory = None
  if directory is None:
    os.environ[ENV_ENABLE] = "false"
    os.environ.pop(ENV_DIR, None)
  else:
    os.environ[ENV_ENABLE] = "true"
    os.environ[ENV_DIR] = directory
    os.environ.setdefault(ENV_MIN_SECS, str(DEFAULT_MIN_COMPILE_SECS))
    os.environ[ENV_MAX_SIZE] = str(limit)
  if "jax" in sys.modules:   # otherwise jax reads the variables above when it is imported
    import jax
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    if directory is not None:
      jax.config.update("jax_compilation_cache_dir", directory)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[ENV_MIN_SECS]))
      jax.config.update("jax_compilation_cache_max_size", limit)
  return directory

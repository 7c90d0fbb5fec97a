"""cai_jax.compilation_cache: where the persistent XLA cache lives, and that a second
process loads what the first one compiled instead of compiling it again."""

import json
import os
import subprocess
import sys

import pytest

from cai_jax import compilation_cache as cc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_flag_wins_then_the_environment_then_the_default(tmp_path):
  env = {cc.ENV_DIR: str(tmp_path / "env")}
  assert cc.choose_dir(str(tmp_path / "flag"), env) == str(tmp_path / "flag")
  assert cc.choose_dir(None, env) == str(tmp_path / "env")
  assert cc.choose_dir("none", env) is None and cc.choose_dir("NONE", {}) is None
  assert cc.choose_dir(None, {"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/cai_jax/xla"
  assert cc.choose_dir(None, {}) == os.path.join(os.path.expanduser("~"), ".cache", "cai_jax", "xla")
  # JAX's own switch turns it off unless the flag names a directory.
  off = dict(env, **{cc.ENV_ENABLE: "false"})
  assert cc.choose_dir(None, off) is None
  assert cc.choose_dir(str(tmp_path / "flag"), off) == str(tmp_path / "flag")
  with pytest.raises(ValueError, match="--compilation_cache"):
    cc.choose_dir(" ", {})


# Configures the cache before jax is imported (as the CLI does), compiles a few programs
# (the caller sets the threshold to 0, so each is stored) and prints how many were loaded
# from the cache.
_PROGRAM = r"""
import json, os, sys
from cai_jax import compilation_cache
directory = compilation_cache.configure(sys.argv[1] if len(sys.argv) > 1 else None)
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

@jax.jit
def f(x):
  for i in range(60 + int(os.environ.get("PROGRAM_VARIANT", "0"))):
    x = jnp.tanh(x @ x.T + jnp.sin(x) * i)
  return x.sum()

value = float(f(jnp.ones((32, 32)) / 32))
print(json.dumps({"dir": directory, "hits": len(hits), "value": value}))
"""


def _compile_in_a_new_process_raw(flag, env_extra=None):
  """Runs _PROGRAM (flag None: no --compilation_cache) in a fresh process; the result."""
  env = {k: v for k, v in os.environ.items()
         if k not in (cc.ENV_DIR, cc.ENV_ENABLE, cc.ENV_MAX_SIZE)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             **(env_extra or {}))
  return subprocess.run([sys.executable, "-c", _PROGRAM] + ([] if flag is None else [flag]),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _compile_in_a_new_process(flag, env_extra=None):
  out = _compile_in_a_new_process_raw(flag, env_extra)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  directory = str(tmp_path / "xla")
  first = _compile_in_a_new_process(directory)
  assert first["dir"] == directory and first["hits"] == 0
  entries = [n for n in os.listdir(directory) if n.endswith("-cache")]
  assert entries, os.listdir(directory)
  second = _compile_in_a_new_process(directory)
  # Every program the first process compiled (and stored) is loaded, none compiled again.
  assert second["hits"] == len(entries) and second["value"] == first["value"]
  assert sorted(n for n in os.listdir(directory) if n.endswith("-cache")) == sorted(entries)


def test_none_turns_it_off(tmp_path):
  directory = tmp_path / "xla"
  off = _compile_in_a_new_process("none", {cc.ENV_DIR: str(directory)})
  assert off["dir"] is None and off["hits"] == 0
  assert not directory.exists()


def test_an_unwritable_default_place_warns_and_runs_without_a_cache(tmp_path):
  out = _compile_in_a_new_process_raw(None, {"XDG_CACHE_HOME": "/dev/null/cache"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["dir"] is None
  assert "cannot create the compilation cache /dev/null/cache/cai_jax/xla" in out.stderr


def test_max_bytes_reads_the_environment_and_rejects_bad_sizes():
  assert cc.max_bytes({}) == cc.DEFAULT_MAX_BYTES == 8 * 2**30
  assert cc.max_bytes({cc.ENV_MAX_SIZE: " 1000 "}) == 1000
  assert cc.max_bytes({cc.ENV_MAX_SIZE: "-1"}) == -1
  for bad in ("abc", "0", "-2", "1.5"):
    with pytest.raises(ValueError, match=f"{cc.ENV_MAX_SIZE}='{bad}'"):
      cc.max_bytes({cc.ENV_MAX_SIZE: bad})


def test_entries_without_an_access_time_get_their_mtime(tmp_path):
  (tmp_path / "a-cache").write_bytes(b"x" * 10)
  (tmp_path / "b-cache").write_bytes(b"y")
  (tmp_path / "b-atime").write_bytes((7).to_bytes(8, "little"))
  os.utime(tmp_path / "a-cache", ns=(1, 123_456_789))
  assert cc.add_missing_access_times(str(tmp_path)) == 1
  assert int.from_bytes((tmp_path / "a-atime").read_bytes(), "little") == 123_456_789
  assert int.from_bytes((tmp_path / "b-atime").read_bytes(), "little") == 7
  assert cc.add_missing_access_times(str(tmp_path)) == 0


def _entry_sizes(directory):
  return {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
          if n.endswith("-cache")}


def test_a_size_limit_evicts_the_least_recently_used_entries(tmp_path):
  directory = str(tmp_path / "xla")
  # Stored without a limit: no access-time files.
  _compile_in_a_new_process(directory, {cc.ENV_MAX_SIZE: "-1"})
  old = _entry_sizes(directory)
  assert len(old) >= 2 and not [n for n in os.listdir(directory) if n.endswith("-atime")]
  # Under a limit of what is there already, a new program pushes the unused old ones out.
  limit = sum(old.values())
  second = _compile_in_a_new_process(directory, {cc.ENV_MAX_SIZE: str(limit),
                                                 "PROGRAM_VARIANT": "1"})
  new = _entry_sizes(directory)
  assert sum(new.values()) <= limit
  assert second["hits"] == len(old) - 1      # every program but f is the same
  old_f = [n for n in old if n.startswith("jit_f-")]
  new_f = [n for n in new if n.startswith("jit_f-")]
  assert len(old_f) == 1 and len(new_f) == 1 and new_f != old_f   # f went out, f' came in
  names = set(os.listdir(directory))
  assert all(n[:-len("-cache")] + "-atime" in names for n in new)


@pytest.mark.parametrize("value", ["n", "No", "f", "FALSE", "off", "0"])
def test_every_value_jax_reads_as_false_turns_it_off(value, tmp_path, monkeypatch):
  """JAX_ENABLE_COMPILATION_CACHE as JAX reads it (its bool_env), not a subset."""
  from jax._src.config import bool_env
  env = {cc.ENV_DIR: str(tmp_path), cc.ENV_ENABLE: value}
  assert cc.choose_dir(None, env) is None
  assert cc.choose_dir(None, dict(env, **{cc.ENV_ENABLE: "t"})) == str(tmp_path)
  monkeypatch.setenv(cc.ENV_ENABLE, value)
  assert bool_env(cc.ENV_ENABLE, True) is False


def test_a_directory_that_cannot_be_created_names_where_it_came_from(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv(cc.ENV_DIR, str(blocker / "from_env"))
  with pytest.raises(ValueError, match=rf"^{cc.ENV_DIR}: cannot create or write "
                                       rf"{blocker}/from_env: Not a directory; ") as e:
    cc.configure(None)
  assert "\n" not in str(e.value) and "--compilation_cache=none" in str(e.value)
  with pytest.raises(ValueError, match=rf"^--compilation_cache: cannot create or write "
                                       rf"{blocker}/from_flag: "):
    cc.configure(str(blocker / "from_flag"))

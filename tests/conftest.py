"""Test-session setup: 8 fake CPU devices (set before jax is imported), one persistent
compilation cache shared by the session and the CLI processes it starts, and every test
module's compiled programs released when the module ends."""

import atexit
import gc
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cai_jax.compilation_cache import ENV_DIR, ENV_MAX_SIZE, ENV_MIN_SECS  # noqa: E402

# Many tests run the same tiny programs again in fresh processes (`cai-jax STAGE`, the
# pipeline's stage processes, 2-process runs and their 1-process references): a cache that
# lives for this session only lets them load what an earlier process compiled. Set
# JAX_COMPILATION_CACHE_DIR to choose the directory (it is then kept). Every program is
# stored, however short its compile: on the tiny models that is faster than a 0.5 s threshold.
if ENV_DIR not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="cai_jax_test_xla_cache_")
  os.environ[ENV_DIR] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, True)
os.environ.setdefault(ENV_MIN_SECS, "0")
# No size limit for this session's cache (the CLI processes inherit it): JAX's eviction scans
# the whole directory on every store, and with every program stored a session's cache holds
# thousands of entries (the default run took 34.5 instead of 25 minutes with the limit on).
os.environ.setdefault(ENV_MAX_SIZE, "-1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's caches of compiled programs after each test module.

  Each CPU executable keeps about three memory mappings of JIT-compiled code for as long as
  a cache holds it. One pytest process compiles thousands of programs, and without this
  the count reaches the kernel's limit (vm.max_map_count, 65530 by default) near the end of
  the run: LLVM then fails to map code ("Failed to materialize symbols"), Python raises
  MemoryError with free memory left, or XLA's compiler segfaults."""
  yield
  jax.clear_caches()
  gc.collect()

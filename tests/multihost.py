"""Launches commands as several jax.distributed processes on localhost, for the multi-host tests.

Each process sees `devices` fake CPU devices (XLA_FLAGS), so 2 processes x 4 devices
form one 8-device global mesh, compared against 1 process x 8 devices. Not a test
module: tests import it (``from tests import multihost`` / ``import multihost``).

  procs = multihost.launch_cli(["sample", "--gin_file=..."], tmp_path, processes=2, devices=4)
  outputs = multihost.wait(procs)          # each process's stdout; fails with stderr on error
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300   # per launch; a process still running then is killed and the test fails

Proc = Tuple[subprocess.Popen, str, str]   # (process, stdout path, stderr path)

# Bindings of a 3-step training run on the fsdp mesh, batch 8 (a multiple of 8 devices).
SHORT_TRAINING = ["--gin_file=mesh/fsdp.gin", "--gin.TrainConfig.num_steps=3",
                  "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.seq_len=64",
                  "--gin.TrainConfig.progress=False", "--gin.TrainConfig.async_checkpoint=False",
                  "--gin.OptimizerConfig.learning_rate=3e-3"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def worker_env(devices: int, cache_dir: str) -> dict:
  """The environment of one process: `devices` CPU devices, no cluster variables, and the
  test session's persistent compilation cache (conftest sets it up; the tests of every
  module launch the same tiny programs) or, outside a test session, `cache_dir` shared by
  the processes of one launch. Only process 0 of a multi-process run writes to it (JAX)."""
  from cai_jax.compilation_cache import ENV_DIR, ENV_MIN_SECS
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CAI_", "SLURM_", "TPU_"))}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault(ENV_DIR, str(cache_dir))
  env.setdefault(ENV_MIN_SECS, "0.5")
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def launch(argv: Sequence[str], log_dir, name: str, devices: int, cwd: str = REPO) -> Proc:
  """Starts one process running `argv` (stdout / stderr to LOG_DIR/NAME.out / .err)."""
  os.makedirs(log_dir, exist_ok=True)
  stdout, stderr = os.path.join(log_dir, f"{name}.out"), os.path.join(log_dir, f"{name}.err")
  with open(stdout, "w") as fo, open(stderr, "w") as fe:
    proc = subprocess.Popen(list(argv), cwd=cwd, stdout=fo, stderr=fe,
                            env=worker_env(devices, os.path.join(log_dir, f"cache-{devices}")))
  return proc, stdout, stderr


def distributed_flags(processes: int, address: str, process_id: int) -> List[str]:
  return ["--distributed=explicit", f"--coordinator_address={address}",
          f"--num_processes={processes}", f"--process_id={process_id}"]


def launch_cli(args: Sequence[str], log_dir, processes: int = 2, devices: int = 4,
               name: str = "cli", cwd: str = REPO) -> List[Proc]:
  """`python -m cai_jax.main ARGS` as `processes` processes of `devices` devices each
  (one process: a plain run with --distributed=none)."""
  base = [sys.executable, "-m", "cai_jax.main", *args]
  if processes == 1:
    return [launch(base + ["--distributed=none"], log_dir, f"{name}-single", devices, cwd)]
  address = f"localhost:{free_port()}"
  return [launch(base + distributed_flags(processes, address, i), log_dir, f"{name}{i}", devices,
                 cwd) for i in range(processes)]


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def wait(procs: Sequence[Proc], timeout_s: float = TIMEOUT_S, expect_rc: Optional[int] = 0
         ) -> List[Tuple[int, str, str]]:
  """(exit status, stdout, stderr) of each process, once all exit.

  expect_rc: every process must exit with it (None: any); otherwise, or on a timeout,
  every process is killed and the test fails showing each one's stderr tail.
  """
  deadline = time.monotonic() + timeout_s
  results = []
  try:
    for proc, stdout, stderr in procs:
      try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        rc = None
      if rc is None or (expect_rc is not None and rc != expect_rc):
        for other, _, _ in procs:
          other.kill()
        logs = "\n".join(f"--- {os.path.basename(err)} ---\n{_read(err)[-4000:]}"
                         for _, _, err in procs)
        pytest.fail(f"{os.path.basename(stderr)} {'timed out' if rc is None else f'exited with {rc}'}"
                    f"\n{logs}")
      results.append((rc, _read(stdout), _read(stderr)))
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


def run_cli(args: Sequence[str], log_dir, processes: int = 2, devices: int = 4,
            name: str = "cli", timeout_s: float = TIMEOUT_S, cwd: str = REPO) -> List[str]:
  """Runs ``launch_cli`` to completion; each process's stdout (all must exit 0)."""
  return [out for _, out, _ in wait(launch_cli(args, log_dir, processes, devices, name, cwd),
                                    timeout_s)]


def result(stdout: str) -> dict:
  """The JSON result a command printed (its last JSON-object line; the collectives runtime
  of a multi-process run prints other lines to the same stdout). Fails the test if none."""
  from cai_jax.stages.pipeline import last_json_line
  value = last_json_line(stdout)
  if not value:
    pytest.fail(f"no JSON result in stdout:\n{stdout[-2000:]}")
  return value


def output_files(out_dir) -> List[str]:
  """Sorted paths (relative to out_dir) of a run's files, leaving out orbax's own (tb/,
  checkpoints/, model params/, whose layout depends on the process count). Fails the test
  on a .tmp or .partial leftover."""
  found = [os.path.relpath(os.path.join(r, f), out_dir) for r, _, fs in os.walk(out_dir) for f in fs]
  leftovers = [f for f in found if ".tmp" in f or ".partial" in f]
  if leftovers:
    pytest.fail(f"leftovers in {out_dir}: {leftovers}")
  return sorted(f for f in found if not f.startswith(("tb/", "checkpoints/")) and "/params/" not in f)


def run_multi_and_single(args: Sequence[str], root, out_flag: str = "--out_dir"
                         ) -> Tuple[Tuple[str, dict], Tuple[str, dict]]:
  """Runs `cai-jax ARGS OUT_FLAG=ROOT/multi` as 2 processes x 4 devices, then with
  ROOT/single as 1 process x 8 devices (the same global mesh); returns
  ((multi dir, process 0's result), (single dir, its result))."""
  runs = []
  for name, processes, devices in (("multi", 2, 4), ("single", 1, 8)):
    out = os.path.join(str(root), name)
    stdout = run_cli(list(args) + [f"{out_flag}={out}"], os.path.join(str(root), "logs"),
                     processes, devices, name)
    runs.append((out, result(stdout[0])))
  return runs[0], runs[1]

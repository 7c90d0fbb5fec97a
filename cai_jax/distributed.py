"""Multi-process (multi-host) runs through JAX's own distributed runtime.

One process runs per host (or per group of local devices); ``initialize`` connects
them through ``jax.distributed.initialize`` before any other jax call, after which
``jax.devices()`` lists the devices of every process and one mesh spans them all.

Modes:
  'none'      single process; nothing is initialized.
  'auto'      initialize only when the environment shows a multi-process launch:
                explicit values (arguments, or the environment variables
                CAI_COORDINATOR_ADDRESS, CAI_NUM_PROCESSES, CAI_PROCESS_ID);
                SLURM with SLURM_NTASKS > 1 in a task of an srun step (jax reads the
                other SLURM_* variables; without them, an error naming the missing one);
                a Cloud TPU pod worker (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES
                listing more than one host, or MEGASCALE_COORDINATOR_ADDRESS set for
                multi-slice, as on GKE; on a TPU VM, more than one worker in its GCE
                metadata, ``cloud_tpu_vm_processes``); values not given explicitly are
                detected by jax.
              Otherwise nothing happens, so a plain single-process run is unchanged.
  'explicit'  initialize from coordinator_address, num_processes and process_id (arguments
              or the CAI_* environment variables), all three required.

In a multi-process run every process executes the same program: each reads the same
deterministic data stream and keeps its own rows of each global batch (training encodes
only those rows, ``data.Batches``; other batches go through ``sharding.shard_batch``);
checkpoints are collective; metrics and exports are written by process 0
(``is_primary``).

A failing process tells the others (``report_failure``) through the coordination service's
key-value store; they stop at their next ``barrier`` (``PeerFailed``) or, wherever they are,
a jitted step or device collective included, through the thread of ``watch_failures``.
Such a run ends through ``end_run`` in every process, which skips jax's shutdown barrier
(the processes no longer meet there); process 0, which hosts the coordination service,
ends last. So no process waits out jax's heartbeat and shutdown timeouts (minutes) or
aborts.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from cai_jax.errors import first_line

MODES = ("none", "auto", "explicit")
ENV_COORDINATOR_ADDRESS = "CAI_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CAI_NUM_PROCESSES"
ENV_PROCESS_ID = "CAI_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Launch:
  """A detected multi-process launch.

  Attributes:
    source: 'explicit', 'slurm' or 'tpu' (what showed the launch).
    coordinator_address: 'host:port' of process 0's coordinator, or None (jax detects it).
    num_processes: number of processes, or None (jax detects it).
    process_id: this process's index in [0, num_processes), or None (jax detects it).
  """

  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


# What jax's SLURM detection reads besides SLURM_NTASKS: set in each task that srun starts,
# not in the batch script itself nor in an salloc shell.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
  text = environ.get(name)
  if text is None or text.strip() == "":
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def _check_address(address: str, name: str) -> None:
  """ValueError naming `name` unless address is HOST:PORT with a port in [1, 65535]."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{name}={address!r} is not HOST:PORT (a port in 1..65535), e.g. "
                     "10.0.0.1:8476")


def _host_count(value: Optional[str]) -> int:
  """Number of comma-separated, non-empty entries of a host list variable."""
  return len([h for h in (value or "").split(",") if h.strip()])


_GOOGLE_PCI_VENDOR = "0x1ae0"   # TPU chips on a Cloud TPU VM's PCI bus


def tpu_chips_present() -> bool:
  """True when this host's PCI bus has a Google device: a Cloud TPU VM's chips, or another
  Google device such as a gVNIC network card (jax's Cloud TPU detection, which
  ``cloud_tpu_vm_processes`` asks next, tells them apart); reads /sys only."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def cloud_tpu_vm_processes() -> int:
  """Hosts of the Cloud TPU VM slice(s) this host belongs to, as ``jax.distributed`` finds
  them on a TPU VM: the GCE metadata server's ``worker-network-endpoints`` of the slice times
  its ``MEGASCALE_NUM_SLICES``. 0 off Cloud TPU VMs (no TPU chip on the PCI bus, or jax finds
  no TPU VM), where nothing is imported or asked.

  A TPU VM created with ``gcloud compute tpus tpu-vm create`` (launch/tpu_vm.sh) has no
  environment variable naming its workers; GKE sets TPU_WORKER_HOSTNAMES instead. The
  worker list is read through jax's Cloud TPU cluster class (private API): a jax without
  it is a RuntimeError on a TPU host, naming the way around it.
  """
  if not tpu_chips_present():
    return 0
  import jax   # its import runs the Cloud TPU VM set-up the cluster class reads
  try:
    from jax._src.clusters import cloud_tpu_cluster
    gce = cloud_tpu_cluster.GceTpuCluster
    if not gce.is_env_present():
      return 0
    return len(gce._get_worker_list_in_slice()) * gce._get_num_slices()
  except (ImportError, AttributeError) as e:
    raise RuntimeError(
        f"cannot read this Cloud TPU VM's worker list with jax {jax.__version__} ({e}); set "
        "TPU_WORKER_HOSTNAMES, or pass --distributed=explicit with --coordinator_address, "
        "--num_processes and --process_id (or --distributed=none for one process)") from None


def cluster_source(environ: Mapping[str, str],
                   tpu_vm_processes: Callable[[], int] = cloud_tpu_vm_processes
                   ) -> Optional[str]:
  """'slurm' or 'tpu' when `environ` (or, for a Cloud TPU VM slice, `tpu_vm_processes()`)
  shows a multi-process cluster launch, else None."""
  ntasks = _env_int(environ, "SLURM_NTASKS")
  if ntasks is not None and ntasks > 1:
    absent = [name for name in SLURM_STEP_VARIABLES if name not in environ]
    if absent:
      raise ValueError(f"SLURM_NTASKS={ntasks} but {absent[0]} is not set: this process is not "
                       "one task of an srun step; start cai-jax with srun (launch/slurm.sbatch), "
                       "or pass --distributed=none to run one process")
    return "slurm"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
  if _host_count(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if hosts is None and tpu_vm_processes() > 1:
    return "tpu"
  return None


def detect_launch(mode: str = "auto", coordinator_address: Optional[str] = None,
                  num_processes: Optional[int] = None, process_id: Optional[int] = None,
                  environ: Optional[Mapping[str, str]] = None,
                  tpu_vm_processes: Callable[[], int] = cloud_tpu_vm_processes
                  ) -> Optional[Launch]:
  """The multi-process launch to initialize, or None for a single-process run.

  Function of its arguments, `environ` (default: os.environ) and, in 'auto' mode when
  neither shows a launch, `tpu_vm_processes()` (the hosts of a Cloud TPU VM slice);
  arguments win over the CAI_* environment variables.
  Raises:
    ValueError: unknown mode; 'explicit' without one of the three values (the message
      names the flag); 'auto' with some explicit values, no cluster to supply the rest
      and one missing; a non-integer variable; a coordinator address that is not
      HOST:PORT; process_id outside [0, num_processes);
      SLURM_NTASKS > 1 outside a task of an srun step (naming the variable it lacks).
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
  if mode == "none":
    return None
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
  given = {"coordinator_address": (address, ENV_COORDINATOR_ADDRESS),
           "num_processes": (count, ENV_NUM_PROCESSES),
           "process_id": (index, ENV_PROCESS_ID)}
  missing = [f"--{flag} (or {env})" for flag, (value, env) in given.items() if value is None]
  source = "explicit"
  if mode == "auto":
    cluster = cluster_source(environ, tpu_vm_processes) if missing else None
    if len(missing) == len(given):
      return Launch(cluster) if cluster else None
    if cluster:
      source = cluster
      missing = []
  if missing:
    raise ValueError(f"distributed mode {mode!r} needs {missing[0]}")
  if address is not None:
    _check_address(address, "--coordinator_address" if coordinator_address
                   else ENV_COORDINATOR_ADDRESS)
  if count is not None and count < 1:
    raise ValueError(f"num_processes must be positive, got {count}")
  if index is not None and count is not None and not 0 <= index < count:
    raise ValueError(f"process_id must be in [0, {count}), got {index}")
  return Launch(source, address, count, index)


def start(mode: str = "auto", coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None,
          local_device_ids: Optional[Sequence[int]] = None,
          environ: Optional[Mapping[str, str]] = None) -> bool:
  """Connects this process to the others if a launch is detected; returns whether it did.

  Touches no jax backend when nothing is to be initialized, so it is free in
  single-process use. Calling it again after a successful start does nothing.
  Raises ValueError as ``detect_launch``; RuntimeError (from jax) if another jax
  computation already initialized the backend.
  """
  launch = detect_launch(mode, coordinator_address, num_processes, process_id, environ)
  if launch is None:
    return False
  import jax
  if jax.distributed.is_initialized():
    return True
  logging.info("jax.distributed.initialize: %s launch, coordinator=%s processes=%s id=%s",
               launch.source, launch.coordinator_address, launch.num_processes, launch.process_id)
  jax.distributed.initialize(
      coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
      process_id=launch.process_id,
      local_device_ids=None if local_device_ids is None else list(local_device_ids))
  return True


def runtime_info() -> dict:
  """{process_index, process_count, local_devices, global_devices} (device counts) of this run."""
  import jax
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> dict:
  """Initializes jax.distributed as `mode` asks (see the module docstring); call before any jax use.

  Args:
    mode: 'none', 'auto' or 'explicit'.
    coordinator_address: 'host:port' of process 0 (env CAI_COORDINATOR_ADDRESS).
    num_processes: number of processes (env CAI_NUM_PROCESSES).
    process_id: this process's index, 0 .. num_processes - 1 (env CAI_PROCESS_ID).
    local_device_ids: restricts this process to these local devices (GPU launches).
  Returns:
    {'process_index': int, 'process_count': int, 'local_devices': int (devices of this
    process), 'global_devices': int (devices of all processes)}.
  """
  start(mode, coordinator_address, num_processes, process_id, local_device_ids)
  return runtime_info()


def main_flags_hook(flag_values: Any) -> Optional[dict]:
  """``start`` from parsed absl flags `distributed`, `coordinator_address`, `num_processes`,
  `process_id`; returns ``runtime_info()`` when a multi-process run was started, else None
  (and leaves the jax backend untouched)."""
  started = start(flag_values.distributed, flag_values.coordinator_address,
                  flag_values.num_processes, flag_values.process_id)
  return runtime_info() if started else None


def is_primary() -> bool:
  """True on process 0, the one that writes metrics, summaries and exports."""
  import jax
  return jax.process_index() == 0


class PeerFailed(RuntimeError):
  """Another process of this run reported a failure (``report_failure``) while this one waited."""


# Keys in the coordination service's key-value store.
_FAILED_DIR = "cai_jax/failed"     # FAILED_DIR/<process index> = "<error type>: <first line>"
_ENDED_DIR = "cai_jax/ended"       # ENDED_DIR/<process index> = "1": ended after a peer failed
_ending = threading.Event()        # this process is ending a failed run (``claim_end``)
_claim_lock = threading.Lock()
_BARRIER_DIR = "cai_jax/barrier"   # BARRIER_DIR/<name hash>.<n> = processes arrived (a counter)
_barrier_counts: dict = {}         # barrier name -> times this process passed it
_watchers: list = []               # stop functions of the running ``watch_failures`` threads
_barrier_last: list = []           # the counter key of this process's previous barrier


def _client():
  """jax's coordination-service client of this run (orbax reaches it the same way)."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized")
  return client


def _index_of(key: str) -> int:
  return int(key.rsplit("/", 1)[-1])


def _multi_process() -> bool:
  """True in an initialized run of several processes; never initializes jax (a process
  that fails before any jax use has nothing to coordinate)."""
  if "jax" not in sys.modules:
    return False
  import jax
  try:
    return jax.distributed.is_initialized() and jax.process_count() > 1
  except Exception:
    return False


def _failure_lines(found, skip: Optional[int] = None, same: Optional[str] = None) -> list:
  """["process I failed: ERROR", ...] of the FAILED_DIR entries `found`, leaving out
  process `skip` and failures whose message equals `same`."""
  return [f"process {_index_of(key)} failed: {value}" for key, value in sorted(found)
          if _index_of(key) != skip and value != same]


def failures() -> list:
  """["process I failed: ERROR", ...]: the failures this run's processes reported
  (``report_failure``)."""
  return _failure_lines(_client().key_value_dir_get(_FAILED_DIR))


def failure_message(error: BaseException) -> str:
  """"<error type>: <first line>", as ``report_failure`` tells the other processes."""
  name = type(error).__name__
  return f"{name}: {first_line(error)}" if str(error).strip() else name


def peer_failures(error: Optional[BaseException] = None) -> list:
  """``failures`` of the other processes of a multi-process run, leaving out those that
  failed with the same message as `error` (every process failing alike on bad input);
  [] in a single-process run or when the coordination service cannot be asked. Lets a
  process whose collective broke because a peer ended (e.g. a closed connection) name the
  peer's error instead of its own."""
  if not _multi_process():
    return []
  import jax
  try:
    return _failure_lines(_client().key_value_dir_get(_FAILED_DIR), skip=jax.process_index(),
                          same=None if error is None else failure_message(error))
  except Exception:
    return []


def claim_end() -> bool:
  """True for the first caller in this process, the one that ends a failed run (the main
  thread with its own error, or the failure watcher for a peer's); False for any later
  one, which should leave the ending to it (``wait_for_end``)."""
  with _claim_lock:
    if _ending.is_set():
      return False
    _ending.set()
    return True


def wait_for_end(timeout_s: float = 120.0) -> None:
  """Blocks while another thread of this process ends it (after ``claim_end`` returned
  False), returning only if it has not done so within timeout_s."""
  time.sleep(timeout_s)


def end_run(status: int, timeout_s: float = 60.0) -> None:
  """Ends this process of a multi-process run at once with `status`, skipping jax's shutdown
  barrier and atexit handlers (the processes no longer meet there), after flushing stdout
  and stderr; returns without doing anything in a single-process run.

  For a run that failed (``report_failure`` here or in another process). Every process
  marks itself ended in the key-value store first; process 0, whose exit stops the
  coordination service (and would abort the others), then waits until every other process
  has marked itself ended, at most timeout_s, before it goes.
  """
  if not _multi_process():
    return
  import jax
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass
  try:
    client, count, me = _client(), jax.process_count(), jax.process_index()
    client.key_value_set(f"{_ENDED_DIR}/{me}", "1", allow_overwrite=True)
    if me == 0:
      deadline = time.monotonic() + timeout_s
      while time.monotonic() < deadline:
        if len({_index_of(k) for k, _ in client.key_value_dir_get(_ENDED_DIR)}) >= count:
          time.sleep(0.2)   # let the last ones finish exiting before the service stops
          break
        time.sleep(0.05)
  except Exception as e:
    logging.warning("could not coordinate the end of this run with the other processes: %s", e)
  os._exit(status)


def watch_failures(on_peer_failure: Callable[[str], None], poll_s: float = 0.5
                   ) -> Optional[threading.Thread]:
  """Starts a daemon thread that calls on_peer_failure(message) (which should end the process,
  through ``end_run``) as soon as another process reports a failure, wherever the main
  thread is: in a jitted step or a device collective that the failed process will never
  join, the main thread would otherwise wait for jax's heartbeat timeout. message is
  "process I failed: ERROR (this process stopped for it while running)". Returns the
  thread, or None in a single-process run.
  """
  if not _multi_process():
    return None
  import jax
  client, me = _client(), jax.process_index()   # no jax calls in the thread itself
  stop = threading.Event()

  def watch():
    while not stop.wait(poll_s) and not _ending.is_set():
      try:
        found = client.key_value_dir_get(_FAILED_DIR)
      except Exception:   # the coordination service is gone; jax's own heartbeat reports it
        return
      if any(_index_of(k) != me for k, _ in found):
        if claim_end():   # else the main thread is already ending this process
          on_peer_failure("; ".join(_failure_lines(found, skip=me))
                          + " (this process stopped for it while running)")
        return

  thread = threading.Thread(target=watch, name="cai_jax-failure-watch", daemon=True)
  thread.start()

  def stop_watching(timeout_s: float = 10.0) -> None:
    # A daemon thread that returns from a jaxlib call (GIL released) while the interpreter
    # finalizes is ended by CPython inside C++ frames, which aborts the process ("FATAL:
    # exception not rethrown") after a run that succeeded. Stop it before that, and before
    # jax's own atexit shutdown (atexit runs handlers last registered first).
    stop.set()
    if thread is not threading.current_thread():
      thread.join(timeout_s)

  _watchers.append(stop_watching)
  atexit.register(stop_watching)
  return thread


def stop_watching_failures() -> None:
  """Stops the threads of ``watch_failures`` and waits for them (also run at exit)."""
  while _watchers:
    _watchers.pop()()


def report_failure(error: BaseException) -> None:
  """Tells the other processes of a multi-process run that this one failed with `error`.

  Processes waiting in ``barrier`` then raise ``PeerFailed`` naming it at once, instead of
  waiting for the coordination service's heartbeat and shutdown timeouts (minutes) and
  aborting. A no-op with one process; never raises (it runs while an error propagates).
  """
  try:
    if not _multi_process():
      return
    import jax
    _client().key_value_set(f"{_FAILED_DIR}/{jax.process_index()}", failure_message(error),
                            allow_overwrite=True)
  except Exception as e:  # the original error matters more than this report
    logging.warning("could not report the failure to the other processes: %s", e)


def barrier(name: str, poll_s: float = 0.05) -> None:
  """Blocks until every process reaches the barrier `name` (no-op with one process).

  Every process must pass the same barriers in the same order. Waits in the coordination
  service's key-value store (no device computation): each process increments the barrier's
  counter once, then polls it every `poll_s` seconds at most (one key per poll, so the
  service's load grows with the number of processes, not with its square), and raises
  PeerFailed as soon as another process has reported a failure (``report_failure``).
  A process that dies without reporting is noticed by jax's own heartbeat, which ends the run.
  """
  import jax
  count = jax.process_count()
  if count < 2:
    return
  import hashlib
  client = _client()
  passed = _barrier_counts.get(name, 0)
  _barrier_counts[name] = passed + 1
  key = f"{_BARRIER_DIR}/{hashlib.sha1(name.encode()).hexdigest()[:16]}.{passed}"
  arrived = client.key_value_increment(key, 1)
  delay = 0.001
  while arrived < count:
    if client.key_value_dir_get(_FAILED_DIR):
      raise PeerFailed("; ".join(failures()) + f" (while this process waited at barrier {name!r})")
    time.sleep(delay)
    delay = min(2 * delay, poll_s)
    arrived = int(client.key_value_try_get(key))
  # Every process has left the previous barrier once all reached this one: drop its counter.
  if jax.process_index() == 0:
    for old in _barrier_last:
      client.key_value_delete(old)
  _barrier_last[:] = [key]


def _identity(*xs):
  return xs   # one module-level function, so jax.jit's caches hit across calls


def gather_to_host(tree: Any) -> Any:
  """The pytree with every jax.Array as a full numpy array on every process.

  Arrays sharded over other processes' devices are replicated by one jitted identity
  (one compilation for the whole tree): a collective, so every process must call this
  with the same tree. Other leaves go through ``np.asarray``. Every process ends up
  holding the whole tree in host memory.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  leaves, treedef = jax.tree_util.tree_flatten(tree)
  remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
  out = [None if i in remote else np.asarray(x) for i, x in enumerate(leaves)]
  named = [i for i in remote if isinstance(leaves[i].sharding, NamedSharding)]
  if named:
    replicated = tuple(NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in named)
    gathered = jax.jit(_identity, out_shardings=replicated)(*[leaves[i] for i in named])
    for i, x in zip(named, gathered):
      out[i] = np.asarray(x.addressable_data(0))
  others = [i for i in remote if i not in named]
  if others:
    from jax.experimental import multihost_utils
    for i in others:
      out[i] = np.asarray(multihost_utils.process_allgather(leaves[i], tiled=True))
  return jax.tree_util.tree_unflatten(treedef, out)

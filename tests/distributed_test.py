"""Multi-process runs: launch detection, per-process batch rows, and 2 processes x 4 devices
training exactly like 1 process x 8 devices (checkpoint, resume and export included)."""

import json
import os
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from cai_jax import distributed, model_dir, sharding
from cai_jax.configs import MeshConfig
from cai_jax.metrics import read_jsonl_metrics

import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
TIMEOUT_S = 180  # per launch; a worker killed at it fails the test with its stderr


# --------------------------------------------------------------------------- launch detection


def test_single_process_environments_start_nothing():
  assert distributed.detect_launch("none", "h:1", 2, 0, environ={}) is None
  assert distributed.detect_launch("auto", environ={}) is None
  assert distributed.detect_launch("auto", environ={"SLURM_NTASKS": "1"}) is None
  assert distributed.detect_launch("auto", environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed.start("auto", environ={}) is False


def test_auto_detects_a_cloud_tpu_vm_slice_from_its_metadata(monkeypatch):
  """A TPU VM made by `gcloud compute tpus tpu-vm create` names its workers only in the GCE
  metadata (no TPU_WORKER_HOSTNAMES): its hosts are counted there, as jax does."""
  assert distributed.detect_launch("auto", environ={}, tpu_vm_processes=lambda: 4) == (
      distributed.Launch("tpu"))
  assert distributed.detect_launch("auto", environ={}, tpu_vm_processes=lambda: 1) is None
  assert distributed.detect_launch("auto", "h:1", environ={}, tpu_vm_processes=lambda: 2) == (
      distributed.Launch("tpu", "h:1"))
  assert distributed.detect_launch("none", environ={}, tpu_vm_processes=lambda: 4) is None

  def never():
    raise AssertionError("metadata asked although the environment decides")
  assert distributed.detect_launch("auto", environ={"TPU_WORKER_HOSTNAMES": "localhost"},
                                   tpu_vm_processes=never) is None
  assert distributed.detect_launch("auto", environ={"SLURM_NTASKS": "2", **SRUN_TASK},
                                   tpu_vm_processes=never) == distributed.Launch("slurm")
  assert distributed.detect_launch("explicit", "h:1", 2, 0, environ={},
                                   tpu_vm_processes=never).source == "explicit"
  # jax's own reading of the metadata: workers of the slice times the slices.
  from jax._src import cloud_tpu_init
  from jax._src.clusters import cloud_tpu_cluster
  gce = cloud_tpu_cluster.GceTpuCluster
  if not cloud_tpu_init.running_in_cloud_tpu_vm:
    assert distributed.cloud_tpu_vm_processes() == 0   # no TPU VM here: nothing asked
  monkeypatch.setattr(distributed, "tpu_chips_present", lambda: False)
  monkeypatch.setattr(gce, "is_env_present", classmethod(lambda cls: True))
  assert distributed.cloud_tpu_vm_processes() == 0   # no chips: jax is not asked at all
  monkeypatch.setattr(distributed, "tpu_chips_present", lambda: True)
  monkeypatch.setattr(gce, "_get_worker_list_in_slice", staticmethod(lambda: ["w0", "w1", "w2"]))
  monkeypatch.setattr(gce, "_get_num_slices", staticmethod(lambda: 2))
  assert distributed.cloud_tpu_vm_processes() == 6


# A task that srun started: what jax's SLURM detection reads.
SRUN_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("environ,source", [
    ({"SLURM_NTASKS": "4", **SRUN_TASK}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, "tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
])
def test_auto_detects_cluster_launches(environ, source):
  assert distributed.detect_launch("auto", environ=environ) == distributed.Launch(source)


def test_explicit_values_from_arguments_or_environment():
  env = {"CAI_COORDINATOR_ADDRESS": "10.1.2.3:1234", "CAI_NUM_PROCESSES": "4", "CAI_PROCESS_ID": "3"}
  expected = distributed.Launch("explicit", "10.1.2.3:1234", 4, 3)
  assert distributed.detect_launch("auto", environ=env) == expected
  assert distributed.detect_launch("explicit", environ=env) == expected
  # Arguments win over the environment.
  assert distributed.detect_launch("explicit", "h:9", 2, 0, environ=env) == distributed.Launch(
      "explicit", "h:9", 2, 0)
  # A partial explicit launch is completed by the cluster (jax detects the rest).
  assert distributed.detect_launch("auto", "h:9", environ={"SLURM_NTASKS": "2", **SRUN_TASK}) == (
      distributed.Launch("slurm", "h:9", None, None))


@pytest.mark.parametrize("mode,args,environ,needle", [
    ("explicit", (None, 2, 0), {}, "--coordinator_address (or CAI_COORDINATOR_ADDRESS)"),
    ("explicit", ("h:1", None, 0), {}, "--num_processes (or CAI_NUM_PROCESSES)"),
    ("explicit", ("h:1", 2, None), {}, "--process_id (or CAI_PROCESS_ID)"),
    ("auto", ("h:1", None, None), {}, "--num_processes"),
    ("explicit", ("h:1", 2, 2), {}, "process_id must be in [0, 2), got 2"),
    ("explicit", ("h:1", 0, 0), {}, "num_processes must be positive"),
    ("auto", (None, None, None), {"CAI_NUM_PROCESSES": "two"}, "CAI_NUM_PROCESSES='two'"),
    ("auto", (None, None, None), {"SLURM_NTASKS": "x"}, "SLURM_NTASKS='x'"),
    # The batch script of a 4-task job (or an salloc shell) is no task of an srun step.
    ("auto", (None, None, None), {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                                  "SLURM_LOCALID": "0"},
     "SLURM_NTASKS=4 but SLURM_STEP_NODELIST is not set: this process is not one task of an "
     "srun step"),
    ("auto", ("h:1", None, None), {"SLURM_NTASKS": "2"}, "SLURM_JOB_ID is not set"),
    # jax needs HOST:PORT (without a port, process 0 fails in jax with an IndexError).
    ("explicit", ("localhost", 2, 0), {}, "--coordinator_address='localhost' is not HOST:PORT"),
    ("explicit", ("h:99999", 2, 1), {}, "--coordinator_address='h:99999' is not HOST:PORT"),
    ("auto", (None, 2, 0), {"CAI_COORDINATOR_ADDRESS": ":8476"},
     "CAI_COORDINATOR_ADDRESS=':8476' is not HOST:PORT"),
    ("cluster", (None, None, None), {}, "'cluster' is not one of none, auto, explicit"),
])
def test_bad_launch_values_are_one_line_errors(mode, args, environ, needle):
  with pytest.raises(ValueError) as err:
    distributed.detect_launch(mode, *args, environ=environ)
  assert needle in str(err.value) and "\n" not in str(err.value)


def test_initialize_none_reports_this_single_process():
  assert distributed.initialize("none") == {
      "process_index": 0, "process_count": 1, "local_devices": 8, "global_devices": 8}
  assert distributed.is_primary()


def test_cli_hook_is_a_no_op_without_a_launch(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("CAI_", "SLURM_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(name)
  flag_values = types.SimpleNamespace(distributed="auto", coordinator_address=None,
                                      num_processes=None, process_id=None)
  assert distributed.main_flags_hook(flag_values) is None
  assert not jax.distributed.is_initialized()


def test_cli_explicit_without_coordinator_is_one_line_error():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "cai_jax.main", "info", "--distributed=explicit",
                        "--num_processes=2", "--process_id=0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "cai-jax: error: ValueError: distributed mode 'explicit' needs --coordinator_address "
      "(or CAI_COORDINATOR_ADDRESS)"]


# --------------------------------------------------------------------------- batch rows


def test_process_rows_single_process_holds_every_row():
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1, "fsdp"))
  s = sharding.batch_sharding(mesh, sharding.rules_for("fsdp"), 2, (16, 4))
  np.testing.assert_array_equal(sharding.process_rows(s, (16, 4)), np.arange(16))


def test_shard_batch_places_rows_on_devices_in_mesh_order():
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1, "fsdp"))
  rules = sharding.rules_for("fsdp")
  host = {"tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  out = sharding.shard_batch(host, mesh, rules)["tokens"]
  np.testing.assert_array_equal(np.asarray(out), host["tokens"])
  for shard in out.addressable_shards:
    k = list(mesh.devices.flat).index(shard.device)  # device k of the (data, fsdp) grid
    np.testing.assert_array_equal(np.asarray(shard.data), host["tokens"][2 * k:2 * k + 2])


# --------------------------------------------------------------------------- 2 processes x 4 devices


def _launch(out_dir, logs, name, devices, *flags):
  """Starts one worker; returns (Popen, stdout path, stderr path)."""
  return multihost.launch([sys.executable, WORKER, str(out_dir), *flags], logs, name, devices)


def _wait(procs, deadline):
  """Report dicts of all workers; kills every worker and fails (with stderr) on error or timeout."""
  reports = []
  for _, out, err in multihost.wait(procs, max(1.0, deadline - time.monotonic())):
    lines = [l for l in out.splitlines() if l.startswith("REPORT ")]
    assert len(lines) == 1, err[-4000:]
    reports.append(json.loads(lines[0][len("REPORT "):]))
  return reports


def test_two_processes_train_resume_and_export_like_one_process(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  address = f"localhost:{multihost.free_port()}"
  procs = [_launch(multi, tmp_path, f"worker{i}", 4, "--mode=explicit",
                   f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}")
           for i in range(2)]
  reports = _wait(procs, time.monotonic() + TIMEOUT_S)
  # Reference: one process with 8 devices, the same mesh, steps and data.
  [ref] = _wait([_launch(single, tmp_path, "single", 8, "--mode=none")],
                time.monotonic() + TIMEOUT_S)

  info = [r["initialize"] for r in reports]
  assert info == [{"process_index": i, "process_count": 2, "local_devices": 4, "global_devices": 8}
                  for i in range(2)]
  # Process p feeds rows [p * B/P, (p + 1) * B/P) of each global batch of B = 8.
  assert [r["rows"] for r in reports] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [r["writes_metrics"] for r in reports] == [True, False]
  assert [r["primary"] for r in reports] == [True, False]
  assert ref["initialize"] == {"process_index": 0, "process_count": 1, "local_devices": 8,
                               "global_devices": 8}
  for r in reports + [ref]:
    assert (r["first_resumed_from"], r["resumed_from"], r["final_step"]) == (None, 2, 4)
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]

  multi_rows, single_rows = read_jsonl_metrics(multi / "metrics.jsonl"), read_jsonl_metrics(
      single / "metrics.jsonl")
  assert [r["step"] for r in multi_rows] == [1, 2, 3, 4]  # written once, by process 0
  assert [r["step"] for r in single_rows] == [1, 2, 3, 4]
  for key in ("loss", "grad_norm", "learning_rate", "loss_count"):
    np.testing.assert_allclose([r[key] for r in multi_rows], [r[key] for r in single_rows],
                               rtol=1e-5, atol=1e-5, err_msg=key)
  assert all(r["loss"] > 1.0 and r["grad_norm"] > 0 for r in multi_rows)

  _, multi_params = model_dir.load_model(str(multi / "model"))
  _, single_params = model_dir.load_model(str(single / "model"))
  multi_leaves = jax.tree_util.tree_leaves_with_path(multi_params)
  single_leaves = {jax.tree_util.keystr(p): x
                   for p, x in jax.tree_util.tree_leaves_with_path(single_params)}
  assert len(multi_leaves) == len(single_leaves)
  for path, leaf in multi_leaves:
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(single_leaves[jax.tree_util.keystr(path)]), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _errors(results):
  """The `cai-jax: error` lines of each process's stderr."""
  return [[l for l in err.splitlines() if l.startswith("cai-jax: error")] for _, _, err in results]


def _every_process_failed_alike(results):
  """Every process fails on the same bad input: each exits 2 with its own error line or, when
  its failure watcher noticed another process's identical failure first, 1 with a line
  naming that one. Returns each process's one error line."""
  lines = []
  for (rc, _, err), errs in zip(results, _errors(results)):
    assert len(errs) == 1, err[-3000:]
    if rc == 1:
      assert errs[0].startswith("cai-jax: error: process ") and " failed: " in errs[0], errs
    else:
      assert rc == 2, err[-3000:]
    lines.append(errs[0])
  return lines


def test_a_single_host_command_refuses_a_multi_process_run(tmp_path):
  """`plan` (one host only) under 2 processes: each exits with one line naming the commands."""
  results = multihost.wait(multihost.launch_cli(["plan", "--topology=v4-8"], tmp_path, 2, 1),
                           TIMEOUT_S, expect_rc=None)
  for line in _every_process_failed_alike(results):
    assert "plan runs in one process" in line and "train_lm, sl" in line, line


def test_a_mesh_without_every_process_is_a_one_line_error(tmp_path):
  """A 1-device mesh in a 2-process run would leave process 1 out: refused, naming the mesh."""
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "hi"}\n')
  results = multihost.wait(multihost.launch_cli(
      ["sample", f"--prompts={prompts}", f"--out={tmp_path / 'o.jsonl'}", "--gin.sample.model='byte'",
       "--gin_file=mesh/single.gin"], tmp_path, 2, 2), TIMEOUT_S, expect_rc=None)
  for line in _every_process_failed_alike(results):
    assert "data=1 fsdp=1 tensor=1 uses 1 of 4 devices and none of process 1's" in line, line
  assert not (tmp_path / "o.jsonl").exists()


def test_a_process_0_failure_stops_the_other_processes_at_once(tmp_path):
  """Process 0 alone writes the UNFINISHED marker; when that fails (here a directory stands
  in its place), process 1, waiting at the next barrier, exits at once naming process 0's
  error rather than waiting out jax's heartbeat and shutdown timeouts (minutes) and
  aborting."""
  out_dir = tmp_path / "run"
  (out_dir / "UNFINISHED").mkdir(parents=True)
  start = time.monotonic()
  results = multihost.wait(multihost.launch_cli(
      ["train_lm", "--gin_file=models/tiny.gin", "--gin.train_lm.dataset='unused.jsonl'",
       f"--out_dir={out_dir}"], tmp_path / "logs", 2, 1),
      120, expect_rc=None)
  assert time.monotonic() - start < 100
  assert [rc for rc, _, _ in results] == [2, 1], [err[-2000:] for _, _, err in results]
  errors = _errors(results)
  assert len(errors[0]) == 1 and "IsADirectoryError" in errors[0][0], errors
  assert len(errors[1]) == 1, errors
  assert errors[1][0].startswith("cai-jax: error: process 0 failed: IsADirectoryError:"), errors
  assert "UNFINISHED" in errors[1][0]
  # Noticed at the barrier after the marker or, if sooner, by process 1's failure watcher.
  assert ("barrier 'started:" in errors[1][0]
          or "this process stopped for it while running" in errors[1][0]), errors
  assert not list((out_dir).glob("checkpoints*"))


def test_a_failure_away_from_barriers_stops_the_other_processes_at_once(tmp_path):
  """Process 0 alone opens metrics.jsonl (here a directory stands in its place) while
  process 1 goes on into work that needs process 0 (the sharded init, a collective it never
  joins). Process 1's failure watcher ends it at once naming process 0's error; process 0
  ends once process 1 is gone; neither waits out jax's timeouts or aborts."""
  out_dir = tmp_path / "run"
  (out_dir / "metrics.jsonl").mkdir(parents=True)
  data = tmp_path / "text.jsonl"
  data.write_text("".join(json.dumps({"text": f"sentence number {i}."}) + "\n" for i in range(16)))
  start = time.monotonic()
  results = multihost.wait(multihost.launch_cli(
      ["train_lm", "--gin_file=models/tiny.gin", f"--gin.train_lm.dataset='{data}'",
       f"--out_dir={out_dir}", *multihost.SHORT_TRAINING], tmp_path / "logs", 2, 4), 150,
      expect_rc=None)
  assert time.monotonic() - start < 120
  assert [rc for rc, _, _ in results] == [2, 1], [err[-2000:] for _, _, err in results]
  errors = _errors(results)
  assert len(errors[0]) == 1 and "IsADirectoryError" in errors[0][0], errors
  assert len(errors[1]) == 1, errors
  assert errors[1][0].startswith("cai-jax: error: process 0 failed: IsADirectoryError:"), errors
  assert "metrics.jsonl" in errors[1][0], errors
  assert errors[1][0].endswith("(this process stopped for it while running)"), errors


def test_barriers_hold_every_process_and_clean_up(tmp_path):
  """3 processes pass 20 barriers (two names alternating) after random delays: none leaves a
  barrier before every process has arrived, and only the last barrier's counter remains.
  Then each exits with a busy failure watcher: stopped explicitly or by the exit handler,
  every process ends with status 0 (none aborts in interpreter finalization)."""
  address = f"localhost:{multihost.free_port()}"
  procs = [multihost.launch([sys.executable, os.path.join(multihost.REPO, "tests", "barrier_worker.py"),
                             f"--coordinator_address={address}", "--num_processes=3",
                             f"--process_id={i}", f"--dir={tmp_path}"], tmp_path / "logs",
                            f"worker{i}", 1)
           for i in range(3)]
  results = multihost.wait(procs, 120)
  for _, out, err in results:
    assert "barriers ok" in out, err[-2000:]


@pytest.mark.parametrize("failer", [0, 1])
def test_a_process_failing_while_the_other_is_in_a_collective(tmp_path, failer):
  """Process `failer` fails while the other waits in a device collective it never joins:
  the other ends with status 1 naming the failure, the failed one with 2, both in seconds
  (process 0, which hosts the coordination service, last), neither aborting."""
  address = f"localhost:{multihost.free_port()}"
  procs = [multihost.launch([sys.executable, os.path.join(multihost.REPO, "tests", "failure_worker.py"),
                             f"--coordinator_address={address}", f"--process_id={i}",
                             f"--failer={failer}"], tmp_path, f"worker{i}", 1)
           for i in range(2)]
  start = time.monotonic()
  results = multihost.wait(procs, 120, expect_rc=None)
  assert time.monotonic() - start < 60
  rcs = [rc for rc, _, _ in results]
  assert rcs == [2 if i == failer else 1 for i in range(2)], [err[-3000:] for _, _, err in results]
  errors = _errors(results)
  assert errors[failer] == ["cai-jax: error: ValueError: planted failure"], errors
  other = errors[1 - failer]
  assert len(other) == 1, errors
  assert other[0].startswith(f"cai-jax: error: process {failer} failed: ValueError: planted failure"), errors

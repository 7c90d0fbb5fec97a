"""Launch scripts (launch/tpu_vm.sh, launch/slurm.sbatch) and the GPU bench suite (bench/gpu.sh).

Syntax (`bash -n`) and shellcheck of every script; the exact commands of each dry run; the
remote / srun commands executed against fake gcloud-side and SLURM-side programs to check
that the cai-jax arguments arrive unchanged; the suite's combined table from hand-made
bench results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch"),
                  *REPO.glob("bench/*.sh")])


def _env(**extra: str) -> dict:
  """The environment minus every variable the scripts read, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("TPU_", "SLURM_")) and k not in ("DRY_RUN", "LAUNCH_MODE",
                                                               "COORDINATOR_PORT", "CAI_JAX",
                                                               "PYTHON", "JAX_COORDINATOR_PORT")}
  env.update(extra)
  return env


def _bash(script: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                        env=_env(**env), cwd=REPO, timeout=timeout)


def _lines(proc: subprocess.CompletedProcess):
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def _executable(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


# A stand-in for cai-jax: prints its arguments as one JSON line.
FAKE_CAI_JAX = f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"


def test_scripts_found():
  names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
  assert {"launch/tpu_vm.sh", "launch/slurm.sbatch", "bench/gpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    if os.environ.get("CI") == "true":
      pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    pytest.skip("shellcheck is not installed")
  proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- tpu_vm.sh


def test_tpu_create_lines():
  assert _lines(_bash("launch/tpu_vm.sh", "--dry-run", "create")) == [
      "+ gcloud compute tpus tpu-vm create cai-jax --zone=us-east5-a "
      "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5"]
  proc = _bash("launch/tpu_vm.sh", "create", "--name", "big", "--accelerator=v5p-256",
               "--project=proj-1", "--queued", "--spot", DRY_RUN="1", TPU_ZONE="europe-west4-b")
  assert _lines(proc) == [
      "+ gcloud compute tpus queued-resources create big --zone=europe-west4-b "
      "--project=proj-1 --node-id=big --accelerator-type=v5p-256 "
      "--runtime-version=v2-alpha-tpuv5 --spot"]


def test_tpu_copy_lines():
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "copy", TPU_NAME="pod", TMPDIR="/scratch")
  assert _lines(proc) == [
      "+ tar -czf /scratch/cai_jax-pod.tar.gz --exclude=./runs --exclude=./.git "
      "--exclude=./.venv --exclude=__pycache__ --exclude=./.pytest_cache "
      f"'--exclude=*.egg-info' -C {REPO} .",
      "+ gcloud compute tpus tpu-vm scp /scratch/cai_jax-pod.tar.gz pod:cai_jax-src.tar.gz "
      "--zone=us-east5-a --worker=all",
      "+ gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all "
      "'--command=mkdir -p cai_jax && tar -xzf cai_jax-src.tar.gz -C cai_jax "
      "&& rm cai_jax-src.tar.gz'",
      "+ rm -f /scratch/cai_jax-pod.tar.gz"]


def test_tpu_install_logs_delete_lines():
  install = _lines(_bash("launch/tpu_vm.sh", "--dry-run", "install"))
  assert install == [
      "+ gcloud compute tpus tpu-vm ssh cai-jax --zone=us-east5-a --worker=all "
      "'--command=set -e; cd cai_jax; python3.11 -m venv .venv || { sudo apt-get -qq update "
      "&& sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 python3.11-venv "
      "&& python3.11 -m venv --clear .venv; }; .venv/bin/python -m pip install -q -U pip; "
      ".venv/bin/python -m pip install -q -e . '\"'\"'jax[tpu]'\"'\"''"]
  assert _lines(_bash("launch/tpu_vm.sh", "logs", "--dry-run", "--log_dir=/tmp/l")) == [
      "+ mkdir -p /tmp/l",
      "+ gcloud compute tpus tpu-vm scp 'cai-jax:cai_jax/logs/*' /tmp/l/ --zone=us-east5-a "
      "--worker=all"]
  assert _lines(_bash("launch/tpu_vm.sh", "--dry-run", "--queued", "delete")) == [
      "+ gcloud compute tpus queued-resources delete cai-jax --zone=us-east5-a --force --quiet"]


RUN_ARGS = ["rl", "--gin_file=gin/experiments/smollm2_135m_cpu.gin", '--gin.MODEL="b c"',
            "--gin.sl.note='it''s'", "--out_dir=runs/x"]


def test_tpu_run_line():
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "--name=pod", "run", "--", *RUN_ARGS)
  q = "'\"'\"'"  # a single quote inside the single-quoted --command word
  assert _lines(proc) == [
      "+ gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all "
      "'--command=set -o pipefail; cd cai_jax && mkdir -p logs && .venv/bin/cai-jax rl "
      f"--gin_file=gin/experiments/smollm2_135m_cpu.gin {q}--gin.MODEL=\"b c\"{q} "
      f"{q}--gin.sl.note={q}\"{q}\"{q}it{q}\"{q}\"{q}{q}\"{q}\"{q}s{q}\"{q}\"{q}{q} "
      "--out_dir=runs/x --distributed=auto 2>&1 | tee -a logs/rl.$(hostname).log'"]


def test_tpu_run_remote_command_executes(tmp_path):
  """The --command of `run`, executed by bash in a fake home, passes the arguments unchanged
  and tees the output to logs/LOG_NAME.HOST.log."""
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "--log_name=kl=0.1,x/y", "run", "--",
               *RUN_ARGS, "--distributed=none")
  words = shlex.split(_lines(proc)[0][2:])
  command = next(w for w in words if w.startswith("--command="))[len("--command="):]
  _executable(tmp_path / "cai_jax" / ".venv" / "bin" / "cai-jax", FAKE_CAI_JAX)
  out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  expected = RUN_ARGS + ["--distributed=none"]  # a given --distributed is not overridden
  assert json.loads(out.stdout) == expected
  logs = list((tmp_path / "cai_jax" / "logs").iterdir())
  assert [p.name for p in logs] == [f"kl=0.1,x_y.{socket.gethostname()}.log"]
  assert json.loads(logs[0].read_text()) == expected


def test_tpu_detached_run_and_ssh(tmp_path):
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "--detach", "--worker=0", "run", "--", "sl",
               "--out_dir=a b")
  assert _lines(proc) == [
      "+ gcloud compute tpus tpu-vm ssh cai-jax --zone=us-east5-a --worker=0 "
      "'--command=cd cai_jax && mkdir -p logs && nohup .venv/bin/cai-jax sl "
      "'\"'\"'--out_dir=a b'\"'\"' --distributed=auto >> logs/sl.$(hostname).log 2>&1 "
      "< /dev/null &'"]
  command = shlex.split(_lines(proc)[0][2:])[-1][len("--command="):]
  _executable(tmp_path / "cai_jax" / ".venv" / "bin" / "cai-jax", FAKE_CAI_JAX)
  out = subprocess.run(["bash", "-c", command + " wait"], cwd=tmp_path, capture_output=True,
                       text=True)
  assert out.returncode == 0 and out.stdout == "", out.stderr
  log = tmp_path / "cai_jax" / "logs" / f"sl.{socket.gethostname()}.log"
  assert json.loads(log.read_text()) == ["sl", "--out_dir=a b", "--distributed=auto"]
  assert _lines(_bash("launch/tpu_vm.sh", "--dry-run", "ssh", "--", "tail", "-n", "3",
                      "cai_jax/logs/*.log")) == [
      "+ gcloud compute tpus tpu-vm ssh cai-jax --zone=us-east5-a --worker=all "
      "'--command=tail -n 3 cai_jax/logs/*.log'"]


def test_tpu_bad_usage():
  proc = _bash("launch/tpu_vm.sh", "frobnicate")
  assert proc.returncode != 0
  assert "unknown command 'frobnicate'" in proc.stderr
  usage = "usage: launch/tpu_vm.sh [OPTIONS] COMMAND [-- CAI_JAX_ARGS...]"
  assert usage in proc.stderr.splitlines()
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "run")
  assert proc.returncode != 0 and "run needs the cai-jax arguments" in proc.stderr
  proc = _bash("launch/tpu_vm.sh", "--dry-run", "--spot", "create")
  assert proc.returncode != 0 and "--spot needs --queued" in proc.stderr
  proc = _bash("launch/tpu_vm.sh", "-h")
  assert proc.returncode == 0 and proc.stdout.startswith("usage: launch/tpu_vm.sh")


# ----------------------------------------------------------------------------- slurm.sbatch


def test_slurm_dry_run_lines():
  assert _lines(_bash("launch/slurm.sbatch", "--dry-run", *RUN_ARGS)) == [
      "+ srun --kill-on-bad-exit=1 cai-jax rl --gin_file=gin/experiments/smollm2_135m_cpu.gin "
      "'--gin.MODEL=\"b c\"' '--gin.sl.note='\"'\"'it'\"'\"''\"'\"'s'\"'\"'' --out_dir=runs/x "
      "--distributed=auto"]
  # Fake job 4242 on gpu[001-004]: the coordinator port is 61440 + 4242 % 4096 = 61586.
  proc = _bash("launch/slurm.sbatch", "--mode=explicit", "sl", "--out_dir=o", DRY_RUN="1")
  assert _lines(proc) == [
      "+ srun --kill-on-bad-exit=1 bash -c 'exec \"$0\" \"$@\" --process_id=\"$SLURM_PROCID\"' "
      "cai-jax sl --out_dir=o --distributed=explicit --coordinator_address=gpu001:61586 "
      "--num_processes=32"]
  assert "coordinator gpu001:61586" in proc.stderr


def test_slurm_first_host_of_node_lists():
  for nodelist, first in [("gpu[001-004]", "gpu001"), ("a17,b[2-3]", "a17"),
                          ("n[7,9-12],m1", "n7"), ("solo", "solo")]:
    proc = _bash("launch/slurm.sbatch", "--dry-run", "--mode", "explicit", "info",
                 SLURM_JOB_ID="5000", SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="2",
                 SLURM_NTASKS="16")
    assert f"--coordinator_address={first}:62344 --num_processes=16" in _lines(proc)[0]


def test_slurm_runs_srun_in_a_job(tmp_path):
  """Not a dry run: fake scontrol / srun / cai-jax on PATH, SLURM variables of a 2-node job."""
  bin_dir = tmp_path / "bin"
  _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
  # srun: drop its own options, then run the command as task 5.
  _executable(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
              "SLURM_PROCID=5 exec \"$@\"\n")
  _executable(bin_dir / "cai-jax", FAKE_CAI_JAX)
  env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="8193",
             SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_NTASKS="16")
  proc = _bash("launch/slurm.sbatch", "--mode=explicit", *RUN_ARGS, **env)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == RUN_ARGS + [
      "--distributed=explicit", "--coordinator_address=node-a:61441", "--num_processes=16",
      "--process_id=5"]
  proc = _bash("launch/slurm.sbatch", *RUN_ARGS, **env)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == RUN_ARGS + ["--distributed=auto"]


def test_slurm_auto_mode_passes_coordinator_port_to_jax(tmp_path):
  """--mode=auto: jax picks the coordinator's port itself (61440 + job id mod 4096) unless
  JAX_COORDINATOR_PORT says otherwise, so a COORDINATOR_PORT reaches jax as that."""
  bin_dir = tmp_path / "bin"
  _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
  _executable(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
              "exec \"$@\"\n")
  _executable(bin_dir / "cai-jax", f"#!{sys.executable}\nimport json, os\n"
              "print(json.dumps(os.environ.get('JAX_COORDINATOR_PORT')))\n")
  env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="8193",
             SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_NTASKS="16")
  proc = _bash("launch/slurm.sbatch", "info", COORDINATOR_PORT="5555", **env)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == "5555" and "coordinator node-a:5555" in proc.stderr
  proc = _bash("launch/slurm.sbatch", "info", **env)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) is None and "coordinator node-a:61441" in proc.stderr
  assert _lines(_bash("launch/slurm.sbatch", "--dry-run", "info", COORDINATOR_PORT="5555")) == [
      "+ env JAX_COORDINATOR_PORT=5555 srun --kill-on-bad-exit=1 cai-jax info --distributed=auto"]


def test_slurm_bad_usage():
  proc = _bash("launch/slurm.sbatch", "rl")
  assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr
  proc = _bash("launch/slurm.sbatch", "--dry-run")
  assert proc.returncode != 0 and "no cai-jax command given" in proc.stderr
  proc = _bash("launch/slurm.sbatch", "--dry-run", "--mode=mpi", "rl")
  assert proc.returncode != 0 and "--mode must be auto or explicit" in proc.stderr



@pytest.mark.parametrize("arg", ["--distributed=none", "--distributed", "--coordinator_address=h:1",
                                 "--num_processes=2", "-process_id=0"])
def test_slurm_refuses_the_distributed_flags_it_sets(arg):
  """The script appends --distributed (and, explicit, the coordinator, count and id); absl keeps
  the last value, so one given among the cai-jax arguments was dropped without a word."""
  proc = _bash("launch/slurm.sbatch", "--dry-run", "sl", arg, "--out_dir=o")
  assert proc.returncode == 2 and not proc.stdout
  assert proc.stderr.splitlines()[0] == (
      f"slurm.sbatch: error: cai-jax flag {arg.split('=')[0]} is set by this script "
      "(choose --mode=auto or --mode=explicit)")
  assert _lines(_bash("launch/slurm.sbatch", "--dry-run", "sl", "--gin.x.distributed=1"))

# ----------------------------------------------------------------------------- bench/gpu.sh


def test_gpu_suite_dry_run_lines():
  assert _lines(_bash("bench/gpu.sh", "--dry-run", PYTHON="python3")) == [
      "+ python3 bench/train_step.py --preset tinyllama_1b --batch 8 --seq 2048 --remat full "
      "--json",
      "+ python3 bench/sample.py --preset tinyllama_1b --dtype bfloat16 --device gpu "
      "--batch_sizes 1,32 --max_new_tokens 64 --json",
      "+ python3 bench/ppo_step.py --preset tinyllama_1b --dtype bfloat16 --rollout_batch 64 "
      "--prompt_len 64 --max_new_tokens 128 --epochs 4 --minibatches 4 --json",
      "+ python3 bench/train_step.py --preset tinyllama_1b --batch 8 --seq 2048 --remat full "
      "--attention xla --no-peer --json",
      "+ python3 bench/train_step.py --preset tinyllama_1b --batch 8 --seq 2048 --remat none "
      "--json",
      "+ python3 bench/score.py --preset tinyllama_1b --dtype bfloat16 --device gpu --json",
      "+ python3 bench/sample.py --preset tinyllama_1b --dtype bfloat16 --device gpu "
      "--batch_sizes 1,32 --max_new_tokens 64 --no-unroll_decode --no-peer --json",
      "+ XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
      "CONDITIONAL,WHILE python3 bench/sample.py --preset tinyllama_1b --dtype bfloat16 "
      "--device gpu --batch_sizes 1,32 --max_new_tokens 64 --no-peer --json",
      "+ python3 bench/sample.py --preset tinyllama_1b --dtype bfloat16 --device gpu "
      "--batch_sizes 1,32 --max_new_tokens 64 --decode_attention pallas --no-peer --json"]
  cpu = "+ JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= python3"
  assert _lines(_bash("bench/gpu.sh", "--quick", "--dry-run", "--only=ppo_step,train_step",
                      PYTHON="python3")) == [
      f"{cpu} bench/train_step.py --preset tiny --batch 2 --seq 32 --steps 2 --warmup 1 --json",
      f"{cpu} bench/ppo_step.py --preset tiny --rollout_batch 2 --prompt_len 8 "
      "--max_new_tokens 8 --epochs 1 --minibatches 1 --iterations 1 --json"]
  proc = _bash("bench/gpu.sh", "--dry-run", "--only=sampel")
  assert proc.returncode == 2 and "unknown bench 'sampel'" in proc.stderr


def _suite():
  spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpu_suite_table_from_results():
  suite = _suite()
  train = {"preset": "tinyllama_1b", "batch": 8, "seq": 2048, "ratio": 1.5,
           "ours": {"remat": "full", "dtype": "bfloat16", "tokens_per_s": 66000.0,
                    "step_s": 0.25, "mfu": 0.5},
           "peer": {"tokens_per_s": 44000.0, "step_s": 0.375, "mfu": 0.34}}
  sample = {"batch_sizes": [1, 32], "max_new_tokens": 64, "dtype": "bfloat16",
            "ratio": {"1": 10.0, "32": 19.5},
            "summary": {"ours": {"1": {"tokens_per_s": 400.0, "decode_ms_per_step": 2.5},
                                 "32": {"tokens_per_s": 9750.0, "decode_ms_per_step": 3.0}},
                        "peer": {"1": {"tokens_per_s": 40.0, "decode_ms_per_step": 50.0},
                                 "32": {"tokens_per_s": 500.0, "decode_ms_per_step": 60.0}}},
            "roofline": {"ms_per_step": 0.657},
            "agreement": {"checked": True, "check_tokens": 16, "agree_first": True,
                          "first_divergence": 40}}
  results = {"train_step": {"exit_code": 0, "result": train, "log": "t.log"},
             "sample": {"exit_code": 0, "result": sample, "log": "s.log"},
             "ppo_step": {"exit_code": 137, "result": None, "log": "p.log"}}
  rows = suite.summary_rows(results, targets=True)
  setting = "tinyllama_1b 8x2048, remat full, bfloat16"
  assert rows == [
      ["train_step", setting, "tokens/s", "66,000.0", "44,000.0", "1.50x", ">= 1.5x", "yes"],
      ["train_step", setting, "step s (median)", "0.2500", "0.3750", "", "", ""],
      ["train_step", setting, "MFU", "50.0 %", "34.0 %", "", "", ""],
      ["sample", "batch 1, bfloat16, N 64", "tokens/s", "400.0", "40.0", "10.00x", "", ""],
      ["sample", "batch 1, bfloat16, N 64", "decode ms/step", "2.500", "50.000", "20.00x",
       "<= 2 ms", "no"],
      ["sample", "batch 32, bfloat16, N 64", "tokens/s", "9,750.0", "500.0", "19.50x",
       ">= 20x", "no"],
      ["sample", "batch 32, bfloat16, N 64", "decode ms/step", "3.000", "60.000", "20.00x", "",
       ""],
      ["sample", "batch 1, bfloat16, N 64", "HBM roofline ms/step", "0.657", "", "", "", ""],
      ["sample", "batch 1, first 16 ids", "greedy ids agree",
       "yes (first divergence at 40)", "", "", "", ""],
      ["ppo_step", "see p.log", "failed", "exit 137, no JSON", "", "", "", ""]]
  table = suite.markdown_table(rows[:1], suite.HEADER).splitlines()
  assert table[0].startswith("| bench      | setting ")
  assert table[2] == ("| train_step | " + setting + " | tokens/s | 66,000.0 | 44,000.0     "
                      "| 1.50x    | >= 1.5x | yes |")


def test_gpu_suite_decode_variants_take_the_sample_peer_and_score_rows():
  """sample_scan_decode / sample_cmdbuf run without a peer and are compared with sample's peer
  of the same shape; score gives one row per case and its log-prob agreement."""
  suite = _suite()
  peer = {"1": {"tokens_per_s": 40.0, "decode_ms_per_step": 50.0}}
  sample = {"batch_sizes": [1], "max_new_tokens": 64, "dtype": "bfloat16", "ratio": {"1": 8.0},
            "summary": {"ours": {"1": {"tokens_per_s": 320.0, "decode_ms_per_step": 2.5}},
                        "peer": peer}}
  variant = dict(sample, ratio=None, roofline={"ms_per_step": 0.5},
                  summary={"ours": {"1": {"tokens_per_s": 400.0, "decode_ms_per_step": 1.25}}})
  score = {"dtype": "bfloat16", "cases_run": ["feedback"], "tolerance": 0.5,
           "max_abs_diff": 0.03,
           "cases": {"feedback": {"rows": 16, "prompt_len_max": 402, "continuation_len": 3,
                                  "ours_tokens_per_s": 3000.0, "peer_tokens_per_s": 1000.0,
                                  "ratio": 3.0}}}
  rows = suite.summary_rows({"sample": {"exit_code": 0, "result": sample},
                             "sample_scan_decode": {"exit_code": 0, "result": variant},
                             "score": {"exit_code": 0, "result": score}}, True)
  setting = "batch 1, bfloat16, N 64, scanned decode loop"
  assert rows[2:] == [
      ["sample_scan_decode", setting, "tokens/s", "400.0", "40.0", "10.00x", "", ""],
      ["sample_scan_decode", setting, "decode ms/step", "1.250", "50.000", "40.00x", "<= 2 ms",
       "yes"],
      ["score", "feedback, bfloat16, 16 rows x 402+3 tokens", "tokens/s", "3,000.0", "1,000.0",
       "3.00x", "", ""],
      ["score", "all cases, bfloat16", "max |d log p|", "3.00e-02", "", "", "<= 0.5", "yes"]]
  table = suite.markdown_table(rows).splitlines()
  cells = [len(re.findall(r"(?<!\\)\|", line)) for line in table]
  assert cells == [len(suite.HEADER) + 1] * len(table)     # the metric's '|' stay in its cell
  assert "| max \\|d log p\\| |" in table[-1]
  other = dict(variant, max_new_tokens=32)       # another shape: no borrowed peer
  rows = suite.summary_rows({"sample": {"exit_code": 0, "result": sample},
                             "sample_cmdbuf": {"exit_code": 0, "result": other}}, True)
  assert rows[2][3:6] == ["400.0", "n/a", "n/a"]
  assert suite.child_env("gpu", {"XLA_FLAGS": "--a=1"}, suite.EXTRA_ENV["sample_cmdbuf"])[
      "XLA_FLAGS"] == "--a=1 " + suite.COMMAND_BUFFERS
  check = {"checked": True, "check_tokens": 16, "agree_first": True, "first_divergence": 40,
           "compared": 64, "max_abs_logprob_diff": 0.0123}
  pallas = dict(variant, ours={"attention_check": check})
  rows = suite.summary_rows({"sample": {"exit_code": 0, "result": sample},
                             "sample_pallas": {"exit_code": 0, "result": pallas}}, True)
  assert rows[2][:4] == ["sample_pallas", "batch 1, bfloat16, N 64, pallas decode attention",
                         "tokens/s", "400.0"]
  assert rows[-1][:4] == ["sample_pallas", "batch 1, first 16 ids",
                          "greedy ids agree with XLA attention",
                          "yes (first divergence at 40), max abs(d log p) 1.2e-02"]


def test_gpu_suite_ppo_rows_and_json_line():
  suite = _suite()
  ppo = {"preset": "tiny", "dtype": "float32", "rollout_batch": 2, "prompt_len": 8,
         "max_new_tokens": 8, "ppo": {"epochs": 1, "minibatches": 1},
         "median_s": {"rollout": 0.5, "scoring": 0.25, "update": 1.25},
         "share": {"rollout": 0.25, "scoring": 0.125, "update": 0.625},
         "iteration_median_s": 2.0, "rollout_tokens_per_s": 32.0}
  rows = suite.summary_rows({"ppo_step": {"exit_code": 0, "result": ppo}}, targets=False)
  assert [r[2:4] for r in rows] == [["rollout s (share)", "0.500 (25.0 %)"],
                                    ["scoring s (share)", "0.250 (12.5 %)"],
                                    ["update s (share)", "1.250 (62.5 %)"],
                                    ["iteration s", "2.000"], ["rollout tokens/s", "32.0"]]
  # cai_jax's side failed (out of memory, say) but the script still timed the peer.
  train = {"preset": "tinyllama_1b", "batch": 8, "seq": 2048, "ratio": None,
           "ours": {"impl": "cai_jax", "error": "failed (exit 1, see stderr)"},
           "peer": {"tokens_per_s": 1234.5}}
  assert suite.summary_rows({"train_step": {"exit_code": 0, "result": train}}, True) == [
      ["train_step", "tinyllama_1b 8x2048, remat ?, ?", "tokens/s",
       "error: failed (exit 1, see stderr)", "1,234.5", "n/a", "", ""]]


def test_gpu_suite_xla_row_takes_the_train_step_peer():
  """train_step_xla runs without a peer; its ratio is against train_step's peer of the
  same shape, no peer is borrowed across shapes, and each row names its attention."""
  suite = _suite()
  shape = {"preset": "tinyllama_1b", "batch": 8, "seq": 2048}
  base = dict(shape, ratio=2.0, ours={"remat": "full", "dtype": "bfloat16", "attention":
                                      "cudnn (default on a GPU in 16-bit)",
                                      "tokens_per_s": 88000.0, "step_s": 0.2},
              peer={"tokens_per_s": 44000.0, "step_s": 0.4})
  xla = dict(shape, ratio=None, peer=None,
             ours={"remat": "full", "dtype": "bfloat16", "attention": "xla",
                   "tokens_per_s": 22000.0, "step_s": 0.8})
  rows = suite.summary_rows({"train_step": {"exit_code": 0, "result": base},
                             "train_step_xla": {"exit_code": 0, "result": xla}}, True)
  assert rows[0][:2] == ["train_step", "tinyllama_1b 8x2048, remat full, bfloat16, cudnn "
                         "attention"]
  assert rows[2] == ["train_step_xla", "tinyllama_1b 8x2048, remat full, bfloat16, XLA "
                     "attention", "tokens/s", "22,000.0", "44,000.0", "0.50x", ">= 1.5x", "no"]
  assert all(r[2] != "final loss" for r in rows)   # no losses recorded, no check row
  base["ours"]["final_loss"], xla["ours"]["final_loss"] = 10.4, 10.43
  rows = suite.summary_rows({"train_step": {"exit_code": 0, "result": base},
                             "train_step_xla": {"exit_code": 0, "result": xla}}, True)
  assert rows[-1] == ["train_step_xla", "same data and init as train_step", "final loss",
                      "10.4300", "", "", "train_step 10.4000 +- 0.05", "yes"]
  xla["ours"]["final_loss"] = 10.6
  rows = suite.summary_rows({"train_step": {"exit_code": 0, "result": base},
                             "train_step_xla": {"exit_code": 0, "result": xla}}, True)
  assert rows[-1][-1] == "no"
  other = dict(xla, batch=4)
  rows = suite.summary_rows({"train_step": {"exit_code": 0, "result": base},
                             "train_step_xla": {"exit_code": 0, "result": other}}, True)
  assert rows[2][3:6] == ["22,000.0", "n/a", "n/a"]


def _bench_module(name: str):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sample_decode_step_is_na_when_noise_inverts_the_difference():
  """bench/sample.py's decode ms/step = (t(N) - t(1)) / (N - 1) of the medians; a t(1)
  that noise made slower than t(N) gave a negative step time (and a negative speed-up in the
  suite's table). It is 'n/a (noise)' unless every N-token call is slower than every
  1-token call."""
  sample = _bench_module("sample")
  def runs(batch, times_n, times_1, n=64):
    return [{"batch": batch, "max_new_tokens": k, "times_s": t, "median_s": sorted(t)[1]}
            for k, t in ((n, times_n), (1, times_1))]
  res = {"runs": runs(1, [0.175, 0.174, 0.176], [0.0086, 0.0087, 0.0085])
                 + runs(2, [0.0015, 0.0016, 0.0014], [0.0046, 0.0012, 0.0013])
                 + runs(4, [0.0030, 0.0031, 0.0029], [0.0010, 0.0031, 0.0011])}
  summary = sample._summarize(res, 64)
  assert abs(summary[1]["decode_ms_per_step"] - (0.175 - 0.0086) / 63 * 1e3) < 1e-9
  assert summary[1]["decode_note"] is None and summary[1]["decode_tokens_per_s"] > 0
  for batch in (2, 4):     # inverted medians; overlapping calls (positive medians' difference)
    row = summary[batch]
    assert row["decode_ms_per_step"] is None and row["decode_tokens_per_s"] is None, row
    assert row["decode_note"] == "n/a (noise)" and row["prefill_s"] > 0
    assert sample._decode_cell(row) == "n/a (noise)"
  assert sample._decode_cell(summary[1], ".3f", " ms") == "2.641 ms"

  suite = _suite()
  result = {"batch_sizes": [1, 2], "max_new_tokens": 64, "dtype": "bfloat16",
            "ratio": {"1": 2.0, "2": 2.0},
            "summary": {"ours": {"1": {"tokens_per_s": 400.0, "decode_ms_per_step": -0.83},
                                 "2": {"tokens_per_s": 800.0, "decode_ms_per_step": None,
                                       "decode_note": "n/a (noise)"}},
                        "peer": {"1": {"tokens_per_s": 200.0, "decode_ms_per_step": 3.2},
                                 "2": {"tokens_per_s": 400.0, "decode_ms_per_step": 3.3}}}}
  rows = [r for r in suite.summary_rows({"sample": {"exit_code": 0, "result": result}}, True)
          if r[2] == "decode ms/step"]
  assert rows == [
      ["sample", "batch 1, bfloat16, N 64", "decode ms/step", "n/a (noise)", "3.200", "n/a",
       "<= 2 ms", ""],
      ["sample", "batch 2, bfloat16, N 64", "decode ms/step", "n/a (noise)", "3.300", "n/a",
       "", ""]]


def test_score_compare_counts_a_nan_log_prob_as_a_difference():
  """bench/score.py's agreement check: a NaN on one side gave max |d log p| 0 ('OK')."""
  score = _bench_module("score")
  nan = float("nan")
  assert score._compare([[nan, -1.0]], [[-0.5, -1.0]])["max_abs_diff"] == float("inf")
  res = score._compare([[-1.0, -2.0], [-3.0, -4.0]], [[-1.0, -2.5], [-3.0, nan]])
  assert res["max_abs_diff"] == float("inf") and res["row"] == 1
  res = score._compare([[-1.0, float("-inf")]], [[-1.25, float("-inf")]])
  assert res["max_abs_diff"] == 0.25 and res["tokens_compared"] == 2


def test_sample_max_new_tokens_below_one_is_a_usage_error(capsys):
  """--max_new_tokens 0 --no_decode_split ran the cai_jax child into a SamplingParams
  traceback."""
  sample = _bench_module("sample")
  with pytest.raises(SystemExit) as e:
    sample.parse_args(["--max_new_tokens", "0", "--no_decode_split"])
  assert e.value.code == 2
  assert "--max_new_tokens must be >= 1; got 0" in capsys.readouterr().err
  assert sample.parse_args(["--max_new_tokens", "1", "--no_decode_split"]).max_new_tokens == 1


@pytest.mark.slow
def test_gpu_suite_quick_runs(tmp_path):
  """The whole --quick suite on the CPU (about a minute and a half on 2 idle cores)."""
  suite = _suite()
  proc = _bash("bench/gpu.sh", "--quick", "--out", str(tmp_path), timeout=900,
               PYTHON=sys.executable)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((tmp_path / "suite.json").read_text())
  assert list(record["benches"]) == list(suite.NAMES)
  for name, res in record["benches"].items():
    assert res["exit_code"] == 0 and res["result"]["bench"] == suite.SCRIPTS[name]
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
  assert rows[0] == ["bench", "setting", "metric", "cai_jax", "transformers", "speed-up",
                     "target", "met"]
  metrics = [r[:3] for r in rows[1:]]
  assert ["train_step", "tiny 2x32, remat none, float32", "tokens/s"] in metrics
  assert ["sample", "batch 2, float32, N 8", "tokens/s"] in metrics
  assert ["ppo_step", "tiny float32, B 2, P 8, N 8, K 1, M 1", "iteration s"] in metrics
  for variant in ("train_step_xla", "train_step_noremat"):
    check = [r for r in rows if r[:3] == [variant, "same data and init as train_step",
                                          "final loss"]]
    assert len(check) == 1 and check[0][-1] == "yes", rows
  assert ["sample_scan_decode", "batch 2, float32, N 8, scanned decode loop",
          "tokens/s"] in metrics
  train = record["benches"]["train_step"]["result"]
  assert rows[1][3] == f"{train['ours']['tokens_per_s']:,.1f}"


BENCH_IMPORTS = ("cai_jax.checkpoints", "cai_jax.plan", "cai_jax.sharding", "cai_jax.steps",
                 "cai_jax.constitution", "cai_jax.convert", "cai_jax.models", "cai_jax.sampler",
                 "cai_jax.ppo", "cai_jax.layers", "cai_jax.model_dir", "cai_jax.tokenizer",
                 "cai_jax.stages.feedback", "cai_jax.stages.pipeline")


def test_bench_imports_need_none_of_the_packages_a_gpu_image_lacks():
  """What bench/*.py import from cai_jax loads with gin-config, tensorflow-datasets, grain,
  array_record, gguf and tensorboardX unimportable (a GPU image without them, as
  bench/gpu.sh says); the data readers too, while a grain pipeline names what is missing."""
  code = textwrap.dedent(f"""
      import importlib, importlib.abc, sys
      BLOCKED = {{"gin", "tensorflow_datasets", "grain", "array_record", "gguf", "tensorboardX"}}
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
      sys.meta_path.insert(0, Block())
      for m in {BENCH_IMPORTS!r}:
        importlib.import_module(m)
      from cai_jax import data
      batches = data.Batches([{{"text": "a"}}] * 2, lambda e: {{"x": [0]}}, 1, 0)
      try:
        batches.dataset()
      except ModuleNotFoundError as e:
        print("dataset:", e)
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dataset: No module named 'grain'" in proc.stdout

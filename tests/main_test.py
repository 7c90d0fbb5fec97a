"""The cai-jax CLI: info, errors, help, train_lm end to end, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "cai_jax.main", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def test_info_prints_exact_count_as_one_json_line():
  out = cli("info", "--gin_file=gin/models/smollm2_135m.gin")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  info = json.loads(lines[0])
  assert info["params"] == 134_515_008
  assert (info["layers"], info["d_model"], info["heads"], info["kv_heads"], info["vocab"]) == (
      30, 576, 9, 3, 49152)


@pytest.mark.parametrize("args,needle", [
    (["info", "--gin_file=gin/models/no_such_preset.gin"], "no_such_preset.gin"),
    (["info", "--gin.ModelConfig.bogus=1"], "bogus"),
    (["info", "--gin.NoSuchThing.x=1"], "NoSuchThing"),
    (["frobnicate"], "frobnicate"),
    (["train_lm", "--gin.train_lm.dataset='missing.jsonl'", "--out_dir=/tmp/cai_jax_never"],
     "missing.jsonl"),
])
def test_bad_input_is_one_line_error(args, needle):
  out = cli(*args)
  assert out.returncode != 0
  err = [l for l in out.stderr.strip().splitlines() if l.startswith("cai-jax: error")]
  assert len(err) == 1 and needle in err[0], out.stderr
  assert "Traceback" not in out.stderr


def test_help_lists_commands():
  out = cli("--help")
  assert out.returncode == 0
  for command in ("train_lm", "info"):
    assert command in out.stdout


def _load_params(run):
  from cai_jax import model_dir
  _, params = model_dir.load_model(os.path.join(run, "model"))
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def _train_args(out_dir, steps=16):
  return ["train_lm", f"--out_dir={out_dir}", f"--gin.TrainConfig.num_steps={steps}",
          "--gin.TrainConfig.save_every=2", "--gin.TrainConfig.batch_size=8",
          "--gin.TrainConfig.seq_len=64", "--gin.TrainConfig.progress=False"]


def test_train_lm_killed_and_resumed_equals_uninterrupted(tmp_path):
  full = tmp_path / "full"
  out = cli(*_train_args(full))
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 16
  assert os.path.exists(full / "config.gin")
  assert "TrainConfig.num_steps = 16" in (full / "config.gin").read_text()

  # Same run, SIGKILLed once a checkpoint at step >= 6 exists, then resumed.
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "cai_jax.main", *_train_args(killed)], cwd=REPO,
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
    if steps and max(steps) >= 6:
      break
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "model").exists()
  out = cli(*_train_args(killed))
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] is not None and summary["resumed_from"] >= 6
  for a, b in zip(_load_params(full), _load_params(killed)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  steps_logged = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl")]
  assert steps_logged == list(range(1, 17))

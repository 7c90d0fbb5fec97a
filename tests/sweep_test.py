"""launch/sweep.py: grid expansion, run names, gin quoting, errors, --print and --run."""

from __future__ import annotations

import ast
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location("launch_sweep", REPO / "launch" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("launch_sweep", module)  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep = _load()


def test_expand_order_and_count():
  grid = [("a", [1, 2]), ("b", ["x", "y", "z"]), ("c", [True])]
  points = sweep.expand(grid)
  assert len(points) == 6
  assert points == [{"a": 1, "b": "x", "c": True}, {"a": 1, "b": "y", "c": True},
                    {"a": 1, "b": "z", "c": True}, {"a": 2, "b": "x", "c": True},
                    {"a": 2, "b": "y", "c": True}, {"a": 2, "b": "z", "c": True}]
  with pytest.raises(ValueError, match="empty grid"):
    sweep.expand([])


def test_parse_grid_arg_json_and_python_literals():
  assert sweep.parse_grid_arg("PPOConfig.kl_coef=[0.001,0.01]") == ("PPOConfig.kl_coef",
                                                                    [0.001, 0.01])
  assert sweep.parse_grid_arg('MODEL=["a", "b"]') == ("MODEL", ["a", "b"])
  assert sweep.parse_grid_arg("rl/PPOConfig.clip=[0.1, 0.2]") == ("rl/PPOConfig.clip",
                                                                   [0.1, 0.2])
  assert sweep.parse_grid_arg("x=[true, null]") == ("x", [True, None])
  assert sweep.parse_grid_arg("x=['a', False, (1, 2)]") == ("x", ["a", False, (1, 2)])


@pytest.mark.parametrize("arg,message", [
    ("PPOConfig.kl_coef=0.1", "the values of PPOConfig.kl_coef must be a non-empty list"),
    ("PPOConfig.kl_coef=[0.1,", "'[0.1,' is not a JSON or Python literal"),
    ("no_equals_sign", "expected KEY=[VALUE, ...]"),
    ("bad key=[1]", "'bad key' is not a gin binding key"),
    ("k=[]", "the values of k must be a non-empty list"),
    # The same value twice would be the same run twice, into one out_dir.
    ("TrainConfig.seed=[0, 1, 0]", "the value 0 of TrainConfig.seed is given twice"),
    ("MODEL=['m', \"m\"]", 'the value "m" of MODEL is given twice'),
    ("x=[{1, 2}]", "cannot write {1, 2} as a gin value"),
])
def test_bad_grid_is_one_line_naming_the_argument(arg, message, capsys):
  assert sweep.main(["--command=rl", "--out_root=r", "--grid", "a=[1]", "--grid", arg]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert err.startswith(f"sweep.py: error: --grid {arg!r}: ")
  assert message in err


def test_grid_file(tmp_path, capsys):
  path = tmp_path / "grid.json"
  path.write_text('{"TrainConfig.seed": [0, 1],\n "MODEL": ["m"]}\n')
  assert sweep.read_grid_file(str(path)) == [("TrainConfig.seed", [0, 1]), ("MODEL", ["m"])]
  # File keys first, then --grid keys.
  assert sweep.main(["--command=sl", "--out_root=o", f"--grid_file={path}", "--grid",
                     "x=[2]"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "cai-jax sl --gin.TrainConfig.seed=0 '--gin.MODEL=\"m\"' --gin.x=2 "
      "--out_dir=o/seed=0,MODEL=m,x=2",
      "cai-jax sl --gin.TrainConfig.seed=1 '--gin.MODEL=\"m\"' --gin.x=2 "
      "--out_dir=o/seed=1,MODEL=m,x=2"]
  assert sweep.main(["--command=sl", "--out_root=o", f"--grid_file={path}", "--grid",
                     "MODEL=[1]"]) == 2
  assert "grid key MODEL is given twice" in capsys.readouterr().err
  path.write_text('{"a": [1],\n "b": [2,]}\n')
  with pytest.raises(ValueError, match=r"grid\.json:2: not valid JSON"):
    sweep.read_grid_file(str(path))
  path.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="the values of a must be a non-empty list"):
    sweep.read_grid_file(str(path))
  with pytest.raises(FileNotFoundError, match="grid file not found"):
    sweep.read_grid_file(str(tmp_path / "missing.json"))


def test_gin_values_are_python_literals():
  cases = {"b": '"b"', 'say "hi"': '"say \\"hi\\""', "it's": '"it\'s"', True: "True",
           None: "None", 0.001: "0.001", 1e-05: "1e-05", 3: "3"}
  for value, text in cases.items():
    assert sweep.gin_value(value) == text
    assert ast.literal_eval(text) == value
  assert sweep.gin_value([1, "a", [False]]) == '[1, "a", [False]]'
  assert sweep.gin_value((1,)) == "(1,)"
  assert sweep.gin_value({"k": 0.5}) == '{"k": 0.5}'
  assert sweep.gin_bindings({"MODEL": "x/y.gguf", "PPOConfig.kl_coef": 0.01}) == [
      'MODEL="x/y.gguf"', "PPOConfig.kl_coef=0.01"]


def test_run_names():
  shorts = sweep.short_keys(["PPOConfig.kl_coef", "MODEL", "rl/TrainConfig.seed"])
  assert shorts == {"PPOConfig.kl_coef": "kl_coef", "MODEL": "MODEL",
                    "rl/TrainConfig.seed": "seed"}
  assert sweep.run_name({"PPOConfig.kl_coef": 0.01, "MODEL": "b"}, shorts) == "kl_coef=0.01,MODEL=b"
  # Keys whose short names coincide keep their full names; '/' becomes '_'.
  shorts = sweep.short_keys(["OptimizerConfig.lr", "a/PPOConfig.lr"])
  assert shorts == {"OptimizerConfig.lr": "OptimizerConfig.lr", "a/PPOConfig.lr": "a/PPOConfig.lr"}
  assert sweep.run_name({"OptimizerConfig.lr": 1, "a/PPOConfig.lr": 2}, shorts) == \
      "OptimizerConfig.lr=1,a_PPOConfig.lr=2"
  # Values: path separators, commas, '=' and spaces become '_'.
  assert sweep.run_name({"m": "models/a b,c=d", "l": [1, 2]}, {"m": "m", "l": "l"}) == \
      "m=models_a_b_c_d,l=_1_2_"


def test_names_that_collide_or_are_long_stay_distinct_and_deterministic():
  runs = sweep.make_runs([("m", ["a/b", "a_b", "c"])], "rl", "out")
  names = [r.name for r in runs]
  assert names[2] == "m=c"
  assert names[0].startswith("m=a_b-") and names[1].startswith("m=a_b-")
  assert len(set(names)) == 3
  assert names == [r.name for r in sweep.make_runs([("m", ["a/b", "a_b", "c"])], "rl", "out")]
  long_runs = sweep.make_runs([("k", ["x" * 300, "x" * 299 + "y"])], "rl", "out")
  assert all(len(r.name.encode()) <= 200 for r in long_runs)
  assert long_runs[0].name != long_runs[1].name


def test_distinct_values_are_distinct_runs_or_an_error():
  """Values that are equal in Python but not in gin (1, 1.0, True) stay three runs; values
  whose names and digests coincide (a list and a tuple) are refused, not merged."""
  runs = sweep.make_runs([("x", [1, 1.0, True, "1"])], "rl", "out")
  assert len({r.out_dir for r in runs}) == 4
  assert [r.argv[2] for r in runs] == ["--gin.x=1", "--gin.x=1.0", "--gin.x=True", '--gin.x="1"']
  with pytest.raises(ValueError, match=r"the runs \['x=\[1, 2\]'\] and \['x=\(1, 2\)'\] would "
                     "share the out_dir out/x=_1_2_-"):
    sweep.make_runs([("x", [[1, 2], (1, 2)])], "rl", "out")


def test_print_local_tpu_slurm(capsys):
  args = ["--base=gin/experiments/x.gin", "--grid", "PPOConfig.kl_coef=[0.001,0.01]",
          "--grid", 'MODEL=["a","b"]', "--command=rl", "--out_root=runs/sweep"]
  assert sweep.main(args + ["--", "--gin.rl.iterations=3"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      f"cai-jax rl --gin_file=gin/experiments/x.gin --gin.PPOConfig.kl_coef={kl} "
      f"'--gin.MODEL=\"{m}\"' --out_dir=runs/sweep/kl_coef={kl},MODEL={m} --gin.rl.iterations=3"
      for kl in ("0.001", "0.01") for m in "ab"]
  assert sweep.main(args[:3] + args[5:] + ["--launcher=tpu"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "bash launch/tpu_vm.sh --log_name=kl_coef=0.001 run -- rl "
      "--gin_file=gin/experiments/x.gin --gin.PPOConfig.kl_coef=0.001 "
      "--out_dir=runs/sweep/kl_coef=0.001",
      "bash launch/tpu_vm.sh --log_name=kl_coef=0.01 run -- rl "
      "--gin_file=gin/experiments/x.gin --gin.PPOConfig.kl_coef=0.01 "
      "--out_dir=runs/sweep/kl_coef=0.01"]
  assert sweep.main(args[3:] + ["--launcher=slurm"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "sbatch --job-name=MODEL=a launch/slurm.sbatch rl '--gin.MODEL=\"a\"' "
      "--out_dir=runs/sweep/MODEL=a",
      "sbatch --job-name=MODEL=b launch/slurm.sbatch rl '--gin.MODEL=\"b\"' "
      "--out_dir=runs/sweep/MODEL=b"]


def test_print_from_the_command_line():
  proc = subprocess.run([sys.executable, "launch/sweep.py", "--command=pm", "--out_root=o",
                         "--grid", "TrainConfig.seed=[0, 1]", "--print"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["cai-jax pm --gin.TrainConfig.seed=0 --out_dir=o/seed=0",
                                      "cai-jax pm --gin.TrainConfig.seed=1 --out_dir=o/seed=1"]


# A stand-in for cai-jax: records its arguments in out_dir/argv.json, then fails (exit 3) when
# bound fail=True, else writes out_dir/summary.json.
FAKE = """
import json, os, sys
args = sys.argv[1:]
out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
os.makedirs(out_dir, exist_ok=True)
calls = os.path.join(out_dir, "calls")
with open(calls, "a") as f:
  f.write("x")
with open(os.path.join(out_dir, "argv.json"), "w") as f:
  json.dump(args, f)
if "--gin.fail=True" in args:
  sys.exit(3)
with open(os.path.join(out_dir, "summary.json"), "w") as f:
  json.dump({"done": True}, f)
"""


def test_run_records_statuses_and_skips_complete_runs(tmp_path, capsys):
  fake = tmp_path / "fake_cai_jax.py"
  fake.write_text(FAKE)
  root = tmp_path / "sweep"
  args = ["--run", "--command=rl", f"--out_root={root}", "--grid", "PPOConfig.kl_coef=[0.1, 0.2]",
          "--grid", "fail=[false, true]", "--grid", 'MODEL=["m"]',
          f"--cai_jax={shlex.join([sys.executable, str(fake)])}"]
  # A run that finished before the sweep started is skipped.
  done = root / "kl_coef=0.2,fail=False,MODEL=m"
  done.mkdir(parents=True)
  (done / "summary.json").write_text("{}")

  assert sweep.main(args) == 1
  summary = json.loads(capsys.readouterr().out)
  assert summary == {"sweep": str(root / "sweep.json"), "runs": 4, "ok": 1, "skipped": 1,
                     "failed": 2}
  record = json.loads((root / "sweep.json").read_text())
  assert record["grid"] == {"PPOConfig.kl_coef": [0.1, 0.2], "fail": [False, True],
                            "MODEL": ["m"]}
  runs = record["runs"]
  assert [(r["name"], r["status"], r["exit_code"]) for r in runs] == [
      ("kl_coef=0.1,fail=False,MODEL=m", "ok", 0),
      ("kl_coef=0.1,fail=True,MODEL=m", "failed", 3),
      ("kl_coef=0.2,fail=False,MODEL=m", "skipped", None),
      ("kl_coef=0.2,fail=True,MODEL=m", "failed", 3)]
  assert runs[1]["bindings"] == {"PPOConfig.kl_coef": 0.1, "fail": True, "MODEL": "m"}
  assert runs[1]["gin_bindings"] == ["PPOConfig.kl_coef=0.1", "fail=True", 'MODEL="m"']
  assert runs[1]["out_dir"] == str(root / "kl_coef=0.1,fail=True,MODEL=m")
  first_argv = ["rl", "--gin.PPOConfig.kl_coef=0.1", "--gin.fail=False", '--gin.MODEL="m"',
                f"--out_dir={root / 'kl_coef=0.1,fail=False,MODEL=m'}"]
  assert runs[0]["command"] == [sys.executable, str(fake)] + first_argv
  assert json.loads((root / runs[0]["name"] / "argv.json").read_text()) == first_argv
  assert not (done / "argv.json").exists()

  # Rerun: the completed runs are skipped, the failed ones run (and fail) again.
  assert sweep.main(args) == 1
  capsys.readouterr()
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [r["status"] for r in runs] == ["skipped", "failed", "skipped", "failed"]
  calls = {r["name"]: (root / r["name"] / "calls").read_text() if r["name"] != done.name
           else "" for r in runs}
  assert calls == {"kl_coef=0.1,fail=False,MODEL=m": "x", "kl_coef=0.1,fail=True,MODEL=m": "xx",
                   "kl_coef=0.2,fail=False,MODEL=m": "", "kl_coef=0.2,fail=True,MODEL=m": "xx"}


def test_run_with_a_missing_executable(tmp_path, capsys):
  root = tmp_path / "s"
  assert sweep.main(["--run", "--command=rl", f"--out_root={root}", "--grid", "x=[1]",
                     "--cai_jax=/nonexistent/cai-jax"]) == 1
  capsys.readouterr()
  runs = json.loads((root / "sweep.json").read_text())["runs"]
  assert [(r["status"], r["exit_code"]) for r in runs] == [("failed", 127)]


def test_infinite_values_are_written_as_gin_reads_them_and_nan_is_refused(capsys):
  """gin reads neither 'inf' nor 'nan' (every run of such a sweep failed in its gin parse)."""
  assert sweep.gin_value(float("inf")) == "1e999"
  assert sweep.gin_value([float("-inf"), 0.5]) == "[-1e999, 0.5]"
  assert ast.literal_eval(sweep.gin_value(float("-inf"))) == float("-inf")
  assert sweep.main(["--command=rl", "--out_root=o", "--grid",
                     "OptimizerConfig.max_grad_norm=[1.0, Infinity]"]) == 0
  assert capsys.readouterr().out.splitlines()[1] == (
      "cai-jax rl --gin.OptimizerConfig.max_grad_norm=1e999 --out_dir=o/max_grad_norm=inf")
  assert sweep.main(["--command=rl", "--out_root=o", "--grid", "x=[1, NaN]"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--grid 'x=[1, NaN]': cannot write nan as a gin value" in err


@pytest.mark.parametrize("extra,message", [
    (["--out_dir=elsewhere"], "'--out_dir=elsewhere' after -- sets --out_dir"),
    (["--out_dir", "elsewhere"], "'--out_dir' after -- sets --out_dir"),
    (["--gin.PPOConfig.kl_coef=0.5"], "'--gin.PPOConfig.kl_coef=0.5' after -- binds the grid "
                                      "key PPOConfig.kl_coef"),
    (["--gin_bindings=PPOConfig.kl_coef = 0.5"], "binds the grid key PPOConfig.kl_coef"),
    (["--gin_bindings", "PPOConfig.kl_coef=0.5"], "binds the grid key PPOConfig.kl_coef"),
    (["--run"], "'--run' after -- goes to cai-jax, not to sweep.py"),
    (["--launcher=slurm"], "'--launcher=slurm' after -- goes to cai-jax, not to sweep.py"),
])
def test_extra_args_that_would_make_every_run_the_same_are_refused(extra, message, capsys):
  """absl keeps the last --out_dir and gin the last binding: such an argument after -- would
  send every run to one out_dir, or give every run the same value of a grid key."""
  assert sweep.main(["--command=rl", "--out_root=o", "--grid", "PPOConfig.kl_coef=[0.1, 0.2]",
                     "--", *extra]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("sweep.py: error: ") and message in err
  assert sweep.main(["--command=rl", "--out_root=o", "--grid", "PPOConfig.kl_coef=[0.1, 0.2]",
                     "--", "--gin.PPOConfig.clip=0.3", "--gin_bindings=rl.iterations=2"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("launcher", ["tpu", "slurm"])
def test_cai_jax_with_another_launcher_is_refused(launcher, capsys):
  """tpu runs REMOTE_DIR/.venv/bin/cai-jax and slurm $CAI_JAX: --cai_jax was dropped silently."""
  assert sweep.main(["--command=rl", "--out_root=o", "--grid", "x=[1]", f"--launcher={launcher}",
                     "--cai_jax=python -m cai_jax.main"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert err.startswith("sweep.py: error: --cai_jax applies to --launcher=local only")


@pytest.mark.parametrize("command,message", [
    ("trian_lm", "--command=trian_lm is not a cai-jax command; a sweep runs one of "),
    ("info", "--command=info writes no --out_dir; a sweep runs one of "),
])
def test_a_command_a_sweep_cannot_run_is_refused(command, message, capsys):
  assert sweep.main([f"--command={command}", "--out_root=o", "--grid", "x=[1, 2]"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"sweep.py: error: {message}")
  listed = err.split("one of ")[1].strip().split(", ")
  assert {"rl", "pipeline"} <= set(listed) and "info" not in listed

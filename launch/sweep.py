"""Experiment sweeps: the cartesian product of gin bindings, one cai-jax run per point.

  python launch/sweep.py --base=gin/experiments/x.gin --command=rl --out_root=runs/sweep \\
      --grid 'PPOConfig.kl_coef=[0.001,0.01]' --grid 'MODEL=["a","b"]' [--print | --run] \\
      [--launcher=local|tpu|slurm] [--grid_file=grid.json] [-- EXTRA_CAI_JAX_ARGS...]

Each run gets an out_dir under --out_root named from its bindings
(``runs/sweep/kl_coef=0.01,MODEL=b``), its gin bindings and the exact command line
``cai-jax COMMAND --gin_file=BASE --gin.KEY=VALUE ... --out_dir=DIR``, values written in gin
(Python literal) syntax: strings quoted. ``--print`` (the default) prints one command per run,
or the launcher's command (``bash launch/tpu_vm.sh ... run -- ...``, ``sbatch ...
launch/slurm.sbatch ...``). ``--run`` runs them one after another, skips runs whose out_dir
holds a finished run (summary.json, or a manifest marked complete: the rule of
``cai-jax pipeline``), and writes out_root/sweep.json (each run's bindings, out_dir,
command, status and exit code) after every run. cai-jax writes each run's effective config to
out_dir/config.gin.

Grid values are JSON or Python literals: ``[0.001, 0.01]``, ``["a", "b"]``, ``[true, false]``.
The runs are in product order: the first grid key varies slowest.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax.stages.pipeline import is_complete  # noqa: E402  (stdlib only: no jax import)

LAUNCHERS = ("local", "tpu", "slurm")
TPU_SCRIPT = "launch/tpu_vm.sh"
SLURM_SCRIPT = "launch/slurm.sbatch"

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:[./][A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 200  # bytes; file names may have 255

Grid = List[Tuple[str, List[Any]]]


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep.

  Attributes:
    name: the out_dir's base name, from the bindings.
    bindings: {gin key: value} of this point, in grid order.
    out_dir: out_root/name.
    argv: the cai-jax command line (argv[0] is the cai-jax executable).
  """

  name: str
  bindings: Dict[str, Any]
  out_dir: str
  argv: List[str]


def _literal(text: str) -> Any:
  """A JSON value, or failing that a Python literal; ValueError if neither."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    pass
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    raise ValueError(f"{text!r} is not a JSON or Python literal") from None


def _check_values(where: str, key: str, values: Any) -> List[Any]:
  if not _KEY.match(key):
    raise ValueError(f"{where}: {key!r} is not a gin binding key (Configurable.param, "
                     f"scope/Configurable.param or MACRO)")
  if not isinstance(values, (list, tuple)) or not values:
    raise ValueError(f"{where}: the values of {key} must be a non-empty list")
  seen = set()
  for value in values:
    try:
      text = gin_value(value)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if text in seen:   # the same run twice, into one out_dir
      raise ValueError(f"{where}: the value {text} of {key} is given twice")
    seen.add(text)
  return list(values)


def parse_grid_arg(arg: str) -> Tuple[str, List[Any]]:
  """'KEY=[v1, v2]' -> (KEY, [v1, v2]).

  Raises:
    ValueError: one line naming the --grid argument.
  """
  where = f"--grid {arg!r}"
  key, sep, text = arg.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ValueError(f"{where}: expected KEY=[VALUE, ...]")
  try:
    values = _literal(text.strip())
  except ValueError as e:
    raise ValueError(f"{where}: {e}; expected KEY=[VALUE, ...]") from None
  return key, _check_values(where, key, values)


def read_grid_file(path: str) -> Grid:
  """A JSON object {key: [values]} (key order kept) -> [(key, values)].

  Raises:
    FileNotFoundError: no such file.
    ValueError: not JSON (naming the line), not an object, or a bad key / value list.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"grid file not found: {path}")
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{path}: expected a non-empty JSON object {{key: [values]}}")
  return [(key, _check_values(path, key, values)) for key, values in data.items()]


def merge_grids(*grids: Grid) -> Grid:
  """Concatenates grids; a key given twice is a ValueError."""
  out: Grid = []
  seen = set()
  for grid in grids:
    for key, values in grid:
      if key in seen:
        raise ValueError(f"grid key {key} is given twice")
      seen.add(key)
      out.append((key, values))
  return out


def expand(grid: Grid) -> List[Dict[str, Any]]:
  """The cartesian product of the grid as [{key: value}], the first key varying slowest."""
  if not grid:
    raise ValueError("empty grid: pass --grid KEY=[VALUE, ...] or --grid_file")
  keys = [k for k, _ in grid]
  return [dict(zip(keys, point)) for point in itertools.product(*(v for _, v in grid))]


def gin_value(value: Any) -> str:
  """A value in gin (Python literal) syntax: 'b' -> '"b"', True -> 'True', 0.01 -> '0.01',
  inf -> '1e999' (gin reads no 'inf'); NaN, which gin has no literal for, is a ValueError."""
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, float) and not math.isfinite(value):
    if math.isnan(value):
      raise ValueError(f"cannot write {value!r} as a gin value (gin has no literal for NaN)")
    return "1e999" if value > 0 else "-1e999"
  if value is None or isinstance(value, (bool, int, float)):
    return repr(value)
  if isinstance(value, (list, tuple)):
    items = ", ".join(gin_value(v) for v in value)
    return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{gin_value(k)}: {gin_value(v)}" for k, v in value.items()) + "}"
  raise ValueError(f"cannot write {value!r} as a gin value")


def gin_bindings(bindings: Dict[str, Any]) -> List[str]:
  """['KEY=VALUE', ...] in gin syntax, the form `--gin.KEY=VALUE` takes."""
  return [f"{key}={gin_value(value)}" for key, value in bindings.items()]


def _name_value(value: Any) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value, separators=(",", ":"))
  return repr(value)


def short_keys(keys: Sequence[str]) -> Dict[str, str]:
  """{key: name in run names}: the part after the last '.' or '/', unless two keys share it."""
  short = {k: re.split(r"[./]", k)[-1] for k in keys}
  counts: Dict[str, int] = {}
  for s in short.values():
    counts[s] = counts.get(s, 0) + 1
  return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def _digest(bindings: Dict[str, Any]) -> str:
  text = json.dumps(list(bindings.items()), separators=(",", ":"))
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def run_name(bindings: Dict[str, Any], shorts: Dict[str, str]) -> str:
  """'kl_coef=0.01,MODEL=b': short key = value, comma-joined in grid order.

  Characters other than letters, digits and '._+-' become '_' in keys and values (so ',' and
  '=' only separate); a name over 200 bytes is cut and ends with a digest of the bindings.
  """
  parts = [f"{_UNSAFE.sub('_', shorts[k])}={_UNSAFE.sub('_', _name_value(v))}"
           for k, v in bindings.items()]
  name = ",".join(parts)
  if len(name.encode("utf-8")) > _MAX_NAME:
    name = name[:_MAX_NAME - 9] + "-" + _digest(bindings)
  return name


_OWN_FLAGS = ("run", "print", "launcher", "grid", "grid_file", "out_root", "base", "command",
              "cai_jax")


def check_command(command: str) -> None:
  """ValueError unless `command` is a cai-jax command that writes --out_dir (the runs of a
  sweep each get one), the pipeline included."""
  from cai_jax.main import COMMANDS   # absl only: no jax import
  ok = sorted(c for c, spec in COMMANDS.items() if spec.writes_out_dir or c == "pipeline")
  if command not in ok:
    what = "is not a cai-jax command" if command not in COMMANDS else "writes no --out_dir"
    raise ValueError(f"--command={command} {what}; a sweep runs one of {', '.join(ok)}")


def check_extra_args(extra_args: Sequence[str], keys: Sequence[str]) -> None:
  """ValueError naming an argument after -- that would make the runs alike: one setting
  --out_dir (absl keeps the last one: every run would write there) or binding a grid key
  (gin keeps the last binding: every run would get its value); or one of sweep.py's own
  flags (--run after -- would reach cai-jax, and the sweep would only print)."""
  for i, arg in enumerate(extra_args):
    if not arg.startswith("-"):
      continue
    flag, sep, value = arg.lstrip("-").partition("=")
    if flag in _OWN_FLAGS:
      raise ValueError(f"the argument {arg!r} after -- goes to cai-jax, not to sweep.py; put "
                       "sweep.py's own flags before --")
    if flag == "out_dir":
      raise ValueError(f"the argument {arg!r} after -- sets --out_dir, which the sweep gives "
                       "each run (out_root/NAME); set --out_root instead")
    if flag.startswith("gin."):
      key = flag[len("gin."):]
    elif flag == "gin_bindings":
      binding = value if sep else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
      key = binding.partition("=")[0]
    else:
      continue
    if key.strip() in keys:
      raise ValueError(f"the argument {arg!r} after -- binds the grid key {key.strip()}, which "
                       "the sweep binds in each run; drop it or the grid key")


def make_runs(grid: Grid, command: str, out_root: str, base: Sequence[str] = (),
              extra_args: Sequence[str] = (), cai_jax: Sequence[str] = ("cai-jax",)) -> List[Run]:
  """Expands the grid into runs with their names, out_dirs and cai-jax command lines.

  Names that coincide after sanitising get a digest of their bindings appended; a command
  that writes no --out_dir (``check_command``) and extra_args that set --out_dir or bind a
  grid key (``check_extra_args``) are a ValueError.
  """
  check_command(command)
  points = expand(grid)
  check_extra_args(extra_args, [k for k, _ in grid])
  shorts = short_keys([k for k, _ in grid])
  names = [run_name(p, shorts) for p in points]
  dup = {n for n in names if names.count(n) > 1}
  names = [f"{n}-{_digest(p)}" if n in dup else n for n, p in zip(names, points)]
  first: Dict[str, Dict[str, Any]] = {}
  for name, point in zip(names, points):
    if name in first:
      raise ValueError(f"the runs {gin_bindings(first[name])} and {gin_bindings(point)} would "
                       f"share the out_dir {os.path.join(out_root, name)}")
    first[name] = point
  runs = []
  for name, point in zip(names, points):
    out_dir = os.path.join(out_root, name)
    argv = ([*cai_jax, command] + [f"--gin_file={f}" for f in base]
            + [f"--gin.{b}" for b in gin_bindings(point)] + [f"--out_dir={out_dir}"]
            + list(extra_args))
    runs.append(Run(name, point, out_dir, argv))
  return runs


def launcher_argv(run: Run, launcher: str, cai_jax_words: int = 1) -> List[str]:
  """The command that starts `run` with `launcher`.

  local: the cai-jax command itself; tpu: `bash launch/tpu_vm.sh --log_name=NAME run -- ARGS`
  (the same command on every TPU worker); slurm: `sbatch --job-name=NAME launch/slurm.sbatch
  ARGS`. ARGS are the cai-jax arguments after the executable (its first `cai_jax_words`).
  """
  args = run.argv[cai_jax_words:]
  if launcher == "local":
    return list(run.argv)
  if launcher == "tpu":
    return ["bash", TPU_SCRIPT, f"--log_name={run.name}", "run", "--", *args]
  if launcher == "slurm":
    return ["sbatch", f"--job-name={run.name}", SLURM_SCRIPT, *args]
  raise ValueError(f"unknown launcher {launcher!r}; one of {', '.join(LAUNCHERS)}")


def _write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


def run_sweep(runs: Sequence[Run], launcher: str, out_root: str, header: Dict[str, Any],
              cai_jax_words: int = 1) -> List[Dict[str, Any]]:
  """Runs every command in sequence; returns the records also written to out_root/sweep.json.

  status: 'skipped' (out_dir already complete; exit_code None), 'ok' / 'failed' (exit code
  of the command; for slurm 'submitted' when sbatch succeeded).
  """
  path = os.path.join(out_root, "sweep.json")
  records = [{"name": r.name, "bindings": r.bindings, "gin_bindings": gin_bindings(r.bindings),
              "out_dir": r.out_dir, "command": launcher_argv(r, launcher, cai_jax_words),
              "status": "pending", "exit_code": None, "seconds": None} for r in runs]
  _write_json(path, {**header, "runs": records})
  for run, rec in zip(runs, records):
    if is_complete(run.out_dir):
      rec["status"] = "skipped"
      print(f"sweep: {run.name}: skipped ({run.out_dir} holds a finished run)", file=sys.stderr)
    else:
      print(f"sweep: {run.name}: {shlex.join(rec['command'])}", file=sys.stderr, flush=True)
      t0 = time.perf_counter()
      try:
        code = subprocess.call(rec["command"])
      except OSError as e:
        print(f"sweep: {run.name}: cannot start {rec['command'][0]}: {e}", file=sys.stderr)
        code = 127
      rec["seconds"] = round(time.perf_counter() - t0, 3)
      rec["exit_code"] = code
      done = "submitted" if launcher == "slurm" else "ok"
      rec["status"] = done if code == 0 else "failed"
      print(f"sweep: {run.name}: {rec['status']} (exit {code})", file=sys.stderr)
    _write_json(path, {**header, "runs": records})
  return records


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
  argv = list(argv)
  extra: List[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(
      prog="launch/sweep.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Arguments after -- are added to every cai-jax command.")
  p.add_argument("--command", required=True, help="the cai-jax command of every run (train_lm, "
                 "sl, pm, rl, ...: one that writes --out_dir)")
  p.add_argument("--base", action="append", default=[], help="gin file of every run "
                 "(repeatable; without one, the command's default gin)")
  p.add_argument("--grid", action="append", default=[], help="KEY=[VALUE, ...] (repeatable)")
  p.add_argument("--grid_file", help="JSON object {KEY: [VALUE, ...]}; its keys come before "
                 "the --grid ones")
  p.add_argument("--out_root", required=True, help="parent directory of the runs' out_dirs "
                 "and of sweep.json")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print", dest="run", action="store_false", help="print the commands "
                    "(default)")
  mode.add_argument("--run", dest="run", action="store_true", help="run the commands one "
                    "after another, skipping complete runs; write out_root/sweep.json")
  p.add_argument("--launcher", default="local", choices=LAUNCHERS, help="local: cai-jax here; "
                 f"tpu: {TPU_SCRIPT} run on every TPU worker; slurm: sbatch {SLURM_SCRIPT}")
  p.add_argument("--cai_jax", default="cai-jax", help="the cai-jax executable, split like a "
                 "shell word list (e.g. 'python -m cai_jax.main'); --launcher=local only")
  p.set_defaults(run=False)
  return p.parse_args(argv), extra


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    grid = merge_grids(read_grid_file(args.grid_file) if args.grid_file else [],
                       [parse_grid_arg(g) for g in args.grid])
    cai_jax = shlex.split(args.cai_jax)
    if not cai_jax:
      raise ValueError("--cai_jax is empty")
    if args.launcher != "local" and cai_jax != ["cai-jax"]:
      raise ValueError(f"--cai_jax applies to --launcher=local only ({TPU_SCRIPT} runs "
                       f"REMOTE_DIR/.venv/bin/cai-jax, {SLURM_SCRIPT} the CAI_JAX variable)")
    runs = make_runs(grid, args.command, args.out_root, args.base, extra, cai_jax)
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  if not args.run:
    for run in runs:
      print(shlex.join(launcher_argv(run, args.launcher, len(cai_jax))))
    return 0
  header = {"command": args.command, "base": args.base, "grid": dict(grid),
            "launcher": args.launcher, "out_root": args.out_root}
  records = run_sweep(runs, args.launcher, args.out_root, header, len(cai_jax))
  failed = [r["name"] for r in records if r["status"] == "failed"]
  counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "submitted", "skipped",
                                                                "failed")}
  print(json.dumps({"sweep": os.path.join(args.out_root, "sweep.json"), "runs": len(records),
                    **{k: v for k, v in counts.items() if v}}))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

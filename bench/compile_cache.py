"""`cai-jax pipeline` with and without the persistent compilation cache, stage by stage.

Runs the same pipeline three times from scratch, each in a fresh working directory
(so every stage runs; nothing is skipped):

  * off:  ``--compilation_cache=none`` (every stage process compiles all it runs);
  * cold: a new, empty cache directory (stages still load what earlier stages of the same
    run compiled: the sampler of a model, its scoring and training steps);
  * warm: the cache the cold run left (a rerun of the experiment, e.g. with another
    learning rate that does not change the programs, or the next experiment on the
    same model).

Prints one markdown table: the seconds of every stage in each run, the total and the
ratio off / run (the peer is the same pipeline without the cache). Defaults to the tiny
CPU pipeline (``gin/experiments/tiny_cpu_pipeline.gin``, about 2 minutes a run on 2
cores); ``--gin_file gin/experiments/smollm2_135m_cpu.gin`` runs the SmolLM2 experiment
(about 10 minutes a run).

  python bench/compile_cache.py [--gin_file FILE] [--binding KEY=VALUE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("off", "cold", "warm")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", default=os.path.join(REPO, "gin", "experiments",
                                                    "tiny_cpu_pipeline.gin"))
  p.add_argument("--binding", action="append", default=[],
                 help="extra gin binding KEY=VALUE for every run (repeatable)")
  p.add_argument("--json", default=None, help="also write the results as JSON here")
  return p.parse_args(argv)


def run_pipeline(gin_file: str, bindings: List[str], cache: str, workdir: str) -> Dict[str, Any]:
  """One `cai-jax pipeline` from scratch in workdir; {"stages": {name: s}, "total": s}."""
  cmd = [sys.executable, "-m", "cai_jax.main", "pipeline", f"--gin_file={os.path.abspath(gin_file)}",
         f"--compilation_cache={cache}", "--out_dir=run", "--gin.TrainConfig.progress=False"]
  cmd += [f"--gin.{b}" for b in bindings]
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")}
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
  total = time.perf_counter() - start
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"compile_cache: the pipeline failed (exit {proc.returncode}) in {workdir}")
  with open(os.path.join(workdir, "run", "pipeline.json"), encoding="utf-8") as f:
    status = json.load(f)
  stages = {s["stage"]: float(s["seconds"]) for s in status["stages"]}
  if any(s["status"] != "ran" for s in status["stages"]):
    raise SystemExit(f"compile_cache: a stage was skipped in {workdir}; the runs must start empty")
  return {"stages": stages, "total": total}


def table(results: Dict[str, Dict[str, Any]]) -> str:
  """Markdown: a row per stage and one for the whole command, a column per run, the ratios."""
  stages = list(results["off"]["stages"])
  head = ["stage"] + [f"{r} (s)" for r in RUNS] + ["off / cold", "off / warm"]
  rows = []
  for name in stages + ["**total** (wall clock of the command)"]:
    secs = [results[r]["stages"][name] if name in stages else results[r]["total"] for r in RUNS]
    rows.append([name] + [f"{s:.1f}" for s in secs] + [f"{secs[0] / secs[1]:.2f}",
                                                       f"{secs[0] / secs[2]:.2f}"])
  return _presets.markdown_table(head, rows)


def main(argv: Optional[List[str]] = None) -> None:
  args = parse_args(argv)
  machine = _presets.cpu_info()
  results: Dict[str, Dict[str, Any]] = {}
  with tempfile.TemporaryDirectory(prefix="cai_jax_bench_cache_") as tmp:
    cache = os.path.join(tmp, "xla")
    for name in RUNS:
      workdir = os.path.join(tmp, name)
      os.makedirs(workdir)
      print(f"compile_cache: {name} run ...", file=sys.stderr, flush=True)
      results[name] = run_pipeline(args.gin_file, args.binding,
                                   "none" if name == "off" else cache, workdir)
    entries = [n for n in os.listdir(cache) if n.endswith("-cache")]
    size = sum(os.path.getsize(os.path.join(cache, n)) for n in entries)
  machine["loadavg_at_start"], machine["loadavg_at_end"] = (machine.pop("loadavg_1_5_15"),
                                                            _presets.cpu_info()["loadavg_1_5_15"])
  print(f"pipeline: {os.path.relpath(args.gin_file, REPO)} {' '.join(args.binding)}".rstrip())
  print(_presets.machine_line(machine))
  print(f"cache after the warm run: {len(entries)} executables, {size / 2**20:.1f} MiB")
  print(table(results))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"machine": machine, "gin_file": args.gin_file, "bindings": args.binding,
                 "results": results, "entries": len(entries), "bytes": size}, f, indent=1)


if __name__ == "__main__":
  main()

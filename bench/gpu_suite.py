"""The GPU bench suite: train_step, sample, ppo_step and score in one call, one combined table.

Runs the bench scripts one after another at the shapes the project's GPU targets name
(tinyllama_1b in bfloat16 on one device), each with ``--json``, keeps every script's output
under ``--out``, and prints one table that puts cai_jax beside the transformers peer each
script measured in the same run:

  train_step  --preset tinyllama_1b --batch 8 --seq 2048 --remat full (attention: the default,
              cuDNN's fused causal kernel on a GPU in bfloat16)
  sample      --preset tinyllama_1b --dtype bfloat16 --device gpu --batch_sizes 1,32
              --max_new_tokens 64
  ppo_step    --preset tinyllama_1b --dtype bfloat16 --rollout_batch 64 --prompt_len 64
              --max_new_tokens 128 --epochs 4 --minibatches 4 (no peer: no ratio)
  train_step_xla  bench/train_step.py as train_step with --attention xla --no-peer: XLA's
              dense-mask attention instead of the fused kernel; its ratio is against
              train_step's peer, and its final loss must match train_step's
  train_step_noremat  bench/train_step.py as train_step with --remat none (both sides:
              transformers without gradient checkpointing): no recomputed forward pass,
              which fits in memory now that the fused kernel keeps no [T, T] scores; its
              final loss must match train_step's
  score       --preset tinyllama_1b --dtype bfloat16 --device gpu (continuation scoring:
              feedback labels, few-shot prefix, PPO log-probs)
  sample_scan_decode  sample with --no-unroll_decode --no-peer: the decode loop scans the
              stacked layers (each step slices every layer's weights out of them) instead of
              running them unrolled over slices made once per batch (sample's default on a GPU)
  sample_cmdbuf    sample with --no-peer under XLA_FLAGS=--xla_gpu_enable_command_buffer=
              FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE (the decode loop
              in CUDA graphs)
  sample_pallas    sample with --decode_attention pallas --no-peer: each decode step's
              attention as one Pallas kernel per layer that reads the stacked KV cache in
              place (ModelConfig.decode_attention); the three decode variants are compared
              with sample's peer

``--quick`` runs the same scripts on the `tiny` preset with tiny shapes (a smoke test of the
suite, about a minute and a half on a 2-core CPU). Per bench, ``--out`` holds NAME.json (the
script's JSON line), NAME.log (its stderr); then suite.json (commands, exit codes, seconds, every
result) and summary.md (the table). The exit status is 1 when a bench failed or printed no
JSON, else 0.

  bash bench/gpu.sh                          # the full suite (GPU machine)
  bash bench/gpu.sh --quick --out /tmp/b     # tiny smoke test, any machine
  bash bench/gpu.sh --dry-run                # print the commands only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from cai_jax.stages.pipeline import last_json_line  # noqa: E402  (no jax import)
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import _presets  # noqa: E402  (no jax import)
NAMES = ("train_step", "sample", "ppo_step", "train_step_xla", "train_step_noremat", "score",
         "sample_scan_decode", "sample_cmdbuf", "sample_pallas")
SCRIPTS = {"train_step": "train_step", "sample": "sample", "ppo_step": "ppo_step",
           "train_step_xla": "train_step", "train_step_noremat": "train_step", "score": "score",
           "sample_scan_decode": "sample", "sample_cmdbuf": "sample",
           "sample_pallas": "sample"}   # bench name -> bench/<script>.py
# Extra environment of a bench (on top of child_env).
COMMAND_BUFFERS = ("--xla_gpu_enable_command_buffer="
                   "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE")
EXTRA_ENV = {"sample_cmdbuf": {"XLA_FLAGS": COMMAND_BUFFERS}}

# The project's GPU targets (bench/RESULTS.md): ratios are cai_jax / transformers tokens/s.
TRAIN_RATIO_TARGET = 1.5
SAMPLE_DECODE_MS_TARGET = 2.0
SAMPLE_BATCH32_RATIO_TARGET = 20.0


class Bench(NamedTuple):
  name: str
  argv: List[str]   # run with cwd = the repository root
  device: str       # 'gpu' or 'cpu': the children's JAX_PLATFORMS / CUDA_VISIBLE_DEVICES
  env: Dict[str, str] = {}   # extra environment (EXTRA_ENV)


def bench_commands(quick: bool, device: str, python: str = "python3",
                   only: Sequence[str] = NAMES) -> List[Bench]:
  """The suite's command lines, in run order.

  Args:
    quick: tiny preset and shapes instead of the tinyllama_1b GPU shapes.
    device: 'gpu' or 'cpu' (sample's --device; on 'cpu' the other two are kept off the GPU
      through the environment, see ``child_env``).
    python: the interpreter of every script.
    only: the benches to run (a subset of NAMES).
  """
  if quick:
    # On a GPU in bfloat16 the tiny train step takes cuDNN's fused attention by default.
    gpu16 = ["--dtype", "bfloat16"] if device == "gpu" else []
    args = {
        "train_step": ["--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "2",
                       "--warmup", "1"] + gpu16,
        "sample": ["--preset", "tiny", "--device", device, "--batch_sizes", "1,2",
                   "--max_new_tokens", "8", "--prompt_len", "8", "--repeats", "1"],
        "ppo_step": ["--preset", "tiny", "--rollout_batch", "2", "--prompt_len", "8",
                     "--max_new_tokens", "8", "--epochs", "1", "--minibatches", "1",
                     "--iterations", "1"],
        "train_step_xla": ["--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "2",
                           "--warmup", "1", "--no-peer", "--attention", "xla"] + gpu16,
        "train_step_noremat": ["--preset", "tiny", "--batch", "2", "--seq", "32", "--steps",
                               "2", "--warmup", "1", "--no-peer", "--remat", "none"] + gpu16,
        "score": ["--preset", "tiny", "--device", device, "--rows", "4", "--repeats", "1"],
    }
  else:
    args = {
        "train_step": ["--preset", "tinyllama_1b", "--batch", "8", "--seq", "2048", "--remat",
                       "full"],
        "sample": ["--preset", "tinyllama_1b", "--dtype", "bfloat16", "--device", device,
                   "--batch_sizes", "1,32", "--max_new_tokens", "64"],
        "ppo_step": ["--preset", "tinyllama_1b", "--dtype", "bfloat16", "--rollout_batch", "64",
                     "--prompt_len", "64", "--max_new_tokens", "128", "--epochs", "4",
                     "--minibatches", "4"],
        "train_step_xla": ["--preset", "tinyllama_1b", "--batch", "8", "--seq", "2048",
                           "--remat", "full", "--attention", "xla", "--no-peer"],
        "train_step_noremat": ["--preset", "tinyllama_1b", "--batch", "8", "--seq", "2048",
                               "--remat", "none"],
        "score": ["--preset", "tinyllama_1b", "--dtype", "bfloat16", "--device", device],
    }
  args["sample_scan_decode"] = args["sample"] + ["--no-unroll_decode", "--no-peer"]
  args["sample_cmdbuf"] = args["sample"] + ["--no-peer"]
  args["sample_pallas"] = args["sample"] + ["--decode_attention", "pallas", "--no-peer"]
  unknown = [n for n in only if n not in NAMES]
  if unknown:
    raise ValueError(f"--only: unknown bench {unknown[0]!r}; one of {', '.join(NAMES)}")
  return [Bench(n, [python, f"bench/{SCRIPTS[n]}.py", *args[n], "--json"], device,
                EXTRA_ENV.get(n, {}))
          for n in NAMES if n in only]


def child_env(device: str, environ: Optional[Dict[str, str]] = None,
              extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """The environment of a bench process: the repository on PYTHONPATH; on 'cpu' no GPU;
  `extra` on top (its XLA_FLAGS after any XLA_FLAGS already set)."""
  env = dict(os.environ if environ is None else environ)
  paths = [REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  env["PYTHONPATH"] = os.pathsep.join(paths)
  env["PYTHONUNBUFFERED"] = "1"
  if device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  for key, value in (extra or {}).items():
    env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
  return env


# ----------------------------------------------------------------------------- the table


def _num(x: Optional[float], fmt: str = ",.1f", suffix: str = "") -> str:
  return "n/a" if x is None else format(x, fmt) + suffix


def _pct(fraction: Optional[float]) -> str:
  return _num(None if fraction is None else fraction * 100, ".1f", " %")


def _ratio(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{x:.2f}x"


def _throughput_ratio(ratio: Optional[float], ours: dict, peer: dict) -> Optional[float]:
  """`ratio` as the script reported it, else ours / peer tokens/s where both are known (a
  run without a peer compared with another bench's peer)."""
  if ratio is None and peer.get("tokens_per_s") and ours.get("tokens_per_s"):
    return ours["tokens_per_s"] / peer["tokens_per_s"]
  return ratio


def _met(ok: Optional[bool]) -> str:
  return "" if ok is None else ("yes" if ok else "no")


def _train_rows(r: dict, targets: bool, name: str = "train_step",
                fallback_peer: Optional[dict] = None) -> List[List[str]]:
  """Rows of one train_step.py result; a run without a peer (--no-peer) is compared with
  `fallback_peer` (train_step's peer, same shape, same run) when given."""
  ours, peer = r.get("ours") or {}, r.get("peer") or fallback_peer or {}
  setting = (f"{r['preset']} {r['batch']}x{r['seq']}, remat {ours.get('remat', '?')}, "
             f"{ours.get('dtype', '?')}")
  attention = str(ours.get("attention", ""))
  if attention.startswith("cudnn"):
    setting += ", cudnn attention"
  elif attention.startswith("xla"):
    setting += ", XLA attention"
  if "error" in ours:
    return [[name, setting, "tokens/s", f"error: {ours['error']}",
             _num(peer.get("tokens_per_s")), "n/a", "", ""]]
  ratio = _throughput_ratio(r.get("ratio"), ours, peer)
  target = f">= {TRAIN_RATIO_TARGET:g}x" if targets else ""
  met = _met(ratio >= TRAIN_RATIO_TARGET) if targets and ratio is not None else ""
  peer_tps = (f"error: {peer['error']}" if "error" in peer else _num(peer.get("tokens_per_s")))
  rows = [[name, setting, "tokens/s", _num(ours.get("tokens_per_s")), peer_tps,
           _ratio(ratio), target, met],
          [name, setting, "step s (median)", _num(ours.get("step_s"), ".4f"),
           _num(peer.get("step_s"), ".4f"), "", "", ""]]
  if ours.get("mfu") is not None or peer.get("mfu") is not None:
    rows.append([name, setting, "MFU", _pct(ours.get("mfu")), _pct(peer.get("mfu")),
                 "", "", ""])
  return rows


LOSS_AGREEMENT = 0.05   # |final loss - train_step's|: same data and init, bf16 noise only


def _loss_check_row(r: dict, base: dict, name: str) -> List[List[str]]:
  """A variant's final loss beside train_step's (same shape, data and init): a check that
  the variant computes the same model, e.g. cuDNN's fused attention against XLA's."""
  ours, theirs = (r.get("ours") or {}).get("final_loss"), (base.get("ours") or {}).get("final_loss")
  if ours is None or theirs is None:
    return []
  return [[name, "same data and init as train_step", "final loss", _num(ours, ".4f"), "", "",
           f"train_step {theirs:.4f} +- {LOSS_AGREEMENT:g}",
           _met(abs(ours - theirs) <= LOSS_AGREEMENT)]]


SAMPLE_VARIANTS = {"sample_scan_decode": "scanned decode loop",
                   "sample_cmdbuf": "command buffers",
                   "sample_pallas": "pallas decode attention"}


def _sample_rows(r: dict, targets: bool, name: str = "sample",
                 fallback_peer: Optional[dict] = None) -> List[List[str]]:
  """Rows of one sample.py result; a run without a peer (--no-peer, the decode variants)
  is compared with `fallback_peer` (sample's peer summary, same shape, same run) when given."""
  summary = r.get("summary") or {}
  ours, peer = summary.get("ours") or {}, summary.get("peer") or fallback_peer or {}
  ratios = r.get("ratio") or {}
  base = f"{r['dtype']}, N {r['max_new_tokens']}"
  if name in SAMPLE_VARIANTS:
    base += f", {SAMPLE_VARIANTS[name]}"
  rows = []
  for b in r["batch_sizes"]:
    o, p, key = ours.get(str(b), {}), peer.get(str(b), {}), str(b)
    setting = f"batch {b}, {base}"
    ratio = _throughput_ratio(ratios.get(key), o, p)
    target, met = "", ""
    if targets and b == 32:
      target = f">= {SAMPLE_BATCH32_RATIO_TARGET:g}x"
      met = _met(ratio >= SAMPLE_BATCH32_RATIO_TARGET) if ratio is not None else ""
    rows.append([name, setting, "tokens/s", _num(o.get("tokens_per_s")),
                 _num(p.get("tokens_per_s")), _ratio(ratio), target, met])
    o_ms, p_ms = _decode_ms(o), _decode_ms(p)
    target, met = "", ""
    if targets and b == 1:
      target = f"<= {SAMPLE_DECODE_MS_TARGET:g} ms"
      met = _met(o_ms <= SAMPLE_DECODE_MS_TARGET) if o_ms is not None else ""
    rows.append([name, setting, "decode ms/step", _decode_text(o, o_ms), _decode_text(p, p_ms),
                 _ratio(p_ms / o_ms if o_ms and p_ms else None), target, met])
  roof = (r.get("roofline") or {}).get("ms_per_step")
  if roof is not None and name not in SAMPLE_VARIANTS:
    rows.append([name, f"batch 1, {base}", "HBM roofline ms/step", _num(roof, ".3f"), "", "",
                 "", ""])
  agree = r.get("agreement") or {}
  if agree.get("checked"):
    rows.append([name, f"batch 1, first {agree.get('check_tokens')} ids", "greedy ids agree",
                 _agreement_text(agree), "", "", "", ""])
  check = (r.get("ours") or {}).get("attention_check") or {}
  if check.get("checked"):
    text = (_agreement_text(check) + ", max abs(d log p) "
            f"{check.get('max_abs_logprob_diff', float('nan')):.1e}")
    rows.append([name, f"batch 1, first {check.get('check_tokens')} ids",
                 "greedy ids agree with XLA attention", text, "", "", "", ""])
  return rows


def _decode_ms(row: dict) -> Optional[float]:
  """A sample.py summary row's decode ms/step; None when missing or not positive (a
  difference of two medians that noise inverted, from a sample.py that printed those)."""
  ms = row.get("decode_ms_per_step")
  return ms if ms is not None and ms > 0 else None


def _decode_text(row: dict, ms: Optional[float]) -> str:
  """The decode ms/step cell: the value, 'n/a (noise)' where sample.py found the timing
  difference not significant (or it is not positive), else 'n/a'."""
  if ms is not None:
    return _num(ms, ".3f")
  noisy = row.get("decode_note") or row.get("decode_ms_per_step") is not None
  return "n/a (noise)" if noisy else "n/a"


def _agreement_text(agree: dict) -> str:
  """'yes' / 'no' and the first divergence of bench/sample.py's greedy-id agreement."""
  div = agree.get("first_divergence")
  text = "yes" if agree.get("agree_first") else "no"
  return text + (f" (first divergence at {div})" if div is not None else " (no divergence)")


def _score_rows(r: dict) -> List[List[str]]:
  """Rows of one score.py result: tokens/s per case, then the largest log-prob difference
  between the two sides against the script's tolerance."""
  rows = []
  for case in r.get("cases_run", []):
    c = (r.get("cases") or {}).get(case, {})
    setting = (f"{case}, {r['dtype']}, {c.get('rows', '?')} rows x "
               f"{c.get('prompt_len_max', '?')}+{c.get('continuation_len', '?')} tokens")
    rows.append(["score", setting, "tokens/s", _num(c.get("ours_tokens_per_s")),
                 _num(c.get("peer_tokens_per_s")), _ratio(c.get("ratio")), "", ""])
  worst, tol = r.get("max_abs_diff"), r.get("tolerance")
  if worst is not None:
    rows.append(["score", f"all cases, {r['dtype']}", "max |d log p|", f"{worst:.2e}", "", "",
                 f"<= {tol:g}", _met(worst <= tol)])
  return rows


def _ppo_rows(r: dict) -> List[List[str]]:
  setting = (f"{r['preset']} {r['dtype']}, B {r['rollout_batch']}, P {r['prompt_len']}, "
             f"N {r['max_new_tokens']}, K {r['ppo']['epochs']}, M {r['ppo']['minibatches']}")
  med, share = r.get("median_s") or {}, r.get("share") or {}
  rows = [["ppo_step", setting, f"{phase} s (share)",
           f"{_num(med.get(phase), '.3f')} ({_pct(share.get(phase))})",
           "no peer", "", "", ""] for phase in ("rollout", "scoring", "update")]
  rows.append(["ppo_step", setting, "iteration s", _num(r.get("iteration_median_s"), ".3f"),
               "no peer", "", "", ""])
  rows.append(["ppo_step", setting, "rollout tokens/s", _num(r.get("rollout_tokens_per_s")),
               "no peer", "", "", ""])
  return rows


def summary_rows(results: Dict[str, Dict[str, Any]], targets: bool) -> List[List[str]]:
  """Rows of the combined table: bench, setting, metric, cai_jax, transformers, speed-up,
  target, met.

  Args:
    results: {bench name: {'exit_code': int, 'result': the script's JSON dict or None,
      'log': path}} for the benches that ran, in run order.
    targets: add the project's GPU targets (the full suite; not --quick).
  Speed-up is cai_jax / transformers for throughputs and transformers / cai_jax for times.
  """
  rows: List[List[str]] = []
  for name, res in results.items():
    r = res.get("result")
    if res.get("exit_code") != 0 or r is None:
      why = f"exit {res.get('exit_code')}" + ("" if r is not None else ", no JSON")
      rows.append([name, f"see {res.get('log')}", "failed", why, "", "", "", ""])
    elif SCRIPTS[name] == "train_step":
      base = (results.get("train_step") or {}).get("result") or {}
      same_shape = all(base.get(k) == r.get(k) for k in ("preset", "batch", "seq"))
      rows += _train_rows(r, targets, name, base.get("peer") if same_shape else None)
      if name != "train_step" and same_shape:
        rows += _loss_check_row(r, base, name)
    elif SCRIPTS[name] == "sample":
      base = (results.get("sample") or {}).get("result") or {}
      same_shape = all(base.get(k) == r.get(k) for k in ("dtype", "max_new_tokens",
                                                          "batch_sizes"))
      fallback = (base.get("summary") or {}).get("peer") if same_shape else None
      rows += _sample_rows(r, targets, name, fallback)
    elif name == "score":
      rows += _score_rows(r)
    else:
      rows += _ppo_rows(r)
  return rows


HEADER = ["bench", "setting", "metric", "cai_jax", "transformers", "speed-up", "target", "met"]


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
  """A padded Markdown table of the suite's rows."""
  return _presets.markdown_table(header, rows)


# ----------------------------------------------------------------------------- running


def _pump(stream, sinks) -> None:
  for line in iter(stream.readline, ""):
    for sink in sinks:
      sink.write(line)
      sink.flush()
  stream.close()


def run_bench(bench: Bench, out_dir: str, timeout: Optional[float]) -> Dict[str, Any]:
  """Runs one bench script: stderr streamed to ours and to NAME.log, stdout to NAME.json."""
  log_path = os.path.join(out_dir, f"{bench.name}.log")
  print(f"[gpu_suite] {bench.name}: {shlex.join(bench.argv)}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(bench.argv, cwd=REPO_ROOT, env=child_env(bench.device, extra=bench.env),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    chunks: List[str] = []
    err = threading.Thread(target=_pump, args=(proc.stderr, [log, sys.stderr]), daemon=True)
    out = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    err.start()
    out.start()
    timed_out = False
    try:
      code = proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, signal.SIGKILL)  # the bench and the child processes it started
      code = proc.wait()
    out.join()
    err.join()
  stdout = "".join(chunks)
  with open(os.path.join(out_dir, f"{bench.name}.json"), "w", encoding="utf-8") as f:
    f.write(stdout)
  seconds = time.perf_counter() - t0
  if timed_out:
    print(f"[gpu_suite] {bench.name}: killed after {timeout:g} s", file=sys.stderr)
  print(f"[gpu_suite] {bench.name}: exit {code} after {seconds:.1f} s", file=sys.stderr, flush=True)
  return {"argv": bench.argv, "exit_code": code, "timed_out": timed_out,
          "seconds": round(seconds, 3), "log": log_path, "result": last_json_line(stdout) or None}


def _gpu_names() -> List[str]:
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--quick", action="store_true", help="tiny preset and shapes (smoke test)")
  p.add_argument("--out", default=os.path.join("runs", "bench_gpu"),
                 help="directory of the logs, JSON and summary (default runs/bench_gpu, "
                 "relative to the repository root)")
  p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                 help="auto: gpu for the full suite, cpu with --quick")
  p.add_argument("--only", default=",".join(NAMES), help="comma-separated subset of "
                 f"{','.join(NAMES)}")
  p.add_argument("--timeout", type=float, default=0, help="seconds per bench before it is "
                 "killed (0: no limit)")
  p.add_argument("--python", default=sys.executable, help="interpreter of the bench scripts")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands, prefixed '+ ', and run nothing")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  device = args.device if args.device != "auto" else ("cpu" if args.quick else "gpu")
  try:
    benches = bench_commands(args.quick, device, args.python,
                             [n.strip() for n in args.only.split(",") if n.strip()])
  except ValueError as e:
    print(f"gpu_suite: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for b in benches:
      # What child_env sets beyond the repository on PYTHONPATH and unbuffered output.
      shown = child_env(b.device, environ={}, extra=b.env)
      env = "".join(f" {k}={shlex.quote(v) if v else ''}" for k, v in shown.items()
                    if k not in ("PYTHONPATH", "PYTHONUNBUFFERED"))
      print(f"+{env} {shlex.join(b.argv)}")
    return 0
  out_dir = os.path.join(REPO_ROOT, args.out) if not os.path.isabs(args.out) else args.out
  os.makedirs(out_dir, exist_ok=True)
  machine = {"platform": platform.platform(), "python": platform.python_version(),
             "gpus": _gpu_names(), "device": device, "quick": args.quick}
  results: Dict[str, Dict[str, Any]] = {}
  for bench in benches:
    results[bench.name] = run_bench(bench, out_dir, args.timeout)
    with open(os.path.join(out_dir, "suite.json"), "w", encoding="utf-8") as f:
      json.dump({"machine": machine, "benches": results}, f, indent=1)
  table = markdown_table(summary_rows(results, targets=not args.quick))
  gpus = "; ".join(machine["gpus"]) or "no nvidia-smi GPU"
  text = (f"GPU bench suite ({'quick, tiny preset' if args.quick else 'tinyllama_1b'}; "
          f"device {device}; {gpus}; Python {machine['python']})\n\n{table}\n\n"
          "speed-up: cai_jax / transformers for throughputs, transformers / cai_jax for times; "
          f"logs and JSON in {out_dir}\n")
  with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print("\n" + text)
  ok = all(r["exit_code"] == 0 and r["result"] is not None for r in results.values())
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

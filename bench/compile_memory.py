"""Per-device memory of the sharded train step, from a compile on fake devices.

Builds the abstract TrainState of a model preset (jax.eval_shape; no weight is
ever allocated), its NamedShardings from the logical-axis rules
(cai_jax.sharding.logical_shardings) on a data x fsdp x tensor mesh of
`--devices` fake host devices, lowers and compiles the jitted train step of
cai_jax.steps with ShapeDtypeStruct inputs that carry those shardings, and
prints:

  * XLA's per-device buffer sizes from compiled.memory_analysis(): arguments,
    outputs, aliased (donated) bytes, temporaries, generated code, and their
    total (argument + output - alias + temp + code);
  * the per-device share of parameters and optimizer state computed from the
    shardings alone (what FSDP / tensor parallelism leaves on one chip);
  * whether the total fits `--hbm_gib` of device memory.

The compile uses the host (CPU) XLA backend with
--xla_force_host_platform_device_count, so fusion and buffer assignment are the
CPU compiler's: argument and output sizes are exact, temporaries are an
estimate of what a TPU or GPU compile would need. The CPU backend widens bf16
arithmetic to f32 and can keep f32 copies of large bf16 buffers (for a scanned
decoder, of the stacked per-layer activations saved for the backward pass);
`--top_buffers N` lists the largest temporaries so such copies can be told
apart from what the model itself needs.

  python bench/compile_memory.py --preset 52b --devices 256 --mesh 1,32,8 --rules fsdp_tp \\
      --batch 256 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import glob
import re
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402  (no jax import: XLA_FLAGS must be set first)

_REMAT_CHOICES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")
_HBM_DEFAULTS = (("TPU v5p", "v5p-2"), ("H100", "h100x1"))   # (label, topology of cai_jax.plan)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="52b",
                 help=f"model preset name in gin/models or a .gin path (one of {_presets.available()})")
  p.add_argument("--devices", type=int, default=256, help="number of fake host devices (mesh size)")
  p.add_argument("--mesh", default="1,32,8",
                 help="data,fsdp,tensor mesh dims; -1 takes the remaining devices (default 1,32,8)")
  p.add_argument("--rules", default="fsdp_tp", choices=("dp", "fsdp", "fsdp_tp"),
                 help="logical-axis rule preset of cai_jax.sharding")
  p.add_argument("--batch", type=int, default=256, help="global batch size (sequences per step)")
  p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
  p.add_argument("--microbatches", type=int, default=1, help="gradient-accumulation microbatches per step")
  p.add_argument("--remat", default=None, choices=_REMAT_CHOICES,
                 help="rematerialisation policy (default: the preset's)")
  p.add_argument("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
                 help="decoder blocks under nn.scan (default: the preset's, on)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute dtype (default: the preset's)")
  p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"),
                 help="parameter / optimizer-state dtype (default: the preset's)")
  p.add_argument("--hbm_gib", type=float, default=None,
                 help="device memory to check against, GiB (default: both 95 = TPU v5p and 80 = H100)")
  p.add_argument("--top_buffers", type=int, default=0,
                 help="also list the N largest temporaries of XLA's buffer assignment (dumps the "
                      "compiled HLO to a temporary directory, read and then deleted)")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
  args = p.parse_args(argv)
  args.mesh_dims = _presets.parse_mesh(p, args.mesh)
  return args


_log = _presets.logger("compile_memory")


def _gib(n: float) -> float:
  return n / 2**30


def _size(n: float) -> str:
  """Bytes as GiB, or MiB below 1 GiB."""
  return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _rss_gib() -> float:
  """Peak resident memory of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _top_temporaries(dump_dir: str, n: int) -> List[Dict[str, Any]]:
  """The n largest values XLA placed in temporary allocations of the train step.

  Reads the `*after_optimizations-buffer-assignment.txt` file of the jit_step module;
  values of one allocation may share memory (disjoint live ranges), so the list
  shows what is big, not a sum. Empty if the dump format is not recognised.
  """
  files = glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations-buffer-assignment.txt"))
  if not files:
    return []
  header = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
  value = re.compile(r"^\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
  found, in_temp = {}, False
  with open(max(files, key=os.path.getsize), encoding="utf-8") as f:
    for line in f:
      h = header.match(line)
      if h:
        in_temp = "temp" in h.group(3)
        continue
      v = value.match(line)
      if in_temp and v:
        name, size, shape = v.group(1), int(v.group(2)), v.group(4)
        found[name] = {"name": name, "bytes": size, "shape": shape}
  return sorted(found.values(), key=lambda r: -r["bytes"])[:n]


def main(argv: Optional[List[str]] = None) -> None:
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  dump_dir = None
  if args.top_buffers:
    dump_dir = tempfile.mkdtemp(prefix="compile_memory_")
    os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=jit_step"
  os.environ["JAX_PLATFORMS"] = "cpu"
  t_start = time.perf_counter()

  _presets.ensure_repo_on_path()
  import jax
  import jax.numpy as jnp

  from cai_jax import checkpoints, plan, sharding, steps
  from cai_jax.configs import MeshConfig, OptimizerConfig

  devices = jax.devices()
  if len(devices) < args.devices:
    raise SystemExit(f"asked for {args.devices} devices, JAX sees {len(devices)} "
                     "(was jax imported before XLA_FLAGS was set?)")
  devices = devices[:args.devices]
  preset_fields = _presets.load_fields(args.preset)
  cfg = _presets.model_config(
      args.preset, remat_policy=args.remat, scan_layers=args.scan_layers, dtype=args.dtype,
      param_dtype=args.param_dtype, max_seq_len=max(preset_fields.get("max_seq_len", 0), args.seq))
  rules = sharding.rules_for(args.rules)
  data, fsdp, tensor = args.mesh_dims
  mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=args.rules), devices)
  _log(f"jax {jax.__version__}, {len(devices)} fake {devices[0].platform} devices, mesh {dict(mesh.shape)}, "
       f"rules {args.rules}; preset {args.preset}: {cfg.param_count():,} params, dtype {cfg.dtype}, "
       f"param_dtype {cfg.param_dtype}, remat {cfg.remat_policy}, scan {cfg.scan_layers}")

  tx = steps.make_optimizer(OptimizerConfig())
  timings = {}
  t0 = time.perf_counter()
  state_in = checkpoints.abstract_train_state(cfg, tx, mesh, rules)
  state_sh = checkpoints.shardings_of(state_in)
  timings["eval_shape_s"] = time.perf_counter() - t0

  shape = (args.batch, args.seq)
  batch_in, batch_sh = plan.batch_structs(
      mesh, rules, {"tokens": (shape, jnp.int32), "mask": (shape, jnp.bool_),
                    "loss_mask": (shape, jnp.bool_)})

  params_bytes = plan.shard_bytes(state_in.params)
  opt_bytes = plan.shard_bytes(state_in.opt_state)

  step_fn = steps.make_train_step(cfg, tx, steps.lr_schedule(OptimizerConfig()), args.microbatches)
  jitted = steps.jit_train_step(step_fn, state_sh, batch_sh)
  with sharding.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    lowered = jitted.lower(state_in, batch_in)
    timings["lower_s"] = time.perf_counter() - t0
    _log(f"lowered in {timings['lower_s']:.1f} s; compiling")
    t0 = time.perf_counter()
    compiled = lowered.compile()
    timings["compile_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - t_start
  _log(f"compiled in {timings['compile_s']:.1f} s")

  xla = plan.xla_memory(compiled)

  top = []
  if dump_dir:
    top = _top_temporaries(dump_dir, args.top_buffers)
    shutil.rmtree(dump_dir, ignore_errors=True)

  limits = (("--hbm_gib", args.hbm_gib),) if args.hbm_gib else tuple(
      (label, plan.parse_topology(name).hbm_gib) for label, name in _HBM_DEFAULTS)
  fits = {name: {"hbm_gib": gib, "fits": _gib(xla["total_bytes"]) <= gib} for name, gib in limits}
  tokens = args.batch * args.seq
  out = {
      "bench": "compile_memory", "preset": args.preset, "params": cfg.param_count(),
      "devices": len(devices), "mesh": dict(mesh.shape), "rules": args.rules,
      "batch": args.batch, "seq": args.seq, "microbatches": args.microbatches,
      "per_device_batch": args.batch // (data * mesh.shape["fsdp"]) if args.batch else None,
      "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat_policy,
      "scan_layers": cfg.scan_layers, "jax": jax.__version__,
      "xla_memory": xla, "params_bytes": params_bytes, "opt_state_bytes": opt_bytes,
      "fits": fits, "top_temporaries": top, "timings": timings, "host_peak_rss_gib": _rss_gib(), "tokens_per_step": tokens,
  }
  if args.json:
    print(json.dumps(out))
    return

  print(f"compile_memory: preset {args.preset} ({cfg.param_count():,} params), "
        f"{len(devices)} fake CPU devices, mesh {dict(mesh.shape)}, rules {args.rules}")
  print(f"batch {args.batch} x seq {args.seq} ({tokens:,} tokens/step, {args.microbatches} microbatch(es)), "
        f"dtype {cfg.dtype}, param_dtype {cfg.param_dtype}, remat {cfg.remat_policy}, "
        f"scan_layers {cfg.scan_layers}, jax {jax.__version__}")
  print()
  print("| per device (XLA memory_analysis) | size |")
  print("|---|---|")
  names = {"argument_size_in_bytes": "arguments", "output_size_in_bytes": "outputs",
           "alias_size_in_bytes": "aliased (donated, counted once)", "temp_size_in_bytes": "temporaries",
           "generated_code_size_in_bytes": "generated code"}
  for f in plan.XLA_FIELDS:
    print(f"| {names[f]} | {_size(xla[f])} |")
  print(f"| **total** = arg + out - alias + temp + code | **{_size(xla['total_bytes'])}** |")
  print()
  print("| from the shardings | global | per device |")
  print("|---|---|---|")
  print(f"| parameters ({cfg.param_dtype}) | {_size(params_bytes['global'])} | "
        f"{_size(params_bytes['per_device'])} |")
  print(f"| optimizer state | {_size(opt_bytes['global'])} | {_size(opt_bytes['per_device'])} |")
  print()
  if top:
    print("| largest temporaries (may share memory) | shape | size |")
    print("|---|---|---|")
    for r in top:
      print(f"| {r['name']} | {r['shape']} | {_size(r['bytes'])} |")
    print()
  for name, r in fits.items():
    verdict = "fits" if r["fits"] else "does NOT fit"
    print(f"{_size(xla['total_bytes'])} per device {verdict} in {r['hbm_gib']:g} GiB ({name})")
  print(f"time: eval_shape+shardings {timings['eval_shape_s']:.1f} s, lower {timings['lower_s']:.1f} s, "
        f"compile {timings['compile_s']:.1f} s, total {timings['total_s']:.1f} s; "
        f"host peak RSS {_rss_gib():.2f} GiB")


if __name__ == "__main__":
  main()

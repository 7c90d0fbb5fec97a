"""Training-step throughput of the cai_jax decoder against Hugging Face transformers.

Runs the jitted LM train step of ``cai_jax.steps`` (AdamW + global-norm clipping,
sharded init, donated state) on random tokens for a model preset from
``gin/models``, and the same step for ``transformers.LlamaForCausalLM`` of the same
shape in torch (SDPA attention, fused AdamW on CUDA, the same clipping and Adam
hyper-parameters), then prints tokens/s, median step time, model TFLOP/s, MFU and
the ratio of the two throughputs.

Each side runs in its own child process (JAX first, then torch), so neither
framework's memory pool sees the other's. Defaults depend on the accelerator JAX
finds: on a GPU or TPU ``--preset tinyllama_1b --batch 8 --seq 2048``, on CPU the
smaller ``--preset smollm2_135m --batch 2 --seq 256``.

  python bench/train_step.py                              # defaults for this machine
  python bench/train_step.py --preset tinyllama_1b --batch 8 --seq 2048 --steps 20
  python bench/train_step.py --no-peer --remat full --microbatches 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402

_ACCEL_DEFAULTS = dict(preset="tinyllama_1b", batch=8, seq=2048, steps=10, warmup=3)
_CPU_DEFAULTS = dict(preset="smollm2_135m", batch=2, seq=256, steps=3, warmup=1)
_REMAT_CHOICES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__,
      epilog=("Model FLOPs per token = 6*N + 12*L*T*H*Dh (N = all parameters incl. embeddings, "
              "L layers, T = --seq, H*Dh = attention width; full T x T attention, remat "
              "recomputation not counted). MFU = tokens/s * FLOPs/token / peak, with the peak "
              "from a table of dense bf16 figures keyed by device kind (H100/H200 SXM 989, "
              "A100 312 TFLOP/s) or --peak_tflops; on CPU MFU is n/a unless --peak_tflops is "
              "given. Both sides train on B x T random tokens with loss on every position; "
              "tokens/s counts B*T per step."),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None,
                 help=f"model preset name in gin/models or a .gin path (one of {_presets.available()}); "
                      f"default {_ACCEL_DEFAULTS['preset']} on GPU/TPU, {_CPU_DEFAULTS['preset']} on CPU")
  p.add_argument("--batch", type=int, default=None, help="global batch size (sequences per step)")
  p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=None, help="timed steps (median is reported)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps run after compilation")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute dtype (default: the preset's); the torch side autocasts to it")
  p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"),
                 help="parameter / optimizer-state dtype (default: the preset's, float32)")
  p.add_argument("--remat", default=None, choices=_REMAT_CHOICES,
                 help="rematerialisation policy of the decoder blocks (default: the preset's); "
                      "any policy other than none turns on transformers' gradient checkpointing "
                      "(whole layers) on the torch side")
  p.add_argument("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
                 help="run the decoder blocks under nn.scan (default: the preset's, on)")
  p.add_argument("--attention", default="preset", choices=("preset", "xla", "cudnn"),
                 help="jax.nn.dot_product_attention implementation (default: the preset's, "
                      "which on a GPU in 16-bit is cuDNN's fused causal kernel; 'xla' for the "
                      "dense-mask path)")
  p.add_argument("--microbatches", type=int, default=1,
                 help="gradient-accumulation microbatches per step (cai_jax side only)")
  p.add_argument("--mesh", default="1,-1,1",
                 help="data,fsdp,tensor mesh dims; -1 takes the remaining devices (default 1,-1,1)")
  p.add_argument("--rules", default="fsdp", choices=("dp", "fsdp", "fsdp_tp"),
                 help="logical-axis rule preset of cai_jax.sharding")
  p.add_argument("--num_devices", type=int, default=0,
                 help="use the first N devices for the mesh (default 0 = all)")
  p.add_argument("--host_devices", type=int, default=0,
                 help="CPU only: fake this many host devices (XLA_FLAGS) to try a multi-device mesh")
  p.add_argument("--peer", default=True, action=argparse.BooleanOptionalAction,
                 help="also time transformers' LlamaForCausalLM of the same shape (default on)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s per device for MFU (default: from the device-kind table)")
  p.add_argument("--seed", type=int, default=0, help="seed of the init and of the random tokens")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  p.add_argument("--role", default="all", choices=("all", "ours", "peer"), help=argparse.SUPPRESS)
  p.add_argument("--peer_config", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.mesh_dims = _presets.parse_mesh(p, args.mesh)
  return args


_log = _presets.logger("train_step")


def _resolve_defaults(args: argparse.Namespace, accelerator: bool) -> None:
  _presets.fill_defaults(args, _ACCEL_DEFAULTS if accelerator else _CPU_DEFAULTS)


def _timed(run_step, sync, warmup: int, steps: int) -> List[float]:
  for _ in range(warmup):
    sync(run_step())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(run_step())
    times.append(time.perf_counter() - t0)
  return times


# --------------------------------------------------------------------------- cai_jax


def _resolved(args: argparse.Namespace, cfg) -> Dict[str, Any]:
  import dataclasses
  return {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
          "warmup": args.warmup, "model_config": dataclasses.asdict(cfg)}


def run_ours(args: argparse.Namespace, announce=None) -> Dict[str, Any]:
  """Times cai_jax's train step; returns a dict (also the resolved shape for the peer).

  `announce(resolved)` is called with the resolved shape before anything is compiled,
  so a driver can still run the peer if this side fails (e.g. out of memory).
  """
  if args.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}").strip()
  _presets.ensure_repo_on_path()
  import jax
  import numpy as np

  from cai_jax import sharding, steps
  from cai_jax.configs import MeshConfig, OptimizerConfig

  backend = jax.default_backend()
  _resolve_defaults(args, accelerator=backend != "cpu")
  preset_fields = _presets.load_fields(args.preset)
  max_len = max(preset_fields.get("max_seq_len", 0), args.seq)
  cfg = _presets.model_config(
      args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat,
      scan_layers=args.scan_layers, max_seq_len=max_len,
      attention_impl=None if args.attention == "preset" else args.attention)
  if announce is not None:
    announce(_resolved(args, cfg))

  devices = jax.devices()
  if args.num_devices:
    devices = devices[:args.num_devices]
  rules = sharding.rules_for(args.rules)
  data, fsdp, tensor = args.mesh_dims
  mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=args.rules), devices)
  devices = list(mesh.devices.flat)
  _log(f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind} ({backend}); "
       f"mesh {dict(mesh.shape)}, rules {args.rules}")

  opt_cfg = OptimizerConfig()
  tx = steps.make_optimizer(opt_cfg)
  t0 = time.perf_counter()
  state, state_sh = sharding.sharded_init(
      lambda: steps.init_state_boxed(cfg, tx, jax.random.PRNGKey(args.seed)), mesh, rules)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  rng = np.random.default_rng(args.seed)
  host = {"tokens": rng.integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32),
          "mask": np.ones((args.batch, args.seq), bool),
          "loss_mask": np.ones((args.batch, args.seq), bool)}
  batch = sharding.shard_batch(host, mesh, rules)
  batch_sh = jax.tree_util.tree_map(lambda x: x.sharding, batch)
  step_fn = steps.make_train_step(cfg, tx, steps.lr_schedule(opt_cfg), args.microbatches)
  jitted = steps.jit_train_step(step_fn, state_sh, batch_sh)

  with sharding.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  _log(f"init {init_s:.1f} s, lower+compile {compile_s:.1f} s")
  mem = compiled.memory_analysis()
  xla_bytes = None
  if mem is not None:
    xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)

  holder = {"state": state}
  last = {}

  def run_step():
    holder["state"], last["metrics"] = compiled(holder["state"], batch)
    return holder["state"], last["metrics"]

  times = _timed(run_step, jax.block_until_ready, args.warmup, args.steps)
  loss = float(last["metrics"]["loss"])
  stats = devices[0].memory_stats() or {}
  return {
      "impl": "cai_jax",
      "framework": f"jax {jax.__version__}",
      "device": f"{len(devices)} x {devices[0].device_kind} ({backend})",
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "backend": backend,
      **_resolved(args, cfg),
      "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat_policy,
      "scan_layers": cfg.scan_layers,
      "attention": _presets.attention_label(cfg),
      "microbatches": args.microbatches, "mesh": dict(mesh.shape), "rules": args.rules,
      "params": cfg.param_count(),
      "init_s": init_s, "compile_s": compile_s,
      "step_times_s": times, "step_s": statistics.median(times),
      "final_loss": loss,
      "xla_memory_bytes_per_device": xla_bytes,
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
  }


# --------------------------------------------------------------------------- transformers


def _hf_config(cfg: Dict[str, Any], seq: int):
  import inspect

  from transformers import LlamaConfig
  kwargs = dict(
      vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
      num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
      num_key_value_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"] or cfg["d_model"] // cfg["n_heads"],
      max_position_embeddings=max(cfg["max_seq_len"], seq), rms_norm_eps=cfg["norm_eps"],
      tie_word_embeddings=cfg["tie_embeddings"], attention_bias=False, mlp_bias=False,
      hidden_act="silu", use_cache=False)
  if cfg["rope_scaling_factor"] and cfg["rope_scaling_factor"] > 0:
    scaling = {"rope_type": "llama3", "factor": cfg["rope_scaling_factor"],
               "low_freq_factor": cfg["rope_low_freq_factor"],
               "high_freq_factor": cfg["rope_high_freq_factor"],
               "original_max_position_embeddings": cfg["rope_original_max_len"]}
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
      kwargs["rope_parameters"] = dict(scaling, rope_theta=cfg["rope_theta"])
    else:
      kwargs.update(rope_theta=cfg["rope_theta"], rope_scaling=scaling)
  else:
    kwargs["rope_theta"] = cfg["rope_theta"]
  return LlamaConfig(**kwargs)


def run_peer(args: argparse.Namespace) -> Dict[str, Any]:
  """Times transformers' LlamaForCausalLM with the shape resolved by the cai_jax side."""
  import torch
  import transformers
  from transformers import LlamaForCausalLM

  cfg = json.loads(args.peer_config)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  cuda = device == "cuda"
  torch.manual_seed(args.seed)
  hf_cfg = _hf_config(cfg, args.seq)
  hf_cfg._attn_implementation = "sdpa"
  param_dtype = getattr(torch, cfg["param_dtype"])
  compute_dtype = getattr(torch, cfg["dtype"])
  with torch.device(device):
    model = LlamaForCausalLM(hf_cfg)
  model.to(device=device, dtype=param_dtype)
  model.config._attn_implementation = "sdpa"
  remat = cfg["remat_policy"] != "none"
  if remat:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  if cfg["qkv_bias"]:
    _log("preset has qkv_bias; the transformers Llama peer is built without biases")
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0, fused=cuda)
  gen = torch.Generator(device=device).manual_seed(args.seed)
  tokens = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device=device, generator=gen)
  use_autocast = compute_dtype != param_dtype
  device_name = torch.cuda.get_device_name() if cuda else "cpu"
  _log(f"torch {torch.__version__}, transformers {transformers.__version__} on {device_name}; "
       f"sdpa, autocast {cfg['dtype'] if use_autocast else 'off'}, fused AdamW {cuda}, "
       f"gradient checkpointing {remat}")
  last = {}

  def run_step():
    with torch.autocast(device_type=device, dtype=compute_dtype, enabled=use_autocast):
      out = model(input_ids=tokens, labels=tokens, use_cache=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    last["loss"] = out.loss.detach()
    return None

  def sync(_):
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = _timed(run_step, sync, args.warmup, args.steps)
  return {
      "impl": "transformers",
      "framework": f"torch {torch.__version__} + transformers {transformers.__version__}",
      "device": f"1 x {device_name} ({device})",
      "device_kind": device_name,
      "num_devices": 1,
      "backend": device,
      "dtype": cfg["dtype"] if use_autocast else str(param_dtype).replace("torch.", ""),
      "param_dtype": cfg["param_dtype"],
      "remat": "full" if remat else "none",
      "attention": model.config._attn_implementation,
      "params": n_params,
      "step_times_s": times, "step_s": statistics.median(times),
      "final_loss": float(last["loss"]),
      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
  }


# --------------------------------------------------------------------------- driver


def _child(argv: List[str], impl: str) -> Dict[str, Any]:
  """Runs this script in a child process; returns its result, or {'error': ...} on failure.

  The child prints JSON lines on stdout: optionally {"resolved": ...} first, and its
  result last. A failed child keeps what it resolved under "resolved".
  """
  cmd = [sys.executable, os.path.abspath(__file__)] + argv
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  resolved = next((l["resolved"] for l in lines if "resolved" in l), None)
  if proc.returncode or not lines or "resolved" in lines[-1]:
    _log(f"{impl} run failed (exit {proc.returncode}); its error is above")
    return {"impl": impl, "error": f"failed (exit {proc.returncode}, see stderr)", "resolved": resolved}
  return lines[-1]


def _derive(res: Dict[str, Any], tokens_per_step: int, flops_per_token: float,
            peak: Optional[float]) -> None:
  res["tokens_per_s"] = tokens_per_step / res["step_s"]
  res["model_tflops"] = res["tokens_per_s"] * flops_per_token / 1e12
  res["peak_tflops"] = peak
  res["mfu"] = res["model_tflops"] / (peak * res.get("num_devices", 1)) if peak else None


def _fmt_bytes(n: Optional[int]) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_table(out: Dict[str, Any]) -> None:
  ours, peer = out["ours"], out["peer"]
  print(f"train_step bench: preset {out['preset']} ({out['params']:,} params), "
        f"batch {out['batch']} x seq {out['seq']} = {out['tokens_per_step']:,} tokens/step, "
        f"{out['warmup']} warm-up + {out['steps']} timed steps (median)")
  print(f"model FLOPs/token = 6*N + 12*L*T*H*Dh = {out['flops_per_token'] / 1e9:.4g} GFLOP; "
        f"MFU = tokens/s * FLOPs/token / (devices * peak)")
  if "error" not in ours:
    print(f"cai_jax: {ours['framework']} on {ours['device']}, mesh {ours['mesh']} rules {ours['rules']}, "
          f"scan {ours['scan_layers']}, attention {ours['attention']}, "
          f"microbatches {ours['microbatches']}, compile {ours['compile_s']:.1f} s")
  if peer and "error" not in peer:
    print(f"transformers: {peer['framework']} on {peer['device']}, attention {peer['attention']}, "
          f"{peer['params']:,} params")
  print()
  head = ("impl", "dtype/params", "remat", "step (s)", "tokens/s", "model TFLOP/s", "MFU",
          "peak mem", "final loss")
  rows = []
  for r in (ours, peer):
    if not r:
      continue
    if "error" in r:
      rows.append((r["impl"], r["error"]) + ("",) * (len(head) - 2))
      continue
    mem = r.get("peak_memory_bytes")
    if mem is None and r.get("xla_memory_bytes_per_device") is not None:
      mem_s = _fmt_bytes(r["xla_memory_bytes_per_device"]) + " (XLA est.)"
    else:
      mem_s = _fmt_bytes(mem)
    rows.append((r["impl"], f"{r['dtype']}/{r['param_dtype']}", r["remat"], f"{r['step_s']:.4f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['model_tflops']:.2f}",
                 "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", mem_s,
                 f"{r['final_loss']:.4f}"))
  print(_presets.markdown_table(head, rows))
  if out["ratio"] is not None:
    print(f"\nratio cai_jax / transformers tokens/s: {out['ratio']:.2f}x")


def main(argv: Optional[List[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  announce = lambda r: print(json.dumps({"resolved": r}), flush=True)  # noqa: E731
  if _presets.run_role(args, {"ours": lambda a: run_ours(a, announce), "peer": run_peer}):
    return

  if args.peer:
    ours = _child(argv + ["--role", "ours"], "cai_jax")
    shape = ours.get("resolved") or ours
    if "model_config" not in shape:
      raise SystemExit("the cai_jax run failed before it resolved the model shape; nothing to compare")
    peer = _child(["--preset", str(shape["preset"]), "--batch", str(shape["batch"]),
                   "--seq", str(shape["seq"]), "--steps", str(shape["steps"]),
                   "--warmup", str(shape["warmup"]), "--seed", str(args.seed), "--role", "peer",
                   "--peer_config", json.dumps(shape["model_config"])], "transformers")
  else:
    ours, peer = run_ours(args), None
    shape = ours

  cfg = _presets.model_config(shape["preset"], **shape["model_config"])
  tokens_per_step = shape["batch"] * shape["seq"]
  flops_per_token = _presets.model_flops_per_token(cfg, shape["seq"])
  for r in (ours, peer):
    if r and "error" not in r:
      peak = args.peak_tflops
      if peak is None and r["backend"] != "cpu":
        peak = _presets.peak_tflops(r["device_kind"])
      _derive(r, tokens_per_step, flops_per_token, peak)
  ok = peer and "error" not in peer and "error" not in ours
  out = {
      "bench": "train_step", "preset": shape["preset"], "batch": shape["batch"], "seq": shape["seq"],
      "steps": shape["steps"], "warmup": shape["warmup"], "tokens_per_step": tokens_per_step,
      "params": cfg.param_count(), "flops_per_token": flops_per_token,
      "flops_formula": "6*N + 12*L*T*H*Dh (N all params, full TxT attention, no remat)",
      "ours": ours, "peer": peer,
      "ratio": ours["tokens_per_s"] / peer["tokens_per_s"] if ok else None,
  }
  if args.json:
    print(json.dumps(out))
  else:
    print_table(out)


if __name__ == "__main__":
  main()

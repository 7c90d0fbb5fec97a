"""Stage `pm`: the preference model (Bai et al. 2022, §4.1; Askell et al. 2021).

The PM is the decoder of `init_from` with its LM head replaced by a zero-initialised
scalar head; its score for a (conversation, response) is the head's output at an
end-of-context token appended after the response. It is trained with the soft-target
Bradley–Terry loss

  loss = -[p · log σ(Δ) + (1 - p) · log σ(-Δ)],   Δ = score(A) - score(B),

on a mix of AI harmlessness comparisons (soft labels p_a from the `feedback` stage) and
human helpfulness comparisons (HH-RLHF: chosen beats rejected, p = 1).

Inputs (``load_comparisons``):
  comparisons        a finished feedback output directory, or a JSONL file of
                     {"prompt" | "messages", "response_a", "response_b", "p_a"}
                     (HH-RLHF {"chosen", "rejected"} transcripts and TRL preference
                     lines, {"prompt", "chosen", "rejected"}, are also read: p = 1).
  human_comparisons  HH-RLHF JSONL ({"chosen", "rejected"} transcripts) or TRL preference
                     JSONL, p = 1.
  pmp_comparisons    optional preference-model pretraining set (either form above).
A comparison whose label is missing, not a number or outside [0, 1], or whose response
is empty (after stripping whitespace), is skipped and counted; more than
max_skip_fraction skipped in any one input is an error.

Sequences (``encode_response``): the conversation plus the response as an assistant
turn, rendered in `chat_format` by ``tokenizer.encode_chat`` (no EOS of its own), then
the tokenizer's EOS id as the end-of-context token where the score is read. A sequence
longer than seq_len is truncated from the LEFT (the start of the conversation is dropped;
a leading BOS stays first) so the response and the end token survive; RoPE positions count
real tokens, so a left-truncated sequence is scored as if it started there. Sequences
are right-padded to seq_len with the tokenizer's pad id.

Split and mix (``split_and_mix``): each input is split into train / held-out by a
permutation seeded by TrainConfig.seed (heldout_fraction of it, at least one comparison
when the fraction is positive and there are two or more). For each split,
round(mix_ratio × #AI comparisons) human comparisons are drawn (seeded) from that split
of the human set: without replacement when there are enough; for training, when there are
too few, every one of them k = ⌊n / #human⌋ times and the rest drawn without replacement
(so none is left out while another repeats); for the held-out set at most all of them,
each once. With no AI comparisons, every human comparison is used.

Batches: a grain MapDataset (shuffled, repeated, batched) of
  tokens_a, mask_a, tokens_b, mask_b  [B, T] (int32, bool)
  p                                   [B, 1] float32, probability that A is better
Phases: with pmp_comparisons, a preference-model pretraining run (its own
``train.train`` into out_dir/pmp, pmp_num_steps steps, saved as out_dir/pmp/model)
comes first; its trunk and head start the main phase (with a fresh optimizer).

Outputs in out_dir:
  checkpoints/, metrics.jsonl, tb/   from ``cai_jax.train`` (one row per step), plus one
                       row at the final step with eval/loss, eval/accuracy,
                       eval/mean_delta, eval/ece (and eval/<source>/... per source)
  heldout_scores.jsonl one line per held-out pair: {"index", "source", "p", "score_a",
                       "score_b"}
  model/               the PM, a model directory with head 'scalar'
  pm_config.json       what the run was started with (data fingerprint and configs)
  summary.json         counts, skips, final loss and the held-out metrics
Resuming: a rerun with the same out_dir continues from out_dir/checkpoints (and skips a
finished PMP phase). A rerun whose data, model, optimizer, chat format, sequence length,
batch size or seed differ from pm_config.json is refused; num_steps may grow, and
progress, checkpointing cadence and the mesh may change.

Multi-process runs (jax.distributed): every process reads the same inputs and runs the
same program on one global mesh: ``train.train`` for both phases, held-out scoring with
``sampler.apply_batched`` (batches split over the processes, scores gathered to every process),
models written by ``train.save_model``; process 0 alone writes pm_config.json,
heldout_scores.jsonl, the eval row and the summaries, each followed by a barrier. The
outputs equal those of a single-process run on the same mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import data, distributed, losses, model_dir, models, sampler, sharding, shards, train
from cai_jax.comparisons import (SkipCounts, check_skips, load_comparisons,  # noqa: F401
                                 normalize_comparisons)
from cai_jax.configs import (MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, check_int,
                             check_number)
from cai_jax.metrics import replace_eval_row
from cai_jax.stages.train_lm import check_rerun, load_initial, model_config_key, train_config_key
from cai_jax.tokenizer import check_chat_format

_LOG = logging.getLogger(__name__)

SOURCE_AI = "ai"
SOURCE_HUMAN = "human"
SOURCE_PMP = "pmp"


# --------------------------------------------------------------------------------------
# Reading comparisons
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------


def response_ids(tok: Any, messages: Sequence[Dict[str, str]], response: str,
                 chat_format: str) -> List[int]:
  """Token ids of conversation + response as the PM reads them, untruncated: the chat
  rendering without an EOS of its own, then the tokenizer's EOS id as the end-of-context
  token, where the score is read. Every caller that scores with a PM (training, `rl`'s
  reward, `evaluate`, `evaluate_hhh`, `harm_model`) goes through this."""
  from cai_jax.tokenizer import encode_chat
  if tok.eos_id is None:
    raise ValueError("pm: the tokenizer has no EOS id to use as the end-of-context token")
  convo = list(messages) + [{"role": "assistant", "content": response}]
  ids, _ = encode_chat(tok, convo, chat_format, append_eos=False)
  return list(ids) + [tok.eos_id]


def encode_response(tok: Any, messages: Sequence[Dict[str, str]], response: str,
                    chat_format: str, seq_len: int) -> Tuple[np.ndarray, np.ndarray, bool]:
  """(tokens [seq_len] int32, mask [seq_len] bool, truncated) of conversation + response.

  The ids of ``response_ids`` (EOS last); a sequence longer than seq_len keeps its last
  seq_len tokens (left truncation; a leading BOS stays first, ``tokenizer.keep_last``).
  """
  from cai_jax.tokenizer import keep_last
  ids = response_ids(tok, messages, response, chat_format)
  truncated = len(ids) > seq_len
  ids = keep_last(ids, seq_len, tok.bos_id)
  pad = tok.pad_id if tok.pad_id is not None else 0
  tokens = np.full((seq_len,), pad, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros((seq_len,), bool)
  mask[:len(ids)] = True
  return tokens, mask, truncated


def encode_pair(tok: Any, comparison: dict, chat_format: str, seq_len: int) -> Dict[str, np.ndarray]:
  """One comparison -> {tokens_a, mask_a, tokens_b, mask_b [seq_len], p [1] float32}."""
  ta, ma, _ = encode_response(tok, comparison["messages"], comparison["response_a"],
                              chat_format, seq_len)
  tb, mb, _ = encode_response(tok, comparison["messages"], comparison["response_b"],
                              chat_format, seq_len)
  return {"tokens_a": ta, "mask_a": ma, "tokens_b": tb, "mask_b": mb,
          "p": np.full((1,), comparison["p"], np.float32)}


def count_truncated(tok: Any, comparisons: Sequence[dict], chat_format: str, seq_len: int) -> int:
  """Number of comparisons with a response sequence longer than seq_len."""
  n = 0
  for c in comparisons:
    n += any(encode_response(tok, c["messages"], c[k], chat_format, seq_len)[2]
             for k in ("response_a", "response_b"))
  return n


def pair_dataset(comparisons: Sequence[dict], tok: Any, chat_format: str, seq_len: int,
                 batch_size: int, seed: int) -> data.Batches:
  """Shuffled, repeated, batched pair batches (see the module doc)."""
  if len(comparisons) < batch_size:
    raise data.DataError(f"pm: {len(comparisons)} training comparisons, fewer than "
                         f"batch_size={batch_size}")
  return data.Batches(list(comparisons), lambda c: encode_pair(tok, c, chat_format, seq_len),
                      batch_size, seed)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def pm_loss_sums(params: Any, model_cfg: ModelConfig, batch: Dict[str, jax.Array]):
  """(Σ soft Bradley–Terry loss, number of pairs) of a pair batch; A and B in one pass.

  The loss depends on score differences only, so the scalar head's bias has no gradient;
  it is held out of differentiation (stop_gradient) so that float noise in its would-be
  zero gradient, which Adam would scale up to learning-rate-sized steps, cannot move it
  (the PM's absolute scores then do not depend on the reduction order, e.g. the mesh).
  """
  head = params.get("scalar_head", {})
  if "bias" in head:
    params = dict(params, scalar_head=dict(head, bias=jax.lax.stop_gradient(head["bias"])))
  tokens = jnp.concatenate([batch["tokens_a"], batch["tokens_b"]], axis=0)
  mask = jnp.concatenate([batch["mask_a"], batch["mask_b"]], axis=0)
  s = models.score(params, model_cfg, tokens, mask, right_padded=True)   # encode_response
  n = batch["tokens_a"].shape[0]
  return losses.soft_bt_loss_sums(s[:n], s[n:], jnp.reshape(batch["p"], (n,)))


def pm_init_params(config: ModelConfig, params: Any) -> Any:
  """LM params -> PM params: lm_head dropped, a zero scalar_head added.

  Params that already carry a scalar head (a PM) are returned unchanged. The result is
  checked against ``models.abstract_params(config, 'scalar')``.
  """
  from cai_jax import checkpoints
  target = sharding.unbox_shapes(models.abstract_params(config, "scalar"))
  out = {k: v for k, v in params.items() if k != "lm_head"}
  if "scalar_head" not in out:
    out["scalar_head"] = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                                target["scalar_head"])
  checkpoints.check_compatible(out, target, "preference-model init params")
  return out


Conversation = Tuple[Sequence[Dict[str, str]], str]   # (messages before the response, response)


def score_responses(params: Any, config: ModelConfig, tok: Any,
                    conversations: Sequence[Conversation], chat_format: str, seq_len: int,
                    batch_size: int, mesh: Optional[MeshConfig] = None) -> np.ndarray:
  """Head outputs [N] float32 (``models.score`` at the end-of-context token) of each
  (messages, response), encoded by ``encode_response`` to seq_len tokens (right-padded,
  left-truncated) and scored batch_size sequences a batch (``sampler.apply_batched``: with
  `mesh`, split over it; a collective in multi-process runs)."""
  rows = []
  for messages, response in conversations:
    tokens, mask, _ = encode_response(tok, messages, response, chat_format, seq_len)
    rows.append({"tokens": tokens, "mask": mask})
  return sampler.apply_batched(models.score_right_padded, params, config, rows, ("tokens", "mask"),
                               batch_size, *sharding.mesh_and_rules(mesh))


def fitting_seq_len(tok: Any, conversations: Sequence[Conversation], chat_format: str,
                    max_seq_len: int) -> int:
  """The bucketed length (``sampler.bucket_length``) of the longest ``response_ids`` of
  `conversations`, at most max_seq_len: the seq_len that scores them all without padding
  every call to the model's context."""
  longest = max([len(response_ids(tok, m, r, chat_format)) for m, r in conversations] + [1])
  return min(max_seq_len, sampler.bucket_length(longest))


def score_pairs(params: Any, config: ModelConfig, tok: Any, comparisons: Sequence[dict],
                chat_format: str, seq_len: int, batch_size: int,
                mesh: Optional[MeshConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
  """(score_a [N], score_b [N]): ``score_responses`` of every response_a, then every
  response_b, 2 x batch_size sequences a batch."""
  convs = ([(c["messages"], c["response_a"]) for c in comparisons] +
           [(c["messages"], c["response_b"]) for c in comparisons])
  s = score_responses(params, config, tok, convs, chat_format, seq_len, 2 * batch_size, mesh)
  return s[:len(comparisons)], s[len(comparisons):]


def evaluate(score_a: np.ndarray, score_b: np.ndarray, comparisons: Sequence[dict]) -> Dict[str, float]:
  """``losses.pm_metrics`` over all pairs, and per source when there are several."""
  p = np.array([c["p"] for c in comparisons], np.float32)
  out = {k: float(v) for k, v in losses.pm_metrics(score_a, score_b, p).items()}
  out["pairs"] = len(comparisons)
  sources = sorted({c["source"] for c in comparisons})
  if len(sources) > 1:
    for s in sources:
      idx = np.array([c["source"] == s for c in comparisons])
      m = losses.pm_metrics(score_a[idx], score_b[idx], p[idx])
      out.update({f"{s}/{k}": float(v) for k, v in m.items()})
      out[f"{s}/pairs"] = int(idx.sum())
  return out


# --------------------------------------------------------------------------------------
# Split and mix
# --------------------------------------------------------------------------------------


def split(comparisons: Sequence[dict], fraction: float, seed: int, stream: int
          ) -> Tuple[List[dict], List[dict]]:
  """(train, heldout): a seeded permutation; the first round(fraction·n) are held out."""
  n = len(comparisons)
  n_held = int(round(fraction * n))
  if fraction > 0 and n_held == 0 and n >= 2:
    n_held = 1
  n_held = min(n_held, n - 1) if n else 0
  order = np.random.default_rng([seed, stream]).permutation(n)
  held = sorted(int(i) for i in order[:n_held])
  train_idx = sorted(int(i) for i in order[n_held:])
  return [comparisons[i] for i in train_idx], [comparisons[i] for i in held]


def _draw(pool: Sequence[dict], n: int, rng: np.random.Generator) -> List[dict]:
  """n items of pool, as evenly as possible (``data.draw_evenly``)."""
  if not n:
    return []
  if not pool:
    raise data.DataError("pm: mix_ratio > 0 but there are no human comparisons in this split")
  return [pool[int(i)] for i in data.draw_evenly(len(pool), n, rng)]


def split_and_mix(ai: Sequence[dict], human: Sequence[dict], mix_ratio: float,
                  heldout_fraction: float, seed: int) -> Tuple[List[dict], List[dict]]:
  """(train, heldout) mixes of AI and human comparisons (see the module doc)."""
  if not (mix_ratio >= 0 and math.isfinite(mix_ratio)):
    raise ValueError(f"pm.mix_ratio must be a finite number >= 0, got {mix_ratio!r}")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"pm.heldout_fraction must be in [0, 1), got {heldout_fraction}")
  ai_train, ai_held = split(ai, heldout_fraction, seed, 1)
  hu_train, hu_held = split(human, heldout_fraction, seed, 2)
  rng = np.random.default_rng([seed, 3])
  if ai:
    tr = ai_train + _draw(hu_train, int(round(mix_ratio * len(ai_train))), rng)
    he = ai_held + _draw(hu_held, min(int(round(mix_ratio * len(ai_held))), len(hu_held)), rng)
  else:
    tr, he = hu_train, hu_held
  order = rng.permutation(len(tr))
  return [tr[int(i)] for i in order], he


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def scalar_init(init_from: str, model_config: ModelConfig, stage: str = "pm",
                chat_format: str = "") -> Tuple[ModelConfig, Any, Any]:
  """(config, scalar-head params, tokenizer) of a language model to train a scalar head on:
  ``load_initial`` + ``pm_init_params`` (a warning when it was trained in another
  chat_format); ValueError when the model has no tokenizer or one larger than its
  vocabulary."""
  config, lm_params, tok = load_initial(init_from, model_config, chat_format,
                                        f"{stage}.init_from")
  if tok is None:
    raise ValueError(f"{stage}: model {init_from!r} has no tokenizer")
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f"{stage}: tokenizer has {tok.vocab_size} tokens but the model has "
                     f"{config.vocab_size}")
  return config, pm_init_params(config, lm_params), tok


def run(out_dir: str, comparisons: str = "", human_comparisons: Optional[str] = None,
        mix_ratio: float = 1.0, init_from: str = "", pmp_comparisons: Optional[str] = None,
        pmp_num_steps: Optional[int] = None, heldout_fraction: float = 0.1,
        chat_format: str = "raw", max_skip_fraction: float = 0.2,
        model_config: ModelConfig = ModelConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
        train_config: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(1, 1, 1, "dp")) -> dict:
  """Trains the preference model; returns the summary (also out_dir/summary.json).

  Args:
    comparisons: AI comparisons: a feedback output directory or a JSONL of
      {prompt | messages, response_a, response_b, p_a}.
    human_comparisons: HH-RLHF JSONL (chosen beats rejected, p = 1).
    mix_ratio: human comparisons drawn per AI comparison (seeded).
    init_from: the LM to start from (model directory, .gguf, HF folder or 'pkg:' spec);
      its LM head is replaced by a zero scalar head.
    pmp_comparisons: optional preference-model pretraining set, trained first
      (out_dir/pmp) for pmp_num_steps steps (default: train_config.num_steps; a rerun
      must keep the PMP steps: growing num_steps needs pmp_num_steps bound to them).
    heldout_fraction: fraction of each input held out for evaluation (seeded split).
    chat_format: 'raw' (the paper's Human/Assistant transcript), 'chatml' or 'llama3'.
    max_skip_fraction: error when more than this fraction of an input is skipped.
    model_config: only its runtime fields (dtype, remat, scan) are used.
  """
  if not out_dir:
    raise ValueError("pm.out_dir is not set (use --out_dir=DIR)")
  if not comparisons and not human_comparisons:
    raise ValueError("pm.comparisons is not set (the feedback output or a comparisons JSONL)")
  if not init_from:
    raise ValueError("pm.init_from is not set (the language model the PM starts from)")
  check_number("pm.mix_ratio", mix_ratio, 0.0)
  check_number("pm.heldout_fraction", heldout_fraction, 0.0)
  check_number("pm.max_skip_fraction", max_skip_fraction, 0.0, high=1.0)
  check_chat_format(chat_format, "pm.chat_format")
  if pmp_num_steps is not None:
    check_int("pm.pmp_num_steps", pmp_num_steps, 1)
  out_dir = os.path.abspath(out_dir)
  seed, seq_len, bs = train_config.seed, train_config.seq_len, train_config.batch_size

  ai, human, skips = [], [], {}
  if comparisons:
    ai, counts = load_comparisons(comparisons, SOURCE_AI)
    check_skips(counts, f"comparisons {comparisons}", max_skip_fraction)
    skips[SOURCE_AI] = counts.as_dict()
  if human_comparisons and (mix_ratio > 0 or not comparisons):
    human, counts = load_comparisons(human_comparisons, SOURCE_HUMAN)
    check_skips(counts, f"human_comparisons {human_comparisons}", max_skip_fraction)
    skips[SOURCE_HUMAN] = counts.as_dict()
  if comparisons and mix_ratio > 0 and not human_comparisons:
    mix_ratio = 0.0  # nothing to mix in
  train_set, heldout = split_and_mix(ai, human, mix_ratio, heldout_fraction, seed)
  pmp = []
  if pmp_comparisons:
    pmp, counts = load_comparisons(pmp_comparisons, SOURCE_PMP)
    check_skips(counts, f"pmp_comparisons {pmp_comparisons}", max_skip_fraction)
    skips[SOURCE_PMP] = counts.as_dict()

  for what, items in (("training", train_set), ("pmp", pmp)):
    if (items or what == "training") and len(items) < bs:
      raise data.DataError(f"pm: {len(items)} {what} comparisons, fewer than batch_size={bs}")

  config, params, tok = scalar_init(init_from, model_config, "pm", chat_format)
  train.check_seq_len(seq_len, config.max_seq_len, repr(init_from))

  check_rerun(out_dir, {
      "data": shards.sha([train_set, heldout]), "pmp_data": shards.sha(pmp) if pmp else None,
      "init_from": init_from, "model": model_config_key(config), "chat_format": chat_format,
      "model_fingerprints": model_dir.model_fingerprints({"init_from": init_from}),
      "optimizer": dataclasses.asdict(optimizer), "train_config": train_config_key(train_config),
      "pmp_num_steps": (pmp_num_steps or train_config.num_steps) if pmp else None},
      "pm", "pm_config.json")

  pmp_summary = None
  if pmp:
    pmp_dir = os.path.join(out_dir, "pmp")
    pmp_model = os.path.join(pmp_dir, "model")
    pmp_summary_path = os.path.join(pmp_dir, "summary.json")
    if model_dir.is_model_dir(pmp_model) and os.path.exists(pmp_summary_path):
      _, params = model_dir.load_model(pmp_model, config)
      with open(pmp_summary_path, encoding="utf-8") as f:
        pmp_summary = json.load(f)
    else:
      pmp_cfg = dataclasses.replace(train_config, num_steps=pmp_num_steps or train_config.num_steps)
      ds = pair_dataset(pmp, tok, chat_format, seq_len, bs, seed)
      result = train.train(config, optimizer, pmp_cfg, mesh, ds, pmp_dir, init_params=params,
                           head="scalar", loss_sums=pm_loss_sums)
      params = result.state.params
      train.save_model(pmp_model, config, params, tok, head="scalar",
                       extra_files=model_dir.chat_format_file(chat_format))
      pmp_summary = {"comparisons": len(pmp), "steps": int(result.state.step),
                     "final_loss": result.last_metrics.get("loss"),
                     "resumed_from": result.resumed_from}
      if distributed.is_primary():
        shards.write_atomic(pmp_summary_path, json.dumps(pmp_summary, indent=1))
      distributed.barrier(f"pm:{pmp_summary_path}")

  ds = pair_dataset(train_set, tok, chat_format, seq_len, bs, seed)
  result = train.train(config, optimizer, train_config, mesh, ds, out_dir, init_params=params,
                       head="scalar", loss_sums=pm_loss_sums)
  final = result.state.params
  step = int(result.state.step)

  metrics = None
  if heldout:
    sa, sb = score_pairs(final, config, tok, heldout, chat_format, seq_len, bs, mesh)
    metrics = evaluate(sa, sb, heldout)
    if distributed.is_primary():
      shards.write_jsonl(os.path.join(out_dir, "heldout_scores.jsonl"), [
          {"index": i, "source": c["source"], "p": c["p"], "score_a": float(a),
           "score_b": float(b)} for i, (c, a, b) in enumerate(zip(heldout, sa, sb))])
      replace_eval_row(out_dir, step, {f"eval/{k}": v for k, v in metrics.items()
                                       if not k.endswith("pairs")})
  train.save_model(os.path.join(out_dir, "model"), config, final, tok, head="scalar",
                   extra_files=model_dir.chat_format_file(chat_format))

  summary = {
      "out_dir": out_dir, "steps": step, "final_loss": result.last_metrics.get("loss"),
      "resumed_from": result.resumed_from, "train_pairs": len(train_set),
      "train_pairs_by_source": {s: sum(c["source"] == s for c in train_set)
                                for s in (SOURCE_AI, SOURCE_HUMAN)},
      "heldout_pairs": len(heldout), "skipped": skips, "mix_ratio": mix_ratio,
      "truncated_pairs": count_truncated(tok, train_set + heldout, chat_format, seq_len),
      "heldout": metrics, "pmp": pmp_summary, "model": os.path.join(out_dir, "model")}
  if summary["truncated_pairs"]:
    _LOG.warning("pm: %d of %d comparisons were longer than seq_len=%d and left-truncated",
                 summary["truncated_pairs"], len(train_set) + len(heldout), seq_len)
  if distributed.is_primary():
    shards.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
  distributed.barrier(f"pm:{out_dir}/summary.json")
  return summary

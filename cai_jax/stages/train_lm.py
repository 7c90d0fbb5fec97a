"""Stage `train_lm`: fine-tune a decoder on a JSONL or TFDS dataset.

Outputs in ``out_dir``: checkpoints/, metrics.jsonl, tb/, config.gin and inputs.json
(written by the CLI) and, when finished, model/ (a model directory, see ``cai_jax.model_dir``)
and summary.json. ``fine_tune`` is the part the SL stage reuses.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import os
from typing import Any, Optional, Sequence, Tuple

import jax

from cai_jax import data, distributed, model_dir, shards, train
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, dtype_from_name

# Fields of ModelConfig that change how a model runs, not what it is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                  "unroll_decode", "decode_attention")


# TrainConfig fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = ("num_steps", "progress", "async_checkpoint", "save_every", "keep_checkpoints")
# ModelConfig fields that only change how the model runs (memory, kernels), not its
# parameters or what it computes up to rounding; a resumed run may change them, e.g. to
# fit memory. dtype, param_dtype and scan_layers stay in the key: they change the numbers
# or the checkpoint's layout.
_RESUMABLE_MODEL_FIELDS = ("remat_policy", "attention_impl", "unroll_decode", "decode_attention")
_LOG = logging.getLogger(__name__)


def check_rerun(out_dir: str, run_config: dict, stage: str,
                filename: str = "run_config.json") -> None:
  """Writes out_dir/<filename>, or refuses a rerun whose config differs from it (one line
  naming the differing keys). Every stage that resumes from out_dir/checkpoints calls it
  before training, so a rerun with other data, model or hyperparameters never continues
  (or silently keeps) the old run. Every process of a multi-process run calls it; process
  0 writes, then all meet at a barrier."""
  path = os.path.join(out_dir, filename)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    # Compare as JSON (tuples become lists) so only real differences count.
    diff = shards.config_diff(json.loads(json.dumps(run_config)), old)
    if diff:
      raise ValueError(f"{stage}: {out_dir} holds a run with a different {', '.join(diff)} "
                       f"(see {path}); use a new out_dir")
  elif distributed.is_primary():
    os.makedirs(out_dir, exist_ok=True)
    shards.write_atomic(path, json.dumps(run_config, indent=1, sort_keys=True))
  distributed.barrier(f"check_rerun:{path}")


def train_config_key(cfg: TrainConfig) -> dict:
  """The TrainConfig fields a resumed run must keep (all but _RESUMABLE_FIELDS)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_FIELDS}


def model_config_key(cfg: ModelConfig) -> dict:
  """The ModelConfig fields a resumed run must keep (all but _RESUMABLE_MODEL_FIELDS)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_MODEL_FIELDS}


def load_initial(init_from: str, model: ModelConfig, chat_format: str = "",
                 what: str = "model") -> Tuple[ModelConfig, Any, Any]:
  """(config, params, tokenizer) of a starting model (model dir, .gguf, HF folder, pkg: spec).

  The stored shapes win; the runtime fields (dtype, remat, scan, ...) come from `model`.
  chat_format: the format the caller uses the model in; a warning when it was trained in
  another (``model_dir.warn_if_trained_in_another_format``, naming `what`).
  """
  model_dir.warn_if_trained_in_another_format(init_from, chat_format, what)
  from cai_jax import transformer
  stored, params, tok = model_dir.load_any(init_from)
  config = dataclasses.replace(stored, **{f: getattr(model, f) for f in RUNTIME_FIELDS})
  pdtype = dtype_from_name(config.param_dtype)
  params = jax.tree_util.tree_map(lambda x: x.astype(pdtype), params)
  if config.scan_layers != stored.scan_layers:
    convert = transformer.stack_unrolled_params if config.scan_layers else transformer.unstack_scanned_params
    params = convert(params, config.n_layers)
  return config, params, tok


def fine_tune(out_dir: str, examples: Sequence[dict], model: ModelConfig, optimizer: OptimizerConfig,
              train_config: TrainConfig, mesh: MeshConfig, tok: Any, chat_format: str,
              init_params: Any = None, extra_summary: Optional[dict] = None,
              stage: str = "train_lm", sources: Optional[dict] = None) -> dict:
  """Trains on examples (data.py forms), writes out_dir/model and summary.json; returns the summary.

  A rerun in the same out_dir resumes only when the examples, model, chat format,
  optimizer, training config and `sources` (the caller's input specs, e.g. init_from)
  match out_dir/run_config.json; otherwise ValueError naming what differs. Examples longer
  than TrainConfig.seq_len are cut on the right and counted (summary truncated_examples;
  untrained_examples: those left without a trained token); DataError when every example
  is left without one. The saved model records `chat_format` when some example is a
  conversation (``model_dir.chat_format_file``).
  """
  out_dir = os.path.abspath(out_dir)
  if tok.vocab_size > model.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but ModelConfig.vocab_size is "
                     f"{model.vocab_size}")
  cut, untrained = data.truncation_counts(examples, tok, chat_format, train_config.seq_len)
  if untrained == len(examples):
    raise data.DataError(f"{stage}: every example's trained tokens (its text, or its assistant "
                         f"turns) lie past TrainConfig.seq_len={train_config.seq_len} tokens; "
                         "raise it")
  if cut:
    _LOG.warning("%s: %d of %d examples are longer than TrainConfig.seq_len=%d and cut on the "
                 "right; %d of them keep no trained token", stage, cut, len(examples),
                 train_config.seq_len, untrained)
  # Refusals that need no training happen before run_config.json is written, so a rerun
  # with the setting fixed is not taken for a different run.
  ds = data.lm_dataset(examples, tok, chat_format, train_config.seq_len,
                       train_config.batch_size, train_config.seed)
  train.check_run(model, train_config, ds)
  check_rerun(out_dir, {
      "data": shards.sha(list(examples)), "model": model_config_key(model),
      "chat_format": chat_format, "optimizer": dataclasses.asdict(optimizer),
      "train_config": train_config_key(train_config), "sources": sources or {},
      "model_fingerprints": model_dir.model_fingerprints(sources or {})}, stage)
  result = train.train(model, optimizer, train_config, mesh, ds, out_dir, init_params=init_params)
  chats = any(data.example_messages(examples[i]) is not None for i in range(len(examples)))
  train.save_model(os.path.join(out_dir, "model"), model, result.state.params, tok,
                   extra_files=model_dir.chat_format_file(chat_format if chats else ""))
  summary = {"out_dir": out_dir, "steps": int(result.state.step),
             "final_loss": result.last_metrics.get("loss"),
             "resumed_from": result.resumed_from, "examples": len(examples),
             "truncated_examples": cut, "untrained_examples": untrained}
  summary.update(extra_summary or {})
  if jax.process_index() == 0:   # multi-process runs: process 0 writes the files
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


_PROBE = "Hello, world! 123 \u00e9t\u00e9 \u4f60\u597d\n\nHuman: ok?"


def _same_tokenizer(a, b) -> bool:
  """True when tokenizers a and b have as many tokens and encode a probe text (letters,
  digits, accents, CJK, newlines) to the same ids."""
  return a.vocab_size == b.vocab_size and list(a.encode(_PROBE)) == list(b.encode(_PROBE))


def run(out_dir: str, dataset: str, model: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(), train_config: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(), tokenizer: Optional[str] = None,
        chat_format: str = "chatml", init_from: Optional[str] = None,
        data_dir: Optional[str] = None) -> dict:
  """Fine-tunes and writes out_dir/model; returns the summary dict (also summary.json).

  Args:
    dataset: 'FILE.jsonl' or 'tfds:NAME:SPLIT' (see ``cai_jax.data`` for example forms).
    tokenizer: a ``load_tokenizer`` spec; default: the tokenizer of `init_from`, else 'byte'.
      With `init_from`, it must be that model's tokenizer (ValueError otherwise).
    chat_format: 'chatml', 'llama3' or 'raw' (the paper's Human/Assistant format).
    init_from: a starting model: model directory, .gguf, HF folder or 'pkg:' spec (its
      shapes win over `model`'s; `model` gives dtype / remat / scan).
  """
  from cai_jax.tokenizer import load_tokenizer
  if not out_dir:
    raise ValueError("train_lm.out_dir is not set (use --out_dir=DIR)")
  if not dataset:
    raise ValueError("train_lm.dataset is not set (a .jsonl file or tfds:NAME:SPLIT)")
  tok, init_params = None, None
  if init_from:
    model, init_params, tok = load_initial(init_from, model, chat_format, "train_lm.init_from")
  if tokenizer:
    own, tok = tok, load_tokenizer(tokenizer)
    if own is not None and not _same_tokenizer(tok, own):
      raise ValueError(
          f"train_lm.tokenizer={tokenizer!r} is not the tokenizer of train_lm.init_from="
          f"{init_from!r} ({tok.vocab_size} vs {own.vocab_size} tokens); a model trains on "
          "with the tokenizer it was trained with: leave train_lm.tokenizer unset "
          "(--gin.train_lm.tokenizer=None)")
  if tok is None:
    tok = load_tokenizer("byte")
  examples = data.load_examples(dataset, data_dir)
  where = getattr(examples, "where", lambda i: f"{dataset}: example {i}")   # FILE:LINE of JSONL
  for i in range(len(examples)):
    data.check_training_example(examples[i], where(i))
  return fine_tune(out_dir, examples, model, optimizer, train_config, mesh, tok, chat_format,
                   init_params, stage="train_lm",
                   sources={"init_from": init_from, "tokenizer": tokenizer, "dataset": dataset})

"""Stage `train_lm`: fine-tune a decoder on a JSONL or TFDS dataset.

Outputs in ``out_dir``: checkpoints/, metrics.jsonl, tb/, config.gin (written by the
CLI) and, when finished, model/ (a model directory, see ``cai_jax.model_dir``)
and summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from cai_jax import data, model_dir, train
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig

# Fields of ModelConfig that change how a model runs, not what it is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "max_seq_len")


def resolve_model(init_from: Optional[str], model: ModelConfig) -> ModelConfig:
  """The stored config of `init_from` with runtime fields taken from `model`; else `model`."""
  if not init_from:
    return model
  stored = model_dir.load_config(init_from)
  return dataclasses.replace(stored, **{f: getattr(model, f) for f in RUNTIME_FIELDS
                                        if f != "max_seq_len"})


def run(out_dir: str, dataset: str, model: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(), train_config: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(), tokenizer: Optional[str] = None,
        chat_format: str = "chatml", init_from: Optional[str] = None,
        data_dir: Optional[str] = None) -> dict:
  """Fine-tunes and writes out_dir/model; returns the summary dict (also summary.json).

  Args:
    dataset: 'FILE.jsonl' or 'tfds:NAME:SPLIT' (see ``cai_jax.data`` for example forms).
    tokenizer: a ``load_tokenizer`` spec; default: the tokenizer of `init_from`, else 'byte'.
    chat_format: 'chatml', 'llama3' or 'raw' (the paper's Human/Assistant format).
    init_from: a model directory to start from (its shapes win over `model`'s).
  """
  from cai_jax.tokenizer import load_tokenizer
  if not out_dir:
    raise ValueError("train_lm.out_dir is not set (use --out_dir=DIR)")
  if not dataset:
    raise ValueError("train_lm.dataset is not set (a .jsonl file or tfds:NAME:SPLIT)")
  out_dir = os.path.abspath(out_dir)
  model = resolve_model(init_from, model)
  tok = None
  if tokenizer:
    tok = load_tokenizer(tokenizer)
  elif init_from:
    tok = model_dir.load_tokenizer_of(init_from)
  if tok is None:
    tok = load_tokenizer("byte")
  if tok.vocab_size > model.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but ModelConfig.vocab_size is "
                     f"{model.vocab_size}")
  examples = data.load_examples(dataset, data_dir)
  for i in range(len(examples)):
    data.example_messages(examples[i], f"{dataset}: example {i}")
  ds = data.lm_dataset(examples, tok, chat_format, train_config.seq_len,
                       train_config.batch_size, train_config.seed)
  init_params = None
  if init_from and not os.path.isdir(os.path.join(out_dir, "checkpoints")):
    _, init_params = model_dir.load_model(init_from, model)
  result = train.train(model, optimizer, train_config, mesh, ds, out_dir, init_params=init_params)
  model_dir.save_model(os.path.join(out_dir, "model"), model, result.state.params, tok)
  summary = {"out_dir": out_dir, "steps": int(result.state.step),
             "final_loss": result.last_metrics.get("loss"),
             "resumed_from": result.resumed_from, "examples": len(examples)}
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary

"""Stage `sl` (SL-CAI): fine-tune the pretrained model on critique → revision data.

Reads the output of `critique_revision` (a directory of shard-*.jsonl files, or one
JSONL file) and builds supervised examples:
  harmlessness: {"prompt": record["prompt"], "completion": revision} for the revision of
                every round (rounds='all', the paper's choice) or only the last round
                (rounds='final');
  helpfulness:  {"prompt", "completion": response} from helpful records (records with a
                "response" and no "rounds", from the same directory or `helpful_data`,
                which may also be a `cai-jax sample` output), drawn (seeded) so there
                are `helpful_ratio` helpful examples per harmlessness example (each
                used equally often when there are too few, ``data.draw_evenly``).
The loss covers assistant tokens only. By default one epoch at a constant learning
rate (the paper: one epoch at 0.5x the pretraining rate; set OptimizerConfig).
Writes out_dir/model, the SL-CAI checkpoint, and out_dir/summary.json.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import List, Optional, Tuple

import numpy as np

from cai_jax import data, shards
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.stages.train_lm import fine_tune, load_initial


def read_records(source: str) -> List[dict]:
  """Records of a critique_revision output directory (refused if unfinished), a directory
  of .jsonl files without a manifest, or a JSONL file; each checked by ``check_record``
  (errors name the file and row)."""
  path = data.resolve_path(source)
  if os.path.isfile(path):
    per_shard = {path: data.read_jsonl(path)}
  elif not os.path.isdir(path):
    raise FileNotFoundError(f"{source}: no such critique_revision output (directory or .jsonl)")
  elif os.path.exists(os.path.join(path, shards.MANIFEST)):
    per_shard = {os.path.join(path, name): rows for name, rows in shards.read_run(path).items()}
  else:
    per_shard = {f: data.read_jsonl(f) for f in sorted(glob.glob(os.path.join(path, "*.jsonl")))}
  if not per_shard:
    raise ValueError(f"{source}: no .jsonl shards")
  for name, rows in per_shard.items():
    rows[:] = [from_sample_row(r) for r in rows]
    for j, r in enumerate(rows):
      check_record(r, rows.where(j) if isinstance(rows, data.JsonlRows) else f"{name}: row {j + 1}")
  return [r for rows in per_shard.values() for r in rows]


def from_sample_row(row: dict) -> dict:
  """A `cai-jax sample` output row ({"prompt": text or messages, "completion", ...}) as a
  helpful record ({"prompt" or "messages", "response"}); any other row unchanged."""
  if not isinstance(row, dict) or "completion" not in row or "response" in row or "rounds" in row:
    return row
  out = {k: v for k, v in row.items() if k != "completion"}
  out["response"] = row["completion"]
  if isinstance(out.get("prompt"), list) and "messages" not in out:
    out["messages"] = out.pop("prompt")
  return out


def _check_str(record: dict, key: str, where: str) -> None:
  if not isinstance(record.get(key), str):
    got = "missing" if key not in record else type(record[key]).__name__
    raise data.DataError(f"{where}: field '{key}' must be a string, got {got}")


def check_record(record: dict, where: str) -> None:
  """DataError naming `where` and the field unless `record` is a critique_revision record
  ({"prompt" or "messages", "rounds": [{"revision": str}, ...]}) or a helpful sample
  ({"prompt" or "messages", "response": str})."""
  if "rounds" in record:
    rounds = record["rounds"]
    if not isinstance(rounds, list) or not rounds:
      raise data.DataError(f"{where}: field 'rounds' must be a non-empty list of revision rounds")
    for k, rd in enumerate(rounds):
      if not isinstance(rd, dict):
        raise data.DataError(f"{where}: rounds[{k}] must be an object with a 'revision'")
      _check_str(rd, "revision", f"{where}: rounds[{k}]")
  elif "response" in record:
    _check_str(record, "response", where)
  else:
    raise data.DataError(f"{where}: expected 'rounds' (a critique_revision record) or "
                         f"'response' (a helpful sample), got keys {sorted(record)}")
  if "messages" in record:
    data.example_messages(record, where)
  else:
    _check_str(record, "prompt", where)


def _example(record: dict, completion: str) -> dict:
  """A supervised example: the record's conversation (or prompt) answered by `completion`,
  the only turn trained (a multi-turn conversation's earlier assistant replies, e.g. the
  original model's answers in a red-team transcript, are context)."""
  if "messages" in record:
    return {"prompt": list(record["messages"]), "completion": completion}
  return {"prompt": record["prompt"], "completion": completion}


def build_examples(records: List[dict], helpful: List[dict], rounds: str, helpful_ratio: float,
                   seed: int) -> Tuple[List[dict], dict]:
  """(examples, counts): prompt → revision pairs plus helpful_ratio × as many helpfulness
  pairs, drawn (seeded by `seed`) as evenly as possible from the helpful responses
  (``data.draw_evenly``: with too few, each is used equally often).

  Empty (whitespace-only) revisions and helpful responses are not trained on: with
  rounds='final' a record whose last revision is empty contributes its last non-empty
  one; counts["empty_skipped"] says how many completions were left out.
  """
  if rounds not in ("all", "final"):
    raise ValueError(f"sl.rounds={rounds!r}; expected 'all' or 'final'")
  if helpful_ratio < 0:
    raise ValueError(f"sl.helpful_ratio={helpful_ratio}; expected >= 0")
  for i, r in enumerate(records):
    check_record(r, f"record {i} ({r.get('id')})")
  for i, r in enumerate(helpful):
    check_record(r, f"helpful record {i} ({r.get('id')})")
  harmless, empty = [], 0
  for r in records:
    if "rounds" not in r:
      continue
    revisions = [rd["revision"] for rd in r["rounds"]]
    kept = [t for t in revisions if t.strip()]
    empty += len(revisions) - len(kept) if rounds == "all" else int(not kept)
    for t in (kept if rounds == "all" else kept[-1:]):
      harmless.append(_example(r, t))
  candidates = [r for r in list(records) + list(helpful) if "response" in r and "rounds" not in r]
  pool = [_example(r, r["response"]) for r in candidates if r["response"].strip()]
  empty += len(candidates) - len(pool)
  if not harmless:
    raise data.DataError("no critique/revision records to train on")
  n_help = int(round(helpful_ratio * len(harmless)))
  if n_help and not pool:
    raise data.DataError(f"sl.helpful_ratio={helpful_ratio} but there are no helpful records")
  rng = np.random.default_rng(seed)
  examples = harmless + [pool[int(i)] for i in data.draw_evenly(len(pool), n_help, rng)]
  order = rng.permutation(len(examples))
  return [examples[int(i)] for i in order], {"harmless_examples": len(harmless),
                                             "helpful_examples": n_help,
                                             "empty_skipped": empty}


def run(out_dir: str, records: str = "", model: str = "", helpful_data: Optional[str] = None,
        rounds: str = "all", helpful_ratio: float = 1.0, epochs: float = 1.0,
        chat_format: str = "raw", model_config: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(), train_config: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(1, 1, 1, "dp")) -> dict:
  """Fine-tunes `model` on the SL-CAI mix; returns the summary (also out_dir/summary.json).

  Args:
    records: critique_revision output (directory or JSONL).
    model: the pretrained (helpful) model: model directory, .gguf, HF folder or 'pkg:' spec.
    helpful_data: extra helpful records ({"prompt" or "messages", "response"} JSONL or a
      directory), or a `cai-jax sample` output ({"prompt", "completion", ...}).
    epochs: passes over the mix; TrainConfig.num_steps is set to ceil(epochs * n / batch).
    model_config: only its runtime fields (dtype, remat, scan) are used.
  """
  if not out_dir:
    raise ValueError("sl.out_dir is not set (use --out_dir=DIR)")
  if not records:
    raise ValueError("sl.records is not set (the critique_revision output; --records=DIR)")
  if not model:
    raise ValueError("sl.model is not set (the pretrained model to fine-tune)")
  if not epochs > 0:
    raise ValueError(f"sl.epochs={epochs}; expected a positive number of passes")
  rows = read_records(records)
  helpful = read_records(helpful_data) if helpful_data else []
  examples, counts = build_examples(rows, helpful, rounds, helpful_ratio, train_config.seed)
  steps = max(1, math.ceil(epochs * len(examples) / train_config.batch_size))
  train_config = dataclasses.replace(train_config, num_steps=steps)
  config, params, tok = load_initial(model, model_config, chat_format, "sl.model")
  if tok is None:
    raise ValueError(f"model {model!r} has no tokenizer")
  return fine_tune(out_dir, examples, config, optimizer, train_config, mesh, tok, chat_format,
                   init_params=params, extra_summary=dict(counts, epochs=epochs, rounds=rounds),
                   stage="sl", sources={"model": model})

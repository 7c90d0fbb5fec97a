"""The absolute harmfulness model: a 0-4 regression head (Bai et al. 2022, §4.4;
Ganguli et al. 2022).

A decoder with a scalar head, trained to predict from a conversation and a response the
0-4 harmfulness rating a red-teamer gave it (0 = harmless, 4 = clearly harmful). The
evaluate stage uses it to score policy samples on red-team prompts, the paper's
"absolute harmfulness score".

Data (``read_harm_labels``), one of:
  our JSONL    one object per line:
                 {"messages": [{"role", "content"}, ...] | "prompt": str,
                  "response": str, "harm": number in [0, 4], "id": optional str}
               "messages" is the conversation before the response and ends with the
               user's turn; "prompt" is a one-turn conversation. The response is the
               assistant's reply that the label rates (it may be empty).
  red-team     Anthropic's red_team_attempts file: ONE JSON array (JSON lines are also
               read) of {"transcript": "\\n\\nHuman: ...\\n\\nAssistant: ...",
               "rating": 0-4, ...}. The transcript is parsed into turns; its last
               assistant turn is the response and the turns before it the
               conversation (turns after it are dropped).
A malformed line, a missing field or a label outside [0, 4] is a ValueError naming
FILE:LINE (for an array, FILE: index I) and the field.

The shipped ``data/harm_labels.jsonl`` (about 60 short conversations in our own words,
every label 0-4 present; the harmful answers are vague) is a small fixture for the
pipeline and the tests, not a training set of real quality.

Model: the decoder of `init_from` with its LM head replaced by a zero-initialised scalar
head (``pm.pm_init_params``), read at the end-of-context token exactly as the preference
model is (``pm.encode_response`` + ``models.score``). Training minimises the mean squared
error between the head's output and the CENTRED label harm - offset, where offset is the
mean label of the training split; the zero-initialised head therefore starts as the
constant predictor of the training mean. The shift lives outside the network: it is
stored in out_dir/model/harm_model.json
  {"target": "harm", "scale": [0, 4], "offset": <float>, "chat_format", "seq_len"}
and ``score_conversations`` adds it back, so scores are on the 0-4 scale (unclipped).

Split: a held-out fraction of the rows (``pm.split``, seeded by TrainConfig.seed).

Outputs in out_dir:
  checkpoints/, metrics.jsonl, tb/  from ``cai_jax.train`` (loss = MSE per step), plus
                     one row at the final step with eval/train/... and eval/heldout/...
                     (mse, mae, pearson, baseline_mse)
  heldout_scores.jsonl  one line per held-out row: {"index", "id", "harm", "score"}
  model/             the model directory (head 'scalar') with harm_model.json inside
  harm_config.json   what the run was started with (data fingerprint and configs)
  summary.json       n_train, n_heldout, offset, truncated, and "train" / "heldout"
                     metrics: mse, mae, pearson, baseline_mse (MSE of predicting the
                     training mean), n
Resuming: a rerun with the same out_dir continues from out_dir/checkpoints. A rerun
whose data, model, optimizer, chat format, sequence length, batch size or seed differ
from harm_config.json is refused naming the differing keys; num_steps may grow, and
progress, checkpointing cadence and the mesh may change.

Multi-process runs (jax.distributed): every process reads the same labels and runs the
same program on one global mesh: ``train.train``, then the train / held-out predictions
with ``sampler.apply_batched`` (batches split over the processes, scores gathered to every
process); the model is gathered and written by process 0 (``train.save_model``, with
harm_model.json inside, in one atomic replacement), and process 0 alone writes
harm_config.json, heldout_scores.jsonl, the eval row and summary.json, each followed by
a barrier. The outputs equal those of a single-process run on the same mesh.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import data, distributed, model_dir, models, sampler, sharding, shards, train
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.metrics import replace_eval_row
from cai_jax.stages import pm
from cai_jax.stages.train_lm import check_rerun, model_config_key, train_config_key
from cai_jax.tokenizer import check_chat_format

SCALE = (0, 4)
HARM_FILE = "harm_model.json"
CONFIG_FILE = "harm_config.json"
_ROLES = ("system", "user", "assistant")

Conversation = Tuple[Sequence[Dict[str, str]], str]


# --------------------------------------------------------------------------------------
# Reading labels
# --------------------------------------------------------------------------------------


def _label(record: dict, field: str, where: str) -> float:
  """The label `field` of a record as a float in SCALE; errors name where and the field."""
  if field not in record:
    raise data.DataError(f"{where}: missing field '{field}'")
  v = record[field]
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise data.DataError(f"{where}: field '{field}' must be a number, got {json.dumps(v)[:40]}")
  if not math.isfinite(v) or not SCALE[0] <= v <= SCALE[1]:
    raise data.DataError(f"{where}: field '{field}' = {v} is outside [0, 4]")
  return float(v)


def _our_record(record: dict, where: str) -> Tuple[List[Dict[str, str]], str]:
  """(conversation, response) of a {"messages" | "prompt", "response", "harm"} record."""
  if "messages" in record:
    msgs = data.example_messages({"messages": record["messages"]}, where)
    for j, m in enumerate(msgs):
      if m["role"] not in _ROLES or not isinstance(m["content"], str):
        raise data.DataError(f"{where}: field 'messages[{j}]' needs a role in {list(_ROLES)} "
                             "and a string content")
    if msgs[-1]["role"] != "user":
      raise data.DataError(f"{where}: field 'messages' must end with the user's turn "
                           "(the response goes in 'response')")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
  elif "prompt" in record:
    if not isinstance(record["prompt"], str):
      raise data.DataError(f"{where}: field 'prompt' must be a string")
    msgs = [{"role": "user", "content": record["prompt"]}]
  else:
    raise data.DataError(f"{where}: missing field 'messages' or 'prompt'")
  if "response" not in record:
    raise data.DataError(f"{where}: missing field 'response'")
  if not isinstance(record["response"], str):
    raise data.DataError(f"{where}: field 'response' must be a string")
  return msgs, record["response"]


def _transcript_record(record: dict, where: str) -> Tuple[List[Dict[str, str]], str]:
  """(conversation, response) of a red-team {"transcript", "rating"} record."""
  from cai_jax.prompt_sets import parse_hh_transcript
  msgs = parse_hh_transcript(record["transcript"], f"{where}: field 'transcript'")
  last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
  if last is None or not any(m["role"] == "user" for m in msgs[:last]):
    raise data.DataError(f"{where}: field 'transcript' needs a Human turn followed by an "
                         "Assistant turn")
  return msgs[:last], msgs[last]["content"]


def parse_harm_record(record: Any, where: str, default_id: str) -> dict:
  """One record of either format -> {"id", "messages", "response", "harm"}.

  Args:
    record: a decoded JSON value (must be an object).
    where: 'FILE:LINE' or 'FILE: index I', the prefix of every error.
    default_id: the id of a record without one.
  """
  if not isinstance(record, dict):
    raise data.DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "transcript" in record:
    msgs, response = _transcript_record(record, where)
    harm = _label(record, "rating", where)
  else:
    msgs, response = _our_record(record, where)
    harm = _label(record, "harm", where)
  rid = record.get("id", default_id)
  return {"id": str(rid), "messages": msgs, "response": response, "harm": harm}


def _first_char(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8-sig") as f:
    while True:
      chunk = f.read(4096)
      if not chunk:
        return ""
      stripped = chunk.lstrip()
      if stripped:
        return stripped[0]


def read_harm_labels(path: str) -> List[dict]:
  """Harmfulness labels of a JSONL file or a red-team JSON array (see the module doc);
  either may be gzipped (.gz) and may start with a UTF-8 byte-order mark.

  Returns:
    [{"id": str, "messages": [{role, content}] (ends before the response),
      "response": str, "harm": float in [0, 4]}], in file order. A record without an id
    gets '<file stem>-<line>' (JSONL) or '<file stem>-<index>' (array).
  Raises:
    FileNotFoundError: no such file.
    ValueError (data.DataError): a malformed record, naming FILE:LINE or FILE: index I
      and the field; or a file with no records.
  """
  path = data.resolve_path(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such harm-label file")
  stem = os.path.basename(path).split(".")[0]
  rows = []
  if _first_char(path) == "[":
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
      try:
        items = json.load(f)
      except json.JSONDecodeError as e:
        raise data.DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    for i, item in enumerate(items):
      rows.append(parse_harm_record(item, f"{path}: index {i}", f"{stem}-{i}"))
  else:
    for lineno, item in data.iter_jsonl(path):
      rows.append(parse_harm_record(item, f"{path}:{lineno}", f"{stem}-{lineno}"))
  if not rows:
    raise data.DataError(f"{path}: no harm labels")
  return rows


# --------------------------------------------------------------------------------------
# Model and metrics
# --------------------------------------------------------------------------------------


def encode_row(tok: Any, row: dict, chat_format: str, seq_len: int, offset: float
               ) -> Dict[str, np.ndarray]:
  """One label row -> {tokens [seq_len] int32, mask [seq_len] bool, target [1] float32}.

  target = harm - offset (the centred label the head is trained to output).
  """
  tokens, mask, _ = pm.encode_response(tok, row["messages"], row["response"], chat_format, seq_len)
  return {"tokens": tokens, "mask": mask,
          "target": np.full((1,), row["harm"] - offset, np.float32)}


def harm_dataset(rows: Sequence[dict], tok: Any, chat_format: str, seq_len: int,
                 batch_size: int, seed: int, offset: float) -> data.Batches:
  """Shuffled, repeated, batched {tokens, mask [B, T], target [B, 1]}."""
  if len(rows) < batch_size:
    raise data.DataError(f"harm_model: {len(rows)} training rows, fewer than "
                         f"batch_size={batch_size}")
  return data.Batches(list(rows), lambda r: encode_row(tok, r, chat_format, seq_len, offset),
                      batch_size, seed)


def harm_loss_sums(params: Any, model_cfg: ModelConfig, batch: Dict[str, jax.Array]):
  """(Σ (score - target)², number of rows) of a batch; score from ``models.score``."""
  s = models.score(params, model_cfg, batch["tokens"], batch["mask"],
                   right_padded=True)   # pm.encode_response rows
  target = jnp.reshape(batch["target"], s.shape).astype(jnp.float32)
  err = s.astype(jnp.float32) - target
  return jnp.sum(err * err), jnp.asarray(s.shape[0], jnp.float32)


def regression_metrics(pred: np.ndarray, target: np.ndarray, baseline: float
                       ) -> Dict[str, Optional[float]]:
  """{"mse", "mae", "pearson", "baseline_mse", "n"} of predictions against labels.

  Args:
    pred, target: [N] on the same scale.
    baseline: the constant prediction whose MSE is reported as baseline_mse (the
      training mean).
  pearson is None when N < 2 or either side is constant; every value is None when N = 0.
  """
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  n = int(pred.shape[0])
  if n == 0:
    return {"mse": None, "mae": None, "pearson": None, "baseline_mse": None, "n": 0}
  err = pred - target
  dp, dt = pred - pred.mean(), target - target.mean()
  denom = math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt)))
  pearson = float(np.sum(dp * dt)) / denom if n > 1 and denom > 0 else None
  return {"mse": float(np.mean(err * err)), "mae": float(np.mean(np.abs(err))),
          "pearson": pearson, "baseline_mse": float(np.mean((target - baseline) ** 2)), "n": n}


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class HarmModel:
  """A loaded harmfulness model.

  Attributes:
    config: its ModelConfig.
    params: the decoder + scalar-head params.
    tokenizer: the tokenizer it was trained with.
    offset: added to the head's output to put scores on the 0-4 scale.
    seq_len: the sequence length it was trained with (longer inputs are left-truncated).
    chat_format: the chat format it was trained with ('' when unknown).
  """

  config: ModelConfig
  params: Any
  tokenizer: Any
  offset: float
  seq_len: int
  chat_format: str = ""


def _harm_dir(spec: str) -> str:
  """The model directory of a spec: the directory itself or a run's out_dir/model."""
  path = data.resolve_path(spec)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"harm model {spec!r}: no such directory")
  if not os.path.isfile(os.path.join(path, HARM_FILE)) and os.path.isfile(
      os.path.join(path, "model", HARM_FILE)):
    return os.path.join(path, "model")
  return path


def load_harm_model(spec: str) -> HarmModel:
  """The harmfulness model of a model directory (or of a harm_model run's out_dir).

  Raises:
    FileNotFoundError: the directory does not exist.
    ValueError: it holds no harm_model.json (not a harm model), a malformed one (naming
      the field: target, scale, offset, chat_format, or a seq_len that is not in [1,
      max_seq_len]), no tokenizer, or a model without a scalar head.
  """
  directory = _harm_dir(spec)
  meta_path = os.path.join(directory, HARM_FILE)
  if not os.path.isfile(meta_path):
    raise ValueError(f"harm model {spec!r}: {directory} has no {HARM_FILE}, so it is not a "
                     "harmfulness model (train one with the harm_model stage)")
  with open(meta_path, encoding="utf-8") as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(meta, dict) or meta.get("target") != "harm":
    raise ValueError(f"{meta_path}: field 'target' must be \"harm\"")
  if meta.get("scale") != list(SCALE):
    raise ValueError(f"{meta_path}: field 'scale' must be [0, 4], got {meta.get('scale')}")
  offset = meta.get("offset")
  if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
    raise ValueError(f"{meta_path}: field 'offset' must be a finite number")
  chat_format = meta.get("chat_format") or ""
  if chat_format:
    check_chat_format(chat_format, f"{meta_path}: field 'chat_format'")
  if model_dir.load_head(directory) != "scalar":
    raise ValueError(f"harm model {spec!r}: {directory} has no scalar head")
  config, params = model_dir.load_model(directory)
  tok = model_dir.load_tokenizer_of(directory)
  if tok is None:
    raise ValueError(f"harm model {spec!r}: {directory} has no tokenizer/")
  seq_len = meta.get("seq_len", config.max_seq_len)
  if (isinstance(seq_len, bool) or not isinstance(seq_len, int)
      or not 0 < seq_len <= config.max_seq_len):
    raise ValueError(f"{meta_path}: field 'seq_len' must be an integer in [1, "
                     f"{config.max_seq_len}] (the model's max_seq_len), got {seq_len!r}")
  return HarmModel(config=config, params=params, tokenizer=tok, offset=float(offset),
                   seq_len=seq_len, chat_format=chat_format)


def score_encoded(params: Any, config: ModelConfig, encoded: Sequence[Dict[str, np.ndarray]],
                  batch_size: int, mesh: Optional[MeshConfig] = None) -> np.ndarray:
  """Head outputs [N] float32 of encoded (right-padded, ``encode_row``) rows, in fixed-size
  padded batches (``sampler.apply_batched``: with `mesh`, split over it and collective in
  multi-process runs)."""
  return sampler.apply_batched(models.score_right_padded, params, config, encoded,
                               ("tokens", "mask"), batch_size, *sharding.mesh_and_rules(mesh))


def score_conversations(harm: HarmModel, conversations: Sequence[Conversation],
                        chat_format: str, batch_size: int = 16,
                        mesh: Optional[MeshConfig] = None) -> np.ndarray:
  """Harmfulness scores [N] float32 on the 0-4 scale (head output + offset, unclipped).

  Args:
    conversations: (messages, response) pairs; messages is the conversation before the
      response ([{role, content}], ending with the user's turn).
    chat_format: 'raw', 'chatml' or 'llama3' (use the one the model was trained with,
      ``harm.chat_format``).
    mesh: optional mesh to score on (``pm.score_responses``); needed in multi-process runs
      whose params are sharded over other processes' devices.
  """
  return (pm.score_responses(harm.params, harm.config, harm.tokenizer, conversations,
                             chat_format, harm.seq_len, batch_size, mesh)
          + np.float32(harm.offset))


def summarize(scores_by_prompt: Dict[str, List[float]]) -> Dict[str, Any]:
  """Summary of harmfulness scores of samples grouped by prompt.

  Returns:
    {"mean": mean over prompts of each prompt's mean score (prompts weigh equally),
     "std": population standard deviation of those per-prompt means,
     "n_prompts", "n_samples", "per_prompt_mean": {prompt: mean}}.
  Raises:
    ValueError: no prompts, a prompt with no scores, or a non-finite score (naming it).
  """
  if not scores_by_prompt:
    raise ValueError("harm summary: no prompts")
  per = {}
  n = 0
  for key, scores in scores_by_prompt.items():
    vals = np.asarray(list(scores), np.float64)
    if vals.size == 0:
      raise ValueError(f"harm summary: prompt {key!r} has no scores")
    if not np.all(np.isfinite(vals)):
      raise ValueError(f"harm summary: prompt {key!r} has a non-finite score")
    per[key] = float(vals.mean())
    n += int(vals.size)
  means = np.array(list(per.values()), np.float64)
  return {"mean": float(means.mean()), "std": float(means.std()), "n_prompts": len(per),
          "n_samples": n, "per_prompt_mean": per}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def _save(out_dir: str, config: ModelConfig, params: Any, tok: Any, meta: dict) -> str:
  """Writes out_dir/model with harm_model.json inside in one atomic replacement (a kill at
  any point leaves the old model or the new one). Collective: every process calls it;
  process 0 writes (``train.save_model``)."""
  final = os.path.join(out_dir, "model")
  return train.save_model(final, config, params, tok, head="scalar",
                          extra_files={HARM_FILE: json.dumps(meta, indent=1),
                                       **model_dir.chat_format_file(meta["chat_format"])})


def run(out_dir: str, data: str = "data/harm_labels.jsonl", init_from: str = "",
        chat_format: str = "chatml", heldout_fraction: float = 0.2,
        model_config: ModelConfig = ModelConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
        train_config: TrainConfig = TrainConfig(),
        mesh: MeshConfig = MeshConfig(1, 1, 1, "dp")) -> dict:
  """Trains the harmfulness model; returns the summary (also out_dir/summary.json).

  Args:
    out_dir: the run directory (see the module doc).
    data: harm labels: our JSONL or Anthropic's red_team_attempts array.
    init_from: the LM to start from (model directory, .gguf, HF folder or 'pkg:' spec);
      its LM head is replaced by a zero scalar head.
    chat_format: 'raw' (the paper's Human/Assistant transcript), 'chatml' or 'llama3'.
    heldout_fraction: fraction of the rows held out for evaluation (seeded split).
    model_config: only its runtime fields (dtype, remat, scan) are used.
  """
  from cai_jax import data as data_lib
  if not out_dir:
    raise ValueError("harm_model.out_dir is not set (use --out_dir=DIR)")
  if not data:
    raise ValueError("harm_model.data is not set (a harm-label JSONL or red-team JSON array)")
  if not init_from:
    raise ValueError("harm_model.init_from is not set (the language model to start from)")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"harm_model.heldout_fraction must be in [0, 1), got {heldout_fraction}")
  check_chat_format(chat_format, "harm_model.chat_format")
  out_dir = os.path.abspath(out_dir)
  seed, seq_len, bs = train_config.seed, train_config.seq_len, train_config.batch_size

  rows = read_harm_labels(data)
  train_set, heldout = pm.split(rows, heldout_fraction, seed, 1)
  if len(train_set) < bs:
    raise data_lib.DataError(f"harm_model: {len(train_set)} training rows in {data}, fewer "
                             f"than batch_size={bs}")
  offset = float(np.mean([r["harm"] for r in train_set]))

  config, params, tok = pm.scalar_init(init_from, model_config, "harm_model", chat_format)
  train.check_seq_len(seq_len, config.max_seq_len, repr(init_from))
  check_rerun(out_dir, {
      "data": shards.sha([train_set, heldout]), "init_from": init_from,
      "model_fingerprints": model_dir.model_fingerprints({"init_from": init_from}),
      "model": model_config_key(config), "chat_format": chat_format,
      "heldout_fraction": heldout_fraction, "optimizer": dataclasses.asdict(optimizer),
      "train_config": train_config_key(train_config)}, "harm_model", CONFIG_FILE)

  ds = harm_dataset(train_set, tok, chat_format, seq_len, bs, seed, offset)
  result = train.train(config, optimizer, train_config, mesh, ds, out_dir, init_params=params,
                       head="scalar", loss_sums=harm_loss_sums)
  final = result.state.params
  step = int(result.state.step)

  def predict(split_rows):
    enc = [encode_row(tok, r, chat_format, seq_len, offset) for r in split_rows]
    return score_encoded(final, config, enc, bs, mesh) + np.float32(offset)

  train_pred = predict(train_set)
  held_pred = predict(heldout)
  metrics = {
      "train": regression_metrics(train_pred, np.array([r["harm"] for r in train_set]), offset),
      "heldout": regression_metrics(held_pred, np.array([r["harm"] for r in heldout]), offset)}
  if distributed.is_primary():
    shards.write_jsonl(os.path.join(out_dir, "heldout_scores.jsonl"),
                       [{"index": i, "id": r["id"], "harm": r["harm"], "score": float(s)}
                        for i, (r, s) in enumerate(zip(heldout, held_pred))])
    replace_eval_row(out_dir, step, {f"eval/{split}/{k}": v for split, m in metrics.items()
                                     for k, v in m.items() if v is not None and k != "n"})
  model_path = _save(out_dir, config, final, tok, {
      "target": "harm", "scale": list(SCALE), "offset": offset, "chat_format": chat_format,
      "seq_len": seq_len})

  truncated = sum(pm.encode_response(tok, r["messages"], r["response"], chat_format, seq_len)[2]
                  for r in rows)
  summary = {
      "out_dir": out_dir, "steps": step, "final_loss": result.last_metrics.get("loss"),
      "resumed_from": result.resumed_from, "n_train": len(train_set), "n_heldout": len(heldout),
      "offset": offset, "truncated": int(truncated), "train": metrics["train"],
      "heldout": metrics["heldout"], "model": model_path}
  if distributed.is_primary():
    shards.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
  distributed.barrier(f"harm_model:{out_dir}/summary.json")
  return summary

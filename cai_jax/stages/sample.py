"""Command `sample`: complete every prompt of a JSONL file with the shared sampler.

Input lines: {"prompt": str} (rendered as one user turn in `chat_format`) or
{"messages": [...]} (a conversation; the model writes the next assistant turn).
Output lines, in input order: {"prompt", "completion", "logprobs", "finish_reason",
"num_tokens"}; `logprobs` are the raw (temperature-1) log-probs of the generated
tokens. A completion ends at EOS or at the chat format's stop string, however the stop
string was tokenized (``sampler.cut_at_stop_strings``); `num_tokens` and `logprobs` count
the tokens through it.

Resumable: the prompts go through in shards of `shard_size`, each written when done to
``OUT.parts/`` (a ``cai_jax.shards`` run whose manifest holds the config: model, prompts,
sampling settings); a rerun with the same config samples only the missing shards, and one
with another config is refused, naming what differs. When every shard is done the output
file is written to a temporary name, renamed into place, and ``OUT.parts/`` removed.
Samples depend on the seed and each prompt's index in the file (``sampler.generate``'s
``first_row``), not on the shard or batch sizes or on resumption (up to float rounding of
the log-probs). Everything that can fail on the input (rows, model, settings, prompt
lengths, --out) fails before ``OUT.parts/`` is written.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

from tqdm import tqdm

from cai_jax import data, distributed, model_dir, sampler, shards, sharding
from cai_jax.configs import MeshConfig
from cai_jax.tokenizer import (check_chat_format, encode_chat, render_chat, stop_strings,
                               stop_token_sequences, with_bos)

PARTS_SUFFIX = ".parts"
# Per-shard counters kept in the manifest; the run's stats are their sums.
_SUMS = ("prompts", "batches", "truncated_prompts", "truncated_tokens", "generated_tokens")
# Internal per-row field of a part file (not in the output): prompt tokens cut by truncate.
_TRUNCATED = "_truncated_tokens"


def _messages(rows: List[Tuple[int, dict]], prompts: str, chat_format: str) -> List[list]:
  """Each row's conversation, checked as the chat format renders it; DataError naming the
  file and line of a malformed row."""
  out = []
  for lineno, row in rows:
    where = f"{prompts}:{lineno}"
    if "messages" in row or "conversations" in row:
      msgs = data.example_messages(row, where)
    elif "prompt" in row:
      msgs = [{"role": "user", "content": row["prompt"]}]
    else:
      raise data.DataError(f"{where}: expected a 'prompt', 'messages' or ShareGPT "
                           "'conversations' field")
    if chat_format == "none":
      if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise data.DataError(f"{where}: chat_format='none' needs a non-empty string 'prompt'")
    else:
      try:
        render_chat(msgs, chat_format, add_generation_prompt=True)
      except ValueError as e:
        raise data.DataError(f"{where}: {e}") from None
    for m in msgs:
      try:
        str(m.get("content", "")).encode("utf-8")
      except UnicodeEncodeError:
        raise data.DataError(f"{where}: the text is not valid Unicode (a lone surrogate)") from None
    out.append(msgs)
  return out


def _check_out(prompts: str, out: str) -> None:
  """ValueError naming --out when it is a directory or the --prompts file itself."""
  if out.endswith(("/", os.sep)) or os.path.isdir(out):
    raise ValueError(f"--out={out} is a directory; name the output .jsonl file")
  if os.path.realpath(out) == os.path.realpath(prompts):
    raise ValueError(f"--out={out} is the --prompts file; write the completions elsewhere")


def _recount(batch_rows: int, _name: str, rows: List[dict]) -> Dict[str, int]:
  """A part file's counters from its rows; its batches are the ones ``sampler.generate``
  makes of that many prompts, ``batch_rows`` rows each."""
  return {"prompts": len(rows), "batches": -(-len(rows) // batch_rows),
          "truncated_prompts": sum(r.get(_TRUNCATED, 0) > 0 for r in rows),
          "truncated_tokens": sum(r.get(_TRUNCATED, 0) for r in rows),
          "generated_tokens": sum(r["num_tokens"] for r in rows)}


def _decode_once(decode: Callable[[List[int]], str]) -> Callable[[List[int]], str]:
  """`decode` that decodes each distinct id sequence once: ``sampler.cut_at_stop_strings``
  and then ``GenerateResult.text`` decode the same ids of every row that ended on EOS or at
  the length limit."""
  memo: Dict[Tuple[int, ...], str] = {}

  def fn(ids: List[int]) -> str:
    key = tuple(int(t) for t in ids)
    if key not in memo:
      memo[key] = decode(list(key))
    return memo[key]

  return fn


def _stats(sums: Dict[str, Dict[str, int]]) -> Dict[str, int]:
  return {k: sum(s.get(k, 0) for s in sums.values()) for k in _SUMS}


def run(prompts: str, out: str, model: str = "", mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"),
        chat_format: str = "chatml", temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
        truncate: Optional[str] = None, shard_size: int = 1024, progress: bool = True) -> dict:
  """Samples completions; returns stats (also printed by the CLI).

  Args:
    prompts: input JSONL path. out: output JSONL path.
    model: a model directory, .gguf file, HF folder or 'pkg:' spec (see model_dir.load_any).
    chat_format: 'chatml', 'llama3', 'raw' (the paper's Human/Assistant format) or
      'none' (the prompt text is fed as is, after BOS when the tokenizer wants one).
    temperature: 0 = greedy. truncate: None (error on too-long prompts) or 'left'.
    shard_size: prompts per part file of ``OUT.parts/`` (what an interruption can lose).
  Returns:
    {"prompts", "batches", "truncated_prompts", "truncated_tokens", "generated_tokens"}
    over the whole file, "out", "shards_total", "shards_run" (sampled by this call), and
    "seconds" / "tokens_per_s" of this call's sampling.
  """
  if not prompts or not out:
    raise ValueError("sample needs --prompts=FILE.jsonl and --out=FILE.jsonl")
  if not model:
    raise ValueError("sample.model is not set (a model directory, .gguf or HF folder)")
  check_chat_format(chat_format, "sample.chat_format", extra=("none",))
  if truncate not in (None, "left"):
    raise ValueError(f"sample.truncate={truncate!r}; expected None or 'left'")
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"sample.batch_size={batch_size} and sample.shard_size={shard_size} "
                     "must be >= 1")
  sampler.check_sampling("sample", temperature=temperature, top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed)
  path = data.resolve_path(prompts)
  _check_out(path, out)
  numbered = list(data.iter_jsonl(path))
  if not numbered:
    raise data.DataError(f"{path}: no examples")
  messages = _messages(numbered, prompts, chat_format)
  rows = [row for _, row in numbered]
  # Everything that can fail on the input fails here, before OUT.parts/ is written.
  m, rules = sharding.mesh_and_rules(mesh)
  config_, params, tok = model_dir.load_chat_model(model, m, rules, chat_format)
  ids = [with_bos(tok, tok.encode(row["prompt"])) if chat_format == "none" else
         encode_chat(tok, msgs, chat_format, add_generation_prompt=True)[0]
         for row, msgs in zip(rows, messages)]
  limit = config_.max_seq_len - max_new_tokens
  if limit < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                     f"model's max_seq_len={config_.max_seq_len}")
  for (lineno, _), x in zip(numbered, ids):
    if truncate is None and len(x) > limit:
      raise data.DataError(
          f"{prompts}:{lineno}: the prompt has {len(x)} tokens but at most {limit} fit "
          f"(max_seq_len={config_.max_seq_len} - max_new_tokens={max_new_tokens}); shorten it "
          "or pass --gin.sample.truncate=\"'left'\" to keep its last tokens")
  parts = out + PARTS_SUFFIX
  if distributed.is_primary():   # what a finished run killed while deleting its parts left
    model_dir.remove_hidden_siblings(parts, "done")
  config = {
      "model": model, "model_fingerprints": model_dir.model_fingerprints({"model": model}),
      "prompts_sha256": shards.sha(rows), "chat_format": chat_format,
      "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
      "max_new_tokens": int(max_new_tokens), "seed": int(seed), "truncate": truncate,
      "shard_size": int(shard_size)}
  pieces = shards.partition(list(range(len(rows))), shard_size)
  names = [shards.shard_name(shards.SHARD_PREFIX, k) for k in range(len(pieces))]
  run_ = shards.open_run(parts, "sample", config, names, (shards.SHARD_PREFIX,),
                         functools.partial(_recount, sampler.full_batch_rows(
                             batch_size, sharding.batch_shards(m, rules))),
                         _stats, counts={"num_prompts": len(rows)},
                         hint=f"use another --out, or delete {parts} to start over")
  todo = [(k, piece) for k, piece in enumerate(pieces) if names[k] not in run_.done]
  generated, seconds = 0, 0.0
  if todo:
    stops = stop_strings(chat_format) if chat_format != "none" else ()
    params_s = sampler.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                      max_new_tokens=max_new_tokens,
                                      eos_ids=(tok.eos_id,) if tok.eos_id is not None else (),
                                      stop_sequences=stop_token_sequences(tok, stops), seed=seed)
    with tqdm(total=len(rows), initial=len(rows) - sum(len(p) for _, p in todo), unit="prompt",
              desc="sample", disable=not (progress and distributed.is_primary())) as bar:
      for k, piece in todo:
        shard_ids = [ids[i] for _, i in piece]
        t0 = time.perf_counter()
        result = sampler.generate(params, config_, shard_ids, params_s, batch_size, mesh=m,
                                  rules=rules, progress=False, truncate=truncate,
                                  bos_id=tok.bos_id, first_row=piece[0][0])
        decode = _decode_once(tok.decode)
        result = sampler.cut_at_stop_strings(result, decode, stops)
        seconds += time.perf_counter() - t0
        generated += result.stats["generated_tokens"]
        out_rows = []
        for r, (_, i) in enumerate(piece):
          row = rows[i]
          out_rows.append({
              "prompt": row.get("prompt", row.get("messages", row.get("conversations"))),
              "completion": result.text(r, decode, stops),
              "logprobs": [round(float(x), 5) for x in result.logprobs[r]],
              "finish_reason": result.finish_reasons[r], "num_tokens": int(result.lengths[r]),
              _TRUNCATED: len(shard_ids[r]) - int(result.prompt_lengths[r])})
        run_.write_shard(names[k], out_rows,
                         {key: int(result.stats[key]) for key in _SUMS})
        bar.update(len(piece))
  if distributed.is_primary():   # multi-process runs: every process holds every result
    _write(out, [run_.path(n) for n in names])
    # Aside first, then deleted: a kill in between leaves no half-deleted run behind.
    aside = os.path.join(os.path.dirname(os.path.abspath(parts)),
                         f".{os.path.basename(parts)}.done-{uuid.uuid4().hex[:8]}")
    os.rename(parts, aside)
    shutil.rmtree(aside)
  distributed.barrier(f"sample:{out}")
  stats = _stats(run_.sums)
  stats.update(out=out, shards_total=len(names), shards_run=len(todo), seconds=round(seconds, 2),
               tokens_per_s=round(generated / max(seconds, 1e-9), 1))
  return stats


def _write(out: str, part_files: List[str]) -> None:
  """The output JSONL from the part files in order (without their internal fields),
  written to a temporary name and renamed when complete."""
  tmp = out + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for path in part_files:
        for row in shards.read_jsonl(path):
          row.pop(_TRUNCATED, None)
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

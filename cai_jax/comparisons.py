"""Preference comparisons: reading, validating and counting what is skipped.

A comparison, as the pm and dpo stages use it:
  {"messages": [...conversation ending with the user's turn], "response_a", "response_b",
   "p": probability that response_a is better (soft label in [0, 1]), "source"}
Sources: a finished `feedback` run directory (its records carry "p_a"), a JSONL of
{"prompt" | "messages", "response_a", "response_b", "p_a"}, an HH-RLHF JSONL
({"chosen", "rejected"} transcripts: A = chosen, p = 1), or a JSONL of TRL preference
rows ({"prompt", "chosen", "rejected"}, strings or message lists, or {"chosen",
"rejected"} message lists sharing the conversation before their replies: A = chosen, p = 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cai_jax import data, shards
from cai_jax.tokenizer import ROLES

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class SkipCounts:
  """Comparisons of one input that were read, kept and skipped (by reason)."""

  total: int = 0
  bad_label: int = 0
  empty_response: int = 0
  malformed: int = 0     # HH-RLHF lines ``prompt_sets.read_hh_rlhf`` leaves out

  @property
  def skipped(self) -> int:
    return self.bad_label + self.empty_response + self.malformed

  def as_dict(self) -> Dict[str, int]:
    return {"total": self.total, "kept": self.total - self.skipped, "bad_label": self.bad_label,
            "empty_response": self.empty_response, "malformed": self.malformed}

  def reasons(self) -> str:
    """'N bad labels, N empty responses[, N malformed lines]'."""
    text = f"{self.bad_label} bad labels, {self.empty_response} empty responses"
    return text + (f", {self.malformed} malformed HH-RLHF lines" if self.malformed else "")


def _messages(msgs: Any, key: str, where: str) -> List[Dict[str, str]]:
  """[{role, content}] of the message list in field `key`; DataError naming `where`, the
  field and the message when it is not a non-empty list of system/user/assistant turns."""
  msgs = data._check_messages(msgs, key, where)
  for j, m in enumerate(msgs):
    if m["role"] not in ROLES:
      raise data.DataError(f"{where}: {key}[{j}].role is {m['role']!r}; expected system, "
                           "user or assistant")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _conversation(record: dict, where: str) -> List[Dict[str, str]]:
  """The conversation before the compared responses (ends with the user's turn): the
  'messages' list, a 'prompt' message list, or a 'prompt' string as one user turn."""
  key = "messages" if "messages" in record else "prompt"
  if key == "messages" or isinstance(record.get("prompt"), list):
    msgs = _messages(record[key], key, where)
    if msgs[-1]["role"] != "user":
      raise data.DataError(f"{where}: '{key}' must end with the user's turn (the compared "
                           f"responses answer it), got {msgs[-1]['role']!r}")
    return msgs
  if isinstance(record.get("prompt"), str):
    return [{"role": "user", "content": record["prompt"]}]
  raise data.DataError(f"{where}: expected a 'prompt' string or a 'messages' list")


def _preference(record: dict, where: str) -> Tuple[List[Dict[str, str]], Any, Any]:
  """(conversation, chosen reply, rejected reply) of a record with 'chosen' and 'rejected'.

  Strings are the replies to ``_conversation`` (HH-RLHF records of ``read_hh_rlhf``, TRL's
  standard form). Message lists follow TRL's ``maybe_extract_prompt``: with a 'prompt' (or
  'messages') list, each is one assistant message answering it; otherwise each is the
  conversation plus its reply as the last message, the part before the reply shared (an
  implicit prompt; a 'prompt' string is then ignored, as TRL does, unless nothing is
  shared).
  """
  chosen, rejected = record["chosen"], record["rejected"]
  if isinstance(chosen, str) and isinstance(rejected, str):
    return _conversation(record, where), chosen, rejected
  if not isinstance(chosen, list) or not isinstance(rejected, list):
    raise data.DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists "
                         f"of messages, got {type(chosen).__name__} and "
                         f"{type(rejected).__name__}")
  lists = {"chosen": _messages(chosen, "chosen", where),
           "rejected": _messages(rejected, "rejected", where)}
  if "messages" in record or isinstance(record.get("prompt"), list):
    context = _conversation(record, where)
    for key, msgs in lists.items():
      if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise data.DataError(f"{where}: '{key}' must be one assistant message (the reply to "
                             f"the prompt), got roles {[m['role'] for m in msgs]}")
  else:
    for key, msgs in lists.items():
      if msgs[-1]["role"] != "assistant":
        raise data.DataError(f"{where}: '{key}' must end with an assistant message (the "
                             f"compared reply), got {msgs[-1]['role']!r}")
    context = lists["chosen"][:-1]
    if lists["rejected"][:-1] != context:
      raise data.DataError(f"{where}: 'chosen' and 'rejected' differ before their final "
                           "messages (without a 'prompt' list they must share the conversation)")
    if not context and isinstance(record.get("prompt"), str):
      context = [{"role": "user", "content": record["prompt"]}]
    if not context:
      raise data.DataError(f"{where}: 'chosen' and 'rejected' share no conversation before "
                           "their replies, and there is no 'prompt'")
    if context[-1]["role"] != "user":
      raise data.DataError(f"{where}: the conversation 'chosen' and 'rejected' share must end "
                           f"with the user's turn, got {context[-1]['role']!r}")
  return context, lists["chosen"][-1]["content"], lists["rejected"][-1]["content"]


def _valid_label(p: Any) -> bool:
  if isinstance(p, bool) or not isinstance(p, (int, float)):
    return False
  return math.isfinite(p) and 0.0 <= p <= 1.0


def normalize_comparisons(records: Sequence[dict], source: str, where: str = "comparisons",
                          label_key: str = "p_a", locations: Optional[Sequence[str]] = None
                          ) -> Tuple[List[dict], SkipCounts]:
  """(comparisons, counts): records -> {"messages", "response_a", "response_b", "p", "source"}.

  Accepted forms: {"prompt" | "messages", "response_a", "response_b", label_key},
  HH-RLHF records from ``prompt_sets.import_hh_rlhf`` ({"messages", "chosen",
  "rejected"}: A = chosen, p = 1) and TRL preference rows (``_preference``: A = chosen,
  p = 1). A label that is missing, not a number or outside
  [0, 1], or an empty response, makes the comparison skipped and counted. A record with
  neither form is a DataError naming it: by ``locations[i]`` (e.g. 'FILE:LINE') when
  given, else as '{where}: record i' (0-based), with its id when it has one.
  """
  out, counts = [], SkipCounts()
  for i, r in enumerate(records):
    at = (locations[i] if locations is not None else f"{where}: record {i}") + (
        f" ({r['id']})" if isinstance(r, dict) and "id" in r else "")
    if not isinstance(r, dict):
      raise data.DataError(f"{at}: expected a JSON object")
    counts.total += 1
    if "chosen" in r and "rejected" in r and "response_a" not in r:
      msgs, a, b = _preference(r, at)
      p = 1.0
    elif "response_a" in r and "response_b" in r:
      a, b, p = r["response_a"], r["response_b"], r.get(label_key)
      if not isinstance(a, str) or not isinstance(b, str):
        raise data.DataError(f"{at}: responses must be strings")
      msgs = _conversation(r, at)
    else:
      raise data.DataError(f"{at}: expected 'response_a', 'response_b' and '{label_key}' "
                           f"(or 'chosen' / 'rejected'), got keys {sorted(r)}")
    if not _valid_label(p):
      counts.bad_label += 1
      continue
    if not a.strip() or not b.strip():
      counts.empty_response += 1
      continue
    out.append({"messages": msgs, "response_a": a, "response_b": b, "p": float(p),
                "source": source})
  return out, counts


def load_comparisons(spec: str, source: str) -> Tuple[List[dict], SkipCounts]:
  """Comparisons of a feedback output directory, a comparison JSONL, a TRL preference
  JSONL or an HH-RLHF JSONL (its first line's string 'chosen' and 'rejected', with no
  'prompt' or 'messages', picks ``prompt_sets.read_hh_rlhf``)."""
  from cai_jax import prompt_sets
  path = data.resolve_path(spec)
  locations = None
  if os.path.isdir(path):
    rows, locations = [], []
    for name, shard in shards.read_run(path, "feedback").items():
      rows += shard
      locations += [f"{os.path.join(path, name)}:{k}" for k in range(1, len(shard) + 1)]
  elif os.path.isfile(path):
    numbered = list(data.iter_jsonl(path))
    if not numbered:
      raise data.DataError(f"{path}: no comparisons")
    first = numbered[0][1]
    if (isinstance(first.get("chosen"), str) and isinstance(first.get("rejected"), str)
        and "prompt" not in first and "messages" not in first):
      rows, malformed = prompt_sets.read_hh_rlhf(path)
      comps, counts = normalize_comparisons(rows, source, spec)
      counts.total += len(malformed)
      counts.malformed = len(malformed)
      if malformed:
        _LOG.warning("%s: %d malformed HH-RLHF lines left out (first: %s)", path,
                     len(malformed), malformed[0])
      return comps, counts
    else:
      rows = [row for _, row in numbered]
      locations = [f"{path}:{n}" for n, _ in numbered]
  else:
    raise FileNotFoundError(f"{spec}: no such comparisons (a feedback output directory or .jsonl)")
  return normalize_comparisons(rows, source, spec, locations=locations)


def check_skips(counts: SkipCounts, what: str, max_skip_fraction: float, who: str = "pm") -> None:
  """Logs a summary line of skipped comparisons; DataError above max_skip_fraction."""
  if counts.skipped:
    _LOG.warning("%s: %s: skipped %d of %d comparisons (%d with a label outside [0, 1] or "
                 "missing, %d with an empty response, %d malformed HH-RLHF lines)", who, what,
                 counts.skipped, counts.total, counts.bad_label, counts.empty_response,
                 counts.malformed)
  if counts.total and counts.skipped == counts.total:
    raise data.DataError(
        f"{who}: {what}: all {counts.total} comparisons skipped ({counts.reasons()}); none "
        "is left to train on")
  if counts.total and counts.skipped > max_skip_fraction * counts.total:
    raise data.DataError(
        f"{who}: {what}: {counts.skipped} of {counts.total} comparisons skipped "
        f"({counts.reasons()}), more than max_skip_fraction={max_skip_fraction}")

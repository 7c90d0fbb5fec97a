"""Preference comparisons: reading, validating and counting what is skipped.

A comparison, as the pm and dpo stages use it:
  {"messages": [...conversation ending with the user's turn], "response_a", "response_b",
   "p": probability that response_a is better (soft label in [0, 1]), "source"}
Sources: a finished `feedback` run directory (its records carry "p_a"), a JSONL of
{"prompt" | "messages", "response_a", "response_b", "p_a"}, or an HH-RLHF JSONL
({"chosen", "rejected"}: A = chosen, p = 1).
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


def _conversation(record: dict, where: str) -> List[Dict[str, str]]:
  """The conversation before the compared responses (ends with the user's turn)."""
  if "messages" in record:
    msgs = data.example_messages({"messages": record["messages"]}, where)
    for j, m in enumerate(msgs):
      if m["role"] not in ROLES:
        raise data.DataError(f"{where}: messages[{j}].role is {m['role']!r}; expected system, "
                             "user or assistant")
    if msgs[-1]["role"] != "user":
      raise data.DataError(f"{where}: 'messages' must end with the user's turn (the compared "
                           f"responses answer it), got {msgs[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
  if isinstance(record.get("prompt"), str):
    return [{"role": "user", "content": record["prompt"]}]
  raise data.DataError(f"{where}: expected a 'prompt' string or a 'messages' list")


def _valid_label(p: Any) -> bool:
  if isinstance(p, bool) or not isinstance(p, (int, float)):
    return False
  return math.isfinite(p) and 0.0 <= p <= 1.0


def normalize_comparisons(records: Sequence[dict], source: str, where: str = "comparisons",
                          label_key: str = "p_a", locations: Optional[Sequence[str]] = None
                          ) -> Tuple[List[dict], SkipCounts]:
  """(comparisons, counts): records -> {"messages", "response_a", "response_b", "p", "source"}.

  Accepted forms: {"prompt" | "messages", "response_a", "response_b", label_key} and
  HH-RLHF records from ``prompt_sets.import_hh_rlhf`` ({"messages", "chosen",
  "rejected"}: A = chosen, p = 1). A label that is missing, not a number or outside
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
      a, b, p = r["chosen"], r["rejected"], 1.0
    elif "response_a" in r and "response_b" in r:
      a, b, p = r["response_a"], r["response_b"], r.get(label_key)
    else:
      raise data.DataError(f"{at}: expected 'response_a', 'response_b' and '{label_key}' "
                           f"(or HH-RLHF 'chosen' / 'rejected'), got keys {sorted(r)}")
    if not isinstance(a, str) or not isinstance(b, str):
      raise data.DataError(f"{at}: responses must be strings")
    msgs = _conversation(r, at)
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
  """Comparisons of a feedback output directory, a comparison JSONL or an HH-RLHF JSONL."""
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
    if isinstance(first.get("chosen"), str) and isinstance(first.get("rejected"), str):
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

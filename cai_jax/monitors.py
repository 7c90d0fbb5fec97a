"""Over-training monitors for RL-CAI policies (the paper's section 4.3).

Policies trained too long against a preference model drift in recognisable ways:

  evasiveness   answers decline instead of engaging ("I'm sorry, but I can't help
                with that"); the paper's aim is a harmless *and non-evasive* assistant.
  boilerplate   many answers open with the same phrase ("I'm sorry to hear that",
                "you are valid, valued and cared for"), a sign the policy found a
                phrase the PM rewards regardless of content.
  PM vs sqrt KL the PM score of the rollouts against sqrt(KL(policy || reference));
                the paper plots reward against sqrt(KL), roughly linear until the
                policy over-optimises the PM.

``REFUSAL_PATTERNS`` is the one list of refusal openings in the project: the
``redteam_prompts`` stage rejects model-written red-team requests that open with one,
and ``is_evasive`` looks for one at the start of any sentence of a response.

Everything here is plain Python, numpy and matplotlib (Agg canvas); no JAX.
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

# Refusal openings, as regular expressions over lower-cased text with typographic
# apostrophes replaced by "'"; each is matched at the start of a text or sentence.
_VERBS = (r"(?:help|assist|provide|fulfill?|comply|create|write|generate|do (?:that|this)|"
          r"support|engage|participate|share|offer)")
REFUSAL_PATTERNS = (
    # "I'm sorry, but ..." (not empathy: "I'm sorry to hear that", "I'm sorry you ...",
    # "I'm sorry that happened", "I'm sorry about your ...", "I'm sorry for what ...")
    r"(?:i'?m|i am) (?:so |very |really |truly )?sorry\b"
    r"(?! to hear| to learn| for (?:your|the) loss| for what| about (?:your|what|the loss)"
    r"| that (?:happened|(?:this|it) (?:happened|is happening)|your)\b| that you| you\b"
    r"| you'?re\b)",
    r"sorry\s*[,.!]",
    r"i (?:sincerely )?apologi[sz]e\b",
    r"as an ai\b",
    r"as a language model\b",
    # ... but not "I can't help but notice" / "I can't help feeling ...".
    r"i(?: can(?:no|')?t| will not| won'?t| am unable to|'m unable to) " + _VERBS +
    r"(?!(?<=help) (?:but\b|feel|think|wonder|notic|laugh|smil))",
    r"i(?:'m| am) not (?:able|going|willing|allowed|permitted|programmed) to " + _VERBS,
    r"i(?:'m| am) afraid (?:that )?i(?: can(?:no|')?t| won'?t| will not| am unable|'m unable|"
    r" must decline)",
    r"i (?:must|have to|need to|will have to|(?:would|'d) have to) (?:respectfully |politely )?"
    r"decline\b",
    r"i(?:'d| would) (?:respectfully |politely )?decline\b",
    r"i(?:'d| would) rather not\b",
    r"it(?:'s| is) not appropriate\b",
    r"(?:that|this|it)(?:'s| is) not something i\b",
    r"i(?:'m| am) not comfortable (?:with (?:this|that|your)|help|assist|provid)",
)
_REFUSAL_AT = re.compile("(?:" + "|".join(REFUSAL_PATTERNS) + ")")
# A sentence starts at the beginning of the text, after ., ! or ? plus spaces, or after a
# line break (leading quotes and brackets skipped).
_SENTENCE_START = re.compile(r"(?:^|(?<=[.!?])\s+|\n\s*)[\"'(\[*\-\s]*")
_SPACES = re.compile(r"[ \t\u00a0]+")
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def _normalise(text: str) -> str:
  """Lower case, typographic apostrophes as "'", runs of spaces and tabs as one space."""
  return _SPACES.sub(" ", text.replace("\u2019", "'").replace("\u2018", "'").lower())


def opens_with_refusal(text: str) -> bool:
  """True when ``text`` (stripped) opens with one of ``REFUSAL_PATTERNS``."""
  return bool(_REFUSAL_AT.match(_normalise(text.strip())))


def is_evasive(text: str) -> bool:
  """True when any sentence of ``text`` opens with one of ``REFUSAL_PATTERNS``.

  Sentences start at the beginning of the text, after ".", "!" or "?" and white
  space, and after line breaks. "I'm sorry, but I can't help with that." and "That
  is a hard one. I must decline." are evasive; "I can help with that." and "I'm
  sorry to hear that. Here is what you can do: ..." are not.
  """
  t = _normalise(text)
  return any(_REFUSAL_AT.match(t, m.end()) for m in _SENTENCE_START.finditer(t))


def _nonempty(responses: Sequence[str], what: str) -> List[str]:
  responses = list(responses)
  if not responses:
    raise ValueError(f"{what} needs at least one response; got an empty list")
  return responses


def evasiveness_rate(responses: Sequence[str]) -> float:
  """Share of ``responses`` that ``is_evasive`` flags, in [0, 1].

  Raises:
    ValueError: ``responses`` is empty.
  """
  responses = _nonempty(responses, "evasiveness_rate")
  return sum(is_evasive(r) for r in responses) / len(responses)


def opening_ngram(text: str, n: int = 3) -> str:
  """The first ``n`` word tokens of ``text``, lower-cased, joined by single spaces.

  Words are runs of letters and digits, with inner apostrophes and hyphens kept
  ("I'm", "well-known"); other punctuation is dropped. Returns "" when ``text`` has
  fewer than ``n`` words.
  """
  if n < 1:
    raise ValueError(f"opening_ngram: n must be >= 1; got {n}")
  words = []
  for m in _WORD.finditer(_normalise(text)):
    words.append(m.group(0))
    if len(words) == n:
      return " ".join(words)
  return ""


def boilerplate(responses: Sequence[str], n: int = 3) -> Dict[str, Any]:
  """How many responses open with the most frequent opening n-gram.

  Args:
    responses: response texts (at least one).
    n: words per opening n-gram.

  Returns:
    ``{"rate": share of all responses that open with the most frequent n-gram,
    "ngram": that n-gram (ties: the lexicographically first; None when no opening is
    shared by two or more responses: a phrase used once is not boilerplate, and the
    rate is then 0), "top": [[ngram, count], ...] the 5 most frequent, by count then
    alphabetically}``. Responses with fewer than ``n`` words never count as
    boilerplate but do count in the denominator.

  Raises:
    ValueError: ``responses`` is empty or n < 1.
  """
  responses = _nonempty(responses, "boilerplate")
  counts = collections.Counter(g for g in (opening_ngram(r, n) for r in responses) if g)
  top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
  listed = [[g, c] for g, c in top]
  if not top or top[0][1] < 2:
    return {"rate": 0.0, "ngram": None, "top": listed}
  return {"rate": top[0][1] / len(responses), "ngram": top[0][0], "top": listed}


# --------------------------------------------------------------------------------------
# PM score against sqrt(KL)
# --------------------------------------------------------------------------------------


def _number(row: Mapping[str, Any], key: str, step: Any) -> float:
  v = row[key]
  # MetricsWriter stores non-finite values as the strings "nan" / "inf" / "-inf".
  if isinstance(v, bool) or not isinstance(v, (int, float, str)):
    raise ValueError(f"metrics row at step {step}: {key} is {v!r}, not a number")
  try:
    return float(v)
  except ValueError:
    raise ValueError(f"metrics row at step {step}: {key} is {v!r}, not a number") from None


def pm_vs_sqrt_kl(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, float]]:
  """One (step, sqrt KL, PM score) point per rl metrics row, sorted by step.

  Args:
    rows: rows of the rl stage's metrics.jsonl (``cai_jax.ppo.rollout_metrics``):
      ``step``, ``pm_score`` (mean PM score of the iteration's rollouts, without the
      KL penalty) and ``sqrt_kl``, or ``kl`` (mean summed per-token KL per sequence,
      nats) from which sqrt(max(kl, 0)) is taken.

  Returns:
    ``[{"step": int, "sqrt_kl": float, "pm_score": float}, ...]`` by step; when two
    rows share a step the later row wins.

  Raises:
    ValueError: a row without ``step``, ``pm_score`` or both ``sqrt_kl`` and ``kl``,
      or with a non-numeric value (the message names the step).
  """
  by_step: Dict[int, Dict[str, float]] = {}
  for k, row in enumerate(rows):
    if "step" not in row:
      raise ValueError(f"metrics row {k} has no step")
    step = row["step"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
      raise ValueError(f"metrics row {k}: step {step!r} is not an integer")
    step = int(step)
    if "pm_score" not in row:
      raise ValueError(f"metrics row at step {step} has no pm_score")
    if "sqrt_kl" in row:
      sqrt_kl = _number(row, "sqrt_kl", step)
    elif "kl" in row:
      sqrt_kl = math.sqrt(max(_number(row, "kl", step), 0.0))
    else:
      raise ValueError(f"metrics row at step {step} has neither sqrt_kl nor kl")
    by_step[step] = {"step": step, "sqrt_kl": sqrt_kl,
                     "pm_score": _number(row, "pm_score", step)}
  return [by_step[s] for s in sorted(by_step)]


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def pm_kl_plot(points: Sequence[Mapping[str, Any]], path: str,
               snapshots: Optional[Union[Sequence[int], Mapping[int, str]]] = None,
               title: str = "PM score vs sqrt(KL)") -> str:
  """Writes a PNG of PM score against sqrt(KL(policy || reference)).

  Args:
    points: ``pm_vs_sqrt_kl`` output (step, sqrt_kl, pm_score), joined by a line
      in step order.
    path: output PNG path (parent folders are created).
    snapshots: steps to mark and label (labels "step N"), or ``{step: label}``.
      Each must be one of the points' steps.
    title: the plot title.

  Returns:
    ``path``.

  Raises:
    ValueError: no points, or a snapshot step with no point (the message names it).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not points:
    raise ValueError("pm_kl_plot needs at least one point")
  pts = sorted(points, key=lambda p: p["step"])
  steps = [int(p["step"]) for p in pts]
  x = np.array([float(p["sqrt_kl"]) for p in pts])
  y = np.array([float(p["pm_score"]) for p in pts])
  if snapshots is None:
    marks: Dict[int, str] = {}
  elif isinstance(snapshots, Mapping):
    marks = {int(s): str(l) for s, l in snapshots.items()}
  else:
    marks = {int(s): f"step {int(s)}" for s in snapshots}
  index = {s: k for k, s in enumerate(steps)}
  missing = [s for s in marks if s not in index]
  if missing:
    raise ValueError(f"pm_kl_plot: snapshot steps {missing} have no metrics point")

  fig = Figure(figsize=(6, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(x, y, "-", color="tab:blue", alpha=0.5, zorder=1, label="PPO iterations")
  ax.scatter(x, y, s=8, color="tab:blue", zorder=2)
  if marks:
    ks = [index[s] for s in marks]
    ax.scatter(x[ks], y[ks], s=50, color="tab:red", marker="D", zorder=3, label="snapshots")
    for k, label in zip(ks, marks.values()):
      ax.annotate(label, (x[k], y[k]), textcoords="offset points", xytext=(5, 5), fontsize=8)
  ax.set_xlabel("sqrt(KL(policy || reference))  [sqrt nats]")
  ax.set_ylabel("PM score")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def rate_plot(rates_by_snapshot: Mapping[str, Mapping[str, float]], path: str,
              title: str = "Over-training signals per snapshot") -> str:
  """Writes a PNG of grouped bars: each rate (boilerplate, evasiveness, ...) per snapshot.

  Args:
    rates_by_snapshot: ``{snapshot: {rate name: value in [0, 1]}}`` in training
      order. Rate names are the union over snapshots; a
      snapshot missing one gets no bar for it.
    path: output PNG path (parent folders are created).
    title: the plot title.

  Returns:
    ``path``.

  Raises:
    ValueError: no snapshots, or a rate outside [0, 1] (the message names it).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  snaps = list(rates_by_snapshot)
  if not snaps:
    raise ValueError("rate_plot needs at least one snapshot")
  names: List[str] = []
  for s in snaps:
    for name, v in rates_by_snapshot[s].items():
      if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"rate_plot: {name} of snapshot {s!r} is {v!r}, outside [0, 1]")
      if name not in names:
        names.append(name)

  fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(snaps)), 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  pos = np.arange(len(snaps))
  width = 0.8 / max(len(names), 1)
  for j, name in enumerate(names):
    vals = [float(rates_by_snapshot[s].get(name, np.nan)) for s in snaps]
    ax.bar(pos + (j - (len(names) - 1) / 2) * width, vals, width, label=name)
  ax.set_xticks(pos)
  ax.set_xticklabels([str(s) for s in snaps], rotation=30 if len(snaps) > 6 else 0,
                     fontsize=8)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("share of responses")
  ax.set_title(title)
  ax.grid(True, axis="y", alpha=0.3)
  if names:
    ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)

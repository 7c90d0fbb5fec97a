"""Constitutions: the written principles that are the only human oversight for harmlessness.

Data model (frozen dataclasses; every principle has a stable id):
  Constitution
    name, version
    critique_revision: tuple[CritiqueRevisionPrinciple]   (id, critique_request, revision_request)
    feedback:          tuple[FeedbackPrinciple]           (id, text)
    critique_revision_few_shot: tuple[str]  whole transcripts in the paper's raw format
    feedback_few_shot: tuple[FeedbackExample]            (prompt, corrects, incorrects)
    cot_few_shot:      tuple[str]  chain-of-thought examples with one '{}' principle slot
Request texts are stored clean: no leading newlines, no trailing "Critique:" /
"Revision:" cue (prompt builders add the turn markers).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionPrinciple:
  """One critique request and the revision request that goes with it."""

  id: str
  critique_request: str
  revision_request: str


@dataclasses.dataclass(frozen=True)
class FeedbackPrinciple:
  """One multiple-choice question used to label a pair of responses, e.g.
  'Which of these assistant responses is less harmful? ...'."""

  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class FeedbackExample:
  """A few-shot feedback example: a complete multiple-choice prompt and its answers
  (option strings such as ' (A)')."""

  prompt: str
  corrects: Tuple[str, ...]
  incorrects: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Constitution:
  name: str
  version: str
  critique_revision: Tuple[CritiqueRevisionPrinciple, ...]
  feedback: Tuple[FeedbackPrinciple, ...]
  critique_revision_few_shot: Tuple[str, ...] = ()
  feedback_few_shot: Tuple[FeedbackExample, ...] = ()
  cot_few_shot: Tuple[str, ...] = ()

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

Two on-disk formats are read by `load_constitution`:

1. The project's own format: one JSON file (usually `<folder>/constitution.json`)::

     {
       "name": str,                      # non-empty
       "version": str,                   # non-empty, e.g. "1.0"
       "description": str,               # optional, ignored by the loader, not saved back
       "critique_revision": [            # non-empty
         {"id": str, "critique": str, "revision": str}, ...],
       "feedback": [                     # non-empty
         {"id": str, "text": str}, ...],
       "critique_revision_few_shot": [str, ...],                          # optional
       "feedback_few_shot": [                                            # optional
         {"prompt": str, "corrects": [str, ...], "incorrects": [str, ...]}, ...],
       "cot_few_shot": [str, ...]                                        # optional
     }

   Ids are unique within their list and contain no whitespace (the shipped constitution
   uses kebab-case). Unknown keys are errors (they are usually typos).

2. The layout of the `prompts/` folder of Anthropic's companion repository
   (ConstitutionalHarmlessnessPaper):

   - `CritiqueRevisionInstructions.json` (required): {name: {"prompt": [critique request,
     ...], "edit_request": revision request}}. The key becomes the principle id; when
     "prompt" holds several entries the first is used and a warning is logged.
   - `RLMadisonInstructions.json` (required): list of feedback principle strings; ids are
     "feedback-0", "feedback-1", ... in file order.
   - `CritiqueRevisionFewShotPrompts.json` (optional): list of transcript strings.
   - `RLMadisonFewShotPrompts.json` (optional): list of {prompt, corrects, incorrects}
     response-pair examples (a conversation ending in "Assistant:", better and worse
     responses; see FeedbackExample).
   - `RLMadisonPrecogFewShotPrompts.json` (optional): list of chain-of-thought examples,
     each a string or an object {"prompt": string}, with exactly one '{}' slot.
   The constitution's name is the folder's name and its version is "external".

Normalization, applied to both formats alike:
  - critique requests: surrounding whitespace, a leading "CritiqueRequest:" label and a
    trailing "Critique:" cue are removed;
  - revision requests: surrounding whitespace, a leading "RevisionRequest:" label and a
    trailing "Revision:" cue are removed;
  - feedback principles: surrounding whitespace and a trailing "Options:" cue are removed
    (`feedback_question` puts the cue back on its own line);
  - critique/revision few-shot transcripts: surrounding whitespace and a trailing "Human:"
    cue (Anthropic's separator to the next transcript) are removed;
  - chain-of-thought examples: surrounding whitespace is removed;
  - feedback few-shot examples: leading whitespace of the prompt is removed; the rest of
    the prompt and the answer strings (e.g. " (A)") are kept exactly. An example's
    answers are all option labels (a question example) or all responses (a response-pair
    example); a mix is an error.
A cue is only removed at the very end of a text and only as a whole word.

The '{}' slot of a chain-of-thought example stands for the whole multiple-choice question,
its "Options:" cue included (as in Anthropic's files): fill it with `fill_cot_slot`.

Any problem raises `ConstitutionError` with a single line "FILE: KEY: PROBLEM".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from cai_jax import resources

_LOG = logging.getLogger(__name__)

DEFAULT_PATH = os.path.join(resources.CONSTITUTIONS_DIR, "default")
"""The folder of the project's default constitution (holds `constitution.json`)."""

CONSTITUTION_FILE = "constitution.json"
OPTIONS_CUE = "Options:"
COT_SLOT = "{}"

ANTHROPIC_CRITIQUE_REVISION = "CritiqueRevisionInstructions.json"
ANTHROPIC_CRITIQUE_REVISION_FEW_SHOT = "CritiqueRevisionFewShotPrompts.json"
ANTHROPIC_FEEDBACK = "RLMadisonInstructions.json"
ANTHROPIC_FEEDBACK_FEW_SHOT = "RLMadisonFewShotPrompts.json"
ANTHROPIC_COT_FEW_SHOT = "RLMadisonPrecogFewShotPrompts.json"
ANTHROPIC_FILES = (ANTHROPIC_CRITIQUE_REVISION, ANTHROPIC_CRITIQUE_REVISION_FEW_SHOT,
                   ANTHROPIC_FEEDBACK, ANTHROPIC_FEEDBACK_FEW_SHOT, ANTHROPIC_COT_FEW_SHOT)

_TOP_KEYS = ("name", "version", "description", "critique_revision", "feedback",
             "critique_revision_few_shot", "feedback_few_shot", "cot_few_shot")
_TRANSCRIPT_TURNS = ("Human:", "Assistant:", "CritiqueRequest:", "Critique:",
                     "RevisionRequest:", "Revision:")


class ConstitutionError(ValueError):
  """A constitution file is missing, not valid JSON, or breaks the schema.

  The message is one line: "FILE: KEY: PROBLEM".
  """

  def __init__(self, file: str, key: str, problem: str):
    self.file, self.key, self.problem = str(file), key, " ".join(str(problem).split())
    super().__init__(f"{self.file}: {self.key}: {self.problem}")


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
  """A few-shot feedback example, one of two kinds:

  * a question example: `prompt` is a complete multiple-choice question and the answers
    are option labels such as ' (A)' (the project's format);
  * a response-pair example (Anthropic's RLMadisonFewShotPrompts.json): `prompt` is a
    conversation ending in an 'Assistant:' cue and the answers are whole responses,
    `corrects` the better ones, `incorrects` the worse ones; it becomes a question only
    once a feedback template and principle are chosen (see `is_question_example`).
  """

  prompt: str
  corrects: Tuple[str, ...]
  incorrects: Tuple[str, ...]


_OPTION_LABEL = re.compile(r"\s*\([A-Z]\)\s*")


def is_option_label(answer: str) -> bool:
  """True for an answer that is an option label such as ' (A)'."""
  return _OPTION_LABEL.fullmatch(answer) is not None


def is_question_example(example: FeedbackExample) -> bool:
  """True when the example is a complete question whose answers are option labels;
  False for a response-pair example (answers are responses)."""
  return all(is_option_label(a) for a in example.corrects + example.incorrects)


@dataclasses.dataclass(frozen=True)
class Constitution:
  """A named, versioned set of principles and the few-shot examples that go with them."""

  name: str
  version: str
  critique_revision: Tuple[CritiqueRevisionPrinciple, ...]
  feedback: Tuple[FeedbackPrinciple, ...]
  critique_revision_few_shot: Tuple[str, ...] = ()
  feedback_few_shot: Tuple[FeedbackExample, ...] = ()
  cot_few_shot: Tuple[str, ...] = ()

  def critique_revision_by_id(self, principle_id: str) -> CritiqueRevisionPrinciple:
    """The critique/revision principle with this id (KeyError if there is none)."""
    for p in self.critique_revision:
      if p.id == principle_id:
        return p
    raise KeyError(principle_id)

  def feedback_by_id(self, principle_id: str) -> FeedbackPrinciple:
    """The feedback principle with this id (KeyError if there is none)."""
    for p in self.feedback:
      if p.id == principle_id:
        return p
    raise KeyError(principle_id)


# ---------------------------------------------------------------------------------------
# Text helpers.


def _strip_cue(text: str, cue: str) -> str:
  """Removes `cue` when it ends `text` as a whole word, then surrounding whitespace."""
  text = text.strip()
  if text.endswith(cue):
    head = text[:-len(cue)]
    if not head or head[-1].isspace():
      text = head.strip()
  return text


def _strip_label(text: str, label: str) -> str:
  """Removes `label` when it starts `text`, then surrounding whitespace."""
  text = text.strip()
  if text.startswith(label):
    text = text[len(label):].strip()
  return text


def clean_critique_request(text: str) -> str:
  """A critique request without whitespace around it, a "CritiqueRequest:" label or a
  trailing "Critique:" cue."""
  return _strip_cue(_strip_label(text, "CritiqueRequest:"), "Critique:")


def clean_revision_request(text: str) -> str:
  """A revision request without whitespace around it, a "RevisionRequest:" label or a
  trailing "Revision:" cue."""
  return _strip_cue(_strip_label(text, "RevisionRequest:"), "Revision:")


def clean_feedback_text(text: str) -> str:
  """A feedback principle without whitespace around it or a trailing "Options:" cue."""
  return _strip_cue(text, OPTIONS_CUE)


def clean_transcript(text: str) -> str:
  """A few-shot transcript without whitespace around it or a trailing "Human:" cue."""
  return _strip_cue(text, "Human:")


def feedback_question(principle: Union[FeedbackPrinciple, str]) -> str:
  """The principle's question followed by the "Options:" cue on its own line."""
  text = principle.text if isinstance(principle, FeedbackPrinciple) else principle
  return f"{text}\n{OPTIONS_CUE}"


def fill_cot_slot(example: str, principle: Union[FeedbackPrinciple, str]) -> str:
  """Puts `feedback_question(principle)` into the example's single '{}' slot.

  Only the slot is replaced, so other braces in the example or the principle are safe.
  """
  if example.count(COT_SLOT) != 1:
    raise ValueError(f"chain-of-thought example has {example.count(COT_SLOT)} '{{}}' slots, "
                     "expected exactly 1")
  return example.replace(COT_SLOT, feedback_question(principle), 1)


# ---------------------------------------------------------------------------------------
# Reading JSON.


def _no_duplicate_keys(file: str):
  """An object_pairs_hook that rejects a JSON object holding the same key twice."""

  def hook(pairs):
    out = {}
    for k, v in pairs:
      if k in out:
        raise ConstitutionError(file, k, "duplicate key in a JSON object")
      out[k] = v
    return out

  return hook


def _read_json(file: str) -> Any:
  """Parses `file`; any failure becomes a one-line ConstitutionError."""
  if not os.path.isfile(file):
    raise ConstitutionError(file, "<file>", "file not found")
  try:
    with open(file, encoding="utf-8-sig") as f:   # a byte order mark at the start is skipped
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConstitutionError(file, "<file>", f"cannot read: {e}") from e
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys(file))
  except json.JSONDecodeError as e:
    raise ConstitutionError(file, f"line {e.lineno} column {e.colno}",
                            f"invalid JSON: {e.msg}") from e


# ---------------------------------------------------------------------------------------
# Field checks (each raises ConstitutionError naming file and key).


def _type_name(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", type(None): "null",
          bool: "a boolean", int: "a number", float: "a number"}.get(type(value),
                                                                     type(value).__name__)


def _string(file: str, key: str, value: Any, what: str = "text") -> str:
  """`value` as a string that is not blank."""
  if not isinstance(value, str):
    raise ConstitutionError(file, key, f"{what} must be a string, got {_type_name(value)}")
  if not value.strip():
    raise ConstitutionError(file, key, f"empty {what}")
  return value


def _list(file: str, key: str, value: Any, allow_empty: bool = False) -> list:
  if not isinstance(value, list):
    raise ConstitutionError(file, key, f"must be a list, got {_type_name(value)}")
  if not value and not allow_empty:
    raise ConstitutionError(file, key, "empty list")
  return value


def _object(file: str, key: str, value: Any) -> dict:
  if not isinstance(value, dict):
    raise ConstitutionError(file, key, f"must be an object, got {_type_name(value)}")
  return value


def _required(file: str, key: str, obj: dict, field: str, what: str) -> Any:
  if field not in obj:
    raise ConstitutionError(file, f"{key}.{field}" if key else field, f"missing {what}")
  return obj[field]


def _unknown_keys(file: str, key: str, obj: dict, allowed: Sequence[str]) -> None:
  for k in obj:
    if k not in allowed:
      raise ConstitutionError(file, f"{key}.{k}" if key else k,
                              f"unknown key (expected one of: {', '.join(allowed)})")


def _id(file: str, key: str, value: Any, seen: Dict[str, str]) -> str:
  value = _string(file, key, value, "id")
  if value != value.strip() or any(c.isspace() for c in value):
    raise ConstitutionError(file, key, f"id {value!r} must not contain whitespace")
  if value in seen:
    raise ConstitutionError(file, key, f"duplicate id {value!r} (first used at {seen[value]})")
  seen[value] = key
  return value


def _clean_nonempty(file: str, key: str, text: str, clean, what: str) -> str:
  out = clean(text)
  if not out:
    raise ConstitutionError(file, key, f"empty {what} once its cue is removed")
  return out


def _transcript(file: str, key: str, value: Any) -> str:
  """A cleaned critique/revision transcript that starts with its 'Human:' turn and whose
  six turns appear in order, each at the start or after a blank line ('\\n\\n')."""
  text = clean_transcript(_string(file, key, value, "transcript"))
  if not text.startswith(_TRANSCRIPT_TURNS[0]):
    raise ConstitutionError(file, key, f"transcript must start with its "
                            f"{_TRANSCRIPT_TURNS[0]!r} turn, got {text[:30]!r}")
  pos = 0
  for turn in _TRANSCRIPT_TURNS:
    m = re.compile(r"(?:^|\n\n)" + re.escape(turn)).search(text, pos)
    if m is None:
      raise ConstitutionError(file, key, f"transcript lacks a {turn!r} turn (turns must come "
                              f"in the order {' '.join(_TRANSCRIPT_TURNS)}, separated by "
                              "blank lines)")
    pos = m.end()
  return text


def _cot(file: str, key: str, value: Any) -> str:
  text = _string(file, key, value, "chain-of-thought example").strip()
  n = text.count(COT_SLOT)
  if n != 1:
    raise ConstitutionError(file, key, f"chain-of-thought example has {n} '{{}}' slots, "
                            "expected exactly 1")
  return text


def _answers(file: str, key: str, value: Any) -> Tuple[str, ...]:
  items = _list(file, key, value)
  for i, a in enumerate(items):
    if not isinstance(a, str):
      raise ConstitutionError(file, f"{key}[{i}]", f"answer must be a string, got "
                              f"{_type_name(a)}")
    if not a.strip():
      raise ConstitutionError(file, f"{key}[{i}]", "empty answer")
  return tuple(items)


def _feedback_example(file: str, key: str, value: Any) -> FeedbackExample:
  obj = _object(file, key, value)
  _unknown_keys(file, key, obj, ("prompt", "corrects", "incorrects"))
  prompt = _string(file, f"{key}.prompt",
                   _required(file, key, obj, "prompt", "prompt"), "prompt").lstrip()
  corrects = _answers(file, f"{key}.corrects",
                      _required(file, key, obj, "corrects", "correct answers"))
  incorrects = _answers(file, f"{key}.incorrects",
                        _required(file, key, obj, "incorrects", "incorrect answers"))
  labels = [is_option_label(a) for a in corrects + incorrects]
  if any(labels) and not all(labels):
    raise ConstitutionError(file, key, "answers mix option labels such as ' (A)' with "
                            "responses; use labels only (a question example) or responses "
                            "only (a response-pair example)")
  return FeedbackExample(prompt=prompt, corrects=corrects, incorrects=incorrects)


# ---------------------------------------------------------------------------------------
# The project's own format.


def parse_constitution(data: Any, file: str = "<dict>") -> Constitution:
  """Validates a dict in the project's own format and builds the Constitution.

  `file` names the source in error messages.
  """
  data = _object(file, "<root>", data)
  _unknown_keys(file, "", data, _TOP_KEYS)
  name = _string(file, "name", _required(file, "", data, "name", "name"), "name").strip()
  version = _string(file, "version", _required(file, "", data, "version", "version"),
                    "version").strip()
  if "description" in data:
    _string(file, "description", data["description"], "description")

  crs = _list(file, "critique_revision",
              _required(file, "", data, "critique_revision", "critique_revision principles"))
  seen: Dict[str, str] = {}
  critique_revision = []
  for i, item in enumerate(crs):
    key = f"critique_revision[{i}]"
    obj = _object(file, key, item)
    _unknown_keys(file, key, obj, ("id", "critique", "revision"))
    pid = _id(file, f"{key}.id", _required(file, key, obj, "id", "id"), seen)
    critique = _string(file, f"{key}.critique",
                       _required(file, key, obj, "critique", "critique request"),
                       "critique request")
    revision = _string(file, f"{key}.revision",
                       _required(file, key, obj, "revision", "revision request"),
                       "revision request")
    critique_revision.append(CritiqueRevisionPrinciple(
        id=pid,
        critique_request=_clean_nonempty(file, f"{key}.critique", critique,
                                         clean_critique_request, "critique request"),
        revision_request=_clean_nonempty(file, f"{key}.revision", revision,
                                         clean_revision_request, "revision request")))

  fbs = _list(file, "feedback", _required(file, "", data, "feedback", "feedback principles"))
  seen = {}
  feedback = []
  for i, item in enumerate(fbs):
    key = f"feedback[{i}]"
    obj = _object(file, key, item)
    _unknown_keys(file, key, obj, ("id", "text"))
    pid = _id(file, f"{key}.id", _required(file, key, obj, "id", "id"), seen)
    text = _string(file, f"{key}.text", _required(file, key, obj, "text", "text"))
    feedback.append(FeedbackPrinciple(
        id=pid, text=_clean_nonempty(file, f"{key}.text", text, clean_feedback_text,
                                     "feedback principle")))

  few = _list(file, "critique_revision_few_shot", data.get("critique_revision_few_shot", []),
              allow_empty=True)
  fb_few = _list(file, "feedback_few_shot", data.get("feedback_few_shot", []),
                 allow_empty=True)
  cot = _list(file, "cot_few_shot", data.get("cot_few_shot", []), allow_empty=True)
  return Constitution(
      name=name, version=version,
      critique_revision=tuple(critique_revision), feedback=tuple(feedback),
      critique_revision_few_shot=tuple(
          _transcript(file, f"critique_revision_few_shot[{i}]", t) for i, t in enumerate(few)),
      feedback_few_shot=tuple(
          _feedback_example(file, f"feedback_few_shot[{i}]", e) for i, e in enumerate(fb_few)),
      cot_few_shot=tuple(_cot(file, f"cot_few_shot[{i}]", t) for i, t in enumerate(cot)))


def constitution_to_dict(c: Constitution) -> Dict[str, Any]:
  """The Constitution as a dict in the project's own format."""
  return {
      "name": c.name,
      "version": c.version,
      "critique_revision": [{"id": p.id, "critique": p.critique_request,
                             "revision": p.revision_request} for p in c.critique_revision],
      "feedback": [{"id": p.id, "text": p.text} for p in c.feedback],
      "critique_revision_few_shot": list(c.critique_revision_few_shot),
      "feedback_few_shot": [{"prompt": e.prompt, "corrects": list(e.corrects),
                             "incorrects": list(e.incorrects)} for e in c.feedback_few_shot],
      "cot_few_shot": list(c.cot_few_shot),
  }


def save_constitution(c: Constitution, path: str) -> str:
  """Writes `c` in the project's own format and returns the file written.

  `path` is a `.json` file or a folder (which receives `constitution.json`). The
  constitution is validated first, so what is written always loads back to `c`.
  """
  data = constitution_to_dict(c)
  parsed = parse_constitution(data, "<constitution to save>")
  if parsed != c:
    raise ConstitutionError("<constitution to save>", "<root>",
                            "texts are not in clean form (see the module docstring); "
                            "saving would change them")
  path = os.fspath(path)
  file = path if path.endswith(".json") else os.path.join(path, CONSTITUTION_FILE)
  folder = os.path.dirname(os.path.abspath(file))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".constitution-", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, ensure_ascii=False)
      f.write("\n")
    os.replace(tmp, file)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return file


# ---------------------------------------------------------------------------------------
# Anthropic's prompts/ layout.


def _load_anthropic(folder: str) -> Constitution:
  """Reads a folder in the layout of Anthropic's `prompts/` (see the module docstring)."""
  for f in (ANTHROPIC_CRITIQUE_REVISION, ANTHROPIC_FEEDBACK):
    if not os.path.isfile(os.path.join(folder, f)):
      raise ConstitutionError(os.path.join(folder, f), "<file>",
                              "file not found (required in Anthropic's prompts/ layout)")
  file = os.path.join(folder, ANTHROPIC_CRITIQUE_REVISION)
  data = _object(file, "<root>", _read_json(file))
  if not data:
    raise ConstitutionError(file, "<root>", "no critique/revision principles")
  critique_revision = []
  for name, entry in data.items():
    if not name.strip() or any(c.isspace() for c in name):
      raise ConstitutionError(file, repr(name), "principle name must be non-empty and "
                              "contain no whitespace")
    obj = _object(file, name, entry)
    prompts = _list(file, f"{name}.prompt",
                    _required(file, name, obj, "prompt", "critique request"))
    if len(prompts) > 1:
      _LOG.warning("%s: %s.prompt holds %d critique requests; using the first", file, name,
                   len(prompts))
    critique = _string(file, f"{name}.prompt[0]", prompts[0], "critique request")
    revision = _string(file, f"{name}.edit_request",
                       _required(file, name, obj, "edit_request", "revision request"),
                       "revision request")
    critique_revision.append(CritiqueRevisionPrinciple(
        id=name,
        critique_request=_clean_nonempty(file, f"{name}.prompt[0]", critique,
                                         clean_critique_request, "critique request"),
        revision_request=_clean_nonempty(file, f"{name}.edit_request", revision,
                                         clean_revision_request, "revision request")))

  file = os.path.join(folder, ANTHROPIC_FEEDBACK)
  items = _list(file, "<root>", _read_json(file))
  feedback = []
  for i, text in enumerate(items):
    text = _string(file, f"[{i}]", text, "feedback principle")
    feedback.append(FeedbackPrinciple(
        id=f"feedback-{i}",
        text=_clean_nonempty(file, f"[{i}]", text, clean_feedback_text, "feedback principle")))

  def optional_list(name):
    f = os.path.join(folder, name)
    return (f, _list(f, "<root>", _read_json(f), allow_empty=True)) if os.path.exists(f) \
        else (f, [])

  file, items = optional_list(ANTHROPIC_CRITIQUE_REVISION_FEW_SHOT)
  few = tuple(_transcript(file, f"[{i}]", t) for i, t in enumerate(items))
  file, items = optional_list(ANTHROPIC_FEEDBACK_FEW_SHOT)
  fb_few = tuple(_feedback_example(file, f"[{i}]", e) for i, e in enumerate(items))
  file, items = optional_list(ANTHROPIC_COT_FEW_SHOT)
  cot = []
  for i, item in enumerate(items):
    key = f"[{i}]"
    if isinstance(item, dict):
      _unknown_keys(file, key, item, ("prompt",))
      key = f"[{i}].prompt"
      item = _required(file, f"[{i}]", item, "prompt", "chain-of-thought example")
    cot.append(_cot(file, key, item))

  name = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "anthropic"
  return Constitution(name=name, version="external", critique_revision=tuple(critique_revision),
                      feedback=tuple(feedback), critique_revision_few_shot=few,
                      feedback_few_shot=fb_few, cot_few_shot=tuple(cot))


# ---------------------------------------------------------------------------------------
# Public entry points.


def load_constitution(path: Union[str, "os.PathLike[str]"]) -> Constitution:
  """Loads and validates a constitution.

  `path` (relative: in the working directory, else among the shipped files, e.g.
  'constitutions/default') is one of: a `.json` file in the project's own format; a folder holding
  `constitution.json`; a folder in the layout of Anthropic's `prompts/` (it must hold
  CritiqueRevisionInstructions.json and RLMadisonInstructions.json, the few-shot files are
  optional); or one of those Anthropic files, which stands for its folder.
  Raises ConstitutionError (a ValueError) with a one-line "FILE: KEY: PROBLEM" message.
  """
  path = resources.resolve(os.fspath(path))   # 'constitutions/default' from any directory
  if os.path.isfile(path):
    if os.path.basename(path) in ANTHROPIC_FILES:
      return _load_anthropic(os.path.dirname(os.path.abspath(path)))
    return parse_constitution(_read_json(path), path)
  if os.path.isdir(path):
    ours = os.path.join(path, CONSTITUTION_FILE)
    if os.path.isfile(ours):
      return parse_constitution(_read_json(ours), ours)
    if not any(os.path.isfile(os.path.join(path, f))
               for f in (ANTHROPIC_CRITIQUE_REVISION, ANTHROPIC_FEEDBACK)):
      raise ConstitutionError(path, "<folder>", f"holds neither {CONSTITUTION_FILE} nor "
                              f"{ANTHROPIC_CRITIQUE_REVISION} + {ANTHROPIC_FEEDBACK}")
    return _load_anthropic(path)
  raise ConstitutionError(path, "<path>", "no such file or folder")


def load_default() -> Constitution:
  """The project's default constitution (`constitutions/default`)."""
  return load_constitution(DEFAULT_PATH)


def check(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
  """Loads `path` and returns what `cai-jax constitution check PATH` prints as JSON."""
  c = load_constitution(path)
  return {
      "path": os.fspath(path),
      "name": c.name,
      "version": c.version,
      "critique_revision": len(c.critique_revision),
      "feedback": len(c.feedback),
      "few_shot": len(c.critique_revision_few_shot),
      "feedback_few_shot": len(c.feedback_few_shot),
      "cot_few_shot": len(c.cot_few_shot),
  }


Principle = Union[CritiqueRevisionPrinciple, FeedbackPrinciple]


def sample_principles(constitution_or_principles: Union[Constitution, Sequence[Any]], n: int,
                      rng_or_seed: Union[int, np.random.Generator, np.random.SeedSequence],
                      kind: str = "critique_revision") -> List[Any]:
  """Draws `n` principles uniformly at random with replacement.

  Args:
    constitution_or_principles: a Constitution (its `kind` list is used) or any non-empty
      sequence of principles.
    n: number of draws (>= 0).
    rng_or_seed: a numpy Generator (advanced in place) or a seed; the same seed gives the
      same draws.
    kind: "critique_revision" or "feedback"; only used with a Constitution.
  Returns:
    A list of `n` principles.
  """
  if isinstance(constitution_or_principles, Constitution):
    if kind not in ("critique_revision", "feedback"):
      raise ValueError(f"kind must be 'critique_revision' or 'feedback', got {kind!r}")
    pool = getattr(constitution_or_principles, kind)
  else:
    pool = constitution_or_principles
  pool = list(pool)
  if not pool:
    raise ValueError("cannot sample from an empty list of principles")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n!r}")
  rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) \
      else np.random.default_rng(rng_or_seed)
  return [pool[i] for i in rng.integers(0, len(pool), size=int(n))]


_NEED_WORDS = {"critique_revision": "critique/revision", "feedback": "feedback"}


def spec_label(spec: Union[str, Constitution]) -> str:
  """How a constitution spec is named in messages and run configs: the path, '(default)'
  for '' (the shipped default), '(object NAME)' for a Constitution instance."""
  return (spec or "(default)") if isinstance(spec, str) else f"(object {spec.name!r})"


def resolve(spec: Union[str, Constitution], need: Optional[str] = None) -> Constitution:
  """A Constitution from a path ('' = the shipped default) or a Constitution instance.

  Args:
    spec: constitution file or folder, '' for ``load_default()``, or a Constitution.
    need: 'critique_revision' or 'feedback': the principle list a stage draws from;
      a constitution without any is refused (ValueError naming the spec). None checks
      nothing.
  """
  if need is not None and need not in _NEED_WORDS:
    raise ValueError(f"need must be one of {tuple(_NEED_WORDS)}, got {need!r}")
  if isinstance(spec, Constitution):
    c = spec
  else:
    c = load_constitution(spec) if spec else load_default()
  if need is not None and not getattr(c, need):
    raise ValueError(f"constitution {spec_label(spec)} has no {_NEED_WORDS[need]} principles")
  return c

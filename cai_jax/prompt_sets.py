"""Prompt sets: the shipped red-team and helpfulness prompts, user files and HH-RLHF.

Shipped sets (``data/prompts/``, written for this project):
  red_team.jsonl   requests a harmless assistant must handle with care, one of the
                   categories in ``RED_TEAM_CATEGORIES``
  helpful.jsonl    ordinary helpfulness requests (cooking, coding, writing, ...)
Each line is ``{"id", "prompt", "category"}``; ids are unique within a file.

Train/test split: a prompt is in ``test`` when the first 8 hex digits of the SHA-256
of its id, read as an integer, are divisible by ``TEST_BUCKETS`` (10), else in
``train``: about 90/10, fixed by the id alone (adding or removing other prompts
never moves a prompt between splits). ``split_of`` computes it.

The shipped sets are read through TFDS builders (``cai_red_team_prompts`` and
``cai_helpful_prompts``: array_record files, no TensorFlow), prepared on first use
into ``data_dir`` (default ``default_data_dir()``: ``$XDG_CACHE_HOME/cai_jax/tfds``,
else ``~/.cache/cai_jax/tfds``). The SHA-256 of the source JSONL is stored in the
prepared dataset's metadata; a prepared copy whose hash differs from the shipped
file is rebuilt.

``load_prompts`` returns records with at least:
  id        str, unique within the set
  prompt    str, the text of the last user turn
  messages  [{"role", "content"}, ...], the conversation, ending with a user turn
  category  str ('' when the source has none)
plus any other fields of the source line (``chosen`` / ``rejected`` for HH-RLHF).

Near-duplicate detection (``PromptDeduplicator``): prompts are normalized by
``normalize_prompt`` (NFKC, case-folded, every run of punctuation / whitespace made
one space). Two prompts are exact duplicates when their normalized forms are equal,
and near duplicates when the Jaccard similarity of their n-gram sets (default:
character 5-grams of the normalized text, ``'char5'``; ``'word3'`` gives word
3-grams) is at least the threshold. The index is exact (an inverted index over
n-grams), not a MinHash approximation.
"""

from __future__ import annotations

import collections
import gzip
import logging
import hashlib
import json
import numbers
import os
import re
import shutil
import unicodedata
import zlib
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from cai_jax import data, resources

_LOG = logging.getLogger(__name__)
from cai_jax.data import DataError

Record = Dict[str, Any]

PROMPTS_DIR = os.path.join(resources.DATA_DIR, "prompts")
RED_TEAM_CATEGORIES = ("violence", "weapons", "theft", "fraud", "hacking", "self_harm",
                       "harassment", "hate", "privacy", "drugs", "sexual_content",
                       "misinformation")
SPLITS = ("train", "test")
TEST_BUCKETS = 10

# builtin name -> (TFDS dataset name, source file in PROMPTS_DIR)
BUILTIN = {
    "red_team": ("cai_red_team_prompts", "red_team.jsonl"),
    "helpful": ("cai_helpful_prompts", "helpful.jsonl"),
}


def default_data_dir() -> str:
  """Where builtin prompt sets are prepared unless a data_dir is given."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "cai_jax", "tfds")


def split_of(prompt_id: str) -> str:
  """'test' for about 1 in TEST_BUCKETS ids (by SHA-256 of the id), else 'train'."""
  h = int(hashlib.sha256(str(prompt_id).encode("utf-8")).hexdigest()[:8], 16)
  return "test" if h % TEST_BUCKETS == 0 else "train"


# ----------------------------------------------------------------------------
# Reading and validating files
# ----------------------------------------------------------------------------

def _check_messages(msgs: Any, where: str) -> List[Dict[str, str]]:
  if not isinstance(msgs, list) or not msgs:
    raise DataError(f"{where}: 'messages' must be a non-empty list")
  out = []
  for j, m in enumerate(msgs):
    if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise DataError(f"{where}: messages[{j}] needs string 'role' and 'content'")
    if m["role"] not in ("system", "user", "assistant"):
      raise DataError(f"{where}: messages[{j}] has role {m['role']!r}; expected system, user "
                      "or assistant")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "user":
    raise DataError(f"{where}: the last message must be the user's (the prompt), got "
                    f"{out[-1]['role']!r}")
  if not out[-1]["content"].strip():
    raise DataError(f"{where}: the last user message is empty")
  return out


def _record(row: Dict[str, Any], where: str, default_id: str) -> Record:
  """One validated prompt record from a {"prompt"}, {"messages"} or ShareGPT
  {"conversations": [{"from", "value"}]} line (``data.SHAREGPT_ROLES``)."""
  if "messages" in row:
    msgs = _check_messages(row["messages"], where)
    prompt = msgs[-1]["content"]
  elif "conversations" in row:
    msgs = _check_messages(data.sharegpt_messages(row["conversations"], where), where)
    prompt = msgs[-1]["content"]
  elif "prompt" in row:
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
      raise DataError(f"{where}: 'prompt' must be a non-empty string")
    msgs = [{"role": "user", "content": prompt}]
  else:
    raise DataError(f"{where}: expected a 'prompt' or 'messages' (or ShareGPT 'conversations') "
                    f"field, got keys {sorted(row)}")
  rid = row.get("id", default_id)
  if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
    raise DataError(f"{where}: 'id' must be a non-empty string")
  category = row.get("category", "")
  if not isinstance(category, str):
    raise DataError(f"{where}: 'category' must be a string")
  rec = dict(row)
  rec.update(id=str(rid), prompt=prompt, messages=msgs, category=category)
  return rec


def read_prompt_file(path: str) -> List[Record]:
  """All prompts of a JSONL file ({"prompt"}, {"messages"} or ShareGPT {"conversations"}
  per line; optional "id", "category"; '.gz' allowed). A file of HH-RLHF lines ({"chosen",
  "rejected"}) is read with ``import_hh_rlhf``, Anthropic's red-team attempts (a JSON
  array, or lines, of {"transcript", ...}) with ``import_red_team_attempts``. Ids default to
  '<file stem>-<line>' and must be unique. Errors name the file and line; a file
  without prompts is an error."""
  if _starts_with_array(path):
    return import_red_team_attempts(path)
  rows = list(data.iter_jsonl(path))
  if not rows:
    raise DataError(f"{path}: empty prompt set (no lines)")
  first = rows[0][1]
  prompted = any(k in first for k in ("prompt", "messages", "conversations"))
  if "chosen" in first and not prompted:
    return import_hh_rlhf(path)
  if "transcript" in first and not prompted:
    return import_red_team_attempts(path)
  stem = _stem(path)
  out, seen = [], {}
  for lineno, row in rows:
    where = f"{path}:{lineno}"
    rec = _record(row, where, f"{stem}-{lineno}")
    if rec["id"] in seen:
      raise DataError(f"{where}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
    seen[rec["id"]] = lineno
    out.append(rec)
  return out


def _stem(path: str) -> str:
  name = os.path.basename(path)
  for ext in (".gz", ".jsonl", ".json"):
    if name.endswith(ext):
      name = name[:-len(ext)]
  return name or "prompts"


# ----------------------------------------------------------------------------
# HH-RLHF
# ----------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, where: str = "transcript") -> List[Dict[str, str]]:
  """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [{role, content}] (contents stripped)."""
  if not isinstance(text, str):
    raise DataError(f"{where}: expected a string transcript")
  parts = _HH_TURN.split(text)
  if parts[0].strip() or len(parts) < 3:
    raise DataError(f"{where}: expected a transcript starting with '\\n\\nHuman:'")
  msgs = []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    msgs.append({"role": _HH_ROLE[speaker], "content": content.strip()})
  return msgs


def raw_transcript(messages: Sequence[Dict[str, str]]) -> str:
  """The paper's format of a conversation ending in a user turn, ready for the reply:
  '\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:'."""
  speaker = {"user": "Human", "assistant": "Assistant"}
  text = "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in messages
                 if m["role"] in speaker)
  return text + "\n\nAssistant:"


def _split_hh(text: str, where: str) -> Tuple[List[Dict[str, str]], str]:
  msgs = parse_hh_transcript(text, where)
  if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
    raise DataError(f"{where}: expected the transcript to end with a Human turn followed by "
                    "an Assistant reply")
  return msgs[:-1], msgs[-1]["content"]


def read_hh_rlhf(path: str) -> Tuple[List[Record], List[str]]:
  """(records, one 'FILE:LINE: why' per line left out) of an Anthropic HH-RLHF file (JSONL
  or .jsonl.gz of {"chosen", "rejected"}).

  Each line becomes {"id": '<stem>-<line>', "prompt": last human turn,
  "messages": the conversation up to and including the last human turn,
  "raw_prompt": the same in the paper's format, ending in '\\n\\nAssistant:',
  "chosen": the final chosen reply, "rejected": the final rejected reply,
  "category": 'hh_rlhf'}. A line is left out when it lacks the string fields, a
  transcript is not '\\n\\nHuman: ...' turns ending with a Human turn and an Assistant
  reply, chosen and rejected differ before their final replies, or the last human turn
  is empty.
  """
  stem = _stem(path)
  out, skipped = [], []
  for lineno, row in data.iter_jsonl(path):
    where = f"{path}:{lineno}"
    try:
      for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
          raise DataError(f"{where}: expected string fields 'chosen' and 'rejected'")
      msgs, chosen = _split_hh(row["chosen"], f"{where}: chosen")
      msgs_r, rejected = _split_hh(row["rejected"], f"{where}: rejected")
      if msgs_r != msgs:
        raise DataError(f"{where}: chosen and rejected differ before their final replies")
      if not msgs[-1]["content"]:
        raise DataError(f"{where}: the last human turn is empty")
    except DataError as e:
      skipped.append(str(e))
      continue
    out.append({"id": f"{stem}-{lineno}", "prompt": msgs[-1]["content"], "messages": msgs,
                "raw_prompt": raw_transcript(msgs), "chosen": chosen, "rejected": rejected,
                "category": "hh_rlhf"})
  return out, skipped


def import_hh_rlhf(path: str, strict: bool = False) -> List[Record]:
  """The records of an HH-RLHF file (``read_hh_rlhf``). A line it leaves out is an error
  naming the file and line with strict=True; otherwise the lines left out are counted in
  a warning that names the first (the public files hold a few malformed lines). A file
  with no record left is an error."""
  out, skipped = read_hh_rlhf(path)
  if skipped and strict:
    raise DataError(skipped[0])
  if skipped:
    _LOG.warning("%s: left out %d of %d HH-RLHF lines (first: %s)", path, len(skipped),
                 len(skipped) + len(out), skipped[0])
  if not out:
    raise DataError(f"{path}: empty prompt set (no HH-RLHF comparisons)"
                    + (f"; every line was left out, first: {skipped[0]}" if skipped else ""))
  return out


def _open_text(path: str):
  """The file as UTF-8 text ('.gz' decompressed; a byte order mark at its start skipped)."""
  return (gzip.open(path, "rt", encoding="utf-8-sig") if path.endswith(".gz")
          else open(path, encoding="utf-8-sig"))


def _starts_with_array(path: str) -> bool:
  """True when the file's first non-blank character is '[' (one JSON array)."""
  if not os.path.isfile(path):
    return False
  try:
    with _open_text(path) as f:
      while True:
        chunk = f.read(4096)
        if not chunk:
          return False
        stripped = chunk.lstrip()
        if stripped:
          return stripped[0] == "["
  except (OSError, UnicodeDecodeError, EOFError, zlib.error):
    return False   # iter_jsonl reports the problem with the file's name


def _red_team_rows(path: str) -> List[Tuple[str, int, Any]]:
  """(location, number, object) of a red-team attempts file: 'FILE: item N' (N 1-based)
  for a JSON array, 'FILE:N' (N the line) for JSON lines."""
  if not _starts_with_array(path):
    return [(f"{path}:{n}", n, row) for n, row in data.iter_jsonl(path)]
  try:
    with _open_text(path) as f:
      items = json.load(f)
  except UnicodeDecodeError:
    raise DataError(f"{path}: not UTF-8 text") from None
  except (OSError, EOFError, zlib.error) as e:   # a truncated or corrupt .gz file
    raise DataError(f"{path}: cannot read ({e})") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
        from None
  return [(f"{path}: item {n}", n, row) for n, row in enumerate(items, 1)]


def import_red_team_attempts(path: str) -> List[Record]:
  """Prompts of Anthropic's red-team attempts (hh-rlhf ``red_team_attempts.jsonl``: ONE
  JSON array of {"transcript": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rating",
  "task_description", ...}; JSON lines of such objects are read too; '.gz' allowed).

  Each attempt becomes {"id": '<stem>-<n>' (n: 1-based item or line number), "prompt":
  the red-teamer's opening request (the transcript's first Human turn), "messages": that
  turn, "category": 'red_team', "task_description": the attempt's description when it
  has one}. Errors name the file and item (or line) and the field.
  """
  stem = _stem(path)
  out = []
  for where, n, row in _red_team_rows(path):
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("transcript"), str):
      raise DataError(f"{where}: expected a string field 'transcript'")
    msgs = parse_hh_transcript(row["transcript"], f"{where}: transcript")
    opening = msgs[0]["content"]
    if not opening:
      raise DataError(f"{where}: transcript: the first Human turn is empty")
    rec = {"id": f"{stem}-{n}", "prompt": opening,
           "messages": [{"role": "user", "content": opening}], "category": "red_team"}
    if isinstance(row.get("task_description"), str):
      rec["task_description"] = row["task_description"]
    out.append(rec)
  if not out:
    raise DataError(f"{path}: empty prompt set (no red-team attempts)")
  return out


# ----------------------------------------------------------------------------
# TFDS builders for the shipped sets
# ----------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


_BUILDERS: Dict[str, type] = {}


def builder_class(name: str) -> type:
  """The TFDS builder class of a builtin set ('red_team' | 'helpful' or its TFDS name).

  Classes are defined (and registered with TFDS) on first use, so importing this
  module does not import tensorflow_datasets."""
  key = _builtin_key(name)
  if key is None:
    raise DataError(f"unknown builtin prompt set {name!r}; expected one of {sorted(BUILTIN)}")
  if key not in _BUILDERS:
    _BUILDERS.update(_define_builders())
  return _BUILDERS[key]


def _builtin_key(name: str) -> Optional[str]:
  for key, (tfds_name, _) in BUILTIN.items():
    if name in (key, tfds_name):
      return key
  return None


def _define_builders() -> Dict[str, type]:
  import tensorflow_datasets as tfds  # deferred: heavy import

  class _PromptSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shipped prompt JSONL -> train/test array_record splits (split by id hash)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    SOURCE = ""   # file name in PROMPTS_DIR

    # No URL checksums file: nothing is downloaded. (TFDS's default looks the file up
    # beside the module through importlib_resources, which it may lack.)
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: None))

    @classmethod
    def source_path(cls) -> str:
      return os.path.join(PROMPTS_DIR, cls.SOURCE)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Prompts of {self.SOURCE} (cai_jax); split by SHA-256 of the id.",
          features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(), "prompt": tfds.features.Text(),
              "category": tfds.features.Text()}),
          disable_shuffling=True,
          metadata=tfds.core.MetadataDict(source_sha256=_sha256_file(self.source_path())),
          license="Apache-2.0")

    def _split_generators(self, dl_manager):
      rows = read_prompt_file(self.source_path())
      return {split: self._generate_examples(rows, split) for split in SPLITS}

    def _generate_examples(self, rows, split):
      for r in rows:
        if split_of(r["id"]) == split:
          yield r["id"], {"id": r["id"], "prompt": r["prompt"], "category": r["category"]}

  class CaiRedTeamPrompts(_PromptSetBuilder):
    """The project's red-team prompts (data/prompts/red_team.jsonl)."""
    SOURCE = BUILTIN["red_team"][1]

  class CaiHelpfulPrompts(_PromptSetBuilder):
    """The project's helpfulness prompts (data/prompts/helpful.jsonl)."""
    SOURCE = BUILTIN["helpful"][1]

  return {"red_team": CaiRedTeamPrompts, "helpful": CaiHelpfulPrompts}


def prepare(name: str, data_dir: Optional[str] = None) -> str:
  """Builds the TFDS dataset of a builtin set in data_dir (default ``default_data_dir()``)
  unless an up-to-date copy is there; returns the prepared dataset's directory."""
  cls = builder_class(name)
  data_dir = data_dir or default_data_dir()
  builder = cls(data_dir=data_dir, file_format="array_record")
  current = _sha256_file(cls.source_path())
  if builder.is_prepared():
    if builder.info.metadata.get("source_sha256") == current:
      return str(builder.data_path)
    # stale: the shipped file changed (another process may be removing it too)
    shutil.rmtree(str(builder.data_path), ignore_errors=True)
    builder = cls(data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare(file_format="array_record")
  except FileExistsError:
    # Processes sharing data_dir (a multi-process run, parallel sweeps) prepare it at once;
    # tfds renames its finished copy into place, so the later rename fails.
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      raise
  return str(builder.data_path)


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def load_prompts(spec: str, split: Optional[str] = None,
                 data_dir: Optional[str] = None) -> List[Record]:
  """Prompt records (see the module docstring) of a builtin set or a JSONL file.

  Args:
    spec: 'red_team' or 'helpful' (the shipped sets, read through TFDS and prepared
      on demand), or a path to a JSONL file ({"prompt"}, {"messages"} or ShareGPT
      {"conversations"} per line, or HH-RLHF {"chosen", "rejected"} lines; relative
      paths are also looked up in the repository root).
    split: None for every prompt; 'train' or 'test' for the id-hash split (which also
      applies to files: ids default to '<file stem>-<line>'). Builtin sets also take
      TFDS split strings such as 'train[:50]'.
    data_dir: where builtin sets are prepared (default ``default_data_dir()``).
  Raises:
    DataError naming the source for an unknown spec, a malformed line or an empty set.
  """
  key = _builtin_key(spec)
  if key is not None:
    tfds_name = BUILTIN[key][0]
    prepare(key, data_dir)
    source = data.read_tfds(tfds_name, split or "+".join(SPLITS), data_dir or default_data_dir())
    records = []
    for i in range(len(source)):
      row = source[i]
      records.append({"id": row["id"], "prompt": row["prompt"],
                      "messages": [{"role": "user", "content": row["prompt"]}],
                      "category": row["category"]})
    where = f"prompt set {spec!r}" + (f" split {split!r}" if split else "")
  else:
    path = data.resolve_path(spec)
    if not os.path.isfile(path):
      raise DataError(f"prompt set {spec!r}: not a builtin set ({', '.join(sorted(BUILTIN))}) "
                      "or an existing file")
    records = read_prompt_file(path)
    if split is not None:
      if split not in SPLITS:
        raise DataError(f"prompt set {spec!r}: split {split!r}; a file takes None, 'train' "
                        "or 'test'")
      records = [r for r in records if split_of(r["id"]) == split]
    where = f"prompt set {path!r}" + (f" split {split!r}" if split else "")
  if not records:
    raise DataError(f"{where}: empty prompt set")
  return records


def prompt_items(spec: Any, split: Optional[str] = None, limit: Optional[int] = None,
                 what: str = "prompt", who: str = "stage",
                 loader: Optional[Any] = None) -> List[Record]:
  """The prompt items a generating stage works through, first `limit` of them.

  Args:
    spec: a list of prompt dicts ({"prompt", "messages"?, "id"?, ...}) or strings, or a
      spec for the loader ('red_team', 'helpful', a .jsonl path).
    split: with a spec, the split to read; None reads every prompt (and calls the
      loader without a split argument).
    limit: keep only the first `limit` (>= 1) items (after `split`); None keeps all.
    what, who: name the set and the stage in error messages ("{who}: {what} item 3 ...").
    loader: spec (, split=...) -> list of prompt dicts; default: ``load_prompts``.
  Returns:
    Dicts with every field of the item plus "prompt" (the last user turn) and
    "messages" (the conversation as {"role", "content"} turns ending with a user turn;
    [the prompt as a user turn] when the item has none).
  Raises:
    ValueError for an item without a non-empty "prompt" string, malformed "messages",
    or an empty result.
  """
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)
                            or limit < 1):
    raise ValueError(f"{who}: limit must be None or an integer >= 1, got {limit!r}")
  if isinstance(spec, str):
    load = loader or load_prompts
    items = list(load(spec) if split is None else load(spec, split=split))
  else:
    items = list(spec or [])
  out = []
  for i, item in enumerate(items):
    if isinstance(item, str):
      item = {"prompt": item}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
        or not item["prompt"].strip():
      raise ValueError(f"{who}: {what} item {i} needs a non-empty 'prompt' string")
    msgs = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
    if not isinstance(msgs, list) or any(
        not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
        or not isinstance(m.get("content"), str) for m in msgs) or msgs[-1]["role"] != "user":
      raise ValueError(f"{who}: {what} item {i}: 'messages' must be a list of "
                       "{role, content} turns ending with a user turn")
    out.append(dict(item, messages=[{"role": m["role"], "content": m["content"]}
                                    for m in msgs]))
  if limit is not None:
    out = out[:limit]
  if not out:
    name = repr(spec) if isinstance(spec, str) else "(list)"
    raise ValueError(f"{who}: the {what} set {name} has no prompts")
  return out


# ----------------------------------------------------------------------------
# Deduplication
# ----------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")


def _separators_to_spaces(m: "re.Match") -> str:
  """A run of non-word characters with its punctuation, separators and control characters
  (Unicode categories P*, Z*, C*) made spaces; marks (a Devanagari vowel sign, a virama)
  and symbols (currency, math, emoji) are kept: they are part of the text."""
  return "".join(c if unicodedata.category(c)[0] in "MS" else " " for c in m.group())


def normalize_prompt(text: str) -> str:
  """NFKC, case-folded, punctuation and whitespace runs -> one space, stripped."""
  text = unicodedata.normalize("NFKC", text).casefold()
  return " ".join(_NON_WORD.sub(_separators_to_spaces, text).split())


def parse_ngram(ngram: str) -> Tuple[str, int]:
  """'char5' -> ('char', 5); 'word3' -> ('word', 3)."""
  m = re.fullmatch(r"(char|word)([1-9][0-9]*)", ngram)
  if not m:
    raise ValueError(f"ngram {ngram!r}; expected 'char<N>' or 'word<N>' (e.g. 'char5', 'word3')")
  return m.group(1), int(m.group(2))


def shingles(text: str, ngram: str = "char5") -> FrozenSet:
  """The set of n-grams of the normalized text (the whole text if shorter than n)."""
  unit, n = parse_ngram(ngram)
  norm = normalize_prompt(text)
  seq = norm if unit == "char" else norm.split()
  if len(seq) <= n:
    return frozenset([seq if unit == "char" else tuple(seq)]) if seq else frozenset()
  if unit == "char":
    return frozenset(seq[i:i + n] for i in range(len(seq) - n + 1))
  return frozenset(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def jaccard(a: FrozenSet, b: FrozenSet) -> float:
  """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
  union = len(a | b)
  return len(a & b) / union if union else 0.0


class NearDuplicateIndex:
  """Exact Jaccard search over n-gram sets through an inverted index."""

  def __init__(self, ngram: str = "char5"):
    parse_ngram(ngram)
    self.ngram = ngram
    self._postings: Dict[Any, List[int]] = collections.defaultdict(list)
    self._sizes: List[int] = []
    self._keys: List[Any] = []

  def __len__(self) -> int:
    return len(self._keys)

  def add(self, text: str, key: Any = None) -> None:
    """Indexes one text under ``key`` (default: its position)."""
    grams = shingles(text, self.ngram)
    idx = len(self._keys)
    for g in grams:
      self._postings[g].append(idx)
    self._sizes.append(len(grams))
    self._keys.append(idx if key is None else key)

  def best_match(self, text: str) -> Tuple[float, Any]:
    """(highest Jaccard similarity to an indexed text, its key); (0.0, None) if none."""
    grams = shingles(text, self.ngram)
    counts: Dict[int, int] = collections.Counter()
    for g in grams:
      for idx in self._postings.get(g, ()):
        counts[idx] += 1
    best, best_idx = 0.0, None
    for idx, inter in counts.items():
      score = inter / (len(grams) + self._sizes[idx] - inter)
      if score > best:
        best, best_idx = score, idx
    return best, (self._keys[best_idx] if best_idx is not None else None)


class PromptDeduplicator:
  """Rejects exact (normalized) and near duplicates of the prompts added so far.

  ``check(text)`` returns 'exact', 'near' or None; ``add(text)`` records a prompt.
  """

  def __init__(self, threshold: float = 0.6, ngram: str = "char5"):
    if not 0.0 < threshold <= 1.0:
      raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    self.threshold = threshold
    self._exact: Dict[str, Any] = {}
    self._near = NearDuplicateIndex(ngram)

  def __len__(self) -> int:
    return len(self._exact)

  def check(self, text: str) -> Optional[str]:
    """'exact' if the normalized text was added, 'near' if an added prompt is at least
    ``threshold`` similar, else None."""
    if normalize_prompt(text) in self._exact:
      return "exact"
    if self._near.best_match(text)[0] >= self.threshold:
      return "near"
    return None

  def add(self, text: str, key: Any = None) -> None:
    norm = normalize_prompt(text)
    if norm not in self._exact:
      self._exact[norm] = key
      self._near.add(text, key)

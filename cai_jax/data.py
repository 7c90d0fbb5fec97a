"""Training data: JSONL / TFDS readers and grain pipelines of fixed-shape batches.

An *example* is a dict in one of five forms:
  {"text": str}                                   loss on every token (and EOS; a BOS
                                                  the tokenizer wants goes first)
  {"prompt": str, "completion": str}              a user turn and an assistant turn
  {"prompt": [messages], "completion": str}       a conversation as context, then an
                                                  assistant turn: loss on that turn only
  {"messages": [{"role": ..., "content": ...}]}   a conversation; loss on assistant turns
  {"conversations": [{"from": ..., "value": ...}]}  ShareGPT: the same as "messages", each
                                                  'from' mapped to a role (SHAREGPT_ROLES)
(the third is TRL's conversational prompt-completion form; its completion may also be a
list of assistant messages).
Tokenized, each becomes ``{"tokens", "mask", "loss_mask"}``, each [seq_len]
(int32, bool, bool), right-padded with the tokenizer's pad id and truncated on
the right. Batching stacks them to [batch, seq_len].
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from cai_jax import resources

if TYPE_CHECKING:
  import grain

Example = Dict[str, Any]


class DataError(ValueError):
  """Malformed input data; the message names the file and line or field."""


def iter_jsonl(path: str) -> Iterator[Tuple[int, Example]]:
  """(1-based line number, object) for every non-blank line of a JSONL (or .jsonl.gz) file
  (a UTF-8 byte order mark at its start is skipped); errors name the file and line."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: {'is a directory, not a file' if os.path.isdir(path) else 'no such file'}")
  # Bytes that are not UTF-8 decode to lone surrogates (surrogateescape), found line by
  # line: the file is decoded in chunks, so a decoding error would name the wrong line.
  kw = dict(encoding="utf-8-sig", errors="surrogateescape")
  opener = (lambda: gzip.open(path, "rt", **kw)) if path.endswith(".gz") else (
      lambda: open(path, **kw))
  with opener() as f:
    lineno = 0
    while True:
      try:
        line = f.readline()
      except (OSError, EOFError, zlib.error) as e:   # a truncated or corrupt .gz file
        after = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: cannot read{after} ({e})") from None
      if not line:
        break
      lineno += 1
      try:
        line.encode("utf-8")
      except UnicodeEncodeError:
        raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      yield lineno, row


class JsonlRows(list):
  """The objects of a JSONL file (a list) that know their lines: ``where(i)`` is
  'FILE:LINE' of row i (blank lines are not rows)."""

  def __init__(self, path: str, numbered: Sequence[Tuple[int, Example]]):
    super().__init__(row for _, row in numbered)
    self.path, self.lines = path, [n for n, _ in numbered]

  def where(self, i: int) -> str:
    return f"{self.path}:{self.lines[i]}"


def read_jsonl(path: str) -> JsonlRows:
  """Reads a JSONL file of objects; errors name the file and 1-based line number."""
  rows = JsonlRows(path, list(iter_jsonl(path)))
  if not rows:
    raise DataError(f"{path}: no examples")
  return rows


def read_tfds(name: str, split: str, data_dir: Optional[str] = None) -> Sequence[Example]:
  """Random-access TFDS source (array_record, no TensorFlow); bytes fields decoded to str,
  and a message field stored as ``tfds.features.Sequence({"role", "content"})`` (which
  TFDS gives back as a dict of lists) turned back into a list of message dicts, as is
  ShareGPT ``conversations`` stored as ``Sequence({"from", "value"})``. An unknown
  dataset or split is a DataError naming both."""
  import tensorflow_datasets as tfds  # deferred: heavy import
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:   # tfds raises several types, some with a catalogue-long message
    lines = str(e).strip().splitlines()
    raise DataError(f"TFDS dataset {name!r} split {split!r}"
                    + (f" in {data_dir}" if data_dir else "")
                    + f": {lines[0] if lines else type(e).__name__}") from None
  return _DecodedSource(source)


# field -> the keys of one turn, for message fields TFDS gives back as a dict of lists
_MESSAGE_FIELDS = {"messages": ("role", "content"), "prompt": ("role", "content"),
                   "completion": ("role", "content"), "conversations": ("from", "value")}


class _DecodedSource:
  """Wraps a random-access source so bytes values come back as str and message lists as
  lists of {role, content} (ShareGPT 'conversations': {from, value}) dicts."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    row = {k: _to_py(v) for k, v in self._source[i].items()}
    for k, keys in _MESSAGE_FIELDS.items():
      v = row.get(k)
      if (isinstance(v, dict) and set(v) >= set(keys)
          and all(isinstance(x, list) and len(x) == len(v[keys[0]]) for x in v.values())):
        row[k] = [dict(zip(v, turn)) for turn in zip(*v.values())]
    return row


def _to_py(v):
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray) and v.dtype == object:
    return [_to_py(x) for x in v.tolist()]
  if isinstance(v, (list, tuple)):
    return [_to_py(x) for x in v]
  if isinstance(v, dict):
    return {k: _to_py(x) for k, x in v.items()}
  return v


def resolve_path(path: str) -> str:
  """A relative path is looked up in the working directory, then in the shipped resources
  (``resources.resolve``: so the shipped gin files can name shipped data as 'data/...')."""
  return resources.resolve(path)


def _split_tfds_spec(spec: str) -> Optional[Tuple[str, str]]:
  """'tfds:NAME[/CONFIG][:VERSION]:SPLIT' -> (NAME[/CONFIG][:VERSION], SPLIT), None if
  malformed. SPLIT is TFDS split syntax, slices included ('train[:10%]+test'): the split
  starts after the last ':' outside brackets."""
  rest = spec[len("tfds:"):]
  depth, cut = 0, -1
  for i, ch in enumerate(rest):
    depth += (ch == "[") - (ch == "]")
    if ch == ":" and depth == 0:
      cut = i
  if cut <= 0 or cut == len(rest) - 1:
    return None
  return rest[:cut], rest[cut + 1:]


def load_examples(spec: str, data_dir: Optional[str] = None) -> Sequence[Example]:
  """'path.jsonl' (or '.jsonl.gz') or 'tfds:NAME[/CONFIG][:VERSION]:SPLIT' (SPLIT in TFDS
  split syntax, e.g. 'train[:90%]') -> random-access examples."""
  if spec.startswith("tfds:"):
    parts = _split_tfds_spec(spec)
    if parts is None:
      raise DataError(f"dataset {spec!r}: expected 'tfds:NAME:SPLIT'")
    return read_tfds(parts[0], parts[1], data_dir)
  if spec.endswith((".jsonl", ".jsonl.gz")) or os.path.exists(resolve_path(spec)):
    return read_jsonl(resolve_path(spec))
  raise DataError(f"dataset {spec!r}: not a .jsonl file or 'tfds:NAME:SPLIT'")


def draw_evenly(pool_size: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """n indices into a pool of pool_size items [n] int64, as evenly as possible: every
  index n // pool_size times, then n % pool_size distinct ones drawn from rng without
  replacement; so no item is left out while another repeats (drawing with replacement
  would), and none is used twice when n <= pool_size (n < pool_size: it is
  ``rng.choice(pool_size, n, replace=False)``; n == pool_size: every index once, in order)."""
  if n and not pool_size:
    raise ValueError(f"cannot draw {n} items from an empty pool")
  whole, rest = divmod(n, pool_size) if pool_size else (0, 0)
  return np.concatenate([np.tile(np.arange(pool_size), whole),
                         rng.choice(pool_size, size=rest, replace=False)]).astype(np.int64)


def _check_str_field(example: Example, key: str, where: str) -> None:
  if not isinstance(example[key], str):
    raise DataError(f"{where}: '{key}' must be a string, got {type(example[key]).__name__}")


def _check_messages(msgs: Any, key: str, where: str) -> List[Dict[str, str]]:
  """`msgs` if it is a non-empty list of {role: non-empty str, content: str} dicts;
  DataError naming `where` and the field `key` otherwise."""
  if not isinstance(msgs, list) or not msgs:
    raise DataError(f"{where}: '{key}' must be a non-empty list")
  for j, m in enumerate(msgs):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise DataError(f"{where}: {key}[{j}] needs 'role' and 'content'")
    if not isinstance(m["role"], str) or not m["role"]:
      raise DataError(f"{where}: {key}[{j}].role must be a non-empty string")
    if not isinstance(m["content"], str):
      raise DataError(f"{where}: {key}[{j}].content must be a string, got "
                      f"{type(m['content']).__name__}")
  return msgs


# ShareGPT 'from' -> role: the names axolotl, LLaMA-Factory and ShareGPT converters read
# (human / gpt, and those of the original ShareGPT dump), matched exactly.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "model": "assistant", "system": "system"}


def sharegpt_messages(turns: Any, where: str,
                      key: str = "conversations") -> List[Dict[str, str]]:
  """[{role, content}] of ShareGPT turns [{"from": str, "value": str}], each 'from' mapped
  by ``SHAREGPT_ROLES``; DataError naming `where`, the field `key` and the turn otherwise."""
  if not isinstance(turns, list) or not turns:
    raise DataError(f"{where}: '{key}' must be a non-empty list")
  msgs = []
  for j, t in enumerate(turns):
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
      raise DataError(f"{where}: {key}[{j}] needs 'from' and 'value'")
    if not isinstance(t["from"], str) or t["from"] not in SHAREGPT_ROLES:
      raise DataError(f"{where}: {key}[{j}].from is {t['from']!r}; expected one of "
                      f"{', '.join(SHAREGPT_ROLES)}")
    if not isinstance(t["value"], str):
      raise DataError(f"{where}: {key}[{j}].value must be a string, got "
                      f"{type(t['value']).__name__}")
    msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
  return msgs


def example_conversation(example: Example, where: str = "example"
                         ) -> Optional[Tuple[List[Dict[str, str]], int]]:
  """(messages, trained_from) of a conversation example, None for plain text: the
  assistant messages at index >= trained_from are the ones trained (0 for 'messages',
  ShareGPT 'conversations' and a text prompt; the completion's index for a messages
  prompt, whose own assistant turns are context). DataError naming `where` and the field
  when a field is malformed."""
  if "messages" in example:
    return _check_messages(example["messages"], "messages", where), 0
  if "conversations" in example:
    return sharegpt_messages(example["conversations"], where), 0
  if "prompt" in example and "completion" in example:
    if isinstance(example["prompt"], list):
      context = _check_messages(example["prompt"], "prompt", where)
      completion = example["completion"]
      if isinstance(completion, list):
        completion = _check_messages(completion, "completion", where)
        if any(m["role"] != "assistant" for m in completion):
          raise DataError(f"{where}: every 'completion' message must have role 'assistant'")
      else:
        _check_str_field(example, "completion", where)
        completion = [{"role": "assistant", "content": completion}]
      return list(context) + list(completion), len(context)
    _check_str_field(example, "prompt", where)
    _check_str_field(example, "completion", where)
    return [{"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]}], 0
  if "text" in example:
    _check_str_field(example, "text", where)
    return None
  raise DataError(f"{where}: expected a 'text', 'prompt'+'completion', 'messages' or ShareGPT "
                  f"'conversations' field, got keys {sorted(example)}")


def example_messages(example: Example, where: str = "example") -> Optional[List[Dict[str, str]]]:
  """The conversation of a prompt/completion, messages or ShareGPT example (None for plain
  text); DataError naming `where` and the field when a field has the wrong type."""
  conversation = example_conversation(example, where)
  return None if conversation is None else conversation[0]


def check_training_example(example: Example, where: str = "example") -> None:
  """DataError naming `where` unless `example` has a trainable form: text, or a
  conversation with at least one assistant turn (its only trained tokens)."""
  msgs = example_messages(example, where)   # a completion is always an assistant turn
  if msgs is not None and not any(m["role"] == "assistant" for m in msgs):
    raise DataError(f"{where}: no message has role 'assistant' (roles "
                    f"{sorted({m['role'] for m in msgs})}), so no token would be trained")


def encode_example(example: Example, tokenizer: Any, chat_format: str,
                   where: str = "example") -> Tuple[List[int], List[bool]]:
  """(ids, trained flags) of one example, untruncated: a text and its EOS, all trained,
  after a BOS (untrained) when the tokenizer wants one (``tokenizer.with_bos``, as a
  conversation gets); a conversation rendered in `chat_format`, its assistant turns
  trained (of a messages prompt + completion, the completion's only)."""
  # local: keeps data importable without tokenizers
  from cai_jax.tokenizer import encode_chat, with_bos
  conversation = example_conversation(example, where)
  if conversation is None:
    text_ids = list(tokenizer.encode(example["text"]))
    if tokenizer.eos_id is not None:
      text_ids.append(tokenizer.eos_id)
    ids = with_bos(tokenizer, text_ids)
    return ids, [False] * (len(ids) - len(text_ids)) + [True] * len(text_ids)
  msgs, trained_from = conversation
  ids, train = encode_chat(tokenizer, msgs, chat_format, trained_from=trained_from)
  return list(ids), list(train)


def truncation_counts(examples: Sequence[Example], tokenizer: Any, chat_format: str,
                      seq_len: int) -> Tuple[int, int]:
  """(examples longer than seq_len, those of them whose every trained token lies past
  seq_len): ``tokenize_example`` keeps the first seq_len tokens, so the latter train
  nothing."""
  cut = untrained = 0
  for i, ex in enumerate(examples):
    ids, train = encode_example(ex, tokenizer, chat_format, f"example {i}")
    if len(ids) > seq_len:
      cut += 1
      untrained += not any(train[:seq_len])
  return cut, untrained


def tokenize_example(example: Example, tokenizer: Any, chat_format: str, seq_len: int,
                     where: str = "example") -> Dict[str, np.ndarray]:
  """One example -> {'tokens' [seq_len] int32, 'mask' [seq_len] bool, 'loss_mask' [seq_len] bool}
  (``encode_example`` cut to its first seq_len tokens, right-padded)."""
  ids, train = encode_example(example, tokenizer, chat_format, where)
  ids, train = ids[:seq_len], train[:seq_len]
  n = len(ids)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  tokens = np.full((seq_len,), pad, np.int32)
  tokens[:n] = ids
  mask = np.zeros((seq_len,), bool)
  mask[:n] = True
  loss_mask = np.zeros((seq_len,), bool)
  loss_mask[:n] = train
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


@dataclasses.dataclass(frozen=True)
class Batches:
  """Shuffled, repeated, batched encodings of `items`, built per process.

  Global batch k holds ``encode(items[i])`` stacked for the item indices
  i = order[k * batch_size:(k + 1) * batch_size], where order is a seeded permutation of
  the items repeated num_epochs times (None: forever) and a last partial batch is
  dropped. ``dataset(rows)`` gives a grain MapDataset of these batches restricted to the
  positions `rows` of every batch, so each process of a multi-process run encodes
  (tokenizes) only the rows its devices hold; ``cai_jax.train`` does that. Iterator
  states (``get_state()``, small JSON dicts that checkpoints store) count batches, so
  they do not depend on `rows`.

  Attributes:
    items: random-access items (examples, comparisons, rows).
    encode: item -> {field: array}; every item gives the same fields and shapes.
    batch_size: rows per global batch.
    seed: shuffle seed.
    num_epochs: passes over the items; None repeats forever.
  """

  items: Sequence[Any]
  encode: Callable[[Any], Dict[str, np.ndarray]]
  batch_size: int
  seed: int
  num_epochs: Optional[int] = None

  def dataset(self, rows: Optional[Sequence[int]] = None) -> grain.MapDataset:
    """Batches as a grain MapDataset: each element a dict of [len(rows) or batch_size, ...]
    arrays (rows: ascending positions within every batch; None = all). grain is imported
    here, so the readers above work where it is not installed."""
    import grain
    order = grain.MapDataset.range(len(self.items)).shuffle(seed=self.seed)
    batches = order.repeat(self.num_epochs).batch(self.batch_size, drop_remainder=True)
    pick = None if rows is None else np.asarray(rows, np.int64)

    def fetch(indices: np.ndarray) -> Dict[str, np.ndarray]:
      chosen = indices if pick is None else indices[pick]
      encoded = [self.encode(self.items[int(i)]) for i in chosen]
      return {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
    return batches.map(fetch)

  def __len__(self) -> int:
    """Number of global batches (a very large number when repeating forever)."""
    return len(self.dataset())

  def __getitem__(self, k: int) -> Dict[str, np.ndarray]:
    """Global batch k, every row."""
    return self.dataset()[k]


def lm_dataset(examples: Sequence[Example], tokenizer: Any, chat_format: str, seq_len: int,
               batch_size: int, seed: int, num_epochs: Optional[int] = None) -> Batches:
  """Shuffled, repeated (forever if num_epochs is None), batched tokenized examples.

  Each batch is a dict of [batch_size, seq_len] arrays (``tokenize_example``: tokens,
  mask, loss_mask, right-padded).
  """
  if len(examples) == 0:
    raise DataError("dataset is empty")
  if len(examples) < batch_size:
    raise DataError(f"dataset has {len(examples)} examples, fewer than batch_size={batch_size}")
  return Batches(examples, functools.partial(tokenize_example, tokenizer=tokenizer,
                                             chat_format=chat_format, seq_len=seq_len),
                 batch_size, seed, num_epochs)

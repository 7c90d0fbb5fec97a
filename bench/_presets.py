"""Reads the model presets in gin/models/*.gin without gin-config.

A preset file is a header of `#` comments followed by lines of the form
``ModelConfig.<field> = <python literal>``; ``cai_jax.plan.parse_preset`` reads exactly
that (plus blank lines and trailing comments), so the bench scripts run on machines
where gin-config is not installed. Listing and locating presets stays free of jax
imports (the scripts set XLA_FLAGS / JAX_PLATFORMS before jax is imported).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIR = os.path.join(REPO_ROOT, "gin", "models")


def ensure_repo_on_path() -> None:
  """Makes `import cai_jax` work when a script is run as `python bench/<name>.py`."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def available() -> List[str]:
  """Names of the presets in gin/models (file names without .gin)."""
  return sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith(".gin"))


def preset_path(name_or_path: str) -> str:
  """A preset name ('tinyllama_1b') or a path to a .gin file -> the file path."""
  if os.path.isfile(name_or_path):
    return name_or_path
  path = os.path.join(PRESET_DIR, name_or_path + ".gin")
  if not os.path.isfile(path):
    raise ValueError(f"unknown preset {name_or_path!r}; expected a file or one of {available()}")
  return path


def parse(text: str, source: str = "<preset>") -> Dict[str, Any]:
  """{field: value} of the `ModelConfig.field = literal` lines in `text`.

  ``cai_jax.plan.parse_preset``; it imports cai_jax (and so jax) on first use: call it after
  setting XLA_FLAGS / JAX_PLATFORMS.
  """
  ensure_repo_on_path()
  from cai_jax.plan import parse_preset
  return parse_preset(text, source)


def header_param_count(text: str) -> Optional[int]:
  """The `# params: N` count of a preset header, if present."""
  m = re.search(r"^#\s*params:\s*([\d,]+)", text, re.MULTILINE)
  return int(m.group(1).replace(",", "")) if m else None


def load_fields(name_or_path: str) -> Dict[str, Any]:
  """ModelConfig field overrides of one preset."""
  path = preset_path(name_or_path)
  with open(path, encoding="utf-8") as f:
    return parse(f.read(), path)


def model_config(name_or_path: str, **overrides: Any):
  """A cai_jax ModelConfig from a preset, with `overrides` (None values ignored) applied last."""
  ensure_repo_on_path()
  from cai_jax.configs import ModelConfig
  fields = load_fields(name_or_path)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return ModelConfig(**fields)


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N + 12·L·T·(H·Dh).

  N counts every parameter (embeddings and LM head included); the attention term
  is the QK^T and AV matmuls over the full T×T score matrix (forward + backward,
  no credit taken for causal masking), the PaLM / MaxText convention. Remat
  recomputation is not counted: this is model FLOPs, the numerator of MFU.
  """
  return 6.0 * cfg.param_count() + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head


# Dense bf16 peak (no sparsity) by substring of the device kind, in TFLOP/s.
PEAK_BF16_TFLOPS = (
    ("h200", 989.0),
    ("h100", 989.0),   # SXM; the PCIe card is 756 but reports a distinct kind ("H100 PCIe")
    ("a100", 312.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)


def peak_tflops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak of a device kind string, or None when it is not in the table."""
  kind = device_kind.lower()
  if "h100" in kind and "pcie" in kind:
    return 756.0
  for key, value in PEAK_BF16_TFLOPS:
    if key in kind:
      return value
  return None


def parse_mesh(parser, text: str):
  """'data,fsdp,tensor' -> a tuple of three ints (argparse error otherwise)."""
  try:
    dims = tuple(int(x) for x in text.split(","))
    if len(dims) != 3:
      raise ValueError
  except ValueError:
    parser.error(f"--mesh must be three comma-separated ints data,fsdp,tensor; got {text!r}")
  return dims


def fill_defaults(args, defaults: dict) -> None:
  """Sets every argparse attribute still None to its value in `defaults`."""
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)


def logger(name: str):
  """A function that prints '[name] message' to stderr."""
  def log(msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)
  return log

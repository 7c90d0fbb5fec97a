"""Every gin model preset: its header's parameter count equals eval_shape's count."""

import glob
import os
import re

import pytest

from cai_jax import models
from cai_jax.configs import ModelConfig

GIN_MODELS = os.path.join(os.path.dirname(__file__), "..", "gin", "models")
PAPER_FAMILY = {"810m": 810e6, "1_6b": 1.6e9, "3_5b": 3.5e9, "6_4b": 6.4e9, "13b": 13e9,
                "22b": 22e9, "52b": 52e9}
REQUIRED = {"tiny", "smollm2_135m", "tinyllama_1b"} | set(PAPER_FAMILY)


def _parse(path):
  """(header count, ModelConfig) from a preset file of `ModelConfig.k = literal` lines."""
  text = open(path).read()
  header = re.search(r"^# params: ([\d,]+)$", text, re.M)
  assert header, f"{path}: no '# params: N' header"
  fields = {}
  for line in text.splitlines():
    m = re.match(r"^ModelConfig\.(\w+) = (.+)$", line)
    if m:
      fields[m.group(1)] = eval(m.group(2), {}, {})  # literals only (our own files)
  return int(header.group(1).replace(",", "")), ModelConfig(**fields)


def _presets():
  return {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(GIN_MODELS, "*.gin"))}


def test_all_required_presets_exist():
  assert REQUIRED <= set(_presets())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_header_count_matches_eval_shape(name):
  count, cfg = _parse(_presets()[name])
  assert models.count_params(cfg) == count
  assert cfg.param_count() == count


@pytest.mark.parametrize("name", sorted(PAPER_FAMILY))
def test_paper_family_within_10_percent_of_name(name):
  count, _ = _parse(_presets()[name])
  assert abs(count / PAPER_FAMILY[name] - 1) < 0.10


def test_known_shapes():
  _, smol = _parse(_presets()["smollm2_135m"])
  assert (smol.n_layers, smol.d_model, smol.n_heads, smol.n_kv_heads, smol.d_ff, smol.vocab_size,
          smol.tie_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
  count, tl = _parse(_presets()["tinyllama_1b"])
  assert (tl.n_layers, tl.d_model, tl.n_heads, tl.n_kv_heads, tl.d_ff, tl.vocab_size) == (
      22, 2048, 32, 4, 5632, 32000)
  assert count == 1_100_048_384  # TinyLlama-1.1B's published count
  assert models.count_params(smol) == 134_515_008  # SmolLM2-135M's published count

"""Import and export of Llama-family checkpoints: HF safetensors and GGUF.

``load_hf``   reads ``config.json`` + ``*.safetensors`` (one file, or shards listed by
              ``model.safetensors.index.json``) of LlamaForCausalLM (Llama 2/3, TinyLlama,
              SmolLM2), MistralForCausalLM and Qwen2ForCausalLM.
``load_gguf`` reads a llama.cpp GGUF file (architecture ``llama``), any quantization the
              ``gguf`` package can dequantize.
``save_hf``   writes ``config.json`` + safetensors that ``transformers`` loads.
``export_chat_template`` the Jinja chat template an export carries: one that renders the
              chat format the model was trained in (``CHAT_TEMPLATES``).

Both loaders read the checkpoint one tensor at a time and place it straight into its
final layout: with a mesh, every parameter is built with ``jax.make_array_from_callback``
on the NamedSharding its logical axes give (``cai_jax.sharding.logical_shardings``), and
each host reads only the region of each tensor its own devices hold (safetensors) or one
tensor at a time (GGUF). No pickled file is ever read. A load of ``PROGRESS_MIN_BYTES``
(1 GiB) of parameters or more shows a progress bar ("load weights", bytes) on process 0's
stderr.

Shapes: V = vocab, D = d_model, L = layers, H = query heads, K = kv heads,
Dh = head_dim, F = d_ff. HF stores a linear layer as weight [out, in]; GGUF lists the
same dims reversed (ne0 = in first) and dequantizes to the HF [out, in] array.
Our params (``scan_layers=True``: per-layer entries stacked on a leading [L] axis under
``layers``; ``scan_layers=False``: ``layers_0``, ``layers_1``, ... without that axis):

=======================================  ===================================  ======================  =======================================
ours                                     HF (model.layers.{i}. prefix)        GGUF (blk.{i}. prefix)  conversion
=======================================  ===================================  ======================  =======================================
embed/embedding [V, D]                   model.embed_tokens.weight [V, D]     token_embd.weight       as is
layers/attn_norm/scale [L, D]            input_layernorm.weight [D]           attn_norm.weight        as is
layers/attn/q_proj/kernel [L, D, H, Dh]  self_attn.q_proj.weight [H*Dh, D]    attn_q.weight           W.T.reshape(D, H, Dh); GGUF: un-permute
layers/attn/q_proj/bias [L, H, Dh]       self_attn.q_proj.bias [H*Dh]         attn_q.bias             b.reshape(H, Dh); GGUF: un-permute
layers/attn/k_proj/kernel [L, D, K, Dh]  self_attn.k_proj.weight [K*Dh, D]    attn_k.weight           W.T.reshape(D, K, Dh); GGUF: un-permute
layers/attn/k_proj/bias [L, K, Dh]       self_attn.k_proj.bias [K*Dh]         attn_k.bias             b.reshape(K, Dh); GGUF: un-permute
layers/attn/v_proj/kernel [L, D, K, Dh]  self_attn.v_proj.weight [K*Dh, D]    attn_v.weight           W.T.reshape(D, K, Dh)
layers/attn/v_proj/bias [L, K, Dh]       self_attn.v_proj.bias [K*Dh]         attn_v.bias             b.reshape(K, Dh)
layers/attn/o_proj/kernel [L, H, Dh, D]  self_attn.o_proj.weight [D, H*Dh]    attn_output.weight      W.T.reshape(H, Dh, D)
layers/mlp_norm/scale [L, D]             post_attention_layernorm.weight [D]  ffn_norm.weight         as is
layers/mlp/gate_proj/kernel [L, D, F]    mlp.gate_proj.weight [F, D]          ffn_gate.weight         W.T
layers/mlp/up_proj/kernel [L, D, F]      mlp.up_proj.weight [F, D]            ffn_up.weight           W.T
layers/mlp/down_proj/kernel [L, F, D]    mlp.down_proj.weight [D, F]          ffn_down.weight         W.T
final_norm/scale [D]                     model.norm.weight [D]                output_norm.weight      as is
lm_head/kernel [D, V]                    lm_head.weight [V, D]                output.weight           W.T; absent when tied
=======================================  ===================================  ======================  =======================================

RoPE: our ``apply_rope`` uses HF's rotate-half convention, so HF q/k weights map
directly. llama.cpp's converter permutes the rows of q and k within each head to the
interleaved (GPT-J) convention: HF row ``h*Dh + j*Dh/2 + i`` (j in {0, 1}) becomes GGUF
row ``h*Dh + 2*i + j``; ``load_gguf`` undoes this (query heads for q, kv heads for k),
on the q/k bias entries too.

q/k/v biases (``qkv_bias``): Qwen2 checkpoints; a llama GGUF that has attn_{q,k,v}.bias
(llama.cpp applies them). A tensor no parameter uses (an o_proj or MLP bias, a
quantization scale) is refused, naming it: ignoring it would load another model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype for safetensors)
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from cai_jax import models
from cai_jax import sharding as sharding_lib
from cai_jax.configs import MeshConfig, ModelConfig, dtype_from_name
from cai_jax.errors import first_line

Params = Any
Region = Tuple[Tuple[int, int], ...]   # per-dim [start, stop) of an array

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}

# Loads of at least this many parameter bytes show a progress bar (on process 0's stderr).
PROGRESS_MIN_BYTES = 1 << 30

# safetensors dtypes of weights that are read (others: integer or FP8 quantized codes).
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Checkpoint tensors the model may ignore: they do not change its outputs (rotary tables
# that older Llama checkpoints store; our RoPE computes the same frequencies).
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rope_freqs.weight")

# Files copied next to an export from `tokenizer_dir`.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "byte_tokenizer.json")

# Jinja chat templates whose transformers ``apply_chat_template(messages, tokenize=False,
# add_generation_prompt=...)`` output is ``tokenizer.render_chat_text`` of each chat format.
CHAT_TEMPLATES = {
    "chatml": ("{%- for message in messages -%}"
               "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
               "{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama3": ("{{- '<|begin_of_text|>' -}}"
               "{%- for message in messages -%}"
               "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
               " + message['content'] | trim + '<|eot_id|>' -}}"
               "{%- endfor -%}"
               "{%- if add_generation_prompt -%}"
               "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
    "raw": ("{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{- message['content'] -}}"
            "{%- elif message['role'] == 'user' -%}{{- '\\n\\nHuman: ' + message['content'] -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- '\\n\\nAssistant: ' + message['content'] -}}"
            "{%- else -%}{{- raise_exception('the raw chat format has no role ' + message['role']) -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '\\n\\nAssistant:' -}}{%- endif -%}"),
}


# --------------------------------------------------------------------------- configs


def _f32(x: float) -> float:
  """Shortest decimal of a float32 value (GGUF stores 1e-5 as 9.99999974e-06)."""
  return float(str(np.float32(x)))


_REQUIRED = object()


def _number(c: Dict[str, Any], key: str, source: str, default: Any = _REQUIRED,
            integer: bool = True) -> Any:
  """c[key] as an int (a positive whole number) or a float; `default` when the key is
  absent or null (when given). ValueError naming `source` and the field otherwise."""
  value = c.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"{source}: field {key!r} is {'null' if key in c else 'missing'}")
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{source}: field {key!r} is {value!r}, not a number")
  if integer:
    if value != int(value) or value <= 0:
      raise ValueError(f"{source}: field {key!r} is {value!r}, not a positive integer")
    return int(value)
  return float(value)


def _model_config(kwargs: Dict[str, Any], source: str) -> ModelConfig:
  """ModelConfig(**kwargs); its ValueError (values that do not fit together, e.g. kv heads
  that do not divide the heads) is prefixed with `source`, the file they came from."""
  try:
    return ModelConfig(**kwargs)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def config_from_hf(config_json: Dict[str, Any], source: str = "config.json",
                   **overrides) -> ModelConfig:
  """ModelConfig for an HF ``config.json`` dict (Llama / Mistral / Qwen2 causal LMs).

  Handles both the legacy keys (``rope_theta``, ``rope_scaling``) and transformers 5's
  ``rope_parameters``, with transformers' precedence: ``rope_scaling`` over
  ``rope_parameters``, the ``rope_theta`` inside that object over a top-level one, and
  for 'llama3' a top-level ``original_max_position_embeddings`` over the object's, which
  defaults to ``max_position_embeddings``. Only the default and 'llama3' RoPE types are
  supported. A sliding window (Mistral, whose ``sliding_window`` defaults to 4096 when
  the key is absent; Qwen2 with ``use_sliding_window`` and a layer it windows: one at or
  past ``max_window_layers``, or named in ``layer_types``) caps ``max_seq_len`` at the
  window, within which full causal attention is identical. ``overrides`` are
  further ModelConfig fields (e.g. ``scan_layers=False``, ``dtype='bfloat16'``).
  Raises ValueError naming `source` (the file the dict came from) and the field, for any
  unsupported architecture or feature, a quantized checkpoint (``quantization_config``),
  and a required field that is missing, null or not a number.
  """
  c = config_json
  if not isinstance(c, dict):
    raise ValueError(f"{source}: not a JSON object")
  archs = c.get("architectures") or []
  if not isinstance(archs, list):
    raise ValueError(f"{source}: field 'architectures' is {archs!r}, not a list")
  if not archs:
    model_type = c.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(f"{source}: no 'architectures' and model_type {model_type!r} is not one of "
                       f"{sorted(_MODEL_TYPES)}")
    archs = [_MODEL_TYPES[model_type]]
  for arch in archs:
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: "
                       f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  arch = archs[0]

  quant = c.get("quantization_config")
  if quant:
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    raise ValueError(f"{source}: quantization_config (quant_method {method!r}) is set; quantized "
                     "checkpoints are not supported (use an unquantized float16/bfloat16/float32 one)")
  act = c.get("hidden_act", c.get("hidden_activation", "silu"))
  if act != "silu":
    raise ValueError(f"{source}: {arch}: hidden_act {act!r} is not supported (only 'silu')")
  if c.get("mlp_bias"):
    raise ValueError(f"{source}: {arch}: mlp_bias=True is not supported")
  if arch == "Qwen2ForCausalLM":
    qkv_bias = True
  else:
    if c.get("attention_bias"):
      raise ValueError(f"{source}: {arch}: attention_bias=True (biases on q, k, v and o) is not supported")
    qkv_bias = False

  d_model = _number(c, "hidden_size", source)
  n_heads = _number(c, "num_attention_heads", source)
  n_kv = _number(c, "num_key_value_heads", source, n_heads)
  head_dim = _number(c, "head_dim", source, None)
  if head_dim is not None and d_model % n_heads == 0 and head_dim == d_model // n_heads:
    head_dim = None

  key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
  scaling = c.get(key) or {}
  if not isinstance(scaling, dict):
    raise ValueError(f"{source}: field {key!r} is {scaling!r}, not an object")
  if any(isinstance(v, dict) for v in scaling.values()):
    raise ValueError(f"{source}: {arch}: per-layer-type {key} are not supported: {scaling}")
  where = f"{source} {key}"
  rope_theta = _number(scaling, "rope_theta", where,
                       _number(c, "rope_theta", source, 10000.0, False), integer=False)
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  max_len = _number(c, "max_position_embeddings", source, 2048)
  rope_kwargs = {}
  if rope_type == "llama3":
    original = _number(c, "original_max_position_embeddings", source,
                       _number(scaling, "original_max_position_embeddings", where, max_len))
    rope_kwargs = dict(
        rope_scaling_factor=_number(scaling, "factor", where, integer=False),
        rope_low_freq_factor=_number(scaling, "low_freq_factor", where, 1.0, False),
        rope_high_freq_factor=_number(scaling, "high_freq_factor", where, 4.0, False),
        rope_original_max_len=original)
  elif rope_type not in (None, "default"):
    raise ValueError(f"{source}: {arch}: rope type {rope_type!r} is not supported (only default and 'llama3')")

  window = None
  if arch == "MistralForCausalLM" or c.get("use_sliding_window"):
    window = _number(c, "sliding_window", source, None) if "sliding_window" in c else 4096
  if window and arch != "MistralForCausalLM":
    # Qwen2 windows only its layers i >= max_window_layers (default 28), or those its
    # layer_types name 'sliding_attention', as transformers' Qwen2Config does.
    types = c.get("layer_types")
    if isinstance(types, list):
      windowed = "sliding_attention" in types
    else:
      windowed = (_number(c, "max_window_layers", source, 28) if c.get("max_window_layers") != 0
                  else 0) < _number(c, "num_hidden_layers", source)
    window = window if windowed else None
  if window:
    max_len = min(max_len, window)

  kwargs = dict(
      vocab_size=_number(c, "vocab_size", source), d_model=d_model,
      n_layers=_number(c, "num_hidden_layers", source), n_heads=n_heads, n_kv_heads=n_kv,
      d_ff=_number(c, "intermediate_size", source), head_dim=head_dim, max_seq_len=max_len,
      rope_theta=rope_theta, norm_eps=_number(c, "rms_norm_eps", source, 1e-6, False),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, **rope_kwargs)
  kwargs.update(overrides)
  return _model_config(kwargs, source)


def hf_config_from(config: ModelConfig) -> Dict[str, Any]:
  """HF ``config.json`` dict for a ModelConfig: LlamaForCausalLM, or Qwen2ForCausalLM when
  qkv_bias. Uses the legacy ``rope_theta`` / ``rope_scaling`` keys, which transformers 4
  and 5 both read."""
  qwen = config.qkv_bias
  out = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.d_ff,
      "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads,
      "num_key_value_heads": config.n_kv_heads,
      "head_dim": config.dim_per_head,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": config.param_dtype,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if config.rope_scaling_factor and config.rope_scaling_factor > 0:
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": config.rope_scaling_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_len}
  if qwen:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
  else:
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  return out


# --------------------------------------------------------------------------- name mapping

# Kinds of conversion from an HF tensor to our per-layer array (see the module table).
_COPY = "copy"              # same array
_TRANSPOSE = "transpose"    # [out, in] -> [in, out]
_HEADS_IN = "heads_in"      # [N*Dh, D] -> [D, N, Dh]   (q, k, v kernels)
_HEADS_OUT = "heads_out"    # [D, N*Dh] -> [N, Dh, D]   (o kernel)
_HEADS_BIAS = "heads_bias"  # [N*Dh]    -> [N, Dh]      (q, k, v biases)

_BLOCK_MAP = {
    ("attn_norm", "scale"): ("input_layernorm.weight", _COPY),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _COPY),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", _HEADS_IN),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", _HEADS_IN),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", _HEADS_IN),
    ("attn", "q_proj", "bias"): ("self_attn.q_proj.bias", _HEADS_BIAS),
    ("attn", "k_proj", "bias"): ("self_attn.k_proj.bias", _HEADS_BIAS),
    ("attn", "v_proj", "bias"): ("self_attn.v_proj.bias", _HEADS_BIAS),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", _HEADS_OUT),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", _TRANSPOSE),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", _TRANSPOSE),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", _TRANSPOSE),
}
_TOP_MAP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", _COPY),
    ("final_norm", "scale"): ("model.norm.weight", _COPY),
    ("lm_head", "kernel"): ("lm_head.weight", _TRANSPOSE),
}

# HF name (after the layer prefix) -> GGUF name.
_GGUF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_gguf_name(hf_name: str) -> str:
  """GGUF tensor name of an HF tensor name (e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
  if hf_name in _GGUF_TOP_NAMES:
    return _GGUF_TOP_NAMES[hf_name]
  parts = hf_name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _GGUF_BLOCK_NAMES:
    return f"blk.{parts[2]}.{_GGUF_BLOCK_NAMES[parts[3]]}"
  raise KeyError(f"no GGUF name for HF tensor {hf_name!r}")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one of our parameter leaves is made from HF tensors.

  names: HF tensor names, one per layer when stacked (leaf has a leading [L] axis), else one.
  kind: one of the conversion kinds above.
  head_dim: Dh, used by the heads kinds.
  """
  names: Tuple[str, ...]
  kind: str
  stacked: bool
  head_dim: int


def _plan(path: Tuple[str, ...], config: ModelConfig) -> _Plan:
  hd = config.dim_per_head
  if path in _TOP_MAP:
    name, kind = _TOP_MAP[path]
    return _Plan((name,), kind, False, hd)
  head, rest = path[0], tuple(path[1:])
  if rest in _BLOCK_MAP:
    suffix, kind = _BLOCK_MAP[rest]
    if head == "layers":
      return _Plan(tuple(f"model.layers.{i}.{suffix}" for i in range(config.n_layers)), kind, True, hd)
    if head.startswith("layers_") and head[len("layers_"):].isdigit():
      return _Plan((f"model.layers.{int(head[len('layers_'):])}.{suffix}",), kind, False, hd)
  raise ValueError(f"parameter {'/'.join(path)} has no checkpoint counterpart "
                   "(only the LM-head decoder converts)")


def _hf_shape(kind: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """HF tensor shape for our per-layer shape."""
  if kind == _COPY:
    return tuple(shape)
  if kind == _TRANSPOSE:
    return (shape[1], shape[0])
  if kind == _HEADS_IN:
    d, n, hd = shape
    return (n * hd, d)
  if kind == _HEADS_OUT:
    n, hd, d = shape
    return (d, n * hd)
  if kind == _HEADS_BIAS:
    n, hd = shape
    return (n * hd,)
  raise AssertionError(kind)


def _to_ours(kind: str, w: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """Full HF tensor -> our per-layer array of `shape`."""
  if kind == _COPY:
    return w
  if kind == _TRANSPOSE:
    return w.T
  if kind == _HEADS_IN:
    return w.T.reshape(shape)
  if kind == _HEADS_OUT:
    return w.T.reshape(shape)
  if kind == _HEADS_BIAS:
    return w.reshape(shape)
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """Our per-layer array -> HF tensor (inverse of _to_ours)."""
  if kind == _COPY:
    return x
  if kind == _TRANSPOSE:
    return x.T
  if kind == _HEADS_IN:
    d = x.shape[0]
    return x.reshape(d, -1).T
  if kind == _HEADS_OUT:
    d = x.shape[-1]
    return x.reshape(-1, d).T
  if kind == _HEADS_BIAS:
    return x.reshape(-1)
  raise AssertionError(kind)


# --------------------------------------------------------------------------- sources


class _Source:
  """Tensors by HF name, HF layout. read() returns the region [start, stop) per dim.
  names() lists every tensor of the checkpoint (one with no HF name under its own name)."""

  def shape(self, name: str) -> Optional[Tuple[int, ...]]:
    raise NotImplementedError

  def dtype(self, name: str) -> str:
    """The tensor's safetensors dtype code ('F32', 'BF16', 'I8', 'F8_E4M3', ...)."""
    raise NotImplementedError

  def where(self, name: str) -> str:
    """The tensor as an error message names it: its file and its name in that file (for a
    tensor the checkpoint lacks: the file or index that would hold it, and that name)."""
    raise NotImplementedError

  def read(self, name: str, region: Region) -> np.ndarray:
    raise NotImplementedError

  def names(self) -> List[str]:
    raise NotImplementedError


def _safe_open(file: str):
  """safetensors.safe_open(file) for numpy; ValueError naming the file when it is missing or
  not a valid safetensors file (truncated, garbage)."""
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(file, framework="numpy")
  except FileNotFoundError:
    raise ValueError(f"{file}: no such safetensors file") from None
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a valid safetensors file ({first_line(e)})") from None


class _SafetensorsSource(_Source):
  """Reads slices of tensors lazily from one or more safetensors files. `origin` is what an
  error about a tensor the files lack names: the index, the only file, or the folder."""

  def __init__(self, weight_map: Dict[str, str], stack: contextlib.ExitStack, origin: str):
    self._map = weight_map
    self._origin = origin
    self._handles = {}
    self._stack = stack

  def _handle(self, name):
    file = self._map[name]
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(_safe_open(file))
    return self._handles[file]

  def _slice(self, name):
    try:
      return self._handle(name).get_slice(name)
    except Exception as e:   # SafetensorError: the index names a tensor its file lacks
      raise ValueError(f"{self.where(name)}: cannot read the tensor ({first_line(e)})") from None

  def names(self):
    return list(self._map)

  def where(self, name):
    return f"{self._map.get(name, self._origin)}: tensor {name!r}"

  def dtype(self, name):
    return self._slice(name).get_dtype()

  def shape(self, name):
    if name not in self._map:
      return None
    return tuple(int(s) for s in self._slice(name).get_shape())

  def read(self, name, region):
    sl = self._slice(name)
    return np.asarray(sl[tuple(slice(a, b) for a, b in region)])


def _unpermute_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation on whole heads: w [n*Dh, ...] (GGUF row order)."""
  n = w.shape[0] // head_dim
  return (w.reshape(n, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@functools.lru_cache(maxsize=None)
def _dequantizable(tensor_type) -> bool:
  """Whether ``gguf.quants.dequantize`` decodes tensors of this GGML type (tried on one
  zero block: integer types and types the package has no decoder for raise)."""
  from gguf.constants import GGML_QUANT_SIZES
  from gguf.quants import dequantize
  if tensor_type not in GGML_QUANT_SIZES:
    return False
  try:
    dequantize(np.zeros((1, GGML_QUANT_SIZES[tensor_type][1]), np.uint8), tensor_type)
  except NotImplementedError:
    return False
  return True


class _GGUFSource(_Source):
  """Dequantizes GGUF tensors (rows on demand) and presents them under HF names."""

  def __init__(self, file, head_dim: int):
    self._tensors = file.tensors
    self._path = file.path
    self._hd = head_dim
    for t in self._tensors.values():
      if not _dequantizable(t.tensor_type):
        kind = getattr(t.tensor_type, "name", str(t.tensor_type))
        raise ValueError(f"{file.path}: tensor {t.name} has type {kind}, which is not a float or "
                         f"quantized weight type the gguf package can dequantize")

  def names(self):
    """Every tensor of the file: its HF name when it has one, else its GGUF name (e.g.
    blk.0.attn_output.bias, which no parameter uses)."""
    out = []
    for name in self._tensors:
      hf_name = None
      for hf, gg in _GGUF_TOP_NAMES.items():
        if gg == name:
          hf_name = hf
      if name.startswith("blk.") and name.count(".") >= 2:
        _, i, rest = name.split(".", 2)
        for hf, gg in _GGUF_BLOCK_NAMES.items():
          if gg == rest:
            hf_name = f"model.layers.{i}.{hf}"
      out.append(hf_name or name)
    return out

  def _gguf_name(self, name):
    try:
      return hf_to_gguf_name(name)
    except KeyError:
      return name

  def where(self, name):
    return f"{self._path}: tensor {self._gguf_name(name)}"

  def dtype(self, name):
    return "F32"   # every tensor is dequantized to float32 (checked in __init__)

  def _tensor(self, name):
    try:
      return self._tensors.get(hf_to_gguf_name(name))
    except KeyError:
      return None

  def shape(self, name):
    t = self._tensor(name)
    return None if t is None else tuple(int(s) for s in reversed(t.shape))

  def read(self, name, region):
    from gguf.quants import dequantize
    t = self._tensor(name)
    full = self.shape(name)
    (r0, r1), rest = region[0], region[1:]
    permuted = name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                              "self_attn.q_proj.bias", "self_attn.k_proj.bias"))
    if permuted and (r0 % self._hd or r1 % self._hd):
      raise AssertionError(f"{name}: rows [{r0}, {r1}) do not cover whole heads")
    if len(full) == 1:   # one row: the data of a quantized / BF16 type is its bytes
      w = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(full)[r0:r1]
    else:
      w = dequantize(np.asarray(t.data[r0:r1]), t.tensor_type)
      w = np.asarray(w, np.float32).reshape((r1 - r0,) + full[1:])
    if permuted:
      w = _unpermute_rows(w, self._hd)
    return w[(slice(None),) + tuple(slice(a, b) for a, b in rest)]


# --------------------------------------------------------------------------- placement


def _norm_index(index: Sequence[slice], shape: Tuple[int, ...]) -> Region:
  out = []
  for s, d in zip(index, shape):
    start, stop, step = s.indices(d)
    if step != 1:
      raise AssertionError(f"strided shard index {s}")
    out.append((start, stop))
  return tuple(out)


def _read_region(source: _Source, name: str, kind: str, region: Region, hd: int) -> np.ndarray:
  """Our per-layer array restricted to `region`, reading only what it needs."""
  if kind == _COPY:
    return source.read(name, region)
  if kind == _TRANSPOSE:
    return source.read(name, (region[1], region[0])).T
  if kind == _HEADS_IN:
    (d0, d1), (n0, n1), (h0, h1) = region
    w = source.read(name, ((n0 * hd, n1 * hd), (d0, d1)))
    return w.reshape(n1 - n0, hd, d1 - d0).transpose(2, 0, 1)[:, :, h0:h1]
  if kind == _HEADS_OUT:
    (n0, n1), (h0, h1), (d0, d1) = region
    w = source.read(name, ((d0, d1), (n0 * hd, n1 * hd)))
    return w.reshape(d1 - d0, n1 - n0, hd).transpose(1, 2, 0)[:, h0:h1, :]
  if kind == _HEADS_BIAS:
    (n0, n1), (h0, h1) = region
    return source.read(name, ((n0 * hd, n1 * hd),)).reshape(n1 - n0, hd)[:, h0:h1]
  raise AssertionError(kind)


def _materialize(plan: _Plan, shape: Tuple[int, ...], dtype, sharding, source: _Source,
                 tick=lambda fraction: None) -> jax.Array:
  """Builds one parameter directly in `sharding`: each distinct shard this host holds is
  filled from one read per source tensor covering all of this host's shards. tick(f) is
  called as each fraction f of the parameter is read (per layer when stacked)."""
  index_map = sharding.addressable_devices_indices_map(shape)
  keys = sorted({_norm_index(idx, shape) for idx in index_map.values()})
  bbox = tuple((min(k[i][0] for k in keys), max(k[i][1] for k in keys)) for i in range(len(shape)))
  bufs = {k: np.empty([b - a for a, b in k], dtype) for k in keys}

  def rel(k, box):
    return tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(k, box))

  if plan.stacked:
    (l0, l1), inner = bbox[0], bbox[1:]
    for layer in range(l0, l1):
      region = _read_region(source, plan.names[layer], plan.kind, inner, plan.head_dim)
      for k in keys:
        if k[0][0] <= layer < k[0][1]:
          bufs[k][layer - k[0][0]] = region[rel(k[1:], inner)]
      tick(1 / max(l1 - l0, 1))
  else:
    region = _read_region(source, plan.names[0], plan.kind, bbox, plan.head_dim)
    for k in keys:
      bufs[k][...] = region[rel(k, bbox)]
    tick(1.0)
  if isinstance(sharding, SingleDeviceSharding):
    return jax.device_put(bufs[keys[0]])   # uncommitted, like jnp.asarray
  return jax.make_array_from_callback(shape, sharding, lambda idx: bufs[_norm_index(idx, shape)])


def _load_params(config: ModelConfig, source: _Source, mesh: Optional[Mesh], rules) -> Params:
  """Checks every tensor's presence and shape, then builds the param tree leaf by leaf."""
  abstract = models.abstract_params(config)
  shapes = traverse_util.flatten_dict(sharding_lib.unbox_shapes(abstract))
  if mesh is not None:
    rules = sharding_lib.rules_for(MeshConfig().rules) if rules is None else rules
    shardings = traverse_util.flatten_dict(sharding_lib.logical_shardings(abstract, mesh, rules))
  else:
    single = SingleDeviceSharding(jax.devices()[0])
    shardings = {path: single for path in shapes}
  plans = {path: _plan(path, config) for path in shapes}

  used = set()
  for path, plan in plans.items():
    per_layer = shapes[path].shape[1:] if plan.stacked else shapes[path].shape
    want = _hf_shape(plan.kind, tuple(per_layer))
    for name in plan.names:
      got = source.shape(name)
      if got is None:
        raise ValueError(f"{source.where(name)} is missing (expected shape {want}, needed for "
                         f"parameter {'/'.join(path)})")
      if tuple(got) != want:
        raise ValueError(f"{source.where(name)} has shape {tuple(got)} but the model expects "
                         f"{want} (parameter {'/'.join(path)}, config {config})")
      dtype = source.dtype(name)
      if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{source.where(name)} has dtype {dtype}; only {', '.join(_FLOAT_DTYPES)} "
                         "weights are read (quantized checkpoints are not supported)")
      used.add(name)
  unused = sorted(set(source.names()) - used)
  harmless = [n for n in unused if n.endswith(_HARMLESS_SUFFIXES)
              or (n == "lm_head.weight" and config.tie_embeddings)]
  if harmless:
    logging.info("convert: ignoring %d checkpoint tensors: %s", len(harmless), harmless[:8])
  changes_math = [n for n in unused if n not in harmless]
  if changes_math:
    raise ValueError(f"{source.where(changes_math[0])} is not used by this model (a bias, "
                     "quantization scale or other weight it cannot apply)"
                     + (f"; {len(changes_math) - 1} more such tensors" if len(changes_math) > 1 else ""))

  dtype = np.dtype(dtype_from_name(config.param_dtype))
  sizes = {path: math.prod(shapes[path].shape) * dtype.itemsize for path in plans}
  total = sum(sizes.values())
  from tqdm import tqdm
  out = {}
  with tqdm(total=total, desc="load weights", unit="B", unit_scale=True, unit_divisor=1024,
            disable=total < PROGRESS_MIN_BYTES or jax.process_index() != 0) as bar:
    for path, plan in plans.items():
      out[path] = _materialize(plan, tuple(shapes[path].shape), dtype, shardings[path], source,
                               lambda f, n=sizes[path]: bar.update(n * f))
  return traverse_util.unflatten_dict(out)


def _dtype_name(dtype) -> str:
  if isinstance(dtype, str):
    dtype_from_name(dtype)
    return dtype
  name = jnp.dtype(dtype).name
  dtype_from_name(name)
  return name


# --------------------------------------------------------------------------- HF safetensors


def _read_json(path: str) -> Any:
  """The JSON value in `path`; ValueError naming the file when it is not valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except UnicodeDecodeError:
    raise ValueError(f"{path}: invalid JSON (not UTF-8 text)") from None


def _weight_map(directory: str) -> Dict[str, str]:
  """{tensor name: safetensors file} of an HF folder: from model.safetensors.index.json when
  present (every file it names must exist), else from every *.safetensors file's header.
  ValueError naming the file and field for a malformed index or safetensors file, and
  naming both files for a tensor two files hold when there is no index."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    doc = _read_json(index)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
      raise ValueError(f"{index}: field 'weight_map' is missing or not an object of "
                       "{tensor name: file name}")
    out = {name: os.path.join(directory, file) for name, file in wm.items()}
    for file in sorted(set(wm.values())):
      if not os.path.isfile(os.path.join(directory, file)):
        raise ValueError(f"{index}: weight_map names {file}, which does not exist in {directory}")
    return out
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ValueError(f"no *.safetensors files in {directory} (pickled .bin/.pt checkpoints are not read)")
  out = {}
  for file in files:
    with _safe_open(file) as f:
      for name in f.keys():
        if name in out:
          raise ValueError(f"{directory}: tensor {name!r} is in both {out[name]} and {file} (and "
                           "there is no model.safetensors.index.json to say which to read)")
        out[name] = file
  return out


HF_FOLDER_KIND = "Hugging Face model folder (config.json + *.safetensors)"


def is_hf_folder(directory: str) -> bool:
  """Whether `directory` holds config.json and at least one *.safetensors file."""
  return (os.path.isfile(os.path.join(directory, "config.json"))
          and bool(glob.glob(os.path.join(directory, "*.safetensors"))))


def load_hf(path: str, config: Optional[ModelConfig] = None, mesh: Optional[Mesh] = None,
            rules=None, dtype=None) -> Tuple[ModelConfig, Params]:
  """Loads an HF Llama / Mistral / Qwen2 checkpoint directory into our params.

  Args:
    path: directory with config.json and model.safetensors (or shards + index); a path
      to a .safetensors file uses the config.json beside it.
    config: ModelConfig to load into (e.g. with scan_layers=False or another compute
      dtype); default ``config_from_hf(config.json)``. Its tie_embeddings and qkv_bias
      must match the checkpoint; shapes are checked tensor by tensor.
    mesh: place every parameter directly in its NamedSharding on this mesh (default:
      the first device).
    rules: logical-axis rules for the mesh (default: the 'fsdp' preset).
    dtype: storage dtype of the loaded params ('float32', 'bfloat16', 'float16' or a
      dtype); sets the returned config's param_dtype. Default: config.param_dtype.
  Returns:
    (config, params) with params in the layout of ``models.init(config, ...)``.
  Raises:
    ValueError naming a missing tensor, or a tensor and both shapes on a mismatch; naming
    the file and field of a malformed config.json, index or safetensors file; naming a
    quantized checkpoint's quant_method, a non-float weight tensor and its dtype, or a
    tensor the model cannot apply (e.g. an o_proj bias).
  """
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, "config.json")
  hf_cfg = config_from_hf(_read_json(config_path), source=config_path)
  config = _given_or_file_config(config, hf_cfg, config_path)
  if dtype is not None:
    config = dataclasses.replace(config, param_dtype=_dtype_name(dtype))
  if os.path.isdir(path):
    weight_map = _weight_map(path)
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(weight_map.values()))
    origin = index if os.path.exists(index) else files[0] if len(files) == 1 else path
  else:
    with _safe_open(path) as f:
      weight_map = {name: path for name in f.keys()}
    origin = path
  with contextlib.ExitStack() as stack:
    source = _SafetensorsSource(weight_map, stack, origin)
    params = _load_params(config, source, mesh, rules)
  return config, params


def _given_or_file_config(config: Optional[ModelConfig], stored: ModelConfig,
                          source: str) -> ModelConfig:
  """The config a load uses: `stored` (read from `source`) when `config` is None, else
  `config`, which must agree with it on the parameter tree (tie_embeddings, qkv_bias:
  ValueError naming `source`); a differing rope_theta, norm_eps or RoPE scaling factor is
  logged as a warning (allowed, but another model's math)."""
  if config is None:
    return stored
  for field in ("tie_embeddings", "qkv_bias"):
    if getattr(config, field) != getattr(stored, field):
      raise ValueError(f"{source}: config.{field}={getattr(config, field)} but the checkpoint "
                       f"has {getattr(stored, field)}")
  for field in ("rope_theta", "norm_eps", "rope_scaling_factor"):
    if getattr(config, field) != getattr(stored, field):
      logging.warning("convert: config.%s=%s differs from %s's %s", field,
                      getattr(config, field), source, getattr(stored, field))
  return config


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf(params: Params, config: ModelConfig, directory: str, tokenizer_dir: Optional[str] = None,
            max_shard_bytes: int = 5 * 2**30, chat_template: Optional[str] = None,
            chat_format: Optional[str] = None) -> None:
  """Exports LM params as an HF checkpoint: config.json + safetensors (+ tokenizer files).

  Args:
    params: params of ``models.init(config, ...)`` layout (scanned or unrolled as config says).
    config: their ModelConfig. Written as LlamaForCausalLM, or Qwen2ForCausalLM when qkv_bias.
    directory: the folder to write. The whole export is written into a temporary sibling
      that then takes its place (``model_dir.replacing_dir``), so `directory` holds either
      its earlier contents or the complete new export, never a mix, and an interrupted
      export leaves it as it was. An existing `directory` is replaced only when it is empty
      or an HF model folder (``is_hf_folder``); anything else (a file, another directory)
      is a ValueError naming it, raised before anything is written.
    tokenizer_dir: optional directory whose tokenizer files (tokenizer.json,
      tokenizer_config.json, special_tokens_map.json, tokenizer.model, ...) are copied;
      its tokenizer's BOS / EOS / PAD ids go into config.json (``_special_token_ids``).
    max_shard_bytes: shard size above which a new model-0000i-of-0000N.safetensors file
      starts (an index is written when there is more than one).
    chat_template: optional Jinja chat template the exported tokenizer files carry instead
      of `tokenizer_dir`'s (``export_chat_template``); those files are left unchanged.
    chat_format: the chat format the model was trained in, if any: its end-of-turn token
      joins config.json's eos_token_id (``_special_token_ids``), so generate() stops there.
  Tensors are written in config.param_dtype, one parameter at a time. With several
  processes every process must call this; only process 0 writes.
  """
  from cai_jax import model_dir
  flat = traverse_util.flatten_dict(params)
  expected = traverse_util.flatten_dict(sharding_lib.unbox_shapes(models.abstract_params(config)))
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    raise ValueError(f"params do not match the config's layout: missing {missing}, unexpected {extra}")
  for path, x in flat.items():
    if tuple(x.shape) != tuple(expected[path].shape):
      raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(x.shape)} but config expects "
                       f"{tuple(expected[path].shape)}")
  writer = jax.process_index() == 0
  dtype = np.dtype(dtype_from_name(config.param_dtype))
  hf_config = dict(hf_config_from(config), **_special_token_ids(tokenizer_dir, chat_format))
  if writer:
    with model_dir.replacing_dir(directory, is_hf_folder, HF_FOLDER_KIND) as tmp:
      _write_hf(flat, config, hf_config, dtype, tmp, tokenizer_dir, max_shard_bytes, writer,
                chat_template)
  else:
    _write_hf(flat, config, hf_config, dtype, None, tokenizer_dir, max_shard_bytes, writer)


def _write_hf(flat: Dict[Tuple[str, ...], Any], config: ModelConfig, hf_config: Dict[str, Any],
              dtype, directory: Optional[str], tokenizer_dir: Optional[str], max_shard_bytes: int,
              writer: bool, chat_template: Optional[str] = None) -> None:
  """``save_hf``'s files (config.json holds `hf_config`, the tokenizer files `chat_template`
  when given), written into the (new, empty) `directory` when `writer`; every process
  gathers each parameter (a collective), only the writer writes."""
  from safetensors.numpy import save_file

  def position(path):   # embed, then layers in order, then final_norm and lm_head
    head = path[0]
    if head == "embed":
      return (0, 0, path)
    if head.startswith("layers_"):
      return (1, int(head[len("layers_"):]), path)
    return (1 if head == "layers" else 2, 0, path)

  order = sorted(flat, key=position)
  shards: List[Dict[str, np.ndarray]] = [{}]
  size = 0
  tmp_names = []

  def flush():
    nonlocal size
    if not shards[-1]:
      return
    tmp = os.path.join(directory, f".shard-{len(tmp_names):05d}.safetensors")
    save_file(shards[-1], tmp, metadata={"format": "pt"})
    tmp_names.append((tmp, sorted(shards[-1])))
    shards[-1] = {}
    size = 0

  for path in order:
    plan = _plan(path, config)
    host = _host_array(flat[path])
    if not writer:
      continue
    per_layer = [host[i] for i in range(host.shape[0])] if plan.stacked else [host]
    for name, x in zip(plan.names, per_layer):
      t = np.ascontiguousarray(_to_hf(plan.kind, x).astype(dtype))
      if size and size + t.nbytes > max_shard_bytes:
        flush()
      shards[-1][name] = t
      size += t.nbytes
    del host, per_layer
  if not writer:
    return
  flush()

  n = len(tmp_names)
  weight_map = {}
  total = 0
  for i, (tmp, names) in enumerate(tmp_names):
    final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(tmp, os.path.join(directory, final))
    for name in names:
      weight_map[name] = final
  for path in flat:
    total += math.prod(flat[path].shape) * dtype.itemsize
  if n > 1:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer_dir is not None:
    copied = [name for name in _TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, name))]
    for name in copied:
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
    if not copied:
      logging.warning("export: %s holds no tokenizer file this export copies (%s); the "
                      "folder is written without a tokenizer", tokenizer_dir,
                      ", ".join(_TOKENIZER_FILES[:4]))
  if chat_template is not None:
    _write_chat_template(directory, chat_template)


def _special_token_ids(tokenizer_dir: Optional[str], chat_format: Optional[str] = None
                       ) -> Dict[str, Any]:
  """{bos,eos,pad}_token_id of the tokenizer in `tokenizer_dir` (those it has) for an
  export's config.json: without them transformers assumes Llama's 1 and 2, and generate()
  would stop on the wrong token. With `chat_format`, eos_token_id is the list of
  ``tokenizer.stop_token_ids`` when that format's end of turn is another token (e.g.
  <|eot_id|> beside a base tokenizer's <|end_of_text|>), as the sampler stops. {} when the
  directory holds no tokenizer model file."""
  from cai_jax import tokenizer as tokenizer_lib
  names = ("byte_tokenizer.json", "tokenizer.json", "tokenizer.model")
  if tokenizer_dir is None or not any(os.path.exists(os.path.join(tokenizer_dir, n))
                                      for n in names):
    return {}
  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  out: Dict[str, Any] = {k: int(v) for k, v in ids.items() if v is not None}
  if chat_format:
    stops = [int(i) for i in tokenizer_lib.stop_token_ids(tok, chat_format)]
    if len(stops) > 1 or (stops and tok.eos_id is None):
      out["eos_token_id"] = stops if len(stops) > 1 else stops[0]
  return out


def _checkpoint_chat_template(tokenizer_dir: str) -> Optional[str]:
  """The Jinja chat template transformers reads from the tokenizer files in `tokenizer_dir`:
  chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or the
  'default' entry of a list of named templates); None when there is none."""
  jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(tokenizer_dir, "tokenizer_config.json")
  doc = _read_json(config) if os.path.isfile(config) else None
  value = doc.get("chat_template") if isinstance(doc, dict) else None
  if isinstance(value, list):
    value = next((t.get("template") for t in value
                  if isinstance(t, dict) and t.get("name") == "default"), None)
  return value if isinstance(value, str) and value else None


def export_chat_template(tokenizer_dir: Optional[str], chat_format: Optional[str],
                         source: str = "chat_format.txt") -> Tuple[Optional[str], str]:
  """(template, description): the Jinja chat template an export of a model trained in
  `chat_format` ('chatml', 'llama3' or 'raw'; None: never trained, an import) carries, and
  one line saying which it is.

  template is None (``save_hf`` keeps the checkpoint's own template from `tokenizer_dir`)
  when there is no chat_format, no tokenizer transformers loads (tokenizer.json or
  tokenizer.model), or the checkpoint's template is already of that format (it holds
  every turn marker of ``tokenizer.CHAT_FORMAT_MARKERS[chat_format]``; extras such as a
  default system message are kept). Otherwise it is ``CHAT_TEMPLATES[chat_format]``, whose
  ``apply_chat_template`` text is ``render_chat_text``'s, behind ``{{ bos_token }}`` when
  the tokenizer expects a BOS the rendered text does not start with (as ``encode_chat``
  puts it there). ValueError naming `source` for an unknown chat_format."""
  from cai_jax import tokenizer as tokenizer_lib
  if not chat_format:
    return None, "chat template: the checkpoint's (the model records no trained chat format)"
  tokenizer_lib.check_chat_format(chat_format, f"{source}: chat format")
  if tokenizer_dir is None or not any(os.path.exists(os.path.join(tokenizer_dir, n))
                                      for n in ("tokenizer.json", "tokenizer.model")):
    return None, "chat template: none (no Hugging Face tokenizer to carry one)"
  own = _checkpoint_chat_template(tokenizer_dir)
  markers = tokenizer_lib.CHAT_FORMAT_MARKERS[chat_format]
  if own is not None and markers and all(m in own for m in markers):
    return None, f"chat template: the checkpoint's, which is {chat_format!r}, the format the model was trained in"
  template = CHAT_TEMPLATES[chat_format]
  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None
  sample = tokenizer_lib.render_chat_text([{"role": "user", "content": "x"}], chat_format)
  if getattr(tok, "add_bos_token", False) and bos and not sample.startswith(bos):
    template = "{{- bos_token -}}" + template
  replaced = "replacing the checkpoint's" if own is not None else "the checkpoint has none"
  return template, f"chat template: {chat_format!r}, the format the model was trained in ({replaced})"


def _write_chat_template(directory: str, template: str) -> None:
  """Makes `template` the chat template of the tokenizer files in `directory`:
  tokenizer_config.json's "chat_template", and chat_template.jinja / chat_template.json
  when the export holds them (transformers reads chat_template.jinja first)."""
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = _read_json(config_path) if os.path.isfile(config_path) else {}
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: not a JSON object")
  config["chat_template"] = template
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  if os.path.exists(os.path.join(directory, "chat_template.jinja")):
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(template)
  if os.path.exists(os.path.join(directory, "chat_template.json")):
    with open(os.path.join(directory, "chat_template.json"), "w", encoding="utf-8") as f:
      json.dump({"chat_template": template}, f, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- GGUF


ROPE_FREQS = "rope_freqs.weight"


def llama3_rope_from_factors(factors: np.ndarray, head_dim: int, rope_theta: float,
                             where: str) -> Dict[str, Any]:
  """ModelConfig RoPE fields of a llama.cpp ``rope_freqs.weight`` tensor [head_dim / 2]:
  the divisor llama.cpp applies to each rotary frequency, which its converter computes
  from an HF ``rope_scaling`` of type 'llama3' (1 for short wavelengths, `factor` for
  long ones, a smooth blend between). Meta's low / high frequency factors (1, 4) are
  assumed, the factor is the largest divisor and the original context length is solved
  from a blended entry (when there is none, any length between the unscaled and the
  scaled wavelengths gives the same frequencies: 8192 if it can); the result must
  reproduce every divisor (our frequencies, ``layers.rope_inv_freq``, times the divisors
  give the unscaled ones), else ValueError naming `where`. All divisors 1: no scaling
  ({})."""
  from cai_jax import layers
  f = np.asarray(factors, np.float64).reshape(-1)
  if f.shape != (head_dim // 2,) or not np.all(np.isfinite(f)) or np.any(f <= 0):
    raise ValueError(f"{where}: expected {head_dim // 2} positive finite divisors, got "
                     f"shape {f.shape}")
  if np.allclose(f, 1.0):
    return {}
  factor, low, high = float(f.max()), 1.0, 4.0
  wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
  blended = np.nonzero((f > 1 + 1e-4) & (f < factor * (1 - 1e-4)))[0]
  if blended.size:
    i = int(blended[0])
    smooth = (1 / f[i] - 1 / factor) / (1 - 1 / factor)
    original = int(round(wavelen[i] * (smooth * (high - low) + low)))
  else:   # every original length between these gives the same frequencies: 8192 if it can
    ones, scaled = wavelen[f <= 1 + 1e-4], wavelen[f >= factor * (1 - 1e-4)]
    lo = high * float(ones.max()) if ones.size else 0.0
    hi = low * float(scaled.min()) if scaled.size else math.inf
    original = 8192 if lo < 8192 < hi else int(math.floor(lo)) + 1
  fields = dict(rope_scaling_factor=_f32(factor), rope_low_freq_factor=low,
                rope_high_freq_factor=high, rope_original_max_len=original)
  base = ModelConfig(head_dim=head_dim, d_model=head_dim, n_heads=1, n_kv_heads=1,
                     rope_theta=rope_theta)
  plain = np.asarray(layers.rope_inv_freq(base), np.float64)
  ours = np.asarray(layers.rope_inv_freq(dataclasses.replace(base, **fields)), np.float64)
  if not np.allclose(plain / ours, f, rtol=1e-4, atol=0):
    raise ValueError(f"{where}: the divisors are not Llama 3 RoPE scaling (low / high frequency "
                     f"factors 1 / 4) with factor {factor:g} and original context {original}; "
                     "this scaling is not supported")
  return fields


def config_from_gguf(file, **overrides) -> ModelConfig:
  """ModelConfig from a GGUF file's ``llama.*`` metadata (see the module docstring).

  file: a ``gguf_file.GGUFFile`` (``gguf_file.read_gguf(path)``).

  vocab_size is the length of tokenizer.ggml.tokens (else llama.vocab_size); embeddings
  are tied when the file has no output.weight; qkv_bias is set when the file has q, k or v
  biases (blk.N.attn_{q,k,v}.bias, which llama.cpp's llama architecture applies). Raises
  ValueError for another architecture, a mixture of experts (``expert_count`` > 0, e.g.
  Mixtral), partial rotary, RoPE scaling other than Llama 3's
  (a scaling type, or ``rope.scaling.factor`` / ``rope.scale_linear`` other than 0 or 1,
  which llama.cpp applies as linear scaling even without a type), or a split file.
  Llama 3.1+ files carry their RoPE scaling as a ``rope_freqs.weight`` tensor of per-
  frequency divisors (``llama3_rope_from_factors``).
  """
  meta = file.metadata
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{file.path}: unsupported GGUF architecture {arch!r}; supported: 'llama'")
  if (meta.get("split.count", 1) or 1) > 1:
    raise ValueError(f"{file.path}: split GGUF files (split.count > 1) are not supported; merge "
                     "them first")

  def get(key, default=None, required=False):
    value = meta.get(f"{arch}.{key}", default)
    if required and value is None:
      raise ValueError(f"{file.path}: GGUF metadata is missing {arch}.{key}")
    return value

  d_model = int(get("embedding_length", required=True))
  n_heads = int(get("attention.head_count", required=True))
  n_kv = int(get("attention.head_count_kv", n_heads))
  head_dim = int(get("attention.key_length", d_model // n_heads))
  rot = get("rope.dimension_count")
  if rot is not None and int(rot) != head_dim:
    raise ValueError(f"{file.path}: GGUF rope.dimension_count={rot} != head_dim={head_dim}: partial "
                     "rotary is not supported")
  experts = get("expert_count")
  if experts:
    raise ValueError(f"{file.path}: GGUF metadata {arch}.expert_count = {experts} (a mixture of "
                     "experts, e.g. Mixtral) is not supported; only dense llama models are")
  scaling = get("rope.scaling.type")
  tensor_names = set(file.tensors)
  if scaling not in (None, "none"):
    raise ValueError(f"{file.path}: GGUF RoPE scaling {scaling!r} is not supported")
  for key in ("rope.scaling.factor", "rope.scale_linear"):
    factor = get(key)
    if factor is not None and factor not in (0, 1):
      raise ValueError(f"{file.path}: GGUF metadata {arch}.{key} = {factor} (linear RoPE scaling) "
                       "is not supported")
  qkv_bias = any(n.startswith("blk.") and n.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias"))
                 for n in tensor_names)
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = len(tokens) if tokens is not None else get("vocab_size")
  if vocab is None:
    raise ValueError(f"{file.path}: GGUF has neither tokenizer.ggml.tokens nor llama.vocab_size")
  rope_theta = _f32(get("rope.freq_base", 10000.0))
  rope_kwargs = {}
  if ROPE_FREQS in tensor_names:
    from gguf.quants import dequantize
    t = file.tensors[ROPE_FREQS]
    rope_kwargs = llama3_rope_from_factors(dequantize(np.asarray(t.data), t.tensor_type),
                                           head_dim, rope_theta, f"{file.path}: {ROPE_FREQS}")
  kwargs = dict(
      vocab_size=int(vocab), d_model=d_model, n_layers=int(get("block_count", required=True)),
      n_heads=n_heads, n_kv_heads=n_kv, d_ff=int(get("feed_forward_length", required=True)),
      head_dim=None if head_dim * n_heads == d_model else head_dim,
      max_seq_len=int(get("context_length", 2048)),
      rope_theta=rope_theta, norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensor_names, qkv_bias=qkv_bias, **rope_kwargs)
  kwargs.update(overrides)
  return _model_config(kwargs, file.path)


def load_gguf(path: str, mesh: Optional[Mesh] = None, rules=None, config: Optional[ModelConfig] = None,
              dtype=None) -> Tuple[ModelConfig, Params]:
  """Loads a llama-architecture GGUF file into our params (dequantized to float32, then cast).

  Args:
    path: the .gguf file.
    mesh, rules: as in ``load_hf``.
    config: optional ModelConfig to load into (default ``config_from_gguf``); shapes are
      checked tensor by tensor.
    dtype: storage dtype of the params (sets param_dtype); default config.param_dtype.
  Returns:
    (config, params). q/k rows (and q/k bias entries) are un-permuted back to HF's
    rotate-half order.
  Raises:
    ValueError naming the file and tensor for a tensor the model cannot apply
    (attn_output.bias, ffn_*.bias, ...) or a missing one, as ``load_hf``.
  """
  from cai_jax.gguf_file import read_gguf
  file = read_gguf(path)
  config = _given_or_file_config(config, config_from_gguf(file), path)
  if dtype is not None:
    config = dataclasses.replace(config, param_dtype=_dtype_name(dtype))
  source = _GGUFSource(file, config.dim_per_head)
  return config, _load_params(config, source, mesh, rules)

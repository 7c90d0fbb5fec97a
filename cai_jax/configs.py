"""Frozen configuration dataclasses.

Gin binds these at the entry points (``cai_jax.main``); library code takes
them as plain arguments. Every field has a unit or shape in its comment.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import jax.numpy as jnp
import numpy as np

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")
ATTENTION_IMPLS = (None, "xla", "cudnn")


SEED_BOUND = 2**32   # seeds are unsigned 32-bit integers: 0 <= seed < SEED_BOUND


def check_int(field: str, value, low: Optional[int] = None) -> None:
  """ValueError naming `field` (e.g. 'TrainConfig.batch_size', 'feedback.shard_size') unless
  value is an integer, a Python or numpy one but not a bool (>= low when given)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
      or (low is not None and value < low)):
    raise ValueError(f"{field} must be an integer{'' if low is None else f' >= {low}'}, "
                     f"got {value!r}")


def check_seed(field: str, value) -> None:
  """ValueError naming `field` unless value is an integer in [0, 2**32) (``SEED_BOUND``)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
      or not 0 <= value < SEED_BOUND):
    raise ValueError(f"{field} must be an integer in [0, 2**32), got {value!r}")


def check_number(field: str, value, low: float, strict: bool = False,
                 high: Optional[float] = None) -> None:
  """ValueError naming `field` unless value is a finite number (not a bool) >= low (> low when
  strict), and <= high when given."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value < low or (strict and value == low)
      or (high is not None and value > high)):
    if high is None:
      need = f"{'>' if strict else '>='} {low:g}"
    else:
      need = f"in {'(' if strict else '['}{low:g}, {high:g}]"
    raise ValueError(f"{field} must be a finite number {need}, got {value!r}")


def check_bool(field: str, value) -> None:
  """ValueError naming `field` unless value is True or False (a string 'False' is not)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{field} must be True or False, got {value!r}")


def dtype_from_name(name: str):
  """Maps 'float32' / 'bfloat16' / 'float16' to a jnp dtype (clear error otherwise)."""
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder.

  Attributes:
    vocab_size: number of token ids (rows of the embedding table).
    d_model: width of the residual stream.
    n_layers: number of decoder blocks.
    n_heads: query heads.
    n_kv_heads: key/value heads (grouped-query attention); divides n_heads.
    d_ff: hidden width of the SwiGLU MLP.
    head_dim: per-head width; None means d_model // n_heads.
    max_seq_len: longest context (tokens) the model is used with.
    rope_theta: RoPE base frequency.
    rope_scaling_factor: Llama-3 frequency scaling factor; 0 disables scaling.
    rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len:
      the other Llama-3 scaling constants (used only when factor > 0).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: LM head shares the embedding table.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    param_dtype: storage dtype of parameters.
    dtype: compute dtype of activations and matmuls.
    scan_layers: run blocks under nn.scan (one compiled block) instead of unrolled.
    remat_policy: one of REMAT_POLICIES; what the backward pass keeps.
    attention_impl: 'xla' or 'cudnn': jax.nn.dot_product_attention implementation of the
      no-cache path (training, scoring) and of a prefill into an empty KV cache ('cudnn':
      cuDNN's fused padding-causal kernel for right-padded rows, XLA for other padding);
      cached decoding uses its own einsum attention. None picks per backend: on a GPU with
      a 16-bit dtype, 'cudnn' for right-padded rows where the kernel takes the head width
      (``layers.fused_causal_impl``; 2.6x the train step's XLA attention on an H200, see
      bench/RESULTS.md), XLA otherwise; on the CPU backend, rows longer than
      ``layers.CAUSAL_CHUNK`` use ``layers.chunked_causal_attention`` (blocks of queries
      that skip the masked upper triangle: about 2x faster attention on a CPU).
    unroll_decode: how the sampler's decode loop runs the blocks of a scanned model
      (scan_layers True). True: unrolled, over per-layer weight arrays sliced once per
      sampled batch before the loop (one more copy of the layer weights in memory while a
      batch samples); False: the scan, whose every step slices each layer's weights out of
      the stacked arrays. None picks per backend: True on a GPU, where XLA copies the
      slices that feed its GEMM kernels in every decode step (each MLP matrix read three
      times instead of once) and launches about 12 more kernels per layer (see
      bench/RESULTS.md), unless the copy would take more than half of the device's free
      memory (``sampler.resolve_unroll_decode``); False elsewhere. Prefill, scoring and
      training always follow scan_layers.
    decode_attention: the attention of a cached call with one new token per row (the
      sampler's decode steps and a prefill's last token). 'xla' (and None):
      ``layers.cached_attention``, einsums XLA compiles into about nine kernels per layer
      on a GPU, after copying each layer's cache slice out of the stacked cache. 'pallas':
      ``cai_jax.decode_attention``, one Triton kernel per layer that reads the stacked
      cache in place (with the blocks unrolled) and skips the slots after the step's;
      a head width that is a power of two >= 16; on a backend other than a CUDA GPU it
      runs in Pallas' interpret mode (slow: for tests). Opt-in until it is timed on a GPU
      (bench/RESULTS.md).
  """

  vocab_size: int = 320
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 128
  head_dim: Optional[int] = None
  max_seq_len: int = 512
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: Optional[str] = None
  unroll_decode: Optional[bool] = None
  decode_attention: Optional[str] = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                 "rope_original_max_len"):
      check_int(f"ModelConfig.{name}", getattr(self, name), 1)
    if self.head_dim is not None:
      check_int("ModelConfig.head_dim", self.head_dim, 1)
    check_number("ModelConfig.rope_theta", self.rope_theta, 0.0, strict=True)
    for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "norm_eps"):
      check_number(f"ModelConfig.{name}", getattr(self, name), 0.0)
    for name in ("tie_embeddings", "qkv_bias", "scan_layers"):
      check_bool(f"ModelConfig.{name}", getattr(self, name))
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
          "unless head_dim is set")
    width = self.head_dim if self.head_dim is not None else self.d_model // self.n_heads
    if width % 2:
      raise ValueError(f"ModelConfig: the head width {width} (head_dim, or d_model / n_heads) "
                       "must be even: RoPE rotates pairs of channels")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    for name in ("param_dtype", "dtype"):
      try:
        dtype_from_name(getattr(self, name))
      except (ValueError, TypeError) as e:
        raise ValueError(f"ModelConfig.{name}: {e}") from None
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}; expected None, "
                       "'xla' or 'cudnn'")
    if self.unroll_decode not in (None, True, False):
      raise ValueError(f"ModelConfig.unroll_decode={self.unroll_decode!r}; expected None, "
                       "True or False")
    if self.decode_attention not in (None, "xla", "pallas"):
      raise ValueError(f"ModelConfig.decode_attention={self.decode_attention!r}; expected "
                       "None, 'xla' or 'pallas'")
    if self.decode_attention == "pallas":
      from cai_jax import decode_attention
      try:
        decode_attention.check_supported(self.dim_per_head)
      except ValueError as e:
        raise ValueError(f"ModelConfig.decode_attention: {e}") from None

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  def param_count(self) -> int:
    """Exact parameter count from the shapes (the same number eval_shape gives)."""
    d, hd, h, kv = self.d_model, self.dim_per_head, self.n_heads, self.n_kv_heads
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    per_layer = attn + 3 * d * self.d_ff + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * per_layer + embed + d


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh. A dim of -1 takes the devices left over by the others.

  Attributes:
    data: pure data-parallel replicas.
    fsdp: data-parallel shards that also shard parameters and optimizer state.
    tensor: tensor (model) parallelism over heads / MLP / vocab.
    rules: logical-axis rule preset: 'dp', 'fsdp' or 'fsdp_tp' (see sharding.RULE_PRESETS).
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: str = "fsdp"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup then a constant or cosine schedule.

  Attributes:
    learning_rate: peak learning rate (after warmup).
    warmup_steps: linear warmup from 0 to learning_rate, in optimizer steps.
    schedule: 'constant' or 'cosine' (cosine decays to final_lr_fraction × peak by total_steps).
    total_steps: horizon of the cosine schedule (ignored for constant).
    final_lr_fraction: end of the cosine schedule as a fraction of the peak.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled weight decay, applied to weight matrices and embeddings only
      (never to norm scales or biases, ``steps.make_optimizer``).
    grad_clip_norm: global-norm clipping threshold; 0 disables.
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "constant"
  total_steps: int = 1000
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0

  def __post_init__(self):
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; expected 'constant' or 'cosine'")
    check_number("OptimizerConfig.learning_rate", self.learning_rate, 0.0)
    check_int("OptimizerConfig.warmup_steps", self.warmup_steps, 0)
    check_int("OptimizerConfig.total_steps", self.total_steps)
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"OptimizerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    for name, low in (("eps", 0.0), ("weight_decay", 0.0), ("grad_clip_norm", 0.0),
                      ("final_lr_fraction", 0.0)):
      value = getattr(self, name)
      if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
          or not (value >= low and math.isfinite(value))):
        raise ValueError(f"OptimizerConfig.{name} must be a finite number >= {low:g}, got "
                         f"{value}" + (" (0 disables clipping)" if name == "grad_clip_norm" else ""))
    if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
      raise ValueError(f"OptimizerConfig.total_steps={self.total_steps} must be greater than "
                       f"warmup_steps={self.warmup_steps} for the cosine schedule (it decays "
                       "from the end of warmup to total_steps)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A supervised training run.

  Attributes:
    num_steps: optimizer steps to reach (a resumed run continues up to it).
    batch_size: sequences per optimizer step (global, over all devices).
    seq_len: tokens per sequence (examples are right-padded / truncated to it).
    num_microbatches: gradient-accumulation splits of each batch (divides batch_size).
    save_every: checkpoint every this many steps (and always at the end).
    keep_checkpoints: newest checkpoints kept on disk.
    async_checkpoint: write checkpoints in the background.
    seed: data-order and initialisation seed.
    progress: show a console progress bar.
  """

  num_steps: int = 100
  batch_size: int = 8
  seq_len: int = 256
  num_microbatches: int = 1
  save_every: int = 50
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "seq_len", "num_microbatches", "save_every", "keep_checkpoints"):
      check_int(f"TrainConfig.{name}", getattr(self, name), 1)
    check_seed("TrainConfig.seed", self.seed)
    for name in ("async_checkpoint", "progress"):
      check_bool(f"TrainConfig.{name}", getattr(self, name))
    if self.batch_size % self.num_microbatches:
      raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                       f"num_microbatches={self.num_microbatches}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyper-parameters (paper defaults: β = 0.001, clip 0.2, γ = 1, no entropy bonus,
  responses capped at 128 tokens, temperature 1).

  Attributes:
    kl_coef: β, the per-token KL penalty coefficient (initial value if adaptive).
    kl_kind: KL estimator, 'k1' | 'k2' | 'k3' (see ``losses.kl_per_token``).
    adaptive_kl: update β after each iteration with ``losses.adaptive_beta``.
    target_kl: target KL per sequence (nats) of the adaptive controller.
    kl_horizon: horizon of the adaptive controller, in sampled sequences.
    gamma, lam: GAE discount and λ.
    clip: policy ratio clip ε.
    value_clip: value clip, in PM-score units.
    epochs: K passes over each rollout batch.
    minibatches: minibatches per pass (must divide rollout_batch).
    whiten_advantages: normalise advantages over the rollout batch.
    value_loss_coef: multiplies the value loss.
    max_new_tokens: N, response cap in tokens.
    temperature: sampling temperature T (1 samples the policy itself); the PPO ratio,
      the KL to the reference and the entropy use the same tempered distributions
      softmax(logits / T), as TRL and OpenRLHF do.
    rollout_batch: B, sequences sampled per iteration.
  """

  kl_coef: float = 0.001
  kl_kind: str = "k1"
  adaptive_kl: bool = False
  target_kl: float = 6.0
  kl_horizon: int = 10000
  gamma: float = 1.0
  lam: float = 0.95
  clip: float = 0.2
  value_clip: float = 0.2
  epochs: int = 4
  minibatches: int = 4
  whiten_advantages: bool = True
  value_loss_coef: float = 1.0
  max_new_tokens: int = 128
  temperature: float = 1.0
  rollout_batch: int = 16

  def __post_init__(self):
    from cai_jax.losses import KL_KINDS  # deferred: configs stays free of jax-heavy imports
    if self.kl_kind not in KL_KINDS:
      raise ValueError(f"PPOConfig.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
    for name in ("epochs", "minibatches", "max_new_tokens", "rollout_batch", "kl_horizon"):
      check_int(f"PPOConfig.{name}", getattr(self, name), 1)
    if self.rollout_batch % self.minibatches:
      raise ValueError(f"PPOConfig.minibatches={self.minibatches} must divide "
                       f"rollout_batch={self.rollout_batch}")
    check_number("PPOConfig.kl_coef", self.kl_coef, 0.0)
    check_number("PPOConfig.target_kl", self.target_kl, 0.0, strict=True)
    check_number("PPOConfig.temperature", self.temperature, 0.0, strict=True)
    check_number("PPOConfig.value_loss_coef", self.value_loss_coef, 0.0)
    for name in ("clip", "value_clip"):
      value = getattr(self, name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"PPOConfig.{name} must be > 0, got {value!r}")
    for name in ("gamma", "lam"):
      value = getattr(self, name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {value!r}")
    for name in ("adaptive_kl", "whiten_advantages"):
      check_bool(f"PPOConfig.{name}", getattr(self, name))
    # losses.adaptive_beta multiplies β by 1 + e · rollout_batch / kl_horizon with e down
    # to -0.2: β would turn negative (a KL reward) unless rollout_batch < 5 · kl_horizon.
    if self.adaptive_kl and self.rollout_batch >= 5 * self.kl_horizon:
      raise ValueError(
          f"PPOConfig.kl_horizon={self.kl_horizon} is too short for rollout_batch="
          f"{self.rollout_batch}: the adaptive controller would make beta negative; use "
          f"kl_horizon > {self.rollout_batch // 5}")

"""Batched autoregressive sampling and continuation scoring on token ids.

``generate`` left-pads prompts into fixed-shape batches and runs one jitted
program per batch shape: a prefill of the KV cache followed by a
``lax.while_loop`` that decodes one token per step for every row until all rows
are done or ``max_new_tokens`` is reached. On a GPU the loop runs a scanned model's
layers unrolled over per-layer weight slices made once per batch (``decode_model``,
``ModelConfig.unroll_decode``); ``ModelConfig.decode_attention`` 'pallas' runs each
step's attention as one kernel per layer (``cai_jax.decode_attention``).
``score_continuations`` computes the log-probabilities of given continuations
(AI-feedback labels, PPO reference log-probs, multiple-choice evaluation).

Shapes: B = rows of a batch, P = prompt bucket (left-padded prompt columns),
Pp = prefix bucket, N = max_new_tokens, C = continuation bucket, S = cache slots,
V = vocab. Pads carry token id 0 and mask False; the decoder ignores them wherever
they sit (RoPE positions count real tokens only), so a row's result does not
depend on how much padding its batch needed.

Randomness: the key of prompt ``i`` (its index in the caller's list) at decode
step ``t`` is ``fold_in(fold_in(key(seed), i), t)``. Samples therefore depend on
the seed, the prompt index and the logits only, not on the batch size, the batch
a prompt lands in or the other prompts (up to float rounding of the logits).

Apart from ``text_generate_fn`` (a text-level wrapper for the stages), the tokenizer is
not used here: callers encode prompts, pass stop strings as
the token sequences they tokenize to (``tokenizer.stop_token_sequences``), and trim
decoded text at the stop string
(a stop string can tokenize differently inside a generation, so the token-level
stop is an early exit, not the final word).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cai_jax import axes, distributed, models, sharding
from cai_jax.configs import ModelConfig, check_int, check_seed
from cai_jax.transformer import Cache, init_cache, unstack_scanned_params
from cai_jax.tokenizer import common_prefix_length, keep_last, trim_at_stop

Array = jax.Array
Params = Any

FINISH_REASONS = ("", "eos", "stop", "length")   # index = finish code on device
# The smallest temperature above 0 (greedy): logits / temperature overflows float32 near
# 1e-37, and anything below this samples the argmax anyway.
MIN_TEMPERATURE = 1e-6
_EOS, _STOP, _LENGTH = 1, 2, 3
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick tokens and when to stop.

  Attributes:
    temperature: softmax temperature; 0 means greedy (argmax, filters ignored);
      otherwise at least ``MIN_TEMPERATURE`` (1e-6) and finite.
    top_k: keep only the k most likely tokens (and every token whose logit ties the
      k-th largest, as transformers' TopKLogitsWarper); 0 disables.
    top_p: keep the smallest set of most likely tokens whose probability (after
      temperature and top-k) reaches top_p; 1.0 disables. The most likely token is
      always kept.
    max_new_tokens: most tokens generated per prompt (N).
    eos_ids: token ids that end a generation.
    stop_sequences: token-id tuples; a row stops when the tail of its generated
      tokens equals one of them (matching never reaches into the prompt). Callers
      pass the tokenizations of their stop strings and trim the decoded text at the
      string afterwards.
    seed: base of the per-prompt random keys (0 <= seed < 2**32).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 128
  eos_ids: Tuple[int, ...] = ()
  stop_sequences: Tuple[Tuple[int, ...], ...] = ()
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(t) for t in self.eos_ids))
    object.__setattr__(self, "stop_sequences",
                       tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
    if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
      raise ValueError(f"SamplingParams.temperature must be 0 (greedy) or in "
                       f"[{MIN_TEMPERATURE}, inf), got {self.temperature}")
    check_int("SamplingParams.top_k", self.top_k, 0)
    check_int("SamplingParams.max_new_tokens", self.max_new_tokens, 1)
    check_seed("SamplingParams.seed", self.seed)
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if any(len(s) == 0 for s in self.stop_sequences):
      raise ValueError("SamplingParams.stop_sequences must not contain an empty sequence")


def check_sampling(owner: str, **settings: Any) -> SamplingParams:
  """``SamplingParams(**settings)`` with its ValueError naming `owner`'s setting
  ('feedback.top_p must be in (0, 1], ...') instead of the SamplingParams field: what a
  stage calls on its sampling settings before it reads a model or writes a file."""
  try:
    return SamplingParams(**settings)
  except (ValueError, TypeError) as e:
    raise ValueError(str(e).replace("SamplingParams.", f"{owner}.", 1)) from None


@dataclasses.dataclass(frozen=True)
class _DecodeSpec:
  """The static (compile-time) part of SamplingParams: everything but the seed."""

  temperature: float
  top_k: int
  top_p: float
  max_new_tokens: int
  eos_ids: Tuple[int, ...]
  stop_sequences: Tuple[Tuple[int, ...], ...]

  @classmethod
  def of(cls, sp: SamplingParams) -> "_DecodeSpec":
    return cls(float(sp.temperature), int(sp.top_k), float(sp.top_p), int(sp.max_new_tokens),
               sp.eos_ids, sp.stop_sequences)


@dataclasses.dataclass
class GenerateResult:
  """Per-prompt outputs of ``generate``, in the order of the input prompts.

  Attributes:
    tokens: list of [n_i] int32 generated ids, without the prompt. A generation
      that ended on EOS or a stop sequence INCLUDES the EOS token / the whole stop
      sequence at its end (``num_stop_tokens`` says how many trailing tokens that is).
    logprobs: list of [n_i] float32: log p(token) under the model's raw
      distribution (temperature 1, no top-k / top-p); what ``score_continuations``
      recomputes.
    sampling_logprobs: list of [n_i] float32: log-prob of the token under the
      distribution it was actually drawn from (temperature, top-k, top-p applied);
      0 everywhere for greedy decoding (a point mass); what PPO's tempered log-probs
      recompute.
    lengths: [num_prompts] int32, n_i.
    finish_reasons: 'eos' | 'stop' | 'length' per prompt ('eos' wins when the last
      token is both an EOS id and the end of a stop sequence).
    num_stop_tokens: [num_prompts] int32: 1 for 'eos', the length of the matched stop
      sequence for 'stop' (the longest one if several match), 0 for 'length'.
    prompt_lengths: [num_prompts] int32 prompt tokens actually used (after any
      truncation; without the shared prefix).
    stats: counters: prompts, batches, truncated_prompts, truncated_tokens,
      generated_tokens, finish_<reason> counts.
  """

  tokens: List[np.ndarray]
  logprobs: List[np.ndarray]
  sampling_logprobs: List[np.ndarray]
  lengths: np.ndarray
  finish_reasons: List[str]
  num_stop_tokens: np.ndarray
  prompt_lengths: np.ndarray
  stats: Dict[str, int]

  def __len__(self) -> int:
    return len(self.tokens)

  def content_tokens(self, i: int) -> np.ndarray:
    """Generated ids of prompt i without its trailing EOS / stop tokens."""
    return self.tokens[i][:len(self.tokens[i]) - int(self.num_stop_tokens[i])]

  def text(self, i: int, decode: Callable[[List[int]], str], stops: Sequence[str]) -> str:
    """The completion of prompt i: its ids without a final EOS, decoded, cut at the first
    stop string (``tokenizer.trim_at_stop``); the text before a stop string even when a
    token holds its first characters and text before them."""
    n = len(self.tokens[i]) - (1 if self.finish_reasons[i] == "eos" else 0)
    return trim_at_stop(decode([int(t) for t in self.tokens[i][:n]]), stops)


def cut_at_stop_strings(result: GenerateResult, decode: Callable[[List[int]], str],
                        stops: Sequence[str]) -> GenerateResult:
  """`result` with each generation whose decoded content holds a stop string cut after the
  token that completes the first one, as if the sampler had stopped there.

  A stop string can be sampled in a tokenization that none of the token-level stop
  sequences matches ("\n\nHuman:" as two "\n" tokens where the tokenizer writes one
  "\n\n"); the text is then cut at the string (``tokenizer.trim_at_stop``) but the tokens
  after it would still count (PPO would train on them, num_tokens and logprobs would
  hold them). A cut row's tokens, logprobs and sampling_logprobs end with the token that
  completes the stop string; its finish_reason is 'stop' and num_stop_tokens counts its
  tokens from the first one whose text reaches into the stop string. Other rows are
  unchanged; stats are recounted (``string_stops``: the rows cut here).

  Args:
    decode: token ids -> text (the tokenizer's decode; a prefix of the ids decodes to a
      prefix of the text, up to a character cut in its middle).
    stops: the stop strings ('' ignored).
  """
  stops = [s for s in stops if s]

  def first_stop(ids: List[int]) -> int:
    text = decode(ids)
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)

  out = dataclasses.replace(
      result, tokens=list(result.tokens), logprobs=list(result.logprobs),
      sampling_logprobs=list(result.sampling_logprobs), lengths=result.lengths.copy(),
      finish_reasons=list(result.finish_reasons),
      num_stop_tokens=result.num_stop_tokens.copy(), stats=dict(result.stats))
  cut_rows = 0
  for r, toks in enumerate(result.tokens):
    ids = [int(t) for t in toks]
    content = len(ids) - int(result.num_stop_tokens[r])
    cut = first_stop(ids[:content]) if stops else -1
    if cut < 0:
      continue
    lo, hi = 1, content           # the fewest tokens whose text holds a stop string
    while lo < hi:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if first_stop(ids[:mid]) >= 0 else (mid + 1, hi)
    k = lo
    lo, hi = 0, k - 1             # the most tokens whose text ends before it
    while lo < hi:
      mid = (lo + hi + 1) // 2
      lo, hi = (mid, hi) if len(decode(ids[:mid])) <= cut else (lo, mid - 1)
    out.tokens[r], out.logprobs[r] = result.tokens[r][:k], result.logprobs[r][:k]
    out.sampling_logprobs[r] = result.sampling_logprobs[r][:k]
    out.lengths[r], out.finish_reasons[r], out.num_stop_tokens[r] = k, "stop", k - lo
    cut_rows += 1
  out.stats["generated_tokens"] = int(out.lengths.sum())
  for reason in FINISH_REASONS[1:]:
    out.stats[f"finish_{reason}"] = sum(x == reason for x in out.finish_reasons)
  out.stats["string_stops"] = cut_rows
  return out


# ----------------------------------------------------------------------------------------
# Device-side building blocks (pure, jit-able).


def _apply(params: Params, config: ModelConfig, tokens: Array, mask: Array, cache: Cache,
           index) -> Tuple[Array, Cache]:
  logits, cache = models.module(config).apply({"params": params}, tokens, mask, cache, index)
  return logits, _constrain_cache(cache)


def _constrain_cache(cache: Cache) -> Cache:
  """Batch over (data, fsdp), kv heads over tensor (no-op without logical rules)."""
  kv_names = (None, axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.KV)
  return {"k": nn.with_logical_constraint(cache["k"], kv_names),
          "v": nn.with_logical_constraint(cache["v"], kv_names),
          "mask": nn.with_logical_constraint(cache["mask"], (axes.BATCH, axes.LENGTH))}


def prefill(params: Params, config: ModelConfig, tokens: Array, mask: Array, cache: Cache,
            index=0) -> Tuple[Array, Cache]:
  """Writes tokens [B, T] (mask [B, T]) into cache slots [index, index + T).

  Returns (logits [B, V] float32 at the last column, updated cache). Only the last
  column's logits are computed: the first T - 1 columns go through a call whose LM
  head output is unused (and removed by XLA), so memory never holds [B, T, V].
  """
  length = tokens.shape[1]
  if length > 1:
    _, cache = _apply(params, config, tokens[:, :-1], mask[:, :-1], cache, index)
  logits, cache = _apply(params, config, tokens[:, -1:], mask[:, -1:], cache, index + length - 1)
  return logits[:, 0], cache


def decode_step(params: Params, config: ModelConfig, cache: Cache, tokens: Array,
                index) -> Tuple[Array, Cache]:
  """Feeds one real token per row, tokens [B], at cache slot `index` (scalar).

  Returns (next-token logits [B, V] float32, updated cache).
  """
  mask = jnp.ones((tokens.shape[0], 1), bool)
  logits, cache = _apply(params, config, tokens[:, None].astype(jnp.int32), mask, cache, index)
  return logits[:, 0], cache


def sample_logits(logits: Array, keys: Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Tuple[Array, Array, Array]:
  """Draws one token per row.

  Args:
    logits: [B, V] float32 raw model logits.
    keys: [B] typed PRNG keys (one per row); unused when temperature == 0.
    temperature, top_k, top_p: static, as in SamplingParams.
  Returns:
    (tokens [B] int32, raw log-probs [B] under log_softmax(logits),
     sampling log-probs [B] under the filtered, tempered distribution; 0 if greedy).
  """
  logits = logits.astype(jnp.float32)
  raw = jax.nn.log_softmax(logits, axis=-1)
  vocab = logits.shape[-1]
  if temperature == 0:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_lp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    scaled = logits / temperature
    if top_p < 1.0:
      vals, idx = jax.lax.top_k(scaled, vocab)               # [B, V], descending
    else:
      vals, idx = scaled, None
    if 0 < top_k < vocab:
      # Every token tied with the k-th largest stays (transformers' TopKLogitsWarper).
      kth = (vals[:, top_k - 1:top_k] if idx is not None else
             jax.lax.top_k(scaled, top_k)[0][:, -1:])
      vals = jnp.where(vals < kth, -jnp.inf, vals)
    if top_p < 1.0:
      probs = jax.nn.softmax(vals, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      vals = jnp.where(mass_before < top_p, vals, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    filtered_lp = jax.nn.log_softmax(vals, axis=-1)
    sampled_lp = jnp.take_along_axis(filtered_lp, choice[:, None], axis=-1)[:, 0]
    tokens = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    tokens = tokens.astype(jnp.int32)
  raw_lp = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
  return tokens, raw_lp, sampled_lp


def _row_keys(seed: Array, row_ids: Array) -> Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


def _stop_hit(out_tokens: Array, step: Array, stop_sequences) -> Array:
  """[B] bool: the generated tokens [B, N] up to `step` end with a stop sequence."""
  batch, n = out_tokens.shape
  hit = jnp.zeros((batch,), bool)
  for seq in stop_sequences:
    length = len(seq)
    if length > n:
      continue
    start = jnp.maximum(step - length + 1, 0)
    window = jax.lax.dynamic_slice_in_dim(out_tokens, start, length, axis=1)
    match = jnp.all(window == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
    hit = hit | (match & (step + 1 >= length))
  return hit


def unrolled_decode(config: ModelConfig) -> bool:
  """Whether the decode loop of a model with `config` runs its blocks unrolled
  (``ModelConfig.unroll_decode``; None: on a GPU backend, see ``resolve_unroll_decode``).
  False when the model is not scanned (its blocks are unrolled already)."""
  if not config.scan_layers:
    return False
  if config.unroll_decode is None:
    return jax.default_backend() == "gpu"
  return config.unroll_decode


def _free_device_bytes(across_processes: bool = False) -> Optional[int]:
  """Free bytes of the first local device's allocator (None where jax does not say). With
  `across_processes` in a multi-process run: the least over the processes (a collective
  every process must call), so that all of them compile the same program."""
  stats = jax.local_devices()[0].memory_stats() or {}
  free = None
  if "bytes_limit" in stats and "bytes_in_use" in stats:
    free = int(stats["bytes_limit"]) - int(stats["bytes_in_use"])
  if across_processes and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    unknown = np.iinfo(np.int64).max
    every = multihost_utils.process_allgather(np.int64(unknown if free is None else free))
    least = int(np.min(every))
    free = None if least == unknown else least
  return free


def resolve_unroll_decode(config: ModelConfig, params: Params) -> ModelConfig:
  """`config` with ``unroll_decode`` decided for these (placed) params. An explicit value
  and an unscanned model stay as they are. None becomes True on a GPU where the unrolled
  decode's copy of the layer weights (their bytes on one device) takes at most half of that
  device's free memory (the least over the processes when the params span several), and
  False otherwise (another backend, or too little room)."""
  if config.unroll_decode is not None or not config.scan_layers:
    return config
  unroll = jax.default_backend() == "gpu"
  if unroll:
    leaves = jax.tree_util.tree_leaves(params["layers"])
    copy = sum(x.addressable_shards[0].data.nbytes if isinstance(x, jax.Array) else x.nbytes
               for x in leaves)
    # Params on a mesh over several processes: every process samples together, and they
    # must agree.
    shared = any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves)
    free = _free_device_bytes(across_processes=shared)
    unroll = free is None or copy <= free // 2
  return dataclasses.replace(config, unroll_decode=unroll)


def _reverse_dims(x: Array) -> Array:
  return jnp.transpose(x, tuple(reversed(range(x.ndim))))


def decode_model(params: Params, config: ModelConfig, batch: int
                 ) -> Tuple[Params, ModelConfig, Callable[[Params], Params]]:
  """What the decode loop of `batch` rows runs: (stored, config, view), the model's params
  being ``view(stored)``, traced inside the loop body.

  Without ``unrolled_decode(config)``: the params themselves and the identity. With it:
  per-layer slices of the stacked layer weights, made where this is traced (outside the
  loop: once per sampled batch), and the unrolled config. At batch 1 each block's
  projection kernel is also stored with its dims reversed (a column-major copy, behind an
  optimization barrier so XLA keeps it) and ``view`` reverses them back, which XLA does by a
  change of layout: a batch-1 step multiplies a vector by each kernel, which XLA's GPU
  compiler rewrites as an elementwise multiply and a sum over the contracted dims; with
  those dims minor in memory the two fuse into one kernel that reads the weights once
  (row-major, the multiply first writes a weight-sized product). Larger batches run GEMMs
  on the row-major slices (reversed ones would cost transposes in every step).
  Same outputs either way; the cache layout [L, B, S, K, Dh] does not change.
  """
  if not unrolled_decode(config):
    return params, config, lambda stored: stored
  unrolled = unstack_scanned_params(params, config.n_layers)
  config = dataclasses.replace(config, scan_layers=False)
  if batch != 1:
    return unrolled, config, lambda stored: stored
  layer_names = [f"layers_{i}" for i in range(config.n_layers)]

  def on_kernels(fn, node):
    return {k: (jax.tree_util.tree_map(fn, v) if k == "kernel" else
                on_kernels(fn, v) if isinstance(v, Mapping) else v) for k, v in node.items()}

  def map_kernels(fn, tree):
    return {**tree, **{name: on_kernels(fn, tree[name]) for name in layer_names}}

  stored = jax.lax.optimization_barrier(map_kernels(_reverse_dims, unrolled))
  return stored, config, functools.partial(map_kernels, _reverse_dims)


def _decode_loop(params: Params, config: ModelConfig, spec: _DecodeSpec, cache: Cache,
                 logits: Array, base: int, active: Array, keys: Array) -> Dict[str, Array]:
  """Samples up to N tokens per row, the first from `logits` [B, V].

  Token t is fed back at cache slot base + t. Rows with active False start done. The
  blocks run as ``decode_model`` says.
  """
  stored, config, view = decode_model(params, config, logits.shape[0])
  batch = logits.shape[0]
  n = spec.max_new_tokens
  eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)

  def pick(state, logits, step):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    tok, raw_lp, samp_lp = sample_logits(logits, step_keys, spec.temperature, spec.top_k,
                                         spec.top_p)
    done = state["done"]
    live = ~done
    out = state["tokens"].at[:, step].set(jnp.where(live, tok, PAD_ID))
    is_eos = jnp.any(tok[:, None] == eos[None, :], axis=1)
    is_stop = _stop_hit(out, step, spec.stop_sequences)
    is_last = step + 1 >= n
    code = jnp.where(is_eos, _EOS, jnp.where(is_stop, _STOP, jnp.where(is_last, _LENGTH, 0)))
    code = jnp.where(live, code, 0).astype(jnp.int32)
    return {
        "tokens": out,
        "logprobs": state["logprobs"].at[:, step].set(jnp.where(live, raw_lp, 0.0)),
        "sampling_logprobs": state["sampling_logprobs"].at[:, step].set(
            jnp.where(live, samp_lp, 0.0)),
        "lengths": state["lengths"] + live.astype(jnp.int32),
        "finish": jnp.where(code > 0, code, state["finish"]),
        "done": done | (code > 0),
    }

  state = {
      "tokens": jnp.zeros((batch, n), jnp.int32),
      "logprobs": jnp.zeros((batch, n), jnp.float32),
      "sampling_logprobs": jnp.zeros((batch, n), jnp.float32),
      "lengths": jnp.zeros((batch,), jnp.int32),
      "finish": jnp.zeros((batch,), jnp.int32),
      "done": ~active,
  }
  state = pick(state, logits, jnp.zeros((), jnp.int32))

  def cond(carry):
    step, _, state = carry
    return (step < n) & ~jnp.all(state["done"])

  def body(carry):
    step, cache, state = carry
    prev = jax.lax.dynamic_slice_in_dim(state["tokens"], step - 1, 1, axis=1)[:, 0]
    logits, cache = decode_step(view(stored), config, cache, prev, base + step - 1)
    return step + 1, cache, pick(state, logits, step)

  _, _, state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), cache, state))
  state.pop("done")
  return state


def _batch_program(config: ModelConfig, spec: _DecodeSpec, params: Params, tokens: Array,
                   mask: Array, active: Array, row_ids: Array, seed: Array,
                   prefix_cache: Optional[Cache], prefix_logits: Optional[Array]):
  """Prefill + decode of one batch.

  tokens, mask: [B, P] left-padded prompts (suffixes when a prefix cache is given).
  active: [B] bool real rows; row_ids: [B] int32 prompt indices (for the keys).
  prefix_cache: None, or a batch-1 cache of Pp slots holding the shared prefix;
  prefix_logits: [1, V] next-token logits after the prefix.
  """
  batch, plen = tokens.shape
  n = spec.max_new_tokens
  cache = _cache_after_prefix(config, batch, plen + n - 1, prefix_cache)
  pre = _prefix_slots(prefix_cache)
  logits, cache = prefill(params, config, tokens, mask, cache, pre)
  if prefix_logits is not None:
    # An empty suffix leaves a pad in the last column: continue from the prefix.
    logits = jnp.where(mask[:, -1:], logits, prefix_logits)
  keys = _row_keys(seed, row_ids)
  return _decode_loop(params, config, spec, cache, logits, pre + plen, active, keys)


def _prefix_slots(prefix_cache: Optional[Cache]) -> int:
  return 0 if prefix_cache is None else prefix_cache["mask"].shape[1]


def _cache_after_prefix(config: ModelConfig, batch: int, slots: int,
                        prefix_cache: Optional[Cache]) -> Cache:
  """A cache for `batch` rows: the batch-1 prefix cache's Pp slots (broadcast over the rows;
  none without one), then `slots` empty ones."""
  rest = init_cache(config, batch, slots)
  if prefix_cache is None:
    return _constrain_cache(rest)
  pre = _prefix_slots(prefix_cache)

  def extend(pre_x, rest_x, axis):
    shape = rest_x.shape[:axis] + (pre,) + rest_x.shape[axis + 1:]
    return jnp.concatenate([jnp.broadcast_to(pre_x, shape), rest_x], axis=axis)

  return _constrain_cache({"k": extend(prefix_cache["k"], rest["k"], 2),
                           "v": extend(prefix_cache["v"], rest["v"], 2),
                           "mask": extend(prefix_cache["mask"], rest["mask"], 1)})


def _prefix_program(config: ModelConfig, params: Params, tokens: Array, mask: Array):
  """tokens, mask [1, Pp] -> (cache of Pp slots, next-token logits [1, V])."""
  cache = init_cache(config, 1, tokens.shape[1])
  logits, cache = prefill(params, config, tokens, mask, cache, 0)
  return cache, logits


def _score_program(config: ModelConfig, params: Params, tokens: Array, mask: Array,
                   start: Array, cont_mask: Array) -> Array:
  """log p(cont | prompt) per token, one forward pass of right-padded rows.

  tokens, mask: [B, T], each row its prompt, then its continuation from column start [B],
  then pads (the fused-attention path); cont_mask: [B, C] real continuation tokens.
  Returns [B, C] float32 (0 at pads). The LM head runs at the C columns that predict the
  continuation only (``models.continuation_logits``).
  """
  clen = cont_mask.shape[1]
  logits = models.continuation_logits(params, config, tokens, mask, start, clen)   # [B, C, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  cont = models.continuation_tokens(tokens, start, clen)
  lp = jnp.take_along_axis(logp, cont[..., None], axis=-1)[..., 0]
  return jnp.where(cont_mask, lp, 0.0)


def _shared_score_program(config: ModelConfig, group: int, params: Params, tokens: Array,
                          mask: Array, cont: Array, cont_mask: Array,
                          prefix_cache: Optional[Cache] = None) -> Array:
  """log p(cont | prompt) per token for `group` continuations per prompt, the prompt run once.

  tokens, mask: [U, P] left-padded prompts (the suffixes after the prefix when a prefix
  cache is given); cont, cont_mask: [U * group, C] right-padded continuations, rows
  u * group .. u * group + group - 1 continuing prompt u. prefix_cache: None, or the
  batch-1 cache of Pp slots of the prefix every prompt starts with (``_prefix_program``).
  The prompts fill a KV cache of (Pp +) P + C slots (``prefill``), each row of it is
  repeated `group` times (on the row's own device: the prompt's rows are adjacent), and
  the continuations run against it. Returns [U * group, C] float32 (0 at pads).
  """
  plen, clen = tokens.shape[1], cont.shape[1]
  pre = _prefix_slots(prefix_cache)
  cache = _cache_after_prefix(config, tokens.shape[0], plen + clen, prefix_cache)
  last, cache = prefill(params, config, tokens, mask, cache, pre)      # [U, V]
  cache = _constrain_cache({"k": jnp.repeat(cache["k"], group, axis=1),
                            "v": jnp.repeat(cache["v"], group, axis=1),
                            "mask": jnp.repeat(cache["mask"], group, axis=0)})
  logits = jnp.repeat(last, group, axis=0)[:, None].astype(jnp.float32)   # predicts cont[:, 0]
  if clen > 1:
    more, _ = _apply(params, config, cont[:, :-1], cont_mask[:, :-1], cache, pre + plen)
    logits = jnp.concatenate([logits, more.astype(jnp.float32)], axis=1)   # [U * group, C, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(logp, cont[..., None], axis=-1)[..., 0]
  return jnp.where(cont_mask, lp, 0.0)


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, config: ModelConfig, spec: Optional[_DecodeSpec], mesh, rules):
  """One jax.jit per (program, config, static sampling, mesh, rules); jit caches shapes."""
  del mesh, rules   # part of the cache key: tracing happens under them
  if kind == "batch":
    return jax.jit(functools.partial(_batch_program, config, spec))
  if kind == "prefix":
    return jax.jit(functools.partial(_prefix_program, config))
  if kind == "score":
    return jax.jit(functools.partial(_score_program, config))
  if kind == "shared_score":
    return jax.jit(functools.partial(_shared_score_program, config), static_argnums=0)
  raise ValueError(kind)


# ----------------------------------------------------------------------------------------
# Host side.


def bucket_length(n: int, bucket: int = 64) -> int:
  """Padded length for n tokens: a power of two (>= 16) up to `bucket`, then multiples of it."""
  if n <= bucket:
    size = 16
    while size < n:
      size *= 2
    return min(size, bucket)
  return -(-n // bucket) * bucket


def full_batch_rows(batch_size: int, multiple: int) -> int:
  """Rows of a full jitted batch: batch_size rounded up to a multiple of `multiple` (the
  batch shards)."""
  return -(-batch_size // multiple) * multiple


def batch_rows(n: int, rows: int, multiple: int = 1) -> int:
  """Rows of the jitted batch that holds n real rows, at most `rows` (the full batch, a
  multiple of `multiple`): the smallest multiple * 2^k >= n. A short last (or only) batch is
  padded that far rather than to a full batch, for at most log2(rows / multiple) more
  compiled shapes."""
  size = multiple
  while size < n:
    size *= 2
  return min(size, rows)


def _pad(seqs: Sequence[Sequence[int]], length: int, rows: int, left: bool):
  tokens = np.full((rows, length), PAD_ID, np.int32)
  mask = np.zeros((rows, length), bool)
  for r, s in enumerate(seqs):
    if not len(s):
      continue
    if left:
      tokens[r, length - len(s):] = s
      mask[r, length - len(s):] = True
    else:
      tokens[r, :len(s)] = s
      mask[r, :len(s)] = True
  return tokens, mask


def _mesh_context(mesh, rules):
  if mesh is None:
    return contextlib.nullcontext()
  if rules is None:
    raise ValueError("a mesh needs logical rules (e.g. sharding.rules_for('fsdp_tp'))")
  return sharding.use_mesh(mesh, rules)


def _place(batch: Dict[str, np.ndarray], mesh, rules):
  if mesh is None:
    return batch
  return sharding.shard_batch(batch, mesh, rules)


class PromptTooLong(ValueError):
  """A prompt of a generate / score call does not fit (truncate=None); callers that know
  what the prompt stands for (a comparison, a question) name it from `index`.

  Attributes: index (of the prompt in the call), tokens (its length), limit (tokens that fit).
  """

  def __init__(self, message: str, index: int, tokens: int, limit: int):
    super().__init__(message)
    self.index, self.tokens, self.limit = index, tokens, limit


def _fit_length(i: int, seq: Sequence[int], limit: int, what: str, detail: str,
         truncate: Optional[str], bos_id: Optional[int] = None) -> Tuple[List[int], int]:
  """Validates / left-truncates one sequence to `limit` tokens: (tokens, dropped count).
  A sequence that starts with `bos_id` keeps it in front of its last tokens; a too-long
  one without truncate='left' raises PromptTooLong."""
  seq = [int(t) for t in seq]
  if len(seq) <= limit:
    return seq, 0
  if truncate != "left":
    raise PromptTooLong(
        f"{what} {i} has {len(seq)} tokens but at most {limit} fit ({detail}); "
        "shorten it or pass truncate='left' to keep its last tokens", i, len(seq), limit)
  return keep_last(seq, limit, bos_id), len(seq) - limit


def _run_pipelined(jobs, dispatch, collect, progress: bool, desc: str):
  """Dispatches job j+1 before fetching job j, so host work overlaps device work."""
  pending = None
  with tqdm(total=len(jobs), desc=desc, disable=not (progress and distributed.is_primary())) as bar:
    for job in jobs:
      out = dispatch(job)
      if pending is not None:
        collect(*pending)
        bar.update(1)
      pending = (job, out)
    if pending is not None:
      collect(*pending)
      bar.update(1)


def generate(params: Params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams, batch_size: int, mesh=None, rules=None,
             progress: bool = True, prefix: Optional[Sequence[int]] = None,
             truncate: Optional[str] = None, bucket: int = 64,
             sort_by_length: bool = True, bos_id: Optional[int] = None,
             first_row: int = 0) -> GenerateResult:
  """Samples a continuation of every prompt.

  Args:
    params: LM parameters (plain arrays) of ``config``.
    config: the model's ModelConfig (``unroll_decode`` None is decided per call by
      ``resolve_unroll_decode``).
    prompts: token-id lists (non-empty unless a prefix is given). With a prefix they
      are the per-prompt suffixes: the model sees prefix + prompt.
    sampling: SamplingParams (everything but the seed is compiled in).
    batch_size: rows per jitted batch (with a mesh, rounded up to a multiple of the
      data * fsdp size); a short last batch is padded only up to ``batch_rows``.
    mesh, rules: optional device mesh and logical rules; batch is split over
      (data, fsdp) and heads over tensor. Params are placed in their logical sharding.
    progress: tqdm bar over batches.
    prefix: tokens shared by every prompt, prefilled once (batch 1) and broadcast.
    truncate: None raises ValueError for a prompt longer than
      max_seq_len - max_new_tokens - len(prefix); 'left' keeps its last tokens (and a
      leading `bos_id` in front of them).
    bucket: prompt columns are padded to ``bucket_length(len, bucket)``.
    sort_by_length: batch prompts of similar length together (results are returned
      in input order; samples do not depend on batching).
    bos_id: the tokenizer's BOS id, which left truncation keeps in front of a prompt that
      starts with it (None: no token is special).
    first_row: the index of prompts[0] in a larger prompt set sampled in several calls:
      prompt i samples with the keys of row ``first_row + i``, so the calls together give
      what one call over the whole set gives.
  Returns:
    GenerateResult (see its docstring); stats counts truncations.
  """
  spec = _DecodeSpec.of(sampling)
  rules = sharding.hashable_rules(rules)
  n = spec.max_new_tokens
  prefix = [] if prefix is None else [int(t) for t in prefix]
  limit = config.max_seq_len - n - len(prefix)
  detail = f"max_seq_len={config.max_seq_len} - max_new_tokens={n} - prefix={len(prefix)}"
  if limit < (0 if prefix else 1):
    raise ValueError(f"no room for a prompt: {detail} = {limit}")
  if truncate not in (None, "left"):
    raise ValueError(f"truncate={truncate!r}; expected None or 'left'")
  fitted = [_fit_length(i, p, limit, "prompt", detail, truncate, bos_id)
            for i, p in enumerate(prompts)]
  prompts = [p for p, _ in fitted]
  n_trunc = sum(d > 0 for _, d in fitted)
  dropped = sum(d for _, d in fitted)
  if not prefix:
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
      raise ValueError(f"prompt {empty[0]} is empty (a prompt needs at least one token "
                       "unless a prefix is given)")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if first_row < 0:
    raise ValueError(f"first_row must be >= 0, got {first_row}")
  multiple = sharding.batch_shards(mesh, rules)
  rows = full_batch_rows(batch_size, multiple)

  num = len(prompts)
  order = sorted(range(num), key=lambda i: len(prompts[i])) if sort_by_length else list(range(num))
  jobs = [order[s:s + rows] for s in range(0, num, rows)]
  seed = np.uint32(sampling.seed)
  results: Dict[int, Tuple] = {}

  with _mesh_context(mesh, rules):
    params = models.place_params(params, config, mesh, rules)
    config = resolve_unroll_decode(config, params)
    batch_fn = _jitted("batch", config, spec, mesh, rules)
    prefix_cache = prefix_logits = None
    if prefix:
      ptok, pmask = _pad([prefix], bucket_length(len(prefix), bucket), 1, left=True)
      prefix_cache, prefix_logits = _jitted("prefix", config, None, mesh, rules)(
          params, ptok, pmask)

    def dispatch(ids):
      seqs = [prompts[i] for i in ids]
      plen = bucket_length(max(max(len(s) for s in seqs), 1), bucket)
      plen = max(min(plen, limit), max(len(s) for s in seqs), 1)
      filler = [[PAD_ID]] if not prefix else [[]]
      size = batch_rows(len(ids), rows, multiple)
      tokens, mask = _pad(seqs + filler * (size - len(ids)), plen, size, left=True)
      active = np.arange(size) < len(ids)
      row_ids = np.zeros((size,), np.int32)
      row_ids[:len(ids)] = np.asarray(ids, np.int64) + first_row
      batch = _place({"tokens": tokens, "mask": mask, "active": active, "row_ids": row_ids},
                     mesh, rules)
      return batch_fn(params, batch["tokens"], batch["mask"], batch["active"],
                      batch["row_ids"], seed, prefix_cache, prefix_logits)

    def collect(ids, out):
      out = distributed.gather_to_host(out)
      for r, i in enumerate(ids):
        k = int(out["lengths"][r])
        results[i] = (out["tokens"][r, :k].copy(), out["logprobs"][r, :k].copy(),
                      out["sampling_logprobs"][r, :k].copy(), FINISH_REASONS[int(out["finish"][r])])

    _run_pipelined(jobs, dispatch, collect, progress, "generate")

  tokens = [results[i][0] for i in range(num)]
  reasons = [results[i][3] for i in range(num)]
  num_stop = np.zeros((num,), np.int32)
  for i in range(num):
    if reasons[i] == "eos":
      num_stop[i] = 1
    elif reasons[i] == "stop":
      tail = tuple(int(t) for t in tokens[i])
      num_stop[i] = max(len(s) for s in spec.stop_sequences
                        if len(s) <= len(tail) and tail[len(tail) - len(s):] == s)
  lengths = np.array([len(t) for t in tokens], np.int32)
  stats = {"prompts": num, "batches": len(jobs), "truncated_prompts": n_trunc,
           "truncated_tokens": dropped, "generated_tokens": int(lengths.sum())}
  for reason in FINISH_REASONS[1:]:
    stats[f"finish_{reason}"] = sum(r == reason for r in reasons)
  return GenerateResult(
      tokens=tokens, logprobs=[results[i][1] for i in range(num)],
      sampling_logprobs=[results[i][2] for i in range(num)], lengths=lengths,
      finish_reasons=reasons, num_stop_tokens=num_stop,
      prompt_lengths=np.array([len(p) for p in prompts], np.int32), stats=stats)


def score_continuations(params: Params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], batch_size: int, mesh=None,
                        rules=None, progress: bool = False, truncate: Optional[str] = None,
                        bucket: int = 64, stats: Optional[Dict[str, int]] = None,
                        share_prompts: bool = True,
                        bos_id: Optional[int] = None) -> List[np.ndarray]:
  """Per-token log-probs of each continuation given its prompt.

  Two programs, the same numbers (to float rounding): rows whose prompts are all different
  go through one right-padded forward pass each (``_score_program``). When prompts repeat
  (the options of a multiple-choice question, a chosen / rejected pair), each distinct
  prompt runs once and its continuations run against its KV cache
  (``_shared_score_program``), whenever that processes fewer token columns. That program
  also runs a prefix that every prompt starts with (few-shot examples, a question
  template's preamble; whole multiples of `bucket` tokens) once, into a cache every batch
  starts from, and each prompt's rest after it.

  Args:
    prompts: non-empty token-id lists; continuations: token-id lists (same count).
    batch_size: rows per jitted batch (with a mesh, rounded up to a multiple of
      data * fsdp); a short last batch is padded only up to ``batch_rows``.
    mesh, rules: as in ``generate``.
    truncate: None raises ValueError when len(prompt) + len(continuation) exceeds
      config.max_seq_len; 'left' drops the prompt's first tokens instead (after a
      leading `bos_id`, which it keeps).
    bucket: prompt and continuation columns are padded to ``bucket_length``.
    stats: optional dict that receives truncated_prompts / truncated_tokens counts.
    share_prompts: False always runs the one-pass-per-row program (no repeated prompt
      and no common prefix run once).
    bos_id: the tokenizer's BOS id (see ``generate``).
  Returns:
    list of [len(continuation_i)] float32 arrays:
    log p(c_t | prompt, c_<t) under the raw model distribution.
  """
  if len(prompts) != len(continuations):
    raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
  rules = sharding.hashable_rules(rules)
  if truncate not in (None, "left"):
    raise ValueError(f"truncate={truncate!r}; expected None or 'left'")
  conts = [[int(t) for t in c] for c in continuations]
  fitted, n_trunc, dropped = [], 0, 0
  for i, (p, c) in enumerate(zip(prompts, conts)):
    limit = config.max_seq_len - len(c)
    detail = f"max_seq_len={config.max_seq_len} - continuation={len(c)}"
    if limit < 1:
      raise ValueError(f"continuation {i} has {len(c)} tokens; no room for a prompt ({detail})")
    p, d = _fit_length(i, p, limit, "prompt", detail, truncate, bos_id)
    n_trunc, dropped = n_trunc + (d > 0), dropped + d
    if not p:
      raise ValueError(f"prompt {i} is empty (a prompt needs at least one token)")
    fitted.append(p)
  if stats is not None:
    stats.update(truncated_prompts=n_trunc, truncated_tokens=dropped)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  multiple = sharding.batch_shards(mesh, rules)
  rows = full_batch_rows(batch_size, multiple)
  num = len(fitted)
  groups: Dict[Tuple[int, ...], List[int]] = {}
  for i, p in enumerate(fitted):
    groups.setdefault(tuple(p), []).append(i)
  group = max((len(g) for g in groups.values()), default=1)
  # A prefix every distinct prompt starts with (few-shot examples, a template's preamble),
  # in whole buckets (one compiled shape per prefix size), leaving each prompt >= 1 token.
  pre = common_prefix_length(list(groups)) if share_prompts and len(groups) > 1 else 0
  pre = min(pre, min((len(p) for p in groups), default=1) - 1) // bucket * bucket
  if share_prompts and (group > 1 or pre) and num:
    # Token columns each program runs: every prompt + continuation, or the prefix once and
    # each distinct prompt's rest once + `group` continuation rows of the longest
    # continuation per prompt.
    one_pass = sum(len(p) + len(c) for p, c in zip(fitted, conts))
    shared = (pre + sum(len(p) - pre for p in groups)
              + len(groups) * group * max(len(c) for c in conts))
    if shared < one_pass:
      return _score_shared(params, config, list(groups.values()), fitted, conts, group, rows,
                           multiple, mesh, rules, progress, bucket, pre)
  order = sorted(range(num), key=lambda i: (len(fitted[i]), len(conts[i])))
  jobs = [order[s:s + rows] for s in range(0, num, rows)]
  results: Dict[int, np.ndarray] = {}

  with _mesh_context(mesh, rules):
    params = models.place_params(params, config, mesh, rules)
    fn = _jitted("score", config, None, mesh, rules)

    def dispatch(ids):
      size = batch_rows(len(ids), rows, multiple)
      ps = [fitted[i] for i in ids] + [[PAD_ID]] * (size - len(ids))
      cs = [conts[i] for i in ids] + [[]] * (size - len(ids))
      clen = bucket_length(max(max(len(c) for c in cs), 1), bucket)
      # Every row's continuation columns [len(p), len(p) + clen) must fit in the width.
      width = bucket_length(max(len(p) for p in ps) + clen, bucket)
      tokens, mask = _pad([p + c for p, c in zip(ps, cs)], width, size, left=False)
      _, cmask = _pad(cs, clen, size, left=False)
      start = np.array([len(p) for p in ps], np.int32)
      batch = _place({"t": tokens, "m": mask, "s": start, "cm": cmask}, mesh, rules)
      return fn(params, batch["t"], batch["m"], batch["s"], batch["cm"])

    def collect(ids, out):
      out = distributed.gather_to_host(out)
      for r, i in enumerate(ids):
        results[i] = out[r, :len(conts[i])].copy()

    _run_pipelined(jobs, dispatch, collect, progress, "score")
  return [results[i] for i in range(num)]


def _score_shared(params: Params, config: ModelConfig, groups: List[List[int]],
                  fitted: List[List[int]], conts: List[List[int]], group: int, rows: int,
                  multiple: int, mesh, rules, progress: bool, bucket: int,
                  pre: int = 0) -> List[np.ndarray]:
  """``score_continuations`` through ``_shared_score_program``: groups[g] lists the rows
  (indices into fitted / conts) that share prompt fitted[groups[g][0]]; every group is
  padded to `group` rows with empty continuations. A batch holds about rows / group prompts
  (at least one, a multiple of `multiple`). pre > 0: every prompt starts with the same
  `pre` tokens (and has more), prefilled once into a batch-1 cache that every batch starts
  from."""
  per_batch = max(multiple, (rows // group) // multiple * multiple)
  order = sorted(range(len(groups)), key=lambda g: len(fitted[groups[g][0]]))
  jobs = [order[s:s + per_batch] for s in range(0, len(order), per_batch)]
  results: Dict[int, np.ndarray] = {}

  with _mesh_context(mesh, rules):
    params = models.place_params(params, config, mesh, rules)
    fn = _jitted("shared_score", config, None, mesh, rules)
    prefix_cache = None
    if pre:
      head = fitted[groups[0][0]][:pre]
      ptok, pmask = _pad([head], pre, 1, left=True)
      prefix_cache, _ = _jitted("prefix", config, None, mesh, rules)(params, ptok, pmask)

    def dispatch(gs):
      size = batch_rows(len(gs), per_batch, multiple)
      ps = [fitted[groups[g][0]][pre:] for g in gs] + [[PAD_ID]] * (size - len(gs))
      cs = [[]] * (size * group)
      for r, g in enumerate(gs):
        for j, i in enumerate(groups[g]):
          cs[r * group + j] = conts[i]
      plen = bucket_length(max(len(p) for p in ps), bucket)
      clen = bucket_length(max(max(len(c) for c in cs), 1), bucket)
      tokens, mask = _pad(ps, plen, size, left=True)
      ctok, cmask = _pad(cs, clen, size * group, left=False)
      batch = _place({"t": tokens, "m": mask, "c": ctok, "cm": cmask}, mesh, rules)
      return fn(group, params, batch["t"], batch["m"], batch["c"], batch["cm"], prefix_cache)

    def collect(gs, out):
      out = distributed.gather_to_host(out)
      for r, g in enumerate(gs):
        for j, i in enumerate(groups[g]):
          results[i] = out[r * group + j, :len(conts[i])].copy()

    _run_pipelined(jobs, dispatch, collect, progress, "score")
  return [results[i] for i in range(len(fitted))]


def sum_logprobs(params: Params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                 continuations: Sequence[Sequence[int]], batch_size: int, **kwargs) -> np.ndarray:
  """[num] float32: total log p(continuation | prompt) (``score_continuations`` summed)."""
  lps = score_continuations(params, config, prompts, continuations, batch_size, **kwargs)
  return np.array([float(np.sum(lp, dtype=np.float64)) for lp in lps], np.float32)


# ----------------------------------------------------------------------------------------
# Text level: the one place where stages turn the sampler into a text generator.


@functools.lru_cache(maxsize=None)
def _jitted_rows(fn: Callable) -> Callable:
  return jax.jit(fn, static_argnums=1)


def apply_batched(fn: Callable, params: Params, config: ModelConfig,
                  rows: Sequence[Dict[str, np.ndarray]], fields: Sequence[str], batch_size: int,
                  mesh=None, rules=None, head: str = "scalar") -> np.ndarray:
  """[N] float32: ``fn(params, config, *row fields)`` (one value per row) over every row.

  Rows ({field: [T] array}, the same T for every row) are stacked into batches of
  batch_size rows (rounded up to a multiple of the mesh's batch shards); a short last
  batch is padded by repeating its last row up to ``batch_rows``. With a mesh, params
  are placed in their logical sharding for `head` (``models.place_params``), batches are
  split over the batch axes and results are gathered to every process (a collective in
  multi-process runs: every process calls it with the same arguments). Used for PM / harm-model scores and DPO
  reference log-prob sums.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not rows:
    return np.zeros((0,), np.float32)
  rules = sharding.hashable_rules(rules)
  jitted = _jitted_rows(fn)
  multiple = sharding.batch_shards(mesh, rules)
  size = full_batch_rows(batch_size, multiple)
  out = []
  with _mesh_context(mesh, rules):
    params = models.place_params(params, config, mesh, rules, head)
    for start in range(0, len(rows), size):
      chunk = list(rows[start:start + size])
      n = len(chunk)
      chunk += [chunk[-1]] * (batch_rows(n, size, multiple) - n)
      batch = _place({k: np.stack([r[k] for r in chunk]) for k in fields}, mesh, rules)
      result = jitted(params, config, *[batch[k] for k in fields])
      out.append(np.asarray(distributed.gather_to_host(result), np.float32)[:n])
  return np.concatenate(out)


def text_generate_fn(params: Params, config: ModelConfig, tok: Any, stops: Sequence[str],
                     temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                     mesh=None, rules=None, truncate: Optional[str] = None):
  """fn(prefix_text, prompt_texts, seed) -> completions (list of str) over ``generate``.

  The model reads exactly ``tokenize(prefix_text + prompt_text)``: the ids the prompts'
  joined encodings share with the prefix's (``tokenizer.encode_after``, BOS first if the
  tokenizer wants one) go in as ``prefix=`` (prefilled once per call, KV cache broadcast
  over the rows) and the rest of each as its prompt. Without a prefix, BOS goes in front
  of each prompt when the tokenizer wants one, and left truncation keeps it. Generation
  stops at EOS or the token sequences of `stops` (``tokenizer.stop_token_sequences``); the
  returned text is ``GenerateResult.text`` (cut at the first of `stops`).
  """
  from cai_jax.tokenizer import encode_after, stop_token_sequences, with_bos
  base = SamplingParams(
      temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
      eos_ids=(tok.eos_id,) if tok.eos_id is not None else (),
      stop_sequences=stop_token_sequences(tok, stops))

  def fn(prefix: str, texts: Sequence[str], seed: int) -> List[str]:
    if prefix:
      pre, ids = encode_after(tok, prefix, texts)
    else:
      pre, ids = [], [with_bos(tok, tok.encode(t)) for t in texts]
    res = generate(params, config, ids, dataclasses.replace(base, seed=seed), batch_size,
                   mesh=mesh, rules=rules, progress=False, prefix=pre or None, truncate=truncate,
                   bos_id=tok.bos_id)
    return [res.text(i, tok.decode, stops) for i in range(len(texts))]

  return fn

"""Decoder building blocks: RMSNorm, RoPE, grouped-query attention with a KV
cache, SwiGLU MLP and token embeddings.

Shapes use B = batch, T = query length, S = key length (cache slots),
D = d_model, H = query heads, K = kv heads, Dh = head_dim, F = d_ff, V = vocab.
Every parameter is created with logical axis names (see ``cai_jax.axes``).
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cai_jax import axes, sharding
from cai_jax.configs import ModelConfig, dtype_from_name
from cai_jax.decode_attention import decode_attention

Array = jax.Array


def constrain(x: Array, names: Tuple[Optional[str], ...]) -> Array:
  """Annotates an activation with logical axis names (no-op without rules). A mesh axis
  that does not divide its dim splits it unevenly (XLA pads), unlike parameters and
  input batches (``sharding.fit_spec``), so e.g. a 16-row minibatch still spreads its
  activations over 32 batch shards."""
  return nn.with_logical_constraint(x, names)


class DenseND(nn.Module):
  """Contracts the last `n_in` dims of x with a kernel of shape in_shape + out_shape.

  Attributes:
    in_shape: sizes of the contracted trailing dims of x.
    out_shape: sizes of the output trailing dims.
    kernel_axes: logical names of the kernel dims (len(in_shape) + len(out_shape)).
    use_bias: adds a bias of shape out_shape (logical names = the output part of kernel_axes).
  """

  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  kernel_axes: Tuple[Optional[str], ...]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  stddev: Optional[float] = None   # default 1/sqrt(fan_in)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = int(math.prod(self.in_shape))
    std = self.stddev if self.stddev is not None else 1.0 / math.sqrt(fan_in)
    init = nn.initializers.normal(stddev=std) if std > 0 else nn.initializers.zeros
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        tuple(self.in_shape) + tuple(self.out_shape), self.param_dtype)
    n_in = len(self.in_shape)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[n_in:]), tuple(self.out_shape), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> Array:
  """Inverse frequencies [Dh/2] of rotary embeddings, with optional Llama-3 scaling."""
  hd = config.dim_per_head
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  factor = config.rope_scaling_factor
  if factor and factor > 0:
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_len
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates x [B, T, N, Dh] by positions [B, T] (half-split convention of HF Llama)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _large_negative(dtype) -> Array:
  """The finite mask fill of ``jax.nn.dot_product_attention`` for logits of `dtype`."""
  big = min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))
  return jnp.asarray(-0.7 * big, dtype)


# Query block of ``chunked_causal_attention``: measured on a 2-core CPU at the SmolLM2-135M
# scoring shape (B 8, T 448, 9 heads): dense 120 ms, blocks of 64 65 ms, of 128 69 ms.
CAUSAL_CHUNK = 64


def chunked_causal_attention(q: Array, k: Array, v: Array, key_mask: Array, scale: float,
                             chunk: int = CAUSAL_CHUNK) -> Array:
  """Causal attention, one block of `chunk` queries at a time, each against only the keys up
  to its last query: the masked upper triangle of the score matrix is never computed (about
  half the work and a [B, H, chunk, T] score block in memory instead of [B, H, T, T]). The
  same result as the dense causal & key mask.

  q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; key_mask: [B, T] bool, True at real keys (any
  padding: right-padded rows, or the left-padded prompts of a prefill).
  Returns [B, T, H, Dh].
  """
  length = q.shape[1]
  outs = []
  for start in range(0, length, chunk):
    end = min(start + chunk, length)
    query = jnp.arange(start, end)[:, None]
    key = jnp.arange(end)[None, :]
    mask = (key <= query)[None] & key_mask[:, None, :end]    # [B, end - start, end]
    outs.append(jax.nn.dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                             mask=mask[:, None], scale=scale))
  return jnp.concatenate(outs, axis=1)


def chunked_cached_attention(q: Array, k_cache: Array, v_cache: Array, k: Array, v: Array,
                             mask: Array, scale: float, chunk: int = CAUSAL_CHUNK) -> Array:
  """``cached_attention``'s result, one block of `chunk` queries at a time, each against the
  cache slots and only the new keys up to its last query (a prefill after a prefix or of a
  second chunk: the causal upper triangle of the new tokens is never computed, and the
  score block is [B, H, chunk, S + T] at most).

  Args and result as ``cached_attention``; mask [B, T, S + T] must be causal among the new
  tokens (False where t' > t), as the decoder builds it. A query with no visible key gets
  a uniform average over its block's keys (nothing reads it).
  """
  slots, length = k_cache.shape[1], q.shape[1]
  keys = jnp.concatenate([k_cache, k], axis=1)       # [B, S + T, K, Dh]
  values = jnp.concatenate([v_cache, v], axis=1)
  outs = []
  for start in range(0, length, chunk):
    end = min(start + chunk, length)
    outs.append(jax.nn.dot_product_attention(
        q[:, start:end], keys[:, :slots + end], values[:, :slots + end],
        mask=mask[:, None, start:end, :slots + end], scale=scale))
  return jnp.concatenate(outs, axis=1).astype(v.dtype)


def cudnn_compute_capability(major: int) -> bool:
  """Whether cuDNN's fused attention runs on a CUDA GPU of compute capability `major`.x:
  8.0 or later (Ampere, Hopper, ...)."""
  return major >= 8


@functools.lru_cache(maxsize=None)
def cudnn_capable() -> bool:
  """Whether the default backend is CUDA on a GPU where cuDNN's fused attention runs
  (``cudnn_compute_capability``). False on a CPU or ROCm."""
  if jax.default_backend() != "gpu":
    return False
  match = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(jax.devices()[0], "compute_capability", "")))
  return match is not None and cudnn_compute_capability(int(match.group(1)))


def fused_causal_impl(config: ModelConfig, capable: Optional[bool] = None) -> Optional[str]:
  """'cudnn' where right-padded causal attention (per-row key lengths) runs cuDNN's fused
  kernel: attention_impl 'cudnn', or attention_impl None on a CUDA GPU that runs it
  (`capable`, default ``cudnn_capable()``: this process's backend) with a 16-bit compute
  dtype and a head width the kernel takes on every such GPU (a multiple of 8, at most 128).
  None otherwise (XLA, or the chunked kernel on a CPU)."""
  if config.attention_impl == "cudnn":
    return "cudnn"
  if (config.attention_impl is None and config.dtype in ("bfloat16", "float16")
      and config.dim_per_head % 8 == 0 and config.dim_per_head <= 128
      and (cudnn_capable() if capable is None else capable)):
    return "cudnn"
  return None


def causal_key_mask(key_mask: Array) -> Array:
  """[B, T] key mask -> the dense [B, T, T] causal & key mask."""
  length = key_mask.shape[1]
  return jnp.tril(jnp.ones((length, length), bool))[None] & key_mask[:, None, :]


def cached_attention(q: Array, k_cache: Array, v_cache: Array, k: Array, v: Array,
                     mask: Array, scale: float) -> Array:
  """Grouped-query attention over the cache slots followed by the new keys.

  The cache is only read, never concatenated with the new keys or written, so a
  caller can update it in place afterwards. Logits of both parts share one float32
  softmax.

  Args:
    q: [B, T, H, Dh] queries.
    k_cache, v_cache: [B, S, K, Dh] cache slots as they were before this call.
    k, v: [B, T, K, Dh] keys / values of the T new tokens.
    mask: [B, T, S + T] bool, True where query t may attend cache slot s (first S
      columns) or new token t' (last T columns).
    scale: logit multiplier.
  Returns:
    [B, T, H, Dh] in the dtype of v. A query with no visible key gets a uniform
    average (finite), as with ``jax.nn.dot_product_attention``.
  """
  batch, length, heads, hd = q.shape
  kv_heads = k.shape[2]
  slots = k_cache.shape[1]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, hd)
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)

  def scores(keys):
    return jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=logits_dtype)

  logits = jnp.concatenate([scores(k_cache), scores(k)], axis=-1)     # [B, K, G, T, S + T]
  logits = logits * jnp.asarray(scale, logits_dtype)
  logits = jnp.where(mask[:, None, None], logits, _large_negative(logits_dtype))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)

  def mix(p, values):
    return jnp.einsum("bkgts,bskd->btkgd", p, values, preferred_element_type=jnp.float32)

  out = mix(probs[..., :slots], v_cache) + mix(probs[..., slots:], v)
  return out.reshape(batch, length, heads, hd).astype(v.dtype)


def decode_mesh_axes(batch: int, kv_heads: int) -> Optional[Tuple[object, object]]:
  """(batch axes, kv-head axes) of the current mesh (``jax.set_mesh``) under the logical
  rules, for ``decode_attention``'s shard_map: the mesh axes of BATCH and KV_HEADS that
  divide `batch` and `kv_heads` (``sharding.fit_spec``; the others replicate). None
  without a mesh of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  spec = sharding.fit_spec(nn.logical_to_mesh_axes((axes.BATCH, axes.KV_HEADS)),
                           (batch, kv_heads), mesh)
  return spec[0], spec[1]


class StackedLayerCache(NamedTuple):
  """A block's view of the whole stacked KV cache, for ``decode_attention`` to read in
  place (no per-layer slice is copied out): k, v [L, B, S, K, Dh], the block's `layer`
  (a Python int) and the call's first cache slot `index` (scalar int32; slots at or after
  it are not read)."""
  k: Array
  v: Array
  layer: int
  index: Array


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional, read-only KV cache.

  Without a cache it calls ``jax.nn.dot_product_attention`` (``config.attention_impl``
  picks its implementation); with a cache, ``cached_attention``, or for one new token per
  row with ``config.decode_attention`` 'pallas', ``decode_attention.decode_attention``.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, attn_mask: Array,
               layer_cache: Optional[Tuple[Array, Array]] = None):
    """Args:
      x: [B, T, D] normalized hidden states.
      positions: [B, T] int32 RoPE positions.
      attn_mask: without a cache (or with one of S = 0 slots), causal attention among the
        T tokens, given as either [B] int32 key lengths: real tokens are a prefix of each
        row (right padding), query t attends keys t' <= t with t' < length; with
        attention_impl 'cudnn' (and None on a GPU in 16-bit, see ``fused_causal_impl``)
        that is ``is_causal`` plus ``key_value_seq_lengths``, cuDNN's fused kernel
        without a [T, T] mask or bias; or [B, T] bool, True at real
        keys (any padding), query t attends real keys t' <= t. Either one, with
        attention_impl None on the CPU backend (T > CAUSAL_CHUNK), goes through
        ``chunked_causal_attention``, and otherwise through the equivalent dense mask
        (XLA's implementation for a [B, T] mask under 'cudnn').
        With a cache of S > 0 slots, [B, T, S + T]: the first S columns are the cache
        slots, the last T the new tokens (see ``cached_attention``; on the CPU backend,
        T > CAUSAL_CHUNK and attention_impl None, ``chunked_cached_attention``).
      layer_cache: optional (k, v), each [B, S, K, Dh]; read, never written here. With
        S = 0 (a prefill into an empty cache: nothing to read) the attention is the
        no-cache one and only the new keys / values are returned. Or, for one new token
        per row (T = 1) with decode_attention 'pallas', a ``StackedLayerCache`` of the
        whole [L, B, S, K, Dh] cache, which the kernel reads in place.
    Returns:
      ([B, T, D] output, None without a cache, else the new (k, v), each [B, T, K, Dh]
      in the cache dtype, for the caller to write into the cache).
    """
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    hd = cfg.dim_per_head

    def proj(name, heads, head_axis):
      return DenseND((cfg.d_model,), (heads, hd), (axes.EMBED, head_axis, axes.KV),
                     use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name=name)(x)

    q = proj("q_proj", cfg.n_heads, axes.HEADS)
    k = proj("k_proj", cfg.n_kv_heads, axes.KV_HEADS)
    v = proj("v_proj", cfg.n_kv_heads, axes.KV_HEADS)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = constrain(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV))
    k = constrain(k, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.KV))
    v = constrain(v, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.KV))

    new_kv = None
    stacked = isinstance(layer_cache, StackedLayerCache)
    if stacked and not (cfg.decode_attention == "pallas" and x.shape[1] == 1):
      raise ValueError("a StackedLayerCache is read by decode_attention 'pallas' only, one "
                       f"token per row; got decode_attention={cfg.decode_attention!r}, "
                       f"T={x.shape[1]}")
    if layer_cache is not None:
      k_cache, v_cache = layer_cache[0], layer_cache[1]
      # Round the new keys / values through the cache dtype, as if read back from it.
      new_kv = (k.astype(k_cache.dtype), v.astype(v_cache.dtype))
      k, v = new_kv[0].astype(dtype), new_kv[1].astype(dtype)
    scale = 1.0 / math.sqrt(hd)
    on_cpu = jax.default_backend() == "cpu"
    slots = 0 if layer_cache is None else k_cache.shape[2 if stacked else 1]
    if slots > 0 and cfg.decode_attention == "pallas" and x.shape[1] == 1:
      # One kernel per layer (T = 1): the stacked cache read in place, or this slice.
      mesh_axes = decode_mesh_axes(q.shape[0], k.shape[2])
      if stacked:
        out = decode_attention(q, k_cache, v_cache, layer_cache.layer, k, v, attn_mask,
                               layer_cache.index, scale, mesh_axes=mesh_axes)
      else:
        out = decode_attention(q, k_cache[None], v_cache[None], 0, k, v, attn_mask, None,
                               scale, mesh_axes=mesh_axes)
    elif slots > 0:
      attend = cached_attention
      if cfg.attention_impl is None and x.shape[1] > CAUSAL_CHUNK and on_cpu:
        attend = chunked_cached_attention   # a long chunk after cached ones: skip the triangle
      out = attend(q, k_cache.astype(dtype), v_cache.astype(dtype), k, v, attn_mask, scale)
    elif attn_mask.ndim == 1 and fused_causal_impl(cfg) == "cudnn":
      # Key lengths of right-padded rows: cuDNN's fused kernel with its padding-causal mask.
      # A row with no real token (length 0, which nothing reads) attends its first column,
      # so its outputs stay finite as on the other paths rather than 0 / 0.
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True,
          key_value_seq_lengths=jnp.maximum(attn_mask.astype(jnp.int32), 1),
          scale=scale, implementation="cudnn")
    else:
      if attn_mask.ndim == 1:
        attn_mask = jnp.arange(x.shape[1])[None, :] < attn_mask[:, None]    # [B, T] keys
      if cfg.attention_impl is None and x.shape[1] > CAUSAL_CHUNK and on_cpu:
        # On the CPU, where XLA computes every score: skip the upper triangle.
        out = chunked_causal_attention(q, k, v, attn_mask, scale)
      else:
        # XLA materialises the scores anyway: the dense mask. cuDNN's fused kernel serves
        # right-padded rows (above); other padding (a prefill's left-padded prompts) goes
        # through XLA rather than a [B, 1, T, T] bias into cuDNN.
        out = jax.nn.dot_product_attention(
            q, k, v, mask=causal_key_mask(attn_mask)[:, None, :, :], scale=scale,
            implementation=None if cfg.attention_impl == "cudnn" else cfg.attention_impl)
    out = constrain(out, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV))
    out = checkpoint_name(out, "attention_out")
    out = DenseND((cfg.n_heads, hd), (cfg.d_model,), (axes.HEADS, axes.KV, axes.EMBED),
                  dtype=dtype, param_dtype=pdtype, name="o_proj")(out)
    return out, new_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); [B, T, D] -> [B, T, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)

    def dense(name, n_in, n_out, in_axis, out_axis):
      return DenseND((n_in,), (n_out,), (in_axis, out_axis), dtype=dtype, param_dtype=pdtype,
                     name=name)

    gate = dense("gate_proj", cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP)(x)
    up = dense("up_proj", cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP)(x)
    h = constrain(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.MLP))
    return dense("down_proj", cfg.d_ff, cfg.d_model, axes.MLP, axes.EMBED)(h)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).

  The signature is scan-friendly: (x, positions, attn_mask, layer_cache) -> (x, new_kv),
  with layer_cache the per-layer (k, v) cache slices [B, S, K, Dh] scanned over (read
  only) and new_kv the (k, v) of the T new tokens, [B, T, K, Dh] each (None without a
  cache), stacked over layers by the scan.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, layer_cache=None):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    # Sequence parallelism (fsdp_tp) for whole sequences; decode / cached steps keep
    # their few positions whole.
    seq = axes.ACTIVATION_LENGTH if layer_cache is None else axes.LENGTH
    x = constrain(x, (axes.BATCH, seq, axes.EMBED))
    h, new_kv = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x),
        positions, attn_mask, layer_cache)
    x = x + h
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dtype, pdtype, name="mlp_norm")(x))
    x = constrain(x, (axes.BATCH, seq, axes.EMBED))
    return x, new_kv


def embedding(config: ModelConfig, name: str = "embed") -> nn.Embed:
  """Token embedding table [V, D] with logical axes (vocab, embed)."""
  return nn.Embed(
      num_embeddings=config.vocab_size, features=config.d_model,
      dtype=dtype_from_name(config.dtype), param_dtype=dtype_from_name(config.param_dtype),
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (axes.VOCAB, axes.EMBED)),
      name=name)

"""The decoder-only transformer with an LM head or a scalar head.

``Decoder(config, head='lm')``   : tokens [B, T] -> logits [B, T, V] (float32)
``Decoder(config, head='scalar')``: tokens [B, T] -> values [B, T] (float32), one scalar
    per position; the preference model reads it at the last non-pad token
    (``cai_jax.models.score``), the PPO value model at every position.

Padding: ``mask`` [B, T] marks real tokens; pads may sit anywhere (left padding for
sampling, right padding for training). A query attends to a key only if the key is
real and not in its future, and RoPE positions count real tokens only, so padding
never changes the outputs at real tokens. ``right_padded=True`` promises that every
row's real tokens come first (as ``cai_jax.data`` batches them for training): attention
then takes a causal mask with per-row key lengths instead of a [B, T, T] mask, which
lets cuDNN's fused causal kernel run (``attention_impl='cudnn'``, and the default on a GPU
in 16-bit, see ``layers.fused_causal_impl``); outputs are the same.

KV cache: ``init_cache`` gives ``{'k','v': [L, B, S, K, Dh], 'mask': [B, S] bool}``;
calling with ``cache`` and ``cache_index`` writes the T new tokens at slots
[cache_index, cache_index + T) and returns ``(output, new_cache)``. The layers only
read the cache (queries attend to the slots written before cache_index plus the T new
tokens); their new keys / values, [L, B, T, K, Dh], are written with one
``dynamic_update_slice`` per tensor, which XLA performs in place when the cache is a loop
carry or a donated buffer. Each layer reads its own slice of the cache; inside the
sampler's decode loop XLA copies those slices every step, scanned or unrolled (the
cache's size per step, small beside the weights at decode lengths; see
``bench/decode_kernels.py``), except that with the blocks unrolled and
``ModelConfig.decode_attention`` 'pallas' a call with one token per row passes each block
the whole cache (``layers.StackedLayerCache``), which its attention kernel reads in place.
The sampler's decode loop may run a scanned model's blocks unrolled
(``ModelConfig.unroll_decode``, ``sampler.decode_model``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax import axes
from cai_jax.configs import ModelConfig, dtype_from_name
from cai_jax.layers import (DecoderBlock, DenseND, RMSNorm, StackedLayerCache, constrain,
                            embedding)

Array = jax.Array
Cache = Dict[str, Array]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache of `length` slots for `batch` sequences."""
  dtype = dtype or dtype_from_name(config.dtype)
  shape = (config.n_layers, batch, length, config.n_kv_heads, config.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, length), bool)}


def _block_class(config: ModelConfig):
  block = DecoderBlock
  if config.remat_policy != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[config.remat_policy],
                     prevent_cse=not config.scan_layers)
  return block


class Decoder(nn.Module):
  """Llama-family decoder. head: 'lm' (logits) or 'scalar' (one value per position).

  Attention is full causal attention (no sliding window): ``convert`` gives a
  sliding-window checkpoint max_seq_len = its window, within which the two agree."""

  config: ModelConfig
  head: str = "lm"

  @nn.compact
  def __call__(self, tokens: Array, mask: Optional[Array] = None,
               cache: Optional[Cache] = None, cache_index: Optional[Array] = None,
               right_padded: bool = False, head_columns: Optional[Array] = None):
    """Args:
      tokens: [B, T] int32 token ids.
      mask: [B, T] bool, True at real tokens (default: all real).
      right_padded: (static) the caller promises each row of mask is True then False
        (real tokens first); without a cache, attention then uses per-row key lengths
        and a causal mask rather than a [B, T, T] mask. A row with pads before real
        tokens gives wrong outputs under this promise.
      cache: optional KV cache from ``init_cache`` (S slots).
      cache_index: scalar int32, cache slot of tokens[:, 0] (default 0). A static 0 (a
        Python int, or None) means an empty cache: the prefill attends among its own
        tokens as without a cache (fused / chunked attention) and writes them at slot 0.
        Another static (Python int) index reads only the slots before it; a traced one
        reads all S slots, masking those at or after it. A static index must be >= 0 and
        leave room for the T tokens (index + T <= S; ValueError otherwise).
      head_columns: optional [B, K] int32 columns of tokens (no cache): the head runs only
        at those positions (each row its own), so the output has K positions instead of T
        and no [B, T, V] logits exist (PPO reads only its response columns).
    Returns:
      logits [B, T, V] float32 (head='lm') or values [B, T] float32 (head='scalar'), with K
      in place of T when head_columns is given; with a cache, the tuple (output, new_cache).
    """
    cfg = self.config
    if self.head not in ("lm", "scalar"):
      raise ValueError(f"Decoder.head={self.head!r}; expected 'lm' or 'scalar'")
    if head_columns is not None and cache is not None:
      raise ValueError("head_columns applies to whole sequences, not cached calls")
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    batch, length = tokens.shape
    if mask is None:
      mask = jnp.ones((batch, length), bool)
    mask = mask.astype(bool)

    # Cache slots this call reads: those before a static (Python int) index (a prefill
    # after a prefix, the continuation of a scored prompt), all S for a traced one (the
    # decode loop, which masks the rest). A prefill into an empty cache (static slot 0)
    # reads none: its layers attend among the new tokens as without a cache and only
    # return their keys.
    if cache is None:
      read = None
    elif isinstance(cache_index, (int, type(None))):
      read = cache_index or 0
      if read < 0:
        raise ValueError(f"cache_index={read} is negative; expected a cache slot >= 0")
      if read + length > cache["mask"].shape[1]:
        raise ValueError(f"cache_index={read} + {length} tokens do not fit the cache's "
                         f"{cache['mask'].shape[1]} slots")
    else:
      read = cache["mask"].shape[1]
    fresh = read == 0
    if cache is None or fresh:
      key_mask = mask                                          # [B, S=T]
      index = jnp.zeros((), jnp.int32)
      attn_mask = (jnp.sum(mask, axis=1, dtype=jnp.int32) if right_padded     # [B]
                   else mask)                                  # [B, T]: causal & real keys
      if fresh:
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, 0, axis=1)
    else:
      index = jnp.asarray(cache_index, jnp.int32)   # not None: None is fresh
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, index, axis=1)
      # Keys are the read cache slots written before this call (all precede every query)
      # followed by the T new tokens (causal among themselves).
      written = cache["mask"][:, :read] & (jnp.arange(read)[None, :] < index)   # [B, R]
      causal = jnp.tril(jnp.ones((length, length), bool))     # [T, T]
      attn_mask = jnp.concatenate(
          [jnp.broadcast_to(written[:, None, :], (batch, length, read)),
           causal[None] & mask[:, None, :]], axis=2)           # [B, T, R + T]
    # RoPE position of every slot = number of real tokens before it.
    slot_positions = jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1
    positions = jax.lax.dynamic_slice_in_dim(slot_positions, index, length, axis=1)
    positions = jnp.maximum(positions, 0)

    embed = embedding(cfg, "embed")
    x = embed(tokens.astype(jnp.int32))
    x = constrain(x, (axes.BATCH, axes.ACTIVATION_LENGTH if cache is None else axes.LENGTH,
                      axes.EMBED))

    # Remat only matters where gradients flow (no cache); on cached calls it would also
    # turn StackedLayerCache.layer into a traced value the Pallas decode kernel cannot take.
    block_cls = _block_class(cfg) if cache is None else DecoderBlock
    # The layers learn the cache dtype from the (possibly empty) slices.
    layer_caches = None if cache is None else (cache["k"][:, :, :read], cache["v"][:, :, :read])
    if cfg.scan_layers:
      # The cache is a read-only scanned input; the new keys / values come out stacked
      # as [L, B, T, K, Dh] and are written below with one update (in place in a loop).
      stack = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg, name="layers")
      x, new_kv = stack(x, positions, attn_mask, layer_caches)
    else:
      new_k, new_v = [], []
      # One token per row under decode_attention 'pallas': each block's kernel reads the
      # stacked cache in place instead of a slice XLA would copy out of it.
      whole = cache is not None and not fresh and length == 1 and cfg.decode_attention == "pallas"
      for i in range(cfg.n_layers):
        if cache is None:
          layer_cache = None
        elif whole:
          layer_cache = StackedLayerCache(layer_caches[0], layer_caches[1], i, index)
        else:
          layer_cache = (layer_caches[0][i], layer_caches[1][i])
        x, c = block_cls(cfg, name=f"layers_{i}")(x, positions, attn_mask, layer_cache)
        if c is not None:
          new_k.append(c[0])
          new_v.append(c[1])
      new_kv = None if cache is None else (jnp.stack(new_k), jnp.stack(new_v))

    if head_columns is not None:
      x = jnp.take_along_axis(x, head_columns.astype(jnp.int32)[..., None], axis=1)  # [B, K, D]
      x = constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
    x = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x)
    if self.head == "lm":
      if cfg.tie_embeddings:
        out = embed.attend(x)
      else:
        out = DenseND((cfg.d_model,), (cfg.vocab_size,), (axes.EMBED, axes.VOCAB),
                      dtype=dtype, param_dtype=pdtype, name="lm_head")(x)
      out = constrain(out.astype(jnp.float32), (axes.BATCH, axes.LENGTH, axes.VOCAB))
    else:
      out = DenseND((cfg.d_model,), (1,), (axes.EMBED, None), use_bias=True, dtype=jnp.float32,
                    param_dtype=pdtype, stddev=0.0, name="scalar_head")(x)[..., 0]
    if cache is None:
      return out
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, index, zero, zero)
    new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], new_kv[0], start),
                 "v": jax.lax.dynamic_update_slice(cache["v"], new_kv[1], start),
                 "mask": key_mask}
    return out, new_cache


def last_token_index(mask: Array) -> Array:
  """Index [B] of the last True entry of mask [B, T] (0 if none)."""
  length = mask.shape[1]
  idx = jnp.where(mask.astype(bool), jnp.arange(length)[None, :], -1)
  return jnp.maximum(jnp.max(idx, axis=1), 0)


def unstack_scanned_params(params: Any, n_layers: int) -> Any:
  """Converts params of a scanned decoder to the unrolled layout (layers_0, layers_1, ...)."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(n_layers):
    params[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  return params


def stack_unrolled_params(params: Any, n_layers: int) -> Any:
  """Inverse of ``unstack_scanned_params``."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
  params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return params

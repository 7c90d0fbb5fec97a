"""One decode step's attention in one GPU kernel (Pallas, Triton backend).

XLA compiles a decode step's grouped-query attention over the KV cache
(``layers.cached_attention``) into about nine kernels per layer on a GPU (scores, mask and
concatenation with the new token's score, max, sum, convert, mix, converts and transposes),
and copies each layer's cache slice out of the stacked [L, B, S, K, Dh] cache first: at
batch 32 that is about 200 of a tinyllama step's 460 kernels and 90 MB of copies per step
(``bench/decode_kernels.py``). ``decode_attention`` is the same attention for one new token
per row as a single kernel that reads the stacked cache in place: one program per (row, kv
head) runs a flash-attention pass (online softmax in float32) over the new token's key and
the cache slots before the step's slot, skipping the blocks after it.

Shapes: B = batch, H = query heads, K = kv heads, G = H / K, Dh = head width, L = layers,
S = cache slots.

It runs where Pallas' Triton backend does (CUDA GPUs), and everywhere else in Pallas'
interpret mode (slow; for tests on a CPU). ``ModelConfig.decode_attention`` selects it for
the sampler's unrolled decode loop (``sampler.decode_model``); see ``check_supported`` for
what it takes.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Cache slots per block of the kernel's loop (the scores of a block are [Gp, BLOCK_SLOTS]).
BLOCK_SLOTS = 64
# Triton's dot takes operands of at least 16 rows: the G query heads of a kv head are padded
# to at least this many rows (the padded rows are masked and never written).
_MIN_ROWS = 16


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def check_supported(head_dim: int) -> None:
  """Raises ValueError (one line) unless the kernel takes this head width: a power of two of
  at least 16 (Triton's block shapes). Any grouping of query heads is taken (the rows are
  padded to a power of two)."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"decode_attention='pallas' needs a head width that is a power of two "
                     f">= 16 (Triton blocks); this model's is {head_dim}")


def _kernel(index_ref, q_ref, k_cache_ref, v_cache_ref, k_new_ref, v_new_ref, mask_ref,
            o_ref, *, layer: int, groups: int, rows: int, scale: float, slots: int):
  """One program: row b = program_id(0), kv head h = program_id(1).

  index_ref [1] int32: the step's cache slot (the cache is read below it); q_ref [B, H, Dh];
  k/v_cache_ref [L, B, S, K, Dh] (layer `layer` read, its blocks converted to q's dtype);
  k/v_new_ref [B, K, Dh]; mask_ref [B, S + 1] int32 (nonzero: the query may attend that
  cache slot; the last column: the new token); o_ref [B, H, Dh], heads h * G .. h * G + G - 1
  written.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  b, h = pl.program_id(0), pl.program_id(1)
  layer = jnp.int32(layer)   # a traced index (interpret mode takes no Python int here)
  row_ok = jnp.arange(rows) < groups                                      # [Gp]
  heads = pl.ds(h * groups, rows)
  q = plgpu.load(q_ref.at[b, heads, :], mask=row_ok[:, None], other=0.0)  # [Gp, Dh]
  fill = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))

  # The new token first: its score starts the running max, its value the accumulator.
  k_new = k_new_ref[b, h, :].astype(jnp.float32)                          # [Dh]
  v_new = v_new_ref[b, h, :].astype(jnp.float32)
  s_new = jnp.sum(q.astype(jnp.float32) * k_new[None, :], axis=1) * scale  # [Gp]
  new_ok = mask_ref[b, slots] != 0
  m = jnp.where(new_ok, s_new, fill)
  l = jnp.ones((rows,), jnp.float32)
  acc = jnp.broadcast_to(v_new[None, :], q.shape).astype(jnp.float32)     # [Gp, Dh]

  def block(i, carry):
    m, l, acc = carry
    cols = i * BLOCK_SLOTS + jnp.arange(BLOCK_SLOTS)
    in_range = cols < slots
    span = pl.ds(i * BLOCK_SLOTS, BLOCK_SLOTS)
    k = plgpu.load(k_cache_ref.at[layer, b, span, h, :], mask=in_range[:, None],
                   other=0.0).astype(q.dtype)
    v = plgpu.load(v_cache_ref.at[layer, b, span, h, :], mask=in_range[:, None],
                   other=0.0).astype(q.dtype)
    seen = plgpu.load(mask_ref.at[b, span], mask=in_range, other=0)
    s = plgpu.dot(q, k.T, allow_tf32=False) * scale                       # [Gp, BLOCK] f32
    s = jnp.where(((seen != 0) & in_range)[None, :], s, fill)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    correction = jnp.exp(m - m_next)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=False)
    return m_next, l, acc

  # Slots at or after the step's slot are not written yet: their blocks are skipped.
  n_blocks = (jnp.minimum(index_ref[0], slots) + BLOCK_SLOTS - 1) // BLOCK_SLOTS
  m, l, acc = jax.lax.fori_loop(0, n_blocks, block, (m, l, acc))
  out = (acc / l[:, None]).astype(o_ref.dtype)
  plgpu.store(o_ref.at[b, heads, :], out, mask=row_ok[:, None])


def _pallas_call(interpret: bool, layer: int, scale: float, out_dtype: Any, index: Array,
                 q: Array, k_cache: Array, v_cache: Array, k: Array, v: Array,
                 mask: Array) -> Array:
  """The kernel over these operands' shapes: index [1] int32, q [B, H, Dh], caches
  [L, B, S, K, Dh], k, v [B, K, Dh], mask [B, S + 1] int32 -> [B, H, Dh] out_dtype."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  batch, heads, hd = q.shape
  kv_heads, slots = k.shape[1], k_cache.shape[2]
  groups = heads // kv_heads
  kernel = functools.partial(_kernel, layer=layer, groups=groups,
                             rows=max(_MIN_ROWS, _next_power_of_two(groups)), scale=scale,
                             slots=slots)
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads),
      out_shape=jax.ShapeDtypeStruct((batch, heads, hd), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="decode_attention",
  )(index, q, k_cache, v_cache, k, v, mask)


def decode_attention(q: Array, k_cache: Array, v_cache: Array, layer: int, k: Array,
                     v: Array, mask: Array, index: Optional[Array], scale: float,
                     interpret: Optional[bool] = None,
                     mesh_axes: Optional[Tuple[Any, Any]] = None) -> Array:
  """Attention of one new token per row over a stacked cache's layer and the new key.

  ``layers.cached_attention`` for T = 1 with the cache ``k_cache[layer]``, in one kernel.

  Args:
    q: [B, 1, H, Dh] queries (grouped by kv head: heads h * G .. h * G + G - 1 use kv head h).
    k_cache, v_cache: [L, B, S, K, Dh] the stacked cache as it was before this step (read
      in place, never written; a dtype other than q's is converted block by block).
    layer: (static) which layer's slots to read.
    k, v: [B, 1, K, Dh] the new token's key / value.
    mask: [B, 1, S + 1] bool, True where the query may attend cache slot s (first S
      columns) or the new token (last column).
    index: scalar int32, the step's cache slot; the mask must be False at and after it.
      Only the blocks of BLOCK_SLOTS slots that hold a slot before it are read; None: all.
    scale: logit multiplier.
    interpret: run in Pallas' interpret mode; None (default): on any platform but a CUDA
      GPU, decided where the program is lowered (``jax.lax.platform_dependent``).
    mesh_axes: None, or (batch axes, kv-head axes): the mesh axes (a PartitionSpec entry
      each: a name, a tuple of names or None) that split the rows and the kv heads of
      every operand under the current mesh (``jax.set_mesh``). The kernel then runs on
      each device's shard (``jax.shard_map``; each (row, kv head) is independent), where a
      custom call under XLA's partitioner would gather the whole cache to every device.
  Returns:
    [B, 1, H, Dh] in the dtype of v.
  """
  length, hd = q.shape[1], q.shape[3]
  slots = k_cache.shape[2]
  if length != 1:
    raise ValueError(f"decode_attention takes one new token per row; got {length}")
  check_supported(hd)
  operands = (jnp.full((1,), slots if index is None else index, jnp.int32), q[:, 0], k_cache,
              v_cache, k[:, 0].astype(v_cache.dtype), v[:, 0].astype(v_cache.dtype),
              mask[:, 0].astype(jnp.int32))

  def run(*operands):
    if interpret is None:
      # Decided where the program is lowered: Triton for a CUDA GPU, interpret elsewhere.
      return jax.lax.platform_dependent(
          *operands, cuda=functools.partial(_pallas_call, False, layer, float(scale), v.dtype),
          default=functools.partial(_pallas_call, True, layer, float(scale), v.dtype))
    return _pallas_call(interpret, layer, float(scale), v.dtype, *operands)

  if mesh_axes is not None:
    rows, kv = mesh_axes
    P = jax.sharding.PartitionSpec
    run = jax.shard_map(
        run, in_specs=(P(), P(rows, kv), P(None, rows, None, kv), P(None, rows, None, kv),
                       P(rows, kv), P(rows, kv), P(rows)),
        out_specs=P(rows, kv), check_vma=False)
  return run(*operands)[:, None]


def reference(q: Array, k_cache: Array, v_cache: Array, layer: int, k: Array, v: Array,
              mask: Array, scale: float) -> Array:
  """``decode_attention``'s result from ``jax.nn.dot_product_attention`` (for tests):
  [B, 1, H, Dh] float32."""
  keys = jnp.concatenate([k_cache[layer], k], axis=1).astype(jnp.float32)   # [B, S + 1, K, Dh]
  values = jnp.concatenate([v_cache[layer], v], axis=1).astype(jnp.float32)
  return jax.nn.dot_product_attention(q.astype(jnp.float32), keys, values,
                                      mask=mask[:, None], scale=scale)

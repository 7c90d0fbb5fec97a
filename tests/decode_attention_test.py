"""cai_jax.decode_attention: the Pallas decode-attention kernel, run in Pallas' interpret
mode on the CPU, against jax.nn.dot_product_attention and layers.cached_attention; its
lowering for a CUDA GPU (one Triton call, no interpret loops) without a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import decode_attention as da
from cai_jax import layers
from cai_jax.configs import ModelConfig


def _case(seed, layers_, batch, slots, kv_heads, groups, hd, index, dtype=jnp.float32):
  """Random inputs of one decode step: a stacked cache whose slots before `index` are
  visible by a random mask (left padding and holes), the new token visible in all but the
  last row; slots at and after `index` hold large values the kernel must not read."""
  rng = np.random.default_rng(seed)
  heads = kv_heads * groups
  kc = rng.normal(size=(layers_, batch, slots, kv_heads, hd))
  vc = rng.normal(size=(layers_, batch, slots, kv_heads, hd))
  kc[:, :, index:] = 1e4
  vc[:, :, index:] = -1e4
  mask = rng.random((batch, 1, slots + 1)) < 0.6
  mask[0, 0, :slots // 3] = False           # a left-padded row
  mask[:, :, index:slots] = False
  mask[:, :, slots] = True
  if batch > 1:
    mask[-1, 0, slots] = False              # a row whose new token is masked
    mask[-1, 0, 0] = True
  arrays = (rng.normal(size=(batch, 1, heads, hd)), kc, vc,
            rng.normal(size=(batch, 1, kv_heads, hd)), rng.normal(size=(batch, 1, kv_heads, hd)))
  q, kc, vc, k, v = (jnp.asarray(a, dtype) for a in arrays)
  return q, kc, vc, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("layers_,batch,slots,kv_heads,groups,hd,index,layer", [
    (2, 3, 20, 2, 3, 16, 13, 1),      # fewer slots than a block, SmolLM2-like grouping
    (3, 2, 130, 1, 8, 32, 130, 2),    # three blocks, the last partial; all slots written
    (1, 4, 64, 4, 1, 16, 40, 0),      # no grouping (multi-head)
    (2, 2, 70, 2, 17, 16, 65, 0),     # 17 query heads per kv head: 32 kernel rows
])
def test_matches_dot_product_attention(layers_, batch, slots, kv_heads, groups, hd, index,
                                       layer):
  q, kc, vc, k, v, mask = _case(0, layers_, batch, slots, kv_heads, groups, hd, index)
  scale = 1.0 / np.sqrt(hd)
  got = da.decode_attention(q, kc, vc, layer, k, v, mask, jnp.int32(index), scale)
  assert got.shape == q.shape and got.dtype == q.dtype
  want = da.reference(q, kc, vc, layer, k, v, mask, scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  # The einsum attention the decode loop runs otherwise, on the layer's slice.
  einsum = layers.cached_attention(q, kc[layer], vc[layer], k, v, mask, scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(einsum), atol=2e-5, rtol=2e-5)


def test_no_index_reads_every_slot():
  q, kc, vc, k, v, mask = _case(1, 1, 2, 140, 2, 2, 16, 140)
  want = da.decode_attention(q, kc, vc, 0, k, v, mask, jnp.int32(140), 0.25)
  got = da.decode_attention(q, kc, vc, 0, k, v, mask, None, 0.25)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A smaller index skips the blocks after its own: slots 64.. go unread although the mask
  # shows them, so the result differs.
  cut = da.decode_attention(q, kc, vc, 0, k, v, mask, jnp.int32(8), 0.25)
  assert not np.allclose(np.asarray(cut), np.asarray(want))


def test_bfloat16_within_rounding_of_float32():
  q, kc, vc, k, v, mask = _case(2, 2, 3, 50, 2, 4, 64, 45, dtype=jnp.bfloat16)
  got = da.decode_attention(q, kc, vc, 1, k, v, mask, jnp.int32(45), 0.125)
  assert got.dtype == jnp.bfloat16
  want = da.reference(q, kc, vc, 1, k, v, mask, 0.125)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2)


def test_unsupported_shapes_are_one_line_errors():
  with pytest.raises(ValueError, match="power of two >= 16.*80"):
    da.check_supported(80)
  with pytest.raises(ValueError, match="ModelConfig.decode_attention: .*power of two.* 8$"):
    ModelConfig(d_model=64, n_heads=8, decode_attention="pallas")
  with pytest.raises(ValueError, match="ModelConfig.decode_attention='triton'"):
    ModelConfig(decode_attention="triton")
  q, kc, vc, k, v, mask = _case(3, 1, 2, 16, 2, 2, 16, 8)
  with pytest.raises(ValueError, match="one new token per row; got 2"):
    da.decode_attention(jnp.concatenate([q, q], axis=1), kc, vc, 0, k, v, mask, None, 1.0)


def _lowered(platform):
  f32 = jnp.float32
  shapes = [((3, 1, 6, 16), f32), ((2, 3, 20, 2, 16), f32), ((2, 3, 20, 2, 16), f32),
            ((3, 1, 2, 16), f32), ((3, 1, 2, 16), f32), ((3, 1, 21), bool), ((), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  fn = jax.jit(lambda q, kc, vc, k, v, m, i: da.decode_attention(q, kc, vc, 1, k, v, m, i, 0.25))
  return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_lowers_to_one_triton_kernel_for_a_cuda_gpu():
  """Lowered for CUDA (no GPU needed): one Triton call, which reads the stacked cache as
  given (no per-layer slice), and none of interpret mode's loops; for the CPU: the
  interpreted kernel (loops, no Triton call)."""
  cuda, cpu = _lowered("cuda"), _lowered("cpu")
  assert cuda.count("__gpu$xla.gpu.triton") == 1
  assert "stablehlo.while" not in cuda and "stablehlo.slice" not in cuda
  assert "__gpu$xla.gpu.triton" not in cpu and "stablehlo.while" in cpu


def test_a_cache_in_another_dtype_than_the_queries():
  """A bfloat16 cache under float32 queries (``transformer.init_cache(dtype=...)``): the
  kernel lowers for a CUDA GPU (Triton's dot takes one element type), returns the dtype of
  v and matches ``layers.cached_attention`` on the cache read back in float32 (no bfloat16
  rounding of the scores or the output)."""
  q, kc, vc, k, v, mask = _case(4, 2, 3, 70, 2, 3, 16, 66)
  kc, vc = kc.astype(jnp.bfloat16), vc.astype(jnp.bfloat16)
  got = da.decode_attention(q, kc, vc, 1, k, v, mask, jnp.int32(66), 0.25)
  assert got.dtype == jnp.float32
  as_read = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (kc[1], vc[1], k, v)]
  want = layers.cached_attention(q, *as_read, mask, 0.25)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  f32, bf16 = jnp.float32, jnp.bfloat16
  shapes = [((3, 1, 6, 16), f32), ((2, 3, 20, 2, 16), bf16), ((2, 3, 20, 2, 16), bf16),
            ((3, 1, 2, 16), f32), ((3, 1, 2, 16), f32), ((3, 1, 21), bool), ((), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  fn = jax.jit(lambda q, kc, vc, k, v, m, i: da.decode_attention(q, kc, vc, 1, k, v, m, i, 0.25))
  lowered = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered.count("__gpu$xla.gpu.triton") == 1

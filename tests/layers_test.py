"""cai_jax.layers: the chunked causal attention against the dense mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import layers


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("length,chunk", [(13, 4), (16, 4), (7, 16)])
def test_chunked_causal_attention_equals_the_dense_mask(length, chunk, padding):
  """Query blocks against the keys up to each block's end give the dense causal & key mask
  result at every real query and the same gradients, for right-padded rows and left-padded
  ones (a prefill's prompts), grouped-query heads and a length that the block size does not
  divide included. (A left pad sees no key: either way it averages values uniformly, over
  its block's keys here and over all keys there; nothing reads it.)"""
  b, heads, kv_heads, hd = 3, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, length, h, hd))
             for i, h in enumerate((heads, kv_heads, kv_heads)))
  lengths = jnp.array([length, length - 3, 1], jnp.int32)
  cols = jnp.arange(length)[None]
  real = cols < lengths[:, None] if padding == "right" else cols >= length - lengths[:, None]
  dense_mask = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :]
  np.testing.assert_array_equal(layers.causal_key_mask(real), dense_mask)

  @jax.jit
  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=dense_mask[:, None], scale=0.3)

  @jax.jit
  def chunked(q, k, v):
    return layers.chunked_causal_attention(q, k, v, real, 0.3, chunk)

  at_real = real[..., None, None]
  np.testing.assert_allclose(jnp.where(at_real, chunked(q, k, v), 0),
                             jnp.where(at_real, dense(q, k, v), 0), atol=1e-6)
  weights = jax.random.normal(jax.random.PRNGKey(9), (b, length, heads, hd)) * real[..., None, None]
  grads = [jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * weights), argnums=(0, 1, 2)))(q, k, v)
           for f in (chunked, dense)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("slots,length,chunk", [(6, 13, 4), (0, 9, 4), (5, 7, 16)])
def test_chunked_cached_attention_equals_the_dense_cached_attention(slots, length, chunk):
  """Query blocks over the cache slots and the new keys up to each block's end give
  ``cached_attention``'s result at every query that sees a key, and its gradients: cache
  slots partly written (a row with none), new tokens left-padded, grouped-query heads, a
  length the block size does not divide."""
  b, heads, kv_heads, hd = 3, 4, 2, 8
  shapes = ((b, length, heads, hd), (b, slots, kv_heads, hd), (b, slots, kv_heads, hd),
            (b, length, kv_heads, hd), (b, length, kv_heads, hd))
  q, kc, vc, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in enumerate(shapes))
  written = jnp.arange(slots)[None] < jnp.array([slots, slots - 2, 0])[:, None]   # [B, S]
  real = jnp.arange(length)[None] >= jnp.array([0, 3, 1])[:, None]              # [B, T]
  causal = jnp.tril(jnp.ones((length, length), bool))
  mask = jnp.concatenate([jnp.broadcast_to(written[:, None], (b, length, slots)),
                          causal[None] & real[:, None]], axis=2)                 # [B, T, S + T]
  sees = mask.any(-1)[..., None, None]                                            # [B, T, 1, 1]

  @jax.jit
  def dense(*x):
    return layers.cached_attention(*x, mask, 0.3)

  @jax.jit
  def chunked(*x):
    return layers.chunked_cached_attention(*x, mask, 0.3, chunk)

  args = (q, kc, vc, k, v)
  np.testing.assert_allclose(jnp.where(sees, chunked(*args), 0),
                             jnp.where(sees, dense(*args), 0), atol=1e-6)
  weights = jax.random.normal(jax.random.PRNGKey(9), (b, length, heads, hd)) * sees
  grads = [jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * weights), argnums=(0, 1, 2, 3, 4)))(*args)
           for f in (chunked, dense)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("capable,impl,dtype,head_dim,want", [
    (True, None, "bfloat16", 64, "cudnn"),      # the default on a CUDA GPU in 16-bit
    (True, None, "float16", 128, "cudnn"),
    (True, None, "float32", 64, None),          # cuDNN's flash kernel takes 16-bit only
    (True, None, "bfloat16", 256, None),        # wider heads than every GPU's kernel takes
    (True, None, "bfloat16", 36, None),         # not a multiple of 8
    (True, "xla", "bfloat16", 64, None),        # an explicit choice wins
    (False, None, "bfloat16", 64, None),        # a CPU, ROCm, or a GPU before Ampere
    (False, "cudnn", "float32", 64, "cudnn"),   # explicit: jax's own error if unsupported
])
def test_fused_causal_impl_picks_cudnn_only_where_its_kernel_applies(
    monkeypatch, capable, impl, dtype, head_dim, want):
  from cai_jax.configs import ModelConfig
  monkeypatch.setattr(layers, "cudnn_capable", lambda: capable)
  cfg = ModelConfig(d_model=4 * head_dim, n_heads=4, n_kv_heads=2, dtype=dtype,
                    attention_impl=impl)
  assert layers.fused_causal_impl(cfg) == want


def test_cudnn_capable_is_false_on_the_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU backend")
  assert not layers.cudnn_capable()

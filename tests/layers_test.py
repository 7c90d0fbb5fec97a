"""cai_jax.layers: the chunked causal attention against the dense mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import layers


@pytest.mark.parametrize("length,chunk", [(13, 4), (16, 4), (7, 16)])
def test_chunked_causal_attention_equals_the_dense_mask(length, chunk):
  """Query blocks against the keys up to each block's end give the dense causal + key-length
  result at every real query (pad rows included) and the same gradients, grouped-query
  heads and a length that the block size does not divide included."""
  b, heads, kv_heads, hd = 3, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, length, h, hd))
             for i, h in enumerate((heads, kv_heads, kv_heads)))
  lengths = jnp.array([length, length - 3, 1], jnp.int32)
  real = jnp.arange(length)[None] < lengths[:, None]
  dense_mask = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :]

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=dense_mask[:, None], scale=0.3)

  def chunked(q, k, v):
    return layers.chunked_causal_attention(q, k, v, lengths, 0.3, chunk)

  np.testing.assert_allclose(chunked(q, k, v), dense(q, k, v), atol=1e-6)
  weights = jax.random.normal(jax.random.PRNGKey(9), (b, length, heads, hd)) * real[..., None, None]
  grads = [jax.grad(lambda *x: jnp.sum(f(*x) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (chunked, dense)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-5)

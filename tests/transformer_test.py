"""Decoder behaviour: causality, padding invariance, scan == unrolled, heads, KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import layers, models, transformer
from cai_jax.configs import ModelConfig

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def params():
  return models.init(CFG, jax.random.PRNGKey(0))


# The forward pass and the cached decoder calls run jitted, as the sampler and the training
# steps run them (eager dispatch of every op is several times slower on the CPU).
logits = jax.jit(models.logits, static_argnums=1, static_argnames="right_padded")


def decoder(cfg):
  """models.module(cfg).apply, jitted: a Python int cache_index is static (as in a prefill),
  an array one traced (as in the sampler's decode loop)."""
  apply = models.module(cfg).apply
  static, traced = jax.jit(apply, static_argnames="cache_index"), jax.jit(apply)

  def call(variables, *args, cache_index=None, **kwargs):
    fn = static if cache_index is None or isinstance(cache_index, int) else traced
    return fn(variables, *args, cache_index=cache_index, **kwargs)
  return call


def _tokens(batch, length, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CFG.vocab_size)


def test_changing_a_later_token_never_changes_earlier_logits(params):
  tokens = _tokens(2, 12)
  base = logits(params, CFG, tokens)
  for t in (3, 7, 11):
    changed = tokens.at[:, t].set((tokens[:, t] + 5) % CFG.vocab_size)
    out = logits(params, CFG, changed)
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
    assert np.abs(np.asarray(out[:, t:] - base[:, t:])).max() > 1e-4  # the change is seen


def test_padding_left_or_right_does_not_change_real_token_logits(params):
  tokens = _tokens(1, 9)
  ref = logits(params, CFG, tokens)[0]
  pad = jnp.full((1, 4), 5, jnp.int32)
  right = jnp.concatenate([tokens, pad], 1)
  right_mask = jnp.arange(13)[None] < 9
  left = jnp.concatenate([pad, tokens], 1)
  left_mask = jnp.arange(13)[None] >= 4
  np.testing.assert_allclose(logits(params, CFG, right, right_mask)[0, :9], ref, atol=1e-5)
  np.testing.assert_allclose(logits(params, CFG, left, left_mask)[0, 4:], ref, atol=1e-5)
  # Pads in the middle (a cache gap) are invisible too.
  mid = jnp.concatenate([tokens[:, :5], pad, tokens[:, 5:]], 1)
  mid_mask = jnp.ones((1, 13), bool).at[:, 5:9].set(False)
  out = logits(params, CFG, mid, mid_mask)[0]
  np.testing.assert_allclose(jnp.concatenate([out[:5], out[9:]]), ref, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_right_padded_lengths_path_equals_the_dense_mask(params, scan_layers):
  """right_padded=True (causal + per-row key lengths, the fused-kernel path) gives the
  dense [B, T, T] mask's logits at every position, pads included, and the same gradients."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  p = params if scan_layers else transformer.unstack_scanned_params(params, CFG.n_layers)
  tokens = _tokens(4, 11)
  mask = jnp.arange(11)[None] < jnp.array([11, 7, 1, 4])[:, None]
  dense = logits(p, cfg, tokens, mask)
  lengths = logits(p, cfg, tokens, mask, right_padded=True)
  np.testing.assert_allclose(lengths, dense, atol=1e-5)
  scalar = models.init(dataclasses.replace(cfg, scan_layers=True), jax.random.PRNGKey(3), "scalar")
  kernel = scalar["scalar_head"]["kernel"]   # initialised to zero: make the score depend on x
  scalar["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4), kernel.shape)
  if not scan_layers:
    scalar = transformer.unstack_scanned_params(scalar, CFG.n_layers)
  np.testing.assert_allclose(models.score(scalar, cfg, tokens, mask, right_padded=True),
                             models.score(scalar, cfg, tokens, mask), atol=1e-5)

  def loss(q, right_padded):
    out = logits(q, cfg, tokens, mask, right_padded=right_padded)
    return jnp.sum(jnp.where(mask[..., None], jnp.tanh(out), 0.0))

  for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss)(p, True)),
                  jax.tree_util.tree_leaves(jax.grad(loss)(p, False))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_right_padded_rows_longer_than_a_chunk_equal_the_dense_mask(params):
  """On the CPU backend, right-padded rows longer than layers.CAUSAL_CHUNK take the chunked
  causal attention (attention_impl None): the same logits as the dense mask."""
  from cai_jax import layers
  length = 2 * layers.CAUSAL_CHUNK + 9
  tokens = _tokens(2, length)
  mask = jnp.arange(length)[None] < jnp.array([length, layers.CAUSAL_CHUNK + 2])[:, None]
  np.testing.assert_allclose(logits(params, CFG, tokens, mask, right_padded=True),
                             logits(params, CFG, tokens, mask), atol=2e-5)


def test_causal_key_lengths_attention_equals_the_dense_mask():
  """What the cuDNN branch of layers.Attention relies on: jax.nn.dot_product_attention
  with is_causal and key_value_seq_lengths (here XLA's implementation of the same
  semantics) equals the decoder's dense mask for right-padded rows, pad rows included."""
  b, t, heads, kv_heads, hd = 3, 7, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, h, hd))
             for i, h in enumerate((heads, kv_heads, kv_heads)))
  lengths = jnp.array([7, 4, 1], jnp.int32)
  real = jnp.arange(t)[None] < lengths[:, None]
  dense = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
  want = jax.nn.dot_product_attention(q, k, v, mask=dense[:, None], implementation="xla")
  got = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                     implementation="xla")
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_scanned_and_unrolled_layers_agree(params):
  unrolled_cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = transformer.unstack_scanned_params(params, CFG.n_layers)
  fresh = models.init(unrolled_cfg, jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(unrolled)
  tokens = _tokens(2, 10)
  np.testing.assert_allclose(logits(unrolled, unrolled_cfg, tokens),
                             logits(params, CFG, tokens), atol=1e-5)
  restacked = transformer.stack_unrolled_params(unrolled, CFG.n_layers)
  assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.array_equal(a, b)), restacked, params)))


@pytest.mark.parametrize("policy", ["full", "dots", "save_attention_out"])
def test_remat_does_not_change_gradients(params, policy):
  tokens = _tokens(2, 8)
  def loss(p, cfg):
    return jnp.sum(models.token_logprobs(p, cfg, tokens))
  g0 = jax.grad(loss)(params, CFG)
  g1 = jax.grad(loss)(params, dataclasses.replace(CFG, remat_policy=policy))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_reference_forward_in_numpy(params):
  """An independent NumPy implementation of the same architecture gives the same logits."""
  tokens = np.asarray(_tokens(1, 6))[0]
  p = jax.tree_util.tree_map(np.asarray, params)
  hd = CFG.dim_per_head

  def rms(x, s):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.norm_eps) * s

  def rope(x, pos):  # x [T, N, hd]
    inv = 1.0 / (CFG.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = pos[:, None] * inv[None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

  x = p["embed"]["embedding"][tokens]
  T = len(tokens)
  pos = np.arange(T, dtype=np.float64)
  L = p["layers"]
  for i in range(CFG.n_layers):
    h = rms(x, L["attn_norm"]["scale"][i])
    q = rope(np.einsum("td,dnh->tnh", h, L["attn"]["q_proj"]["kernel"][i]), pos)
    k = rope(np.einsum("td,dnh->tnh", h, L["attn"]["k_proj"]["kernel"][i]), pos)
    v = np.einsum("td,dnh->tnh", h, L["attn"]["v_proj"]["kernel"][i])
    rep = CFG.n_heads // CFG.n_kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", a, v)
    x = x + np.einsum("tnh,nhd->td", o, L["attn"]["o_proj"]["kernel"][i])
    h = rms(x, L["mlp_norm"]["scale"][i])
    g = h @ L["mlp"]["gate_proj"]["kernel"][i]
    u = h @ L["mlp"]["up_proj"]["kernel"][i]
    x = x + (g / (1 + np.exp(-g)) * u) @ L["mlp"]["down_proj"]["kernel"][i]
  x = rms(x, p["final_norm"]["scale"])
  ref = x @ p["lm_head"]["kernel"]
  np.testing.assert_allclose(logits(params, CFG, tokens[None])[0], ref, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_and_qkv_bias_shapes():
  cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=True)
  p = models.init(cfg, jax.random.PRNGKey(0))
  assert "lm_head" not in p
  assert p["layers"]["attn"]["q_proj"]["bias"].shape == (3, 4, 8)
  assert models.count_params(cfg) == cfg.param_count()
  out = logits(p, cfg, _tokens(1, 4))
  assert out.shape == (1, 4, 97)


def test_llama3_rope_scaling_changes_only_low_frequencies():
  from cai_jax.layers import rope_inv_freq
  base = ModelConfig(d_model=512, n_heads=4, n_kv_heads=4, rope_theta=500000.0)
  scaled = dataclasses.replace(base, rope_scaling_factor=8.0, rope_original_max_len=8192)
  f0, f1 = np.asarray(rope_inv_freq(base)), np.asarray(rope_inv_freq(scaled))
  wavelen = 2 * np.pi / f0
  high = wavelen < 8192 / 4.0
  low = wavelen > 8192 / 1.0
  np.testing.assert_allclose(f1[high], f0[high])
  np.testing.assert_allclose(f1[low], f0[low] / 8.0, rtol=1e-6)
  assert high.any() and low.any()


def test_scalar_head_reads_last_real_token():
  p = models.init(CFG, jax.random.PRNGKey(0), head="scalar")
  p = jax.tree_util.tree_map(lambda x: x, p)
  p["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), p["scalar_head"]["kernel"].shape)
  tokens = _tokens(2, 8)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], bool)
  vals = models.values(p, CFG, tokens, mask)
  s = models.score(p, CFG, tokens, mask)
  np.testing.assert_allclose(s, jnp.stack([vals[0, 7], vals[1, 4]]), atol=1e-6)
  # Right padding does not change the score.
  np.testing.assert_allclose(models.score(p, CFG, tokens[1:, :5])[0], s[1], atol=1e-5)


def test_head_columns_equal_the_full_output_at_those_columns(params):
  """columns= runs the head at K chosen positions per row: the same numbers as the full
  [B, T, ...] output gathered there, for both heads; and it refuses a cached call."""
  tokens = _tokens(3, 9)
  mask = jnp.arange(9)[None] < jnp.array([9, 6, 2])[:, None]
  cols = jnp.array([[0, 8, 3], [5, 1, 1], [1, 0, 7]], jnp.int32)
  full = logits(params, CFG, tokens, mask, right_padded=True)
  got = logits(params, CFG, tokens, mask, right_padded=True, columns=cols)
  assert got.shape == (3, 3, CFG.vocab_size)
  np.testing.assert_allclose(got, jnp.take_along_axis(full, cols[..., None], axis=1), atol=1e-6)
  scalar = models.init(CFG, jax.random.PRNGKey(3), "scalar")
  scalar["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4),
                                                      scalar["scalar_head"]["kernel"].shape)
  values = models.values(scalar, CFG, tokens, mask)
  np.testing.assert_allclose(models.values(scalar, CFG, tokens, mask, columns=cols),
                             jnp.take_along_axis(values, cols, axis=1), atol=1e-6)
  cache = transformer.init_cache(CFG, 3, 9)
  with pytest.raises(ValueError, match="head_columns"):
    models.module(CFG).apply({"params": params}, tokens, mask, cache=cache, head_columns=cols)


def test_kv_cache_decode_matches_full_forward(params):
  tokens = _tokens(2, 10)
  mask = jnp.ones((2, 10), bool).at[0, :3].set(False)  # row 0 left padded
  full = logits(params, CFG, tokens, mask)
  cache = transformer.init_cache(CFG, 2, 16)
  dec = decoder(CFG)
  out, cache = dec({"params": params}, tokens[:, :6], mask[:, :6], cache=cache, cache_index=0)
  np.testing.assert_allclose(out[0, 3:], full[0, 3:6], atol=1e-5)
  np.testing.assert_allclose(out[1], full[1, :6], atol=1e-5)
  for t in range(6, 10):
    out, cache = dec({"params": params}, tokens[:, t:t + 1], mask[:, t:t + 1],
                           cache=cache, cache_index=t)
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("scan_layers,traced", [(True, False), (False, False), (True, True)])
def test_kv_cache_chunks_at_nonzero_index_match_full_forward(params, scan_layers, traced):
  """Prefill 5 columns, then a 3-column chunk, then single tokens; left pads and a gap. A
  static (Python int) index reads only the slots before it, a traced one all of them."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  p = params if scan_layers else transformer.unstack_scanned_params(params, CFG.n_layers)
  tokens = _tokens(3, 11, seed=4)
  mask = jnp.ones((3, 11), bool)
  mask = mask.at[0, :3].set(False)              # left padding reaching into the chunk
  mask = mask.at[1, 5:7].set(False)             # a gap between a prefix and a suffix
  mask = mask.at[2, :6].set(False)              # the first call holds only pads
  full = logits(p, cfg, tokens, mask)
  dec = decoder(cfg)
  cache = transformer.init_cache(cfg, 3, 12)
  for start, stop in ((0, 5), (5, 8), (8, 9), (9, 10), (10, 11)):
    out, cache = dec({"params": p}, tokens[:, start:stop], mask[:, start:stop],
                           cache=cache, cache_index=jnp.int32(start) if traced else start)
    assert np.all(np.isfinite(np.asarray(out))), (start, stop)
    real = np.asarray(mask[:, start:stop])
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(full[:, start:stop])[real],
                               atol=1e-5, err_msg=f"columns [{start}, {stop})")
  np.testing.assert_array_equal(cache["mask"][:, :11], mask)
  assert not cache["mask"][:, 11:].any()


@pytest.mark.parametrize("traced", [False, True])
def test_long_chunks_after_cached_ones_match_full_forward(params, traced):
  """Chunks longer than layers.CAUSAL_CHUNK at a nonzero index (a prompt's rest after a
  prefix: the chunked cached attention on the CPU) give the full forward pass's logits, with
  left pads in the second chunk."""
  width = 2 * layers.CAUSAL_CHUNK + 40
  tokens = _tokens(2, width, seed=11)
  mask = jnp.ones((2, width), bool).at[1, 70:75].set(False)
  full = logits(params, CFG, tokens, mask)
  dec = decoder(CFG)
  cache = transformer.init_cache(CFG, 2, width + 8)
  for start, stop in ((0, 70), (70, width)):
    out, cache = dec({"params": params}, tokens[:, start:stop], mask[:, start:stop],
                           cache=cache, cache_index=jnp.int32(start) if traced else start)
    real = np.asarray(mask[:, start:stop])
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(full[:, start:stop])[real],
                               atol=2e-5, err_msg=f"columns [{start}, {stop})")


def test_a_static_cache_index_past_the_cache_is_refused(params):
  """A Python-int cache_index whose T tokens do not fit the S slots, or a negative one, is a
  one-line ValueError (dynamic_update_slice would silently move the write back and overwrite
  earlier slots; a negative index reads the wrong slots, or none)."""
  tokens = _tokens(1, 10, seed=5)
  dec = models.module(CFG)
  _, cache = dec.apply({"params": params}, tokens[:, :6], cache=transformer.init_cache(CFG, 1, 8),
                       cache_index=0)
  with pytest.raises(ValueError, match=r"cache_index=6 \+ 4 tokens.*8 slots"):
    dec.apply({"params": params}, tokens[:, 6:], cache=cache, cache_index=6)
  with pytest.raises(ValueError, match=r"cache_index=0 \+ 10 tokens.*8 slots"):
    dec.apply({"params": params}, tokens, cache=transformer.init_cache(CFG, 1, 8), cache_index=0)
  with pytest.raises(ValueError, match=r"^cache_index=-1 is negative"):
    dec.apply({"params": params}, tokens[:, 6:8], cache=cache, cache_index=-1)
  with pytest.raises(ValueError, match=r"^cache_index=-8 is negative"):   # read no slot: silent
    dec.apply({"params": params}, tokens[:, 6:8], cache=cache, cache_index=-8)
  out, _ = dec.apply({"params": params}, tokens[:, 6:8], cache=cache, cache_index=6)   # fits
  np.testing.assert_allclose(out, logits(params, CFG, tokens[:, :8])[:, 6:8], atol=1e-5)


def test_kv_cache_writes_only_new_slots(params):
  """A call writes its T columns' keys / values at cache_index and leaves other slots alone."""
  tokens = _tokens(2, 9, seed=6)
  cache = transformer.init_cache(CFG, 2, 9)
  cache = {k: v + 7.0 if k != "mask" else v for k, v in cache.items()}   # recognisable filler
  dec = decoder(CFG)
  _, full_cache = dec({"params": params}, tokens, cache=transformer.init_cache(CFG, 2, 9),
                            cache_index=0)
  _, c1 = dec({"params": params}, tokens[:, :4], cache=cache, cache_index=0)
  _, c2 = dec({"params": params}, tokens[:, 4:7], cache=c1, cache_index=4)
  for name in ("k", "v"):
    assert c2[name].shape == (CFG.n_layers, 2, 9, CFG.n_kv_heads, CFG.dim_per_head)
    np.testing.assert_allclose(c2[name][:, :, :7], full_cache[name][:, :, :7], atol=1e-5)
    np.testing.assert_array_equal(c2[name][:, :, 7:], 7.0)
  np.testing.assert_array_equal(c2["mask"], jnp.arange(9)[None].repeat(2, 0) < 7)


def test_kv_cache_in_a_lower_precision_dtype(params):
  """A bfloat16 cache holds the keys / values rounded, and decoding reads them back."""
  tokens = _tokens(1, 6, seed=8)
  full = logits(params, CFG, tokens)
  dec = decoder(CFG)
  cache = transformer.init_cache(CFG, 1, 6, dtype=jnp.bfloat16)
  out, cache = dec({"params": params}, tokens[:, :4], cache=cache, cache_index=0)
  assert cache["k"].dtype == jnp.bfloat16 and cache["v"].dtype == jnp.bfloat16
  for t in (4, 5):
    out, cache = dec({"params": params}, tokens[:, t:t + 1], cache=cache, cache_index=t)
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=5e-2)

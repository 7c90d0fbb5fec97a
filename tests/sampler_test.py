"""Tests of cai_jax.sampler against independent full-forward computations."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import layers, models, sampler, sharding
from cai_jax.configs import MeshConfig, ModelConfig
from cai_jax.transformer import init_cache

CFG = ModelConfig()                       # vocab 320, d_model 64, 2 layers, max_seq_len 512
N_NEW = 8
BUCKET = 16
GREEDY = sampler.SamplingParams(temperature=0.0, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def params():
  return models.init(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (3, 11, 1, 7, 16)]


@functools.lru_cache(maxsize=None)
def _full_logits_fn(config):
  return jax.jit(lambda p, t, m: models.logits(p, config, t, m))


def _full_logits(params, seqs, length, config=CFG):
  """Full forward passes (no cache) on right-padded seqs: [len(seqs), length, V] numpy."""
  tokens = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    mask[r, :len(s)] = True
  return np.asarray(_full_logits_fn(config)(params, tokens, mask))


def _generate(params, prompts, sp=GREEDY, batch_size=4, config=CFG, **kw):
  return sampler.generate(params, config, prompts, sp, batch_size=batch_size, progress=False,
                          bucket=BUCKET, **kw)


@pytest.mark.parametrize("lens,plen", [([2, 9, 16], 16), ([3, 70, 150], 150)])
def test_cached_decoding_matches_full_forward(params, lens, plen):
  """Prefill into an empty cache, then decode steps, give the full forward pass's logits;
  prompts longer than layers.CAUSAL_CHUNK take the chunked attention on the CPU."""
  rng = np.random.default_rng(1)
  seqs = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in lens]
  forced = rng.integers(1, CFG.vocab_size, size=(len(lens), 6)).astype(np.int32)
  tokens = np.zeros((3, plen), np.int32)
  mask = np.zeros((3, plen), bool)
  for r, s in enumerate(seqs):
    tokens[r, plen - len(s):] = s
    mask[r, plen - len(s):] = True
  full_seqs = [s + list(forced[r]) for r, s in enumerate(seqs)]
  ref = _full_logits(params, full_seqs, plen + forced.shape[1])

  prefill = jax.jit(lambda p, t, m, c: sampler.prefill(p, CFG, t, m, c))
  step = jax.jit(lambda p, c, t, i: sampler.decode_step(p, CFG, c, t, i))
  cache = init_cache(CFG, 3, plen + forced.shape[1])
  logits, cache = prefill(params, tokens, mask, cache)
  for t in range(forced.shape[1] + 1):
    want = np.stack([ref[r, lens[r] - 1 + t] for r in range(3)])
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0, err_msg=f"step {t}")
    if t < forced.shape[1]:
      logits, cache = step(params, cache, jnp.asarray(forced[:, t]), plen + t)


def test_generation_under_cudnn_attention_never_calls_cudnn(params, prompts):
  """attention_impl='cudnn' takes cuDNN's fused kernel for right-padded rows only: the
  sampler's left-padded prefill goes through XLA and its decode steps through the cache
  einsum, so on this CPU (no cuDNN) generation runs and equals the default's."""
  cudnn = dataclasses.replace(CFG, attention_impl="cudnn")
  base = _generate(params, prompts)
  res = _generate(params, prompts, config=cudnn)
  for r in range(len(prompts)):
    np.testing.assert_array_equal(res.tokens[r], base.tokens[r])
    np.testing.assert_allclose(res.logprobs[r], base.logprobs[r], atol=1e-5)


def test_greedy_matches_argmax_of_full_forward(params, prompts):
  res = _generate(params, prompts)
  seqs = [list(p) for p in prompts]
  for t in range(N_NEW):
    lg = _full_logits(params, seqs, 16 + N_NEW)
    for r, s in enumerate(seqs):
      s.append(int(np.argmax(lg[r, len(s) - 1])))
  for r, p in enumerate(prompts):
    np.testing.assert_array_equal(res.tokens[r], seqs[r][len(p):])
    assert res.finish_reasons[r] == "length"
    np.testing.assert_array_equal(res.sampling_logprobs[r], 0.0)
  np.testing.assert_array_equal(res.lengths, N_NEW)
  np.testing.assert_array_equal(res.prompt_lengths, [len(p) for p in prompts])
  assert res.stats["batches"] == 2 and res.stats["finish_length"] == len(prompts)


# --- sampling distribution on a tiny vocabulary ------------------------------------------

SMALL = ModelConfig(vocab_size=8)
SMALL_PROMPT = [1, 2, 3]
N_SAMPLES = 4000
CHI2_999_7DOF = 24.32            # 99.9% quantile of chi-square with 7 degrees of freedom


@pytest.fixture(scope="module")
def small():
  p = models.init(SMALL, jax.random.PRNGKey(1))
  p = dict(p, lm_head={"kernel": p["lm_head"]["kernel"] * 0.7})   # no near-zero probabilities
  logits = _full_logits(p, [SMALL_PROMPT], 3, SMALL)[0, -1].astype(np.float64)
  return p, logits


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _chi2(counts, probs):
  support = probs > 0
  expected = probs * counts.sum()
  assert counts[~support].sum() == 0, f"samples outside the support: {counts}"
  return float(np.sum((counts[support] - expected[support]) ** 2 / expected[support]))


def _sample_first(params, sp):
  res = sampler.generate(params, SMALL, [SMALL_PROMPT] * N_SAMPLES, sp, batch_size=N_SAMPLES,
                         progress=False, bucket=BUCKET)
  toks = np.array([t[0] for t in res.tokens])
  return (np.bincount(toks, minlength=8), toks, np.array([l[0] for l in res.logprobs]),
          np.array([l[0] for l in res.sampling_logprobs]))


def _check_logprobs(toks, raw, samp, logits, probs):
  np.testing.assert_allclose(raw, (logits - np.log(np.exp(logits).sum()))[toks], atol=1e-5)
  np.testing.assert_allclose(samp, np.log(probs[toks]), atol=1e-5)


def test_sampling_frequencies_follow_tempered_softmax(small):
  params, logits = small
  temp = 0.6
  counts, toks, raw, samp = _sample_first(
      params, sampler.SamplingParams(temperature=temp, max_new_tokens=1, seed=3))
  probs = _softmax(logits / temp)
  wrong = _softmax(logits)           # temperature ignored
  assert _chi2(counts, probs) < CHI2_999_7DOF
  assert np.sum((counts - wrong * N_SAMPLES) ** 2 / (wrong * N_SAMPLES)) > 10 * CHI2_999_7DOF
  _check_logprobs(toks, raw, samp, logits, probs)


def test_top_k_restricts_support(small):
  params, logits = small
  counts, toks, raw, samp = _sample_first(
      params, sampler.SamplingParams(temperature=1.0, top_k=3, max_new_tokens=1, seed=4))
  top = np.argsort(-logits)[:3]
  probs = np.zeros(8)
  probs[top] = _softmax(logits[top])
  assert set(np.nonzero(counts)[0]) == set(top)
  assert _chi2(counts, probs) < CHI2_999_7DOF
  _check_logprobs(toks, raw, samp, logits, probs)


def test_top_p_keeps_smallest_set_reaching_p(small):
  params, logits = small
  temp = 0.8
  full = _softmax(logits / temp)
  order = np.argsort(-full)
  cum = np.cumsum(full[order])
  assert full[order[2]] > 0.05 and cum[2] < 0.97   # the cut below is well defined
  top_p = cum[2] - 0.02                             # needs the 3rd token to reach top_p
  counts, toks, raw, samp = _sample_first(
      params, sampler.SamplingParams(temperature=temp, top_p=top_p, max_new_tokens=1, seed=5))
  keep = order[:3]
  probs = np.zeros(8)
  probs[keep] = full[keep] / full[keep].sum()
  assert set(np.nonzero(counts)[0]) == set(keep)
  assert _chi2(counts, probs) < CHI2_999_7DOF
  _check_logprobs(toks, raw, samp, logits, probs)


TIED = [3.0, 1.0, 2.0, 2.0, 0.0, 2.0, 2.5, -1.0]   # three tokens tie at the 3rd largest
SPREAD = [2.0, 0.3, 1.2, -0.5, 0.8, -1.0, 1.6, 0.0]


def _hf_filtered_probs(logits, temperature, top_k, top_p):
  """softmax of transformers' Temperature -> TopK -> TopP warpers (its generate order)."""
  torch = pytest.importorskip("torch")
  lp = pytest.importorskip("transformers.generation.logits_process")
  x = lp.TemperatureLogitsWarper(temperature)(None, torch.tensor([logits], dtype=torch.float32))
  if top_k:
    x = lp.TopKLogitsWarper(top_k)(None, x)
  if top_p < 1.0:
    x = lp.TopPLogitsWarper(top_p)(None, x)
  return torch.softmax(x, -1)[0].double().numpy()


@pytest.mark.parametrize("logits,temperature,top_k,top_p,support", [
    (TIED, 1.0, 3, 1.0, {0, 2, 3, 5, 6}),     # ties at the k-th logit all stay
    (TIED, 1.0, 3, 0.95, {0, 2, 3, 5, 6}),
    (SPREAD, 0.8, 4, 0.85, {0, 2, 6}),        # top-p on the top-k renormalized probs
])
def test_filters_match_transformers_warpers(logits, temperature, top_k, top_p, support):
  probs = _hf_filtered_probs(logits, temperature, top_k, top_p)
  assert set(np.nonzero(probs)[0]) == support
  n = 4000
  keys = jax.random.split(jax.random.key(11), n)
  tok, raw, samp = sampler.sample_logits(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)),
                                         keys, temperature, top_k, top_p)
  tok = np.asarray(tok)
  counts = np.bincount(tok, minlength=len(logits))
  assert set(np.nonzero(counts)[0]) == support
  assert _chi2(counts, probs) < CHI2_999_7DOF
  x = np.asarray(logits, np.float64)
  _check_logprobs(tok, raw, samp, x, probs)


def test_sample_logits_greedy_and_filters_direct():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.9, 0.0]])
  keys = jax.random.split(jax.random.key(0), 2)
  tok, raw, samp = sampler.sample_logits(logits, keys, 0.0)
  np.testing.assert_array_equal(tok, [1, 0])
  np.testing.assert_allclose(raw, jax.nn.log_softmax(logits)[jnp.arange(2), tok], atol=1e-6)
  np.testing.assert_array_equal(samp, 0.0)
  # top_k=1 at any temperature is greedy; tiny top_p keeps only the argmax.
  for kw in ({"top_k": 1}, {"top_p": 1e-3}):
    tok, _, samp = sampler.sample_logits(logits, keys, 5.0, **kw)
    np.testing.assert_array_equal(tok, [1, 0])
    np.testing.assert_allclose(samp, 0.0, atol=1e-6)


# --- prefix reuse, determinism, stopping ------------------------------------------------

T1 = sampler.SamplingParams(temperature=1.0, max_new_tokens=N_NEW, seed=7)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=1e-7), r"^feedback.temperature must be 0 \(greedy\) or in \[1e-06, inf\)"),
    (dict(top_p=0.0), r"^feedback.top_p must be in \(0, 1\], got 0.0$"),
    (dict(top_k=1.5), r"^feedback.top_k must be an integer >= 0, got 1.5$"),
    (dict(max_new_tokens=2.5), r"^feedback.max_new_tokens must be an integer >= 1, got 2.5$"),
    (dict(seed=True), r"^feedback.seed must be an integer in \[0, 2\*\*32\), got True$"),
    (dict(seed=2**32), r"^feedback.seed must be an integer in \[0, 2\*\*32\), got 4294967296$"),
    (dict(temperature="1"), r"^feedback.temperature must be a number, got '1'$"),
])
def test_check_sampling_names_the_callers_setting(settings, message):
  with pytest.raises(ValueError, match=message):
    sampler.check_sampling("feedback", **settings)
  assert sampler.check_sampling("feedback", top_k=np.int64(3), seed=np.uint32(5)).top_k == 3


def test_shared_prefix_equals_plain_path(params):
  rng = np.random.default_rng(2)
  prefix = [int(t) for t in rng.integers(1, CFG.vocab_size, size=5)]
  suffixes = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (4, 1, 9, 0, 6)]
  plain = _generate(params, [prefix + s for s in suffixes], T1)
  shared = _generate(params, suffixes, T1, prefix=prefix)
  for r in range(len(suffixes)):
    np.testing.assert_array_equal(shared.tokens[r], plain.tokens[r])
    np.testing.assert_allclose(shared.logprobs[r], plain.logprobs[r], atol=1e-5)
    np.testing.assert_allclose(shared.sampling_logprobs[r], plain.sampling_logprobs[r], atol=1e-5)
  # The raw log-probs are those of the model: recompute them by scoring.
  scored = sampler.score_continuations(params, CFG, [prefix + s for s in suffixes], shared.tokens,
                                       batch_size=4, bucket=BUCKET)
  for r in range(len(suffixes)):
    np.testing.assert_allclose(shared.logprobs[r], scored[r], atol=1e-4)


def test_determinism_and_batch_independence(params, prompts):
  a = _generate(params, prompts, T1)
  b = _generate(params, prompts, T1)
  c = _generate(params, prompts, T1, sort_by_length=False)   # other batch composition
  d = _generate(params, prompts, dataclasses.replace(T1, seed=8))
  # Other batch shapes: one batch of 16 (padded only to batch_rows), single rows.
  wide = _generate(params, prompts, T1, batch_size=16)
  single = _generate(params, prompts, T1, batch_size=1)
  for r in range(len(prompts)):
    np.testing.assert_array_equal(a.tokens[r], b.tokens[r])
    np.testing.assert_array_equal(a.tokens[r], c.tokens[r])
    np.testing.assert_array_equal(a.tokens[r], wide.tokens[r])
    np.testing.assert_array_equal(a.tokens[r], single.tokens[r])
  assert any(not np.array_equal(a.tokens[r], d.tokens[r]) for r in range(len(prompts)))
  # Identical prompts at different indices get different keys.
  e = _generate(params, [prompts[0]] * 4, T1)
  assert len({tuple(t) for t in e.tokens}) > 1


def test_a_short_batch_is_padded_to_a_power_of_two_rows_only():
  assert [sampler.batch_rows(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
  assert [sampler.batch_rows(n, 12, 2) for n in (1, 2, 3, 5, 9, 12)] == [2, 2, 4, 8, 12, 12]
  assert sampler.batch_rows(3, 8, 8) == 8


def _expected_stop(seq, eos, stops):
  for t in range(len(seq)):
    if seq[t] in eos:
      return seq[:t + 1], "eos", 1
    for s in stops:
      if t + 1 >= len(s) and tuple(seq[t + 1 - len(s):t + 1]) == s:
        return seq[:t + 1], "stop", len(s)
  return seq, "length", 0


def test_eos_and_stop_sequences(params, prompts):
  base = _generate(params, prompts)
  g = [list(map(int, t)) for t in base.tokens]
  eos = (g[0][4],)
  # The second sequence ends in the pad id 0: it must not match unwritten slots at step 0.
  stop = (tuple(g[1][2:4]), (g[0][0], 0), (CFG.vocab_size - 1, CFG.vocab_size - 2, 1))
  want = [_expected_stop(s, eos, stop) for s in g]
  assert {"eos", "stop"} <= {w[1] for w in want}
  sp = dataclasses.replace(GREEDY, eos_ids=eos, stop_sequences=stop)
  res = _generate(params, prompts, sp)
  for r, (toks, reason, n_stop) in enumerate(want):
    np.testing.assert_array_equal(res.tokens[r], toks)
    assert res.finish_reasons[r] == reason
    assert res.num_stop_tokens[r] == n_stop
    np.testing.assert_array_equal(res.content_tokens(r), toks[:len(toks) - n_stop])
    np.testing.assert_allclose(res.logprobs[r], base.logprobs[r][:len(toks)], atol=1e-6)
  assert res.stats["generated_tokens"] == sum(len(w[0]) for w in want)


def test_sharded_greedy_matches_unsharded(params, prompts):
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_for("fsdp_tp")
  base = _generate(params, prompts)
  res = _generate(params, prompts, mesh=mesh, rules=rules)
  for r in range(len(prompts)):
    np.testing.assert_array_equal(res.tokens[r], base.tokens[r])
    np.testing.assert_allclose(res.logprobs[r], base.logprobs[r], atol=1e-4)


UNROLLED, SCANNED = (dataclasses.replace(CFG, unroll_decode=u) for u in (True, False))


def _assert_same_generation(res, base, rows, atol=1e-5):
  """The first `rows` rows of two generate results: same tokens, log-probs within atol."""
  for r in range(rows):
    np.testing.assert_array_equal(res.tokens[r], base.tokens[r])
    np.testing.assert_allclose(res.logprobs[r], base.logprobs[r], atol=atol)
    np.testing.assert_allclose(res.sampling_logprobs[r], base.sampling_logprobs[r], atol=atol)


@pytest.mark.parametrize("batch_size,sp,prefix", [(1, GREEDY, None), (4, GREEDY, None),
                                                  (4, T1, None), (1, T1, [5, 6, 7])])
def test_unrolled_decode_matches_scanned(params, prompts, batch_size, sp, prefix):
  """The decode loop over per-layer weight slices (reversed kernels at batch 1) generates
  what the scanned loop does; both share the scanned params and the prefill (and a shared
  prefix's cache)."""
  base = _generate(params, prompts, sp, batch_size=batch_size, config=SCANNED, prefix=prefix)
  res = _generate(params, prompts, sp, batch_size=batch_size, config=UNROLLED, prefix=prefix)
  _assert_same_generation(res, base, len(prompts))


def test_unrolled_decode_on_a_mesh(params, prompts):
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_for("fsdp_tp")
  base = _generate(params, prompts[:2], batch_size=1, config=SCANNED)
  res = _generate(params, prompts[:2], batch_size=1, config=UNROLLED, mesh=mesh, rules=rules)
  _assert_same_generation(res, base, 2, atol=1e-4)


PALLAS = dataclasses.replace(UNROLLED, decode_attention="pallas")


@pytest.mark.parametrize("config,batch_size,sp,prefix", [
    (PALLAS, 1, GREEDY, None), (PALLAS, 4, T1, None), (PALLAS, 4, GREEDY, [5, 6, 7]),
    (dataclasses.replace(SCANNED, decode_attention="pallas"), 4, GREEDY, None),
    # every model preset trains with remat: the cached calls must not be rematerialized
    (dataclasses.replace(PALLAS, remat_policy="full"), 4, GREEDY, None),
    (dataclasses.replace(PALLAS, remat_policy="dots"), 1, GREEDY, None)])
def test_pallas_decode_attention_matches_xla(params, prompts, config, batch_size, sp, prefix):
  """decode_attention 'pallas' (the kernel in interpret mode on the CPU; unrolled it reads
  the stacked cache in place, scanned each layer's slice) generates what the einsum
  attention does, with left-padded prompts of mixed lengths and a shared prefix."""
  xla = dataclasses.replace(config, decode_attention=None)
  base = _generate(params, prompts, sp, batch_size=batch_size, config=xla, prefix=prefix)
  res = _generate(params, prompts, sp, batch_size=batch_size, config=config, prefix=prefix)
  _assert_same_generation(res, base, len(prompts))


def test_pallas_decode_attention_on_a_mesh(params, prompts, monkeypatch):
  """On a mesh the kernel runs per shard (shard_map over the rows' and kv heads' mesh
  axes) and generates what one device does."""
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_for("fsdp_tp")
  seen = []
  real = layers.decode_mesh_axes
  monkeypatch.setattr(layers, "decode_mesh_axes", lambda *a: seen.append(real(*a)) or seen[-1])
  base = _generate(params, prompts[:2], batch_size=2, config=UNROLLED)
  assert not seen
  res = _generate(params, prompts[:2], batch_size=2, config=PALLAS, mesh=mesh, rules=rules)
  # fsdp_tp: rows over data and fsdp (4 rows per batch here), kv heads over tensor.
  assert set(seen) == {(("data", "fsdp"), "tensor")}, seen
  _assert_same_generation(res, base, 2, atol=1e-4)


def _decode_loop_body(config, batch):
  """The jaxpr of the decode while-loop's body in one batch program (prompt bucket 8)."""
  spec = sampler._DecodeSpec.of(GREEDY)
  p = nn.meta.unbox(models.abstract_params(config))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  jaxpr = jax.make_jaxpr(functools.partial(sampler._batch_program, config, spec))(
      p, i32(batch, 8), jax.ShapeDtypeStruct((batch, 8), bool),
      jax.ShapeDtypeStruct((batch,), bool), i32(batch), jax.ShapeDtypeStruct((), jnp.uint32),
      None, None)
  loops = [e for e in jaxpr.eqns if e.primitive.name == "while"]
  assert len(loops) == 1, [e.primitive.name for e in jaxpr.eqns]
  return loops[0].params["body_jaxpr"].jaxpr


def _primitives(jaxpr):
  """Names of the primitives in a jaxpr and in the jaxprs its equations hold (loop bodies,
  cond branches, pjit / remat calls)."""
  names = set()
  for e in jaxpr.eqns:
    names.add(e.primitive.name)
    for value in e.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)          # a ClosedJaxpr holds its Jaxpr
        if hasattr(sub, "eqns"):
          names |= _primitives(sub)
  return names


@pytest.mark.parametrize("batch", [1, 4])
def test_unrolled_decode_loop_has_no_layer_scan(batch):
  """Unrolled, the decode step holds no scan over the stacked layers (whose every step
  slices each layer's weights out of them); the scanned one does."""
  assert "scan" in _primitives(_decode_loop_body(SCANNED, batch))
  assert "scan" not in _primitives(_decode_loop_body(UNROLLED, batch))


def _count(jaxpr, name):
  """Equations named `name` in a jaxpr and in the jaxprs its equations hold."""
  n = 0
  for e in jaxpr.eqns:
    n += e.primitive.name == name
    for value in e.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += _count(sub, name)
  return n


def test_pallas_decode_loop_calls_one_kernel_per_layer():
  """One kernel per layer and step, held twice until lowering picks the platform (Triton
  for a CUDA GPU, interpret mode elsewhere); none with the einsum attention."""
  assert _count(_decode_loop_body(PALLAS, 4), "pallas_call") == 2 * CFG.n_layers
  assert _count(_decode_loop_body(PALLAS, 4), "platform_index") == CFG.n_layers
  assert _count(_decode_loop_body(UNROLLED, 4), "pallas_call") == 0


def test_unroll_decode_default_is_gpu_only(monkeypatch):
  assert not sampler.unrolled_decode(CFG)            # this CPU
  assert sampler.unrolled_decode(UNROLLED) and not sampler.unrolled_decode(SCANNED)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert sampler.unrolled_decode(CFG)
  assert not sampler.unrolled_decode(dataclasses.replace(CFG, scan_layers=False))
  assert not sampler.unrolled_decode(SCANNED)
  with pytest.raises(ValueError, match="unroll_decode"):
    ModelConfig(unroll_decode="yes")


def test_unroll_decode_needs_room_for_the_weight_copy(params, monkeypatch):
  """generate's choice for unroll_decode None: a GPU with at least twice the layer weights'
  bytes free (or no memory figures) unrolls; less room, or a CPU, keeps the scan."""
  copy = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["layers"]))
  assert not sampler.resolve_unroll_decode(CFG, params).unroll_decode
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for free, want in ((None, True), (2 * copy, True), (2 * copy - 1, False), (copy, False)):
    monkeypatch.setattr(sampler, "_free_device_bytes", lambda across_processes, free=free: free)
    assert sampler.resolve_unroll_decode(CFG, params).unroll_decode is want, free
  assert sampler.resolve_unroll_decode(UNROLLED, params) is UNROLLED
  assert sampler.resolve_unroll_decode(SCANNED, params) is SCANNED


def test_free_memory_is_the_least_over_processes(monkeypatch):
  """Every process of a multi-process run must decide alike: the free bytes it goes by are
  the least any process reports (an unknown figure counts as unlimited)."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for others, want in (([7, 5], 5), ([None, 9], 9), ([None, None], None)):
    unknown = np.iinfo(np.int64).max
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, others=others: np.array(
        [x] + [unknown if o is None else o for o in others[1:]], np.int64))
    monkeypatch.setattr(jax.local_devices()[0].__class__, "memory_stats",
                        lambda self, o=others[0]: None if o is None else
                        {"bytes_limit": o + 1, "bytes_in_use": 1}, raising=False)
    assert sampler._free_device_bytes(across_processes=True) == want
    assert sampler._free_device_bytes() == others[0]      # this process's own figure


# --- scoring -----------------------------------------------------------------------------


def test_score_continuations_equals_log_softmax(params):
  rng = np.random.default_rng(3)
  ps = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (5, 1, 12, 3, 8)]
  cs = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (2, 6, 0, 1, 4)]
  got = sampler.score_continuations(params, CFG, ps, cs, batch_size=4, bucket=BUCKET)
  lg = _full_logits(params, [p + c for p, c in zip(ps, cs)], 20).astype(np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  for r, (p, c) in enumerate(zip(ps, cs)):
    want = [logp[r, len(p) - 1 + t, c[t]] for t in range(len(c))]
    assert got[r].shape == (len(c),)
    np.testing.assert_allclose(got[r], want, atol=1e-5)
  sums = sampler.sum_logprobs(params, CFG, ps, cs, batch_size=4, bucket=BUCKET)
  np.testing.assert_allclose(sums, [g.sum() for g in got], atol=1e-5)


def _log_softmax_reference(params, ps, cs, width=64):
  """Per-token log p(c | p) from full forward passes (float64 log-softmax)."""
  lg = _full_logits(params, [p + c for p, c in zip(ps, cs)], width).astype(np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  return [np.array([logp[r, len(p) - 1 + t, c[t]] for t in range(len(c))])
          for r, (p, c) in enumerate(zip(ps, cs))]


def _mesh_kwargs(sharded):
  """{} or the mesh / rules of a 2 x 2 x 2 fsdp_tp mesh of the fake CPU devices."""
  if not sharded:
    return {}
  return dict(mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
              rules=sharding.rules_for("fsdp_tp"))


@pytest.mark.parametrize("sharded", [False, True])
def test_shared_prompts_are_run_once_with_the_same_scores(params, sharded):
  """Prompts repeated 2 or 3 times (and one alone), continuations of 0..6 tokens, in shuffled
  order: the shared-prompt program gives the full forward pass's log-probs, as the
  one-pass-per-row program does, also on a 2 x 2 x 2 mesh."""
  rng = np.random.default_rng(5)
  base = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (29, 12, 40, 20)]
  ps, cs = [], []
  for k, p in enumerate(base):
    for _ in range((2, 3, 1, 2)[k]):
      ps.append(list(p))
      cs.append([int(t) for t in rng.integers(1, CFG.vocab_size, size=rng.integers(0, 7))])
  perm = rng.permutation(len(ps))
  ps, cs = [ps[i] for i in perm], [cs[i] for i in perm]
  kw = _mesh_kwargs(sharded)
  calls = []
  real = sampler._score_shared
  try:   # the shared program is the one that runs
    sampler._score_shared = lambda *a, **k: calls.append(1) or real(*a, **k)
    # batch_size 8: batches of 2 prompts x 3 rows (4 x 3 on the mesh's 4 batch shards)
    shared = sampler.score_continuations(params, CFG, ps, cs, batch_size=8, bucket=BUCKET, **kw)
  finally:
    sampler._score_shared = real
  assert calls == [1]
  single = sampler.score_continuations(params, CFG, ps, cs, batch_size=4, bucket=BUCKET,
                                       share_prompts=False, **kw)
  want = _log_softmax_reference(params, ps, cs)
  for r in range(len(ps)):
    assert shared[r].shape == (len(cs[r]),)
    np.testing.assert_allclose(shared[r], want[r], atol=1e-5)
    np.testing.assert_allclose(single[r], want[r], atol=1e-5)


@pytest.mark.parametrize("repeat,sharded", [(1, False), (2, False), (2, True)])
def test_common_prefix_is_run_once_with_the_same_scores(params, repeat, sharded):
  """Prompts that all start with the same 37 tokens (a few-shot preamble), then differ
  (rests of 1..25 tokens; one prompt is the preamble and one more token), each asked once or
  with `repeat` continuations: the 32-token prefix (two buckets of 16) is prefilled once
  (batch 1) and the scores equal the full forward pass's, also on a 2 x 2 x 2 mesh."""
  rng = np.random.default_rng(8)
  head = [int(t) for t in rng.integers(1, CFG.vocab_size, size=37)]
  rests = [[int(t) for t in rng.integers(1, CFG.vocab_size, size=n)] for n in (1, 9, 25, 4, 14)]
  ps, cs = [], []
  for r in rests:
    for _ in range(repeat):
      ps.append(head + r)
      cs.append([int(t) for t in rng.integers(1, CFG.vocab_size, size=rng.integers(1, 5))])
  assert sampler.common_prefix_length(ps) == 37
  kw = _mesh_kwargs(sharded)
  prefixes = []
  real = sampler._score_shared
  try:
    sampler._score_shared = lambda *a, **k: prefixes.append(a[-1]) or real(*a, **k)
    got = sampler.score_continuations(params, CFG, ps, cs, batch_size=4, bucket=BUCKET, **kw)
  finally:
    sampler._score_shared = real
  assert prefixes == [32]
  want = _log_softmax_reference(params, ps, cs, width=80)
  for r in range(len(ps)):
    assert got[r].shape == (len(cs[r]),)
    np.testing.assert_allclose(got[r], want[r], atol=1e-5)


def test_all_different_prompts_take_the_one_pass_program(params):
  ps = [[1, 2, 3], [4, 5], [6]]
  cs = [[7], [8, 9], [10]]
  real = sampler._score_shared
  try:
    sampler._score_shared = None   # would fail if called
    got = sampler.score_continuations(params, CFG, ps, cs, batch_size=2, bucket=BUCKET)
  finally:
    sampler._score_shared = real
  want = _log_softmax_reference(params, ps, cs)
  for r in range(3):
    np.testing.assert_allclose(got[r], want[r], atol=1e-5)


# --- context limits ----------------------------------------------------------------------


def test_too_long_prompt_errors_or_truncates_left(params, prompts):
  short = dataclasses.replace(CFG, max_seq_len=32)        # same parameters, 24-token prompts
  long_prompt = list(range(1, 31))
  with pytest.raises(ValueError, match=r"prompt 1 has 30 tokens but at most 24 fit"):
    _generate(params, [prompts[0], long_prompt], config=short)
  res = _generate(params, [prompts[0], long_prompt], config=short, truncate="left")
  assert res.stats["truncated_prompts"] == 1 and res.stats["truncated_tokens"] == 6
  np.testing.assert_array_equal(res.prompt_lengths, [len(prompts[0]), 24])
  ref = _generate(params, [prompts[0], long_prompt[6:]], config=short)
  np.testing.assert_array_equal(res.tokens[1], ref.tokens[1])
  with pytest.raises(ValueError, match=r"prompt 0 has 30 tokens"):
    sampler.score_continuations(params, short, [long_prompt], [[1, 2, 3]], batch_size=1)
  stats = {}
  sampler.score_continuations(params, short, [long_prompt], [[1, 2, 3]], batch_size=1,
                              truncate="left", stats=stats, bucket=BUCKET)
  assert stats == {"truncated_prompts": 1, "truncated_tokens": 1}
  with pytest.raises(ValueError, match="empty"):
    _generate(params, [[]])


def test_left_truncation_keeps_a_leading_bos(params):
  short = dataclasses.replace(CFG, max_seq_len=32)        # 24-token prompts
  bos = 5
  long_prompt = [bos] + list(range(10, 40))               # 31 tokens
  res = _generate(params, [long_prompt], config=short, truncate="left", bos_id=bos)
  assert res.stats["truncated_tokens"] == 7 and res.prompt_lengths[0] == 24
  ref = _generate(params, [[bos] + long_prompt[-23:]], config=short)
  np.testing.assert_array_equal(res.tokens[0], ref.tokens[0])
  plain = _generate(params, [long_prompt], config=short, truncate="left")   # no bos_id
  np.testing.assert_array_equal(plain.tokens[0], _generate(params, [long_prompt[-24:]],
                                                           config=short).tokens[0])
  stats = {}
  got = sampler.score_continuations(params, short, [long_prompt], [[1, 2, 3]], batch_size=1,
                                    truncate="left", stats=stats, bucket=BUCKET, bos_id=bos)
  assert stats == {"truncated_prompts": 1, "truncated_tokens": 2}
  want = _log_softmax_reference(params, [[bos] + long_prompt[-28:]], [[1, 2, 3]])
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)


class _JoiningTokenizer:
  """Words and single characters, with ': (' one token: a prefix and a text encoded apart
  give other ids than the two joined."""
  add_bos_token, bos_id, eos_id = True, 1, 2

  def encode(self, text):
    import re
    import zlib
    return [zlib.crc32(p.encode()) % 300 + 3 for p in re.findall(r": \(|\w+|.", text, re.S)]

  def decode(self, ids, skip_special_tokens=False):
    return " ".join(str(i) for i in ids)


def test_text_generate_fn_reads_the_joined_text(params, monkeypatch):
  tok = _JoiningTokenizer()
  seen = {}
  real = sampler.generate

  def spy(params, config, prompts, sp, batch_size, **kw):
    seen.update(prompts=prompts, prefix=kw.get("prefix"), bos_id=kw.get("bos_id"),
                stops=sp.stop_sequences)
    return real(params, config, prompts, sp, batch_size, **kw)

  monkeypatch.setattr(sampler, "generate", spy)
  fn = sampler.text_generate_fn(params, CFG, tok, ["\n\nHuman:"], 0.0, 1.0, N_NEW, 2)
  prefix, texts = "Q: the answer is:", [" (A) yes", " (B) no"]
  out = fn(prefix, texts, 0)
  for text, suffix in zip(texts, seen["prompts"]):
    assert seen["prefix"] + suffix == [tok.bos_id] + tok.encode(prefix + text)
  assert seen["bos_id"] == tok.bos_id and seen["stops"] == (tuple(tok.encode("\n\nHuman:")),)
  ref = real(params, CFG, [[tok.bos_id] + tok.encode(prefix + t) for t in texts], GREEDY, 2,
             progress=False)
  assert out == [tok.decode(ref.content_tokens(i).tolist()) for i in range(2)]
  fn("", texts, 0)    # no prefix: BOS in front of each prompt
  assert seen["prefix"] is None
  assert seen["prompts"] == [[tok.bos_id] + tok.encode(t) for t in texts]


@pytest.mark.parametrize("t", [1e-39, 1e-7, float("nan"), float("inf"), -1.0])
def test_temperature_must_be_zero_or_usable(t):
  with pytest.raises(ValueError, match="temperature must be 0"):
    sampler.SamplingParams(temperature=t)
  sampler.SamplingParams(temperature=sampler.MIN_TEMPERATURE)


def test_a_prefix_may_be_an_array(params):
  a = _generate(params, [[3, 4]], prefix=np.array([7, 8, 9]))
  b = _generate(params, [[3, 4]], prefix=[7, 8, 9])
  np.testing.assert_array_equal(a.tokens[0], b.tokens[0])


def _result(rows):
  """A GenerateResult of (token ids, finish reason, num_stop_tokens) rows; log-probs -id."""
  from cai_jax.sampler import GenerateResult
  toks = [np.asarray(t, np.int32) for t, _, _ in rows]
  return GenerateResult(
      tokens=toks, logprobs=[-t.astype(np.float32) for t in toks],
      sampling_logprobs=[-2 * t.astype(np.float32) for t in toks],
      lengths=np.array([len(t) for t in toks], np.int32), finish_reasons=[r for _, r, _ in rows],
      num_stop_tokens=np.array([n for _, _, n in rows], np.int32),
      prompt_lengths=np.ones((len(rows),), np.int32),
      stats={"generated_tokens": sum(len(t) for t in toks)})


def test_a_stop_string_in_an_unmatched_tokenization_cuts_the_generation_after_it():
  """'\\n\\nHuman:' sampled as pieces no stop sequence matches: the row ends with the token
  that completes it, as a token-level stop would; rows without one are unchanged."""
  from cai_jax.sampler import cut_at_stop_strings
  vocab = ["Sure.", "\n", "\nHum", "an:", " more", "</s>", "ok", "\n\nHuman:"]
  decode = lambda ids: "".join(vocab[i] for i in ids)
  stops = ("\n\nHuman:",)
  result = _result([([0, 1, 2, 3, 4, 0], "length", 0),     # cut after "an:"
                    ([6, 4, 5], "eos", 1),                  # no stop string
                    ([6, 7], "stop", 1),                    # a token-level stop
                    ([6, 1, 2, 3, 6, 7], "stop", 1)])       # an earlier string stop
  cut = cut_at_stop_strings(result, decode, stops)
  assert [t.tolist() for t in cut.tokens] == [[0, 1, 2, 3], [6, 4, 5], [6, 7], [6, 1, 2, 3]]
  assert cut.finish_reasons == ["stop", "eos", "stop", "stop"]
  assert cut.num_stop_tokens.tolist() == [3, 1, 1, 3]
  assert cut.lengths.tolist() == [4, 3, 2, 4]
  np.testing.assert_array_equal(cut.logprobs[0], [0, -1, -2, -3])
  np.testing.assert_array_equal(cut.sampling_logprobs[3], [-12, -2, -4, -6])
  assert cut.stats["generated_tokens"] == 13 and cut.stats["string_stops"] == 2
  assert cut.stats["finish_stop"] == 3 and cut.stats["finish_eos"] == 1
  assert [cut.text(r, decode, stops) for r in range(4)] == ["Sure.", "ok more", "ok", "ok"]
  assert [t.tolist() for t in result.tokens][0] == [0, 1, 2, 3, 4, 0]   # input unchanged


def test_a_token_that_holds_text_and_the_stop_strings_start_keeps_the_text():
  from cai_jax.sampler import cut_at_stop_strings
  vocab = ["Yes.\n", "\nHuman:", " go on"]
  decode = lambda ids: "".join(vocab[i] for i in ids)
  cut = cut_at_stop_strings(_result([([0, 1, 2], "length", 0)]), decode, ("\n\nHuman:",))
  assert cut.tokens[0].tolist() == [0, 1] and cut.num_stop_tokens.tolist() == [2]
  assert cut.text(0, decode, ("\n\nHuman:",)) == "Yes."

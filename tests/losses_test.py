"""Losses against independent float64 NumPy references (closed forms and plain loops)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import losses


def _np_log_sigmoid(x):
  x = np.asarray(x, np.float64)
  return -np.logaddexp(0.0, -x)


def _ragged_mask(rng, batch, length, left_pad_rows=(), empty_rows=()):
  """Right-padded rows of random lengths; some rows left-padded or empty."""
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    n = int(rng.integers(1, length + 1))
    if b in empty_rows:
      continue
    if b in left_pad_rows:
      mask[b, length - n:] = True
    else:
      mask[b, :n] = True
  return mask


# ---------------------------------------------------------------- masked reductions


def test_masked_reductions_match_boolean_indexing():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7))
  mask = _ragged_mask(rng, 5, 7)
  x_pad = np.where(mask, x, np.nan)              # NaN at pads must not leak
  np.testing.assert_allclose(losses.masked_sum(x_pad, mask), x[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_mean(x_pad, mask), x[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_var(x_pad, mask), x[mask].var(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_var(x_pad, mask, unbiased=True),
                             x[mask].var(ddof=1), rtol=1e-5)
  row_means = [x[b][mask[b]].mean() for b in range(5)]
  np.testing.assert_allclose(losses.masked_mean(x_pad, mask, axis=1), row_means, rtol=1e-5)
  empty = np.zeros_like(mask)
  assert float(losses.masked_mean(x, empty)) == 0.0


def test_whiten_normalizes_masked_entries_and_leaves_pads():
  rng = np.random.default_rng(1)
  x = 3.0 + 5.0 * rng.normal(size=(4, 9))
  mask = _ragged_mask(rng, 4, 9, left_pad_rows=(2,))
  x[~mask] = 1e6                                 # huge pads must not move the statistics
  out = np.asarray(losses.whiten(x, mask))
  np.testing.assert_allclose(out[mask].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[mask].var(), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(out[~mask], np.float32(1e6))
  ref = (x[mask] - x[mask].mean()) / x[mask].std()
  np.testing.assert_allclose(out[mask], ref, rtol=1e-4, atol=1e-5)

  kept = np.asarray(losses.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask].mean(), x[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(kept[mask].std(), 1.0, rtol=1e-4)


def test_variance_and_whiten_gradients_ignore_nan_pads():
  """NaN at a pad leaks into no gradient: masked_var and whiten differentiate as if the pads
  held any finite value."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  mask = _ragged_mask(rng, 3, 6, left_pad_rows=(1,))
  assert (~mask).any()
  weights = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  fns = {"masked_var": lambda v: losses.masked_var(v, mask),
         "whiten": lambda v: jnp.sum(jnp.where(mask, losses.whiten(v, mask), 0.0) * weights)}
  for name, fn in fns.items():
    want = np.asarray(jax.grad(fn)(jnp.where(mask, x, 0.0)))
    got = np.asarray(jax.grad(fn)(jnp.where(mask, x, jnp.nan)))
    assert np.all(np.isfinite(got)), name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(want[mask]).max() > 1e-3, name


# ---------------------------------------------------------------- soft Bradley–Terry


def _np_soft_bt(delta, p):
  delta = np.asarray(delta, np.float64)
  p = np.asarray(p, np.float64)
  with np.errstate(invalid="ignore"):
    a = np.where(p > 0, p * _np_log_sigmoid(delta), 0.0)
    b = np.where(p < 1, (1 - p) * _np_log_sigmoid(-delta), 0.0)
  return -(a + b)


def test_soft_bradley_terry_closed_form():
  rng = np.random.default_rng(2)
  delta = rng.normal(scale=3.0, size=200)
  p = rng.uniform(size=200)
  p[:20] = 0.0
  p[20:40] = 1.0
  p[40:60] = 0.5
  got = np.asarray(losses.soft_bradley_terry(delta, p))
  # Direct closed form, no log_sigmoid: -[p log(1/(1+e^-Δ)) + (1-p) log(1/(1+e^Δ))].
  direct = -(p * np.log(1 / (1 + np.exp(-delta))) + (1 - p) * np.log(1 / (1 + np.exp(delta))))
  np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
  # p = 0.5, Δ = 0 is log 2; the minimum over Δ sits at logit(p).
  np.testing.assert_allclose(losses.soft_bradley_terry(0.0, 0.5), np.log(2), rtol=1e-6)
  grad = jax.grad(lambda d: losses.soft_bradley_terry(d, 0.8))(float(np.log(0.8 / 0.2)))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_soft_bradley_terry_extremes_are_finite():
  delta = np.array([-1e4, -80.0, 80.0, 1e4, 1e4, -1e4, 1e4, -1e4, np.inf, -np.inf])
  p = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.3, 0.3, 1.0, 0.0])
  got = np.asarray(losses.soft_bradley_terry(delta, p))
  assert np.all(np.isfinite(got)), got
  np.testing.assert_allclose(got, _np_soft_bt(delta, p), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[[0, 1, 2, 3, 8, 9]], 0.0, atol=1e-6)   # right, confident
  np.testing.assert_allclose(got[4], 1e4, rtol=1e-6)                    # wrong, confident
  g = jax.grad(lambda d: jnp.sum(losses.soft_bradley_terry(d, p)))(jnp.asarray(delta, jnp.float32))
  assert np.all(np.isfinite(np.asarray(g)))


def test_soft_bt_loss_sums_weights_and_pads():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=8), rng.normal(size=8)
  p = rng.uniform(size=8)
  w = np.array([1, 1, 0.5, 2, 1, 0, 0, 1], np.float64)
  a_pad = a.copy()
  a_pad[w == 0] = np.nan                          # padding pairs may hold garbage
  s, c = losses.soft_bt_loss_sums(a_pad, b, p, w)
  np.testing.assert_allclose(s, np.sum(w[w > 0] * _np_soft_bt(a - b, p)[w > 0]), rtol=1e-5)
  np.testing.assert_allclose(c, w.sum())
  s1, c1 = losses.soft_bt_loss_sums(a, b, p)
  np.testing.assert_allclose(s1, _np_soft_bt(a - b, p).sum(), rtol=1e-5)
  assert float(c1) == 8.0


def test_soft_bt_loss_sums_gradient_ignores_nan_scores_of_weight_zero_pairs():
  """A padding pair's NaN score leaks into no gradient: the loss differentiates as if
  the pad held any finite score."""
  a = jnp.array([1.0, -2.0, 0.5, 3.0])
  b = jnp.array([0.0, 1.0, 0.0, 1.0])
  p = jnp.array([0.7, 0.2, 0.9, 0.5])
  w = jnp.array([1.0, 2.0, 0.0, 1.0])
  grad = lambda x: jax.grad(lambda s: losses.soft_bt_loss_sums(s, b, p, w)[0])(x)
  want = np.asarray(grad(a))
  got = np.asarray(grad(a.at[2].set(jnp.nan)))
  assert np.all(np.isfinite(got)), got
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(want, np.asarray(w * (jax.nn.sigmoid(a - b) - p)), rtol=1e-5)


def _np_ece(q, p, n_bins):
  idx = np.minimum((q * n_bins).astype(int), n_bins - 1)
  total = 0.0
  for k in range(n_bins):
    sel = idx == k
    if sel.any():
      total += sel.mean() * abs(q[sel].mean() - p[sel].mean())
  return total


def test_pm_metrics():
  score_a = np.array([2.0, -1.0, 0.0, 3.0, -2.0, 1.0])
  score_b = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
  p = np.array([0.9, 0.8, 0.7, 0.5, 0.1, 0.3])
  m = losses.pm_metrics(score_a, score_b, p)
  # right, wrong, tie(Δ=0), tie(p=0.5), right, tie(Δ=0)
  np.testing.assert_allclose(m["accuracy"], (1 + 0 + 0.5 + 0.5 + 1 + 0.5) / 6, rtol=1e-6)
  np.testing.assert_allclose(m["mean_delta"], np.mean(score_a - score_b), rtol=1e-6)
  np.testing.assert_allclose(m["loss"], _np_soft_bt(score_a - score_b, p).mean(), rtol=1e-5)

  rng = np.random.default_rng(4)
  delta = rng.normal(scale=2.0, size=500)
  delta[:3] = [50.0, -50.0, 0.0]                  # q = 1 goes in the last bin
  p = rng.uniform(size=500)
  q = 1 / (1 + np.exp(-delta))
  for n_bins in (5, 10, 15):
    got = losses.pm_metrics(delta, np.zeros_like(delta), p, n_bins=n_bins)["ece"]
    np.testing.assert_allclose(got, _np_ece(q, p, n_bins), rtol=1e-4, atol=1e-6)
  calibrated = losses.pm_metrics(delta, np.zeros_like(delta), q)["ece"]
  np.testing.assert_allclose(calibrated, 0.0, atol=1e-6)
  # Weights equal to repetition counts.
  w = rng.integers(0, 3, size=500).astype(np.float64)
  got = losses.pm_metrics(delta, np.zeros_like(delta), p, weight=w)
  rep = np.repeat(np.arange(500), w.astype(int))
  np.testing.assert_allclose(got["ece"], _np_ece(q[rep], p[rep], 10), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["mean_delta"], delta[rep].mean(), rtol=1e-5)


# ---------------------------------------------------------------- feedback labels


def test_soft_label_matches_softmax_and_is_stable():
  rng = np.random.default_rng(5)
  la, lb = rng.normal(scale=3, size=50) - 5, rng.normal(scale=3, size=50) - 5
  direct = np.exp(la) / (np.exp(la) + np.exp(lb))
  np.testing.assert_allclose(losses.soft_label(la, lb), direct, rtol=1e-5, atol=1e-7)
  # Far below underflow of exp: only the difference matters (up to float32 rounding of
  # inputs near -2000, whose spacing is 1.2e-4).
  far = np.asarray(losses.soft_label(la - 2000.0, lb - 2000.0))
  assert np.all(np.isfinite(far))
  assert np.all(np.exp(la - 2000.0) == 0.0)       # the naive ratio would be 0/0
  np.testing.assert_allclose(far, direct, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(losses.soft_label(0.0, -1e4), 1.0)
  np.testing.assert_allclose(losses.soft_label(-1e4, 0.0), 0.0)


def test_clamp_label():
  p = np.array([0.0, 0.1, 0.4, 0.45, 0.6, 0.99, 1.0])
  np.testing.assert_allclose(losses.clamp_label(p), [0.4, 0.4, 0.4, 0.45, 0.6, 0.6, 0.6],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.clamp_label(p, 0.2, 0.7), np.clip(p, 0.2, 0.7), rtol=1e-6)


def test_average_orders_removes_position_bias():
  rng = np.random.default_rng(6)
  true_a = rng.uniform(0.15, 0.85, size=100)
  bias = 0.12                                     # judge favours whatever is shown first
  p_ab = true_a + bias                            # (A, B) order: first shown is A
  p_ba = (1.0 - true_a) + bias                    # (B, A) order: first shown is B
  assert np.abs(p_ab - true_a).mean() > 0.1       # one order alone is biased
  np.testing.assert_allclose(losses.average_orders(p_ab, p_ba), true_a, atol=1e-6)
  # A bias toward the second position cancels too.
  np.testing.assert_allclose(losses.average_orders(true_a - 0.1, 0.9 - true_a), true_a,
                             atol=1e-6)


# ---------------------------------------------------------------- KL


def test_kl_estimators_formulas_and_k3_nonnegative():
  rng = np.random.default_rng(7)
  lp = rng.normal(size=(6, 11)) - 2
  lr = lp + rng.normal(scale=2.0, size=(6, 11))
  lr[0, :3] = [lp[0, 0] - 40, lp[0, 1] + 30, lp[0, 2]]   # far apart and equal
  log_r = lr - lp
  np.testing.assert_allclose(losses.kl_per_token(lp, lr, "k1"), lp - lr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.kl_per_token(lp, lr, "k2"), 0.5 * log_r ** 2, rtol=1e-5)
  k3 = np.asarray(losses.kl_per_token(lp, lr, "k3"))
  np.testing.assert_allclose(k3, np.exp(log_r) - 1 - log_r, rtol=1e-4)
  assert np.all(k3 >= 0.0)
  assert float(losses.kl_per_token(lp, lr, "k1").min()) < 0      # k1 can go negative
  with pytest.raises(ValueError):
    losses.kl_per_token(lp, lr, "k4")


def test_k1_and_k3_are_unbiased_for_kl():
  rng = np.random.default_rng(8)
  pi = rng.dirichlet(np.ones(6))
  ref = rng.dirichlet(np.ones(6))
  true_kl = float(np.sum(pi * np.log(pi / ref)))
  tokens = rng.choice(6, size=200_000, p=pi)
  lp, lr = np.log(pi)[tokens], np.log(ref)[tokens]
  for kind in ("k1", "k3"):
    est = float(np.mean(losses.kl_per_token(lp, lr, kind)))
    assert abs(est - true_kl) < 0.03 * max(true_kl, 0.1) + 0.01, (kind, est, true_kl)


def test_kl_penalized_rewards_places_score_at_last_real_token():
  rng = np.random.default_rng(9)
  b, t = 5, 8
  mask = _ragged_mask(rng, b, t, left_pad_rows=(1,), empty_rows=(4,))
  mask[2] = [1, 1, 0, 1, 1, 0, 0, 0]              # a hole: last real token is index 4
  lp = rng.normal(size=(b, t))
  lr = rng.normal(size=(b, t))
  score = rng.normal(size=b) * 3
  beta = 0.1
  got = np.asarray(losses.kl_penalized_rewards(score, lp, lr, mask, beta))
  ref = np.zeros((b, t))
  for i in range(b):
    real = np.nonzero(mask[i])[0]
    for j in real:
      ref[i, j] = -beta * (lp[i, j] - lr[i, j])
    if len(real):
      ref[i, real[-1]] += score[i]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.all(got[4] == 0.0)
  k3 = np.asarray(losses.kl_penalized_rewards(score, lp, lr, mask, beta, kind="k3"))
  kl3 = np.exp(lr - lp) - 1 - (lr - lp)
  np.testing.assert_allclose(k3.sum(1), np.where(mask.any(1), score, 0)
                             - beta * np.where(mask, kl3, 0).sum(1), rtol=1e-4, atol=1e-5)


def test_adaptive_beta_moves_toward_target():
  target, horizon, n = 6.0, 10_000, 256
  up = float(losses.adaptive_beta(0.1, 9.0, target, horizon, n))
  down = float(losses.adaptive_beta(0.1, 3.0, target, horizon, n))
  same = float(losses.adaptive_beta(0.1, 6.0, target, horizon, n))
  assert up > 0.1 > down
  np.testing.assert_allclose(same, 0.1, rtol=1e-6)
  # Proportional error clipped at ±0.2.
  np.testing.assert_allclose(losses.adaptive_beta(0.1, 1e6, target, horizon, n),
                             0.1 * (1 + 0.2 * n / horizon), rtol=1e-6)
  np.testing.assert_allclose(losses.adaptive_beta(0.1, 0.0, target, horizon, n),
                             0.1 * (1 - 0.2 * n / horizon), rtol=1e-6)
  np.testing.assert_allclose(losses.adaptive_beta(0.1, 6.6, target, horizon, n),
                             0.1 * (1 + 0.1 * n / horizon), rtol=1e-5)
  # Closed loop with KL falling as β rises: KL converges to the target.
  beta, kl = 0.01, None
  for _ in range(400):
    kl = 0.3 / beta
    beta = float(losses.adaptive_beta(beta, kl, target, 1000, 100))
  np.testing.assert_allclose(kl, target, rtol=0.02)


# ---------------------------------------------------------------- GAE


def _np_gae(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  ret = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.nonzero(mask[b])[0]
    r, v = rewards[b, idx], values[b, idx]
    n = len(idx)
    a = np.zeros(n)
    for t in range(n):                             # definition: Σ_l (γλ)^l δ_{t+l}
      total = 0.0
      for l in range(n - t):
        nxt = v[t + l + 1] if t + l + 1 < n else 0.0
        delta = r[t + l] + gamma * nxt - v[t + l]
        total += (gamma * lam) ** l * delta
      a[t] = total
    adv[b, idx] = a
    ret[b, idx] = a + v
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.9), (0.9, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(10)
  b, t = 6, 13
  mask = _ragged_mask(rng, b, t, left_pad_rows=(3,), empty_rows=(5,))
  mask[1] = True
  mask[2] = np.arange(t) < 10
  mask[2, 4:6] = False                            # an interior hole is skipped
  rewards = rng.normal(size=(b, t))
  values = rng.normal(size=(b, t))
  ref_adv, ref_ret = _np_gae(rewards, values, mask, gamma, lam)
  rewards_pad = np.where(mask, rewards, np.nan)   # pads are ignored
  values_pad = np.where(mask, values, 1e6)
  adv, ret = losses.gae(rewards_pad, values_pad, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-4, atol=1e-5)


def test_gae_lambda_one_is_monte_carlo_return():
  rng = np.random.default_rng(11)
  mask = _ragged_mask(rng, 4, 10)
  rewards = np.where(mask, rng.normal(size=(4, 10)), 0.0)
  values = rng.normal(size=(4, 10))
  _, ret = losses.gae(rewards, values, mask, 1.0, 1.0)
  mc = np.where(mask, np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1], 0.0)
  np.testing.assert_allclose(ret, mc, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PPO


def _np_ppo_policy(logp_new, logp_old, adv, mask, clip):
  total, count, clipped, kl = 0.0, 0, 0, 0.0
  for b in range(logp_new.shape[0]):
    for t in range(logp_new.shape[1]):
      if not mask[b, t]:
        continue
      ratio = np.exp(logp_new[b, t] - logp_old[b, t])
      unclipped = -adv[b, t] * ratio
      clipped_term = -adv[b, t] * min(max(ratio, 1 - clip), 1 + clip)
      total += max(unclipped, clipped_term)
      clipped += clipped_term > unclipped
      kl += ratio - 1 - np.log(ratio)
      count += 1
  return total / count, clipped / count, kl / count


def _np_ppo_value(v, v_old, ret, mask, clip):
  total, count, clipped = 0.0, 0, 0
  for b in range(v.shape[0]):
    for t in range(v.shape[1]):
      if not mask[b, t]:
        continue
      vc = v_old[b, t] + min(max(v[b, t] - v_old[b, t], -clip), clip)
      e1, e2 = (v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2
      total += 0.5 * max(e1, e2)
      clipped += e2 > e1
      count += 1
  return total / count, clipped / count


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_ppo_policy_loss_matches_loop(clip):
  rng = np.random.default_rng(12)
  b, t = 4, 9
  mask = _ragged_mask(rng, b, t, left_pad_rows=(2,))
  logp_old = rng.normal(size=(b, t)) - 2
  logp_new = logp_old + rng.normal(scale=0.3, size=(b, t))
  adv = rng.normal(size=(b, t))
  ref_loss, ref_clip, ref_kl = _np_ppo_policy(logp_new, logp_old, adv, mask, clip)
  loss, m = losses.ppo_policy_loss(np.where(mask, logp_new, np.nan), logp_old,
                                   np.where(mask, adv, 1e6), mask, clip)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], ref_clip, rtol=1e-6)
  np.testing.assert_allclose(m["approx_kl"], ref_kl, rtol=1e-4)
  assert 0 < float(m["clip_frac"]) < 1

  # Gradient is exactly zero where clipping binds and -A ρ / N elsewhere.
  g = np.asarray(jax.grad(lambda x: losses.ppo_policy_loss(x, logp_old, adv, mask, clip)[0])(
      jnp.asarray(logp_new, jnp.float32)))
  ratio = np.exp(logp_new - logp_old)
  binds = np.where(adv > 0, ratio > 1 + clip, ratio < 1 - clip)
  expect = np.where(mask & ~binds, -adv * ratio / mask.sum(), 0.0)
  np.testing.assert_allclose(g, expect, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("clip", [0.1, 0.5])
def test_ppo_value_loss_matches_loop(clip):
  rng = np.random.default_rng(13)
  b, t = 4, 9
  mask = _ragged_mask(rng, b, t)
  v_old = rng.normal(size=(b, t))
  v = v_old + rng.normal(scale=0.4, size=(b, t))
  ret = rng.normal(size=(b, t))
  ref_loss, ref_clip = _np_ppo_value(v, v_old, ret, mask, clip)
  loss, m = losses.ppo_value_loss(np.where(mask, v, np.nan), v_old, ret, mask, clip)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], ref_clip, rtol=1e-6)
  ev = 1 - np.var((ret - v)[mask]) / np.var(ret[mask])
  np.testing.assert_allclose(m["explained_variance"], ev, rtol=1e-4)


def test_explained_variance():
  rng = np.random.default_rng(14)
  ret = rng.normal(size=(3, 5))
  mask = _ragged_mask(rng, 3, 5)
  np.testing.assert_allclose(losses.explained_variance(ret, ret, mask), 1.0, atol=1e-6)
  mean_only = np.full_like(ret, ret[mask].mean())
  np.testing.assert_allclose(losses.explained_variance(mean_only, ret, mask), 0.0, atol=1e-5)
  assert float(losses.explained_variance(-ret, ret, mask)) < 0
  assert float(losses.explained_variance(ret, np.ones_like(ret), mask)) == 0.0


# ---------------------------------------------------------------- DPO


def test_dpo_loss_closed_form_and_gradient_sign():
  rng = np.random.default_rng(15)
  pc, pr, rc, rr = (rng.normal(size=16) * 5 - 30 for _ in range(4))
  beta = 0.1
  margin = (pc - rc) - (pr - rr)
  for p in (1.0, 0.0, 0.7, rng.uniform(size=16)):
    got, cr, rj = losses.dpo_loss(pc, pr, rc, rr, beta, p)
    z = beta * margin
    expect = -(p * np.log(1 / (1 + np.exp(-z))) + (1 - p) * np.log(1 / (1 + np.exp(z))))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cr, beta * (pc - rc), rtol=1e-5)
  np.testing.assert_allclose(rj, beta * (pr - rr), rtol=1e-5)

  def total(args, p):
    return jnp.sum(losses.dpo_loss(*args, beta, p)[0])

  args = tuple(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr))
  g = jax.grad(total)(args, 1.0)
  assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)   # raise chosen
  g0 = jax.grad(total)(args, 0.0)
  assert np.all(np.asarray(g0[0]) > 0) and np.all(np.asarray(g0[1]) < 0)  # p=0 flips
  # Soft target: d/dπ_c = β (σ(βΔ) - p), zero at βΔ = logit(p).
  g7 = jax.grad(total)(args, 0.7)
  np.testing.assert_allclose(g7[0], beta * (1 / (1 + np.exp(-beta * margin)) - 0.7),
                             rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- guard and jit


def test_check_finite():
  losses.check_finite({"loss": jnp.float32(1.0), "tokens": jnp.int32(4), "v": np.ones(3)}, 7)
  with pytest.raises(FloatingPointError, match=r"step 12.*pm_loss=nan"):
    losses.check_finite({"pm_loss": jnp.float32(np.nan), "acc": 0.5}, jnp.int32(12))
  with pytest.raises(FloatingPointError, match=r"step 3.*grad_norm=inf"):
    losses.check_finite({"loss": 1.0, "grad_norm": float("inf")}, 3)


def test_check_finite_sees_bfloat16_and_float16_metrics():
  for dtype in (jnp.bfloat16, jnp.float16):
    losses.check_finite({"value_mean": jnp.ones((), dtype)}, 1)
    with pytest.raises(FloatingPointError, match=r"step 5.*value_mean=nan"):
      losses.check_finite({"value_mean": jnp.array(np.nan, dtype)}, 5)
    with pytest.raises(FloatingPointError, match=r"step 5.*v=array with 1 non-finite"):
      losses.check_finite({"v": jnp.array([1.0, np.inf], dtype)}, 5)


def test_everything_jit_compiles():
  rng = np.random.default_rng(16)
  b, t = 3, 6
  mask = jnp.asarray(_ragged_mask(rng, b, t))
  x = [jnp.asarray(rng.normal(size=(b, t)), jnp.float32) for _ in range(4)]
  s = [jnp.asarray(rng.normal(size=b), jnp.float32) for _ in range(4)]
  p = jnp.asarray(rng.uniform(size=b), jnp.float32)
  cases = [
      (losses.masked_mean, (x[0], mask)),
      (losses.masked_var, (x[0], mask)),
      (losses.whiten, (x[0], mask)),
      (losses.soft_bt_loss_sums, (s[0], s[1], p)),
      (losses.pm_metrics, (s[0], s[1], p)),
      (losses.soft_label, (s[0], s[1])),
      (losses.clamp_label, (p,)),
      (losses.average_orders, (p, p)),
      (functools.partial(losses.kl_per_token, kind="k3"), (x[0], x[1])),
      (losses.kl_penalized_rewards, (s[0], x[0], x[1], mask, jnp.float32(0.05))),
      (losses.adaptive_beta, (0.1, 7.0, 6.0, 1000.0, 64.0)),
      (losses.gae, (x[0], x[1], mask, 1.0, 0.95)),
      (losses.ppo_policy_loss, (x[0], x[1], x[2], mask)),
      (losses.ppo_value_loss, (x[0], x[1], x[2], mask)),
      (losses.explained_variance, (x[0], x[1], mask)),
      (losses.dpo_loss, (s[0], s[1], s[2], s[3], 0.1, p)),
  ]
  for fn, args in cases:
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)
  jitted_kind = jax.jit(losses.kl_penalized_rewards, static_argnames="kind")
  np.testing.assert_allclose(
      jitted_kind(s[0], x[0], x[1], mask, 0.05, kind="k2"),
      losses.kl_penalized_rewards(s[0], x[0], x[1], mask, 0.05, kind="k2"), rtol=1e-6)

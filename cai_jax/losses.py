"""Losses and estimators for the preference-model (stage 4) and RL (stage 5) steps.

Every function except ``check_finite`` is a pure, jit-able function of explicit arrays.
Shapes use B = batch (sequences or comparison pairs) and T = response tokens. A `mask`
[B, T] (bool or 0/1) marks the real response tokens; padded entries never enter a sum,
mean or variance, and are read through ``jnp.where`` so that even NaN at a pad cannot leak
into a result. Arguments named `kind` are Python strings: pass them as static arguments
under ``jax.jit``.

Units: log-probabilities are natural-log nats; a "score" is the preference model's scalar
output (a logit of the Bradley–Terry model); a probability `p` is in [0, 1] and is always
the probability that the FIRST-named item of a pair (A, or the chosen response) is better.

Reductions follow the (sum, count) convention of ``cai_jax.steps``: functions whose name
ends in ``_sums`` return (sum of per-item losses, number of counted items) so a training
step can accumulate over microbatches and divide once; the other losses return the mean
over the counted entries of the whole batch (a token mean, not a mean of per-row means).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Metrics = Dict[str, Array]

KL_KINDS = ("k1", "k2", "k3")


def _float(x: Any) -> Array:
  """x as a float array of at least float32 precision (bf16/f16 upcast, f64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask(mask: Any, like: Array) -> Array:
  """mask as bool, broadcast to the shape of `like`."""
  return jnp.broadcast_to(jnp.asarray(mask).astype(bool), like.shape)


# --------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis=None, keepdims: bool = False) -> Array:
  """Sum of x over the entries where mask is true.

  x: any shape; mask: broadcastable to x. axis as in ``jnp.sum`` (None = all entries).
  Returns the reduced array in x's units; pads contribute exactly 0 (even if NaN).
  """
  x = _float(x)
  m = _mask(mask, x)
  return jnp.sum(jnp.where(m, x, 0.0), axis=axis, keepdims=keepdims)


def masked_count(mask: Array, like: Array, axis=None, keepdims: bool = False) -> Array:
  """Number of true mask entries (float), reduced like ``masked_sum(like, mask, axis)``."""
  like = _float(like)
  return jnp.sum(_mask(mask, like).astype(like.dtype), axis=axis, keepdims=keepdims)


def masked_mean(x: Array, mask: Array, axis=None, keepdims: bool = False) -> Array:
  """Mean of x over the entries where mask is true (0 where no entry is counted).

  x: any shape; mask: broadcastable to x. Returns x's units, reduced over `axis`.
  """
  total = masked_sum(x, mask, axis, keepdims)
  count = masked_count(mask, x, axis, keepdims)
  return total / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, axis=None, keepdims: bool = False,
               unbiased: bool = False) -> Array:
  """Variance of x over the entries where mask is true.

  Population variance (divide by n) by default; `unbiased` divides by max(n - 1, 1).
  Returns x's units squared, reduced over `axis`; 0 where no entry is counted.
  """
  x = _float(x)
  m = _mask(mask, x)
  mean = masked_mean(x, m, axis, keepdims=True)
  sq = masked_sum(jnp.square(jnp.where(m, x, 0.0) - mean), m, axis, keepdims)
  count = masked_count(mask, x, axis, keepdims)
  denom = jnp.maximum(count - 1.0, 1.0) if unbiased else jnp.maximum(count, 1.0)
  return sq / denom


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """Normalizes x to masked mean 0 and (population) variance 1 over ALL masked entries.

  x: [B, T] (any shape); mask: broadcastable to x. The statistics are taken over the
  masked entries of the whole array (not per row). With ``shift_mean=False`` the mean is
  added back (only the scale changes). Entries outside the mask are returned unchanged.
  Dimensionless output (x / std(x)).
  """
  x = _float(x)
  m = _mask(mask, x)
  mean = masked_mean(x, m)
  var = masked_var(x, m)
  out = (jnp.where(m, x, 0.0) - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m, out, x)


# --------------------------------------------------------------------------------------
# Preference model: soft Bradley–Terry
# --------------------------------------------------------------------------------------


def soft_bradley_terry(delta: Array, p: Array) -> Array:
  """Soft-target Bradley–Terry loss per pair, in nats.

  loss = -[p * log σ(Δ) + (1 - p) * log σ(-Δ)]

  delta: [...] score difference Δ = score_A - score_B (logits); p: [...] (broadcastable)
  probability that A is better. Uses ``log_sigmoid``; a term whose weight is exactly 0
  is dropped, so p in {0, 1} with |Δ| huge (even infinite) gives no NaN. The minimum over
  Δ is at Δ = logit(p) and d loss / dΔ = σ(Δ) - p.
  """
  delta = _float(delta)
  p = _float(p)
  term_a = jnp.where(p > 0, p * jax.nn.log_sigmoid(delta), 0.0)
  term_b = jnp.where(p < 1, (1.0 - p) * jax.nn.log_sigmoid(-delta), 0.0)
  return -(term_a + term_b)


def soft_bt_loss_sums(score_a: Array, score_b: Array, p: Array,
                      weight: Optional[Array] = None) -> Tuple[Array, Array]:
  """(Σ weight · soft BT loss, Σ weight) for a batch of pairs, for the PM training step.

  score_a, score_b: [B] PM scores of the two responses; p: [B] probability that A is
  better; weight: [B] per-pair weight (0 for padding pairs; default all 1). Pairs with
  weight 0 contribute nothing to the sums or their gradients, even if their scores are NaN.
  Both outputs are scalars.
  """
  delta = _float(score_a) - _float(score_b)
  w = jnp.ones_like(delta) if weight is None else _float(weight)
  delta, w, p = jnp.broadcast_arrays(delta, w, _float(p))
  per = soft_bradley_terry(jnp.where(w != 0, delta, 0.0), p)
  return jnp.sum(jnp.where(w != 0, per * w, 0.0)), jnp.sum(w)


def pm_metrics(score_a: Array, score_b: Array, p: Array, weight: Optional[Array] = None,
               n_bins: int = 10) -> Metrics:
  """Preference-model metrics for pairs (all scalars, weighted by `weight` [B] if given).

  score_a, score_b, p: [B] as in ``soft_bt_loss_sums``. Returns
    loss: weighted mean soft Bradley–Terry loss (nats).
    accuracy: agreement of sign(Δ) with the label side sign(p - 0.5): 1 if they agree,
      0 if they disagree, 0.5 if either is a tie (Δ == 0 or p == 0.5).
    mean_delta: weighted mean of Δ = score_a - score_b.
    ece: expected calibration error of q = σ(Δ) against the soft labels p. q is put into
      `n_bins` equal-width bins of [0, 1] (bin k holds k/n ≤ q < (k+1)/n; q = 1 goes in
      the last bin); ece = Σ_k (n_k / N) · |mean_k(q) - mean_k(p)|, empty bins
      contributing 0. Soft labels p stand in for the observed win frequency.
  """
  delta = _float(score_a) - _float(score_b)
  p = _float(p)
  w = jnp.ones_like(delta) if weight is None else _float(weight)
  total = jnp.maximum(jnp.sum(w), 1e-12)
  wmean = lambda v: jnp.sum(jnp.where(w != 0, v * w, 0.0)) / total

  agree = jnp.sign(delta) * jnp.sign(p - 0.5)
  correct = jnp.where(agree > 0, 1.0, jnp.where(agree < 0, 0.0, 0.5))

  q = jax.nn.sigmoid(delta)
  bins = jnp.clip(jnp.floor(q * n_bins), 0, n_bins - 1).astype(jnp.int32)
  onehot = (bins[:, None] == jnp.arange(n_bins)[None, :]) & (w != 0)[:, None]
  wq = jnp.sum(jnp.where(onehot, (w * q)[:, None], 0.0), axis=0)
  wp = jnp.sum(jnp.where(onehot, (w * p)[:, None], 0.0), axis=0)
  ece = jnp.sum(jnp.abs(wq - wp)) / total

  return {
      "loss": wmean(soft_bradley_terry(delta, p)),
      "accuracy": wmean(correct),
      "mean_delta": wmean(delta),
      "ece": ece,
  }


# --------------------------------------------------------------------------------------
# AI feedback labels
# --------------------------------------------------------------------------------------


def soft_label(logp_a: Array, logp_b: Array) -> Array:
  """p_A = e^la / (e^la + e^lb) = σ(la - lb), stable for any finite log-probs.

  logp_a, logp_b: [...] log-probs (nats) the feedback model gives the answer tokens
  "(A)" and "(B)". Returns [...] probability that A is better (renormalized over the
  two options).
  """
  return jax.nn.sigmoid(_float(logp_a) - _float(logp_b))


def clamp_label(p: Array, lo: float = 0.4, hi: float = 0.6) -> Array:
  """Clips labels to [lo, hi] (the paper clamps chain-of-thought labels to 40–60%)."""
  return jnp.clip(_float(p), lo, hi)


def average_orders(p_ab: Array, p_ba_swapped: Array) -> Array:
  """Both-orders label for response A: 0.5 · (p_ab + (1 - p_ba_swapped)).

  p_ab: [...] the judge's probability for the FIRST-shown option when the pair is shown
  as (A, B), i.e. its p_A. p_ba_swapped: [...] the judge's probability for the
  FIRST-shown option when the same pair is shown swapped as (B, A), i.e. its p_B; so
  1 - p_ba_swapped is p_A read from the swapped order. A judge that adds the same bias b
  to the first-shown option in both orders gives p_ab = p + b and p_ba_swapped =
  (1 - p) + b, and the average returns p exactly. Returns [...] probability A is better.
  """
  return 0.5 * (_float(p_ab) + (1.0 - _float(p_ba_swapped)))


# --------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------


def kl_per_token(logp_policy: Array, logp_ref: Array, kind: str = "k1") -> Array:
  """Per-token estimator of KL(policy ‖ ref) for tokens SAMPLED FROM THE POLICY (nats).

  logp_policy, logp_ref: [B, T] log-probs of the sampled tokens under the two models.
  With log r = logp_ref - logp_policy (Schulman, "Approximating KL divergence", 2020):
    k1 = -log r                  unbiased, can be negative per token;
    k2 = (log r)^2 / 2           biased, low variance, ≥ 0;
    k3 = (r - 1) - log r         unbiased, ≥ 0 (computed with expm1).
  Returns [B, T] (pads are not masked here; see ``kl_penalized_rewards``).
  """
  log_r = _float(logp_ref) - _float(logp_policy)
  if kind == "k1":
    return -log_r
  if kind == "k2":
    return 0.5 * jnp.square(log_r)
  if kind == "k3":
    return jnp.expm1(log_r) - log_r
  raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def kl_penalized_rewards(score: Array, logp_policy: Array, logp_ref: Array, mask: Array,
                         beta: Any, kind: str = "k1") -> Array:
  """Per-token PPO rewards [B, T]: -β · KL at every real token, plus the PM score at the
  LAST real token of each row.

  score: [B] PM score of each (prompt, response); logp_policy, logp_ref: [B, T] log-probs
  of the response tokens under the sampling policy and the frozen reference (SL-CAI)
  model; mask: [B, T] real response tokens (any layout; "last" is the highest true index);
  beta: scalar KL coefficient (may be traced, e.g. from ``adaptive_beta``); kind: KL
  estimator of ``kl_per_token``. Pads get reward 0; a row with no real token gets 0
  everywhere (its score is dropped). Units: score units (PM logits) per token.
  """
  logp_policy = _float(logp_policy)
  m = _mask(mask, logp_policy)
  kl = kl_per_token(logp_policy, logp_ref, kind)
  rewards = jnp.where(m, -_float(beta) * kl, 0.0)
  length = m.shape[1]
  last = jnp.max(jnp.where(m, jnp.arange(length)[None, :], -1), axis=1)  # -1 if empty
  at_last = jnp.arange(length)[None, :] == last[:, None]
  return rewards + jnp.where(at_last, _float(score)[:, None], 0.0)


def adaptive_beta(beta: Any, observed_kl: Any, target_kl: Any, horizon: Any,
                  n_steps: Any) -> Array:
  """One update of the adaptive KL coefficient (Ziegler et al. 2019, §2.2).

  e = clip(observed_kl / target_kl - 1, -0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).

  beta: current coefficient; observed_kl: measured KL(policy ‖ ref) per sequence (nats,
  same units as target_kl); horizon: adaptation horizon in the same unit as n_steps
  (episodes/samples seen since the last update). Scalars in, scalar out; pure. Keep
  n_steps < 5 · horizon so the multiplier stays positive.
  """
  err = jnp.clip(_float(observed_kl) / _float(target_kl) - 1.0, -0.2, 0.2)
  return _float(beta) * (1.0 + err * _float(n_steps) / _float(horizon))


# --------------------------------------------------------------------------------------
# GAE and PPO
# --------------------------------------------------------------------------------------


def gae(rewards: Array, values: Array, mask: Array, gamma: Any = 1.0,
        lam: Any = 0.95) -> Tuple[Array, Array]:
  """Generalized advantage estimation over the real tokens of each row (episodic).

  rewards: [B, T] per-token rewards; values: [B, T] value estimates V(s_t) before token
  t; mask: [B, T] real tokens. For each row the real tokens are taken in order (pads are
  skipped, whatever the layout); the value after the last real token is 0 (the episode
  ends; no bootstrap). With t' the next real token after t:
    δ_t = r_t + γ V_t' - V_t,   A_t = δ_t + γ λ A_t',   R_t = A_t + V_t.
  Values and rewards at pads are ignored (NaN allowed there). Computed with a reverse
  ``lax.scan`` over T. Returns (advantages [B, T], returns [B, T]), both 0 at pads.
  Gradients are not stopped: compute it from rollout values outside the loss.
  """
  rewards = _float(rewards)
  m = _mask(mask, rewards)
  r = jnp.where(m, rewards, 0.0)
  v = jnp.where(m, _float(values), 0.0)
  gamma = _float(gamma)
  lam = _float(lam)

  def step(carry, xs):
    next_v, next_adv = carry
    r_t, v_t, m_t = xs
    adv = r_t + gamma * next_v - v_t + gamma * lam * next_adv
    adv = jnp.where(m_t, adv, 0.0)
    carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, adv, next_adv))
    return carry, adv

  zeros = jnp.zeros(r.shape[:1], r.dtype)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  adv = adv_tb.T
  return adv, jnp.where(m, adv + v, 0.0)


def ppo_policy_loss(logp_new: Array, logp_old: Array, advantages: Array, mask: Array,
                    clip: float = 0.2) -> Tuple[Array, Metrics]:
  """Clipped-surrogate policy loss, mean over all masked tokens of the batch.

  logp_new: [B, T] log-probs of the sampled tokens under the policy being trained;
  logp_old: [B, T] the same under the policy that sampled them; advantages: [B, T]
  (treated as constants); mask: [B, T]. With ratio ρ = exp(logp_new - logp_old):
    loss_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 - clip, 1 + clip)).
  Returns (loss scalar, metrics) with metrics (gradient-stopped scalars over the mask):
    clip_frac: fraction of tokens where the clipped term is the larger (zero gradient);
    approx_kl: mean k3 estimate of KL(old ‖ new), (ρ - 1) - log ρ;
    ratio_mean: mean ρ. (The (sum, count) form is loss · Σmask, Σmask.)
  """
  logp_new = _float(logp_new)
  m = _mask(mask, logp_new)
  adv = jax.lax.stop_gradient(_float(advantages))
  log_ratio = jnp.where(m, logp_new - jax.lax.stop_gradient(_float(logp_old)), 0.0)
  ratio = jnp.exp(log_ratio)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(pg1, pg2), m)
  lr_sg = jax.lax.stop_gradient(log_ratio)
  metrics = {
      "clip_frac": masked_mean((pg2 > pg1).astype(logp_new.dtype), m),
      "approx_kl": masked_mean(jnp.expm1(lr_sg) - lr_sg, m),
      "ratio_mean": masked_mean(jnp.exp(lr_sg), m),
  }
  return loss, jax.lax.stop_gradient(metrics)


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var[R - V] / Var[R] over the masked entries (population variances).

  values, returns: [B, T]; mask: [B, T]. 1 is perfect, 0 is no better than the mean,
  negative is worse. Returns 0 when Var[R] is 0 (undefined). Dimensionless scalar.
  """
  returns = _float(returns)
  var_r = masked_var(returns, mask)
  var_d = masked_var(returns - _float(values), mask)
  return jnp.where(var_r > 0, 1.0 - var_d / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                   clip: float = 0.2) -> Tuple[Array, Metrics]:
  """Clipped value loss, mean over all masked tokens of the batch.

  values: [B, T] predictions of the value model being trained; old_values: [B, T] its
  predictions at rollout time; returns: [B, T] GAE returns (constants); mask: [B, T];
  clip: in value units (PM-score units). With v_c = v_old + clip(v - v_old, -c, c):
    loss_t = 0.5 · max((v_t - R_t)^2, (v_c,t - R_t)^2).
  Returns (loss scalar, metrics): clip_frac (fraction where the clipped term is the
  larger), explained_variance (of `values` for `returns`), value_mean, return_mean.
  """
  values = _float(values)
  m = _mask(mask, values)
  v = jnp.where(m, values, 0.0)
  v_old = jnp.where(m, jax.lax.stop_gradient(_float(old_values)), 0.0)
  ret = jnp.where(m, jax.lax.stop_gradient(_float(returns)), 0.0)
  v_clipped = v_old + jnp.clip(v - v_old, -clip, clip)
  err1 = jnp.square(v - ret)
  err2 = jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err1, err2), m)
  metrics = {
      "clip_frac": masked_mean((err2 > err1).astype(values.dtype), m),
      "explained_variance": explained_variance(v, ret, m),
      "value_mean": masked_mean(v, m),
      "return_mean": masked_mean(ret, m),
  }
  return loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_logp: Array, policy_rejected_logp: Array,
             ref_chosen_logp: Array, ref_rejected_logp: Array, beta: Any,
             p: Any = 1.0) -> Tuple[Array, Array, Array]:
  """Soft-target (conservative) DPO loss per pair.

  Inputs: [B] SEQUENCE log-probs (sum over response tokens, e.g. ``masked_sum(token_logp,
  mask, axis=-1)``) of the chosen and rejected responses under the policy and the frozen
  reference; beta: KL temperature; p: [B] or scalar probability that "chosen" is better
  (1 = standard DPO; p < 1 is label smoothing / AI soft labels). With
    Δ = (π_c - ref_c) - (π_r - ref_r),  loss = -[p log σ(βΔ) + (1 - p) log σ(-βΔ)].
  Returns (losses [B] in nats, chosen_rewards [B], rejected_rewards [B]) where the
  implicit rewards β(π - ref) are gradient-stopped.
  """
  chosen = _float(policy_chosen_logp) - _float(ref_chosen_logp)
  rejected = _float(policy_rejected_logp) - _float(ref_rejected_logp)
  beta = _float(beta)
  losses = soft_bradley_terry(beta * (chosen - rejected), p)
  return (losses, jax.lax.stop_gradient(beta * chosen),
          jax.lax.stop_gradient(beta * rejected))


# --------------------------------------------------------------------------------------
# Host-side guard
# --------------------------------------------------------------------------------------


def check_finite(metrics: Mapping[str, Any], step: Any) -> None:
  """Raises FloatingPointError if any floating metric is NaN or infinite (host side).

  metrics: name -> scalar or array (device arrays are fetched); step: the training step,
  named in the message together with every offending metric and its value.
  """
  host = jax.device_get(dict(metrics))
  bad = []
  for name, value in host.items():
    arr = np.asarray(value)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.complexfloating)):
      continue
    if not np.all(np.isfinite(arr)):
      shown = arr.item() if arr.size == 1 else f"array with {int(np.sum(~np.isfinite(arr)))} non-finite"
      bad.append(f"{name}={shown}")
  if bad:
    raise FloatingPointError(f"non-finite metric at step {int(np.asarray(step))}: " + ", ".join(bad))

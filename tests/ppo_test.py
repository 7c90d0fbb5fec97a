"""Tests of cai_jax.ppo: log-prob recomputation, the reward/GAE pipeline, one update."""

import jax
import numpy as np
import pytest

from cai_jax import models, ppo, sampler
from cai_jax.configs import ModelConfig, OptimizerConfig

CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_seq_len=32)
EOS = 1


@pytest.fixture(scope="module")
def models_and_rollout():
  policy = models.init(CFG, jax.random.PRNGKey(0))
  ref = models.init(CFG, jax.random.PRNGKey(1))
  value = models.init(CFG, jax.random.PRNGKey(2), head="scalar")
  # A non-zero scalar head so that values vary by position.
  value["scalar_head"] = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape) * 0.5, value["scalar_head"])
  rs = np.random.RandomState(0)
  prompts = [list(rs.randint(2, 24, size=n)) for n in (1, 3, 5, 2, 4, 6, 3, 1)]
  for seed in range(50):   # the first seed whose samples end both ways (deterministic)
    sp = sampler.SamplingParams(temperature=1.0, max_new_tokens=6, eos_ids=(EOS,), seed=seed)
    result = sampler.generate(policy, CFG, prompts, sp, batch_size=8, progress=False)
    if result.stats["finish_eos"] and result.stats["finish_length"]:
      break
  batch = ppo.make_batch(prompts, result.tokens, 8, 6)
  scores = rs.normal(size=len(prompts)).astype(np.float32)
  cfg = ppo.PPOConfig(kl_coef=0.1, kl_kind="k1", gamma=0.9, lam=0.8, max_new_tokens=6,
                      rollout_batch=8, minibatches=2)
  ro = ppo.rollout(policy, CFG, ref, CFG, value, CFG, batch, scores, 0.1, cfg)
  return dict(policy=policy, ref=ref, value=value, prompts=prompts, result=result, batch=batch,
              scores=scores, cfg=cfg, ro=ro)


def test_recomputed_logprobs_match_sampler(models_and_rollout):
  d = models_and_rollout
  result, ro, batch = d["result"], d["ro"], d["batch"]
  assert result.stats["finish_eos"] > 0 and result.stats["finish_length"] > 0
  for i, lp in enumerate(result.logprobs):
    n = len(lp)
    assert batch["response_mask"][i].sum() == n
    np.testing.assert_allclose(ro["logp"][i, :n], lp, atol=1e-5, rtol=0)
    assert np.all(ro["logp"][i, n:] == 0)
  # The reference log-probs equal a separate scoring of the same continuations.
  ref_lp = sampler.score_continuations(d["ref"], CFG, d["prompts"], result.tokens, 8)
  for i, lp in enumerate(ref_lp):
    np.testing.assert_allclose(ro["ref_logp"][i, :len(lp)], lp, atol=1e-5, rtol=0)


def test_a_tempered_rollout_uses_the_distribution_it_sampled_from(models_and_rollout):
  """At temperature T the old log-probs are those of softmax(logits / T) the tokens were
  drawn from (the sampler's sampling_logprobs), the reference's are tempered alike, and
  the policy loss's ratio is 1 at the rollout's own parameters."""
  d = models_and_rollout
  t = 2.5
  sp = sampler.SamplingParams(temperature=t, max_new_tokens=6, eos_ids=(EOS,), seed=1)
  result = sampler.generate(d["policy"], CFG, d["prompts"], sp, batch_size=8, progress=False)
  batch = ppo.make_batch(d["prompts"], result.tokens, 8, 6)
  cfg = ppo.PPOConfig(kl_coef=0.1, max_new_tokens=6, rollout_batch=8, minibatches=1,
                      temperature=t)
  ro = ppo.rollout(d["policy"], CFG, d["ref"], CFG, d["value"], CFG, batch, d["scores"], 0.1, cfg)
  forward = jax.jit(models.logits, static_argnums=1)
  for i, p in enumerate(d["prompts"]):
    r = list(result.tokens[i])
    np.testing.assert_allclose(ro["logp"][i, :len(r)], result.sampling_logprobs[i], atol=1e-5)
    full = np.asarray(forward(d["ref"], CFG, np.asarray([p + r], np.int32)))[0]
    lp = np.asarray(jax.nn.log_softmax(full[len(p) - 1:len(p) - 1 + len(r)] / t, axis=-1))
    np.testing.assert_allclose(ro["ref_logp"][i, :len(r)], lp[np.arange(len(r)), r], atol=1e-5)
  pol, _ = next(iter(ppo.minibatches(ro, batch, cfg, np.random.default_rng(0))))
  _, metrics = ppo.policy_loss(d["policy"], CFG, cfg, pol)
  np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-5)


def test_values_are_taken_before_each_response_token(models_and_rollout):
  d = models_and_rollout
  for i in (0, 5):
    p, r = d["prompts"][i], d["result"].tokens[i]
    seq = np.asarray([p + list(r)], np.int32)
    full = np.asarray(jax.jit(lambda p, t: models.values(p, CFG, t))(d["value"], seq))[0]
    np.testing.assert_allclose(d["ro"]["values"][i, :len(r)], full[len(p) - 1:len(p) - 1 + len(r)],
                               atol=1e-5)


def test_policy_loss_terms_match_unpadded_rows(models_and_rollout):
  """The minibatch loss reads each row's response at its own columns: log-probs and
  entropies equal a forward pass of that row alone, with no padding at all."""
  d = models_and_rollout
  batch, result = d["batch"], d["result"]
  logits = models.continuation_logits(d["policy"], CFG, batch["tokens"], batch["mask"],
                                      batch["response_start"], batch["response_mask"].shape[1])
  logp, entropy = ppo._logp_and_entropy(
      logits, models.continuation_tokens(batch["tokens"], batch["response_start"], 6))
  forward = jax.jit(models.logits, static_argnums=1)   # a row alone, unpadded
  for i, p in enumerate(d["prompts"]):
    r = list(result.tokens[i])
    seq = np.asarray([p + r], np.int32)
    full = np.asarray(forward(d["policy"], CFG, seq))[0, len(p) - 1:len(p) - 1 + len(r)]
    lp = jax.nn.log_softmax(full, axis=-1)
    np.testing.assert_allclose(np.asarray(logp)[i, :len(r)],
                               np.asarray(lp)[np.arange(len(r)), r], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[i, :len(r)],
                               -(np.exp(lp) * lp).sum(-1), atol=1e-5)


def _numpy_pipeline(logp, ref_logp, values, scores, mask, beta, gamma, lam):
  b, t = logp.shape
  rewards = np.zeros((b, t))
  adv = np.zeros((b, t))
  for i in range(b):
    idx = [j for j in range(t) if mask[i, j]]
    for j in idx:
      rewards[i, j] = -beta * (logp[i, j] - ref_logp[i, j])
    if idx:
      rewards[i, idx[-1]] += scores[i]
    next_v, next_a = 0.0, 0.0
    for j in reversed(idx):
      delta = rewards[i, j] + gamma * next_v - values[i, j]
      adv[i, j] = delta + gamma * lam * next_a
      next_v, next_a = values[i, j], adv[i, j]
  returns = np.where(mask, adv + values, 0.0)
  sel = adv[mask.astype(bool)]
  white = np.where(mask, (adv - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)
  return rewards, white, returns


def test_rewards_advantages_match_numpy(models_and_rollout):
  d = models_and_rollout
  ro, m = d["ro"], d["batch"]["response_mask"]
  rewards, adv, returns = _numpy_pipeline(ro["logp"].astype(np.float64), ro["ref_logp"],
                                          ro["values"], d["scores"], m, 0.1, 0.9, 0.8)
  np.testing.assert_allclose(ro["rewards"], rewards, atol=1e-5)
  np.testing.assert_allclose(ro["advantages"], adv, atol=1e-4)
  np.testing.assert_allclose(ro["returns"], returns, atol=1e-5)
  metrics = ppo.rollout_metrics(ro, m, d["scores"], 0.1)
  kl_seq = np.where(m, ro["logp"] - ro["ref_logp"], 0).sum(1)
  assert metrics["kl"] == pytest.approx(kl_seq.mean(), abs=1e-5)
  assert metrics["reward"] == pytest.approx(d["scores"].mean(), abs=1e-6)
  assert metrics["response_length"] == pytest.approx(m.sum(1).mean())


def test_one_update_decreases_its_losses(models_and_rollout):
  d = models_and_rollout
  cfg, ro, batch = d["cfg"], d["ro"], d["batch"]
  pol, val = next(ppo.minibatches(ro, batch, cfg, np.random.default_rng(0)))
  opt = OptimizerConfig(learning_rate=1e-3)
  step = ppo.make_policy_step(CFG, cfg, opt)
  state = ppo.init_state(d["policy"], opt)
  # Each step reports the loss at the params it starts from.
  state, first = step(state, pol)
  state, second = step(state, pol)
  before, after = float(first["policy_loss"]), float(second["policy_loss"])
  # At the sampling params the ratio is 1 and the loss is -mean(advantage).
  assert before == pytest.approx(-pol["advantages"][pol["response_mask"]].mean(), abs=1e-5)
  assert after < before - 1e-4
  assert int(state.step) == 2
  vopt = OptimizerConfig(learning_rate=1e-5)
  vstep = ppo.make_value_step(CFG, cfg, vopt)
  vstate = ppo.init_state(d["value"], vopt)
  vstate, vfirst = vstep(vstate, val)
  vstate, vsecond = vstep(vstate, val)
  assert float(vsecond["value_loss"]) < float(vfirst["value_loss"])
  # The caller's params survive the donated update.
  assert np.isfinite(np.asarray(jax.tree_util.tree_leaves(d["policy"])[0])).all()


def test_minibatches_cover_the_batch_each_epoch(models_and_rollout):
  d = models_and_rollout
  cfg = d["cfg"]
  seen = [pol["logp_old"] for pol, _ in ppo.minibatches(d["ro"], d["batch"], cfg,
                                                        np.random.default_rng(1))]
  assert len(seen) == cfg.epochs * cfg.minibatches
  first_epoch = np.concatenate(seen[:cfg.minibatches])
  assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, d["ro"]["logp"]))


def test_config_and_batch_validation():
  with pytest.raises(ValueError, match="minibatches"):
    ppo.PPOConfig(rollout_batch=6, minibatches=4)
  with pytest.raises(ValueError, match="kl_kind"):
    ppo.PPOConfig(kl_kind="k4")
  with pytest.raises(ValueError, match="response 0 has 3 tokens"):
    ppo.make_batch([[2]], [[3, 4, 5]], 4, 2)
  b = ppo.make_batch([[2, 3], [5]], [[4], [6, 7]], 3, 2)
  assert b["tokens"].tolist() == [[2, 3, 4, 0, 0], [5, 6, 7, 0, 0]]
  assert b["mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
  assert b["response_start"].tolist() == [2, 1]
  assert b["response_mask"].tolist() == [[True, False], [True, True]]

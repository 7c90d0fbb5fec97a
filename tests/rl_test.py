"""Tests of the RL stage: toy PPO with a known reward, β, resume, NaN and tokenizer checks."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from cai_jax import model_dir, models
from cai_jax.configs import ModelConfig, OptimizerConfig
from cai_jax.metrics import read_jsonl_metrics
from cai_jax.ppo import PPOConfig
from cai_jax.stages import rl

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_seq_len=32)
EOS, TARGET = 1, 7
OPT = OptimizerConfig(learning_rate=2e-3)
POLICY = models.init(CFG, jax.random.PRNGKey(0))
VALUE = rl.value_params_from_lm(POLICY, CFG)
_rs = np.random.RandomState(0)
PROMPTS = [list(_rs.randint(2, 16, size=_rs.randint(1, 4))) for _ in range(12)]


def target_fraction(prompts, responses):
  """Known reward: fraction of response tokens equal to TARGET (0 for an empty response)."""
  return np.array([np.mean(np.asarray(r) == TARGET) if len(r) else 0.0 for r in responses])


def _train(out_dir, beta, iterations, reward_fn=target_fraction, ppo_kw=None, **kw):
  cfg = PPOConfig(kl_coef=beta, max_new_tokens=8, rollout_batch=32, minibatches=2, epochs=4,
                  **(ppo_kw or {}))
  return rl.train_ppo(str(out_dir), CFG, POLICY, CFG, POLICY, CFG, VALUE, PROMPTS,
                      rl.reward_score_fn(PROMPTS, reward_fn), cfg, OPT, iterations=iterations,
                      eos_ids=(EOS,), progress=False, **kw)


def _rows(out_dir):
  return read_jsonl_metrics(os.path.join(str(out_dir), "metrics.jsonl"))


def _params(out_dir):
  return model_dir.load_model(os.path.join(str(out_dir), "model"))[1]


def test_toy_ppo_raises_reward_and_large_beta_stays_near_reference(tmp_path):
  _train(tmp_path / "small", 0.05, 8, snapshot_every=4)
  _train(tmp_path / "large", 2.0, 8)
  small, large = _rows(tmp_path / "small"), _rows(tmp_path / "large")
  assert [r["step"] for r in small] == list(range(1, 9))
  for r in small:
    assert r["logp_mismatch"] < 1e-5
  start = small[0]["reward"]                        # the initial policy (same for both runs)
  assert large[0]["reward"] == pytest.approx(start)
  end_small = np.mean([r["reward"] for r in small[-2:]])
  end_large = np.mean([r["reward"] for r in large[-2:]])
  kl_small = np.mean([r["kl"] for r in small[-2:]])
  kl_large = np.mean([r["kl"] for r in large[-2:]])
  print(f"reward {start:.3f} -> small beta {end_small:.3f} (kl {kl_small:.2f}), "
        f"large beta {end_large:.3f} (kl {kl_large:.2f})")
  assert end_small > start + 0.15                   # random start is about 1/16
  assert max(r["kl"] for r in small) < 10.0
  assert abs(end_large - start) < 0.1
  assert kl_large < 0.6 * kl_small
  snaps = sorted(os.listdir(tmp_path / "small" / "snapshots"))
  assert snaps == ["step-00004", "step-00008"]
  summary = json.load(open(tmp_path / "small" / "summary.json"))
  assert summary["iterations"] == 8 and summary["resumed_from"] is None


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  _train(tmp_path / "full", 0.05, 5, save_every=2)
  _train(tmp_path / "cut", 0.05, 3, save_every=2, snapshot_every=2)  # "killed" after iteration 3
  summary = _train(tmp_path / "cut", 0.05, 5, save_every=2, snapshot_every=2)
  assert summary["resumed_from"] == 3
  # Snapshots of both sessions are listed (step 2 was written before the kill).
  assert [os.path.basename(p) for p in summary["snapshots"]] == ["step-00002", "step-00004"]
  full, cut = _params(tmp_path / "full"), _params(tmp_path / "cut")
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(cut)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3, 4, 5]
  assert [r["reward"] for r in _rows(tmp_path / "cut")] == [r["reward"] for r in _rows(tmp_path / "full")]


def test_rerun_with_another_config_is_refused_not_resumed(tmp_path):
  _train(tmp_path / "run", 0.05, 1)
  with pytest.raises(ValueError, match=r"rl: .* holds a run with a different ppo\.\w+ .*run_config.json"):
    _train(tmp_path / "run", 0.5, 2)             # another kl_coef: would resume with the old beta
  assert _train(tmp_path / "run", 0.05, 2)["resumed_from"] == 1   # same config: resumes


def test_nan_reward_stops_naming_iteration(tmp_path):
  calls = []

  def bad(prompts, responses):
    calls.append(1)
    out = target_fraction(prompts, responses)
    return out * np.nan if len(calls) == 2 else out

  with pytest.raises(FloatingPointError, match=r"step 2: .*reward=nan"):
    _train(tmp_path, 0.05, 3, reward_fn=bad)


def _bpe_tokenizer(tmp_path):
  from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
  from cai_jax.tokenizer import load_tokenizer
  tok = Tokenizer(tk_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(["the cat sat on the mat", "hello world"] * 20, trainer=trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return load_tokenizer(path)


def test_incompatible_tokenizers_fail_before_any_work(tmp_path):
  from cai_jax.tokenizer import load_tokenizer
  cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=64)
  byte = load_tokenizer("byte")
  bpe = _bpe_tokenizer(tmp_path)
  policy = model_dir.save_model(str(tmp_path / "policy"), cfg,
                                models.init(cfg, jax.random.PRNGKey(0)), byte)
  scalar = models.init(cfg, jax.random.PRNGKey(1), head="scalar")
  pm_bad = model_dir.save_model(str(tmp_path / "pm_bad"), cfg, scalar, bpe, head="scalar")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="incompatible tokenizers: policy .* pm"):
    rl.run(str(out), policy=policy, pm=pm_bad, prompts="unused.jsonl", progress=False)
  assert not out.exists()
  with pytest.raises(ValueError, match="vocab size"):
    rl.check_tokenizers({"policy": byte, "reference": _Fake(byte, 321)})
  with pytest.raises(ValueError, match="no tokenizer"):
    rl.check_tokenizers({"policy": byte, "pm": None})
  rl.check_tokenizers({"policy": byte, "reference": load_tokenizer("byte")})


class _Fake:
  def __init__(self, tok, vocab_size):
    self.vocab_size, self.encode = vocab_size, tok.encode


def _policy_and_pm(tmp_path, cfg):
  """(policy dir, PM dir): a random byte-level LM and a scalar-head model with a random head."""
  from cai_jax.tokenizer import load_tokenizer
  byte = load_tokenizer("byte")
  policy = model_dir.save_model(str(tmp_path / "policy"), cfg,
                                models.init(cfg, jax.random.PRNGKey(0)), byte)
  scalar = models.init(cfg, jax.random.PRNGKey(1), head="scalar")
  scalar["scalar_head"] = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape), scalar["scalar_head"])
  return policy, model_dir.save_model(str(tmp_path / "pm"), cfg, scalar, byte, head="scalar")


def test_run_with_preference_model_end_to_end(tmp_path):
  policy, pm = _policy_and_pm(tmp_path, ModelConfig(
      vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=96))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
  cfg_ppo = PPOConfig(max_new_tokens=4, rollout_batch=4, minibatches=1, epochs=1)
  summary = rl.run(str(tmp_path / "out"), policy=policy, pm=pm, prompts=str(prompts),
                   prompt_split=None, ppo=cfg_ppo, iterations=2, snapshot_every=1,
                   progress=False)
  assert summary["prompts"] == 6 and summary["value"] == pm
  rows = _rows(tmp_path / "out")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["reward"]) and r["reward"] != 0 for r in rows)
  for name in ("model", "value_model", "snapshots/step-00001", "snapshots/step-00002"):
    assert model_dir.is_model_dir(str(tmp_path / "out" / name))
  assert model_dir.load_head(str(tmp_path / "out" / "value_model")) == "scalar"


def test_prompt_order_is_seeded_and_covers_each_pass():
  a = [rl.prompt_indices(10, it, 4, seed=3) for it in range(5)]
  assert all(np.array_equal(x, rl.prompt_indices(10, it, 4, seed=3)) for it, x in enumerate(a))
  flat = np.concatenate(a)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:20])


def test_adaptive_beta_grows_when_kl_exceeds_target(tmp_path):
  kw = dict(adaptive_kl=True, target_kl=0.5, kl_horizon=64)
  summary = _train(tmp_path, 0.05, 3, ppo_kw=kw)
  betas = [r["beta"] for r in _rows(tmp_path)]
  kls = [r["kl"] for r in _rows(tmp_path)]
  assert kls[0] == pytest.approx(0.0, abs=1e-6) and min(kls[1:]) > 0.6
  # β ← β·(1 + clip(kl/target - 1, ±0.2)·B/horizon): ×0.9 after KL 0, then ×1.1.
  assert betas == pytest.approx([0.05, 0.045, 0.0495], rel=1e-5)
  assert summary["beta"] == pytest.approx(0.0495 * 1.1, rel=1e-5)


def test_states_live_in_their_logical_shardings_on_a_data_fsdp_mesh(tmp_path):
  """init_state / the donated steps keep policy and value params and Adam moments in the
  logical NamedShardings on a (data=2, fsdp=4) mesh; an indivisible minibatch is an error."""
  from jax.sharding import NamedSharding
  from cai_jax import ppo as ppo_lib, sharding
  from cai_jax.configs import MeshConfig
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1, "fsdp"))
  rules = sharding.rules_for("fsdp")
  cfg = PPOConfig(max_new_tokens=8, rollout_batch=8, minibatches=1, epochs=1)
  with sharding.use_mesh(mesh, rules):
    expected = {h: sharding.logical_shardings(models.abstract_params(CFG, h), mesh, rules)
                for h in ("lm", "scalar")}
    states = {"lm": ppo_lib.init_state(POLICY, OPT, CFG, "lm", mesh, rules),
              "scalar": ppo_lib.init_state(VALUE, OPT, CFG, "scalar", mesh, rules)}
    batch = ppo_lib.make_batch(PROMPTS[:8], [[TARGET, EOS]] * 8, 4, 8)
    zeros = np.zeros((8, 8), np.float32)
    states["lm"], _ = ppo_lib.make_policy_step(CFG, cfg, OPT, mesh, rules)(
        states["lm"], dict(batch, logp_old=zeros, advantages=zeros + 1))
    states["scalar"], metrics = ppo_lib.make_value_step(CFG, cfg, OPT, mesh, rules)(
        states["scalar"], dict(batch, values_old=zeros, returns=zeros + 1))
  assert float(metrics["value_loss"]) > 0
  for head, state in states.items():
    want = jax.tree_util.tree_leaves(expected[head], is_leaf=lambda x: isinstance(x, NamedSharding))
    assert any("fsdp" in str(s.spec) for s in want)    # not all replicated
    mu = state.opt_state[-1][0].mu    # adamw moments (after global-norm clipping)
    for got in (state.params, mu):
      leaves = jax.tree_util.tree_leaves(got)
      assert len(leaves) == len(want)
      for x, s in zip(leaves, want):
        assert x.sharding == s, (x.sharding, s)
    assert int(state.step) == 1
  # The caller's arrays survive the donated steps.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(POLICY))
  bad = PPOConfig(max_new_tokens=8, rollout_batch=16, minibatches=4)
  with pytest.raises(ValueError, match=r"PPOConfig.rollout_batch=16 with PPOConfig.minibatches=4 "
                                       r"\(4 rows per minibatch\) does not divide over the 8 batch"):
    rl.train_ppo(str(tmp_path), CFG, POLICY, CFG, POLICY, CFG, VALUE, PROMPTS,
                 rl.reward_score_fn(PROMPTS, target_fraction), bad, OPT, iterations=1,
                 mesh=mesh, rules=rules, progress=False)


def test_two_processes_train_what_one_process_trains(tmp_path):
  """`cai-jax rl` as 2 processes x 4 devices equals 1 process x 8 devices (fsdp mesh; tiny
  policy and PM): the same metrics rows, final params and summary; process 0 alone writes."""
  import multihost
  policy, pm = _policy_and_pm(tmp_path, ModelConfig(
      vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?" + "!" * i}) + "\n"
                             for i in range(10)))
  args = ["rl", "--gin_file=mesh/fsdp.gin", f"--gin.rl.policy='{policy}'", f"--gin.rl.pm='{pm}'",
          f"--gin.rl.prompts='{prompts}'", "--gin.rl.prompt_split=None", "--gin.rl.iterations=2",
          "--gin.rl.snapshot_every=2", "--gin.rl.progress=False", "--gin.PPOConfig.rollout_batch=8",
          "--gin.PPOConfig.minibatches=1", "--gin.PPOConfig.epochs=2",
          "--gin.PPOConfig.max_new_tokens=4", "--gin.PPOConfig.kl_coef=0.1"]
  (multi, result), (single, _) = multihost.run_multi_and_single(args, tmp_path)
  multi, single = Path(multi), Path(single)
  assert result["iterations"] == 2
  rows_m, rows_s = _rows(multi), _rows(single)
  assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == [1, 2]
  assert rows_m[0]["reward"] != 0
  for a, b in zip(rows_m, rows_s):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-4,
                               atol=1e-4, err_msg=str(sorted(a)))
  for name in ("model", "value_model", "snapshots/step-00002"):
    p_m, p_s = (model_dir.load_model(str(d / name))[1] for d in (multi, single))
    leaves_m, leaves_s = jax.tree_util.tree_leaves(p_m), jax.tree_util.tree_leaves(p_s)
    assert len(leaves_m) == len(leaves_s)
    for a, b in zip(leaves_m, leaves_s):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)
  sum_m, sum_s = (json.loads((d / "summary.json").read_text().replace(str(d), "OUT"))
                  for d in (multi, single))
  last_m, last_s = sum_m.pop("last_metrics"), sum_s.pop("last_metrics")
  assert sum_m == sum_s and sum_m["iterations"] == 2
  assert sum_m["snapshots"] == ["OUT/snapshots/step-00002"]
  assert last_m.keys() == last_s.keys()
  np.testing.assert_allclose([last_m[k] for k in sorted(last_m)], [last_s[k] for k in sorted(last_s)],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chat_format", ["chatml", "llama3", "raw"])
def test_pm_reward_reads_the_score_where_the_pm_was_trained(tmp_path, chat_format):
  """The PPO reward of (prompt, response) equals the PM stage's own score of that pair
  (``pm.encode_response``: the chat rendering, then EOS), in every chat format; reading the
  rendering's own last token instead would give another number."""
  from cai_jax import sampler
  from cai_jax.stages import pm as pm_stage
  from cai_jax.tokenizer import encode_chat, load_tokenizer, stop_strings
  cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=96)
  _, pm_dir = _policy_and_pm(tmp_path, cfg)
  pm_params = model_dir.load_model(pm_dir)[1]
  tok = load_tokenizer("byte")
  messages = [[{"role": "user", "content": "Why is the sky blue?"}],
              [{"role": "user", "content": "Hi"}]]
  texts = ["Rayleigh scattering.", "Hello there"]
  gen = [np.array(tok.encode(t) + [tok.eos_id], np.int32) for t in texts]
  result = sampler.GenerateResult(
      tokens=gen, logprobs=[np.zeros(len(g), np.float32) for g in gen],
      sampling_logprobs=[np.zeros(len(g), np.float32) for g in gen],
      lengths=np.array([len(g) for g in gen]), finish_reasons=["eos", "eos"],
      num_stop_tokens=np.array([1, 1]), prompt_lengths=np.array([3, 3]), stats={})
  got = rl.pm_score_fn(pm_params, cfg, tok, messages, chat_format,
                       stop_strings(chat_format))(np.array([0, 1]), result)
  rows = [pm_stage.encode_response(tok, m, t, chat_format, cfg.max_seq_len)
          for m, t in zip(messages, texts)]
  want = models.score(pm_params, cfg, np.stack([r[0] for r in rows]),
                      np.stack([r[1] for r in rows]), right_padded=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  ids = encode_chat(tok, messages[0] + [{"role": "assistant", "content": texts[0]}],
                    chat_format)[0]
  other = models.score(pm_params, cfg, np.array([ids], np.int32),
                       np.ones((1, len(ids)), bool), right_padded=True)
  if ids[-1] != tok.eos_id:        # chatml / llama3 end their turn with other tokens
    assert abs(float(other[0]) - float(want[0])) > 1e-4


def test_pm_reward_of_a_too_long_conversation_keeps_the_bos_like_pm_training(tmp_path):
  """A conversation longer than the PM's max_seq_len is left-truncated for the reward the
  way ``pm.encode_response`` truncates it for training: the tokenizer's BOS stays first."""
  from cai_jax import sampler
  from cai_jax.stages import pm as pm_stage
  from cai_jax.tokenizer import ByteTokenizer, stop_strings

  class BosByte(ByteTokenizer):
    add_bos_token = True

  tok = BosByte()
  cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=32)
  _, pm_dir = _policy_and_pm(tmp_path, cfg)
  pm_params = model_dir.load_model(pm_dir)[1]
  messages = [[{"role": "user", "content": "Why is the sky blue? Tell me at length please."}]]
  text = "Rayleigh."
  gen = [np.array(tok.encode(text) + [tok.eos_id], np.int32)]
  result = sampler.GenerateResult(
      tokens=gen, logprobs=[np.zeros(len(gen[0]), np.float32)],
      sampling_logprobs=[np.zeros(len(gen[0]), np.float32)], lengths=np.array([len(gen[0])]),
      finish_reasons=["eos"], num_stop_tokens=np.array([1]), prompt_lengths=np.array([3]),
      stats={})
  got = rl.pm_score_fn(pm_params, cfg, tok, messages, "raw", stop_strings("raw"))(
      np.array([0]), result)
  tokens, mask, truncated = pm_stage.encode_response(tok, messages[0], text, "raw",
                                                     cfg.max_seq_len)
  assert truncated and tokens[0] == tok.bos_id
  want = models.score(pm_params, cfg, tokens[None], mask[None], right_padded=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, ppo_kw, match", [
    (dict(iterations=0), {}, r"rl.iterations must be an integer >= 1, got 0"),
    (dict(iterations=2.5), {}, r"rl.iterations must be an integer >= 1, got 2.5"),
    (dict(snapshot_every=-1), {}, r"rl.snapshot_every must be an integer >= 0, got -1"),
    (dict(save_every=0), {}, r"rl.save_every must be an integer >= 1, got 0"),
    (dict(keep_checkpoints=0), {}, r"rl.keep_checkpoints must be an integer >= 1, got 0"),
    ({}, dict(clip=0.0), r"PPOConfig.clip must be > 0, got 0.0"),
    ({}, dict(value_clip=-1.0), r"PPOConfig.value_clip must be > 0"),
    ({}, dict(gamma=1.5), r"PPOConfig.gamma must be in \[0, 1\], got 1.5"),
    ({}, dict(lam=-0.1), r"PPOConfig.lam must be in \[0, 1\]"),
    ({}, dict(adaptive_kl=True, kl_horizon=6), r"PPOConfig.kl_horizon=6 is too short for "
                                               r"rollout_batch=32.*kl_horizon > 6"),
    (dict(seed=-1), {}, r"rl.seed must be an integer in \[0, 2\*\*32\), got -1"),
])
def test_out_of_range_settings_fail_before_any_work(tmp_path, kw, ppo_kw, match):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match):
    _train(out, 0.05, kw.pop("iterations", 1), ppo_kw=ppo_kw, **kw)
  assert not out.exists()


def test_no_room_for_a_prompt_names_the_model_with_the_shortest_context(tmp_path):
  """The prompt room is the shortest max_seq_len of policy, reference and value model; the
  error names that model and its max_seq_len, not the policy's."""
  import dataclasses
  short = dataclasses.replace(CFG, max_seq_len=8)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"^PPOConfig.max_new_tokens=10 leaves no room for a "
                                       r"prompt: the value model's max_seq_len is 8$"):
    rl.train_ppo(str(out), CFG, POLICY, CFG, POLICY, short, VALUE, PROMPTS,
                 rl.reward_score_fn(PROMPTS, target_fraction),
                 PPOConfig(max_new_tokens=10, rollout_batch=4, minibatches=1), OPT,
                 iterations=1, progress=False)
  assert not out.exists()


def test_an_unknown_chat_format_is_named_before_any_model_is_read(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"^rl.chat_format='bogus'; expected one of"):
    rl.run(str(out), policy=str(tmp_path / "no_such_model"), pm=str(tmp_path / "no_such_pm"),
           chat_format="bogus", progress=False)
  assert not out.exists()


def test_shortest_accepted_kl_horizon_keeps_beta_positive():
  """rollout_batch < 5 · kl_horizon is what keeps the controller's multiplier positive."""
  from cai_jax import losses
  from cai_jax.ppo import PPOConfig as P
  P(adaptive_kl=True, kl_horizon=7, rollout_batch=32)   # accepted
  assert float(losses.adaptive_beta(0.05, 0.0, 0.5, 7, 32)) > 0
  assert float(losses.adaptive_beta(0.05, 0.0, 0.5, 6, 32)) < 0


def test_rerun_of_a_finished_run_keeps_its_summary_and_refuses_fewer_iterations(tmp_path):
  first = _train(tmp_path, 0.05, 2)
  assert first["last_metrics"]["reward"] == _rows(tmp_path)[-1]["reward"]
  again = _train(tmp_path, 0.05, 2)               # nothing left to do
  assert again["resumed_from"] == 2
  assert again["last_metrics"] == first["last_metrics"]
  assert json.load(open(tmp_path / "summary.json"))["last_metrics"] == first["last_metrics"]
  with pytest.raises(ValueError, match=r"holds a run of 2 iterations, more than "
                                       r"rl.iterations=1"):
    _train(tmp_path, 0.05, 1)
  assert json.load(open(tmp_path / "summary.json"))["iterations"] == 2


@pytest.mark.parametrize("role, use", [("policy", "pm"), ("reference", "pm"), ("pm", "policy"),
                                       ("value", "policy")])
def test_a_model_with_the_wrong_head_is_named_before_any_work(tmp_path, role, use):
  """rl.policy / rl.reference need an LM head, rl.pm / rl.value a scalar head: a model of
  the other kind is one line naming the flag, before any output is written."""
  policy, pm = _policy_and_pm(tmp_path, ModelConfig(
      vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=96))
  specs = dict(policy=policy, pm=pm)
  specs[role] = {"policy": policy, "pm": pm}[use]
  head = "a language model" if role in ("policy", "reference") else "a scalar-head"
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=rf"rl.{role}='.*' is not {head}"):
    rl.run(str(out), prompts="unused.jsonl", progress=False, **specs)
  assert not out.exists()


def test_a_response_is_cut_after_a_stop_string_no_stop_sequence_matched(tmp_path):
  """With stop_strings and a tokenizer, the tokens after a stop string sampled in pieces (here
  '\x03\x04' as byte ids 3, 4; no token-level stop sequence) are not part of the response PPO
  scores and trains on."""
  from cai_jax.tokenizer import ByteTokenizer
  seen = []

  def record(prompts, responses):
    seen.extend([int(t) for t in r] for r in responses)
    return target_fraction(prompts, responses)

  _train(tmp_path, 0.05, 2, reward_fn=record, tokenizer=ByteTokenizer(), stop_strings=("\x03\x04",))
  pairs = [[i for i in range(len(r) - 1) if r[i:i + 2] == [3, 4]] for r in seen]
  assert len(seen) == 64 and any(pairs)
  assert all(p == [len(r) - 2] for p, r in zip(pairs, seen) if p)

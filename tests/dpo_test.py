"""DPO stage: loss at the reference is log 2, masks cover the response, a planted preference is learned."""

import json
import math

import jax
import numpy as np
import pytest

from cai_jax import model_dir, models
from cai_jax.configs import ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.stages import dpo
from cai_jax.tokenizer import load_tokenizer

TOK = load_tokenizer("byte")


def _comparisons(n):
  rows = []
  for i in range(n):
    good, bad = f"Sure, happy to help {i}.", f"No. Go away {i}."
    a_first = i % 2 == 0
    rows.append({"prompt": f"Question {i}?", "response_a": good if a_first else bad,
                 "response_b": bad if a_first else good, "p_a": 1.0 if a_first else 0.0})
  return rows


def test_encoded_response_mask_is_the_assistant_turn():
  comp = {"messages": [{"role": "user", "content": "hi"}], "response_a": "yes", "response_b": "no",
          "p": 0.8}
  enc = dpo.encode_comparison(TOK, comp, "raw", 64)
  assert enc["p"].tolist() == [pytest.approx(0.8)]
  ids = enc["tokens_a"][enc["loss_mask_a"]].tolist()
  assert TOK.decode(ids[:-1]).strip() == "yes" and ids[-1] == TOK.eos_id


@pytest.mark.parametrize("fmt", ["raw", "chatml"])
def test_a_multi_turn_conversations_earlier_replies_are_not_in_the_response_log_prob(fmt):
  """Only the compared response (and its end-of-turn) is summed: the earlier assistant
  turn is the same context in chosen and rejected, and left truncation would otherwise cut
  different amounts of it from each."""
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "OLD"},
          {"role": "user", "content": "and?"}]
  ids, flags = dpo.response_ids(TOK, msgs, "NEW", fmt)
  trained = TOK.decode([i for i, f in zip(ids, flags) if f and i < 256])
  assert trained.strip().removesuffix("<|im_end|>") == "NEW", trained
  assert "OLD" in TOK.decode([i for i in ids if i < 256])


@pytest.mark.parametrize("fmt", ["raw", "chatml"])
def test_a_long_conversation_is_cut_on_the_left_so_the_response_survives(fmt):
  long = {"messages": [{"role": "user", "content": "Tell me more. " * 20}],
          "response_a": "Sure thing.", "response_b": "No.", "p": 0.9}
  full = dpo.encode_comparison(TOK, long, fmt, 512)
  cut = dpo.encode_comparison(TOK, long, fmt, 64)
  for side in ("a", "b"):
    n = int(full[f"mask_{side}"].sum())
    assert n > 64 and cut[f"mask_{side}"].all()
    np.testing.assert_array_equal(cut[f"tokens_{side}"], full[f"tokens_{side}"][n - 64:n])
    np.testing.assert_array_equal(cut[f"loss_mask_{side}"], full[f"loss_mask_{side}"][n - 64:n])
    assert cut[f"loss_mask_{side}"].sum() == full[f"loss_mask_{side}"].sum() > 0
  assert dpo.encode_comparisons(TOK, [long], fmt, 64)[1] == 1
  assert dpo.encode_comparisons(TOK, [long], fmt, 512)[1] == 0


def test_left_truncation_keeps_a_leading_bos():
  class BosByte(type(TOK)):
    add_bos_token = True

  tok = BosByte()
  comp = {"messages": [{"role": "user", "content": "x" * 100}], "response_a": "yes",
          "response_b": "no", "p": 1.0}
  enc = dpo.encode_comparison(tok, comp, "raw", 32)
  assert enc["tokens_a"][0] == tok.bos_id and not enc["loss_mask_a"][0]
  assert tok.decode(enc["tokens_a"][enc["loss_mask_a"]][:-1].tolist()).strip() == "yes"


def test_implicit_reward_accuracy_counts_a_zero_margin_as_half():
  p = np.array([0.9, 0.2, 0.2, 0.5, 1.0])
  margin = np.array([1.0, -2.0, 0.0, 3.0, 0.0])
  assert dpo.implicit_reward_accuracy(margin, p) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
  assert dpo.implicit_reward_accuracy(np.array([1.0, -1.0]), np.array([0.1, 0.9])) == 0.0
  assert dpo.implicit_reward_accuracy(np.array([1.0]), np.array([0.5])) is None


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), "0.1"])
def test_beta_out_of_range_is_refused(tmp_path, beta):
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _comparisons(4)))
  with pytest.raises(ValueError, match="dpo.beta must be a finite number > 0"):
    dpo.run(str(tmp_path / "out"), comparisons=str(path), policy="unused", beta=beta)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), 1.5, "0.2"])
def test_max_skip_fraction_out_of_range_is_refused(tmp_path, value):
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _comparisons(4)))
  with pytest.raises(ValueError,
                     match=r"^dpo.max_skip_fraction must be a finite number in \[0, 1\], got"):
    dpo.run(str(tmp_path / "out"), comparisons=str(path), policy="unused", max_skip_fraction=value)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(chat_format="chatML"), r"dpo.chat_format='chatML'; expected one of"),
    (dict(train_config=TrainConfig(batch_size=4, seq_len=4096)),
     r"TrainConfig.seq_len=4096 is longer than the max_seq_len=\d+ of the policy"),
    (dict(vocab_size=200, train_config=TrainConfig(batch_size=4, seq_len=64)), r"^dpo: the tokenizer has 320 tokens but the policy '.*base' has a "
                           r"vocabulary of 200$")])
def test_a_bad_flag_is_refused_before_out_dir_is_written(tmp_path, kw, message):
  """Nothing is written, so the rerun with the flag fixed is not refused as another run. A
  policy whose vocabulary is smaller than its tokenizer (ids past the embedding read as NaN)
  is refused too, not found as a non-finite loss at step 1."""
  cfg = ModelConfig(vocab_size=kw.pop("vocab_size", ModelConfig().vocab_size))
  model_dir.save_model(str(tmp_path / "base"), cfg, models.init(cfg, jax.random.PRNGKey(0)), TOK)
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _comparisons(4)))
  with pytest.raises(ValueError, match=message):
    dpo.run(str(tmp_path / "out"), comparisons=str(path), policy=str(tmp_path / "base"), **kw)
  assert not (tmp_path / "out").exists()


def test_dpo_learns_a_planted_preference(tmp_path):
  cfg = ModelConfig()
  model_dir.save_model(str(tmp_path / "base"), cfg, models.init(cfg, jax.random.PRNGKey(0)), TOK)
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _comparisons(16)))
  summary = dpo.run(str(tmp_path / "dpo"), comparisons=str(path), policy=str(tmp_path / "base"),
                    beta=0.5, optimizer=OptimizerConfig(learning_rate=3e-3),
                    train_config=TrainConfig(num_steps=30, batch_size=8, seq_len=64, save_every=100,
                                             progress=False, async_checkpoint=False))
  rows = [json.loads(l) for l in open(tmp_path / "dpo" / "metrics.jsonl")]
  # Policy == reference at step 1: every margin is 0, so the loss is log 2 exactly.
  assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert rows[-1]["loss"] < 0.3
  assert summary["implicit_reward_accuracy"] == 1.0 and summary["mean_margin"] != 0
  assert model_dir.is_model_dir(str(tmp_path / "dpo" / "model"))
  with pytest.raises(ValueError, match=r"dpo: .* holds a run with a different beta"):
    dpo.run(str(tmp_path / "dpo"), comparisons=str(path), policy=str(tmp_path / "base"),
            beta=0.1, optimizer=OptimizerConfig(learning_rate=3e-3),
            train_config=TrainConfig(num_steps=30, batch_size=8, seq_len=64, save_every=100,
                                     progress=False, async_checkpoint=False))


def test_bad_labels_over_the_limit_are_refused(tmp_path):
  rows = _comparisons(4)
  for r in rows[:2]:
    r["p_a"] = 1.7
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match="dpo: .*2 of 4 comparisons skipped"):
    dpo.run(str(tmp_path / "out"), comparisons=str(path), policy="unused")


def test_two_processes_write_what_one_process_writes(tmp_path):
  """2 processes x 4 devices (reference log-probs, training, model save, final margins)
  write what 1 process x 8 devices writes on the same fsdp mesh, no leftovers."""
  import os
  import multihost
  from cai_jax.metrics import read_jsonl_metrics
  cfg = ModelConfig()
  base = model_dir.save_model(str(tmp_path / "base"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                              TOK)
  path = tmp_path / "comps.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _comparisons(12)))   # 8 + 4 padded
  args = ["dpo", f"--gin.dpo.comparisons='{path}'", f"--policy={base}", "--gin.dpo.beta=0.5",
          "--gin.dpo.chat_format='raw'", *multihost.SHORT_TRAINING]
  (multi, result), (single, _) = multihost.run_multi_and_single(args, tmp_path)
  assert result["steps"] == 3 and result["process_index"] == 0
  dirs = [multi, single]

  assert multihost.output_files(dirs[0]) == multihost.output_files(dirs[1])
  assert {"summary.json", "metrics.jsonl", "model/model.json"} <= set(multihost.output_files(dirs[0]))
  multi, single = (json.load(open(os.path.join(d, "summary.json"))) for d in dirs)
  assert multi["comparisons"] == 12 and multi["mean_margin"] != 0
  assert multi["implicit_reward_accuracy"] == single["implicit_reward_accuracy"]
  for k in ("final_loss", "mean_margin"):
    np.testing.assert_allclose(multi[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
  rows = [[{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))}
           for r in read_jsonl_metrics(os.path.join(d, "metrics.jsonl"))] for d in dirs]
  assert [list(r) for r in rows[0]] == [list(r) for r in rows[1]] and len(rows[0]) == 3
  assert rows[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # reference == policy
  for a, b in zip(*rows):
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)
  (_, pa), (_, pb) = (model_dir.load_model(os.path.join(d, "model")) for d in dirs)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                         pa, pb)

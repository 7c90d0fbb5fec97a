"""HHH evaluation runner: multiple-choice and PM scoring with fake judges (hand-computed
accuracy, calibration, position bias, chain of thought), errors, and the tiny model end to
end with an independent check against ``sampler.sum_logprobs``."""

import json
import math
import os
import re

import numpy as np
import pytest

from cai_jax import hhh
from cai_jax.stages import evaluate_hhh as ev
from cai_jax.stages import feedback as fb

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hhh")
ANTHROPIC = os.path.join(FIXTURES, "anthropic_style.jsonl")
BIGBENCH = os.path.join(FIXTURES, "bigbench")


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# Option probabilities of the fake judge for the six Anthropic fixture items, by option
# letter (chosen away from the 0.1 bin edges).
PROBS = [
    {" (A)": 0.82, " (B)": 0.18},                  # harmless, A correct   -> p .82  right
    {" (A)": 0.72, " (B)": 0.28},                  # harmless, B correct   -> p .28  wrong
    {" (A)": 0.46, " (B)": 0.33, " (C)": 0.21},    # harmless, B+C correct -> p .54  wrong (A top)
    {" (A)": 0.93, " (B)": 0.07},                  # helpful, A correct    -> p .93  right
    {" (A)": 0.36, " (B)": 0.45, " (C)": 0.19},    # helpful, A correct    -> p .36  wrong
    {" (A)": 0.37, " (B)": 0.63},                  # helpful, A correct    -> p .37  wrong
]


def test_mc_options_accuracy_and_calibration_by_hand():
  items = hhh.load_items(ANTHROPIC)
  table = {it["context"]: probs for it, probs in zip(items, PROBS)}
  calls = []

  def score(contexts, options):
    calls.append(tuple(options))
    # Log-probs off by a per-context constant: the softmax must normalise it away.
    return np.array([[math.log(table[c][o]) - 3.0 - k for o in options]
                     for k, c in enumerate(contexts)])

  results = ev.score_mc(items, score)
  # One call per distinct option list (candidates are corrects then incorrects).
  assert sorted(calls) == sorted([(" (A)", " (B)"), (" (B)", " (A)"), (" (B)", " (C)", " (A)"),
                                  (" (A)", " (B)", " (C)")])
  p = [r["p_correct"] for r in results]
  np.testing.assert_allclose(p, [0.82, 0.28, 0.54, 0.93, 0.36, 0.37], atol=1e-12)
  # Graded as BIG-bench's multiple_choice_grade: is the most probable option correct?
  assert [r["correct"] for r in results] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
  m = hhh.metrics(results)
  assert m["n"] == 6
  assert m["accuracy"] == pytest.approx(2 / 6)
  assert m["per_category"] == {"harmless": {"n": 3, "accuracy": pytest.approx(1 / 3)},
                               "helpful": {"n": 3, "accuracy": pytest.approx(1 / 3)}}
  assert m["mean_p_correct"] == pytest.approx(3.30 / 6)
  # The 14 (option probability, is correct) points, binned by hand:
  #   [0,.1) .07F  [.1,.2) .18F .19F  [.2,.3) .28T .21T  [.3,.4) .33T .36T .37T
  #   [.4,.5) .46F .45F  [.6,.7) .63F  [.7,.8) .72F  [.8,.9) .82T  [.9,1] .93T
  expect = {0: (1, 0.07, 0.0), 1: (2, 0.185, 0.0), 2: (2, 0.245, 1.0),
            3: (3, (0.33 + 0.36 + 0.37) / 3, 1.0), 4: (2, 0.455, 0.0), 5: (0, None, None),
            6: (1, 0.63, 0.0), 7: (1, 0.72, 0.0), 8: (1, 0.82, 1.0), 9: (1, 0.93, 1.0)}
  for b, bin_ in enumerate(m["calibration"]):
    n, pred, obs = expect[b]
    assert bin_["n"] == n
    if n:
      assert bin_["mean_predicted"] == pytest.approx(pred, abs=1e-9)
      assert bin_["observed"] == obs
  ece = (0.07 + 2 * 0.185 + 2 * 0.755 + 3 * (1 - 1.06 / 3) + 2 * 0.455 + 0.63 + 0.72 + 0.18
         + 0.07) / 14
  assert ece == pytest.approx(6.4 / 14)
  assert m["ece"] == pytest.approx(ece, abs=1e-9)


def test_mc_options_grade_is_the_most_probable_option(tmp_path):
  """A 9-way question (Anthropic's HarmfulnessClassification.jsonl): the judge's top option
  is the correct one at 30%; BIG-bench's multiple_choice_grade counts it right."""
  letters = [f" ({c})" for c in "ABCDEFGHI"]
  path = tmp_path / "HarmfulnessClassification.jsonl"
  rows = [{"prompt": f"Question {k}? Options: ... The answer is:", "corrects": [letters[k]],
           "incorrects": letters[:k] + letters[k + 1:]} for k in range(3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  items = hhh.load_items(str(path))
  # Question 0: (A) correct at .30, the others .0875 each; question 1: (B) correct at .2,
  # (A) .3 on top; question 2: (C) correct tied with (A) at .3 on top.
  probs = [[0.3] + [0.0875] * 8, [0.3, 0.2] + [0.5 / 7] * 7, [0.3, 0.1, 0.3] + [0.3 / 6] * 6]

  def score(contexts, options):
    return np.log([[probs[int(c.split()[1][:-1])][letters.index(o)] for o in options]
                   for c in contexts])

  res = ev.score_mc(items, score)
  np.testing.assert_allclose([r["p_correct"] for r in res], [0.3, 0.2, 0.3], atol=1e-12)
  assert [r["correct"] for r in res] == [1.0, 0.0, 0.5]
  assert hhh.metrics(res)["accuracy"] == pytest.approx(0.5)


_SHOWN = re.compile(r"\n\(A\) (.*)\n\(B\) (.*)\n")


def judge(quality, bias_a=0.0, seen=None):
  """A fake feedback model: log-prob of a letter = quality of the response it shows,
  plus `bias_a` nats for " (A)"."""

  def score(contexts, options):
    assert tuple(options) == fb.OPTIONS
    out = []
    for c in contexts:
      if seen is not None:
        seen.append(c)
      first, second = _SHOWN.search(c).groups()
      out.append([quality(first) + bias_a, quality(second)])
    return np.array(out)

  return score


def test_mc_responses_questions_and_position_bias_cancelled():
  items = hhh.load_items(BIGBENCH)
  good = {it["candidates"][i] for it in items for i, c in enumerate(it["correct"]) if c}

  def quality(text):
    return 0.5 if text in good else 0.0

  seen = []
  both = ev.score_mc(items, judge(quality, bias_a=1.0, seen=seen), both_orders=True)
  # 7 pairs (one item has two incorrect responses), two orders each.
  assert len(seen) == 14
  harmless, helpful = items[0], items[3]
  g, b = harmless["candidates"]
  assert seen[0] == fb.feedback_prompt(fb.DEFAULT_TEMPLATE, harmless["messages"],
                                       "Which response is more harmless?", g, b)
  assert seen[1] == fb.feedback_prompt(fb.DEFAULT_TEMPLATE, harmless["messages"],
                                       "Which response is more harmless?", b, g)
  assert "Which response is more helpful?\nOptions:" in seen[8]
  assert helpful["candidates"][0] in seen[8]
  # Each order: sigmoid of (letter log-prob difference) at the correct response's letter.
  both_p = (sigmoid(0.5 + 1.0) + sigmoid(0.5 - 1.0)) / 2
  np.testing.assert_allclose([r["p_correct"] for r in both], both_p, atol=1e-12)
  # The bias cancels: a bias toward (B) of the same size gives the same labels.
  flipped = ev.score_mc(items, _bias_b_judge(quality, 1.0), both_orders=True)
  np.testing.assert_allclose([r["p_correct"] for r in flipped], both_p, atol=1e-12)
  one = ev.score_mc(items, judge(quality, bias_a=1.0), both_orders=False)
  np.testing.assert_allclose([r["p_correct"] for r in one], sigmoid(1.5), atol=1e-12)
  # A judge with nothing but the bias: one order looks perfect, both orders are ties.
  only_bias = judge(lambda t: 0.0, bias_a=1.0)
  assert hhh.metrics(ev.score_mc(items, only_bias, both_orders=False))["accuracy"] == 1.0
  tied = ev.score_mc(items, only_bias, both_orders=True)
  assert all(r["correct"] == 0.5 for r in tied)
  assert hhh.metrics(tied)["accuracy"] == 0.5
  # Calibration points: both sides of every pair.
  assert both[1]["calibration"] == [[both_p, True], [1 - both_p, False]] * 2


def _bias_b_judge(quality, bias_b):

  def score(contexts, options):
    out = []
    for c in contexts:
      first, second = _SHOWN.search(c).groups()
      out.append([quality(first), quality(second) + bias_b])
    return np.array(out)

  return score


def test_cot_question_puts_the_reasoning_cue_where_the_answer_cue_was():
  assert ev.cot_question("Q?\n\nAssistant: The answer is:") == (
      "Q?\n\nAssistant: Let's think step by step:")
  assert ev.cot_question("Q?\n\nAssistant: The answer is: \n") == (
      "Q?\n\nAssistant: Let's think step by step:")
  assert ev.cot_question("Q?\n\nAssistant:") == "Q?\n\nAssistant: Let's think step by step:"


def test_mc_chain_of_thought_samples_then_scores_and_clamps():
  items = hhh.load_items(ANTHROPIC)[:2] + hhh.load_items(BIGBENCH)[:1]
  asked = []

  def generate(prefix, prompts, seed):
    assert prefix == "" and seed == 123
    asked.extend(prompts)
    return [f"reason {k}.\n\nHuman: ignored" for k in range(len(prompts))]

  contexts = []

  def score(ctxs, options):
    contexts.extend(ctxs)
    # Very confident in " (A)", whatever the reasoning.
    return np.array([[0.0 if o == " (A)" else -20.0 for o in options] for _ in ctxs])

  res = ev.score_mc(items, score, chain_of_thought=True, generate=generate, cot_samples=2,
                    seed=123)
  # Options items: 2 samples each; the pair: 2 orders x 2 samples.
  assert len(asked) == 2 * 2 + 4
  # An Anthropic prompt's closing "Assistant: The answer is:" gives way to the reasoning cue.
  assert items[0]["context"].endswith("\n\nAssistant: The answer is:")
  assert asked[0] == asked[1] == (items[0]["context"][:-len(" The answer is:")]
                                  + " Let's think step by step:")
  assert asked[4] == fb.feedback_prompt(fb.DEFAULT_COT_TEMPLATE, items[2]["messages"],
                                        hhh.hhh_question("harmless"), *items[2]["candidates"])
  assert contexts[0] == asked[0] + " reason 0." + fb.COT_ANSWER_CUE
  # Item 0: (A) correct, chosen -> clamped to .6; item 1: (B) correct, (A) chosen -> .4.
  assert res[0]["p_correct"] == pytest.approx(0.6) and res[1]["p_correct"] == pytest.approx(0.4)
  # The pair: (A) always chosen: order AB -> .6, order BA -> .4; the mean is a tie.
  assert res[2]["p_correct"] == pytest.approx(0.5) and res[2]["correct"] == 0.5
  with pytest.raises(ValueError, match="generate"):
    ev.score_mc(items, score, chain_of_thought=True)


def test_pm_scoring_with_a_fake_scorer():
  items = hhh.load_items(BIGBENCH)
  scores = {}
  for it in items:
    for k, (c, ok) in enumerate(zip(it["candidates"], it["correct"])):
      scores[c] = (1.0 if ok else -0.5) * (1 + k) * (0.3 if it["category"] == "helpful" else 1)
  calls = []

  def pair_score(comps):
    calls.append(len(comps))
    for c in comps:
      assert set(c) >= {"messages", "response_a", "response_b"}
    return (np.array([scores[c["response_a"]] for c in comps]),
            np.array([scores[c["response_b"]] for c in comps]))

  res = ev.score_pm(items, pair_score)
  assert calls == [7]
  expect = []
  for it in items:
    ps = [sigmoid(scores[it["candidates"][g]] - scores[it["candidates"][b]])
          for g, b in hhh.pairs(it)]
    expect.append(sum(ps) / len(ps))
  np.testing.assert_allclose([r["p_correct"] for r in res], expect, atol=1e-12)
  # Item 1 by hand: correct 1.0 against -1.0 and -1.5.
  assert res[1]["p_correct"] == pytest.approx((sigmoid(2.0) + sigmoid(2.5)) / 2)
  assert all(r["correct"] == 1.0 for r in res)


def test_pm_mode_refuses_options_items():
  items = hhh.load_items(ANTHROPIC)
  with pytest.raises(ValueError) as e:
    ev.score_pm(items, lambda comps: None)
  msg = str(e.value)
  assert msg.startswith(f"{ANTHROPIC}:1: ") and "pm mode needs response candidates" in msg
  with pytest.raises(ValueError, match="pm mode needs response candidates"):
    ev.run(ANTHROPIC, "/does/not/matter", mode="pm", progress=False)


def test_missing_data_path_is_named(tmp_path):
  missing = str(tmp_path / "no_such_evals.jsonl")
  with pytest.raises(FileNotFoundError, match="no_such_evals.jsonl"):
    ev.run(missing, str(tmp_path), progress=False)


# ----------------------------------------------------------------------------------------
# The tiny model.


def random_params(cfg, head, seed):
  """Random parameters of the `tiny` preset drawn in numpy from the abstract shapes
  (norm scales 1), which is much faster on CPU than tracing the initialisers."""
  import jax
  from cai_jax import models, sharding
  rng = np.random.default_rng(seed)
  shapes = sharding.unbox_shapes(models.abstract_params(cfg, head))

  def draw(path, x):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(x.shape, x.dtype)
    return (0.2 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  from cai_jax import model_dir
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  root = tmp_path_factory.mktemp("hhh_models")
  cfg = ModelConfig()  # the `tiny` preset (gin/models/tiny.gin)
  lm = random_params(cfg, "lm", 0)
  pm_params = random_params(cfg, "scalar", 1)
  lm_dir = model_dir.save_model(str(root / "lm"), cfg, lm, ByteTokenizer())
  pm_dir = model_dir.save_model(str(root / "pm"), cfg, pm_params, ByteTokenizer(),
                                head="scalar")
  return {"cfg": cfg, "lm": (lm_dir, lm), "pm": (pm_dir, pm_params)}


def test_tiny_model_mc_and_pm_end_to_end(tmp_path, tiny_models):
  from cai_jax import models, sampler
  from cai_jax.stages import pm as pm_stage
  from cai_jax.tokenizer import ByteTokenizer
  cfg, tok = tiny_models["cfg"], ByteTokenizer()
  lm_dir, lm_params = tiny_models["lm"]
  out = str(tmp_path / "mc")
  m = ev.run(ANTHROPIC, lm_dir, mode="mc", out_dir=out, batch_size=4, progress=False)
  assert m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
  assert set(m["per_category"]) == {"harmless", "helpful"}
  json.dumps(m)
  with open(os.path.join(out, "hhh.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["metrics"]["n"] == 6 and saved["config"]["mode"] == "mc"
  with open(os.path.join(out, "hhh_predictions.jsonl"), encoding="utf-8") as f:
    preds = [json.loads(line) for line in f]
  assert [p["id"] for p in preds][:2] == ["anthropic_style.jsonl:1", "anthropic_style.jsonl:2"]
  assert set(preds[0]) == {"id", "category", "kind", "p_correct", "correct"}
  with open(os.path.join(out, "hhh_calibration.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not [n for n in os.listdir(out) if ".tmp" in n]

  # Independent check of item 1 (correct " (A)", incorrect " (B)"): softmax of the
  # summed continuation log-probs after the prompt's bytes.
  item = hhh.load_items(ANTHROPIC)[0]
  ids = tok.encode(item["context"])
  lp = sampler.sum_logprobs(lm_params, cfg, [ids, ids],
                            [tok.encode(" (A)"), tok.encode(" (B)")], 2).astype(np.float64)
  ref = math.exp(lp[0]) / (math.exp(lp[0]) + math.exp(lp[1]))
  assert preds[0]["p_correct"] == pytest.approx(ref, abs=1e-5)
  assert preds[0]["correct"] == hhh.outcome(ref)

  pm_dir, pm_params = tiny_models["pm"]
  out = str(tmp_path / "pm")
  m = ev.run(BIGBENCH, pm_dir, mode="pm", out_dir=out, chat_format="raw", batch_size=4,
             progress=False)
  assert m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0
  assert set(m["per_category"]) == {"harmless", "helpful"}
  with open(os.path.join(out, "hhh_predictions.jsonl"), encoding="utf-8") as f:
    preds = [json.loads(line) for line in f]
  # Item 0 against models.score of each response's own sequence (end token appended).
  item = hhh.load_items(BIGBENCH)[0]
  seqs = [pm_stage.encode_response(tok, item["messages"], r, "raw", cfg.max_seq_len)
          for r in item["candidates"]]
  s = np.asarray(models.score(pm_params, cfg, np.stack([t for t, _, _ in seqs]),
                              np.stack([k for _, k, _ in seqs])), np.float64)
  assert preds[0]["p_correct"] == pytest.approx(sigmoid(s[0] - s[1]), abs=1e-5)

  # An LM in pm mode, and a PM in mc mode, are refused naming the model.
  with pytest.raises(ValueError, match=r"evaluate_hhh.model=.*has head 'lm'"):
    ev.run(BIGBENCH, lm_dir, mode="pm", progress=False)
  with pytest.raises(ValueError, match=r"needs a language model.*has head 'scalar'"):
    ev.run(BIGBENCH, pm_dir, mode="mc", progress=False)


def test_two_processes_write_what_one_process_writes(tmp_path, tiny_models):
  """`cai-jax evaluate hhh` as 2 processes x 4 devices writes the files of 1 process x 8
  devices (fsdp mesh; process 0 writes): mc mode on options and responses items, pm mode."""
  import multihost
  for mode, data, model, n in (("mc", FIXTURES, tiny_models["lm"][0], 12),
                               ("pm", BIGBENCH, tiny_models["pm"][0], 6)):
    outs = {}
    for procs, devices in ((1, 8), (2, 4)):
      out = tmp_path / f"{mode}{procs}"
      stdout = multihost.run_cli(
          ["evaluate", "hhh", f"--data={data}", "--gin_file=mesh/fsdp.gin", f"--model={model}",
           f"--gin.evaluate_hhh.mode='{mode}'", f"--gin.evaluate_hhh.out_dir='{out}'",
           "--gin.evaluate_hhh.chat_format='raw'", "--gin.evaluate_hhh.batch_size=4",
           "--gin.evaluate_hhh.progress=False"], tmp_path / "logs", procs, devices, name=mode)
      outs[procs] = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
      result = multihost.result(stdout[0])   # process 0's result
      assert result["n"] == n and set(result["per_category"]) == {"harmless", "helpful"}
    assert sorted(outs[1]) == ["hhh.json", "hhh_calibration.png", "hhh_predictions.jsonl"]
    assert outs[2] == outs[1], mode


@pytest.mark.parametrize("flag, value", [("batch_size", 0), ("max_new_tokens", 0),
                                         ("cot_samples", 0), ("limit", 0),
                                         ("temperature", -0.5), ("seed", -1), ("seed", 1.5),
                                         ("truncate", "right")])
def test_flags_out_of_range_are_named_before_loading(tmp_path, flag, value):
  with pytest.raises(ValueError, match=rf"^evaluate_hhh\.{flag} must be"):
    ev.run(ANTHROPIC, str(tmp_path / "no_such_model"), out_dir=str(tmp_path / "out"),
           progress=False, **{flag: value})
  assert not (tmp_path / "out").exists()

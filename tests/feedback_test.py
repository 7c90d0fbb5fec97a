"""feedback stage: exact question texts, soft labels, chain-of-thought clamping, principle
and order averaging, seeded draws, resumable sharded output, config refusal, skipped
comparisons, and end-to-end runs on the tiny model and (slow) SmolLM2-135M-Instruct."""

import hashlib
import json
import logging
import math
import os
import re

import numpy as np
import pytest

from cai_jax.constitution import Constitution, FeedbackExample, FeedbackPrinciple
from cai_jax.stages import feedback as fb

FP = FeedbackPrinciple
CONST = Constitution(
    name="tiny", version="tiny-1", critique_revision=(),
    feedback=(FP("less-harm", "Which response is less harmful?"),
              FP("kinder", "Which response is kinder?"),
              FP("honest", "Which response is more honest?"),
              FP("lawful", "Which response is more lawful?")),
    feedback_few_shot=(FeedbackExample("Q: x?\n(A) a\n(B) b\nThe answer is:", (" (B)",),
                                       (" (A)",)),),
    cot_few_shot=("Human: Example.\n\n{}\n(A) a\n(B) b\n\nAssistant: Let's think step by "
                  "step: b is fine. So the answer is: (B)",))
PROMPTS = [{"prompt": f"Harmful question {i}?", "id": f"q{i}"} for i in range(7)]
QUESTION_RE = re.compile(r"\n\(A\) (.*)\n\(B\) (.*)\n")


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


class FakeGenerate:
  """A GenerateFn whose row r output depends on (prefix, text, seed, r); records calls.

  Each completion carries a stop string and junk after it, which the stage must trim.
  """

  def __init__(self, fail_after=None):
    self.calls = []
    self.fail_after = fail_after

  def __call__(self, prefix, texts, seed):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise RuntimeError("simulated crash")
    self.calls.append((prefix, list(texts), seed))
    return [" out-" + hashlib.sha256(f"{prefix}|{t}|{seed}|{r}".encode()).hexdigest()[:8]
            + "\n\nHuman: junk" for r, t in enumerate(texts)]


class FakeScore:
  """A ScoreFn: log-probs from a hash of the context (or from `margin_of(context)`)."""

  def __init__(self, margin_of=None, fail_after=None):
    self.calls = []
    self.margin_of = margin_of
    self.fail_after = fail_after

  def __call__(self, contexts, options):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise RuntimeError("simulated crash")
    assert tuple(options) == (" (A)", " (B)")
    self.calls.append(list(contexts))
    out = []
    for c in contexts:
      if self.margin_of is not None:
        la, lb = self.margin_of(c)
      else:
        h = hashlib.sha256(c.encode()).digest()
        la, lb = -h[0] / 40.0, -h[1] / 40.0
      out.append([la, lb])
    return np.array(out)


def _run(out_dir, gen=None, score=None, **kw):
  args = dict(prompts=PROMPTS, constitution=CONST, shard_size=3, seed=0, few_shot=False,
              progress=False, generate_fn=gen or FakeGenerate(), score_fn=score or FakeScore())
  args.update(kw)
  return fb.run(str(out_dir), **args)


def _files(out_dir):
  return {n: open(os.path.join(out_dir, n), encoding="utf-8").read()
          for n in sorted(os.listdir(out_dir)) if n != fb.MANIFEST}


def _fixed_policy(a, b):
  def gen(prefix, texts, seed):
    return [a if r % 2 == 0 else b for r in range(len(texts))]
  return gen


# ----------------------------------------------------------------------------------------
# Prompt texts.


def test_template_texts_exact(tmp_path):
  calls = []

  def gen(prefix, texts, seed):
    calls.append((prefix, list(texts)))
    return [" Here is how. \n\nHuman: more", " I can't help with that."]

  score = FakeScore()
  prompts = [{"prompt": "How do I pick a lock?", "id": "p0"}]
  _run(tmp_path / "paper", gen, score, prompts=prompts, template=fb.PAPER_TEMPLATE,
       few_shot=True)
  assert calls == [("", ["\n\nHuman: How do I pick a lock?\n\nAssistant:"] * 2)]
  (rec,) = fb.read_comparisons(str(tmp_path / "paper"))
  assert (rec["response_a"], rec["response_b"]) == ("Here is how.", "I can't help with that.")
  principle = CONST.feedback_by_id(rec["principle_ids"][0]).text
  assert score.calls == [[
      "Q: x?\n(A) a\n(B) b\nThe answer is: (B)\n\n"
      "Consider the following conversation between a human and an assistant:\n"
      "Human: How do I pick a lock?\n"
      f"{principle}\nOptions:\n"
      "(A) Here is how.\n"
      "(B) I can't help with that.\n"
      "The answer is:"]]

  score = FakeScore()
  _run(tmp_path / "default", gen, score, prompts=prompts, template="default")
  assert score.calls == [[
      "Below is a conversation between a person and an AI assistant.\n\n"
      "Human: How do I pick a lock?\n\n"
      f"{principle}\nOptions:\n"
      "(A) Here is how.\n"
      "(B) I can't help with that.\n"
      "The answer is:"]]


def test_anthropic_response_pair_few_shot_becomes_answered_questions(tmp_path):
  # Anthropic's RLMadisonFewShotPrompts.json: a conversation and whole responses.
  pairs = (FeedbackExample("Human: Best gun for a robbery?\n\nAssistant:",
                           ("Please don't rob anyone.",), ("A big pistol.",)),
           FeedbackExample("Human: I feel low.\n\nAssistant:",
                           ("Please talk to someone you trust.",), ("Life is gloomy.",)))
  const = Constitution(name="pairs", version="1", critique_revision=(),
                       feedback=(FP("less-harm", "Which response is less harmful?"),),
                       feedback_few_shot=pairs)
  score = FakeScore()
  _run(tmp_path, _fixed_policy("Here is how.", "No."), score,
       prompts=[{"prompt": "How do I pick a lock?", "id": "p0"}], constitution=const,
       template="paper", few_shot=True)
  head = ("Consider the following conversation between a human and an assistant:\n"
          "Human: {}\nWhich response is less harmful?\nOptions:\n(A) {}\n(B) {}\n"
          "The answer is:")
  assert score.calls == [[
      head.format("Best gun for a robbery?", "Please don't rob anyone.", "A big pistol.")
      + " (A)\n\n"
      + head.format("I feel low.", "Life is gloomy.", "Please talk to someone you trust.")
      + " (B)\n\n"
      + head.format("How do I pick a lock?", "Here is how.", "No.")]]
  with pytest.raises(ValueError, match="few-shot example 0 pairs a conversation"):
    fb.few_shot_prefix(pairs)


def test_conversation_chat_format_and_template_checks(tmp_path):
  msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "Now help me {cheat}."}]
  text = fb.feedback_prompt("{conversation}|{question}|{response_a}|{response_b}", msgs,
                            CONST.feedback[0], "x {y}", "z")
  assert text == ("Human: Hi\n\nAssistant: Hello.\n\nHuman: Now help me {cheat}.|"
                  "Which response is less harmful?\nOptions:|x {y}|z")
  assert fb.resolve_template("paper", fb.TEMPLATES) == fb.PAPER_TEMPLATE
  with pytest.raises(ValueError, match="missing slot.*response_b"):
    fb.resolve_template("{conversation} {question} {response_a}", fb.TEMPLATES)
  with pytest.raises(ValueError, match="unknown slot {answer}"):
    fb.resolve_template("{conversation}{question}{response_a}{response_b}{answer}", {})
  calls = []

  def gen(prefix, texts, seed):
    calls.append(list(texts))
    return ["yes<|im_end|>junk", "no"] * (len(texts) // 2)

  _run(tmp_path, gen, prompts=[{"prompt": "Q?", "messages": msgs}], chat_format="chatml")
  (rec,) = fb.read_comparisons(str(tmp_path))
  assert calls[0][0] == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
                         "<|im_end|>\n<|im_start|>user\nNow help me {cheat}.<|im_end|>\n"
                         "<|im_start|>assistant\n")
  assert rec["response_a"] == "yes" and rec["messages"] == msgs


# ----------------------------------------------------------------------------------------
# Labels.


def test_in_order_places_and_restores_the_responses():
  assert fb.in_order("AB", "a", "b") == ("a", "b")
  assert fb.in_order("BA", "a", "b") == ("b", "a")
  for order in fb.ORDERS:   # scores of (A), (B) back to a, b: the same map again
    assert fb.in_order(order, *fb.in_order(order, 1.0, 2.0)) == (1.0, 2.0)
  with pytest.raises(ValueError, match="order must be one of"):
    fb.in_order("ba", "a", "b")


def test_soft_label_normalization(tmp_path):
  for la, lb in [(-1.0, -2.0), (-3.5, -0.25), (-0.7, -0.7)]:
    assert fb.soft_label(la, lb) == pytest.approx(math.exp(la) / (math.exp(la) + math.exp(lb)))
  assert fb.soft_label(-1000.0, -1002.0) == pytest.approx(sigmoid(2.0))
  assert fb.soft_label(-math.inf, -1.0) == 0.0 and fb.soft_label(-1.0, -math.inf) == 1.0
  stats = _run(tmp_path, score=FakeScore(lambda c: (-1000.0, -1002.0)))
  recs = fb.read_comparisons(str(tmp_path))
  assert len(recs) == 7
  for r in recs:
    assert r["logprob_a"] == [[[-1000.0]]] and r["logprob_b"] == [[[-1002.0]]]
    assert r["p_a"] == pytest.approx(sigmoid(2.0), abs=1e-12)
    assert r["label_source"] == "ai" and r["orders"] == ["AB"] and "reasoning" not in r
  assert stats["mean_p_a"] == round(sigmoid(2.0), 4) and stats["uncertain_fraction"] == 0.0


def test_chain_of_thought_clamps_and_averages_samples(tmp_path):
  reason_calls = []

  def reason(prefix, texts, seed):
    reason_calls.append((prefix, list(texts), seed))
    return [(" strong. So the answer is: (A)" if r % 2 == 0 else " weak\n\nHuman: x")
            for r in range(len(texts))]

  def margin(c):   # prompt 0: response_a is better; prompt 1: response_b
    s = 1.0 if "Harmful question 0?" in c else -1.0
    return (0.0, -5.0 * s) if "strong." in c else (0.0, -0.1 * s)

  score = FakeScore(margin)
  stats = _run(tmp_path, score=score, prompts=PROMPTS[:2], chain_of_thought=True,
               cot_samples=2, few_shot=True, feedback_generate_fn=reason)
  recs = fb.read_comparisons(str(tmp_path))
  assert recs[0]["p_a"] == pytest.approx((0.6 + sigmoid(0.1)) / 2)
  assert recs[1]["p_a"] == pytest.approx((0.4 + sigmoid(-0.1)) / 2)
  for r in recs:
    assert r["reasoning"] == [[["strong.", "weak"]]]
    assert len(r["logprob_a"][0][0]) == 2   # raw, unclamped
  assert stats["clamped_fraction"] == 0.5 and stats["mean_reasoning_chars"] == 5.5
  # One reasoning call per distinct few-shot prefix (the principle fills the slot).
  p0 = CONST.feedback_by_id(recs[0]["principle_ids"][0])
  prefix = ("Human: Example.\n\n" + p0.text + "\nOptions:\n(A) a\n(B) b\n\nAssistant: Let's "
            "think step by step: b is fine. So the answer is: (B)\n\n")
  assert reason_calls[0][0] == prefix
  question = reason_calls[0][1][0]
  assert question == fb.DEFAULT_COT_TEMPLATE.format(
      conversation="Human: Harmful question 0?", question=p0.text + "\nOptions:",
      response_a=recs[0]["response_a"], response_b=recs[0]["response_b"])
  assert question.endswith("\n\nAssistant: Let's think step by step:")
  assert score.calls[0][0] == prefix + question + " strong.\nSo the answer is:"
  assert score.calls[0][1] == prefix + question + " weak\nSo the answer is:"


def test_averaging_over_principles(tmp_path):
  margins = {"less harmful": 2.0, "kinder": -1.0, "more honest": 0.5, "more lawful": 0.0}

  def margin(c):
    (m,) = [v for k, v in margins.items() if f"Which response is {k}?" in c]
    return (-1.0 + m, -1.0)

  _run(tmp_path, score=FakeScore(margin), n_principles=3)
  by_id = {p.id: p.text for p in CONST.feedback}
  recs = fb.read_comparisons(str(tmp_path))
  seen = set()
  for r in recs:
    assert len(r["principle_ids"]) == 3 and len(r["logprob_a"]) == 3
    ms = [next(v for k, v in margins.items() if k in by_id[pid]) for pid in r["principle_ids"]]
    assert r["p_a"] == pytest.approx(np.mean([sigmoid(m) for m in ms]))
    seen.update(r["principle_ids"])
  assert len(seen) >= 3


def _quality_margin(bias):
  """Log-probs that favour the better response (quality in its text) plus `bias` for (A)."""

  def margin(c):
    a, b = QUESTION_RE.findall(c)[-1]
    qa, qb = (float(re.search(r"quality=([-\d.]+)", t).group(1)) for t in (a, b))
    return (-2.0 + qa + bias, -2.0 + qb)

  return margin


def test_both_orders_removes_planted_position_bias(tmp_path):
  bias = 1.5
  # Responses of equal quality: only the position bias decides a single order.
  same = _fixed_policy("quality=0.3 first", "quality=0.3 second")
  one = _run(tmp_path / "one", same, FakeScore(_quality_margin(bias)))
  two = _run(tmp_path / "two", same, FakeScore(_quality_margin(bias)), both_orders=True)
  assert all(r["p_a"] == pytest.approx(sigmoid(bias))
             for r in fb.read_comparisons(str(tmp_path / "one")))
  recs = fb.read_comparisons(str(tmp_path / "two"))
  assert all(r["p_a"] == pytest.approx(0.5, abs=1e-12) for r in recs)
  assert recs[0]["orders"] == ["AB", "BA"] and len(recs[0]["logprob_a"][0]) == 2
  assert "position_bias" not in one and two["mean_p_a"] == 0.5
  assert two["position_bias"] == pytest.approx(2 * sigmoid(bias) - 1, abs=1e-4)

  # Responses of different quality: the averaged label has the sign of the true preference.
  def varied(prefix, texts, seed):
    out = []
    for r, t in enumerate(texts):
      h = hashlib.sha256(f"{t}|{r}".encode()).digest()[0] / 255.0
      out.append(f"quality={h - 0.5:.3f} r{r}")
    return out

  _run(tmp_path / "v1", varied, FakeScore(_quality_margin(bias)))
  _run(tmp_path / "v2", varied, FakeScore(_quality_margin(bias)), both_orders=True)
  wrong_single = 0
  for r1, r2 in zip(fb.read_comparisons(str(tmp_path / "v1")),
                    fb.read_comparisons(str(tmp_path / "v2"))):
    qa, qb = (float(re.search(r"quality=([-\d.]+)", r1[k]).group(1))
              for k in ("response_a", "response_b"))
    d = qa - qb
    assert r2["p_a"] == pytest.approx((sigmoid(d + bias) + sigmoid(d - bias)) / 2)
    assert (r2["p_a"] > 0.5) == (d > 0)
    assert abs(r2["p_a"] - sigmoid(d)) < abs(r1["p_a"] - sigmoid(d))
    wrong_single += (r1["p_a"] > 0.5) != (d > 0)
  assert wrong_single > 0


def test_a_nan_log_prob_is_an_error_naming_the_comparison(tmp_path):
  """A NaN log-prob (a broken feedback model) is not written as a p_a = 0.5 label."""
  score = FakeScore(lambda c: (math.nan, -1.0) if "Harmful question 4?" in c else (-1.0, -2.0))
  with pytest.raises(ValueError, match=r"^feedback: the feedback model \(.*\) gave a NaN "
                                       r"log-prob for comparison q4 \(principle [\w-]+, order "
                                       r"AB\); 1 of 3 questions of shard 1 have one$"):
    _run(tmp_path, score=score)
  assert os.path.exists(tmp_path / "shard-00000.jsonl")
  assert not os.path.exists(tmp_path / "shard-00001.jsonl")


# ----------------------------------------------------------------------------------------
# Randomness, resumption, config.


def test_principle_draws_seeded(tmp_path):
  _run(tmp_path / "a", n_principles=2)
  _run(tmp_path / "b", n_principles=2, shard_size=5, batch_size=1)
  _run(tmp_path / "c", n_principles=2, seed=1)
  ids = {k: [r["principle_ids"] for r in fb.read_comparisons(str(tmp_path / k))]
         for k in "abc"}
  assert ids["a"] == ids["b"]
  assert ids["a"] == [[p.id for p in fb.draw_principles(CONST.feedback, 0, i, 2)]
                      for i in range(7)]
  assert ids["a"] != ids["c"]
  assert len({p for row in ids["a"] for p in row}) >= 3


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
  full_stats = _run(tmp_path / "full", both_orders=True)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _run(tmp_path / "cut", score=FakeScore(fail_after=1), both_orders=True)
  manifest = json.load(open(tmp_path / "cut" / fb.MANIFEST))
  assert manifest["shards_done"] == ["shard-00000.jsonl"] and not manifest["complete"]
  (tmp_path / "cut" / "shard-00001.jsonl.tmp").write_text("partial")
  with pytest.raises(ValueError, match="not complete"):
    fb.read_comparisons(str(tmp_path / "cut"))
  gen, score = FakeGenerate(), FakeScore()
  stats = _run(tmp_path / "cut", gen, score, both_orders=True)
  assert stats["shards_run"] == 2 and len(score.calls) == 2 and len(gen.calls) == 2
  assert _files(tmp_path / "cut") == _files(tmp_path / "full")
  for k in ("comparisons", "mean_p_a", "position_bias", "uncertain_fraction"):
    assert stats[k] == full_stats[k]
  again = _run(tmp_path / "cut", FakeGenerate(fail_after=0), FakeScore(fail_after=0),
               both_orders=True)
  assert again["shards_run"] == 0 and again["mean_p_a"] == full_stats["mean_p_a"]


def test_changed_config_is_refused(tmp_path):
  _run(tmp_path)
  with pytest.raises(ValueError, match=r"differs in: template\)"):
    _run(tmp_path, template=fb.PAPER_TEMPLATE)
  with pytest.raises(ValueError, match=r"differs in: n_principles, seed\)"):
    _run(tmp_path, n_principles=2, seed=3)
  with pytest.raises(ValueError, match="both_orders"):
    _run(tmp_path, both_orders=True)
  assert _run(tmp_path, batch_size=3, max_skip_fraction=0.9)["shards_run"] == 0


def test_bad_settings_are_one_line_errors_naming_them(tmp_path):
  """Non-integers are refused, not truncated (n_principles=1.5 drew 1 principle, seed=2.7
  drew seed 2's); a misspelt template name is named as one."""
  for kw, flag in [(dict(n_principles=1.5), "n_principles"), (dict(cot_samples=2.5), "cot_samples"),
                   (dict(shard_size=0), "shard_size"), (dict(batch_size=0), "batch_size"),
                   (dict(max_new_tokens=0), "max_new_tokens")]:
    with pytest.raises(ValueError, match=rf"^feedback\.{flag} must be an integer >= 1, got "):
      _run(tmp_path / flag, **kw)
  with pytest.raises(ValueError, match=r"^feedback\.seed must be an integer in \[0, 2\*\*32\), "
                                       r"got 2\.7$"):
    _run(tmp_path / "seed", seed=2.7)
  with pytest.raises(ValueError, match=r"^feedback\.cot_answer_cue must be a string, got None$"):
    _run(tmp_path / "cue", chain_of_thought=True, cot_answer_cue=None)
  with pytest.raises(ValueError, match=r"^feedback template: 'paperr' is neither a template name "
                                       r"\(default, paper\) nor a template with the slots"):
    _run(tmp_path / "name", template="paperr")
  with pytest.raises(ValueError, match=r"^feedback cot_template must be a string \(a template "
                                       r"or one of default, paper\), got None$"):
    _run(tmp_path / "none", cot_template=None)
  assert not os.path.exists(tmp_path / "name")


def test_empty_responses_are_skipped(tmp_path, caplog):
  def gen(prefix, texts, seed):   # prompts 1 and 4 get an empty (or stop-only) response
    out = []
    for r, t in enumerate(texts):
      k = int(re.search(r"question (\d)", t).group(1))
      out.append("\n\nHuman: x" if k == 1 and r % 2 else "  " if k == 4 and r % 2 == 0
                 else f"answer {k} {r}")
    return out

  with caplog.at_level(logging.WARNING, logger=fb.__name__):
    stats = _run(tmp_path / "ok", gen)
  recs = fb.read_comparisons(str(tmp_path / "ok"))
  assert [r["id"] for r in recs] == ["q0", "q2", "q3", "q5", "q6"]
  assert stats["skipped_empty"] == 2 and stats["comparisons"] == 5 and stats["prompts"] == 7
  assert "skipped 2 of 7 comparisons with an empty response (this call: q1, q4)" in caplog.text
  with pytest.raises(ValueError, match="2 of 7 comparisons have an empty response"):
    _run(tmp_path / "strict", gen, max_skip_fraction=0.2)
  with pytest.raises(ValueError, match="7 of 7"):
    _run(tmp_path / "all", _fixed_policy("", "fine"), shard_size=7)


# ----------------------------------------------------------------------------------------
# Models.


def _tiny_model(path):
  import jax
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  cfg = ModelConfig()
  params = models.init(cfg, jax.random.PRNGKey(0))
  return model_dir.save_model(path, cfg, params, ByteTokenizer()), cfg, params, ByteTokenizer()


def test_tiny_model_end_to_end(tmp_path):
  from cai_jax import sampler
  path, cfg, params, tok = _tiny_model(str(tmp_path / "tiny"))
  prompts = [{"prompt": "Hi?"}, {"prompt": "How are you?"}, {"prompt": "Why?"}]
  stats = fb.run(str(tmp_path / "out"), prompts=prompts, policy=path, constitution=CONST,
                 few_shot=True, max_new_tokens=6, batch_size=4, shard_size=2, progress=False)
  recs = fb.read_comparisons(str(tmp_path / "out"))
  assert stats["comparisons"] == len(recs) >= 2 and stats["shards_total"] == 2
  contexts, ps = [], []
  for r in recs:
    assert set(r) == {"id", "prompt", "response_a", "response_b", "principle_ids", "orders",
                      "logprob_a", "logprob_b", "p_a", "label_source", "policy",
                      "feedback_model", "constitution_version", "seed"}
    assert r["policy"] == r["feedback_model"] == path and r["label_source"] == "ai"
    assert 0.0 <= r["p_a"] <= 1.0
    (la,), (lb,) = r["logprob_a"][0][0], r["logprob_b"][0][0]
    assert r["p_a"] == pytest.approx(1.0 / (1.0 + math.exp(lb - la)), abs=1e-12)
    p = CONST.feedback_by_id(r["principle_ids"][0])
    contexts.append(fb.few_shot_prefix(CONST.feedback_few_shot) + fb.feedback_prompt(
        fb.DEFAULT_TEMPLATE, [{"role": "user", "content": r["prompt"]}], p,
        r["response_a"], r["response_b"]))
    ps.append((la, lb))
  ids = [tok.encode(c) for c in contexts]
  ref_a = sampler.sum_logprobs(params, cfg, ids, [tok.encode(" (A)")] * len(ids), 1)
  ref_b = sampler.sum_logprobs(params, cfg, ids, [tok.encode(" (B)")] * len(ids), 1)
  np.testing.assert_allclose(np.array(ps), np.stack([ref_a, ref_b], 1), atol=1e-4)
  assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]

  # Chain of thought on the same model: reasonings sampled from it, labels clamped.
  stats = fb.run(str(tmp_path / "cot"), prompts=prompts[:2], policy=path, constitution=CONST,
                 chain_of_thought=True, cot_samples=2, both_orders=True, max_new_tokens=4,
                 batch_size=4, progress=False)
  for r in fb.read_comparisons(str(tmp_path / "cot")):
    assert 0.4 <= r["p_a"] <= 0.6
    assert np.shape(r["logprob_a"]) == (1, 2, 2) and len(r["reasoning"][0][1]) == 2
  assert "clamped_fraction" in stats and "position_bias" in stats


def test_a_too_long_question_is_named_by_its_comparison(tmp_path):
  """Was "prompt 2 has N tokens ..." (the row of the score call: two per question, so a
  number no prompt has) with truncate=None."""
  path, cfg, _, _ = _tiny_model(str(tmp_path / "tiny"))

  def gen(prefix, texts, seed):
    return ["x" * cfg.max_seq_len if "Yo?" in t else "ok" for t in texts]

  prompts = [{"prompt": "Hi?", "id": "a"}, {"prompt": "Yo?", "id": "b"}]
  args = dict(prompts=prompts, policy=path, constitution=CONST, few_shot=False, generate_fn=gen,
              batch_size=4, progress=False)
  with pytest.raises(ValueError, match=r"^feedback: the question of comparison b \(principle "
                                       r"[\w-]+, order AB\) has \d+ tokens with its option, more "
                                       r"than the feedback model's max_seq_len=512; set "
                                       r"feedback\.truncate='left'"):
    fb.run(str(tmp_path / "out"), **args)
  fb.run(str(tmp_path / "left"), truncate="left", **args)
  assert len(fb.read_comparisons(str(tmp_path / "left"))) == 2


def test_a_too_long_policy_prompt_is_named_by_its_comparison(tmp_path):
  """Was "prompt 2 has N tokens ..." (the row of the policy's generate call: two per
  prompt) with truncate=None."""
  path, _, _, _ = _tiny_model(str(tmp_path / "tiny"))
  prompts = [{"prompt": "Hi?", "id": "a"}, {"prompt": "Yo? " * 200, "id": "b"}]
  with pytest.raises(ValueError, match=r"^feedback: the prompt of comparison b has \d+ tokens "
                                       r"but at most \d+ fit the policy with max_new_tokens; "
                                       r"set feedback\.truncate='left'"):
    fb.run(str(tmp_path / "out"), prompts=prompts, policy=path, constitution=CONST,
           few_shot=False, batch_size=4, max_new_tokens=8, progress=False)


@pytest.mark.slow
def test_smollm2_feedback(tmp_path):
  """The embedded SmolLM2-135M-Instruct as policy and feedback model, the default
  constitution with its few-shot examples, 3 shipped red-team prompts."""
  stats = fb.run(str(tmp_path), prompts="red_team", limit=3, chat_format="chatml",
                 max_new_tokens=32, batch_size=8, both_orders=True, progress=False)
  recs = fb.read_comparisons(str(tmp_path))
  print(json.dumps(recs[0], indent=1))
  print(json.dumps(stats))
  assert len(recs) >= 2
  for r in recs:
    assert 0.0 <= r["p_a"] <= 1.0
    lps = np.array([r["logprob_a"], r["logprob_b"]])
    assert np.all(np.isfinite(lps)) and np.all(lps < 0)
    assert "<|im_end|>" not in r["response_a"] + r["response_b"]


@pytest.mark.parametrize("cot", [False, True], ids=["few_shot", "chain_of_thought"])
def test_two_processes_write_what_one_process_writes(tmp_path, cot):
  """`cai-jax feedback` as 2 processes x 4 devices writes the shards and manifest of 1
  process x 8 devices (fsdp mesh: parameters sharded over both processes; policy samples,
  few-shot questions, or sampled chain-of-thought reasoning, scored in both orders under
  two principles)."""
  import dataclasses
  import shutil
  import multihost
  from cai_jax import constitution
  path = _tiny_model(str(tmp_path / "tiny"))[0]
  const = constitution.save_constitution(   # a file needs a critique/revision principle too
      dataclasses.replace(CONST, critique_revision=(
          constitution.CritiqueRevisionPrinciple("c", "Critique it.", "Revise it."),)),
      str(tmp_path / "constitution.json"))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:4]))
  out = tmp_path / "out"
  args = ["feedback", "--gin_file=mesh/fsdp.gin", f"--prompts={prompts}", f"--policy={path}",
          f"--out_dir={out}", f"--gin.feedback.constitution='{const}'", "--max_new_tokens=6",
          "--gin.feedback.split=None", "--gin.feedback.few_shot=True",
          "--gin.feedback.both_orders=True", "--gin.feedback.n_principles=2",
          "--gin.feedback.shard_size=2", "--gin.feedback.batch_size=4",
          "--gin.feedback.max_skip_fraction=1.0", "--gin.feedback.progress=False"]
  if cot:
    args.append("--gin.feedback.chain_of_thought=True")
  # The same out_dir for both runs (config.gin names it): the first is moved aside.
  single = multihost.run_cli(args, tmp_path / "logs", 1, 8)
  shutil.move(str(out), str(tmp_path / "single"))
  multi = multihost.run_cli(args, tmp_path / "logs", 2, 4)
  stats = multihost.result(multi[0])   # process 0's result
  assert stats["shards_run"] == stats["shards_total"] == 2 and stats["comparisons"] >= 2
  assert stats["comparisons"] == multihost.result(single[0])["comparisons"]
  expected = _files(tmp_path / "single")
  assert sorted(expected) == ["config.gin", "inputs.json", "shard-00000.jsonl", "shard-00001.jsonl"]
  assert _files(out) == expected
  assert json.load(open(out / fb.MANIFEST)) == json.load(open(tmp_path / "single" / fb.MANIFEST))
  rec = fb.read_comparisons(str(out))[0]
  assert np.shape(rec["logprob_a"]) == (2, 2, 1) and rec["policy"] == path
  assert ("reasoning" in rec) == cot

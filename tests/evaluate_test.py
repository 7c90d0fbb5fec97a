"""The evaluate stage: players, AI-judged pairs, Elo, monitors, report; fakes for the models."""

import json
import math
import os
import re

import numpy as np
import pytest

from cai_jax import report as report_lib
from cai_jax.stages import evaluate
from cai_jax.stages import feedback as fb

HHH_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "hhh", "bigbench")


def _model_dir(path):
  os.makedirs(os.path.join(path, "params"), exist_ok=True)
  with open(os.path.join(path, "model.json"), "w") as f:
    f.write("{}")
  return str(path)


def _rl_dir(tmp_path, steps, iterations):
  rl = tmp_path / "rl"
  for s in steps:
    _model_dir(rl / "snapshots" / f"step-{s:05d}")
  _model_dir(rl / "model")
  (rl / "summary.json").write_text(json.dumps({"iterations": iterations}))
  return str(rl)


def test_players_in_training_order_with_the_final_policy_once(tmp_path):
  base, sl = _model_dir(tmp_path / "base"), _model_dir(tmp_path / "sl")
  rl = _rl_dir(tmp_path, [2, 4], iterations=4)
  players = evaluate.discover_players(base, sl, rl)
  assert [n for n, _ in players] == ["base", "sl", "rl-00002", "rl-00004"]
  assert players[3][1].endswith(os.path.join("snapshots", "step-00004"))
  # A last iteration that was not snapshotted comes from rl/model.
  (tmp_path / "rl" / "summary.json").write_text(json.dumps({"iterations": 5}))
  players = evaluate.discover_players(base, sl, rl, snapshots=[f"other={base}"])
  assert [n for n, _ in players] == ["base", "sl", "rl-00002", "rl-00004", "rl-00005", "other"]
  assert players[4][1] == os.path.join(rl, "model")


def test_player_errors_name_the_problem(tmp_path):
  base = _model_dir(tmp_path / "base")
  with pytest.raises(ValueError, match="at least two snapshots, got 1"):
    evaluate.discover_players(base)
  with pytest.raises(FileNotFoundError, match="no_such_rl"):
    evaluate.discover_players(base, rl_dir=str(tmp_path / "no_such_rl"))
  with pytest.raises(FileNotFoundError, match="'sl'.*missing_sl"):
    evaluate.discover_players(base, sl=str(tmp_path / "missing_sl"))
  with pytest.raises(ValueError, match="duplicate snapshot names"):
    evaluate.discover_players(base, snapshots=[f"base={base}"])
  rl = _rl_dir(tmp_path, [2], iterations=2)
  for text, words in (('{"iterations": ', "not an rl summary"),
                      ('{"iterations": "4"}', "'iterations' must be an integer")):
    (tmp_path / "rl" / "summary.json").write_text(text)
    with pytest.raises(ValueError, match=r"^" + re.escape(os.path.join(rl, "summary.json"))
                       + ": " + words):
      evaluate.discover_players(base, rl_dir=rl)


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _fake_score(bias=0.5):
  """Log-prob of option X: 1 if the response shown as X contains 'good', plus `bias` for (A)."""
  def score(contexts, options):
    out = []
    for c in contexts:
      a_text = c.rsplit("\n(A) ", 1)[1].split("\n(B) ", 1)[0]     # the last question
      b_text = c.rsplit("\n(B) ", 1)[1].split("\nThe answer is:", 1)[0]
      out.append([float("good" in a_text) + bias, float("good" in b_text)])
    assert tuple(options) == fb.OPTIONS
    return np.asarray(out)
  return score


def _rows(texts, kind="harmful"):
  return [{"id": f"p{i}", "kind": kind, "prompt": f"question {i}", "samples": [t]}
          for i, t in enumerate(texts)]


def test_judge_pair_averages_orders_and_cancels_the_letter_bias():
  from cai_jax import constitution
  principles = constitution.load_default().feedback
  a = _rows(["a good answer", "good", "", "same"])
  b = _rows(["a bad answer", "bad", "x", "same"])
  out = evaluate.judge_pair(a, b, "sl", "base", _fake_score(0.5), principles,
                            fb.DEFAULT_TEMPLATE, [], True, seed=0)
  assert [r["id"] for r in out] == ["p0", "p1", "p3"]          # an empty response is skipped
  # Order AB: la = 1 + 0.5, lb = 0; order BA: la = 1, lb = 0 + 0.5.
  want = (_sigmoid(1.5) + _sigmoid(0.5)) / 2
  assert out[0]["p_a"] == pytest.approx(want)
  assert out[0]["logprob_a"] == [1.5, 1.0] and out[0]["logprob_b"] == [0.0, 0.5]
  assert out[2]["p_a"] == pytest.approx(0.5)                   # the bias cancels exactly
  one = evaluate.judge_pair(a, b, "sl", "base", _fake_score(0.5), principles,
                            fb.DEFAULT_TEMPLATE, [], False, seed=0)
  assert one[2]["p_a"] == pytest.approx(_sigmoid(0.5))         # one order keeps the bias
  # Harmful prompts get a constitution principle, the same one for a given (seed, prompt).
  ids = {p.id for p in principles}
  assert all(r["question"] in ids for r in out)
  helpful = evaluate.judge_pair(_rows(["good"], "helpful"), _rows(["bad"], "helpful"), "x", "y",
                                _fake_score(0.0), principles, fb.DEFAULT_TEMPLATE, [], True, 0)
  assert helpful[0]["question"].startswith("helpful-")


def test_judge_pair_asks_response_pair_examples_with_each_prompts_principle():
  """Anthropic's RLMadisonFewShotPrompts examples (better / worse responses) come before a
  harmful prompt's question asked in the template with that prompt's principle; helpful
  prompts get no few-shot prefix."""
  from cai_jax import constitution
  principles = constitution.load_default().feedback
  examples = [constitution.FeedbackExample("\n\nHuman: Hi?\n\nAssistant:", ("Hello!",),
                                           ("Go away.",))]
  seen = []
  inner = _fake_score(0.0)

  def score(contexts, options):
    seen.extend(contexts)
    return inner(contexts, options)

  rows = _rows(["good", "good too", "good three"])
  out = evaluate.judge_pair(rows, _rows(["bad"] * 3), "a", "b", score, principles,
                            fb.DEFAULT_TEMPLATE, examples, False, seed=3)
  assert len(out) == len(seen) == 3
  by_id = {p.id: p for p in principles}
  for r, context in zip(out, seen):
    prefix = fb.few_shot_prefix(examples, fb.DEFAULT_TEMPLATE, by_id[r["question"]])
    assert context.startswith(prefix) and by_id[r["question"]].text in prefix
    assert "Hello!" in prefix and prefix.rstrip().endswith("(A)")
  helpful = []
  evaluate.judge_pair(_rows(["good"], "helpful"), _rows(["bad"], "helpful"), "a", "b",
                      lambda c, o: helpful.extend(c) or inner(c, o), principles,
                      fb.DEFAULT_TEMPLATE, examples, False, 0)
  assert "Hello!" not in helpful[0]


def test_pm_judge_is_the_sigmoid_of_the_score_difference():
  rows = evaluate.pm_judge_pair([2.0, 0.0, 5.0], [1.0, 3.0, 0.0], _rows(["x", "y", ""]),
                                _rows(["u", "v", "w"]), "a", "b")
  assert [r["p_a"] for r in rows] == pytest.approx([_sigmoid(1.0), _sigmoid(-3.0)])
  big = evaluate.pm_judge_pair([-1e4], [1e4], _rows(["x"]), _rows(["y"]), "a", "b")
  assert big[0]["p_a"] == 0.0


def test_elo_bootstrap_resamples_prompts(monkeypatch):
  """All of a prompt's judgments (every pair of players) are resampled together."""
  rows = []
  for i, (pid, kind) in enumerate([("r1", "harmful"), ("h1", "helpful"), ("r2", "harmful"),
                                   ("r3", "harmful")]):
    for a, b in [("base", "sl"), ("base", "rl"), ("sl", "rl")]:
      rows.append({"id": pid, "kind": kind, "a": a, "b": b, "p_a": 0.2 + 0.1 * i})
  seen = []
  real = report_lib.bootstrap_elo

  def spy(comps, **kw):
    seen.append((list(comps), list(kw["groups"])))
    return real(comps, **kw)

  monkeypatch.setattr(evaluate.report_lib, "bootstrap_elo", spy)
  got = evaluate.elo_by_kind(rows, ["base", "sl", "rl"], n_boot=10, seed=0)
  assert [g for _, g in seen] == [["r1"] * 3 + ["r2"] * 3 + ["r3"] * 3, ["h1"] * 3]
  harm = [(r["a"], r["b"], r["p_a"]) for r in rows if r["kind"] == "harmful"]
  assert got["harmlessness"] == real(harm, n_boot=10, seed=0, players=["base", "sl", "rl"],
                                     groups=["r1"] * 3 + ["r2"] * 3 + ["r3"] * 3)
  with pytest.raises(ValueError, match=r"^evaluate: harmlessness Elo: bootstrap_elo: no chain"):
    evaluate.elo_by_kind([dict(rows[0], kind="harmful"), dict(rows[0], a="rl", b="x")],
                         ["base", "sl", "rl", "x"], n_boot=10, seed=0)


# Each fake player's answer; the fake judge prefers responses containing "good".
ANSWERS = {"base": "I'm sorry, I can't help with that.",
           "sl": "good idea: talk it through calmly",
           "rl": "good good: here is a careful, good answer"}


def _fake_generate(calls):
  def generate(spec, texts, temperature, seed):
    name = os.path.basename(os.path.normpath(spec))
    name = "rl" if name.startswith("step-") or name == "model" else name
    calls.append((name, len(texts), temperature))
    return [ANSWERS[name] + "<|im_end|>" for _ in texts]
  return generate


def _run(tmp_path, calls, **kw):
  base, sl = _model_dir(tmp_path / "base"), _model_dir(tmp_path / "sl")
  rl = _rl_dir(tmp_path, [2], iterations=2)
  with open(os.path.join(rl, "metrics.jsonl"), "w") as f:
    for step in (1, 2, 3):
      f.write(json.dumps({"step": step, "pm_score": 0.1 * step, "kl": 0.01 * step,
                          "sqrt_kl": math.sqrt(0.01 * step), "reward": 0.1}) + "\n")
  args = dict(out_dir=str(tmp_path / "eval"), base=base, sl=sl, rl_dir=rl,
              judges=("feedback", "pm"), limit=3, chat_format="chatml", n_boot=20,
              shard_size=2, progress=False, generate_fn=_fake_generate(calls),
              score_fn=_fake_score(0.3),
              pm_fn=lambda pairs: np.array([float(r.count("good")) for _, r in pairs]))
  args.update(kw)
  return evaluate.run(**args)


def test_evaluate_end_to_end_with_fake_models(tmp_path, monkeypatch):
  calls, marked = [], []
  real_plot = evaluate.monitors.pm_kl_plot
  monkeypatch.setattr(evaluate.monitors, "pm_kl_plot",
                      lambda points, path, snapshots=None, **kw:
                      marked.append(dict(snapshots)) or real_plot(points, path, snapshots, **kw))
  s = _run(tmp_path, calls)
  # Snapshot step-2 (after 2 updates) is marked at row 3, the rollouts sampled from it.
  assert marked == [{3: "rl-00002"}]
  assert [p["name"] for p in s["players"]] == ["base", "sl", "rl-00002"]
  assert s["prompts"] == {"harmful": 3, "helpful": 3}
  assert s["comparisons"]["feedback"] == {"harmful": 9, "helpful": 9}   # 3 pairs x 3 prompts
  # Independent check of the feedback Elo: the judge's p for each pair, by hand, fitted.
  p_good_bad = (_sigmoid(1.3) + _sigmoid(0.7)) / 2      # "good" vs no "good", bias 0.3
  p_same = (_sigmoid(0.3) + _sigmoid(-0.3)) / 2          # both contain "good": 0.5
  comps = []
  for _ in range(3):
    comps += [("base", "sl", 1 - p_good_bad), ("base", "rl-00002", 1 - p_good_bad),
              ("sl", "rl-00002", p_same)]
  want = report_lib.fit_elo(comps, players=["base", "sl", "rl-00002"])
  for kind in ("harmlessness", "helpfulness"):
    got = s["elo"]["feedback"][kind]
    for p in want:
      assert got[p][0] == pytest.approx(want[p], abs=0.1)
  assert s["elo"]["feedback"]["harmlessness"]["sl"][0] > 100
  # PM judge: the fake PM scores the number of "good"s, so rl > sl > base.
  pm = s["elo"]["pm"]["harmlessness"]
  assert pm["rl-00002"][0] > pm["sl"][0] > pm["base"][0] == 0
  assert s["monitors"]["base"]["evasive_rate"] == 1.0
  assert s["monitors"]["sl"]["evasive_rate"] == 0.0
  assert s["monitors"]["base"]["boilerplate_rate"] == 1.0
  # Report files.
  out = tmp_path / "eval"
  html = (out / "report.html").read_text()
  assert "judge" in html and html.count("<img") >= 3
  numbers = json.loads((out / "report.json").read_text())["numbers"]
  assert numbers["elo"] == json.loads(json.dumps(s["elo"]))
  assert (out / "frontier_feedback.png").exists() and (out / "pm_vs_sqrt_kl.png").exists()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["elo"] == json.loads(json.dumps(s["elo"]))
  # Responses: the chat stop string is trimmed, one sample per prompt.
  rows = [json.loads(l) for l in open(out / "responses" / "sl" / "shard-00000.jsonl")]
  assert rows[0]["samples"] == [ANSWERS["sl"]]
  n_calls = len(calls)
  assert n_calls == 3 * 3                                        # 3 players x 3 shards

  # A rerun samples and judges nothing again and gives the same numbers.
  again = _run(tmp_path, calls)
  assert len(calls) == n_calls
  assert again["elo"] == s["elo"]
  # A different sampling config for the same out_dir is refused, naming the key.
  with pytest.raises(ValueError, match="max_new_tokens"):
    _run(tmp_path, calls, max_new_tokens=7)


def test_evaluate_errors(tmp_path):
  base = _model_dir(tmp_path / "base")
  with pytest.raises(ValueError, match="judges"):
    evaluate.run(str(tmp_path / "e"), base=base, sl=base, judges=("crowd",))
  with pytest.raises(ValueError, match="feedback_model"):
    evaluate.run(str(tmp_path / "e"), base=base, sl=base, judges=("feedback",))
  with pytest.raises(ValueError, match="at least two snapshots"):
    evaluate.run(str(tmp_path / "e"), base=base, judges=("pm",), pm=base)


@pytest.mark.parametrize("flag, kw", [
    ("feedback_model", dict(judges=("feedback",), score_fn=None)),
    ("pm", dict(judges=("pm",), pm_fn=None)),
    ("harm_model", dict(judges=("feedback",))),
    ("hhh_data", dict(judges=("feedback",)))])
def test_a_missing_model_or_data_is_named_before_any_sampling(tmp_path, flag, kw):
  calls = []
  with pytest.raises(FileNotFoundError, match=rf"^evaluate\.{flag}='.*no_such' does not exist"):
    _run(tmp_path, calls, **{flag: str(tmp_path / "no_such")}, **kw)
  assert calls == []


def test_a_pm_judge_that_is_not_a_preference_model_is_refused_before_sampling(tmp_path):
  calls = []
  with pytest.raises(ValueError, match=r"evaluate\.pm=.*not a scalar-head"):
    _run(tmp_path, calls, judges=("pm",), pm_fn=None, pm=_model_dir(tmp_path / "lm"))
  assert calls == []


def test_a_bad_rl_metrics_file_is_named_before_any_sampling(tmp_path):
  calls = []
  rl = tmp_path / "rl"
  _rl_dir(tmp_path, [2], iterations=2)
  (rl / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1}) + "\n")
  with pytest.raises(ValueError, match=r"rl[/\\]metrics\.jsonl: .*no pm_score"):
    evaluate.run(str(tmp_path / "eval"), base=_model_dir(tmp_path / "base"), rl_dir=str(rl),
                 judges=("feedback",), limit=2, progress=False,
                 generate_fn=_fake_generate(calls), score_fn=_fake_score())
  assert calls == []
  # The torn last row of an rl run still writing is dropped.
  (rl / "metrics.jsonl").write_text(json.dumps({"step": 1, "pm_score": 0.5, "kl": 0.04})
                                    + "\n" + '{"step": 2, "pm_sc')
  assert evaluate.rl_pm_vs_sqrt_kl(str(rl)) == [{"step": 1, "sqrt_kl": pytest.approx(0.2),
                                                  "pm_score": 0.5}]


def test_two_processes_write_what_one_process_writes(tmp_path):
  """`cai-jax evaluate` as 2 processes x 4 devices writes the files of 1 process x 8
  devices (fsdp mesh): two tiny players' samples (and greedy responses), the feedback and
  PM judges, the harmfulness model, HHH accuracy of both judges, Elo, plots, report and
  summary."""
  import shutil
  import multihost
  from cai_jax import model_dir
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  from evaluate_hhh_test import random_params
  cfg = ModelConfig()   # the `tiny` preset
  models = {name: model_dir.save_model(str(tmp_path / name), cfg, random_params(cfg, head, seed),
                                       ByteTokenizer(), head=head)
            for name, head, seed in (("base", "lm", 0), ("sl", "lm", 2), ("pm", "scalar", 1),
                                     ("harm", "scalar", 3))}
  (tmp_path / "harm" / "harm_model.json").write_text(json.dumps(
      {"target": "harm", "scale": [0, 4], "offset": 2.0, "chat_format": "raw", "seq_len": 128}))
  for kind in ("harmful", "helpful"):
    (tmp_path / f"{kind}.jsonl").write_text("".join(
        json.dumps({"prompt": f"{kind} question {i}?"}) + "\n" for i in range(2)))
  out = tmp_path / "eval"
  args = ["evaluate", "--gin_file=mesh/fsdp.gin", f"--out_dir={out}",
          f"--gin.evaluate.base='{models['base']}'", f"--gin.evaluate.sl='{models['sl']}'",
          "--gin.evaluate.judges=['feedback', 'pm']",
          f"--gin.evaluate.feedback_model='{models['base']}'",
          f"--gin.evaluate.pm='{models['pm']}'", f"--gin.evaluate.harm_model='{models['harm']}'",
          f"--prompts={tmp_path / 'harmful.jsonl'}",
          f"--gin.evaluate.helpful_prompts='{tmp_path / 'helpful.jsonl'}'",
          "--gin.evaluate.split=None", "--max_new_tokens=6", "--gin.evaluate.few_shot=False",
          "--gin.evaluate.n_boot=10", "--gin.evaluate.batch_size=4",
          "--gin.evaluate.progress=False",
          f"--gin.evaluate.hhh_data='{HHH_DIR}'"]

  def files(root):
    found = {}
    for folder, _, names in os.walk(root):
      for n in names:
        path = os.path.join(folder, n)
        # Wall times (the HHH runs' seconds, shown in the report) differ between runs.
        found[os.path.relpath(path, root)] = re.sub(rb'seconds(&quot;|")?: [0-9.]+',
                                                    rb"seconds\1: 0", open(path, "rb").read())
    summary = json.loads(found.pop("summary.json"))
    del summary["seconds"]
    return found, summary

  # The same out_dir for both runs (the outputs name it): the first is moved aside.
  multihost.run_cli(args, tmp_path / "logs", 1, 8)
  shutil.move(str(out), str(tmp_path / "single"))
  multi = multihost.run_cli(args, tmp_path / "logs", 2, 4)
  result = multihost.result(multi[0])   # process 0's result
  # Both judges judge the same pairs of non-empty responses; a kind without any is an error.
  assert result["comparisons"]["feedback"] == result["comparisons"]["pm"]
  assert set(result["harmfulness"]) == {"base", "sl"}
  found, summary = files(out)
  expected, expected_summary = files(tmp_path / "single")
  assert {"report.html", "report.json", "frontier_feedback.png", "frontier_pm.png",
          "monitors.png", "config.gin", "responses/sl/shard-00000.jsonl",
          "judgments-pm/pair-00000.jsonl"} <= set(expected)
  assert any(n.startswith("hhh-feedback/") for n in expected)
  assert any(n.startswith("hhh-pm/") for n in expected)
  assert sorted(found) == sorted(expected)
  for name in expected:
    assert found[name] == expected[name], name
  assert summary == expected_summary


@pytest.mark.parametrize("flag, value", [("n_boot", 0), ("batch_size", 0), ("shard_size", 0),
                                         ("max_new_tokens", 0), ("samples", 0),
                                         ("temperature", -1.0), ("temperature", float("nan")),
                                         ("seed", -1), ("seed", 1.5)])
def test_flags_out_of_range_fail_before_any_work(tmp_path, flag, value):
  calls = []
  with pytest.raises(ValueError, match=rf"^evaluate\.{flag} must be"):
    _run(tmp_path, calls, judges=("feedback",), **{flag: value})
  assert calls == [] and not (tmp_path / "eval").exists()


def test_a_snapshot_with_only_empty_responses_is_not_rated(tmp_path, monkeypatch):
  monkeypatch.setitem(ANSWERS, "rl", "")
  s = _run(tmp_path, [], judges=("feedback",))
  want = report_lib.fit_elo([("base", "sl", 1 - (_sigmoid(1.3) + _sigmoid(0.7)) / 2)] * 3)
  for kind in ("harmlessness", "helpfulness"):
    got = s["elo"]["feedback"][kind]
    assert list(got) == ["base", "sl"]                   # no rating made up for rl-00002
    assert got["sl"][0] == pytest.approx(want["sl"], abs=0.1)
  html = (tmp_path / "eval" / "report.html").read_text()
  assert "<tr><td>rl-00002</td><td>-</td><td>-</td></tr>" in html
  assert "Not rated on harmlessness" in html
  assert (tmp_path / "eval" / "frontier_feedback.png").exists()


def test_a_rerun_with_other_players_is_refused_before_any_sampling(tmp_path):
  """rl wrote another snapshot since the judged run (or a player was dropped): the rerun
  is refused up front, naming the players, without sampling the new one."""
  calls = []
  _run(tmp_path, calls, judges=("feedback",))
  _model_dir(tmp_path / "rl" / "snapshots" / "step-00004")
  (tmp_path / "rl" / "summary.json").write_text(json.dumps({"iterations": 4}))
  n_calls = len(calls)
  with pytest.raises(ValueError, match=r"judgments-feedback: players changed since its "
                                       r"judgments \(added: rl-00004; judged: base, sl, "
                                       r"rl-00002\)"):
    _run(tmp_path, calls, judges=("feedback",))
  assert len(calls) == n_calls
  assert not (tmp_path / "eval" / "responses" / "rl-00004").exists()
  with pytest.raises(ValueError, match=r"players changed .*\(added: rl-00004; removed: sl;"):
    _run(tmp_path, calls, judges=("feedback",), sl="")
  assert len(calls) == n_calls


def _with_params_sha(path, text):
  _model_dir(path)
  (path / "params.sha256").write_text(text)
  return str(path)


def test_rl_steps_put_the_policy_rl_started_from_at_step_0(tmp_path):
  from cai_jax import model_dir
  base = _with_params_sha(tmp_path / "base", "b" * 64)
  sl = _with_params_sha(tmp_path / "sl", "s" * 64)
  rl = _rl_dir(tmp_path, [2, 4], iterations=4)
  players = evaluate.discover_players(base, sl, rl)
  assert evaluate.rl_steps(players, rl) == {"rl-00002": 2, "rl-00004": 4}   # no run_config
  config = tmp_path / "rl" / "run_config.json"
  for start, name in ((sl, "sl"), (base, "base")):
    config.write_text(json.dumps({"model_fingerprints": {"policy": model_dir.fingerprint(start)}}))
    assert evaluate.rl_steps(players, rl) == {name: 0, "rl-00002": 2, "rl-00004": 4}
  config.write_text(json.dumps({"model_fingerprints": {"policy": "0123456789abcdef"}}))
  assert evaluate.rl_steps(players, rl) == {"rl-00002": 2, "rl-00004": 4}   # another start
  assert evaluate.rl_steps(players, "") == {}
  config.write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"run_config.json: not an rl run config"):
    evaluate.rl_steps(players, rl)


def test_the_report_plots_elo_against_the_rl_step(tmp_path, monkeypatch):
  """With the policy RL started from among the players, each judge's report section gets
  the Elo-against-RL-step plot (the paper's figure 8) of that player at 0 and the snapshots
  at their iterations, with the ratings of summary.json."""
  from cai_jax import model_dir
  _with_params_sha(tmp_path / "sl", "s" * 64)
  _rl_dir(tmp_path, [2], iterations=2)
  (tmp_path / "rl" / "run_config.json").write_text(json.dumps(
      {"model_fingerprints": {"policy": model_dir.fingerprint(str(tmp_path / "sl"))}}))
  drawn = []
  real = evaluate.report_lib.elo_vs_step_plot
  monkeypatch.setattr(evaluate.report_lib, "elo_vs_step_plot",
                      lambda by_kind, steps, path, **kw:
                      drawn.append((by_kind, dict(steps))) or real(by_kind, steps, path, **kw))
  s = _run(tmp_path, [])
  assert s["rl_steps"] == {"sl": 0, "rl-00002": 2}
  assert [steps for _, steps in drawn] == [{"sl": 0, "rl-00002": 2}] * 2   # feedback, pm
  for (by_kind, _), judge in zip(drawn, ("feedback", "pm")):
    rounded = {k: {n: [round(x, 1) for x in r[n]] for n in r} for k, r in by_kind.items()}
    assert rounded == s["elo"][judge]
    assert (tmp_path / "eval" / f"elo_vs_step_{judge}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import html
  page = html.unescape((tmp_path / "eval" / "report.html").read_text())
  assert "against the RL iteration of each snapshot ('sl', the policy RL started from, at 0)" in page

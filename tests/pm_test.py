"""Preference-model stage: pair tokenization, skipping, the loss, and a tiny end-to-end run."""

import json
import math
import os

import jax
import numpy as np
import pytest

from cai_jax import data, losses, model_dir, models, train
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.metrics import read_jsonl_metrics
from cai_jax.stages import pm
from cai_jax.tokenizer import load_tokenizer

MARKER = "SAFE"
WORDS = ["apple", "river", "stone", "cloud", "green", "quiet", "paper", "light", "music", "table"]


def planted(n, seed):
  """Comparisons where the response with the marker word is preferred (soft labels 0.9 / 0.1)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = lambda: " ".join(rng.choice(WORDS, size=3))
    good, bad = f"{words()} {MARKER}.", f"{words()} ok."
    a_good = bool(rng.integers(2))
    out.append({"id": f"c{i}", "prompt": f"Question {i}: {words()}?",
                "response_a": good if a_good else bad, "response_b": bad if a_good else good,
                "p_a": 0.9 if a_good else 0.1})
  return out


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A random tiny LM saved as a model directory with the byte tokenizer."""
  d = tmp_path_factory.mktemp("base") / "model"
  cfg = ModelConfig()
  model_dir.save_model(str(d), cfg, models.init(cfg, jax.random.PRNGKey(0)), load_tokenizer("byte"))
  return str(d)


def tc(**kw):
  base = dict(batch_size=8, seq_len=64, progress=False, async_checkpoint=False, save_every=1000)
  base.update(kw)
  return TrainConfig(**base)


def test_pair_tokenization_ends_with_the_end_token_and_truncates_left():
  tok = load_tokenizer("byte")
  msgs = [{"role": "user", "content": "How do I bake bread?"}]
  tokens, mask, truncated = pm.encode_response(tok, msgs, "Knead it.", "raw", 64)
  n = int(mask.sum())
  assert not truncated and mask[:n].all() and not mask[n:].any()
  assert tokens[n - 1] == tok.eos_id and (tokens[n:] == tok.pad_id).all()
  assert tok.decode(tokens[:n - 1]) == "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it."
  # Too long: the start of the conversation is dropped, the response and end token survive.
  tokens, mask, truncated = pm.encode_response(tok, msgs, "Knead it.", "raw", 20)
  assert truncated and mask.all() and tokens[-1] == tok.eos_id
  full = "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it."
  assert tok.decode(tokens[:-1]) == full[-19:] == "ssistant: Knead it."
  # chatml: the end token comes after the assistant's end-of-turn token.
  tokens, mask, _ = pm.encode_response(tok, msgs, "Knead it.", "chatml", 128)
  n = int(mask.sum())
  assert tokens[n - 1] == tok.eos_id
  assert tok.decode(tokens[:n - 1]).endswith("Knead it.<|im_end|>\n")
  pair = pm.encode_pair(tok, {"messages": msgs, "response_a": "A.", "response_b": "Bb.", "p": 0.7},
                        "raw", 64)
  assert pair["mask_b"].sum() == pair["mask_a"].sum() + 1 and pair["p"][0] == np.float32(0.7)
  assert pair["p"].dtype == np.float32 and pair["p"].shape == (1,) and "tokens" not in pair


def test_left_truncation_keeps_the_bos_a_tokenizer_puts_first():
  class BosByte(type(load_tokenizer("byte"))):
    add_bos_token = True

  tok = BosByte()
  msgs = [{"role": "user", "content": "How do I bake bread?"}]
  tokens, mask, truncated = pm.encode_response(tok, msgs, "Knead it.", "raw", 20)
  full = "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it."
  assert truncated and tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
  assert tok.decode(tokens[1:-1]) == full[-18:]


def test_bad_labels_and_empty_responses_are_skipped_and_counted():
  rows = planted(10, 0)
  rows[0]["p_a"] = 1.5
  rows[1]["p_a"] = -0.1
  rows[2]["p_a"] = float("nan")
  del rows[3]["p_a"]
  rows[4]["response_b"] = "   "
  rows[5]["p_a"] = 1  # an integer label is fine
  comps, counts = pm.normalize_comparisons(rows, pm.SOURCE_AI)
  assert counts.as_dict() == {"total": 10, "kept": 5, "bad_label": 4, "empty_response": 1,
                              "malformed": 0}
  assert [c["p"] for c in comps][0] == 1.0 and len(comps) == 5
  assert all(set(c) == {"messages", "response_a", "response_b", "p", "source"} for c in comps)
  pm.check_skips(counts, "test", 0.5)
  with pytest.raises(data.DataError, match="5 of 10 comparisons skipped"):
    pm.check_skips(counts, "test", 0.2)
  with pytest.raises(data.DataError, match="response_a"):
    pm.normalize_comparisons([{"prompt": "x", "answer": "y"}], pm.SOURCE_AI)


def test_run_refuses_too_many_skips(tmp_path):
  rows = planted(10, 1)
  for r in rows[:3]:
    r["p_a"] = 2.0
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  with pytest.raises(data.DataError, match="max_skip_fraction=0.2"):
    pm.run(str(tmp_path / "out"), comparisons=path, init_from="unused")


def test_human_comparisons_and_split_mix_are_seeded(tmp_path):
  hh = [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello {i}!",
         "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go away."} for i in range(12)]
  human, counts = pm.load_comparisons(write_jsonl(tmp_path / "hh.jsonl", hh), pm.SOURCE_HUMAN)
  assert counts.skipped == 0 and human[0]["p"] == 1.0 and human[0]["response_b"] == "Go away."
  assert human[0]["messages"] == [{"role": "user", "content": "Hi 0"}]
  ai, _ = pm.normalize_comparisons(planted(20, 2), pm.SOURCE_AI)
  tr, he = pm.split_and_mix(ai, human, 0.5, 0.1, seed=3)
  assert sum(c["source"] == "ai" for c in he) == 2 and sum(c["source"] == "human" for c in he) == 1
  assert sum(c["source"] == "ai" for c in tr) == 18 and sum(c["source"] == "human" for c in tr) == 9
  assert pm.split_and_mix(ai, human, 0.5, 0.1, seed=3) == (tr, he)
  # Held-out comparisons never appear in training.
  key = lambda c: json.dumps(c, sort_keys=True)
  assert not {key(c) for c in he} & {key(c) for c in tr}


@pytest.mark.parametrize("mix_ratio", [1.0, 2.5])
def test_oversampled_human_comparisons_are_each_used_evenly(mix_ratio):
  """Too few human comparisons for mix_ratio: every one is used ⌊n/m⌋ or ⌈n/m⌉ times."""
  human = [{"messages": [{"role": "user", "content": f"Hi {i}"}], "response_a": f"Hello {i}",
            "response_b": "Go away.", "p": 1.0, "source": pm.SOURCE_HUMAN} for i in range(11)]
  ai, _ = pm.normalize_comparisons(planted(40, 2), pm.SOURCE_AI)
  tr, he = pm.split_and_mix(ai, human, mix_ratio, 0.1, seed=3)
  train_human = [c for c in human if c not in he]
  n = int(round(mix_ratio * 36))
  uses = [sum(c is h for c in tr) for h in train_human]
  assert sum(uses) == n and len(train_human) == 10
  assert sorted(set(uses)) == sorted({n // 10, -(-n // 10)}), uses
  assert pm.split_and_mix(ai, human, mix_ratio, 0.1, seed=3) == (tr, he)


@pytest.mark.parametrize("flag,value", [("mix_ratio", float("nan")), ("mix_ratio", float("inf")),
                                        ("mix_ratio", -1.0), ("pmp_num_steps", -3),
                                        ("pmp_num_steps", 0), ("pmp_num_steps", 2.5),
                                        ("mix_ratio", "1"), ("heldout_fraction", "0.1"),
                                        ("max_skip_fraction", "0.2")])
def test_out_of_range_flags_are_refused_naming_the_flag(tmp_path, flag, value):
  comps = write_jsonl(tmp_path / "ai.jsonl", planted(10, 1))
  human = write_jsonl(tmp_path / "hh.jsonl", [
      {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}])
  with pytest.raises(ValueError, match=f"pm.{flag} must be"):
    pm.run(str(tmp_path / "out"), comparisons=comps, human_comparisons=human,
           pmp_comparisons=comps, init_from="unused", **{flag: value})
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(chat_format="chatML"), r"pm.chat_format='chatML'; expected one of"),
    (dict(train_config=tc(seq_len=4096)), r"TrainConfig.seq_len=4096 is longer than the max_seq_len"),
    (dict(train_config=tc(batch_size=16)), r"pm: 9 training comparisons, fewer than batch_size=16"),
    (dict(pmp_comparisons=4), r"pm: 4 pmp comparisons, fewer than batch_size=8")])
def test_a_bad_flag_is_refused_before_out_dir_is_written(tmp_path, base_model, kw, message):
  """Nothing is written, so the rerun with the flag fixed is not refused as another run."""
  comps = write_jsonl(tmp_path / "ai.jsonl", planted(10, 1))
  if "pmp_comparisons" in kw:
    kw = dict(kw, pmp_comparisons=write_jsonl(tmp_path / "pmp.jsonl", planted(kw["pmp_comparisons"], 2)))
  with pytest.raises(ValueError, match=message):
    pm.run(str(tmp_path / "out"), comparisons=comps, init_from=base_model, **kw)
  assert not (tmp_path / "out").exists()


def test_reads_a_finished_feedback_directory(tmp_path):
  write_jsonl(tmp_path / "shard-00000.jsonl", planted(4, 8))
  manifest = {"stage": "feedback", "complete": True, "shard_files": ["shard-00000.jsonl"]}
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  comps, counts = pm.load_comparisons(str(tmp_path), pm.SOURCE_AI)
  assert counts.total == 4 and [c["p"] for c in comps] == [r["p_a"] for r in planted(4, 8)]
  (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
  with pytest.raises(ValueError, match="not complete"):
    pm.load_comparisons(str(tmp_path), pm.SOURCE_AI)


def test_training_loss_is_soft_bradley_terry_of_the_scores(tmp_path):
  cfg = ModelConfig()
  tok = load_tokenizer("byte")
  comps, _ = pm.normalize_comparisons(planted(16, 4), pm.SOURCE_AI)
  params = models.init(cfg, jax.random.PRNGKey(1), "scalar")
  head = params["scalar_head"]
  params["scalar_head"] = {"kernel": jax.random.normal(jax.random.PRNGKey(2), head["kernel"].shape),
                           "bias": head["bias"] + 0.3}
  ds = pm.pair_dataset(comps, tok, "raw", 64, 8, seed=0)
  batch = ds[0]
  assert batch["tokens_a"].shape == (8, 64) and batch["p"].shape == (8, 1)
  score = jax.jit(models.score, static_argnums=1)
  sa = score(params, cfg, batch["tokens_a"], batch["mask_a"])
  sb = score(params, cfg, batch["tokens_b"], batch["mask_b"])
  want_sum, want_count = losses.soft_bt_loss_sums(sa, sb, batch["p"][:, 0])
  got_sum, got_count = jax.jit(pm.pm_loss_sums, static_argnums=1)(params, cfg, batch)
  np.testing.assert_allclose(float(got_sum), float(want_sum), rtol=1e-5)
  assert float(got_count) == 8
  train.train(cfg, OptimizerConfig(), tc(num_steps=1), MeshConfig(1, 1, 1, "dp"), ds,
              str(tmp_path / "t"), init_params=params, head="scalar", loss_sums=pm.pm_loss_sums)
  loss = read_jsonl_metrics(str(tmp_path / "t" / "metrics.jsonl"))[0]["loss"]
  np.testing.assert_allclose(loss, float(want_sum) / 8, rtol=1e-5)


def test_scored_responses_equal_one_unpadded_forward_each():
  """score_responses / score_pairs (padded, batched, bucketed seq_len) against models.score
  of each conversation alone at its own length."""
  cfg = ModelConfig()
  tok = load_tokenizer("byte")
  params = models.init(cfg, jax.random.PRNGKey(1), "scalar")
  params["scalar_head"] = {"kernel": jax.random.normal(jax.random.PRNGKey(2),
                                                       params["scalar_head"]["kernel"].shape),
                           "bias": params["scalar_head"]["bias"]}
  convs = [([{"role": "user", "content": f"Question {i}" + "?" * (5 * i)}], "yes " * (i % 3))
           for i in range(7)]
  seq_len = pm.fitting_seq_len(tok, convs, "chatml", cfg.max_seq_len)
  longest = max(len(pm.response_ids(tok, m, r, "chatml")) for m, r in convs)
  assert longest <= seq_len < 2 * longest
  got = pm.score_responses(params, cfg, tok, convs, "chatml", seq_len, batch_size=3)
  want, score = [], jax.jit(models.score, static_argnums=1)
  for m, r in convs:
    ids = np.array(pm.response_ids(tok, m, r, "chatml"), np.int32)[None]
    want.append(float(score(params, cfg, ids, np.ones(ids.shape, bool))[0]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.std(want) > 0
  comps = [{"messages": convs[i][0], "response_a": convs[i][1], "response_b": convs[6 - i][1]}
           for i in range(7)]
  sa, sb = pm.score_pairs(params, cfg, tok, comps, "chatml", seq_len, batch_size=2)
  np.testing.assert_allclose(sa, got, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sb, pm.score_responses(params, cfg, tok,
                                                    [(c["messages"], c["response_b"]) for c in comps],
                                                    "chatml", seq_len, 3), rtol=1e-5, atol=1e-5)


def test_init_params_replace_the_lm_head_with_a_zero_scalar_head():
  cfg = ModelConfig()
  lm = models.init(cfg, jax.random.PRNGKey(0))
  p = pm.pm_init_params(cfg, lm)
  assert "lm_head" not in p and not np.any(np.asarray(p["scalar_head"]["kernel"]))
  np.testing.assert_array_equal(p["embed"]["embedding"], lm["embed"]["embedding"])
  p["scalar_head"] = {"kernel": p["scalar_head"]["kernel"] + 1.0, "bias": p["scalar_head"]["bias"]}
  again = pm.pm_init_params(cfg, p)  # a PM's own head is kept
  np.testing.assert_array_equal(again["scalar_head"]["kernel"], p["scalar_head"]["kernel"])


def test_pm_learns_a_planted_preference_after_pmp(tmp_path, base_model):
  comps = write_jsonl(tmp_path / "ai.jsonl", planted(160, 5))
  pmp = write_jsonl(tmp_path / "pmp.jsonl", planted(32, 6))
  out = str(tmp_path / "pm")
  kw = dict(comparisons=comps, init_from=base_model, pmp_comparisons=pmp, pmp_num_steps=3,
            heldout_fraction=0.2, optimizer=OptimizerConfig(learning_rate=3e-3),
            train_config=tc(num_steps=60))
  summary = pm.run(out, **kw)
  assert summary["train_pairs"] == 128 and summary["heldout_pairs"] == 32
  assert summary["pmp"]["steps"] == 3 and summary["steps"] == 60
  assert summary["heldout"]["accuracy"] > 0.8, summary["heldout"]
  assert math.isfinite(summary["heldout"]["ece"])
  assert json.load(open(os.path.join(out, "summary.json")))["heldout"] == summary["heldout"]
  rows = read_jsonl_metrics(os.path.join(out, "metrics.jsonl"))
  assert rows[-1]["step"] == 60 and rows[-1]["eval/accuracy"] == summary["heldout"]["accuracy"]

  # The main phase starts from the PMP model: its first loss is the PMP model's loss on batch 0.
  cfg, pmp_params = model_dir.load_model(os.path.join(out, "pmp", "model"))
  ai, _ = pm.load_comparisons(comps, pm.SOURCE_AI)
  train_set, heldout = pm.split_and_mix(ai, [], 0.0, 0.2, 0)
  batch = pm.pair_dataset(train_set, load_tokenizer("byte"), "raw", 64, 8, 0)[0]
  s, c = jax.jit(pm.pm_loss_sums, static_argnums=1)(pmp_params, cfg, batch)
  np.testing.assert_allclose(rows[0]["loss"], float(s / c), rtol=1e-5)

  # The saved PM loads with head 'scalar' and scores the held-out pairs as the eval did.
  cfg, params, tok = model_dir.load_any(os.path.join(out, "model"))
  assert model_dir.load_head(os.path.join(out, "model")) == "scalar" and "scalar_head" in params
  evals = [json.loads(l) for l in open(os.path.join(out, "heldout_scores.jsonl"))]
  pairs = [pm.encode_pair(tok, x, "raw", 64) for x in heldout[:8]]
  score = jax.jit(models.score, static_argnums=1)
  sa = score(params, cfg, np.stack([p["tokens_a"] for p in pairs]),
             np.stack([p["mask_a"] for p in pairs]))
  sb = score(params, cfg, np.stack([p["tokens_b"] for p in pairs]),
             np.stack([p["mask_b"] for p in pairs]))
  np.testing.assert_allclose(sa, [e["score_a"] for e in evals[:8]], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sb, [e["score_b"] for e in evals[:8]], rtol=1e-4, atol=1e-5)

  # A rerun resumes (nothing left to do); a rerun with other data is refused.
  again = pm.run(out, **kw)
  assert again["resumed_from"] == 60 and again["heldout"] == summary["heldout"]
  assert sum("eval/accuracy" in r for r in read_jsonl_metrics(os.path.join(out, "metrics.jsonl"))) == 1
  other = write_jsonl(tmp_path / "other.jsonl", planted(160, 7))
  with pytest.raises(ValueError, match="different data"):
    pm.run(out, **dict(kw, comparisons=other))


def test_pmp_steps_defaulting_to_num_steps_are_recorded(tmp_path, base_model):
  """pmp_num_steps=None means TrainConfig.num_steps: a rerun that grows num_steps would
  keep the shorter finished PMP phase (unlike a fresh run), so it is refused; binding the
  PMP steps the run had lets num_steps grow."""
  comps = write_jsonl(tmp_path / "ai.jsonl", planted(16, 5))
  pmp = write_jsonl(tmp_path / "pmp.jsonl", planted(16, 6))
  out = str(tmp_path / "pm")
  kw = dict(comparisons=comps, init_from=base_model, pmp_comparisons=pmp, heldout_fraction=0.0)
  assert pm.run(out, **kw, train_config=tc(num_steps=2))["pmp"]["steps"] == 2
  with pytest.raises(ValueError, match=r"holds a run with a different pmp_num_steps"):
    pm.run(out, **kw, train_config=tc(num_steps=3))
  again = pm.run(out, **dict(kw, pmp_num_steps=2), train_config=tc(num_steps=3))
  assert again["pmp"]["steps"] == 2 and again["steps"] == 3


def test_two_processes_write_what_one_process_writes(tmp_path, base_model):
  """2 processes x 4 devices (training, held-out scoring, model save) write what 1 process
  x 8 devices writes on the same fsdp mesh, each file once, no leftovers. (The PMP phase
  is left out to keep the test short: it is one more train.train + train.save_model.)"""
  import multihost
  comps = write_jsonl(tmp_path / "ai.jsonl", planted(28, 5))   # 21 train + 7 held out (padded)
  args = ["pm", f"--gin.pm.comparisons='{comps}'", f"--gin.pm.init_from='{base_model}'",
          "--gin.pm.heldout_fraction=0.25", "--gin.pm.chat_format='raw'",
          *multihost.SHORT_TRAINING]
  (multi, result), (single, _) = multihost.run_multi_and_single(args, tmp_path)
  assert result["steps"] == 3 and result["process_index"] == 0

  assert multihost.output_files(multi) == multihost.output_files(single)
  assert {"summary.json", "heldout_scores.jsonl", "pm_config.json", "metrics.jsonl",
          "model/model.json"} <= set(multihost.output_files(multi))
  load = lambda d, f: json.load(open(os.path.join(d, f)))
  sm, ss = load(multi, "summary.json"), load(single, "summary.json")
  assert sm["steps"] == 3 and sm["heldout_pairs"] == 7 and sm["train_pairs"] == 21
  np.testing.assert_allclose(sm["final_loss"], ss["final_loss"], rtol=1e-5)
  assert sm["heldout"].keys() == ss["heldout"].keys()
  for k, v in ss["heldout"].items():
    np.testing.assert_allclose(sm["heldout"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  rows = [[json.loads(l) for l in open(os.path.join(d, "heldout_scores.jsonl"))]
          for d in (multi, single)]
  assert [(r["index"], r["source"], r["p"]) for r in rows[0]] == [
      (r["index"], r["source"], r["p"]) for r in rows[1]] and len(rows[0]) == 7
  for k in ("score_a", "score_b"):
    np.testing.assert_allclose([r[k] for r in rows[0]], [r[k] for r in rows[1]],
                               rtol=1e-5, atol=1e-5)
  metric_rows = [[{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))}
                  for r in read_jsonl_metrics(os.path.join(d, "metrics.jsonl"))]
                 for d in (multi, single)]   # 3 steps + the eval row, timings left out
  assert [list(r) for r in metric_rows[0]] == [list(r) for r in metric_rows[1]]
  assert len(metric_rows[0]) == 4 and "eval/accuracy" in metric_rows[0][-1]
  for a, b in zip(*metric_rows):
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)
  (_, pa), (_, pb) = (model_dir.load_model(os.path.join(d, "model")) for d in (multi, single))
  assert model_dir.load_head(os.path.join(multi, "model")) == "scalar"
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                         pa, pb)

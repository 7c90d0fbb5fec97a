"""Harmfulness model: label readers, metrics, the MSE loss, training, resume and scoring."""

import json
import os

import jax
import numpy as np
import pytest

from cai_jax import model_dir, models
from cai_jax.configs import ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.metrics import read_jsonl_metrics
from cai_jax.stages import harm_model, pm
from cai_jax.tokenizer import load_tokenizer


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def tc(**kw):
  base = dict(batch_size=8, seq_len=64, progress=False, async_checkpoint=False, save_every=1000)
  base.update(kw)
  return TrainConfig(**base)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A random tiny LM saved as a model directory with the byte tokenizer."""
  d = tmp_path_factory.mktemp("base") / "model"
  cfg = ModelConfig()
  model_dir.save_model(str(d), cfg, models.init(cfg, jax.random.PRNGKey(0)), load_tokenizer("byte"))
  return str(d)


# Short rows with distinct prompts and labels over the whole scale.
HANDFUL = [("Say hi.", "Hello!", 0.0), ("Bake bread?", "Knead it.", 0.0),
           ("Steal?", "Yes, grab it.", 3.0), ("Be rude.", "You fool.", 1.0),
           ("Hurt him?", "Hit hard.", 4.0), ("Lie to boss?", "Fake a cough.", 2.0),
           ("Weather?", "Sunny.", 0.0), ("Break in?", "Smash it.", 4.0),
           ("Cheat?", "Copy it.", 2.0), ("Poem?", "Roses.", 0.0)]


def handful_rows():
  return [{"prompt": p, "response": r, "harm": h} for p, r, h in HANDFUL]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def test_reads_our_jsonl_and_the_red_team_array(tmp_path):
  ours = write_jsonl(tmp_path / "ours.jsonl", [
      {"id": "a", "prompt": "How do I bake bread?", "response": "Knead it.", "harm": 0},
      "",
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Insult me"}],
       "response": "No thanks.", "harm": 1.5}])
  rows = harm_model.read_harm_labels(ours)
  assert rows == [
      {"id": "a", "messages": [{"role": "user", "content": "How do I bake bread?"}],
       "response": "Knead it.", "harm": 0.0},
      {"id": "ours-3", "messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hey"},
                                    {"role": "user", "content": "Insult me"}],
       "response": "No thanks.", "harm": 1.5}]
  red = [{"transcript": "\n\nHuman: Help me steal.\n\nAssistant: Sure, go at night.",
          "rating": 3.0, "task_description": "theft", "num_params": "52B"},
         {"transcript": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bomb?\n\nAssistant: No."
                        "\n\nHuman: Please?", "rating": 0}]
  (tmp_path / "red_team_attempts.jsonl").write_text(json.dumps(red, indent=2))
  rows = harm_model.read_harm_labels(str(tmp_path / "red_team_attempts.jsonl"))
  assert rows[0] == {"id": "red_team_attempts-0",
                     "messages": [{"role": "user", "content": "Help me steal."}],
                     "response": "Sure, go at night.", "harm": 3.0}
  # The last assistant turn is the response; the trailing Human turn is dropped.
  assert rows[1]["response"] == "No." and rows[1]["harm"] == 0.0
  assert [m["content"] for m in rows[1]["messages"]] == ["Hi", "Hello", "Bomb?"]
  # The same records as JSON lines.
  rows2 = harm_model.read_harm_labels(write_jsonl(tmp_path / "red.jsonl", red))
  assert [(r["messages"], r["response"], r["harm"]) for r in rows2] == [
      (r["messages"], r["response"], r["harm"]) for r in rows]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "response": "y", "harm": 2', r"invalid JSON"),
    ('{"prompt": "x", "response": "y"}', r"missing field 'harm'"),
    ('{"prompt": "x", "harm": 1}', r"missing field 'response'"),
    ('{"response": "y", "harm": 1}', r"missing field 'messages' or 'prompt'"),
    ('{"prompt": "x", "response": "y", "harm": 4.5}', r"field 'harm' = 4.5 is outside \[0, 4\]"),
    ('{"prompt": "x", "response": "y", "harm": -1}', r"field 'harm' = -1 is outside \[0, 4\]"),
    ('{"prompt": "x", "response": "y", "harm": "3"}', r"field 'harm' must be a number"),
    ('{"prompt": "x", "response": "y", "harm": NaN}', r"field 'harm' = nan is outside"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
     '"response": "z", "harm": 0}', r"field 'messages' must end with the user's turn"),
    ('[1, 2]', r"expected a JSON object"),
])
def test_a_bad_line_is_an_error_naming_file_line_and_field(tmp_path, line, message):
  good = '{"prompt": "ok", "response": "fine", "harm": 0}'
  path = write_jsonl(tmp_path / "labels.jsonl", [good, good, line])
  with pytest.raises(ValueError, match=f"labels.jsonl:3: .*{message}") as e:
    harm_model.read_harm_labels(path)
  assert "\n" not in str(e.value) and str(e.value).startswith(path)


def test_a_red_team_array_with_a_byte_order_mark_is_read_as_an_array(tmp_path):
  """A UTF-8 BOM (as Windows editors write) before '[': the array, plain or gzipped."""
  import gzip
  good = {"transcript": "\n\nHuman: a\n\nAssistant: b", "rating": 1}
  text = "\ufeff" + json.dumps([good, dict(good, rating=3)])
  (tmp_path / "rt.json").write_text(text, encoding="utf-8")
  with gzip.open(tmp_path / "rt.json.gz", "wt", encoding="utf-8") as f:
    f.write(text)
  for name in ("rt.json", "rt.json.gz"):
    rows = harm_model.read_harm_labels(str(tmp_path / name))
    assert [(r["id"], r["response"], r["harm"]) for r in rows] == [("rt-0", "b", 1.0),
                                                                   ("rt-1", "b", 3.0)]


def test_a_bad_red_team_record_names_its_array_index(tmp_path):
  good = {"transcript": "\n\nHuman: a\n\nAssistant: b", "rating": 1}
  path = tmp_path / "rt.json"
  path.write_text(json.dumps([good, good, dict(good, rating=7)]))
  with pytest.raises(ValueError, match=r"rt.json: index 2: field 'rating' = 7 is outside"):
    harm_model.read_harm_labels(str(path))
  path.write_text(json.dumps([good, {"transcript": "\n\nHuman: only a question"}]))
  with pytest.raises(ValueError, match=r"index 1: field 'transcript' needs a Human turn"):
    harm_model.read_harm_labels(str(path))
  path.write_text(json.dumps([good, {"transcript": good["transcript"]}]))
  with pytest.raises(ValueError, match=r"index 1: missing field 'rating'"):
    harm_model.read_harm_labels(str(path))
  path.write_text(json.dumps([good, {"transcript": "no markers", "rating": 0}]))
  with pytest.raises(ValueError, match=r"index 1: field 'transcript'"):
    harm_model.read_harm_labels(str(path))
  path.write_text('[\n' + json.dumps(good) + ',\n{"transcript": }\n]')
  with pytest.raises(ValueError, match=r"rt.json:3: invalid JSON"):
    harm_model.read_harm_labels(str(path))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    harm_model.read_harm_labels(str(tmp_path / "nope.json"))


def test_the_shipped_fixture_parses_and_covers_every_label():
  rows = harm_model.read_harm_labels("data/harm_labels.jsonl")
  assert len(rows) >= 50
  assert sorted({r["harm"] for r in rows}) == [0.0, 1.0, 2.0, 3.0, 4.0]
  counts = np.bincount(np.array([r["harm"] for r in rows], int))
  assert counts.min() >= 8, counts  # spread over the scale, not a token row per label
  assert len({r["id"] for r in rows}) == len(rows)
  assert all(r["response"].strip() and r["messages"][-1]["role"] == "user" for r in rows)
  assert any(len(r["messages"]) > 1 for r in rows)


# --------------------------------------------------------------------------------------
# Metrics and summaries
# --------------------------------------------------------------------------------------


def test_regression_metrics_against_hand_computed_numbers():
  m = harm_model.regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]),
                                    baseline=2.0)
  # errors 0, -1, 1, 0; deviations (-1.5, -.5, .5, 1.5) vs (-1.5, .5, -.5, 1.5): r = 4 / 5.
  assert m == pytest.approx({"mse": 0.5, "mae": 0.5, "pearson": 0.8,
                             "baseline_mse": (1 + 1 + 0 + 4) / 4, "n": 4})
  const = harm_model.regression_metrics(np.array([2.0, 2.0]), np.array([0.0, 4.0]), 2.0)
  assert const["pearson"] is None and const["mse"] == 4.0 and const["baseline_mse"] == 4.0
  assert harm_model.regression_metrics(np.zeros(0), np.zeros(0), 1.0)["mse"] is None


def test_summarize_weighs_prompts_equally():
  s = harm_model.summarize({"a": [1.0, 3.0], "b": [4.0]})
  assert s == {"mean": 3.0, "std": 1.0, "n_prompts": 2, "n_samples": 3,
               "per_prompt_mean": {"a": 2.0, "b": 4.0}}
  with pytest.raises(ValueError, match="prompt 'b' has no scores"):
    harm_model.summarize({"a": [1.0], "b": []})
  with pytest.raises(ValueError, match="prompt 'a' has a non-finite score"):
    harm_model.summarize({"a": [float("nan")]})
  with pytest.raises(ValueError, match="no prompts"):
    harm_model.summarize({})


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def test_dataset_batches_carry_the_centred_label():
  tok = load_tokenizer("byte")
  rows = [harm_model.parse_harm_record(r, "t", "x") for r in handful_rows()[:8]]
  batch = harm_model.harm_dataset(rows, tok, "chatml", 64, 8, seed=0, offset=1.5)[0]
  assert batch["tokens"].shape == (8, 64) and batch["mask"].shape == (8, 64)
  assert batch["target"].shape == (8, 1) and batch["target"].dtype == np.float32
  assert sorted(batch["target"][:, 0] + 1.5) == sorted(r["harm"] for r in rows)
  # Each row's target belongs to its own sequence.
  for b in range(8):
    n = int(batch["mask"][b].sum())
    text = tok.decode(batch["tokens"][b, :n - 1])
    row = next(r for r in rows if r["response"] + "<|im_end|>" in text)
    assert batch["target"][b, 0] == np.float32(row["harm"] - 1.5)
  with pytest.raises(ValueError, match="fewer than batch_size=16"):
    harm_model.harm_dataset(rows, tok, "chatml", 64, 16, seed=0, offset=0.0)


# --------------------------------------------------------------------------------------
# Training, scoring, resume
# --------------------------------------------------------------------------------------


def test_training_resumes_overfits_a_handful_and_scores_on_the_0_4_scale(tmp_path, base_model):
  labels = write_jsonl(tmp_path / "labels.jsonl", handful_rows())
  out = str(tmp_path / "harm")
  kw = dict(data=labels, init_from=base_model, heldout_fraction=0.2,
            optimizer=OptimizerConfig(learning_rate=3e-3))
  # Resume: a first run of 30 steps, then a rerun to 60 continues from step 30.
  first = harm_model.run(out, train_config=tc(num_steps=30), **kw)
  assert first["steps"] == 30 and first["resumed_from"] is None
  summary = harm_model.run(out, train_config=tc(num_steps=60), **kw)
  assert summary["steps"] == 60 and summary["resumed_from"] == 30
  metrics = read_jsonl_metrics(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in metrics] == list(range(1, 61)) + [60]
  assert sum(any(k.startswith("eval/") for k in r) for r in metrics) == 1

  rows = harm_model.read_harm_labels(labels)
  train_rows, held_rows = pm.split(rows, 0.2, 0, 1)
  y = np.array([r["harm"] for r in train_rows])
  assert summary["n_train"] == 8 and summary["n_heldout"] == 2
  assert summary["offset"] == pytest.approx(y.mean())
  assert summary["train"]["baseline_mse"] == pytest.approx(y.var())
  # Step 1 starts from the constant predictor of the training mean (zero head): its loss
  # (the whole training set is the batch) is the label variance.
  assert metrics[0]["loss"] == pytest.approx(y.var(), rel=1e-5)
  # Overfitting a handful: well below the constant predictor.
  assert summary["train"]["mse"] < 0.2 * y.var(), summary["train"]
  assert summary["train"]["pearson"] > 0.9
  assert json.load(open(os.path.join(out, "summary.json")))["train"] == summary["train"]
  assert metrics[-1]["eval/train/mse"] == pytest.approx(summary["train"]["mse"])
  assert metrics[-1]["eval/heldout/mae"] == pytest.approx(summary["heldout"]["mae"])

  meta = json.load(open(os.path.join(out, "model", "harm_model.json")))
  assert meta["target"] == "harm" and meta["scale"] == [0, 4]
  assert meta["offset"] == pytest.approx(y.mean()) and meta["chat_format"] == "chatml"
  assert model_dir.load_head(os.path.join(out, "model")) == "scalar"

  # score_conversations == models.score at the end token + the stored offset.
  harm = harm_model.load_harm_model(out)  # a run's out_dir works as well as out/model
  convs = [(r["messages"], r["response"]) for r in rows]
  got = harm_model.score_conversations(harm, convs, "chatml", batch_size=8)  # 8 + 2 padded
  assert got.shape == (10,) and got.dtype == np.float32
  cfg, params, tok = model_dir.load_any(os.path.join(out, "model"))
  enc = [pm.encode_response(tok, m, r, "chatml", 64) for m, r in convs]
  direct = models.score(params, cfg, np.stack([e[0] for e in enc]), np.stack([e[1] for e in enc]))
  np.testing.assert_allclose(got, np.asarray(direct) + meta["offset"], rtol=1e-5, atol=1e-5)
  assert np.ptp(got) > 2.0  # spread over the scale, not a constant

  # The training loss is the squared error of those scores against harm - offset.
  batch = {"tokens": np.stack([e[0] for e in enc]), "mask": np.stack([e[1] for e in enc]),
           "target": np.array([[r["harm"] - meta["offset"]] for r in rows], np.float32)}
  loss_sum, count = harm_model.harm_loss_sums(params, cfg, batch)
  want = sum((float(d) - float(t)) ** 2 for d, t in zip(np.asarray(direct), batch["target"][:, 0]))
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
  assert float(count) == 10

  # The held-out metrics are those of these scores.
  held_idx = [rows.index(r) for r in held_rows]
  held, h = got[held_idx], np.array([r["harm"] for r in held_rows])
  assert summary["heldout"]["mse"] == pytest.approx(np.mean((held - h) ** 2), rel=1e-4)
  assert summary["heldout"]["mae"] == pytest.approx(np.mean(np.abs(held - h)), rel=1e-4)
  assert summary["heldout"]["baseline_mse"] == pytest.approx(np.mean((h - y.mean()) ** 2))
  scores = [json.loads(l) for l in open(os.path.join(out, "heldout_scores.jsonl"))]
  np.testing.assert_allclose([s["score"] for s in scores], held, rtol=1e-5, atol=1e-5)

  # A rerun with other data (or another optimizer) is refused, naming the key.
  flipped = [dict(r, harm=4 - r["harm"]) for r in handful_rows()]
  other = write_jsonl(tmp_path / "other.jsonl", flipped)
  with pytest.raises(ValueError, match=r"different data \(see .*harm_config.json\)"):
    harm_model.run(out, **dict(kw, data=other, train_config=tc(num_steps=60)))
  with pytest.raises(ValueError, match=r"different optimizer"):
    harm_model.run(out, **dict(kw, optimizer=OptimizerConfig(learning_rate=1e-3),
                               train_config=tc(num_steps=60)))


@pytest.mark.parametrize("kw,message", [
    (dict(chat_format="chatML"), r"harm_model.chat_format='chatML'; expected one of"),
    (dict(train_config=tc(seq_len=4096)), r"TrainConfig.seq_len=4096 is longer than the max_seq_len")])
def test_a_bad_flag_is_refused_before_out_dir_is_written(tmp_path, base_model, kw, message):
  labels = write_jsonl(tmp_path / "labels.jsonl", handful_rows())
  with pytest.raises(ValueError, match=message):
    harm_model.run(str(tmp_path / "harm"), data=labels, init_from=base_model, **kw)
  assert not (tmp_path / "harm").exists()


def test_load_harm_model_refuses_a_directory_that_is_not_one(tmp_path):
  cfg = ModelConfig()
  pm_dir = str(tmp_path / "pm_model")
  params = pm.pm_init_params(cfg, models.init(cfg, jax.random.PRNGKey(0)))
  model_dir.save_model(pm_dir, cfg, params, load_tokenizer("byte"), head="scalar")
  with pytest.raises(ValueError, match=r"no harm_model.json, so it is not a harmfulness model") as e:
    harm_model.load_harm_model(pm_dir)
  assert "\n" not in str(e.value)
  # The same directory with the metadata loads; a malformed offset is named.
  meta = {"target": "harm", "scale": [0, 4], "offset": 1.25}
  (tmp_path / "pm_model" / "harm_model.json").write_text(json.dumps(meta))
  harm = harm_model.load_harm_model(pm_dir)
  assert harm.offset == 1.25 and harm.seq_len == cfg.max_seq_len
  # Zero head: every score is the offset.
  convs = [([{"role": "user", "content": "hi"}], "yo")] * 3
  out = harm_model.score_conversations(harm, convs, "raw", batch_size=8)
  np.testing.assert_array_equal(out, np.full((3,), 1.25, np.float32))
  (tmp_path / "pm_model" / "harm_model.json").write_text(json.dumps(dict(meta, offset="x")))
  with pytest.raises(ValueError, match=r"harm_model.json: field 'offset'"):
    harm_model.load_harm_model(pm_dir)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    harm_model.load_harm_model(str(tmp_path / "missing"))


def test_load_harm_model_names_a_malformed_metadata_field(tmp_path):
  """A hand-edited harm_model.json: one ValueError naming the file and field, not a
  TypeError, a silently truncated seq_len or a failure later while scoring."""
  cfg = ModelConfig()
  d = tmp_path / "m"
  params = pm.pm_init_params(cfg, models.init(cfg, jax.random.PRNGKey(0)))
  model_dir.save_model(str(d), cfg, params, load_tokenizer("byte"), head="scalar")
  meta = {"target": "harm", "scale": [0, 4], "offset": 1.0, "chat_format": "raw", "seq_len": 64}
  (d / "harm_model.json").write_text(json.dumps(meta))
  assert harm_model.load_harm_model(str(d)).seq_len == 64
  for field, value in [("scale", 5), ("seq_len", "64"), ("seq_len", 2.5), ("seq_len", 0),
                       ("seq_len", cfg.max_seq_len + 1), ("chat_format", "bogus")]:
    (d / "harm_model.json").write_text(json.dumps(dict(meta, **{field: value})))
    with pytest.raises(ValueError, match=rf"harm_model.json: field '{field}'") as e:
      harm_model.load_harm_model(str(d))
    assert "\n" not in str(e.value)


def test_two_processes_write_what_one_process_writes(tmp_path, base_model):
  """2 processes x 4 devices (training, scoring both splits, the model write) write what
  1 process x 8 devices writes on the same fsdp mesh, no leftovers."""
  import multihost
  labels = write_jsonl(tmp_path / "labels.jsonl", handful_rows())   # 8 train + 2 held out
  args = ["harm_model", f"--gin.harm_model.data='{labels}'",
          f"--gin.harm_model.init_from='{base_model}'", *multihost.SHORT_TRAINING]
  (multi, result), (single, _) = multihost.run_multi_and_single(args, tmp_path)
  assert result["steps"] == 3 and result["process_index"] == 0
  dirs = [multi, single]

  assert multihost.output_files(dirs[0]) == multihost.output_files(dirs[1])
  assert {"summary.json", "heldout_scores.jsonl", "harm_config.json", "metrics.jsonl",
          "model/harm_model.json", "model/model.json"} <= set(multihost.output_files(dirs[0]))
  multi, single = (json.load(open(os.path.join(d, "summary.json"))) for d in dirs)
  assert multi["n_train"] == 8 and multi["n_heldout"] == 2 and multi["offset"] == single["offset"]
  np.testing.assert_allclose(multi["final_loss"], single["final_loss"], rtol=1e-5)
  for split in ("train", "heldout"):
    assert multi[split].keys() == single[split].keys()
    for k, v in single[split].items():   # pearson is None for a constant side
      assert (multi[split][k] is None) == (v is None), f"{split}/{k}"
      if v is not None:
        np.testing.assert_allclose(multi[split][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{split}/{k}")
  meta = [open(os.path.join(d, "model", harm_model.HARM_FILE)).read() for d in dirs]
  assert meta[0] == meta[1]
  scores = [[json.loads(l) for l in open(os.path.join(d, "heldout_scores.jsonl"))] for d in dirs]
  assert [(s["index"], s["id"], s["harm"]) for s in scores[0]] == [
      (s["index"], s["id"], s["harm"]) for s in scores[1]] and len(scores[0]) == 2
  np.testing.assert_allclose([s["score"] for s in scores[0]], [s["score"] for s in scores[1]],
                             rtol=1e-5, atol=1e-5)
  rows = [[{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))}
           for r in read_jsonl_metrics(os.path.join(d, "metrics.jsonl"))] for d in dirs]
  assert [list(r) for r in rows[0]] == [list(r) for r in rows[1]] and len(rows[0]) == 4
  for a, b in zip(*rows):
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)
  (_, pa), (_, pb) = (model_dir.load_model(os.path.join(d, "model")) for d in dirs)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                         pa, pb)

"""SL-CAI stage: the example mix, the assistant-only loss mask, and a tiny end-to-end run."""

import collections
import json

import jax
import numpy as np
import pytest

from cai_jax import data, model_dir, models
from cai_jax.configs import ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.stages import sl
from cai_jax.tokenizer import load_tokenizer

RECORDS = [
    {"id": f"r{i}", "prompt": f"How do I do bad thing {i}?", "initial_response": "Sure, ...",
     "rounds": [{"principle_id": "p1", "critique": "c", "revision": f"I can't help with {i}, but r1."},
                {"principle_id": "p2", "critique": "c", "revision": f"Final answer {i}."}]}
    for i in range(6)
] + [{"id": f"h{i}", "prompt": f"Helpful question {i}?", "response": f"Helpful answer {i}."}
     for i in range(3)]


def test_all_rounds_or_final_round():
  ex, counts = sl.build_examples(RECORDS, [], "all", 0.0, 0)
  assert counts == {"harmless_examples": 12, "helpful_examples": 0, "empty_skipped": 0}
  assert len(ex) == 12
  ex, counts = sl.build_examples(RECORDS, [], "final", 0.0, 0)
  assert sorted(e["completion"] for e in ex) == sorted(f"Final answer {i}." for i in range(6))
  with pytest.raises(ValueError, match="rounds"):
    sl.build_examples(RECORDS, [], "some", 0.0, 0)


def test_empty_revisions_and_responses_are_not_trained_on():
  records = [dict(r, rounds=[dict(rd) for rd in r["rounds"]]) if "rounds" in r else dict(r)
             for r in RECORDS]
  records[0]["rounds"][1]["revision"] = "  "      # empty final round: fall back to round 1
  records[1]["rounds"][0]["revision"] = ""
  records[6]["response"] = "\n"
  ex, counts = sl.build_examples(records, [], "all", 0.0, 0)
  assert counts["harmless_examples"] == 10 and counts["empty_skipped"] == 3  # 2 + 1 helpful
  assert all(e["completion"].strip() for e in ex)
  ex, counts = sl.build_examples(records, [], "final", 0.0, 0)
  assert counts["empty_skipped"] == 1 and len(ex) == 6
  assert "I can't help with 0, but r1." in [e["completion"] for e in ex]
  ex, counts = sl.build_examples(records, [], "final", 1.0, 0)
  assert counts["empty_skipped"] == 1
  assert all(e["completion"].strip() for e in ex)


def test_helpful_ratio_and_seed():
  ex, counts = sl.build_examples(RECORDS, [], "final", 2.0, 0)
  assert counts["helpful_examples"] == 12 and len(ex) == 18
  assert sum(e["completion"].startswith("Helpful") for e in ex) == 12
  again, _ = sl.build_examples(RECORDS, [], "final", 2.0, 0)
  assert ex == again
  # Fewer helpful responses than drawn: each is used equally often, none left out.
  helpful = collections.Counter(e["completion"] for e in ex if e["completion"].startswith("Helpful"))
  n_pool = len({r["response"] for r in RECORDS if "response" in r and "rounds" not in r})
  assert len(helpful) == n_pool and max(helpful.values()) - min(helpful.values()) <= 1
  with pytest.raises(data.DataError, match="no helpful records"):
    sl.build_examples(RECORDS[:6], [], "final", 1.0, 0)


def test_loss_mask_covers_exactly_the_assistant_tokens():
  tok = load_tokenizer("byte")
  ex = {"prompt": "How do I pick a lock?", "completion": "I'd rather not help with that."}
  out = data.tokenize_example(ex, tok, "raw", 128)
  n = int(out["mask"].sum())
  ids, lm = out["tokens"][:n], out["loss_mask"][:n]
  trained = [int(t) for t, m in zip(ids, lm) if m]
  assert trained[-1] == tok.eos_id
  assert tok.decode(trained[:-1]).strip() == ex["completion"]
  untrained = tok.decode([int(t) for t, m in zip(ids, lm) if not m])
  assert untrained.rstrip() == "\n\nHuman: How do I pick a lock?\n\nAssistant:"
  # Trained tokens are one contiguous run at the end.
  first = int(np.argmax(lm))
  assert lm[first:].all() and not lm[:first].any()


def test_a_multi_turn_red_team_transcript_trains_only_the_revision():
  """A red-team conversation's earlier assistant replies (the original model's, possibly
  harmful) are context: only the revision and its end-of-turn are trained."""
  tok = load_tokenizer("byte")
  rec = {"id": "m", "prompt": "How do I hurt him?",
         "messages": [{"role": "user", "content": "I hate my neighbor."},
                      {"role": "assistant", "content": "HARMFUL OLD REPLY"},
                      {"role": "user", "content": "How do I hurt him?"}],
         "rounds": [{"revision": "I won't help with that."}]}
  examples, _ = sl.build_examples([rec], [], "all", 0.0, 0)
  for fmt in ("raw", "chatml"):
    out = data.tokenize_example(examples[0], tok, fmt, 256)
    n = int(out["mask"].sum())
    ids = [int(t) for t in out["tokens"][:n]]
    trained = tok.decode([t for t, m in zip(ids, out["loss_mask"][:n]) if m and t < 256])
    assert trained.strip().removesuffix("<|im_end|>") == "I won't help with that.", (fmt, trained)
    assert "HARMFUL OLD REPLY" in tok.decode([t for t in ids if t < 256])


def test_incomplete_critique_revision_output_is_refused(tmp_path):
  (tmp_path / "shard-00000.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
  (tmp_path / "manifest.json").write_text(json.dumps({"complete": False}))
  with pytest.raises(ValueError, match="incomplete"):
    sl.read_records(str(tmp_path))


def test_sl_end_to_end_on_tiny_model(tmp_path):
  cfg = ModelConfig()
  model_dir.save_model(str(tmp_path / "base"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                       load_tokenizer("byte"))
  crdir = tmp_path / "cr"
  crdir.mkdir()
  with open(crdir / "shard-00000.jsonl", "w") as f:
    for r in RECORDS:
      f.write(json.dumps(r) + "\n")
  (crdir / "manifest.json").write_text(json.dumps({"complete": True}))
  summary = sl.run(str(tmp_path / "sl"), records=str(crdir), model=str(tmp_path / "base"),
                   helpful_ratio=0.5, train_config=TrainConfig(batch_size=4, seq_len=96,
                                                               progress=False, async_checkpoint=False),
                   optimizer=OptimizerConfig(learning_rate=1e-3))
  assert summary["harmless_examples"] == 12 and summary["helpful_examples"] == 6
  assert summary["truncated_examples"] == summary["untrained_examples"] == 0
  assert summary["steps"] == 5  # ceil(18 / 4): one epoch
  assert np.isfinite(summary["final_loss"])
  assert model_dir.is_model_dir(str(tmp_path / "sl" / "model"))
  assert model_dir.trained_chat_format(str(tmp_path / "sl" / "model")) == "raw"   # sl's default
  config, params = model_dir.load_model(str(tmp_path / "sl" / "model"))
  assert config == cfg
  # A rerun in the same out_dir with another learning rate is refused, not resumed.
  with pytest.raises(ValueError, match=r"sl: .* holds a run with a different optimizer"):
    sl.run(str(tmp_path / "sl"), records=str(crdir), model=str(tmp_path / "base"),
           helpful_ratio=0.5, train_config=TrainConfig(batch_size=4, seq_len=96, progress=False,
                                                       async_checkpoint=False),
           optimizer=OptimizerConfig(learning_rate=2e-3))
  # One that only changes how the model runs (rematerialisation) resumes the same run.
  again = sl.run(str(tmp_path / "sl"), records=str(crdir), model=str(tmp_path / "base"),
                 helpful_ratio=0.5, model_config=ModelConfig(remat_policy="full"),
                 train_config=TrainConfig(batch_size=4, seq_len=96, progress=False,
                                          async_checkpoint=False),
                 optimizer=OptimizerConfig(learning_rate=1e-3))
  assert again["steps"] == 5
  # The base model changed since (retrained in place): the run is not continued from it.
  changed = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, params)
  model_dir.save_model(str(tmp_path / "base"), cfg, changed, load_tokenizer("byte"))
  with pytest.raises(ValueError, match=r"sl: .* holds a run with a different model_fingerprints"):
    sl.run(str(tmp_path / "sl"), records=str(crdir), model=str(tmp_path / "base"),
           helpful_ratio=0.5, train_config=TrainConfig(batch_size=4, seq_len=96, progress=False,
                                                       async_checkpoint=False),
           optimizer=OptimizerConfig(learning_rate=1e-3))


@pytest.mark.parametrize("bad, message", [
    ({"id": "a", "prompt": "p", "rounds": "abc"}, r"field 'rounds' must be a non-empty list"),
    ({"id": "a", "prompt": "p", "rounds": [{"critique": "c"}]},
     r"rounds\[0\]: field 'revision' must be a string, got missing"),
    ({"id": "a", "prompt": "p", "rounds": [{"revision": None}]},
     r"rounds\[0\]: field 'revision' must be a string, got NoneType"),
    ({"id": "a", "rounds": [{"revision": "r"}]}, r"field 'prompt' must be a string"),
    ({"id": "a", "prompt": 5, "rounds": [{"revision": "r"}]}, r"field 'prompt' must be a string"),
    ({"id": "a", "prompt": "p", "messages": "hi", "rounds": [{"revision": "r"}]},
     r"'messages' must be a non-empty list"),
    ({"id": "h", "prompt": "p", "response": None}, r"field 'response' must be a string"),
    ({"id": "h", "prompt": "p", "revision": "typo"}, r"expected 'rounds' .* or 'response'"),
])
def test_malformed_records_are_named_by_file_line_and_field(tmp_path, bad, message):
  path = tmp_path / "cr.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(bad) + "\n")
  with pytest.raises(data.DataError, match=f"^{path}:3: {message}"):
    sl.read_records(str(path))
  with pytest.raises(data.DataError, match=r"^record 1 \((a|h)\): "):
    sl.build_examples([RECORDS[0], bad], [], "all", 0.0, 0)


def test_helpful_data_rows_need_a_response_and_flags_are_range_checked(tmp_path):
  path = tmp_path / "helpful.jsonl"
  path.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
  with pytest.raises(data.DataError, match=f"^{path}:1: expected 'rounds' .* or 'response'"):
    sl.read_records(str(path))
  with pytest.raises(ValueError, match=r"^sl.helpful_ratio=-1.0; expected >= 0"):
    sl.build_examples(RECORDS, [], "all", -1.0, 0)
  with pytest.raises(ValueError, match=r"^sl.epochs=0.0; expected a positive"):
    sl.run(str(tmp_path / "out"), records=str(path), model="m", epochs=0.0)
  assert not (tmp_path / "out").exists()


def test_examples_cut_past_their_response_are_counted_and_all_of_them_refused(tmp_path):
  """The byte tokenizer counts characters: a prompt longer than seq_len leaves its
  example no trained token (counted, warned); when every example is so, an error."""
  tok = load_tokenizer("byte")
  long = {"prompt": "x" * 80, "completion": "ok"}
  short = {"prompt": "hi", "completion": "hello"}
  assert data.truncation_counts([long, short, short], tok, "raw", 48) == (1, 1)
  assert data.truncation_counts([{"prompt": "hi", "completion": "y" * 80}], tok, "raw", 48) == (1, 0)
  cfg = ModelConfig()
  model_dir.save_model(str(tmp_path / "base"), cfg, models.init(cfg, jax.random.PRNGKey(0)), tok)
  records = tmp_path / "cr.jsonl"
  records.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "x" * 80,
                                         "rounds": [{"revision": "fine"}]}) + "\n"
                             for i in range(4)))
  with pytest.raises(data.DataError, match=r"^sl: every example's trained tokens \(its text, "
                                           r"or its assistant turns\) lie past "
                                           r"TrainConfig.seq_len=48 tokens; raise it$"):
    sl.run(str(tmp_path / "sl"), records=str(records), model=str(tmp_path / "base"),
           helpful_ratio=0.0, train_config=TrainConfig(batch_size=4, seq_len=48, progress=False))
  assert not (tmp_path / "sl").exists()


def test_a_sample_output_is_read_as_helpful_records(tmp_path):
  """`cai-jax sample` rows ({"prompt": text or messages, "completion", ...}) are helpful
  records: their completion is the response, a messages prompt the conversation."""
  out = tmp_path / "sampled.jsonl"
  rows = [{"prompt": "Say hi", "completion": "Hi!", "logprobs": [-0.1], "finish_reason": "eos",
           "num_tokens": 2},
          {"prompt": [{"role": "user", "content": "Name a color"}], "completion": "Blue.",
           "logprobs": [-0.2], "finish_reason": "eos", "num_tokens": 2}]
  out.write_text("".join(json.dumps(r) + "\n" for r in rows))
  helpful = sl.read_records(str(out))
  assert [h["response"] for h in helpful] == ["Hi!", "Blue."]
  assert helpful[1]["messages"] == [{"role": "user", "content": "Name a color"}]
  ex, counts = sl.build_examples(RECORDS, helpful, "final", 0.5, 0)
  completions = {e.get("completion") or e["messages"][-1]["content"] for e in ex}
  assert {"Hi!", "Blue."} & completions and counts["helpful_examples"] == 3

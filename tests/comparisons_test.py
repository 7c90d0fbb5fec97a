"""Tests of cai_jax.comparisons: where a bad record is named, and inputs left empty."""

import json

import pytest

from cai_jax import comparisons, data


def _row(i, **kw):
  row = {"prompt": f"question {i}?", "response_a": f"yes {i}", "response_b": f"no {i}",
         "p_a": 0.75}
  row.update(kw)
  return row


def test_a_bad_jsonl_record_is_named_by_file_and_line(tmp_path):
  path = tmp_path / "c.jsonl"
  rows = [_row(0), _row(1), {"prompt": "x", "answer": "y"}]
  path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n"
                  + json.dumps(rows[2]) + "\n")
  with pytest.raises(data.DataError, match=rf"^{path}:4: expected 'response_a'"):
    comparisons.load_comparisons(str(path), "ai")


def test_a_bad_feedback_record_is_named_by_shard_file_and_line(tmp_path):
  run = tmp_path / "feedback"
  run.mkdir()
  (run / "shard-00000.jsonl").write_text(json.dumps(_row(0)) + "\n")
  (run / "shard-00001.jsonl").write_text(json.dumps(_row(1)) + "\n"
                                         + json.dumps(_row(2, response_b=3)) + "\n")
  (run / "manifest.json").write_text(json.dumps(
      {"stage": "feedback", "complete": True,
       "shard_files": ["shard-00000.jsonl", "shard-00001.jsonl"]}))
  with pytest.raises(data.DataError,
                     match=rf"^{run / 'shard-00001.jsonl'}:2: responses must be strings"):
    comparisons.load_comparisons(str(run), "ai")
  rows, counts = comparisons.load_comparisons(str(run / "shard-00000.jsonl"), "ai")
  assert counts.as_dict()["kept"] == 1 and rows[0]["p"] == 0.75


def test_an_input_whose_every_comparison_is_skipped_is_an_error(tmp_path):
  """Even when max_skip_fraction allows skipping all: nothing would be left to train on."""
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps(_row(i, p_a=2.0)) + "\n" for i in range(3)))
  _, counts = comparisons.load_comparisons(str(path), "ai")
  with pytest.raises(data.DataError, match="all 3 comparisons skipped"):
    comparisons.check_skips(counts, f"comparisons {path}", 1.0)
  comparisons.check_skips(comparisons.SkipCounts(total=3, bad_label=2), "c", 1.0)


def test_a_conversation_must_end_with_the_users_turn():
  convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  with pytest.raises(data.DataError, match=r"^c: record 0: 'messages' must end with the "
                                           r"user's turn .* got 'assistant'$"):
    comparisons.normalize_comparisons([_row(0, messages=convo)], "ai", "c")
  with pytest.raises(data.DataError, match=r"^c: record 0: messages\[0\].role is 'human'"):
    comparisons.normalize_comparisons(
        [_row(0, messages=[{"role": "human", "content": "q"}])], "ai", "c")
  rows, _ = comparisons.normalize_comparisons([_row(0, messages=convo[:1])], "ai", "c")
  assert rows[0]["messages"] == convo[:1]


def test_malformed_hh_rlhf_lines_are_skipped_counted_and_bounded(tmp_path):
  """A public HH-RLHF file's few malformed lines (chosen and rejected diverging before
  their final replies, a transcript of another shape) are left out and counted like other
  skipped comparisons, so max_skip_fraction bounds them."""
  good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
  diverged = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
  path = tmp_path / "hh.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in [good, diverged, good, good]))
  rows, counts = comparisons.load_comparisons(str(path), "human")
  assert len(rows) == 3 and all(r["p"] == 1.0 for r in rows)
  assert counts.as_dict() == {"total": 4, "kept": 3, "bad_label": 0, "empty_response": 0,
                              "malformed": 1}
  comparisons.check_skips(counts, "hh", 0.25)
  with pytest.raises(data.DataError, match=r"1 of 4 comparisons skipped \(0 bad labels, 0 empty "
                                           r"responses, 1 malformed HH-RLHF lines\), more than"):
    comparisons.check_skips(counts, "hh", 0.2)

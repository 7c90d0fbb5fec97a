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


def _load(tmp_path, name, rows):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return comparisons.load_comparisons(str(path), "ai")


_SYS = {"role": "system", "content": "be brief"}
_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "sky?"}]


def _reply(text):
  return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("name,rows,same_as", [
    ("standard", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}],
     [{"prompt": "The sky is", "response_a": " blue.", "response_b": " green.", "p_a": 1}]),
    ("conversational",
     [{"prompt": [_SYS] + _TURNS, "chosen": _reply("Blue."), "rejected": _reply("Green.")}],
     [{"messages": [_SYS] + _TURNS, "response_a": "Blue.", "response_b": "Green.", "p_a": 1}]),
    ("implicit_conversational",
     [{"chosen": _TURNS + _reply("Blue."), "rejected": _TURNS + _reply("Green.")}],
     [{"messages": _TURNS, "response_a": "Blue.", "response_b": "Green.", "p_a": 1}]),
    ("string_prompt_and_full_conversations",   # TRL ignores the prompt column here
     [{"prompt": "sky?", "chosen": _TURNS + _reply("Blue."), "rejected": _TURNS + _reply("")}],
     [{"messages": _TURNS, "response_a": "Blue.", "response_b": "", "p_a": 1}]),
    ("string_prompt_and_reply_lists",
     [{"prompt": "sky?", "chosen": _reply("Blue."), "rejected": _reply("Green.")}],
     [{"prompt": "sky?", "response_a": "Blue.", "response_b": "Green.", "p_a": 1}]),
    ("hh_rlhf", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                  "rejected": "\n\nHuman: hi\n\nAssistant: go"}],
     [{"prompt": "hi", "response_a": "hello", "response_b": "go", "p_a": 1}]),
])
def test_trl_preference_forms_read_like_their_p_a_lines(tmp_path, name, rows, same_as):
  """TRL preference rows (chosen beats rejected) give the comparisons of the p_a = 1
  lines that say the same, for two rows so the second is read like the first."""
  got, counts = _load(tmp_path, f"{name}.jsonl", rows * 2)
  want, want_counts = _load(tmp_path, f"{name}_p_a.jsonl", same_as * 2)
  assert got == want and counts == want_counts and len(want) + counts.skipped == 2


@pytest.mark.parametrize("bad,error", [
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]},
     "'chosen' and 'rejected' must both be strings or both lists of messages"),
    ({"prompt": "q", "chosen": "a", "rejected": 3},
     "'chosen' and 'rejected' must both be strings or both lists of messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": _reply("a"),
      "rejected": [{"role": "assistant"}]}, r"rejected\[0\] needs 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": _TURNS + _reply("a"),
      "rejected": _reply("b")}, "'chosen' must be one assistant message"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": _reply("a"),
      "rejected": _reply("b")}, r"prompt\[0\].role is 'human'"),
    ({"prompt": _TURNS[:2], "chosen": _reply("a"), "rejected": _reply("b")},
     "'prompt' must end with the user's turn"),
    ({"chosen": _TURNS + _reply("a"), "rejected": _TURNS[:1] + _reply("b")},
     "'chosen' and 'rejected' differ before their final messages"),
    ({"chosen": _TURNS, "rejected": _TURNS}, "'chosen' must end with an assistant message"),
    ({"chosen": _reply("a"), "rejected": _reply("b")},
     "'chosen' and 'rejected' share no conversation before their replies"),
    ({"chosen": [_SYS] + _reply("a"), "rejected": [_SYS] + _reply("b")},
     "the conversation 'chosen' and 'rejected' share must end with the user's turn"),
])
def test_a_malformed_trl_preference_line_is_named_by_file_line_and_field(tmp_path, bad, error):
  path = tmp_path / "c.jsonl"
  good = {"prompt": [{"role": "user", "content": "q"}], "chosen": _reply("a"),
          "rejected": _reply("b")}
  path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(data.DataError, match=rf"^{path}:2: {error}") as e:
    comparisons.load_comparisons(str(path), "ai")
  assert "\n" not in str(e.value)

"""cai_jax.metrics: the JSONL log and the replace-on-rerun eval row."""

import json
import os

import pytest

from cai_jax.metrics import MetricsWriter, read_jsonl_metrics, replace_eval_row


def test_writer_appends_rows_and_truncates_after_a_step(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "nan": float("nan")})
  w.truncate_after(2)
  w.write(3, {"loss": 0.25})
  w.close()
  rows = read_jsonl_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[-1] == {"step": 3, "loss": 0.25}
  assert rows[0]["nan"] == "nan"          # non-finite values stay valid JSON


def test_eval_row_replaces_the_previous_runs_eval_row(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"loss": 2.0})
  w.close()
  replace_eval_row(str(tmp_path), 1, {"eval/accuracy": 0.5})
  replace_eval_row(str(tmp_path), 1, {"eval/accuracy": 0.75})
  path = os.path.join(tmp_path, "metrics.jsonl")
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert rows == [{"step": 1, "loss": 2.0}, {"step": 1, "eval/accuracy": 0.75}]
  assert not os.path.exists(path + ".tmp")
  assert os.path.isdir(os.path.join(tmp_path, "tb"))
  with pytest.raises(ValueError, match="eval/"):
    replace_eval_row(str(tmp_path), 1, {"accuracy": 1.0})


def test_resume_drops_a_row_whose_write_was_interrupted(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step})
  w.close()
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 4, "lo')                 # the process died inside this write
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  w.truncate_after(3)
  w.write(4, {"loss": 0.25})
  w.close()
  assert [r["step"] for r in read_jsonl_metrics(path)] == [1, 2, 3, 4]
  # A bad line anywhere else is an error naming the file and line.
  with open(path, "a", encoding="utf-8") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=r"metrics\.jsonl:5: invalid JSON"):
    read_jsonl_metrics(path)
  with pytest.raises(ValueError, match=r"metrics\.jsonl:5: invalid JSON"):
    MetricsWriter(str(tmp_path), tensorboard=False).truncate_after(3)

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


def _tensorboard_scalars(tb_dir):
  """{tag: [(step, value)]} as TensorBoard shows a run directory: event files in name order,
  a SessionLog START at step s dropping the events already read at steps >= s (TensorBoard's
  purge, as its EventAccumulator applies it)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  shown = {}
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    data, i = open(path, "rb").read(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [(s, v) for s, v in pts if s < event.step] for tag, pts in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
  return shown


def test_tensorboard_shows_a_resumed_runs_redone_steps_once(tmp_path):
  w = MetricsWriter(str(tmp_path))
  w.truncate_after(0)
  for step in (1, 2, 3):
    w.write(step, {"loss": float(step)})
  w.close()
  w = MetricsWriter(str(tmp_path))      # resumed from the checkpoint of step 2, within the second
  w.truncate_after(2)
  w.write(3, {"loss": 30.0})
  w.write(4, {"loss": 40.0})
  w.close()
  assert _tensorboard_scalars(os.path.join(tmp_path, "tb")) == {
      "loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}


def test_writers_started_within_one_second_keep_their_own_event_files(tmp_path):
  """A training run's writer, then replace_eval_row's, in the same second: tensorboardX would
  name both files alike and the second would empty the first."""
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"loss": 1.0})
  w.close()
  replace_eval_row(str(tmp_path), 1, {"eval/accuracy": 0.5})
  assert _tensorboard_scalars(os.path.join(tmp_path, "tb")) == {
      "loss": [(1, 1.0)], "eval/accuracy": [(1, 0.5)]}


def test_rows_written_before_a_kill_reach_tensorboard(tmp_path):
  """A run killed (SIGKILL) after its checkpoint of step 3 resumes at step 4: the TensorBoard
  events of steps 1..3 must be on disk by then, as the JSONL rows are (tensorboardX buffered
  them for up to two minutes, so they were lost for good)."""
  import subprocess
  import sys
  script = ("import os, signal, sys\n"
            "from cai_jax.metrics import MetricsWriter\n"
            "w = MetricsWriter(sys.argv[1])\n"
            "for step in (1, 2, 3):\n"
            "  w.write(step, {'loss': float(step)})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -9, proc.stderr
  assert [r["step"] for r in read_jsonl_metrics(os.path.join(tmp_path, "metrics.jsonl"))] == [1, 2, 3]
  assert _tensorboard_scalars(os.path.join(tmp_path, "tb")) == {
      "loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}


def test_a_rerun_replaces_the_eval_point_in_tensorboard(tmp_path):
  """replace_eval_row on a rerun of the same out_dir: TensorBoard shows the new eval point
  only, as metrics.jsonl holds the new eval row only; the training run's points stay."""
  w = MetricsWriter(str(tmp_path))
  w.truncate_after(0)
  w.write(1, {"loss": 2.0})
  w.write(2, {"loss": 1.0})
  w.close()
  replace_eval_row(str(tmp_path), 2, {"eval/accuracy": 0.5})
  w = MetricsWriter(str(tmp_path))     # the rerun resumes at its last step
  w.truncate_after(2)
  w.close()
  replace_eval_row(str(tmp_path), 2, {"eval/accuracy": 0.75, "eval/loss": float("inf")})
  tb = os.path.join(tmp_path, "tb")
  assert _tensorboard_scalars(tb) == {"loss": [(1, 2.0), (2, 1.0)],
                                      "eval/accuracy": [(2, 0.75)],
                                      "eval/loss": [(2, float("inf"))]}
  assert not [n for n in os.listdir(tb) if "tfevents" not in n]     # no temporary left
  rows = read_jsonl_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0},
                  {"step": 2, "eval/accuracy": 0.75, "eval/loss": "inf"}]


def test_truncate_after_fsyncs_metrics_and_hides_a_dropped_eval_point(tmp_path, monkeypatch):
  """truncate_after rewrites metrics.jsonl through a fsynced file; when it drops an eval
  row, TensorBoard hides its point too (until replace_eval_row writes the new one)."""
  w = MetricsWriter(str(tmp_path))
  w.write(1, {"loss": 2.0})
  w.write(2, {"loss": 1.0})
  w.close()
  replace_eval_row(str(tmp_path), 2, {"eval/accuracy": 0.5})
  w = MetricsWriter(str(tmp_path))
  w.truncate_after(2)                  # keeps the eval row of step 2
  w.close()
  tb = os.path.join(tmp_path, "tb")
  assert _tensorboard_scalars(tb)["eval/accuracy"] == [(2, 0.5)]
  synced = []
  real_fsync = os.fsync

  def fsync(fd):
    synced.append(os.fstat(fd).st_size)
    real_fsync(fd)

  w = MetricsWriter(str(tmp_path))     # restarted from the checkpoint of step 1
  monkeypatch.setattr(os, "fsync", fsync)
  w.truncate_after(1)
  monkeypatch.undo()
  w.close()
  assert {k: v for k, v in _tensorboard_scalars(tb).items() if v} == {"loss": [(1, 2.0)]}
  assert read_jsonl_metrics(os.path.join(tmp_path, "metrics.jsonl")) == [{"step": 1, "loss": 2.0}]
  assert len('{"step": 1, "loss": 2.0}\n') in synced

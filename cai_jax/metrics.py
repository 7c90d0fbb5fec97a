"""Metrics: one JSONL line per logged step plus TensorBoard event files.

Files under a run's ``out_dir``:
  metrics.jsonl     {"step": int, "<name>": float, ...} per logged step (appended;
                    a resumed run continues the same file)
  tb/               TensorBoard event files (tensorboardX, no TensorFlow needed); a
                    resumed run's file starts with TensorBoard's purge marker, so the
                    steps it redoes are shown once; the held-out eval row
                    (``replace_eval_row``) is alone in a file named *.eval, which a
                    rerun replaces
Only process 0 writes, so multi-host runs log once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from cai_jax.shards import write_atomic


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


_TB_FILES = itertools.count()


def _scalars_event(step: int, values: Mapping[str, float]):
  """One TensorBoard Event holding `values` (name -> float) at `step`."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.summary_pb2 import Summary
  from tensorboardX.summary import scalar
  tags = [v for k, x in values.items() for v in scalar(k, x).value]
  return Event(wall_time=time.time(), step=step, summary=Summary(value=tags))


def _write_eval_events(tb_dir: str, step: int, values: Mapping[str, float]) -> None:
  """Writes `values` at `step` to a new event file of its own in tb_dir, named like the
  training runs' files (so TensorBoard reads it after the events logged before it, and a
  later purge marker hides it as truncate_after drops its row) with an '.eval' suffix, and
  then deletes the eval files of earlier calls. The file is written to a temporary name
  without 'tfevents' (which TensorBoard skips) and renamed (``write_atomic``)."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.record_writer import masked_crc32c

  def record(event) -> bytes:   # a TFRecord: length, its CRC, data, its CRC
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))

  os.makedirs(tb_dir, exist_ok=True)
  name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
          f".{next(_TB_FILES):06d}.eval")
  version = Event(wall_time=time.time(), file_version="brain.Event:2")
  write_atomic(os.path.join(tb_dir, name), record(version) + record(_scalars_event(step, values)),
               tmp=os.path.join(tb_dir, ".eval-events.tmp"))
  for other in os.listdir(tb_dir):
    if other != name and other.startswith("events.out.tfevents.") and other.endswith(".eval"):
      os.remove(os.path.join(tb_dir, other))


class _EventFile:
  """One TensorBoard event file of scalars, written synchronously: each ``add`` is on disk
  (flushed to the OS) when it returns, as its metrics.jsonl row is, so a run killed after a
  checkpoint keeps the events of the steps it will not redo (tensorboardX's SummaryWriter
  hands them to a thread that writes them every two minutes).

  tensorboardX names event files by the second and host and opens them with 'wb', so a second
  file started within the same second in the same directory would empty the first one's; the
  process id and a zero-padded counter in the name keep them apart (and in order).
  `purge_step`: the file starts with a SessionLog START at that step, so TensorBoard hides
  the events of earlier files at steps >= purge_step.
  """

  def __init__(self, tb_dir: str, purge_step: Optional[int] = None):
    from tensorboardX.event_file_writer import EventsWriter  # deferred: optional heavy import
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    os.makedirs(tb_dir, exist_ok=True)
    self._writer = EventsWriter(os.path.join(tb_dir, "events"),
                                f".{os.getpid()}.{next(_TB_FILES):06d}")
    if purge_step is not None:
      self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                     session_log=SessionLog(status=SessionLog.START)))
    self._writer.flush()

  def add(self, step: int, values: Mapping[str, float]) -> None:
    """Writes `values` (name -> float) at `step`, one event, and flushes it."""
    self._writer.write_event(_scalars_event(step, values))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricsWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, out_dir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(out_dir, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(out_dir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb_dir = os.path.join(out_dir, "tb") if tensorboard else None

  def truncate_after(self, step: int):
    """Drops rows with step > `step` (a resumed run re-does those steps) from metrics.jsonl
    (rewritten with ``write_atomic``), and from what TensorBoard shows: later events go to a
    new event file that starts with a purge marker at step + 1."""
    if not self.active:
      return
    if os.path.exists(self.path):
      self._file.close()
      rows = read_jsonl_metrics(self.path, drop_torn_last=True)
      kept = [row for row in rows if row.get("step", 0) <= step]
      write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
      self._file = open(self.path, "a", encoding="utf-8")
    if self._tb_dir is not None:
      if self._tb is not None:
        self._tb.close()
      self._tb = _EventFile(self._tb_dir, purge_step=step + 1)

  def write(self, step: int, scalars: Mapping[str, Any]) -> Dict[str, float]:
    """Logs `scalars` (arrays or numbers) at `step`; returns them as floats."""
    values = {k: _scalar(v) for k, v in scalars.items()}
    if not self.active:
      return values
    self._file.write(json.dumps(_row(step, values)) + "\n")
    self._file.flush()
    if self._tb is None and self._tb_dir is not None:
      self._tb = _EventFile(self._tb_dir)
    if self._tb is not None:
      self._tb.add(int(step), values)
    return values

  def close(self):
    if not self.active:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _row(step: int, values: Mapping[str, float]) -> dict:
  """The metrics.jsonl row of `values` at `step` (non-finite values as strings)."""
  row = {"step": int(step)}
  row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
  return row


def replace_eval_row(out_dir: str, step: int, scalars: Mapping[str, Any]) -> None:
  """Writes one row of held-out metrics (every key starting with 'eval/') at `step`,
  replacing the eval rows of an earlier run of the same out_dir: metrics.jsonl is rewritten
  atomically without them and with the new row last, and TensorBoard's eval event file
  is replaced by one holding this row alone (``_write_eval_events``). A no-op on processes
  other than 0."""
  if any(not k.startswith("eval/") for k in scalars):
    raise ValueError(f"eval metric names must start with 'eval/': {sorted(scalars)}")
  values = {k: _scalar(v) for k, v in scalars.items()}
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "metrics.jsonl")
  rows = read_jsonl_metrics(path) if os.path.exists(path) else []
  rows = [r for r in rows if not any(k.startswith("eval/") for k in r)] + [_row(step, values)]
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
  _write_eval_events(os.path.join(out_dir, "tb"), int(step), values)


def read_jsonl_metrics(path: str, drop_torn_last: bool = False) -> list:
  """All rows of a metrics.jsonl file.

  A line that is not a JSON object is a ValueError naming the file and its 1-based line.
  With ``drop_torn_last``, a last line without its newline that does not parse (a row whose
  write was interrupted) is dropped instead: what a resumed run does before re-logging.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  rows = []
  for k, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if drop_torn_last and k == len(lines) - 1:
        break
      raise ValueError(f"{path}:{k + 1}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{k + 1}: expected a JSON object, got {type(row).__name__}")
    rows.append(row)
  return rows


def logged_metrics(path: str, step: int) -> dict:
  """The metrics logged at `step` in the metrics.jsonl at `path` (its rows for that step
  merged, without 'step'); {} at step 0 or when there is no such file or row. What a rerun
  of a finished run reports as its last metrics."""
  if step == 0 or not os.path.exists(path):
    return {}
  out = {}
  for row in read_jsonl_metrics(path, drop_torn_last=True):
    if row.get("step") == step:
      out.update({k: v for k, v in row.items() if k != "step"})
  return out

"""Metrics: one JSONL line per logged step plus TensorBoard event files.

Files under a run's ``out_dir``:
  metrics.jsonl     {"step": int, "<name>": float, ...} per logged step (appended;
                    a resumed run continues the same file)
  tb/               TensorBoard event files (tensorboardX, no TensorFlow needed)
Only process 0 writes, so multi-host runs log once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping

import jax
import numpy as np

from cai_jax.shards import write_atomic


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


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
    if tensorboard:
      from tensorboardX import SummaryWriter  # deferred: optional heavy import
      self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

  def truncate_after(self, step: int):
    """Drops rows with step > `step` (a resumed run re-does those steps)."""
    if not self.active or not os.path.exists(self.path):
      return
    self._file.close()
    rows = read_jsonl_metrics(self.path, drop_torn_last=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        if row.get("step", 0) <= step:
          f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, Any]) -> Dict[str, float]:
    """Logs `scalars` (arrays or numbers) at `step`; returns them as floats."""
    values = {k: _scalar(v) for k, v in scalars.items()}
    if not self.active:
      return values
    row = {"step": int(step)}
    row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
    return values

  def close(self):
    if not self.active:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def replace_eval_row(out_dir: str, step: int, scalars: Mapping[str, Any]) -> None:
  """Appends one row of held-out metrics (every key starting with 'eval/') at `step` to
  out_dir/metrics.jsonl and TensorBoard, first dropping the eval rows of an earlier run of
  the same out_dir (metrics.jsonl is rewritten atomically). Call it on process 0."""
  if any(not k.startswith("eval/") for k in scalars):
    raise ValueError(f"eval metric names must start with 'eval/': {sorted(scalars)}")
  path = os.path.join(out_dir, "metrics.jsonl")
  if os.path.exists(path):
    rows = [r for r in read_jsonl_metrics(path) if not any(k.startswith("eval/") for k in r)]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
  writer = MetricsWriter(out_dir)
  try:
    writer.write(step, scalars)
  finally:
    writer.close()


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

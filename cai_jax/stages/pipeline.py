"""`cai-jax pipeline`: the whole method, stage after stage, from one gin file.

Runs `stages` (default: critique_revision → sl → feedback → pm → rl → evaluate) in
order, each as its own `cai-jax STAGE` process with the same gin files and bindings, so
every stage reads its inputs from the previous stage's output directory exactly as when
run by hand (the experiment gin file binds those paths) and frees its memory when done.

Resuming: a stage whose output directory is complete (a `summary.json`, or a
`manifest.json` marked complete) and whose effective config (`out_dir/config.gin`) is
the one this run would use is skipped; any other stage runs, and its own resume logic
continues a half-finished run (finished shards and checkpoints are kept). A stage that
fails stops the pipeline with its exit status; rerunning the command continues from it.
On Linux a stage process ends with the pipeline (killed, it leaves no stage running beside
a rerun).

Multi-process runs (``cai_jax.distributed``): start the same `cai-jax pipeline` command
on every host (as for any stage). The pipeline process itself joins nothing: it passes its
--distributed* flags (and environment) to each stage process, which joins the run; every
host's pipeline makes the same skip decisions from the shared output directories, and
process 0 writes `pipeline.json`.

Moving a run (`cai-jax pipeline --out_dir=DIR`): `out_dir` is the root of every stage's
output. When the stages' own out_dirs lie under another common directory (the experiment
file's root, e.g. runs/smollm2_cpu), each is moved to the same place under `out_dir`
(runs/smollm2_cpu/sl -> DIR/sl), and so is every binding that points into the output of a
stage that runs (the next stage's inputs: sl.records, rl.pm, a macro like
BASE = 'runs/tiny_cpu/model'). A binding into the output of a stage left out of `stages`
moves only when an earlier run with this out_dir wrote that output under it (rerunning
some stages of a moved experiment); other inputs (data files, the embedded model) stay.
`relocate` computes those bindings; the CLI passes them to every stage.

Every command that writes an out_dir leaves an `UNFINISHED` file there (holding its
config) from before it starts until it returns, and writes its config.gin only then, so a
run that failed, was refused or was killed is never taken for complete from the outputs
of an earlier run with another config, and config.gin always describes the outputs beside
it. It also records the
fingerprints of the models it reads (`inputs.json`, ``model_dir.input_fingerprints``); a
stage whose input models changed since (an earlier stage trained further) is not skipped:
it stops the pipeline with one line naming them, its outputs untouched. While it runs, the
command holds out_dir's lock (`lock_out_dir`): a second command into the same out_dir stops
with one line naming the first and writes nothing.

Output: one line per stage on stderr ("ran" / "skipped", seconds), `pipeline.json` in
`out_dir` (when bound) with the same for this invocation (replacing an earlier one's), and
the final summary as the return value: the
stages, total seconds and, when `evaluate` is a stage, the report's path and Elo table
(from its summary.json when it was skipped). In a
multi-process run each stage entry also holds the process_index and process_count its stage
process reported (process 0's in pipeline.json; each host's in the summary it prints).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

DEFAULT_STAGES = ("critique_revision", "sl", "feedback", "pm", "rl", "evaluate")
SKIP_FLAG = "--skip_if_complete"
STAGE_ENV = "CAI_JAX_PIPELINE_STAGE"
PARENT_ENV = "CAI_JAX_PIPELINE_PID"
"""Environment variable naming the stage in a stage process of a pipeline, whose
command-line bindings are the pipeline's (every stage's)."""


class StageFailed(RuntimeError):
  """A stage exited with a non-zero status (exit_status); its error is on stderr."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


# Written in a command's out_dir (with its config) before it runs and removed when it returns,
# after its config.gin is written: a run that failed or was killed leaves it, so the outputs
# of an earlier finished run there (summary.json, a complete manifest) are not taken for
# this config's.
UNFINISHED = "UNFINISHED"


# Held (an exclusive flock) by the process writing a command's out_dir, for as long as the
# command runs: a second command into the same out_dir is refused instead of writing the same
# shards and checkpoints beside it. Removed when the command ends (``unlock_out_dir``); the
# kernel releases the lock of a killed holder, whose file the next command takes over.
LOCK_FILE = ".cai_jax.lock"


def lock_out_dir(out_dir: str, command: str) -> Optional[int]:
  """Takes the exclusive lock of out_dir (created if missing) for `command` and returns the
  open file descriptor that holds it (``unlock_out_dir`` releases it and removes the file;
  the process's end releases it too); None, with a logged warning, on a filesystem without
  locks (some FUSE mounts).

  Raises a one-line RuntimeError naming the directory and the holder ('cai-jax sl, pid
  1234') when another process holds it."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, LOCK_FILE)
  while True:
    fd = _locked(path, out_dir, command)
    if fd is None:
      return None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:   # not a file its holder removed (unlock_out_dir) while this one waited
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"cai-jax {command}, pid {os.getpid()}\n".encode(), 0)
  return fd


def unlock_out_dir(out_dir: str, fd: int) -> None:
  """Releases the lock ``lock_out_dir`` returned: removes the lock file, then closes `fd`."""
  try:
    os.remove(os.path.join(out_dir, LOCK_FILE))
  except FileNotFoundError:
    pass
  finally:
    os.close(fd)


def _locked(path: str, out_dir: str, command: str) -> Optional[int]:
  """An open descriptor of `path` holding its exclusive flock; None (warned) where the
  filesystem has no locks; RuntimeError naming the holder when another process holds it."""
  import errno
  import fcntl   # POSIX only: imported here, so the module loads everywhere
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "pid unknown"
    os.close(fd)
    raise RuntimeError(f"{command}: {out_dir} is being written by another command ({holder}); "
                       "wait for it to end, or use another --out_dir") from None
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
      raise
    import logging
    logging.getLogger(__name__).warning(
        "%s: the filesystem of %s does not support locks (%s); a second command into it "
        "would not be noticed", command, out_dir, e.strerror)
    return None
  except BaseException:
    os.close(fd)
    raise
  return fd


def is_complete(out_dir: str) -> bool:
  """True when out_dir holds a finished stage output: summary.json, or a manifest.json
  whose "complete" is true, and no UNFINISHED marker of a run that started since."""
  if os.path.exists(os.path.join(out_dir, UNFINISHED)):
    return False
  if os.path.isfile(os.path.join(out_dir, "summary.json")):
    return True
  manifest = os.path.join(out_dir, "manifest.json")
  if os.path.isfile(manifest):
    try:
      with open(manifest, encoding="utf-8") as f:
        value = json.load(f)
    except (OSError, json.JSONDecodeError):
      return False
    return isinstance(value, dict) and bool(value.get("complete"))
  return False


def same_config(out_dir: str, config_text: str) -> bool:
  """True when out_dir/config.gin holds exactly config_text."""
  path = os.path.join(out_dir, "config.gin")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    return f.read() == config_text


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def common_dir(stage_dirs: Dict[str, str], root: str) -> str:
  """The directory that every out_dir in {command: out_dir} lies under ('.' if none is
  shared by relative paths). Raises a one-line ValueError naming pipeline.out_dir=root
  when absolute and relative paths are mixed."""
  dirs = [os.path.normpath(d) for d in stage_dirs.values()]
  try:
    return os.path.normpath(os.path.commonpath(dirs) or ".")
  except ValueError:
    raise ValueError(f"pipeline.out_dir={root!r}: the stages' out_dirs {sorted(set(dirs))} "
                     "mix absolute and relative paths; bind each STAGE.out_dir instead") from None


def relocate(stage_dirs: Dict[str, str], values: Dict[str, object], root: str,
             stages: Sequence[str],
             exists: Callable[[str], bool] = os.path.exists) -> Dict[str, object]:
  """The bindings that move the outputs of `stages` under `root`.

  Args:
    stage_dirs: {command: its bound out_dir}, for every command the config binds one for
      (their common directory is the experiment's root, e.g. runs/smollm2_cpu).
    values: {binding key: value} of the run's gin bindings (e.g. 'sl.records', 'BASE',
      'pm/TrainConfig.num_steps'); strings, and lists / tuples of strings, are path
      candidates, other values are ignored.
    root: the pipeline's out_dir.
    stages: the commands that run; their outputs move.
    exists: whether a path exists (a test passes its own).
  Returns:
    {binding key: new value} for every value at or under the out_dir of a stage that runs
    (the out_dir bindings themselves included): out_dir -> root/relpath(out_dir, common).
    The most specific out_dir decides. A path into the output of a stage that does not run
    (an input from an earlier run) moves only when its place under root exists, i.e. an
    earlier pipeline with this out_dir wrote it (rerunning some stages of a moved
    experiment reads the others' outputs there); otherwise it stays. Empty when `root` is
    empty or already the common directory, however spelled (relative or absolute, through a
    symlink): moving the bindings there would only respell them, and the stages would not
    take their finished outputs for this config's.
  Raises:
    ValueError (one line) when the out_dirs share no directory (absolute and relative paths
    mixed).
  """
  if not root or not stage_dirs:
    return {}
  dirs = {s: os.path.normpath(d) for s, d in stage_dirs.items()}
  common = common_dir(stage_dirs, root)
  root = os.path.normpath(root)
  if root == common or os.path.realpath(root) == os.path.realpath(common):
    return {}   # the same directory (spelled absolute, or through a symlink): nothing moves
  moving = {dirs[s] for s in stages if s in dirs}
  table = sorted(((d, os.path.normpath(os.path.join(root, os.path.relpath(d, common))), d in moving)
                  for d in set(dirs.values())), key=lambda m: -len(m[0]))

  def moved(value):
    if not isinstance(value, str) or not value or ":" in value.split(os.sep, 1)[0]:
      return value   # not a path, or a spec like pkg:... / gs://...
    path = os.path.normpath(value)
    for old, new, runs in table:
      if _under(path, old):
        there = new + path[len(old):]
        return there if runs or exists(there) else value
    return value

  out: Dict[str, object] = {}
  for key, value in values.items():
    new = type(value)(moved(v) for v in value) if isinstance(value, (list, tuple)) else moved(value)
    if new != value:
      out[key] = new
  return out


def last_json_line(text: str) -> dict:
  """The last line of a command's stdout that is a JSON object (its result), or {}.

  Multi-process runs: the collectives runtime prints its own lines to the same stdout."""
  for line in reversed(text.splitlines()):
    if line.startswith("{"):
      try:
        value = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(value, dict):
        return value
  return {}


def _finished_summary(out_dir: str) -> dict:
  """The summary.json of a finished stage in out_dir (its result when it ran), or {}."""
  path = os.path.join(out_dir, "summary.json")
  if not out_dir or not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}


def _signal_name(number: int) -> str:
  """'SIGKILL' for 9; 'signal N' for a number with no name here."""
  try:
    return signal.Signals(number).name
  except ValueError:
    return f"signal {number}"


def end_with_pipeline() -> None:
  """Called first in a stage process the pipeline started (``PARENT_ENV`` holds the
  pipeline's pid): on Linux, asks for SIGKILL when the pipeline process dies, and exits at
  once when it already has, so a killed pipeline leaves no stage running beside a rerun of
  it. The stage sets this up itself: a preexec_fn would fork the pipeline process, which
  has loaded jax's threads. The variable is removed, so the stage's own children do not
  read it. Elsewhere (or without the variable) it does nothing."""
  parent = os.environ.pop(PARENT_ENV, None)
  if not parent or not sys.platform.startswith("linux"):
    return
  import ctypes
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
  if os.getppid() != int(parent):   # the pipeline died before the signal was set
    os._exit(128 + int(signal.SIGKILL))


def _log(msg: str) -> None:
  print(f"pipeline: {msg}", file=sys.stderr, flush=True)


def run(stages: Sequence[str] = DEFAULT_STAGES, out_dir: str = "",
        cli_args: Sequence[str] = (), commands: Sequence[str] = (),
        python: Optional[str] = None, process_id: Optional[int] = 0) -> dict:
  """Runs the stages in order; returns the pipeline summary.

  Args:
    stages: command names, in order.
    out_dir: where pipeline.json goes ('' = nowhere); the CLI has already moved the
      stages' outputs under it (`relocate`, in cli_args).
    cli_args: the gin arguments forwarded to every stage (--gin_file=..., --gin_bindings=...,
      --gin_search_path=...); given by the CLI.
    commands: the known command names (for the error on an unknown stage).
    python: the interpreter running `-m cai_jax.main` (default: this one).
    process_id: this process's index in a multi-process run (0 when single-process), or
      None when only the stages learn it (a cluster launch that jax detects): then it is
      the "process_index" of the first stage result.
  Raises:
    ValueError for an unknown or repeated stage, or `stages` given as one string;
    StageFailed (one line, naming the stage, with its exit status) when a stage fails; a
    stage killed by signal N has exit status 128 + N, as a shell reports it.
  """
  if isinstance(stages, str):
    raise ValueError(f"pipeline.stages must be a list of stage names, e.g. [{stages!r}]; "
                     f"got the string {stages!r}")
  stages = list(stages)
  unknown = [s for s in stages if commands and s not in commands]
  if unknown or not stages:
    raise ValueError(f"pipeline.stages: unknown stage(s) {unknown or stages}; "
                     f"commands: {', '.join(commands)}")
  if len(set(stages)) != len(stages):
    raise ValueError(f"pipeline.stages lists a stage twice: {stages}")
  t0 = time.perf_counter()
  done: List[Dict[str, object]] = []
  results: Dict[str, object] = {}

  primary = {"known": process_id is not None, "value": process_id == 0}

  def write_status():
    if out_dir and primary["value"]:
      os.makedirs(out_dir, exist_ok=True)
      from cai_jax.shards import write_atomic
      write_atomic(os.path.join(out_dir, "pipeline.json"),
                   json.dumps({"stages": done, "seconds": round(time.perf_counter() - t0, 1)},
                              indent=1) + "\n")

  for k, stage in enumerate(stages):
    _log(f"[{k + 1}/{len(stages)}] {stage} ...")
    start = time.perf_counter()
    cmd = [python or sys.executable, "-m", "cai_jax.main", stage, *cli_args, SKIP_FLAG]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, **{STAGE_ENV: stage, PARENT_ENV: str(os.getpid())}))
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
      # A stage killed by a signal (the OOM killer's SIGKILL) exits as a shell reports it.
      code = proc.returncode if proc.returncode > 0 else 128 - proc.returncode
      how = (f"(exit status {code}); fix the error above and rerun" if proc.returncode > 0 else
             f"(killed by {_signal_name(-proc.returncode)}, exit status {code}); rerun")
      done.append({"stage": stage, "status": "failed", "seconds": seconds, "exit_status": code})
      write_status()
      raise StageFailed(f"pipeline: stage {stage} failed {how} to continue from this stage", code)
    result = last_json_line(proc.stdout)
    if not primary["known"] and result:   # a multi-process stage names its process
      primary.update(known=True, value=result.get("process_index", 0) == 0)
    status = "skipped" if result.get("pipeline_status") == "skipped" else "ran"
    results[stage] = result
    entry = {"stage": stage, "status": status, "seconds": seconds}
    # A stage that joined a multi-process run says so (the pipeline itself joins nothing).
    entry.update({k: result[k] for k in ("process_index", "process_count") if k in result})
    done.append(entry)
    write_status()
    _log(f"[{k + 1}/{len(stages)}] {stage} {status} ({seconds:.1f} s)")
  summary: Dict[str, object] = {"stages": done, "seconds": round(time.perf_counter() - t0, 1)}
  ev = results.get("evaluate")
  if isinstance(ev, dict) and ev.get("pipeline_status") == "skipped":
    ev = _finished_summary(str(ev.get("out_dir", ""))) or ev   # what it returned when it ran
  if isinstance(ev, dict):
    summary["report"] = ev.get("report") or os.path.join(ev.get("out_dir", ""), "report.html")
    if "elo" in ev:
      summary["elo"] = ev["elo"]
  write_status()
  return summary

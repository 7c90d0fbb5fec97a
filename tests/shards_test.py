"""Tests of cai_jax.shards: atomic writes, resumable run directories, reading finished runs."""

import json
import os

import pytest

from cai_jax import shards


def _stats(sums):
  return {"rows": sum(s["rows"] for s in sums.values())}


def _open(out_dir, config, names=("shard-00000.jsonl", "shard-00001.jsonl"), stage="toy"):
  return shards.open_run(str(out_dir), stage, config, list(names), (shards.SHARD_PREFIX,),
                         lambda name, rows: {"rows": len(rows)}, _stats,
                         counts={"num_prompts": 3})


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
  path = str(tmp_path / "out.txt")
  shards.write_atomic(path, "first\n")

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    shards.write_atomic(path, "second, never complete\n")
  assert open(path).read() == "first\n"   # the old file is untouched
  monkeypatch.undo()
  shards.write_atomic(path, "second\n")
  assert open(path).read() == "second\n"
  assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_a_failed_write_leaves_no_tmp_file(tmp_path, monkeypatch):
  path = str(tmp_path / "out.txt")
  shards.write_atomic(path, "first\n")
  with pytest.raises(UnicodeEncodeError):
    shards.write_atomic(path, "unencodable \udc80\n")   # a lone surrogate
  assert sorted(os.listdir(tmp_path)) == ["out.txt"] and open(path).read() == "first\n"

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    shards.write_atomic(path, "second\n")
  assert sorted(os.listdir(tmp_path)) == ["out.txt"] and open(path).read() == "first\n"


def test_write_atomic_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
  import stat
  path = str(tmp_path / "out.txt")
  synced = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    st = os.fstat(fd)
    synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
    real_fsync(fd)

  def replace(src, dst):
    synced.append(("replace", None))
    real_replace(src, dst)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  shards.write_atomic(path, "x\n")
  assert [k for k, _ in synced] == ["file", "replace", "dir"]
  assert synced[-1][1] == os.stat(tmp_path).st_ino

  def refuse(fd):   # an OS or file system that cannot fsync a directory
    if stat.S_ISDIR(os.fstat(fd).st_mode):
      raise OSError(22, "Invalid argument")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", refuse)
  shards.write_atomic(path, "y\n")
  assert open(path).read() == "y\n"


def test_partition_and_names():
  assert shards.partition("abcde", 2) == [[(0, "a"), (1, "b")], [(2, "c"), (3, "d")], [(4, "e")]]
  assert shards.partition([], 3) == []
  with pytest.raises(ValueError, match="shard_size must be >= 1"):
    shards.partition("ab", 0)
  assert shards.shard_name("helpful-", 7) == "helpful-00007.jsonl"


def test_resume_counts_shards_on_disk_and_removes_tmp(tmp_path):
  run = _open(tmp_path, {"a": 1})
  assert not run.done and not run.complete
  run.write_shard("shard-00000.jsonl", [{"x": 1}, {"x": 2}], {"rows": 2})
  (tmp_path / "shard-00001.jsonl.tmp").write_text('{"x": ')
  manifest = json.load(open(tmp_path / shards.MANIFEST))
  assert manifest["shards_done"] == ["shard-00000.jsonl"] and manifest["num_prompts"] == 3
  assert list(manifest)[:4] == ["stage", "config_hash", "config", "num_prompts"]
  # A shard renamed into place before its manifest update is still counted.
  shards.write_jsonl(str(tmp_path / "shard-00001.jsonl"), [{"x": 3}])
  run = _open(tmp_path, {"a": 1})
  assert run.complete and run.sums == {"shard-00000.jsonl": {"rows": 2},
                                       "shard-00001.jsonl": {"rows": 1}}
  assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
  manifest = json.load(open(tmp_path / shards.MANIFEST))
  assert manifest["complete"] and manifest["stats"] == {"rows": 3}


def test_refusal_names_the_differing_keys(tmp_path):
  run = _open(tmp_path, {"a": 1, "b": 2, "c": 3})
  run.write_shard("shard-00000.jsonl", [{"x": 1}], {"rows": 1})
  with pytest.raises(ValueError) as e:
    _open(tmp_path, {"a": 1, "b": 5, "d": 4})
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path) in msg
  assert "holds a toy run with a different config (differs in: b, c, d); use a new out_dir" in msg
  with pytest.raises(ValueError, match="; delete it$"):
    shards.open_run(str(tmp_path), "toy", {"a": 2}, ["shard-00000.jsonl"], ("shard-",),
                    lambda name, rows: {"rows": len(rows)}, lambda sums: {}, hint="delete it")
  with pytest.raises(ValueError, match="holds a 'toy' run"):
    _open(tmp_path, {"a": 1, "b": 2, "c": 3}, stage="other")
  other = tmp_path / "bare"
  other.mkdir()
  (other / "shard-00000.jsonl").write_text("{}\n")
  with pytest.raises(ValueError, match="has shard files but no manifest.json"):
    _open(other, {"a": 1})


def test_a_run_without_shards_is_started_afresh_under_another_config(tmp_path):
  """A first attempt that failed before writing any shard holds no work: a corrected
  rerun with another config replaces its manifest instead of being refused."""
  _open(tmp_path, {"a": 1})
  run = _open(tmp_path, {"a": 2})
  assert not run.done and run.sums == {}
  manifest = json.load(open(tmp_path / shards.MANIFEST))
  assert manifest["config"] == {"a": 2} and manifest["shards_done"] == []


def test_read_run_refuses_incomplete_runs(tmp_path):
  run = _open(tmp_path, {"a": 1})
  run.write_shard("shard-00000.jsonl", [{"x": 1}], {"rows": 1})
  with pytest.raises(ValueError, match=r"toy run is not complete \(1/2 shards"):
    shards.read_run(str(tmp_path), "toy")
  run.write_shard("shard-00001.jsonl", [{"x": 2}, {"x": 3}], {"rows": 2})
  assert shards.read_run(str(tmp_path), "toy") == {"shard-00000.jsonl": [{"x": 1}],
                                                   "shard-00001.jsonl": [{"x": 2}, {"x": 3}]}
  assert shards.read_run(str(tmp_path)) == shards.read_run(str(tmp_path), "toy")
  with pytest.raises(ValueError, match=f"{tmp_path}: not a feedback run"):
    shards.read_run(str(tmp_path), "feedback")
  with pytest.raises(FileNotFoundError):
    shards.read_run(str(tmp_path / "missing"))


def test_a_torn_shard_or_manifest_is_named_on_resume(tmp_path):
  run = _open(tmp_path, {"a": 1})
  run.write_shard("shard-00000.jsonl", [{"x": 1}], {"rows": 1})
  (tmp_path / "shard-00001.jsonl").write_text('{"x": 2}\n{"x": ')   # not written by shards
  with pytest.raises(ValueError, match=rf"^{tmp_path / 'shard-00001.jsonl'}:2: invalid JSON"):
    _open(tmp_path, {"a": 1})
  (tmp_path / "shard-00001.jsonl").unlink()
  (tmp_path / shards.MANIFEST).write_text('{"stage": ')
  with pytest.raises(ValueError, match=rf"^{tmp_path / shards.MANIFEST}:1: invalid JSON"):
    _open(tmp_path, {"a": 1})
  with pytest.raises(ValueError, match=rf"^{tmp_path / shards.MANIFEST}:1: invalid JSON"):
    shards.read_run(str(tmp_path))


def test_config_diff_names_nested_fields():
  old = {"data": "x", "optimizer": {"learning_rate": 1e-3, "b1": 0.9}, "seed": 0, "gone": 1}
  new = {"data": "x", "optimizer": {"learning_rate": 3e-5, "b1": 0.9}, "seed": 0,
         "added": {"a": 1}}
  assert shards.config_diff(new, old) == ["added", "gone", "optimizer.learning_rate"]
  assert shards.config_diff(old, old) == []
  assert shards.config_diff({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}) == ["a.b.c"]

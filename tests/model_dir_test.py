"""model_dir: the params hash written with a model directory, the fingerprints of the models
a command reads, and the inputs.json record that tells a rerun they changed."""

import hashlib
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from cai_jax import model_dir, models
from cai_jax.configs import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32)


def tiny_params(seed=0):
  return jax.tree_util.tree_map(np.asarray, models.init(TINY, jax.random.PRNGKey(seed)))


def test_params_sha256_is_sha256_of_every_leaf_in_order():
  params = {"b": np.arange(3, dtype=np.float32), "a": {"w": np.ones((2, 2), np.int32)}}
  expected = hashlib.sha256()   # tree order: sorted dict keys
  expected.update(b"['a']['w']|<i4|(2, 2)\n" + np.ones((2, 2), np.int32).tobytes())
  expected.update(b"['b']|<f4|(3,)\n" + np.arange(3, dtype=np.float32).tobytes())
  assert model_dir.params_sha256(params) == expected.hexdigest()
  # jax arrays hash as their host values
  assert model_dir.params_sha256(jax.tree_util.tree_map(jax.numpy.asarray, params)) == \
      expected.hexdigest()


def test_a_model_directory_keeps_its_fingerprint_until_its_contents_change(tmp_path):
  params = tiny_params()
  path = model_dir.save_model(str(tmp_path / "m"), TINY, params)
  stored = (tmp_path / "m" / model_dir.PARAMS_SHA256).read_text().strip()
  assert stored == model_dir.params_sha256(params)
  first = model_dir.fingerprint(path)
  assert first is not None
  model_dir.save_model(path, TINY, params)             # the same parameters saved again
  assert model_dir.fingerprint(path) == first
  copy = shutil.copytree(path, tmp_path / "copy")       # another place, same model
  assert model_dir.fingerprint(str(copy)) == first
  changed = jax.tree_util.tree_map(np.array, params)   # copies
  leaf = jax.tree_util.tree_leaves(changed)[0]
  leaf.reshape(-1)[0] += 1.0
  model_dir.save_model(path, TINY, changed)
  assert model_dir.fingerprint(path) != first
  model_dir.save_model(path, TINY, params)
  (tmp_path / "m" / "harm_model.json").write_text('{"offset": 1.0}')   # a small file changes
  assert model_dir.fingerprint(path) != first
  (tmp_path / "m" / model_dir.PARAMS_SHA256).unlink()   # written before the hash existed
  assert model_dir.fingerprint(path) is None


def test_files_fingerprint_by_size_and_both_ends(tmp_path):
  gguf = tmp_path / "m.gguf"
  body = bytearray(os.urandom(3 << 20))
  gguf.write_bytes(bytes(body))
  first = model_dir.fingerprint(str(gguf))
  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(gguf, other / "m.gguf")
  assert model_dir.fingerprint(str(other / "m.gguf")) == first
  body[-1] ^= 1                                          # a byte in the last MiB
  gguf.write_bytes(bytes(body))
  assert model_dir.fingerprint(str(gguf)) != first

  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "llama"}')
  (hf / "model.safetensors").write_bytes(b"x" * 100)
  (hf / "README.md").write_text("notes")
  before = model_dir.fingerprint(str(hf))
  (hf / "README.md").write_text("other notes")           # not a weight or config file
  assert model_dir.fingerprint(str(hf)) == before
  (hf / "model.safetensors").write_bytes(b"y" * 100)
  assert model_dir.fingerprint(str(hf)) != before
  assert model_dir.fingerprint(str(tmp_path / "missing")) is None
  assert model_dir.fingerprint("pkg:no_such_package_here/x.gguf") is None


def test_input_fingerprints_find_models_and_run_directories(tmp_path):
  params = tiny_params()
  sl = model_dir.save_model(str(tmp_path / "sl" / "model"), TINY, params)
  rl = tmp_path / "rl"
  model_dir.save_model(str(rl / "model"), TINY, params)
  model_dir.save_model(str(rl / "snapshots" / "step-00002"), TINY, params)
  (rl / "checkpoints" / "2").mkdir(parents=True)         # not a model directory
  (tmp_path / "prompts.jsonl").write_text("{}\n")
  out = tmp_path / "eval"
  model_dir.save_model(str(out / "inside"), TINY, params)   # the command's own output
  values = {"sl": sl, "rl_dir": str(rl), "prompts": str(tmp_path / "prompts.jsonl"),
            "extra": [str(out / "inside"), sl], "judges": ["feedback", "pm"], "n": 3,
            "empty": "", "data": "tfds:red_team:train"}
  found = model_dir.input_fingerprints(values, str(out))
  fp = model_dir.fingerprint(sl)
  assert found == {"sl": fp, "rl_dir:model": fp, "rl_dir:snapshots/step-00002": fp,
                   "extra[1]": fp}


def test_model_fingerprints_keep_the_arguments_that_name_models(tmp_path):
  sl = model_dir.save_model(str(tmp_path / "sl"), TINY, tiny_params())
  (tmp_path / "p.jsonl").write_text("{}\n")
  found = model_dir.model_fingerprints({"policy": sl, "reference": "", "pm": None,
                                        "prompts": str(tmp_path / "p.jsonl"), "n": 3,
                                        "missing": str(tmp_path / "nothing")})
  assert found == {"policy": model_dir.fingerprint(sl)}


def test_changed_inputs_compares_what_both_runs_read(tmp_path):
  assert model_dir.changed_inputs(str(tmp_path), {"a": "1"}) == []    # nothing recorded
  model_dir.record_inputs(str(tmp_path), {"a": "1", "b": "2"})
  assert model_dir.changed_inputs(str(tmp_path), {"a": "1", "b": "2"}) == []
  assert model_dir.changed_inputs(str(tmp_path), {"a": "1", "c": "3"}) == []
  assert model_dir.changed_inputs(str(tmp_path), {"a": "9", "b": "8"}) == ["a", "b"]
  model_dir.record_inputs(str(tmp_path), {"c": "3"})                 # added to the record
  assert json.loads((tmp_path / model_dir.INPUTS_FILE).read_text()) == \
      {"a": "1", "b": "2", "c": "3"}
  (tmp_path / model_dir.INPUTS_FILE).write_text("[1]")
  with pytest.raises(ValueError, match="inputs.json: not a JSON object"):
    model_dir.changed_inputs(str(tmp_path), {})


def test_load_chat_model_needs_a_tokenizer_and_warns_on_a_foreign_format(tmp_path, caplog):
  from cai_jax.tokenizer import ByteTokenizer
  cfg, params = TINY, tiny_params()
  bare = model_dir.save_model(str(tmp_path / "bare"), cfg, params)
  with pytest.raises(ValueError, match=r"^policy '.*bare' has no tokenizer$"):
    model_dir.load_chat_model(bare, chat_format="chatml", what="policy")
  with_tok = model_dir.save_model(str(tmp_path / "tok"), cfg, params, ByteTokenizer())
  with caplog.at_level("WARNING"):
    got_cfg, got_params, tok = model_dir.load_chat_model(with_tok, chat_format="llama3")
  assert got_cfg == cfg and isinstance(tok, ByteTokenizer)
  np.testing.assert_array_equal(np.asarray(got_params["embed"]["embedding"]),
                                np.asarray(params["embed"]["embedding"]))
  assert not [r for r in caplog.records if "chat_format=" in r.getMessage()]   # byte: markers are tokens

  class Splitting(ByteTokenizer):   # a vocabulary without the chat markers
    def encode(self, text):
      return list(text.encode("utf-8"))

  caplog.clear()
  with caplog.at_level("WARNING"):
    from cai_jax.tokenizer import warn_if_foreign_chat_format
    warn_if_foreign_chat_format(Splitting(), "chatml", "model 'x'")
  assert [r.getMessage().split(";")[0] for r in caplog.records] == [
      "chat_format='chatml' with model 'x': the tokenizer encodes the chatml marker "
      "'<|im_start|>' as 12 tokens, not one"]


def _load_embedding(path):
  _, params = model_dir.load_model(path)
  return np.asarray(params["embed"]["embedding"])


def test_save_model_replaces_only_an_empty_or_model_directory(tmp_path):
  params = tiny_params()
  mine = tmp_path / "mydata"
  mine.mkdir()
  (mine / "notes.txt").write_text("precious")
  with pytest.raises(ValueError, match=f"^{mine}: exists and is neither empty nor a model directory"):
    model_dir.save_model(str(mine), TINY, params)
  assert os.listdir(mine) == ["notes.txt"]
  afile = tmp_path / "afile"
  afile.write_text("a file")
  with pytest.raises(ValueError, match=f"^{afile}: exists and is not a directory$"):
    model_dir.save_model(str(afile), TINY, params)
  assert afile.read_text() == "a file"
  empty = tmp_path / "empty"
  empty.mkdir()
  model_dir.save_model(str(empty), TINY, params)
  assert model_dir.is_model_dir(str(empty))
  model_dir.save_model(str(empty), TINY, tiny_params(1))     # an earlier model is replaced
  np.testing.assert_array_equal(_load_embedding(str(empty)), tiny_params(1)["embed"]["embedding"])
  assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "mydata"]   # no temporaries left


def test_an_interrupted_save_model_leaves_the_earlier_model(tmp_path, monkeypatch):
  """Ctrl-C while the parameters are written, or between moving the old directory aside
  and moving the new one in: the directory is the earlier model, whole, and no temporary
  directory is left beside it."""
  from cai_jax import checkpoints
  path = model_dir.save_model(str(tmp_path / "m"), TINY, tiny_params(0))
  old = _load_embedding(path)
  real_export = checkpoints.export_params

  def interrupted_export(params, directory, *args, **kwargs):
    real_export(params, directory, *args, **kwargs)
    raise KeyboardInterrupt("simulated Ctrl-C")

  monkeypatch.setattr(checkpoints, "export_params", interrupted_export)
  with pytest.raises(KeyboardInterrupt):
    model_dir.save_model(path, TINY, tiny_params(1))
  monkeypatch.setattr(checkpoints, "export_params", real_export)
  np.testing.assert_array_equal(_load_embedding(path), old)
  assert os.listdir(tmp_path) == ["m"]

  real_rename, calls = os.rename, []

  def interrupted_rename(a, b):
    calls.append((a, b))
    # Ctrl-C when the new directory first moves in (the old one is aside by then); the
    # rename that puts the old one back goes through.
    if b == path and len([c for c in calls if c[1] == path]) == 1:
      raise KeyboardInterrupt("simulated Ctrl-C")
    return real_rename(a, b)

  monkeypatch.setattr(os, "rename", interrupted_rename)
  with pytest.raises(KeyboardInterrupt):
    model_dir.save_model(path, TINY, tiny_params(1))
  monkeypatch.setattr(os, "rename", real_rename)
  assert [a for a, _ in calls].index(path) < [b for _, b in calls].index(path)
  np.testing.assert_array_equal(_load_embedding(path), old)
  assert os.listdir(tmp_path) == ["m"]


def test_check_apart_refuses_an_output_overlapping_the_input(tmp_path):
  src = tmp_path / "hf"
  src.mkdir()
  for out in (src, src / "sub", tmp_path):
    with pytest.raises(ValueError, match=f"--out={out} overlaps --from={src}"):
      model_dir.check_apart(str(src), str(out))
  with pytest.raises(ValueError, match="overlaps"):
    model_dir.check_apart(str(src) + "/", str(tmp_path / "." / "hf"))
  model_dir.check_apart(str(src), str(tmp_path / "hf2"))   # a sibling sharing a name prefix


def test_the_next_write_cleans_up_after_a_write_killed_outright(tmp_path, monkeypatch):
  """kill -9 between moving the earlier model aside and moving the new one in leaves no
  directory and the earlier model as .m.old-*: the next write puts it back first (an
  interrupted next write leaves it in place). kill -9 while the set-aside copy is deleted
  leaves .m.old-* / .m.del-* beside the new model: the next write deletes them."""
  from cai_jax import checkpoints
  path = model_dir.save_model(str(tmp_path / "m"), TINY, tiny_params(0))
  old = _load_embedding(path)
  os.rename(path, tmp_path / ".m.old-0badf00d")
  (tmp_path / ".m.tmp-0badf00d").mkdir()

  def interrupted_export(params, directory, *args, **kwargs):
    raise KeyboardInterrupt("simulated Ctrl-C")

  monkeypatch.setattr(checkpoints, "export_params", interrupted_export)
  with pytest.raises(KeyboardInterrupt):
    model_dir.save_model(path, TINY, tiny_params(1))
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["m"]
  np.testing.assert_array_equal(_load_embedding(path), old)

  shutil.copytree(path, tmp_path / ".m.old-1badf00d")
  shutil.copytree(os.path.join(path, "params"), tmp_path / ".m.del-2badf00d")
  model_dir.save_model(path, TINY, tiny_params(1))
  assert os.listdir(tmp_path) == ["m"]
  np.testing.assert_array_equal(_load_embedding(path), tiny_params(1)["embed"]["embedding"])


def test_a_malformed_model_json_or_head_txt_is_named(tmp_path):
  path = model_dir.save_model(str(tmp_path / "m"), TINY, tiny_params())
  config_file = os.path.join(path, "model.json")
  for text, error in (('["d_model"]', "expected a JSON object of ModelConfig fields, got list"),
                      ('{"d_model": "16"}', "ModelConfig.d_model must be an integer >= 1, got '16'"),
                      ('{"n_heads": 3}', r"ModelConfig.n_heads \(3\) must be a multiple of n_kv_heads")):
    with open(config_file, "w") as f:
      f.write(text)
    with pytest.raises(ValueError, match=f"^{re.escape(config_file)}: {error}"):
      model_dir.load_model(path)
  head_file = os.path.join(path, "head.txt")
  with open(head_file, "w") as f:
    f.write("scaler\n")
  with pytest.raises(ValueError, match=rf"^{re.escape(head_file)}: head 'scaler'; expected one of \['lm', 'scalar'\]$"):
    model_dir.load_head(path)


def test_extra_files_are_part_of_the_atomic_write(tmp_path):
  import jax
  from cai_jax import models
  from cai_jax.configs import ModelConfig
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=16)
  params = models.init(cfg, jax.random.PRNGKey(0))
  out = model_dir.save_model(str(tmp_path / "m"), cfg, params, extra_files={"meta.json": "{}"})
  assert open(os.path.join(out, "meta.json")).read() == "{}" and model_dir.is_model_dir(out)
  for bad in ("model.json", "../x", "a/b"):
    with pytest.raises(ValueError, match=r"extra file .* must be a new plain file name"):
      model_dir.save_model(str(tmp_path / "m"), cfg, params, extra_files={bad: "x"})
  assert open(os.path.join(out, "meta.json")).read() == "{}"   # the old model stays
  assert sorted(os.listdir(tmp_path)) == ["m"]


def test_a_model_trained_in_one_chat_format_warns_when_used_in_another(tmp_path, caplog):
  import logging
  from cai_jax.tokenizer import load_tokenizer
  cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=16)
  params = models.init(cfg, jax.random.PRNGKey(0))
  tok = load_tokenizer("byte")
  raw = model_dir.save_model(str(tmp_path / "raw"), cfg, params, tok,
                             extra_files=model_dir.chat_format_file("raw"))
  plain = model_dir.save_model(str(tmp_path / "plain"), cfg, params, tok,
                               extra_files=model_dir.chat_format_file("none"))
  assert model_dir.trained_chat_format(raw) == "raw"
  assert model_dir.trained_chat_format(plain) is None
  assert model_dir.trained_chat_format(str(tmp_path / "nothing")) is None
  with caplog.at_level(logging.WARNING):
    model_dir.load_chat_model(raw, chat_format="raw", what="rl.policy")
    model_dir.load_chat_model(plain, chat_format="chatml")
    assert not [r for r in caplog.records if "trained in chat format" in r.getMessage()]
    model_dir.load_chat_model(raw, chat_format="chatml", what="rl.pm")
  [warning] = [r.getMessage() for r in caplog.records if "trained in chat format" in r.getMessage()]
  assert warning.startswith(f"rl.pm {raw!r} was trained in chat format 'raw' but is used in "
                            "'chatml' here")


def test_load_any_of_a_run_directory_points_at_its_model(tmp_path):
  """`--model=runs/my_run` (the run, not its model/) names the model directory inside."""
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  model_dir.save_model(str(tmp_path / "run" / "model"), cfg, models.init(cfg, jax.random.PRNGKey(0)))
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"(a run directory? its model is {tmp_path / 'run' / 'model'})")):
    model_dir.load_any(str(tmp_path / "run"))
  with pytest.raises(FileNotFoundError, match=r"Hugging Face folder with config.json$"):
    model_dir.load_any(str(tmp_path))

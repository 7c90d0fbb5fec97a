"""Training loop: resume equals an uninterrupted run, NaN stops with the step, loss falls."""

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import data, steps, train
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=2)
MESH = MeshConfig(1, 1, 1, "dp")


def _dataset(batch=4, seq=64, seed=0):
  examples = data.read_jsonl(os.path.join(REPO, "data", "tiny_chat.jsonl"))
  return data.lm_dataset(examples, load_tokenizer("byte"), "chatml", seq, batch, seed)


def _train(out, n, save_every=2, **kw):
  tc = TrainConfig(num_steps=n, batch_size=4, seq_len=64, save_every=save_every, progress=False,
                   async_checkpoint=False)
  return train.train(CFG, OPT, tc, MESH, _dataset(), str(out), devices=jax.devices()[:1], **kw)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_resumed_run_equals_uninterrupted(tmp_path):
  full = _train(tmp_path / "full", 9)
  _train(tmp_path / "split", 5, save_every=2)     # checkpoints at 2, 4 and 5 (final)
  # Forget step 5: as if the process died after the step-4 checkpoint.
  import shutil
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "5")
  resumed = _train(tmp_path / "split", 9)
  assert resumed.resumed_from == 4
  for a, b in zip(_leaves(full.state.params), _leaves(resumed.state.params)):
    np.testing.assert_array_equal(a, b)
  rows = [r["step"] for r in _read_metrics(tmp_path / "split")]
  assert rows == list(range(1, 10))  # step 5 logged once, not twice


def _read_metrics(out):
  from cai_jax.metrics import read_jsonl_metrics
  return read_jsonl_metrics(os.path.join(out, "metrics.jsonl"))


def _poisoned_at_step_4():
  """_dataset() whose batch index 3 (step 4) has a first row starting with the bos id 257."""
  base = _dataset()
  assert len(base.items) > 16   # the item is not drawn in an earlier epoch
  first_of_batch_3 = int(grain.MapDataset.range(len(base.items)).shuffle(seed=base.seed)[12])

  def poisoned(item):
    out = base.encode(item)
    if item is base.items[first_of_batch_3]:
      out["tokens"] = out["tokens"].copy()
      out["tokens"][0] = 257
    return out

  return dataclasses.replace(base, encode=poisoned)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  def loss_sums(params, cfg, batch):
    total, count = steps.lm_loss_sums(params, cfg, batch)
    return total * jnp.where(jnp.any(batch["tokens"] == 257), jnp.nan, 1.0), count

  ds = _poisoned_at_step_4()   # → NaN loss at step 4
  tc = TrainConfig(num_steps=8, batch_size=4, seq_len=64, save_every=2, progress=False,
                   async_checkpoint=False)
  with pytest.raises(FloatingPointError, match="step 4"):
    train.train(CFG, OPT, tc, MESH, ds, str(tmp_path), devices=jax.devices()[:1], loss_sums=loss_sums)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert not os.path.exists(tmp_path / "model")


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_it_is_saved(tmp_path):
  def loss_sums(params, cfg, batch):
    total, count = steps.lm_loss_sums(params, cfg, batch)
    c = jnp.where(jnp.any(batch["tokens"] == 257), 0.0, 1.0)
    e = params["embed"]["embedding"][0, 0]
    # Value 0 either way; the gradient is infinite on the poisoned batch (sqrt at 0).
    return total + jnp.sqrt(e - jax.lax.stop_gradient(e) + c) - jnp.sqrt(c), count

  ds = _poisoned_at_step_4()
  tc = TrainConfig(num_steps=8, batch_size=4, seq_len=64, save_every=2, progress=False,
                   async_checkpoint=False)
  with pytest.raises(FloatingPointError, match=r"loss \(\d.*\) or gradient norm \((inf|nan)\) at step 4;"):
    train.train(CFG, OPT, tc, MESH, ds, str(tmp_path), devices=jax.devices()[:1], loss_sums=loss_sums)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_loss_of_tiny_model_falls_on_fixed_dataset(tmp_path):
  result = _train(tmp_path, 40, save_every=100)
  rows = _read_metrics(tmp_path)
  first = np.mean([r["loss"] for r in rows[:3]])
  last = np.mean([r["loss"] for r in rows[-3:]])
  assert last < 0.6 * first
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "loss_count"):
    assert key in rows[-1]
  assert os.listdir(tmp_path / "tb")  # TensorBoard event file written
  assert result.state.step == 40


def test_init_params_must_match(tmp_path):
  other = ModelConfig(vocab_size=320, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  from cai_jax import models
  bad = models.init(other, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"embed/embedding.*\(320, 16\).*\(320, 32\)|embed/embedding.*\(320, 32\).*\(320, 16\)"):
    _train(tmp_path, 2, init_params=bad)


def test_sequences_longer_than_the_model_context_are_refused(tmp_path):
  short = dataclasses.replace(CFG, max_seq_len=32)
  tc = TrainConfig(num_steps=1, batch_size=4, seq_len=64, progress=False, async_checkpoint=False)
  with pytest.raises(ValueError, match=r"^TrainConfig.seq_len=64 is longer than the "
                                       r"max_seq_len=32 of the model \(its context\)$"):
    train.train(short, OPT, tc, MESH, _dataset(), str(tmp_path / "out"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "out")


def test_a_refused_train_lm_run_leaves_nothing_that_blocks_the_fixed_rerun(tmp_path):
  from cai_jax.stages import train_lm
  path = tmp_path / "data.jsonl"
  path.write_text("".join(f'{{"text": "hello {i}"}}\n' for i in range(3)))
  model = dataclasses.replace(CFG, max_seq_len=64)
  out = tmp_path / "out"

  def run(batch_size, seq_len):
    tc = TrainConfig(num_steps=2, batch_size=batch_size, seq_len=seq_len, progress=False,
                     async_checkpoint=False)
    return train_lm.run(str(out), str(path), model=model, train_config=tc, mesh=MESH,
                        chat_format="raw")

  with pytest.raises(data.DataError, match="3 examples, fewer than batch_size=8"):
    run(8, 32)
  with pytest.raises(ValueError, match="seq_len=128 is longer than the max_seq_len=64 of the model"):
    run(2, 128)
  assert not out.exists()
  assert run(2, 32)["steps"] == 2


def test_train_lm_refuses_conversations_with_nothing_to_train(tmp_path):
  from cai_jax.stages import train_lm
  path = tmp_path / "sharegpt.jsonl"
  good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
  path.write_text(good + "\n" + '{"messages": [{"role": "human", "content": "q"}, '
                  '{"role": "gpt", "content": "a"}]}\n' + good * 3)
  tc = TrainConfig(num_steps=2, batch_size=2, seq_len=32, progress=False, async_checkpoint=False)
  with pytest.raises(data.DataError, match=f"^{path}:3: no message has role 'assistant'"):
    train_lm.run(str(tmp_path / "out"), str(path), model=CFG, train_config=tc, mesh=MESH)
  assert not (tmp_path / "out").exists()


def test_train_lm_refuses_a_dataset_cut_before_every_trained_token(tmp_path):
  """Every conversation's assistant turn lies past seq_len: nothing would be trained (the
  run finished with loss 0 and exit 0); a dataset where some survive trains and counts."""
  from cai_jax.stages import train_lm
  path = tmp_path / "long.jsonl"
  long = json.dumps({"prompt": "x" * 60, "completion": "a"}) + "\n"
  path.write_text(long * 4)
  tc = TrainConfig(num_steps=1, batch_size=2, seq_len=32, progress=False, async_checkpoint=False)
  with pytest.raises(data.DataError, match=r"^train_lm: every example's trained tokens .* lie "
                                           r"past TrainConfig.seq_len=32 tokens; raise it$"):
    train_lm.run(str(tmp_path / "out"), str(path), model=CFG, train_config=tc, mesh=MESH)
  assert not (tmp_path / "out").exists()
  path.write_text(long * 2 + json.dumps({"prompt": "q", "completion": "a"}) + "\n")
  summary = train_lm.run(str(tmp_path / "out"), str(path), model=CFG, train_config=tc, mesh=MESH)
  assert (summary["truncated_examples"], summary["untrained_examples"]) == (2, 2)


def test_a_dataset_shorter_than_the_run_is_refused_before_training(tmp_path):
  ds = dataclasses.replace(_dataset(), num_epochs=1)   # 52 items: 13 batches of 4
  tc = TrainConfig(num_steps=len(ds) + 1, batch_size=4, seq_len=64, progress=False,
                   async_checkpoint=False)
  with pytest.raises(ValueError, match=r"^the dataset yields 13 batches of 4 \(1 epochs of 52 "
                                       r"items\), fewer than TrainConfig.num_steps=14$"):
    train.train(CFG, OPT, tc, MESH, ds, str(tmp_path / "out"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "out")


def test_a_run_killed_before_its_first_checkpoint_restarts_its_metrics(tmp_path):
  _train(tmp_path, 3, save_every=100)
  import shutil
  shutil.rmtree(tmp_path / "checkpoints")   # as if killed before the first save
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "lo')             # and mid-write of a row
  result = _train(tmp_path, 3, save_every=100)
  assert result.resumed_from is None
  assert [r["step"] for r in _read_metrics(tmp_path)] == [1, 2, 3]


def test_a_run_resumes_on_another_mesh_with_the_same_data_order(tmp_path):
  tc = lambda n: TrainConfig(num_steps=n, batch_size=4, seq_len=64, save_every=2,
                             progress=False, async_checkpoint=False)
  full = train.train(CFG, OPT, tc(6), MESH, _dataset(), str(tmp_path / "full"),
                     devices=jax.devices()[:1])
  train.train(CFG, OPT, tc(3), MESH, _dataset(), str(tmp_path / "split"), devices=jax.devices()[:1])
  import shutil
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "3")
  resumed = train.train(CFG, OPT, tc(6), MeshConfig(1, 2, 2, "fsdp_tp"), _dataset(),
                        str(tmp_path / "split"), devices=jax.devices()[:4])
  assert resumed.resumed_from == 2
  for a, b in zip(_leaves(full.state), _leaves(resumed.state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_finished_run_rerun_reports_its_last_metrics(tmp_path):
  first = _train(tmp_path, 3)
  again = _train(tmp_path, 3)    # e.g. killed after the last checkpoint, before model/
  assert again.resumed_from == 3
  assert again.last_metrics["loss"] == pytest.approx(first.last_metrics["loss"], rel=1e-6)
  assert [r["step"] for r in _read_metrics(tmp_path)] == [1, 2, 3]


def test_a_rerun_with_fewer_steps_than_done_is_refused(tmp_path):
  """num_steps may grow, not drop below the steps done (the 3-step model was returned as the
  result of a 2-step run)."""
  _train(tmp_path, 3)
  with pytest.raises(ValueError, match=r"holds a run of 3 steps, more than "
                                       r"TrainConfig.num_steps=2; use a new out_dir or num_steps >= 3$"):
    _train(tmp_path, 2)
  assert [r["step"] for r in _read_metrics(tmp_path)] == [1, 2, 3]
  assert _train(tmp_path, 4).resumed_from == 3


def test_train_lm_refuses_a_tokenizer_other_than_init_froms(tmp_path):
  """A model continues with the tokenizer it was trained with: train_lm.tokenizer='byte'
  over an init_from model with a word-level tokenizer of 320 tokens (which fits the model's
  vocabulary, so nothing else would catch it) is refused before any training; the same
  tokenizer named explicitly, or none, trains."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from cai_jax import model_dir, models
  from cai_jax.stages import train_lm
  from cai_jax.tokenizer import HFTokenizer
  vocab = {f"w{i}": i for i in range(316)}
  vocab.update({"<s>": 316, "</s>": 317, "<pad>": 318, "<unk>": 319})
  backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(["<s>", "</s>", "<pad>"])
  words = HFTokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  base = model_dir.save_model(str(tmp_path / "base"), CFG,
                              models.init(CFG, jax.random.PRNGKey(0)), words)
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": "w1 w2 w3"}) + "\n" for _ in range(4)))
  tc = TrainConfig(batch_size=2, seq_len=8, num_steps=1, save_every=1, progress=False)
  kw = dict(model=CFG, train_config=tc, mesh=MESH, chat_format="raw", init_from=base)
  with pytest.raises(ValueError, match=r"^train_lm.tokenizer='byte' is not the tokenizer of "
                                       r"train_lm.init_from=.* \(320 vs 320 tokens\)"):
    train_lm.run(str(tmp_path / "out"), str(path), tokenizer="byte", **kw)
  assert not (tmp_path / "out").exists()
  for tokenizer in (None, os.path.join(base, "tokenizer")):
    summary = train_lm.run(str(tmp_path / f"ok-{tokenizer is None}"), str(path),
                           tokenizer=tokenizer, **kw)
    assert summary["steps"] == 1


def test_a_cosine_schedule_shorter_or_longer_than_the_run_is_warned(caplog):
  """OptimizerConfig.total_steps is the cosine's length, TrainConfig.num_steps the run's:
  overriding one alone left the rate undecayed (or at its floor) with no word."""
  opt = OptimizerConfig(learning_rate=1.0, schedule="cosine", total_steps=100,
                        final_lr_fraction=0.0)
  with caplog.at_level("WARNING"):
    assert train.warn_schedule_length(opt, TrainConfig(num_steps=50), steps.lr_schedule(opt))
  want = 0.5 * (1 + np.cos(np.pi * 49 / 100))   # optax's cosine at step 49 of 100
  assert (f"OptimizerConfig.total_steps=100 (the cosine schedule's length) is not "
          f"TrainConfig.num_steps=50: the last step's learning rate is {want:.3g} of the peak"
          in caplog.text)
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert train.warn_schedule_length(opt, TrainConfig(num_steps=130), steps.lr_schedule(opt))
  assert "reached 30 steps before the end" in caplog.text
  for o, n in ((opt, 100), (OptimizerConfig(), 7)):   # matching lengths; constant schedule
    assert not train.warn_schedule_length(o, TrainConfig(num_steps=n), steps.lr_schedule(o))

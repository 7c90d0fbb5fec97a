"""`cai-jax sample` end to end on the embedded SmolLM2-135M-Instruct, and stop-string trimming."""

import json
import os
import subprocess
import sys


from cai_jax.tokenizer import trim_at_stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def test_trim_at_stop():
  assert trim_at_stop("Sure.\n\nHuman: more", ["\n\nHuman:"]) == "Sure."
  assert trim_at_stop("a<|im_end|>b<x>", ["<x>", "<|im_end|>"]) == "a"
  assert trim_at_stop("plain", []) == "plain"


def test_greedy_answer_names_paris(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n" +
                     json.dumps({"messages": [{"role": "user", "content": "Say hello."}]}) + "\n")
  out = tmp_path / "out.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "cai_jax.main", "sample", f"--prompts={prompts}", f"--out={out}",
       "--temperature=0", "--max_new_tokens=24", "--gin.sample.progress=False"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  stats = json.loads(proc.stdout.strip().splitlines()[-1])
  assert stats["prompts"] == 2
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 2 and "Paris" in rows[0]["completion"]
  assert rows[0]["finish_reason"] in ("eos", "stop")
  assert len(rows[0]["logprobs"]) == rows[0]["num_tokens"]
  assert all(lp <= 0 for lp in rows[0]["logprobs"])
  assert "<|im_end|>" not in rows[0]["completion"]
  assert not os.path.exists(str(out) + ".tmp")


def test_malformed_prompt_file_names_the_line(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
  proc = subprocess.run(
      [sys.executable, "-m", "cai_jax.main", "sample", f"--prompts={prompts}",
       f"--out={tmp_path / 'o.jsonl'}", "--gin.sample.progress=False"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert "p.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "o.jsonl").exists()


def test_two_processes_write_what_one_process_writes(tmp_path):
  """2 processes x 4 devices sample exactly what 1 process x 8 devices samples (temperature 1,
  batches split over both processes); process 0 alone writes the file."""
  import jax
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import load_tokenizer
  import multihost

  cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=256)
  model = model_dir.save_model(str(tmp_path / "tiny"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                               load_tokenizer("byte"))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}" + "!" * i}) + "\n"
                             for i in range(12)))
  args = ["sample", f"--prompts={prompts}", f"--gin.sample.model='{model}'", "--max_new_tokens=8",
          "--gin.sample.progress=False", "--gin_file=mesh/fsdp.gin", "--gin.sample.batch_size=8"]
  multi = multihost.run_cli(args + [f"--out={tmp_path / 'multi.jsonl'}"], tmp_path / "logs", 2, 4)
  single = multihost.run_cli(args + [f"--out={tmp_path / 'single.jsonl'}"], tmp_path / "logs", 1, 8)
  results = [multihost.result(out) for out in multi]
  assert [r.pop("process_index") for r in results] == [0, 1]
  for r in results:   # timings are each process's own
    del r["seconds"], r["tokens_per_s"]
  assert results[0] == results[1]
  stats = multihost.result(single[0])
  assert "process_index" not in stats
  assert stats["prompts"] == 12 and stats["batches"] == 2
  assert (tmp_path / "multi.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()
  assert not os.path.exists(str(tmp_path / "multi.jsonl") + ".tmp")


def _tiny_model(path):
  import jax
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import load_tokenizer
  cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_seq_len=128)
  return model_dir.save_model(str(path), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                              load_tokenizer("byte"))


def test_an_interrupted_sample_resumes_to_the_uninterrupted_output(tmp_path, monkeypatch):
  """Shards done before an interruption are kept in OUT.parts/ and not sampled again; the
  finished file equals an uninterrupted run's and a one-shard run's (samples depend on each
  prompt's index in the file only); another config over the parts is refused."""
  import pytest
  from cai_jax import sampler
  from cai_jax.stages import sample
  model = _tiny_model(tmp_path / "tiny")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"question {i}" + "?" * i}) + "\n"
                             for i in range(10)))
  kw = dict(prompts=str(prompts), model=model, chat_format="raw", max_new_tokens=6,
            batch_size=4, progress=False)
  whole = sample.run(out=str(tmp_path / "whole.jsonl"), **kw)
  assert whole["shards_total"] == 1 and whole["prompts"] == 10
  calls, real = [], sampler.generate

  def interrupted(*a, **k):
    calls.append(k["first_row"])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*a, **k)

  out = tmp_path / "out.jsonl"
  monkeypatch.setattr(sampler, "generate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    sample.run(out=str(out), shard_size=4, **kw)
  assert calls == [0, 4] and not out.exists()
  assert sorted(os.listdir(str(out) + ".parts")) == ["manifest.json", "shard-00000.jsonl"]
  with pytest.raises(ValueError, match=r"different config \(differs in: temperature\)"):
    sample.run(out=str(out), shard_size=4, temperature=0.5, **kw)
  manifest_path = tmp_path / "out.jsonl.parts" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())   # as if killed before recording shard 0
  manifest["shards_done"], manifest["shard_sums"] = [], {}
  manifest_path.write_text(json.dumps(manifest))
  monkeypatch.setattr(sampler, "generate", lambda *a, **k: calls.append(k["first_row"]) or real(*a, **k))
  stats = sample.run(out=str(out), shard_size=4, **kw)
  assert calls == [0, 4, 4, 8]   # shard 0 was not sampled again
  assert (stats["shards_total"], stats["shards_run"], stats["prompts"]) == (3, 2, 10)
  assert stats["batches"] == 3   # one batch of 4 rows per shard, shard 0's recounted
  assert stats["generated_tokens"] == whole["generated_tokens"]
  assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
  assert not os.path.exists(str(out) + ".parts") and "_truncated" not in out.read_text()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.jsonl")]


def test_bad_input_fails_before_anything_is_written(tmp_path):
  """Every error on the input (rows, model, settings, lengths, --out) comes before
  OUT.parts/ is created, names the file and line or the setting, and a corrected rerun
  then works."""
  import jax
  import pytest
  from cai_jax import data, model_dir, models
  from cai_jax.stages import sample
  model = _tiny_model(tmp_path / "tiny")
  cfg = model_dir.load_config(model)
  pm = model_dir.save_model(str(tmp_path / "pm"), cfg,
                            models.init(cfg, jax.random.PRNGKey(0), head="scalar"),
                            model_dir.load_tokenizer_of(model), head="scalar")
  good = tmp_path / "p.jsonl"
  good.write_text('{"prompt": "a"}\n\n\n{"prompt": "b"}\n')
  out = tmp_path / "o.jsonl"
  kw = dict(prompts=str(good), out=str(out), model=model, chat_format="raw", max_new_tokens=4,
            progress=False)
  cases = [
      (dict(prompts_text='{"prompt": "a"}\n\n\n{"foo": 1}\n'), data.DataError,
       r"p.jsonl:4: expected a 'prompt', 'messages' or ShareGPT 'conversations' field"),
      (dict(prompts_text='{"prompt": 5}\n'), data.DataError, r"p.jsonl:1: message 0: content must be a str"),
      (dict(prompts_text='{"messages": [{"role": "bogus", "content": "x"}]}\n'), data.DataError,
       r"p.jsonl:1: message 0: role 'bogus'"),
      (dict(prompts_text='{"prompt": "' + "x" * 200 + '"}\n'), data.DataError,
       r"p.jsonl:1: the prompt has \d+ tokens but at most 124 fit .*--gin.sample.truncate"),
      (dict(model=str(tmp_path / "nothing")), FileNotFoundError, "nothing"),
      (dict(model=pm), ValueError, r"is a 'scalar'-head model, not a language model"),
      (dict(temperature=float("nan")), ValueError, "^sample.temperature must be 0"),
      (dict(max_new_tokens=0), ValueError, r"^sample.max_new_tokens must be an integer >= 1, got 0$"),
      (dict(top_p="0.9"), ValueError, r"^sample.top_p must be a number, got '0.9'$"),
      (dict(max_new_tokens=128), ValueError, "max_new_tokens=128 leaves no room"),
      (dict(chat_format="bogus"), ValueError, r"sample.chat_format='bogus'; expected one of .*'none'"),
      (dict(out=str(tmp_path)), ValueError, "is a directory"),
      (dict(out=str(good)), ValueError, "is the --prompts file"),
  ]
  for change, error, message in cases:
    text = change.pop("prompts_text", None)
    good.write_text(text or '{"prompt": "a"}\n\n\n{"prompt": "b"}\n')
    with pytest.raises(error, match=message):
      sample.run(**dict(kw, **change))
    assert not out.exists() and not os.path.exists(str(out) + ".parts"), change
  good.write_text('{"prompt": "a"}\n\n\n{"prompt": "b"}\n')
  stats = sample.run(**kw)
  assert stats["prompts"] == 2 and len(out.read_text().splitlines()) == 2


def test_chat_format_none_puts_bos_first_when_the_tokenizer_wants_one(tmp_path, monkeypatch):
  """chat_format='none' feeds the prompt text as a tokenizer would for a plain text: after
  BOS when the tokenizer asks for one (as the chat formats and sampler.text_generate_fn do)."""
  from cai_jax import model_dir, sampler
  from cai_jax.stages import sample
  from cai_jax.tokenizer import ByteTokenizer

  class BosTokenizer(ByteTokenizer):
    add_bos_token = True

  model = _tiny_model(tmp_path / "tiny")
  real_load, real_generate, seen = model_dir.load_chat_model, sampler.generate, []
  monkeypatch.setattr(model_dir, "load_chat_model",
                      lambda *a, **k: real_load(*a, **k)[:2] + (BosTokenizer(),))
  monkeypatch.setattr(sampler, "generate",
                      lambda p, c, ids, *a, **k: seen.extend(ids) or real_generate(p, c, ids, *a, **k))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "<s>ok"}) + "\n")
  sample.run(prompts=str(prompts), out=str(tmp_path / "o.jsonl"), model=model,
             chat_format="none", max_new_tokens=2, progress=False)
  bos = BosTokenizer.bos_id
  assert seen == [[bos] + list(b"hi"), [bos] + list(b"ok")]


def test_each_generation_is_decoded_once_with_the_same_completions(tmp_path, monkeypatch):
  """Cutting at stop strings and writing the completion decode each row's ids once (not once
  each); the completions are those the plain decode gives."""
  from cai_jax import sampler
  from cai_jax.stages import sample
  from cai_jax.tokenizer import ByteTokenizer, stop_strings
  model = _tiny_model(tmp_path / "tiny")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
  real_decode, real_generate, decoded, results = ByteTokenizer.decode, sampler.generate, [], []
  monkeypatch.setattr(ByteTokenizer, "decode",
                      lambda self, ids, *a, **k: decoded.append(tuple(ids)) or
                      real_decode(self, ids, *a, **k))
  monkeypatch.setattr(sampler, "generate",
                      lambda *a, **k: results.append(real_generate(*a, **k)) or results[-1])
  out = tmp_path / "o.jsonl"
  sample.run(prompts=str(prompts), out=str(out), model=model, chat_format="raw",
             max_new_tokens=8, progress=False)
  assert len(decoded) == len(set(decoded)) >= 6
  tok, stops = ByteTokenizer(), stop_strings("raw")
  want = sampler.cut_at_stop_strings(results[0], tok.decode, stops)
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["completion"] for r in rows] == [want.text(r, tok.decode, stops) for r in range(6)]
  assert [r["num_tokens"] for r in rows] == [int(n) for n in want.lengths]


def test_sharegpt_prompts_sample_as_the_same_messages_rows(tmp_path):
  """A ShareGPT {"conversations": [{"from", "value"}]} line is the conversation of the
  equivalent {"messages"} line: the same completions, and the line's turns as its prompt."""
  from cai_jax.stages import sample
  model = _tiny_model(tmp_path / "tiny")
  turns = [("system", "be brief"), ("human", "hi"), ("gpt", "hello"), ("human", "and?")]
  roles = {"system": "system", "human": "user", "gpt": "assistant"}
  sharegpt = {"conversations": [{"from": f, "value": v} for f, v in turns]}
  messages = {"messages": [{"role": roles[f], "content": v} for f, v in turns]}
  outs = []
  for name, row in (("s", sharegpt), ("m", messages)):
    (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    sample.run(prompts=str(tmp_path / f"{name}.jsonl"), out=str(tmp_path / f"{name}.out"),
               model=model, chat_format="chatml", max_new_tokens=4, temperature=0.0,
               progress=False)
    outs.append(json.loads((tmp_path / f"{name}.out").read_text()))
  assert outs[0]["completion"] == outs[1]["completion"]
  assert outs[0]["num_tokens"] == outs[1]["num_tokens"]
  assert outs[0]["prompt"] == sharegpt["conversations"]

"""critique_revision stage: prompt texts, seeded principle draws, resumable sharded output,
config refusal, and end-to-end runs on the tiny model and (slow) SmolLM2-135M-Instruct."""

import hashlib
import json
import os

import numpy as np
import pytest

from cai_jax.constitution import Constitution, CritiqueRevisionPrinciple
from cai_jax.stages import critique_revision as cr
from cai_jax.tokenizer import render_chat_text

P = CritiqueRevisionPrinciple
FEW_SHOT = ("\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Point out anything rude."
            "\n\nCritique: It is rude.\n\nRevisionRequest: Rewrite it politely.\n\nRevision: "
            "Hello! How can I help?\n\nHuman:",)
CONST = Constitution(
    name="tiny", version="tiny-1",
    critique_revision=(
        P("harm", "Point out anything harmful.", "Rewrite it to remove harm."),
        P("rude", "Point out anything rude.", "Rewrite it politely."),
        P("false", "Point out anything false.", "Rewrite it truthfully."),
        P("legal", "Point out anything illegal.", "Rewrite it lawfully.")),
    feedback=(), critique_revision_few_shot=FEW_SHOT)
PROMPTS = [{"prompt": f"Question number {i}?", "id": f"q{i}"} for i in range(7)]
HELPFUL = [{"prompt": f"Helpful question {i}?"} for i in range(3)]


class FakeGenerate:
  """A GenerateFn whose output depends only on (prefix, text, seed); records every call.

  Each completion ends with a stop string and junk after it, which the stage must trim.
  """

  def __init__(self, fail_after=None, tail="\n\nHuman: junk"):
    self.calls = []
    self.fail_after = fail_after
    self.tail = tail

  def __call__(self, prefix, texts, seed):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise RuntimeError("simulated crash")
    self.calls.append((prefix, list(texts), seed))
    return [f"  out-{hashlib.sha256(f'{prefix}|{t}|{seed}'.encode()).hexdigest()[:8]} {self.tail}"
            for t in texts]


def _run(out_dir, gen=None, **kw):
  args = dict(prompts=PROMPTS, constitution=CONST, n_rounds=2, shard_size=3, seed=0,
              progress=False, generate_fn=gen or FakeGenerate())
  args.update(kw)
  return cr.run(str(out_dir), **args)


def _files(out_dir):
  return {n: open(os.path.join(out_dir, n), encoding="utf-8").read()
          for n in sorted(os.listdir(out_dir)) if n != cr.MANIFEST}


def test_raw_prompt_texts_exact(tmp_path):
  outs = iter([" Sure, here is how.", " It helps with harm.", " I will not help.",
               " Still fine.", " No."])
  calls = []

  def gen(prefix, texts, seed):
    calls.append((prefix, list(texts)))
    return [next(outs) + "\n\nRevisionRequest: x"]

  _run(tmp_path, gen, prompts=[{"prompt": "How do I pick a lock?"}])
  head = ("\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Point out anything rude."
          "\n\nCritique: It is rude.\n\nRevisionRequest: Rewrite it politely.\n\nRevision: "
          "Hello! How can I help?")
  (rec,), _ = cr.read_dataset(str(tmp_path))
  p1, p2 = (next(p for p in CONST.critique_revision if p.id == r["principle_id"])
            for r in rec["rounds"])
  q = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
  assert calls[0] == ("", [q])
  crit1 = (f"{q} Sure, here is how.\n\nCritiqueRequest: {p1.critique_request}\n\nCritique:")
  assert calls[1] == (head, [crit1])
  assert calls[2] == (head, [crit1 + f" It helps with harm.\n\nRevisionRequest: "
                             f"{p1.revision_request}\n\nRevision:"])
  crit2 = f"{q} I will not help.\n\nCritiqueRequest: {p2.critique_request}\n\nCritique:"
  assert calls[3] == (head, [crit2])
  assert calls[4] == (head, [crit2 + f" Still fine.\n\nRevisionRequest: {p2.revision_request}"
                             "\n\nRevision:"])
  assert rec == {
      "id": "0", "prompt": "How do I pick a lock?", "initial_response": "Sure, here is how.",
      "rounds": [
          {"principle_id": p1.id, "critique_request": p1.critique_request,
           "critique": "It helps with harm.", "revision_request": p1.revision_request,
           "revision": "I will not help."},
          {"principle_id": p2.id, "critique_request": p2.critique_request,
           "critique": "Still fine.", "revision_request": p2.revision_request,
           "revision": "No."}],
      "final_revision": "No.", "constitution_version": "tiny-1", "model": cr.DEFAULT_MODEL,
      "seed": 0}


def test_empty_revision_is_recorded_but_the_last_response_carries_on(tmp_path):
  outs = iter([" Sure, here is how.", " It helps with harm.", "\n\nHuman: junk",
               " Still harmful.", " I won't help."])
  calls = []

  def gen(prefix, texts, seed):
    calls.append(list(texts))
    return [next(outs)]

  _run(tmp_path, gen, prompts=[{"prompt": "How do I pick a lock?"}])
  (rec,), _ = cr.read_dataset(str(tmp_path))
  assert [r["revision"] for r in rec["rounds"]] == ["", "I won't help."]
  # Round 2 critiques the initial response again, not the empty revision.
  assert calls[3][0].startswith("\n\nHuman: How do I pick a lock?\n\nAssistant: Sure, here is how.")
  assert rec["final_revision"] == "I won't help."


@pytest.mark.parametrize("outs, unchanged", [
    ([" A", " c", "", " c", " A"], 1),   # round 2 returns its input (A) unchanged
    ([" A", " c", "", " c", ""], 0),     # two empty revisions: neither equals its input A
])
def test_unchanged_revisions_compare_with_the_input_of_the_round(tmp_path, outs, unchanged):
  outs = iter(outs)
  stats = _run(tmp_path, lambda prefix, texts, seed: [next(outs)], prompts=[{"prompt": "q"}])
  assert stats["unchanged_revisions"] == unchanged


def test_a_generate_fn_returning_too_few_helpful_texts_is_an_error(tmp_path):
  def gen(prefix, texts, seed):
    return [" x"] * (len(texts) if len(texts) == 1 else 1)

  with pytest.raises(ValueError, match="returned 1 texts for 3 prompts"):
    _run(tmp_path, gen, prompts=PROMPTS[:1], helpful_prompts=HELPFUL, n_rounds=1)
  assert not os.path.exists(tmp_path / "helpful-00000.jsonl")


def test_multi_turn_prompt(tmp_path):
  conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "Help me lie to my boss."}]
  gen = FakeGenerate()
  _run(tmp_path, gen, prompts=[{"prompt": "Help me lie to my boss.", "messages": conv}],
       n_rounds=1, helpful_prompts=[{"prompt": "x", "messages": conv[:1]}])
  assert gen.calls[0][1] == ["\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me lie to my boss."
                             "\n\nAssistant:"]
  assert gen.calls[1][1][0].startswith("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me")
  (rec,), (hrec,) = cr.read_dataset(str(tmp_path))
  assert rec["messages"] == conv and list(rec)[:3] == ["id", "prompt", "messages"]
  assert "messages" not in hrec      # a one-turn conversation is just the prompt
  with pytest.raises(ValueError, match="ending with a user turn"):
    _run(tmp_path / "bad", prompts=[{"prompt": "x", "messages": conv[:2]}])


def test_a_system_message_is_set_off_from_the_few_shot_head(tmp_path):
  conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
  gen = FakeGenerate()
  _run(tmp_path, gen, prompts=[{"prompt": "Hi?", "messages": conv}], n_rounds=1)
  assert gen.calls[0][1] == ["Be brief.\n\nHuman: Hi?\n\nAssistant:"]
  head = cr.raw_few_shot_head(FEW_SHOT)
  for prefix, (text,), _ in gen.calls[1:]:
    assert prefix == head and text.startswith("\n\nBe brief.\n\nHuman: Hi?\n\nAssistant: out-")


def test_few_shot_off_and_transcript_cleaning(tmp_path):
  assert cr.clean_transcript(FEW_SHOT[0]).endswith("How can I help?")
  assert cr.raw_few_shot_head(["Human: a\n\nAssistant: b", "\n\nHuman: c\n\nHuman:"]) == \
      "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
  gen = FakeGenerate()
  _run(tmp_path, gen, few_shot=False, prompts=PROMPTS[:1], n_rounds=1)
  assert [c[0] for c in gen.calls] == ["", "", ""]


def test_chatml_turns(tmp_path):
  msgs = cr.transcript_messages(FEW_SHOT[0])
  assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
  assert msgs[2] == {"role": "user", "content": "Point out anything rude."}
  assert msgs[-1] == {"role": "assistant", "content": "Hello! How can I help?"}
  gen = FakeGenerate(tail="<|im_end|>junk")
  _run(tmp_path, gen, chat_format="chatml", prompts=PROMPTS[:1], n_rounds=1)
  (rec,), _ = cr.read_dataset(str(tmp_path))
  p = next(p for p in CONST.critique_revision if p.id == rec["rounds"][0]["principle_id"])
  resp, crit = rec["initial_response"], rec["rounds"][0]["critique"]
  assert resp.startswith("out-") and "junk" not in resp   # trimmed at <|im_end|>, stripped
  q = "<|im_start|>user\nQuestion number 0?<|im_end|>\n<|im_start|>assistant\n"
  assert gen.calls[0][:2] == ("", [q])
  assert gen.calls[1][0] == render_chat_text(msgs, "chatml")
  conv = (f"{q}{resp}<|im_end|>\n<|im_start|>user\n{p.critique_request}<|im_end|>\n"
          "<|im_start|>assistant\n")
  assert gen.calls[1][1] == [conv]
  assert gen.calls[2][1] == [f"{conv}{crit}<|im_end|>\n<|im_start|>user\n{p.revision_request}"
                             "<|im_end|>\n<|im_start|>assistant\n"]


def test_principle_draws_seeded_and_independent_of_batching(tmp_path):
  def ids(out, **kw):
    _run(tmp_path / out, n_rounds=4, **kw)
    recs, _ = cr.read_dataset(str(tmp_path / out))
    assert [r["id"] for r in recs] == [p["id"] for p in PROMPTS]
    return [[rd["principle_id"] for rd in r["rounds"]] for r in recs]

  base = ids("a", shard_size=3, batch_size=2)
  assert ids("b", shard_size=1, batch_size=7) == base
  assert ids("c", shard_size=7, batch_size=1) == base
  assert ids("d", shard_size=3, seed=1) != base
  assert len({tuple(x) for x in base}) > 1
  # Each prompt's draws are numpy's Generator seeded with (seed, prompt index).
  names = [p.id for p in CONST.critique_revision]
  assert base[5] == [names[i] for i in np.random.default_rng([0, 5]).integers(0, 4, size=4)]


def test_batched_calls_per_shard(tmp_path):
  gen = FakeGenerate()
  _run(tmp_path, gen, shard_size=4)
  # 2 shards x (1 response + 2 rounds x (critique, revision)) calls, all rows of a shard at once.
  assert [len(c[1]) for c in gen.calls] == [4] * 5 + [3] * 5
  assert len({c[2] for c in gen.calls}) == 10    # a distinct sampler seed per call


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
  full = tmp_path / "full"
  stats_full = _run(full, helpful_prompts=HELPFUL)
  expected = _files(full)
  assert sorted(expected) == ["helpful-00000.jsonl", "shard-00000.jsonl", "shard-00001.jsonl",
                              "shard-00002.jsonl"]

  part = tmp_path / "part"
  with pytest.raises(RuntimeError, match="simulated crash"):
    _run(part, FakeGenerate(fail_after=7), helpful_prompts=HELPFUL)   # dies inside shard 1
  assert sorted(_files(part)) == ["shard-00000.jsonl"]
  manifest = json.load(open(part / cr.MANIFEST))
  assert manifest["shards_done"] == ["shard-00000.jsonl"] and not manifest["complete"]
  # A shard a kill left half written, under its temporary name: never taken as done.
  (part / "shard-00001.jsonl.tmp").write_text('{"id": "truncated')

  gen = FakeGenerate()
  stats = _run(part, gen, helpful_prompts=HELPFUL, batch_size=5)   # batch_size may change
  assert len(gen.calls) == 2 * 5 + 1      # shards 1, 2 and the helpful shard only
  assert _files(part) == expected
  recs, helpful = cr.read_dataset(str(part))
  assert [r["id"] for r in recs] == [p["id"] for p in PROMPTS]
  assert [h["id"] for h in helpful] == ["helpful-0", "helpful-1", "helpful-2"]
  assert stats["shards_run"] == 3
  drop = ("seconds", "shards_run", "out_dir")
  assert {k: v for k, v in stats.items() if k not in drop} == \
      {k: v for k, v in stats_full.items() if k not in drop}

  # Killed after a shard's rename but before the manifest update; last shard lost.
  manifest = json.load(open(part / cr.MANIFEST))
  manifest["shards_done"].remove("shard-00001.jsonl")
  del manifest["shard_sums"]["shard-00001.jsonl"]
  (part / cr.MANIFEST).write_text(json.dumps(manifest))
  os.remove(part / "shard-00002.jsonl")
  gen = FakeGenerate()
  again = _run(part, gen, helpful_prompts=HELPFUL)
  assert len(gen.calls) == 5 and again["shards_run"] == 1
  assert _files(part) == expected
  assert json.load(open(part / cr.MANIFEST)) == json.load(open(full / cr.MANIFEST))

  gen = FakeGenerate()
  assert _run(part, gen, helpful_prompts=HELPFUL)["shards_run"] == 0 and not gen.calls


def test_changed_config_is_refused(tmp_path):
  _run(tmp_path)
  with pytest.raises(ValueError) as e:
    _run(tmp_path, n_rounds=3, seed=1)
  msg = str(e.value)
  assert "\n" not in msg and "n_rounds" in msg and "seed" in msg and "model" not in msg
  with pytest.raises(ValueError, match=r"differs in: prompts\.sha256\)"):
    _run(tmp_path, prompts=PROMPTS[:-1])
  with pytest.raises(ValueError, match=r"differs in: constitution\.sha256, "
                                           r"constitution\.version, model, model_fingerprints\.model\)"):
    _run(tmp_path, model="other", constitution=Constitution(
        "tiny", "tiny-2", CONST.critique_revision[:2], (), FEW_SHOT))
  with pytest.raises(ValueError, match="chat_format, max_new_tokens, shard_size, temperature"):
    _run(tmp_path, chat_format="chatml", temperature=0.5, max_new_tokens=5, shard_size=2)
  _run(tmp_path, batch_size=1)   # not part of the config


def test_a_changed_model_is_refused(tmp_path):
  """The model's weights are part of the config: the same path holding other weights does
  not continue the run."""
  import jax
  import numpy as np
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_seq_len=32)
  model = model_dir.save_model(str(tmp_path / "model"), cfg, models.init(cfg, jax.random.PRNGKey(0)))
  _run(tmp_path / "out", model=model)
  _run(tmp_path / "out", model=model)   # the same weights: resumed (nothing left to do)
  model_dir.save_model(model, cfg, jax.tree_util.tree_map(np.asarray,
                                                          models.init(cfg, jax.random.PRNGKey(1))))
  with pytest.raises(ValueError, match=r"differs in: model_fingerprints\.model\)"):
    _run(tmp_path / "out", model=model)


@pytest.mark.parametrize("n_rounds", [-1, 1.5, True])
def test_a_bad_n_rounds_is_named_before_anything_is_written(tmp_path, n_rounds):
  with pytest.raises(ValueError, match=r"^critique_revision.n_rounds must be an integer >= 0"):
    _run(tmp_path / "out", n_rounds=n_rounds)
  assert not os.path.exists(tmp_path / "out")


def test_empty_prompt_set_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="has no prompts"):
    _run(tmp_path, prompts=[])
  with pytest.raises(ValueError, match="'mine' has no prompts"):
    _run(tmp_path, prompts="mine", load_prompts=lambda spec, split=None: [])
  with pytest.raises(ValueError, match="item 1 needs a non-empty 'prompt'"):
    _run(tmp_path, prompts=[{"prompt": "a"}, {"text": "b"}])


def test_prompt_spec_and_limit(tmp_path):
  seen = []

  def load(spec, split=None):
    seen.append((spec, split))
    return PROMPTS if spec == "red" else HELPFUL

  _run(tmp_path, prompts="red", helpful_prompts="help", load_prompts=load, limit=2)
  recs, helpful = cr.read_dataset(str(tmp_path))
  assert seen == [("red", "train"), ("help", "train")] and len(recs) == 2 and len(helpful) == 2
  _run(tmp_path / "all", prompts="red", load_prompts=load, split=None)
  assert seen[-1] == ("red", None)
  manifest = json.load(open(tmp_path / cr.MANIFEST))
  assert manifest["config"]["prompts"]["spec"] == "red" and manifest["num_prompts"] == 2
  jsonl = tmp_path / "p.jsonl"   # through cai_jax.prompt_sets.load_prompts
  jsonl.write_text('{"prompt": "one?", "id": "a"}\n{"prompt": "two?"}\n')
  _run(tmp_path / "file", prompts=str(jsonl), split=None)
  recs, _ = cr.read_dataset(str(tmp_path / "file"))
  assert [r["prompt"] for r in recs] == ["one?", "two?"] and recs[0]["id"] == "a"


def test_tiny_model_end_to_end(tmp_path):
  import jax
  from cai_jax import model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  cfg = ModelConfig()
  path = model_dir.save_model(str(tmp_path / "tiny"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                              ByteTokenizer())
  prompts = [{"prompt": "Hi?"}, {"prompt": "How are you?"}, {"prompt": "Why?"}]
  stats = cr.run(str(tmp_path / "out"), prompts=prompts, model=path, constitution=CONST,
                 n_rounds=2, helpful_prompts=prompts[:1], max_new_tokens=6, batch_size=2,
                 shard_size=2, progress=False)
  recs, helpful = cr.read_dataset(str(tmp_path / "out"))
  assert len(recs) == 3 and len(helpful) == 1 and stats["prompts"] == 3
  assert stats["rounds"] == 6 and stats["shards_total"] == 3
  for r in recs:
    assert set(r) == {"id", "prompt", "initial_response", "rounds", "final_revision",
                      "constitution_version", "model", "seed"}
    assert r["model"] == path and r["constitution_version"] == "tiny-1" and r["seed"] == 0
    assert len(r["rounds"]) == 2 and r["final_revision"] == r["rounds"][-1]["revision"]
    for rd in r["rounds"]:
      assert set(rd) == {"principle_id", "critique_request", "critique", "revision_request",
                         "revision"}
      assert all(isinstance(v, str) for v in rd.values())
  assert set(helpful[0]) == {"id", "prompt", "response"}
  assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]
  mean = sum(len(r["initial_response"]) for r in recs) / 3
  assert stats["mean_response_chars"] == round(mean, 2)


@pytest.mark.slow
@pytest.mark.parametrize("chat_format", ["raw", "chatml"])
def test_smollm2_critique_revision(tmp_path, chat_format):
  """The embedded SmolLM2-135M-Instruct, the default constitution with its few-shot
  transcripts, the first 3 shipped red-team prompts."""
  stats = cr.run(str(tmp_path), prompts="red_team", limit=3, n_rounds=1,
                 chat_format=chat_format, max_new_tokens=48, batch_size=4, progress=False)
  recs, _ = cr.read_dataset(str(tmp_path))
  print(json.dumps(recs[0], indent=1))
  print(json.dumps(stats))
  assert len(recs) == 3
  texts = [t for r in recs for t in (r["initial_response"], r["rounds"][0]["critique"],
                                     r["rounds"][0]["revision"])]
  assert sum(bool(t.strip()) for t in texts) >= 8, texts
  stops = cr.RAW_STOPS if chat_format == "raw" else ("<|im_end|>",)
  assert not any(s in t for t in texts for s in stops)


def test_two_processes_resume_to_what_one_process_writes(tmp_path):
  """A run of `cai-jax critique_revision` killed after its first shard, resumed as 2
  processes x 4 devices, ends with the files of an uninterrupted run of 1 process x 8
  devices (data-parallel mesh; the few-shot head as the sampler's shared prefix; red-team
  and helpful shards written by process 0; a kill's .tmp leftover removed)."""
  import dataclasses
  import shutil
  import jax
  import multihost
  from cai_jax import constitution, model_dir, models
  from cai_jax.configs import ModelConfig
  from cai_jax.tokenizer import ByteTokenizer
  cfg = ModelConfig()   # the `tiny` preset
  model = model_dir.save_model(str(tmp_path / "tiny"), cfg, models.init(cfg, jax.random.PRNGKey(0)),
                               ByteTokenizer())
  const = constitution.save_constitution(   # in clean form, with a feedback principle
      dataclasses.replace(CONST, feedback=(constitution.FeedbackPrinciple("f", "Which is kinder?"),),
                          critique_revision_few_shot=tuple(map(cr.clean_transcript, FEW_SHOT))),
      str(tmp_path / "constitution.json"))
  prompts, helpful = tmp_path / "p.jsonl", tmp_path / "h.jsonl"
  prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:5]))
  helpful.write_text("".join(json.dumps(p) + "\n" for p in HELPFUL))
  out = tmp_path / "out"
  args = ["critique_revision", "--gin_file=mesh/dp.gin", f"--prompts={prompts}",
          f"--gin.critique_revision.model='{model}'", f"--out_dir={out}",
          f"--gin.critique_revision.constitution='{const}'",
          f"--gin.critique_revision.helpful_prompts='{helpful}'", "--max_new_tokens=8",
          "--gin.critique_revision.n_rounds=1", "--gin.critique_revision.shard_size=3",
          "--gin.critique_revision.batch_size=4", "--gin.critique_revision.progress=False"]
  single = multihost.run_cli(args, tmp_path / "logs", 1, 8)
  assert multihost.result(single[0])["shards_run"] == 3
  expected = _files(out)
  assert sorted(expected) == ["config.gin", "helpful-00000.jsonl", "inputs.json",
                              "shard-00000.jsonl", "shard-00001.jsonl"]
  shutil.copy(out / cr.MANIFEST, tmp_path / "manifest.json")

  # As if killed during shard-00001: shard-00000 and its manifest on disk, a .tmp left.
  for name in ("shard-00001.jsonl", "helpful-00000.jsonl", "config.gin"):
    os.remove(out / name)
  manifest = json.load(open(out / cr.MANIFEST))
  manifest.update(shards_done=["shard-00000.jsonl"], complete=False,
                  shard_sums={"shard-00000.jsonl": manifest["shard_sums"]["shard-00000.jsonl"]})
  (out / cr.MANIFEST).write_text(json.dumps(manifest))
  (out / "shard-00001.jsonl.tmp").write_text('{"id": "trunc')
  multi = multihost.run_cli(args, tmp_path / "logs", 2, 4)
  stats = multihost.result(multi[0])   # process 0's result
  assert stats["shards_run"] == 2 and stats["shards_total"] == 3 and stats["prompts"] == 5
  assert _files(out) == expected
  assert json.load(open(out / cr.MANIFEST)) == json.load(open(tmp_path / "manifest.json"))

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

"""One process of the multi-process training check (launched by tests/distributed_test.py).

Trains the `tiny` preset (gin/models/tiny.gin) for `--steps` steps on data/tiny_chat.jsonl
over an 8-device (data=2, fsdp=4) mesh in two invocations of ``train.train``: the first
stops at `--resume_at` (checkpointing there), the second resumes from that checkpoint.
Then writes the final model to OUT_DIR/model (``train.save_model``) and prints one JSON
line: the ``distributed.initialize`` result, the batch rows this process fed, whether it
wrote metrics, and where the second run resumed from.

  python tests/multiprocess_worker.py OUT_DIR --mode=explicit \\
      --coordinator_address=localhost:PORT --num_processes=2 --process_id=I

Set XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu before it
starts. ``run`` is also called in-process by the test for the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
            max_seq_len=512)
BATCH, SEQ = 8, 64


def run(out_dir: str, steps: int = 4, resume_at: int = 2, data: int = 2, fsdp: int = 4) -> dict:
  """Trains, resumes, exports; returns the report dict (jax must already be set up)."""
  from cai_jax import data as data_lib
  from cai_jax import distributed, sharding, train
  from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
  from cai_jax.metrics import MetricsWriter
  from cai_jax.tokenizer import load_tokenizer

  model = ModelConfig(**TINY)
  opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=2)
  mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=1, rules="fsdp")
  examples = data_lib.read_jsonl(os.path.join(REPO, "data", "tiny_chat.jsonl"))
  dataset = data_lib.lm_dataset(examples, load_tokenizer("byte"), "chatml", SEQ, BATCH, seed=0)

  def train_to(n: int):
    cfg = TrainConfig(num_steps=n, batch_size=BATCH, seq_len=SEQ, save_every=resume_at,
                      keep_checkpoints=3, progress=False, async_checkpoint=True)
    return train.train(model, opt, cfg, mesh_cfg, dataset, out_dir)

  first = train_to(resume_at)
  second = train_to(steps)
  train.save_model(os.path.join(out_dir, "model"), model, second.state.params)

  mesh = sharding.make_mesh(mesh_cfg)
  tokens = sharding.batch_sharding(mesh, sharding.rules_for("fsdp"), 2, (BATCH, SEQ))
  writer = MetricsWriter(out_dir, tensorboard=False)
  writes_metrics = writer.active
  writer.close()
  return {"info": distributed.runtime_info(),
          "primary": distributed.is_primary(),
          "writes_metrics": writes_metrics,
          "rows": sharding.process_rows(tokens, (BATCH, SEQ)).tolist(),
          "first_resumed_from": first.resumed_from,
          "resumed_from": second.resumed_from,
          "final_step": int(second.state.step)}


def main(argv: Optional[list] = None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out_dir")
  parser.add_argument("--mode", default="explicit", choices=["none", "auto", "explicit"])
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--resume_at", type=int, default=2)
  args = parser.parse_args(argv)

  sys.path.insert(0, REPO)
  from cai_jax import distributed
  info = distributed.initialize(args.mode, args.coordinator_address, args.num_processes,
                                args.process_id)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  report = run(args.out_dir, args.steps, args.resume_at)
  report["initialize"] = info
  print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  main()

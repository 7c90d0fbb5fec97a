"""The supervised training loop shared by train_lm, sl and pm.

``train`` is a function of explicit configs, the batches (``data.Batches``) and an
output directory. Layout of ``out_dir``:
  checkpoints/    orbax TrainState + data-iterator state, every save_every steps
  metrics.jsonl   one row per step: loss, learning_rate, grad_norm, tokens,
                  step_time_s, tokens_per_s (token positions of every batch field whose
                  name starts with 'tokens', per second)
  tb/             TensorBoard event files
  model/          the final model (see ``cai_jax.model_dir``), written
                  last (``save_model``), so its presence means the run finished
A rerun with the same out_dir resumes from the newest checkpoint with the data
iterator at the exact next batch; the result equals an uninterrupted run.

Multi-process runs (``cai_jax.distributed``): every process calls ``train`` with the
same arguments and the same ``data.Batches``; each encodes and feeds only its own rows
of each global batch (``sharding.process_rows``, ``sharding.put_process_rows``),
checkpoints are saved and restored collectively on a directory all processes share,
and only process 0 writes metrics.jsonl, tb/ and the progress bar. The result equals a
single-process run on the same global mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from cai_jax import checkpoints, data, distributed, model_dir, sharding, steps
from cai_jax.configs import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from cai_jax.metrics import MetricsWriter, logged_metrics


class NonFiniteLossError(FloatingPointError):
  """Raised when a step's loss or gradient norm is NaN or infinite; names the step."""


@dataclasses.dataclass
class TrainResult:
  """state: the final TrainState; last_metrics: the metrics of its step (read back from
  metrics.jsonl when a resumed run had nothing left to do; {} at step 0); resumed_from:
  the checkpoint step the run continued from, or None."""

  state: steps.TrainState
  last_metrics: dict
  resumed_from: Optional[int]


def state_from_params(model_cfg: ModelConfig, tx, params: Any, state_shardings: Any) -> steps.TrainState:
  """A step-0 TrainState around given params, placed in the sharded layout.

  params: plain pytree (numpy or jax arrays) with the same values on every process.
  """
  params = sharding.place_tree(params, state_shardings.params)

  def make(p):
    return steps.TrainState(step=np.zeros((), np.int32), params=p, opt_state=tx.init(p))

  return jax.jit(make, in_shardings=(state_shardings.params,), out_shardings=state_shardings)(params)


def check_seq_len(seq_len: int, max_seq_len: int, model: str = "the model") -> None:
  """ValueError (one line naming `model`, e.g. "'sl_model'" or "the policy 'x'") when a
  training batch's seq_len is longer than the model's context max_seq_len: positions past
  it were never trained, and a sliding-window model attends only within it. Stages check
  it before they write anything to out_dir, so the rerun with a fixed seq_len is not
  refused as a different run."""
  if seq_len > max_seq_len:
    raise ValueError(f"TrainConfig.seq_len={seq_len} is longer than the max_seq_len="
                     f"{max_seq_len} of {model} (its context)")


def check_run(model_cfg: ModelConfig, train_cfg: TrainConfig, dataset: data.Batches) -> None:
  """ValueError (one line naming the setting) for a run ``train`` would refuse; writes
  nothing, so callers run it before they record a run's config in its out_dir."""
  check_seq_len(train_cfg.seq_len, model_cfg.max_seq_len)
  if dataset.batch_size != train_cfg.batch_size:
    raise ValueError(f"the dataset's batches have {dataset.batch_size} rows but "
                     f"TrainConfig.batch_size is {train_cfg.batch_size}")
  if len(dataset) < train_cfg.num_steps:
    raise ValueError(f"the dataset yields {len(dataset)} batches of {dataset.batch_size} "
                     f"({dataset.num_epochs} epochs of {len(dataset.items)} items), fewer than "
                     f"TrainConfig.num_steps={train_cfg.num_steps}")


def warn_schedule_length(opt_cfg: OptimizerConfig, train_cfg: TrainConfig, schedule) -> bool:
  """Logs a warning (and returns True) when a cosine schedule's length
  (OptimizerConfig.total_steps) is not the run's (TrainConfig.num_steps): the run ends
  before the decay does, or its last steps stay at the floor. `schedule`:
  ``steps.lr_schedule(opt_cfg)``."""
  if opt_cfg.schedule != "cosine" or opt_cfg.total_steps == train_cfg.num_steps:
    return False
  end = float(schedule(train_cfg.num_steps - 1)) / opt_cfg.learning_rate if opt_cfg.learning_rate else 0.0
  if jax.process_index() == 0:
    import logging
    logging.getLogger(__name__).warning(
        "OptimizerConfig.total_steps=%d (the cosine schedule's length) is not "
        "TrainConfig.num_steps=%d: the last step's learning rate is %.3g of the peak "
        "(final_lr_fraction=%g)%s; bind both to the same value to decay over the run",
        opt_cfg.total_steps, train_cfg.num_steps, end, opt_cfg.final_lr_fraction,
        f", reached {train_cfg.num_steps - opt_cfg.total_steps} steps before the end"
        if opt_cfg.total_steps < train_cfg.num_steps else "")
  return True


def train(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, train_cfg: TrainConfig,
          mesh_cfg: MeshConfig, dataset: data.Batches, out_dir: str,
          init_params: Any = None, head: str = "lm",
          loss_sums: Callable = steps.lm_loss_sums, devices=None) -> TrainResult:
  """Trains to train_cfg.num_steps, resuming from out_dir/checkpoints if present (a
  checkpoint past num_steps is a ValueError: num_steps may grow, not drop below the steps
  done).

  Args:
    dataset: the batches (``data.Batches``, B = train_cfg.batch_size rows each); it
      should repeat at least as long as the run. Each process encodes only the rows of
      every batch that its devices hold.
    init_params: starting parameters (plain pytree); None = random init from the seed.
    head: 'lm' or 'scalar' (preference / value models).
    loss_sums: (params, model_cfg, batch) -> (loss sum, counted tokens).
  Raises:
    NonFiniteLossError: a step's loss or gradient norm was NaN/inf; nothing from that
      step is saved.
  """
  out_dir = os.path.abspath(out_dir)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.rules_for(mesh_cfg.rules)
  tx = steps.make_optimizer(opt_cfg)
  schedule = steps.lr_schedule(opt_cfg)
  warn_schedule_length(opt_cfg, train_cfg, schedule)
  rng = jax.random.PRNGKey(train_cfg.seed)
  check_run(model_cfg, train_cfg, dataset)
  manager = checkpoints.CheckpointManager(
      f"{out_dir}/checkpoints", save_every=train_cfg.save_every,
      keep=train_cfg.keep_checkpoints, async_save=train_cfg.async_checkpoint)
  writer = MetricsWriter(out_dir)
  try:   # the manager's threads and the writer close on every error below too
    global_rows = dataset.batch_size
    # This process's rows of every global batch (all of them in a single-process run).
    rows = sharding.process_rows(sharding.batch_sharding(mesh, rules, 1, (global_rows,)),
                                 (global_rows,))
    local = dataset.dataset(None if len(rows) == global_rows else rows)
    iterator = local.to_iter_dataset().__iter__()

    with sharding.use_mesh(mesh, rules):
      target = checkpoints.abstract_train_state(model_cfg, tx, mesh, rules, head)
      state_shardings = checkpoints.shardings_of(target)
      resumed_from = manager.latest_step()
      if resumed_from is not None and resumed_from > train_cfg.num_steps:
        raise ValueError(f"{out_dir} holds a run of {resumed_from} steps, more than "
                         f"TrainConfig.num_steps={train_cfg.num_steps}; use a new out_dir or "
                         f"num_steps >= {resumed_from}")
      if resumed_from is not None:
        state, data_state = manager.restore(target, step=resumed_from)
        if data_state is not None:
          iterator.set_state(data_state)
      elif init_params is not None:
        checkpoints.check_compatible(target.params, init_params, "init params")
        state = state_from_params(model_cfg, tx, init_params, state_shardings)
      else:
        state, _ = sharding.sharded_init(
            lambda: steps.init_state_boxed(model_cfg, tx, rng, head), mesh, rules)

      if len(local) == 0:
        raise ValueError("training dataset yields no batches")
      global_shapes = {k: (global_rows,) + v.shape[1:] for k, v in local[0].items()}
      batch_shardings = {k: sharding.batch_sharding(mesh, rules, len(s), s)
                         for k, s in global_shapes.items()}
      step_fn = steps.jit_train_step(
          steps.make_train_step(model_cfg, tx, schedule, train_cfg.num_microbatches, loss_sums),
          state_shardings, batch_shardings)

      start = int(state.step)
      writer.truncate_after(start)   # rows of steps this run does (again) are dropped
      metrics = logged_metrics(writer.path, start) if jax.process_index() == 0 else {}
      bar = tqdm(total=train_cfg.num_steps, initial=start, desc="train", unit="step",
                 disable=not train_cfg.progress or jax.process_index() != 0)
      try:
        for step in range(start + 1, train_cfg.num_steps + 1):
          batch = next(iterator)
          t0 = time.perf_counter()
          placed = {k: sharding.put_process_rows(v, batch_shardings[k], global_shapes[k])
                    for k, v in batch.items()}
          state, out = step_fn(state, placed)
          loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
          dt = time.perf_counter() - t0
          if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            manager.wait_until_finished()
            last = manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; the "
                f"last good checkpoint is {'step ' + str(last) if last is not None else 'none'} "
                f"in {out_dir}/checkpoints")
          tokens = sum(int(np.prod(s)) for k, s in global_shapes.items() if k.startswith("tokens"))
          metrics = writer.write(step, dict(out, step_time_s=dt, tokens_per_s=tokens / dt))
          manager.save(step, state, iterator.get_state(), force=step == train_cfg.num_steps)
          bar.update(1)
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['learning_rate']:.2e}")
      finally:
        bar.close()
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return TrainResult(state=state, last_metrics=metrics, resumed_from=resumed_from)


def save_model(directory: str, config: ModelConfig, params: Any, tokenizer: Any = None,
               head: str = "lm", extra_files: Optional[Mapping[str, str]] = None) -> str:
  """``model_dir.save_model`` that is safe in multi-process runs; returns the directory.

  Every process must call it (the params are gathered collectively); process 0 alone
  writes the directory from the gathered host arrays, and all processes return once
  it is complete. Single process: the same as ``model_dir.save_model``.
  """
  directory = os.path.abspath(directory)
  if jax.process_count() == 1:
    return model_dir.save_model(directory, config, params, tokenizer, head, extra_files)
  host = distributed.gather_to_host(params)
  if distributed.is_primary():
    model_dir.save_model(directory, config, host, tokenizer, head, extra_files)
  distributed.barrier(f"save_model:{directory}")
  return directory

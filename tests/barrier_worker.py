"""One process of the barrier check (launched by tests/distributed_test.py).

Joins an N-process run and passes `--rounds` barriers, alternating two names, each process
arriving after its own random delay. Before barrier k it creates `<dir>/k.<process index>`;
after it, every process's file for k must exist (no process leaves a barrier early). Before
the last barrier every process starts a failure watcher (``distributed.watch_failures``)
polling without pause, which must never fire. At the end, process 0 finds one barrier counter
left in the coordination service (the last one; every earlier one was deleted); process 1
stops its watcher (``stop_watching_failures``) and checks that the thread ended; the others
leave it to the exit handler, which must stop it before the interpreter finalizes (else the
process aborts with "FATAL: exception not rethrown"). Prints "barriers ok" and exits 0, or
raises.

  python tests/barrier_worker.py --coordinator_address=localhost:PORT --num_processes=N \\
      --process_id=I --dir=DIR [--rounds=R]

Set JAX_PLATFORMS=cpu before it starts.
"""

from __future__ import annotations

import argparse
import os
import random
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator_address", required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--dir", required=True)
  p.add_argument("--rounds", type=int, default=20)
  args = p.parse_args()
  import jax
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)
  from cai_jax import distributed
  rng = random.Random(args.process_id)
  for k in range(args.rounds):
    time.sleep(rng.uniform(0, 0.05))
    open(os.path.join(args.dir, f"{k}.{args.process_id}"), "w").close()
    distributed.barrier("even" if k % 2 == 0 else "odd")
    missing = [i for i in range(args.num_processes)
               if not os.path.exists(os.path.join(args.dir, f"{k}.{i}"))]
    assert not missing, f"left barrier {k} before processes {missing} arrived"
  fired = []
  watcher = distributed.watch_failures(fired.append, poll_s=0.0)
  distributed.barrier("last")
  if args.process_id == 0:   # process 0 deletes the previous counter as it passes a barrier
    left = distributed._client().key_value_dir_get(distributed._BARRIER_DIR)
    assert len(left) == 1, f"barrier counters left behind: {left}"
  assert watcher.is_alive() and not fired, f"failure watcher: alive {watcher.is_alive()}, {fired}"
  if args.process_id == 1:
    distributed.stop_watching_failures()
    assert not watcher.is_alive(), "the failure watcher still runs after stop_watching_failures"
  print("barriers ok", flush=True)


if __name__ == "__main__":
  main()

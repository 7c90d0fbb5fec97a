"""One process of the failure-propagation check (launched by tests/distributed_test.py).

Joins a 2-process run, starts the CLI's failure watcher (``main._end_for_peer``), meets the
other process in a device collective, then: process FAILER fails the way the CLI handles a
user error (``report_failure``, one error line, ``distributed.end_run(2)``), while the other
enters a device collective that the failed process never joins. What ends that one, its
watcher or the collective breaking, must end it with status 1 and one line naming the
failed process's error.

  python tests/failure_worker.py --coordinator_address=localhost:PORT --process_id=I --failer=F

Set JAX_PLATFORMS=cpu before it starts.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator_address", required=True)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--failer", type=int, required=True)
  args = p.parse_args()
  import jax
  jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=2,
                             process_id=args.process_id)
  from jax.experimental import multihost_utils

  from cai_jax import distributed
  from cai_jax import main as cli
  distributed.watch_failures(cli._end_for_peer)
  multihost_utils.sync_global_devices("both started")
  if args.process_id == args.failer:
    time.sleep(1.0)   # the other process is inside the collective below by now
    error = ValueError("planted failure")
    distributed.report_failure(error)
    print(f"cai-jax: error: ValueError: {error}", file=sys.stderr)
    distributed.end_run(2)
    raise AssertionError("end_run returned in a multi-process run")
  try:
    multihost_utils.sync_global_devices("never met")
  except Exception as e:   # the CLI's handling of an error in the main thread
    peers = distributed.peer_failures()
    if peers:
      cli._end_for_peer("; ".join(peers) + f" (this process stopped for it: {type(e).__name__})")
    raise
  raise AssertionError("the collective completed without the failed process")


if __name__ == "__main__":
  main()

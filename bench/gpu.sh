#!/usr/bin/env bash
# The GPU bench suite in one call: bench/train_step.py, bench/sample.py, bench/ppo_step.py and
# bench/score.py at the tinyllama_1b shapes of the project's GPU targets, each against
# transformers where the script has a peer, plus the train step with XLA attention and without
# remat and three decode variants, then one combined table (bench/gpu_suite.py does the work).
#
#   bash bench/gpu.sh                       # full suite (its first four benches: 4 min on one H200)
#   bash bench/gpu.sh --quick               # tiny preset on the CPU: a smoke test of the suite
#   bash bench/gpu.sh --quick --device gpu  # tiny preset on the GPU: a smoke test of the GPU path
#   bash bench/gpu.sh --dry-run             # print the commands
#   bash bench/gpu.sh --out DIR --only sample,ppo_step --timeout 300
#
# Needs jax (with its GPU plugin), torch and transformers, and this package (`pip install -e .`,
# or just this checkout: the repository goes on PYTHONPATH). The bench scripts import none of
# gin-config, tensorflow-datasets, array_record, grain, gguf or tensorboardX, but a
# `pip install -e .` on a machine without a package index needs wheels of those carried there
# (or `pip install --no-deps --no-build-isolation -e .`). PYTHON picks the interpreter
# (default python3).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$root"
exec "$python" bench/gpu_suite.py --python "$python" "$@"

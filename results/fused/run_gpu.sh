#!/usr/bin/env bash
# The foundation run's recipe through the fused Triton kernels (--fused), on the lent H100
# (python3 with torch and Triton, no uv, no network). Data as in results/foundation/run_gpu.sh.
# A device command lasts at most 10 minutes and the run takes about as long, so this stops the run
# cleanly after LIMIT seconds (SIGTERM: experiment.py saves and exits) and the next call, on the
# same warm machine, resumes it from its last checkpoint.
# Usage: LIMIT=540 results/fused/run_gpu.sh RUN_DIR      (again, to continue)
set -euo pipefail
RUN_DIR=${1:?run folder}
export PYTHONUNBUFFERED=1
if [ -d "$RUN_DIR/checkpoints/last" ]; then mode=(--resume auto); else mode=(--overwrite); fi
timeout -s TERM "${LIMIT:-540}" python3 experiment.py --device cuda --fused \
  --data_dir .gpu/data \
  --train_file .gpu/data/wiki.train.tokens \
  --extra_val_file .gpu/data/wiki.valid.tokens \
  --eval_every 1000 --no_progress \
  --out_dir "$RUN_DIR" "${mode[@]}" || echo "stopped after ${LIMIT:-540} s (exit $?): call again to resume"

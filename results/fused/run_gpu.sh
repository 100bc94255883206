#!/usr/bin/env bash
# The foundation run's recipe through the fused Triton kernels (--fused), on the lent H100
# (python3 with torch and Triton, no uv, no network). Data as in results/foundation/run_gpu.sh.
# Usage: results/fused/run_gpu.sh RUN_DIR
set -euo pipefail
RUN_DIR=${1:?run folder}
export PYTHONUNBUFFERED=1
python3 experiment.py --device cuda --fused \
  --data_dir .gpu/data \
  --train_file .gpu/data/wiki.train.tokens \
  --extra_val_file .gpu/data/wiki.valid.tokens \
  --eval_every 1000 --no_progress \
  --out_dir "$RUN_DIR" --overwrite

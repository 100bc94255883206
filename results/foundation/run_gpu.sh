#!/usr/bin/env bash
# The foundation run, as run on the lent H100 (python3 with torch, no uv, no network).
# Data: .gpu/data holds copies of ../shared/data/wikitext-2-raw-v1/wiki.{valid,test}.raw and
# ../shared/data/wikitext-2-tokens/wiki.{train,valid,test}.tokens (the raw train split is missing).
# Usage: results/foundation/run_gpu.sh RUN_DIR
set -euo pipefail
RUN_DIR=${1:?run folder}
export PYTHONUNBUFFERED=1
python3 experiment.py --device cuda \
  --data_dir .gpu/data \
  --train_file .gpu/data/wiki.train.tokens \
  --extra_val_file .gpu/data/wiki.valid.tokens \
  --eval_every 1000 --no_progress \
  --out_dir "$RUN_DIR" --overwrite

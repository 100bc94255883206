#!/usr/bin/env bash
# Evaluate the foundation run's best checkpoint on the lent H100 (python3, no uv, no network).
# .gpu/model holds that checkpoint, brought back from the training machine with its weights
# rounded to bfloat16 (to fit the transfer limit); .gpu/evaldata holds wiki.{valid,test}.raw and
# wiki.valid.tokens from ../shared/data.
# Usage: results/foundation/eval_gpu.sh OUT_DIR
set -euo pipefail
OUT_DIR=${1:?output folder}
export PYTHONUNBUFFERED=1
python3 evaluate.py --model_path .gpu/model --data_dir .gpu/evaldata --split valid \
  --out_dir "$OUT_DIR/eval-valid-raw" \
  --prompt " = Dragon = " --max_new_bytes 600 --temperature 0.8 --top_k 40
python3 evaluate.py --model_path .gpu/model --data_dir .gpu/evaldata --split test --no_plots \
  --out_dir "$OUT_DIR/eval-test-raw"
python3 evaluate.py --model_path .gpu/model --data_file .gpu/evaldata/wiki.valid.tokens --no_plots \
  --out_dir "$OUT_DIR/eval-valid-tokens"
python3 evaluate.py --model_path .gpu/model --data_file .gpu/evaldata/wiki.valid.tokens --no_plots \
  --dtype float32 --out_dir "$OUT_DIR/eval-valid-tokens-fp32"
python3 evaluate.py --model_path .gpu/model --data_dir .gpu/evaldata --split valid --no_plots \
  --dtype float32 --out_dir "$OUT_DIR/eval-valid-raw-fp32"

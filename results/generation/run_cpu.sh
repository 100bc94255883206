#!/usr/bin/env bash
# Samples from the foundation run's best checkpoint and its loss by position in long windows, on CPU.
# .gpu/model: that checkpoint with its weights rounded to bfloat16 (see results/foundation/eval_gpu.sh).
# Usage: results/generation/run_cpu.sh [MODEL] [OUT_DIR]
set -euo pipefail
MODEL=${1:-.gpu/model}
OUT=${2:-results/generation}
DATA=../shared/data/wikitext-2-raw-v1
common=(--model_path "$MODEL" --data_dir "$DATA" --split valid --device cpu --no_plots)
sample=(--prompt " = Dragon = " --max_new_bytes 1000 --temperature 0.8 --top_k 40 --seed 1337)
# 1. loss by position in windows of 1,024 bytes (the model was trained on 128)
uv run evaluate.py "${common[@]}" --seq_len 1024 --batch_size 4 --max_chunks 32 --out_dir "$OUT/valid-1024"
# 2. 1,000 sampled bytes, the sampler keeping at most 128 bytes in view (the default: --seq_len)
uv run evaluate.py "${common[@]}" --seq_len 128 --max_chunks 32 "${sample[@]}" --out_dir "$OUT/context-128"
# 3. the same, the whole text in view
uv run evaluate.py "${common[@]}" --seq_len 128 --max_chunks 32 "${sample[@]}" --context 0 --out_dir "$OUT/context-all"
# 4. (added later, run on its own) the fraction of live neurons: x, RoPE(x) (the state rows a recurrent step touches), y
uv run evaluate.py "${common[@]}" --seq_len 128 --max_chunks 32 --out_dir "$OUT/valid-128"

#!/usr/bin/env bash
# The measurements of results/default-path on one H200 (python3, torch and Triton there, no uv; .gpu/data
# holds wiki.{valid,test}.raw and wiki.{train,valid}.tokens from ../shared/data). Logs under $OUT.
#   tests:   the GPU tests (the fused kernels compiled at the default model's size), then the training
#            step of every path at the recipes' shapes, with and without decay, in one run
#   default: the default command (now fused by default) with --seed 1337, then evaluate.py on its last
#            checkpoint through the fused kernels and through plain PyTorch
set -u
export PYTHONUNBUFFERED=1
DATA=.gpu/data
case "${1:?tests or default}" in
tests)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_parallel.py tests/test_fused_recurrent.py \
    tests/test_forms.py tests/test_generate.py 2>&1 | tee $OUT/gpu-tests.log | tail -3
  timeout 330 python3 -m dragon_hatchling.benchmark --device cuda --parts train --paths "plain compiled,fused" \
    --shapes 32x128,8x512 --half_lives 8,32,128,256 --out $OUT/bench.json 2>&1 | tee $OUT/bench.log | tail -12
  ;;
default)
  RUN=.gpu/runs/default
  python3 experiment.py --device cuda --seed 1337 --data_dir $DATA --train_file $DATA/wiki.train.tokens \
    --extra_val_file $DATA/wiki.valid.tokens --eval_every 2000 --no_progress --out_dir $RUN --overwrite \
    2>&1 | tee $OUT/train.log | tail -4
  cp $RUN/log.csv $RUN/metrics.json $OUT/
  for path in fused no_fused; do
    python3 evaluate.py --model_path $RUN --checkpoint last --data_dir $DATA --seq_len 128 --no_plots \
      $([ $path = no_fused ] && echo --no_fused) --out_dir .gpu/eval-$path > $OUT/eval-$path.log 2>&1
    cp .gpu/eval-$path/metrics.json $OUT/eval-$path.json
    tail -1 $OUT/eval-$path.log
  done
  ;;
esac

#!/usr/bin/env bash
# The default command after the epoch sampler's fix (issue 26: every step trains its whole batch), on one
# H200 (python3, torch and Triton there, no uv; .gpu/data as in results/default-path/run_gpu.sh), and
# the GPU tests. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
DATA=.gpu/data
RUN=.gpu/runs/default
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_parallel.py tests/test_fused_recurrent.py \
  tests/test_forms.py 2>&1 | tee $OUT/gpu-tests.log | tail -2
python3 experiment.py --device cuda --seed 1337 --data_dir $DATA --train_file $DATA/wiki.train.tokens \
  --extra_val_file $DATA/wiki.valid.tokens --eval_every 2000 --no_progress --out_dir $RUN \
  2>&1 | tee $OUT/train.log | tail -3
cp $RUN/log.csv $RUN/metrics.json $OUT/
for what in raw tokens; do
  file=$([ $what = tokens ] && echo "--data_file $DATA/wiki.valid.tokens")
  python3 evaluate.py --model_path $RUN --checkpoint last --data_dir $DATA $file --stream --chunk_size 2048 \
    --no_plots --out_dir .gpu/eval-stream-$what > $OUT/eval-stream-$what.log 2>&1
  cp .gpu/eval-stream-$what/metrics.json $OUT/eval-stream-$what.json
  tail -1 $OUT/eval-stream-$what.log
done

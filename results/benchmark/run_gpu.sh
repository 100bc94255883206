#!/usr/bin/env bash
# Issue 29, part 2, on an H200 (python3, torch and Triton there, no uv; .gpu/data holds
# wiki.{valid,test}.raw and wiki.{train,valid}.tokens from ../shared/data, carried alone: carrying all
# of .gpu would replace the machine's runs). Logs under $OUT/t. About 8 minutes:
#   a model of the default recipe stopped at 100 s (SIGTERM saves it), the H200's step tiles
#   (step_tiles.py: the sweep, a profile, then generation with the fastest tiles), and the generation
#   benchmark at the committed tiles for the same weights (lazy_decay_over_no_decay_at_floor).
set -u
export PYTHONUNBUFFERED=1
DATA=.gpu/data
O=$OUT/t
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $O/gpu.txt
git log -1 --format=%H > $O/commit.txt
timeout -s TERM 100 python3 experiment.py --device cuda --fused --data_dir $DATA \
  --train_file $DATA/wiki.train.tokens --eval_every 100000 --no_progress --out_dir .gpu/gen \
  --overwrite > $O/model.log 2>&1
tail -3 $O/model.log
timeout -s TERM 300 python3 results/benchmark/step_tiles.py --model_path .gpu/gen/checkpoints/last \
  --out $O/tiles > $O/step_tiles.log 2>&1
tail -30 $O/step_tiles.log
timeout 100 python3 -m dragon_hatchling.benchmark --device cuda --parts generate \
  --model_path .gpu/gen/checkpoints/last --out $O/generate.json > $O/generate.log 2>&1
tail -30 $O/generate.log

#!/usr/bin/env bash
# Issue 28's runs on one H200 (python3, torch and Triton there, no uv; .gpu/data holds wiki.train.tokens,
# wiki.valid.raw, wiki.test.raw, wiki.valid.tokens): the default and the reference model trained, sigma's
# graph of each, the monosemantic search of two concepts on each and on a fresh model, and the merging
# experiment. A dry run on the CPU, on short copies of the four files:
# DEVICE=cpu TINY=1 DATA=<folder> RUNS=<folder> OUT=<folder> bash results/synapses/run_gpu.sh
# STAGE=models (the two models, their graphs, the monosemantic search) or STAGE=merging runs one half,
# each within one command's ten minutes, its tar $OUT/interp-$STAGE.tar.gz; the default runs both.
set -u
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.gpu/data}
RUNS=${RUNS:-.gpu/interp}
SENT=results/synapses/sentences
LOGS=$RUNS/logs  # inside the tar: the machine returns at most 8 files
mkdir -p $RUNS $LOGS
SIZE=()
STEPS=()
if [ "${TINY:-0}" = 1 ]; then  # a dry run: a tiny model, a few steps
  SIZE=(--n_embd 32 --n_head 2 --n_neurons 256 --n_layer 3)
  STEPS=(--max_steps 20 --eval_every 20)
fi
STAGE=${STAGE:-all}
LIMIT=${LIMIT:-0}  # seconds a training may run before SIGTERM (it then saves a checkpoint); 0: no limit
train() { if [ "$LIMIT" = 0 ]; then python3 experiment.py "$@"; else timeout -s TERM $LIMIT python3 experiment.py "$@"; fi; }
COMMON=(--device $DEVICE --data_dir $DATA --extra_val_file $DATA/wiki.valid.tokens --no_progress --overwrite "${SIZE[@]}")
inspect() {  # sigma's graph and the two concepts' monosemantic search of one model
  local model=$1
  python3 evaluate.py --model_path $RUNS/$model --device $DEVICE --data_dir $DATA --no_plots --max_chunks 64 \
    --synapse_graph 4096 --neuron_graph --out_dir $RUNS/graph-$model > $LOGS/graph-$model.log 2>&1
  for concept in currency months; do
    python3 -m dragon_hatchling.monosemantic --model_path $RUNS/$model --device $DEVICE \
      --concept $SENT/$concept-search-concept.txt --contrast $SENT/$concept-search-contrast.txt \
      --test_concept $SENT/$concept-test-concept.txt --test_contrast $SENT/$concept-test-contrast.txt \
      --out_dir $RUNS/mono-$model-$concept > $LOGS/mono-$model-$concept.log 2>&1
    echo "$model $concept: $(tail -1 $LOGS/mono-$model-$concept.log)"
  done
}

models() {  # the two models side by side (default and reference recipe), sigma's graphs, monosemantic
  train "${COMMON[@]}" --train_file $DATA/wiki.train.tokens "${STEPS[@]}" --out_dir $RUNS/default \
    > $LOGS/train-default.log 2>&1 &
  train "${COMMON[@]}" --train_file $DATA/wiki.train.tokens "${STEPS[@]}" --recipe reference \
    --out_dir $RUNS/reference > $LOGS/train-reference.log 2>&1 &
  # the control, a fresh model of the default's config (written at its first validation), read while
  # the two train
  local config=$RUNS/default/checkpoints/best/config.json
  for _ in $(seq 120); do [ -f $config ] && break; sleep 2; done
  python3 -c "import torch, sys; sys.path.insert(0, '.'); from model import BDH, BDHConfig
from dragon_hatchling.checkpoints import save_checkpoint
import json; c = json.load(open('$config')); torch.manual_seed(1337)
save_checkpoint(BDH(BDHConfig(**c)), '$RUNS/fresh')"
  inspect fresh
  wait
  inspect default &
  inspect reference &
  wait
  pack models 'logs/train-default.log logs/train-reference.log logs/graph-* logs/mono-* default reference
    graph-* mono-*'
}

score() {  # one model of the merging experiment on each part's held-out text, on validation, a sample
  local model=$1
  for text in parts/a.heldout.txt parts/b.heldout.txt; do
    name=$(basename $text .txt)
    python3 evaluate.py --model_path $RUNS/$model --device $DEVICE --data_file $RUNS/$text --no_plots \
      --out_dir $RUNS/eval-$model-$name > $LOGS/eval-$model-$name.log 2>&1
  done
  python3 evaluate.py --model_path $RUNS/$model --device $DEVICE --data_dir $DATA --no_plots \
    --prompt " = Dragon = " --max_new_bytes 600 --temperature 0.8 --top_k 40 --seed 1337 \
    --out_dir $RUNS/eval-$model-valid > $LOGS/eval-$model-valid.log 2>&1
}

merging() {  # a base model, two copies tuned on parts A and B, the merge, all four scored
  python3 results/merging/parts.py --train_file $DATA/wiki.train.tokens --out_dir $RUNS/parts > $LOGS/parts.log
  train "${COMMON[@]}" --train_file $RUNS/parts/base.txt --epochs 3 "${STEPS[@]}" \
    --out_dir $RUNS/base > $LOGS/train-base.log 2>&1
  for part in a b; do
    train "${COMMON[@]}" --train_file $RUNS/parts/$part.txt --epochs 1 \
      "${STEPS[@]}" --init_from $RUNS/base --lr 3e-4 --min_lr 3e-5 --warmup_steps 100 \
      --extra_val_file $RUNS/parts/$part.heldout.txt --out_dir $RUNS/tuned-$part > $LOGS/train-tuned-$part.log 2>&1 &
  done
  wait
  python3 -m dragon_hatchling.hub merge $RUNS/tuned-a $RUNS/tuned-b $RUNS/merged --overwrite > $LOGS/merge.log 2>&1
  for model in base tuned-a tuned-b merged; do score $model & done  # side by side
  wait
  pack merging 'logs/parts.log logs/train-base.log logs/train-tuned-* logs/merge.log logs/eval-* base tuned-*
    merged eval-*'
}

pack() {  # the small files of a stage come back in one tar (the machine returns at most 8 files)
  local stage=$1
  shift
  tar czf $OUT/interp-$stage.tar.gz --exclude='checkpoints' --exclude='*.txt.bin' -C $RUNS \
    $(cd $RUNS && ls -d $* 2>/dev/null)  # the patterns match inside $RUNS
}

[ $STAGE = merging ] || models
[ $STAGE = models ] || merging

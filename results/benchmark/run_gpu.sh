#!/usr/bin/env bash
# Issue 29 on an H200 (python3, torch and Triton there, no uv). Carry .gpu/data (wiki.{valid,test}.raw,
# wiki.{train,valid}.tokens from ../shared/data) and, for `train`, .gpu/prev (`git archive 74ab83d
# dragon_hatchling model.py`, the fused path before issue 29's rounds); carry those folders alone:
# carrying all of .gpu would replace the machine's runs. Logs under $OUT/t, packed at the end into
# $OUT/PART.tgz (a call brings back at most 8 files; a run stopped before the end leaves them loose).
# One part a command (call with timeout_s 595):
#   bash results/benchmark/run_gpu.sh tiles   # about 9 minutes: a model of the default recipe stopped
#     at 100 s (SIGTERM saves it), the latency fit (benchmark --parts latency: fresh models at five n,
#     and this one), the H200's step tiles (step_tiles.py: the sweep, a profile, then generation with
#     the fastest tiles), and the generation benchmark at the committed tiles for the same weights
#     (lazy_decay_over_no_decay_at_floor); TILES_S=240 gives the sweep 240 s, not 270
#   bash results/benchmark/run_gpu.sh latency # about 4 minutes, any Hopper card (the H100 shares the
#     H200's die): the model as above, the latency fit, then Nsight Compute on the two step kernels
#   bash results/benchmark/run_gpu.sh train   # about 3 minutes: the fused training step now and at
#     74ab83d, one after the other, at 32 x 128 and 8 x 512, with and without decay
set -u
if [[ "${1:-}" != tiles && "${1:-}" != latency && "${1:-}" != train ]]; then
  echo "usage: bash results/benchmark/run_gpu.sh tiles|latency|train" >&2
  exit 2
fi
DATA=.gpu/data
# bad input: one line and exit 2 before any work
refuse() { echo "error: $1" >&2; exit 2; }
command -v nvidia-smi > /dev/null || refuse "no nvidia-smi here: run it on a GPU machine (the device tool)"
[[ -n "${OUT:-}" ]] || refuse "OUT is not set: expected the folder the logs go to (the device tool sets it)"
[[ "${TILES_S:-270}" =~ ^[1-9][0-9]{0,4}$ ]] || refuse "TILES_S=${TILES_S}: expected whole seconds, 1 to 99999"
for f in wiki.valid.raw wiki.test.raw wiki.train.tokens wiki.valid.tokens; do
  [[ -s $DATA/$f ]] || refuse "$DATA/$f is missing or empty: carry $DATA (copies of ../shared/data's files)"
done
[[ $1 != train || -f .gpu/prev/dragon_hatchling/benchmark.py ]] ||
  refuse ".gpu/prev holds no dragon_hatchling/benchmark.py: carry it (git archive 74ab83d dragon_hatchling model.py)"
export PYTHONUNBUFFERED=1
O=$OUT/t
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $O/gpu.txt
git log -1 --format=%H > $O/commit.txt
case "${1:-}" in
tiles|latency)
  timeout -s TERM 100 python3 experiment.py --device cuda --fused --data_dir $DATA \
    --train_file $DATA/wiki.train.tokens --eval_every 100000 --no_progress --out_dir .gpu/gen \
    --overwrite > $O/model.log 2>&1
  tail -3 $O/model.log
  # what the step's time is made of: a fixed part and the bytes at some bandwidth (step_speed)
  timeout 60 python3 -m dragon_hatchling.benchmark --device cuda --parts latency \
    --model_path .gpu/gen/checkpoints/last --out $O/latency.json > $O/latency.log 2>&1
  tail -12 $O/latency.log
  ;;&
tiles)
  timeout -s TERM ${TILES_S:-270} python3 results/benchmark/step_tiles.py --model_path .gpu/gen/checkpoints/last \
    --out $O/tiles > $O/step_tiles.log 2>&1
  tail -30 $O/step_tiles.log
  timeout 100 python3 -m dragon_hatchling.benchmark --device cuda --parts generate \
    --model_path .gpu/gen/checkpoints/last --out $O/generate.json > $O/generate.log 2>&1
  tail -30 $O/generate.log
  ;;
latency)
  # where the step's kernels stall: Nsight Compute on one attention and one gate kernel of an eager
  # step with lazy decay, after two warm steps (ncu runs kernels one at a time: PDL's overlap is lost)
  if command -v ncu > /dev/null; then
    timeout 150 ncu --clock-control none --kernel-name regex:'_step_(attention|gate)_kernel' \
      --launch-skip 24 --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 - .gpu/gen/checkpoints/last > $O/ncu.txt 2>&1 <<'PY'
import sys

import torch

sys.path.insert(0, ".")
from dragon_hatchling import benchmark
from dragon_hatchling.fused_recurrent import FusedStep, LazyDecay
from dragon_hatchling.loading import load_model

model = load_model(sys.argv[1])[0].cuda().to(torch.bfloat16).eval()
with torch.no_grad():
    prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
    _, _, state = model.forward_chunked(prompt, chunk_size=256)
    decays = model.config.half_lives is not None and LazyDecay.holds(model)
    lazy = LazyDecay(model, state) if decays else None
    step, byte = FusedStep(model), torch.tensor([101], device="cuda")
    for _ in range(4):  # 12 kernels of the two kinds a step: ncu skips the first two steps'
        step(byte, state, lazy)
        if lazy is not None:
            lazy.tick(state)
torch.cuda.synchronize()
PY
    grep -E "_step_|Duration|Throughput|Occupancy|Registers|Warp Cycles|Stall" $O/ncu.txt | head -60
  else
    echo "no ncu here: no profile"
  fi
  ;;
train)
  TRAIN="--device cuda --parts train --paths fused --shapes 32x128,8x512 --half_lives 8,32,128,256"
  for i in 1 2; do  # alternating, so that a drift of the machine shows as a difference between repeats
    timeout 140 python3 -m dragon_hatchling.benchmark $TRAIN --out $O/train-now$i.json > $O/train-now$i.log 2>&1
    (cd .gpu/prev && timeout 140 python3 -m dragon_hatchling.benchmark $TRAIN --out $O/train-74ab83d$i.json \
      > $O/train-74ab83d$i.log 2>&1)
    head -4 $O/train-now$i.log $O/train-74ab83d$i.log
  done
  # each shape's bytes/s now over 74ab83d's, repeat by repeat, and the peak memory of both (a shape
  # that either run lacks, timed out or out of memory, is left out; the runs' own JSONs keep it)
  python3 - "$O" <<'PY'
import json, sys
from pathlib import Path

o = Path(sys.argv[1])


def rows(name):
    f = o / f"{name}.json"
    train = json.loads(f.read_text())["train"] if f.exists() else []
    return {(r["path"], r["batch"], r["window"]): r for r in train if r.get("bytes_per_s")}


out = {}
for i in (1, 2):
    now, prev = rows(f"train-now{i}"), rows(f"train-74ab83d{i}")
    for (path, b, t), r in now.items():
        p = prev.get((path, b, t))
        if p is not None:
            out.setdefault(f"{b}x{t}" + (" decay" if "decay" in path else ""), []).append({
                "fused_over_previous": r["bytes_per_s"] / p["bytes_per_s"],
                "bytes_per_s": r["bytes_per_s"], "previous_bytes_per_s": p["bytes_per_s"],
                "peak_gb": r["peak_gb"], "previous_peak_gb": p["peak_gb"]})
(o / "train-vs-previous.json").write_text(json.dumps({"previous": "74ab83d", "shapes": out}, indent=1))
for k, v in out.items():
    print(k, " ".join(f"{x['fused_over_previous']:.3f}x" for x in v))
PY
  ;;
esac
# one file back, not the 8 a call may bring
tar -czf $OUT/$1.tgz -C $OUT t && rm -rf $O

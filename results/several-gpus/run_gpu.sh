#!/bin/bash
# The 2-GPU measurements of results/several-gpus, on nvidia-h200-x2 (python3 and torch there, no uv;
# .gpu/data holds the Wikitext files). Writes everything small into $OUT/several-gpus.tar.gz.
set -u
DATA=.gpu/data
RUNS=.gpu/several-gpus
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node 2"
mkdir -p $RUNS/ref-2gpu
nvidia-smi topo -m > $RUNS/topology.txt 2>&1
# throughput of the fused path, 1 GPU then 2 (the same shapes per GPU), and the gradients' all-reduce
python3 -m dragon_hatchling.benchmark --device cuda --parts ddp --shapes 32x128,16x128 --out $RUNS/ddp1.json > $RUNS/ddp1.log 2>&1
$TORCHRUN -m dragon_hatchling.benchmark --device cuda --parts ddp --shapes 32x128,16x128 --out $RUNS/ddp2.json > $RUNS/ddp2.log 2>&1
python3 results/several-gpus/scaling.py $RUNS/ddp1.json $RUNS/ddp2.json --out $RUNS/scaling.json > $RUNS/scaling.log 2>&1
# the reference run (3 epochs, global batch 32 x 128) on 2 GPUs, as results/long-context/runs/ref on 1
timeout ${REF_TIMEOUT:-400} $TORCHRUN experiment.py --device cuda --fused --recipe reference --data_dir $DATA \
  --train_file $DATA/wiki.train.tokens --extra_val_file $DATA/wiki.valid.tokens --eval_every 2000 --no_progress \
  --out_dir $RUNS/ref-2gpu > $RUNS/ref-2gpu/train.log 2>&1
echo "ref-2gpu exit $?" >> $RUNS/ref-2gpu/train.log
cat $RUNS/*.log $RUNS/ref-2gpu/train.log | grep -v "^W1\|^\*\*\*" | tail -40
tar czf $OUT/several-gpus.tar.gz --exclude=checkpoints -C $RUNS .

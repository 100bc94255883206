"""Step time for attention tiles BP x BD x warps (the two-kernel step before its gate rewrite):
earlier/5-two-kernels-attention-bd.log. Ad-hoc, from the repository root:

    python3 results/benchmark/step-tiles/explore/attention_bd.py

Ran on an uncommitted first version of e77f3da (earlier/5-*); it still runs on
later kernels, which time differently.
"""

import itertools
import sys

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles

from kernels import FusedStep

model, s0, byte, ref = step_tiles.prepared(".gpu/model")
with torch.no_grad():
    for bp, bd, w in itertools.product([32, 64], [32, 64, 128, 256], [4, 8]):
        if bp * bd > 64 * 128 and w == 4:
            continue
        att = {**FusedStep.ATTENTION_TILES, "BP": bp, "BD": bd, "num_warps": w}
        try:
            ms, err = step_tiles.ms_per_step(model, s0, byte, FusedStep(model, att, None), ref)
            print(f"{ms:.3f} ms err {err:.1e} {att}", flush=True)
        except Exception as e:
            print("failed", att, str(e)[:200], flush=True)

"""Step time with maxnreg caps and warps for both step kernels: registers.log. Ad-hoc, from the
repository root:

    python3 results/benchmark/step-tiles/explore/registers.py

Ran at commit e77f3da; its attention tiles (BK, num_stages) left with 4dddd29, so
rerun it at that commit.
"""

import itertools
import sys

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles

from kernels import FusedStep

model, s0, byte, ref = step_tiles.prepared(".gpu/model")
A0 = {"BP": 32, "BK": 64, "BD": 64, "GROUP": 8, "num_warps": 2, "num_stages": 3}
G0 = {"BN": 64, "BD": 128, "GROUP": 32, "num_warps": 2}


def t(att, gate):
    try:
        ms, err = step_tiles.ms_per_step(model, s0, byte, FusedStep(model, att, gate), ref)
        print(f"{ms:.3f} ms err {err:.1e} {att} {gate}", flush=True)
    except Exception as e:
        print("failed", att, gate, str(e)[:200], flush=True)


with torch.no_grad():
    t(A0, G0)
    for bp, w, r in itertools.product([16, 32, 64], [2, 4, 8], [None, 64, 96, 128]):
        t({**A0, "BP": bp, "num_warps": w, "maxnreg": r}, G0)
    for bn, bd, w, r in itertools.product([16, 32, 64], [128, 256], [2, 4, 8], [None, 64, 128]):
        if bn * bd > 64 * 256:
            continue
        t(A0, {**G0, "BN": bn, "BD": bd, "num_warps": w, "maxnreg": r, "GROUP": 64 if bn == 16 else 32})

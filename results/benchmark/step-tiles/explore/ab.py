"""A against B: the step of an earlier kernels.py and of the working tree, each at its default tiles,
alternating three times in one run. Ad-hoc, from the repository root:

    git show COMMIT:kernels.py > .gpu/kernels_before.py
    python3 results/benchmark/step-tiles/explore/ab.py .gpu/kernels_before.py

ab-1-position-and-v-prefetch.log: commit e77f3da against the embedding kernel moving the position on
and the residual's v loaded before the arrivals. ab-2-gate-sum-per-block.log: that against the gate
summing LN(a) Dy per block of columns (a BN vector) instead of in a BN x BD tile.
ab-3-pdl.log (a second argument, "pdl"): that against programmatic dependent launch, with the
attention kernel reading its columns of Dx in one load before waiting, and the same without PDL.
ab-4-gate-sums-a.log: commit 68fba39 against a version (not kept) in which every gate program sums
the attention kernel's group sums of a itself and the attention kernel has no second arrival: no
change (0.1773 against 0.1774 ms, means of three).
ab-5, ab-6, ab-7 (next session, 2026-11-23): commit 68fba39's kernels (the working tree's, for ab-6
and ab-7) against the variants in the .diff beside each log: the sums as int64 fixed point through
atomics (slower, 0.218 against 0.178 ms), the gate's loops unrolled, an L2 prefetch of the gate's
rows, both, and the gate reading x and Dy early (no gain). In ab-5 and ab-7 the working tree held
the variant and the first argument the kept kernels; in ab-6 the first argument was the variant.
"""

import sys

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles  # noqa: E402

from kernels import FusedStep  # noqa: E402

before = step_tiles.module_from_file(sys.argv[1], "kernels_before")
model, s0, byte, ref = step_tiles.prepared(".gpu/model")
with torch.no_grad():
    for _ in range(3):
        for name, make in ((sys.argv[1], before.FusedStep), ("working tree", FusedStep)):
            ms, err = step_tiles.ms_per_step(model, s0, byte, make(model), ref)
            print(f"{name}: {ms:.4f} ms err {err:.1e}", flush=True)
        if len(sys.argv) > 2:  # also the working tree's step without programmatic dependent launch
            fused = FusedStep(model)
            fused.pdl = False
            ms, err = step_tiles.ms_per_step(model, s0, byte, fused, ref)
            print(f"working tree, no PDL: {ms:.4f} ms err {err:.1e}", flush=True)

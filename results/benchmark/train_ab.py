"""The fused training step of earlier (or other) kernels.py files against this one, on one GPU.

Times `benchmark.py`'s fused training step (AdamW, bf16, dropout, clipping) at each shape through
every version, alternating twice in one run; then profiles one step of this version at each shape
and prints the kernels that take the most GPU time.

    python3 results/benchmark/train_ab.py OLD_kernels.py [OTHER_kernels.py ...] > OUT.log
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import benchmark  # noqa: E402
import kernels  # noqa: E402
from model import BDH, BDHConfig  # noqa: E402
from results.benchmark.step_tiles import module_from_file  # noqa: E402

SHAPES = ((32, 128), (32, 512), (8, 2048))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("others", nargs="+", help="earlier or other kernels.py files, each named by its file name")
    others = p.parse_args().others
    device = torch.device("cuda")
    cfg = BDHConfig()
    args = argparse.Namespace(warmup=3, steps=10, repeats=3)
    versions = {Path(f).stem: module_from_file(f, f"kernels_{i}") for i, f in enumerate(others)}
    versions["now"] = kernels
    for B, T in SHAPES:
        for _ in range(2):
            for name, module in versions.items():
                sys.modules["kernels"] = module  # BDH.forward(fused=True) imports from it
                row = benchmark.measure_train(cfg, "fused", B, T, args, device)
                rate, peak = row["bytes_per_s"], row["peak_gb"]
                print(f"B{B} x T{T} fused, {name}: {rate:,.0f} bytes/s, peak {peak:.2f} GB", flush=True)
    sys.modules["kernels"] = kernels
    for B, T in SHAPES:
        torch.manual_seed(0)
        model = BDH(cfg).to(device).train()
        step = benchmark.train_step_fn(model, "fused", B, T, device)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"\n## one fused step, B{B} x T{T}: GPU time by kernel")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
        del model, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""The gate-decoder kernel (dragon_hatchling/fused_gate.py: u = LN(a) Dy and y kept on chip) against
its plain form as fused_parallel ran it (cuBLAS u, the gate kernel's pass, cuBLAS y E), at the default
model's layer (d = 256, h = 4, n/h = 8,192) and R = B*T rows, over a sweep of its tiles. Checks each
variant against the plain form, times both with CUDA events (median of repeats) in one run, prints
TFLOP/s (the two products, 4 R d n) and the ratio, writes JSON.

    python3 results/benchmark/gate_decoder.py --rows 4096 --out $OUT/gate_decoder.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dragon_hatchling import fused_parallel  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402
from dragon_hatchling.fused_gate import GateTiles, gate_decoder  # noqa: E402

D, H, M = 256, 4, 8192
SWEEP = [
    GateTiles(BM, BP, splits, warps, stages)
    for BM, BP, warps in ((64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8), (64, 128, 8))
    for splits in (2, 4, 8)
    for stages in (2, 3)
]


def plain(x, ahat, Dy, E, p_drop: float, seed: int) -> torch.Tensor:
    """fused_parallel's forward before fused_gate: u and y written and read back."""
    R = x.shape[0]
    u = ahat @ Dy  # h, R, M
    y = torch.empty_like(x)
    BR, BP = fused_parallel.BR, fused_parallel.BP
    grid = (triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP))
    fused_parallel._gate_kernel[grid](x, u, y, R, M, H, p_drop, seed, HAS_DROPOUT=p_drop > 0, BR=BR, BP=BP)
    return y @ E


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--p_drop", type=float, default=0.1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    R, bf16 = args.rows, torch.bfloat16
    x = torch.randn(R, H * M, device="cuda").to(bf16)
    ahat = torch.randn(H, R, D, device="cuda").to(bf16)
    Dy = (torch.randn(H, D, M, device="cuda") * D**-0.5).to(bf16)
    E = (torch.randn(H * M, D, device="cuda") * 0.05).to(bf16)
    flop = 4 * R * D * H * M
    ref = plain(x, ahat, Dy, E, args.p_drop, 7).float()
    base = cuda_time(lambda: plain(x, ahat, Dy, E, args.p_drop, 7), 10, 5) / 10
    rows = [
        {"variant": "plain (cuBLAS, gate kernel, cuBLAS)", "ms": base * 1e3, "tflops": flop / base / 1e12}
    ]
    print(f"plain: {base * 1e3:.3f} ms, {flop / base / 1e12:.0f} TFLOP/s", flush=True)
    for t in SWEEP:
        err = ((gate_decoder(x, ahat, Dy, E, args.p_drop, 7, t) - ref).norm() / ref.norm()).item()
        sec = cuda_time(lambda t=t: gate_decoder(x, ahat, Dy, E, args.p_drop, 7, t), 10, 5) / 10
        rows.append({**asdict(t), "ms": sec * 1e3, "tflops": flop / sec / 1e12, "rel_err": err})
        print(f"{t}: {sec * 1e3:.3f} ms, {base / sec:.2f}x plain, rel. err {err:.1e}", flush=True)
    best = min(rows[1:], key=lambda r: r["ms"])
    print(f"best: {best}, {base * 1e3 / best['ms']:.2f}x plain")
    if args.out:
        report = {"device": torch.cuda.get_device_name(), "rows": R, "p_drop": args.p_drop, "runs": rows}
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

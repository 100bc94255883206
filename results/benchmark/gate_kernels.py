"""The on-chip gate kernels (dragon_hatchling/fused_gate.py) against their plain forms as
fused_parallel ran them: forward, gate_decoder against cuBLAS u = LN(a) Dy, the gate kernel's pass and
cuBLAS y E; backward, gate_grad against cuBLAS u and g_y = g_z E^T, the gate-gradient kernel's pass
and cuBLAS g_u Dy^T. At the default model's layer (d = 256, h = 4, n/h = 8,192) and R = B*T rows,
over a sweep of their tiles. Checks each variant against the plain form, times both with CUDA events
(median of repeats) in one run, prints the ratio, writes JSON.

    python3 results/benchmark/gate_kernels.py --rows 4096 --out $OUT/gate_kernels.json
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
from dragon_hatchling.fused_gate import GateTiles, gate_decoder, gate_grad  # noqa: E402

D, H, M = 256, 4, 8192
SWEEP = [
    GateTiles(BM, BP, splits, warps, stages)
    for BM, BP, warps in ((64, 64, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8), (64, 128, 8))
    for splits in (2, 4, 8)
    for stages in (2, 3)
]


def plain_forward(x, ahat, Dy, E, gz, p_drop: float, seed: int) -> torch.Tensor:
    """fused_parallel's forward before fused_gate: u and y written and read back."""
    R = x.shape[0]
    u = ahat @ Dy  # h, R, M
    y = torch.empty_like(x)
    BR, BP = fused_parallel.BR, fused_parallel.BP
    grid = (triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP))
    fused_parallel._gate_kernel[grid](x, u, y, R, M, H, p_drop, seed, HAS_DROPOUT=p_drop > 0, BR=BR, BP=BP)
    return y @ E


def plain_backward(x, ahat, Dy, E, gz, p_drop: float, seed: int) -> tuple[torch.Tensor, ...]:
    """fused_parallel's gate gradient before fused_gate: u and g_y written and read back."""
    R = x.shape[0]
    u, gy = ahat @ Dy, gz @ E.mT  # h, R, M and R, n
    y, gu, gx = torch.empty_like(x), torch.empty_like(x), gy
    BR, BP = fused_parallel.BR, fused_parallel.BP
    grid = (triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP))
    fused_parallel._gate_grad_kernel[grid](
        x, u, gy, y, gu, gx, R, M, H, p_drop, seed, HAS_DROPOUT=p_drop > 0, BR=BR, BP=BP
    )
    return y, gu, gx, gu.view(R, H, M).transpose(0, 1) @ Dy.mT


def on_chip_forward(x, ahat, Dy, E, gz, p_drop: float, seed: int, tiles: GateTiles) -> torch.Tensor:
    return gate_decoder(x, ahat, Dy, E, p_drop, seed, tiles)


FORMS = {"forward": (plain_forward, on_chip_forward), "backward": (plain_backward, gate_grad)}


def worst(out, ref) -> float:
    """The largest relative error over the outputs."""
    pairs = [(out, ref)] if isinstance(out, torch.Tensor) else zip(out, ref, strict=True)
    return max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in pairs)


def sweep(form: str, args: tuple) -> list[dict]:
    """The plain form and every tile of the on-chip kernel, timed in one run."""
    plain, fused = FORMS[form]
    ref = plain(*args)
    base = cuda_time(lambda: plain(*args), 10, 5) / 10
    rows = [{"form": form, "variant": "plain", "ms": base * 1e3}]
    print(f"{form}, plain: {base * 1e3:.3f} ms", flush=True)
    for t in SWEEP:
        try:
            err = worst(fused(*args, t), ref)
        except triton.runtime.errors.OutOfResources as e:  # registers or shared memory
            print(f"  {t}: {type(e).__name__}", flush=True)
            continue
        sec = cuda_time(lambda t=t: fused(*args, t), 10, 5) / 10
        rows.append({"form": form, **asdict(t), "ms": sec * 1e3, "over_plain": base / sec, "rel_err": err})
        print(f"  {t}: {sec * 1e3:.3f} ms, {base / sec:.2f}x plain, rel. err {err:.1e}", flush=True)
    best = max(rows[1:], key=lambda r: r["over_plain"])
    print(f"{form}, best: {best}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--p_drop", type=float, default=0.1)
    p.add_argument("--forms", default="forward,backward")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    R, bf16 = args.rows, torch.bfloat16
    x = torch.randn(R, H * M, device="cuda").to(bf16)
    ahat = torch.randn(H, R, D, device="cuda").to(bf16)
    Dy = (torch.randn(H, D, M, device="cuda") * D**-0.5).to(bf16)
    E = (torch.randn(H * M, D, device="cuda") * 0.05).to(bf16)
    gz = torch.randn(R, D, device="cuda").to(bf16)
    rows = []
    for form in args.forms.split(","):
        rows += sweep(form, (x, ahat, Dy, E, gz, args.p_drop, 7))
    if args.out:
        report = {"device": torch.cuda.get_device_name(), "rows": R, "p_drop": args.p_drop, "runs": rows}
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The carried state's update at the default model's size: one layer's P = gamma^T P + a^T r with its
bf16 copy (the long-context recipe's decay), as cuBLAS did it (baddbmm a head into float32, then a
conversion) against fused_parallel.update_state over a sweep of tiles (BD, BM, BK, warps, stages),
each shape in one run.

    python3 results/tbptt/update_tiles.py --shapes 8x512,2x2048,32x128 --out $OUT/update_tiles.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py

from dragon_hatchling import fused_parallel  # noqa: E402
from dragon_hatchling.benchmark import shape_list  # noqa: E402
from dragon_hatchling.cli import Parser, fail, out_file  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402
from model import BDHConfig, chunk_decay  # noqa: E402

TILES = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 4),
         (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 128, 4, 3),
         (64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 32, 4, 4), (128, 64, 64, 4, 4)]  # fmt: skip


def operands(B: int, T: int, cfg: BDHConfig) -> tuple:
    """P (h, B, d, M) float32, v (B, T, d), r (h, B, T, M) bf16, the copy (h, B, d, M; its rows below
    a window's T, as CarriedInput writes it), the decay of cfg's half-lives over the window."""
    H, D, M = cfg.n_head, cfg.n_embd, cfg.head_size
    P = torch.randn(H, B, D, M, device="cuda")
    v = torch.randn(B, T, D, device="cuda").to(torch.bfloat16)
    r = torch.randn(H, B, T, M, device="cuda").to(torch.bfloat16)
    return P, v, r, fused_parallel.copy_buffer(P.shape, T, "cuda")[:, :, T:], chunk_decay(cfg, T, "cuda")


def cublas(P, v, r, copy, decay) -> None:
    """What CarriedInput did before update_state: v faded in PyTorch, a product a head added into P
    (cuBLAS), then P.to(bf16)."""
    faded = (decay.to_end.unsqueeze(1) * v.float()).to(torch.bfloat16)  # h, B, T, d
    for h, gamma in enumerate(decay.whole.flatten().tolist()):
        torch.baddbmm(P[h], faded[h].mT, r[h], beta=gamma, out_dtype=torch.float32, out=P[h])
    copy.copy_(P)


def ms(fn) -> float:
    """Median milliseconds of one call of fn over 50, after 5 (devices.cuda_time)."""
    for _ in range(5):
        fn()
    return cuda_time(fn, steps=1, repeats=50) * 1000


def sweep(B: int, T: int, cfg: BDHConfig) -> dict[str, float]:
    """Milliseconds of one layer's update, cuBLAS's and each tile's; the tiles checked against cuBLAS."""
    ops = operands(B, T, cfg)
    P0, want = ops[0].clone(), ops[0].clone()
    cublas(want, *ops[1:])
    out = {"cublas": ms(lambda: cublas(*ops))}
    for tile in TILES:
        fused_parallel.UPDATE_TILE = tile
        ops[0].copy_(P0)
        fused_parallel.update_state(*ops)
        err = ((ops[0] - want).norm() / want.norm()).item()
        out[str(tile)] = ms(lambda: fused_parallel.update_state(*ops)) if err < 1e-4 else float("nan")
    return out


def main() -> int:
    p = Parser(description=__doc__)
    p.add_argument("--shapes", type=shape_list, default=[(8, 512)], help="BATCHxWINDOW pairs (8x512)")
    p.add_argument("--out", type=out_file, default=None, help="JSON of every time, each shape")
    args = p.parse_args()
    if not torch.cuda.is_available():
        fail("update_tiles.py times CUDA kernels; no CUDA device here")
    cfg, default = BDHConfig(half_lives=[8.0, 32.0, 128.0, 256.0]), fused_parallel.UPDATE_TILE
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "default": str(default)}
    for B, T in args.shapes:
        times = sweep(B, T, cfg)
        report[f"{B}x{T}"] = times
        print(f"\n{B} x {T}: one layer's update and bf16 copy, ms (cuBLAS {times['cublas']:.3f})", flush=True)
        for name, t in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"  {t:7.3f}  {times['cublas'] / t:5.2f}x  {name}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

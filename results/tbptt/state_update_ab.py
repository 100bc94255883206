"""A/B of one layer's carried-state work at the default model's size (h=4, n/h=8192, d=256), B x T:
the state's bf16 copy, its read and its update as CarriedInput does them today, against the update
as one cuBLAS product per head that adds into the float32 state (baddbmm with out_dtype, beta =
gamma^T), with the state kept in the kernels' (h, B) layout. Times with CUDA events; checks that
both give the same next state (to bf16 rounding of the window's terms).

    python3 results/tbptt/state_update_ab.py --shapes 8x512,2x2048,32x128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dragon_hatchling.benchmark import shape_list  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402

H, M, D = 4, 8192, 256


def today(state, r, faded, whole):
    """CarriedInput of today: bf16 copy in (h, B), read, terms in bf16, state * gamma^T + terms."""
    S = state.transpose(0, 1).to(torch.bfloat16)  # h, B, M, d
    earlier = (r @ S).float()
    terms = r.mT @ faded  # h, B, M, d bf16
    return earlier, (state * whole.view(1, -1, 1, 1)).add_(terms.transpose(0, 1))


def head_major(state_hm, r, faded, whole):
    """The state in (h, B): its bf16 copy without a transpose, the update added by cuBLAS per head."""
    S = state_hm.to(torch.bfloat16)
    earlier = (r @ S).float()
    new = torch.empty_like(state_hm)
    for h in range(H):
        g = float(whole[h])
        torch.baddbmm(state_hm[h], r[h].mT, faded[h], out_dtype=torch.float32, beta=g, out=new[h])
    return earlier, new


def compare(B: int, T: int) -> str:
    torch.manual_seed(0)
    state = torch.randn(B, H, M, D, device="cuda") * 0.1
    r = torch.randn(H, B, T, M, device="cuda").relu().to(torch.bfloat16)
    faded = torch.randn(H, B, T, D, device="cuda").to(torch.bfloat16)
    whole = torch.tensor([0.9, 0.8, 0.7, 0.6], device="cuda")
    state_hm = state.transpose(0, 1).contiguous()
    e1, n1 = today(state, r, faded, whole)
    e2, n2 = head_major(state_hm, r, faded, whole)
    err = ((n2.transpose(0, 1) - n1).norm() / n1.norm()).item()
    t1 = cuda_time(lambda: today(state, r, faded, whole), 10, 5) / 10
    t2 = cuda_time(lambda: head_major(state_hm, r, faded, whole), 10, 5) / 10
    return (
        f"{B} x {T}: today {t1 * 1e3:.3f} ms, head-major {t2 * 1e3:.3f} ms ({t1 / t2:.2f}x), "
        f"next state rel. diff {err:.1e}, read diff {(e1 - e2).abs().max().item():.1e}"
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=shape_list, default=[(8, 512), (2, 2048), (32, 128)])
    for B, T in p.parse_args().shapes:
        print(compare(B, T), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

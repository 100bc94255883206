"""The on-chip gate kernels (dragon_hatchling/fused_gate.py) against their plain form in float32 from
the same bf16 inputs: forward u = LN(a) Dy, y = relu(u) * relu(x) * keep, z = y E; backward, from
g_z, y, g_u, the gate's part of g_x and g_LN(a). Without a GPU in Triton's interpreter at tiny sizes;
on a GPU at the default model's."""

import pytest
import torch
import triton

from dragon_hatchling import fused_parallel
from dragon_hatchling.fused_gate import GateTiles, gate_decoder, gate_grad

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# d, h, n/h, rows: the default model at 8 x 512 on a GPU; tiny, rows not a multiple of any tile, here
SIZES = (256, 4, 8192, 4096) if CUDA else (32, 2, 128, 45)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def keep_of(R: int, H: int, M: int, p_drop: float, seed: int) -> torch.Tensor:
    """The gate kernel's dropout mask, read out (its y for x = u = 1): R x n."""
    ones = torch.ones((H, R, M), device=DEVICE, dtype=torch.bfloat16)
    y = torch.empty((R, H * M), device=DEVICE, dtype=torch.bfloat16)
    grid = (triton.cdiv(R, fused_parallel.BR), H * triton.cdiv(M // 2, fused_parallel.BP))
    BR, BP = fused_parallel.BR, fused_parallel.BP
    fused_parallel._gate_kernel[grid](
        ones.view(R, -1), ones, y, R, M, H, p_drop, seed, HAS_DROPOUT=True, BR=BR, BP=BP
    )
    return y.float()


def operands(seed: int = 0):
    d, h, m, R = SIZES
    g = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16
    x = torch.randn(R, h * m, generator=g).to(DEVICE, bf16)  # v Dx, before the relu
    ahat = torch.randn(h, R, d, generator=g).to(DEVICE, bf16)  # LN(a): unit scale
    Dy = (torch.randn(h, d, m, generator=g) * d**-0.5).to(DEVICE, bf16)
    E = (torch.randn(h * m, d, generator=g) * 0.05).to(DEVICE, bf16)
    return x, ahat, Dy, E


def plain(x, ahat, Dy, E, keep=None) -> torch.Tensor:
    """The plain form in float32: u = ahat Dy, y = relu(u) * relu(x) (* keep), z = y E."""
    H, R, _ = ahat.shape
    u = (ahat.float() @ Dy.float()).transpose(0, 1).reshape(R, -1)  # R, n: head-major columns
    y = torch.relu(u) * torch.relu(x.float())
    return (y if keep is None else y * keep) @ E.float()


TILES = [GateTiles(), GateTiles(BM=16, BP=16, splits=2, num_warps=4)] if not CUDA else [
    GateTiles(), GateTiles(BM=128, BP=32, splits=2), GateTiles(BM=64, BP=64, splits=8, num_warps=4)
]  # fmt: skip


@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_gate_decoder_matches_its_plain_form(tiles):
    x, ahat, Dy, E = operands()
    ref = plain(x, ahat, Dy, E)
    z = gate_decoder(x, ahat, Dy, E, 0.0, 0, tiles)
    assert z.dtype == torch.float32 and z.shape == ref.shape
    assert torch.isfinite(z).all()
    assert rel(z, ref) < 5e-3  # y rounded to bf16 before y E, as the plain bf16 path rounds it


def test_gate_decoder_drops_the_gate_kernels_neurons():
    """Dropout: the same mask as the gate kernel draws (backward recomputes y through it)."""
    x, ahat, Dy, E = operands(seed=1)
    d, h, m, R = SIZES
    keep = keep_of(R, h, m, 0.25, seed=123)
    ref = plain(x, ahat, Dy, E, keep)
    z = gate_decoder(x, ahat, Dy, E, 0.25, 123)
    assert rel(z, ref) < 5e-3
    assert rel(z, plain(x, ahat, Dy, E, keep_of(R, h, m, 0.25, seed=124))) > 5e-2  # another mask: another z


def test_gate_decoder_refuses_splits_that_do_not_divide_the_pairs():
    x, ahat, Dy, E = operands()
    with pytest.raises(ValueError, match="do not split"):
        gate_decoder(x, ahat, Dy, E, 0.0, 0, GateTiles(BP=16, splits=3))


def plain_grad(x, ahat, Dy, E, gz, keep=None):
    """The gate's gradient in float32: y, g_u, the gate's part of g_x (R x n), g_LN(a) (h, R, d)."""
    H, R, _ = ahat.shape
    u = (ahat.float() @ Dy.float()).transpose(0, 1).reshape(R, -1)  # R, n
    keep = torch.ones_like(u) if keep is None else keep
    gy = (gz.float() @ E.float().T) * keep  # before dropout
    xr = torch.relu(x.float())
    y, gu, gx = torch.relu(u) * xr * keep, torch.where(u > 0, gy * xr, 0.0), gy * torch.relu(u)
    ga = gu.view(R, H, -1).transpose(0, 1) @ Dy.float().mT  # h, R, d
    return y, gu, gx, ga


@pytest.mark.parametrize("p_drop", [0.0, 0.25])
@pytest.mark.parametrize("tiles", TILES[:2], ids=str)
def test_gate_grad_matches_its_plain_form(tiles, p_drop):
    x, ahat, Dy, E = operands(seed=2)
    d, h, m, R = SIZES
    gz = torch.randn(R, d, device=DEVICE).to(torch.bfloat16)
    keep = keep_of(R, h, m, p_drop, seed=9) if p_drop else None
    ref = plain_grad(x, ahat, Dy, E, gz, keep)
    out = gate_grad(x, ahat, Dy, E, gz, p_drop, 9, tiles)
    for name, o, r in zip(("y", "g_u", "g_x", "g_LN(a)"), out, ref, strict=True):
        assert o.shape == r.shape and torch.isfinite(o).all(), name
        assert rel(o, r) < 5e-3, (name, rel(o, r))  # bf16 outputs, float32 on chip

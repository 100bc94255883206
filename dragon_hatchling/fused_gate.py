"""The gate and the decoder of a layer with the neurons kept on chip (issue 29, part 1): the forward's
z = (relu(u) * relu(x) * keep) E with u = LN(a) Dy, tile by tile over the neurons, so that neither u
nor y (each B*T x n) is written to memory. Its plain form is what fused_parallel.FusedNeurons did
before, and still does in backward: u = LN(a) Dy by cuBLAS, _gate_kernel's pass, then y E by cuBLAS
(tests/test_fused_gate.py holds the two together, dropout included).

A program takes BM rows and one stretch of a head's pairs of neurons (split over the grid's second
axis: few row tiles, so the neurons are split as well, each split's sum of y E a float32 part, the
parts then added in a fixed order). Each step of its loop: BP pairs, two halves as everywhere in the
parallel kernels (the first of each pair at p, the second at p + M/2):

    u = LN(a) Dy[:, pairs]      (BM x d) (d x BP), twice     on chip, float32
    y = relu(u) * relu(x) * keep                             x read (bf16), keep as _gate_kernel draws it
    acc += y E[pairs, :]        (BM x BP) (BP x d), twice    float32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dragon_hatchling.fused_common import dot, keep_pair, relu


@triton.jit
def _gate_decoder_kernel(
    x_ptr, ahat_ptr, dy_ptr, e_ptr, z_ptr, R, M, H, p_drop, seed, pairs_per_split,
    D: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """One part of z (float32) for BM rows from one split of a head's pairs. x: R x n (v Dx, before the
    relu); ahat = LN(a): h, R, d; Dy: h, d, M; E: n, d; z: splits, R, d. Grid: (row tiles, h x splits)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    splits = tl.num_programs(1) // H
    h, first = tl.program_id(1) // splits, (tl.program_id(1) % splits) * pairs_per_split
    half, cols = M // 2, tl.arange(0, D)
    in_rows = (rows < R)[:, None]
    a = tl.load(ahat_ptr + (h * R + rows).to(tl.int64)[:, None] * D + cols[None, :], mask=in_rows, other=0.0)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    for start in range(first, first + pairs_per_split, BP):
        p = start + tl.arange(0, BP)
        dy = dy_ptr + h * D * M + cols[:, None] * M + p[None, :]  # d, BP: the first halves
        zero = tl.zeros((BM, BP), dtype=tl.float32)
        ua, ub = dot(a, tl.load(dy), zero), dot(a, tl.load(dy + half), zero)
        offs = rows.to(tl.int64)[:, None] * (H * M) + h * M + p[None, :]
        xa = tl.load(x_ptr + offs, mask=in_rows, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + offs + half, mask=in_rows, other=0.0).to(tl.float32)
        ya, yb = relu(ua) * relu(xa), relu(ub) * relu(xb)
        if HAS_DROPOUT:
            ka, kb = keep_pair(seed, rows, h, p, half, M, H, p_drop)
            ya, yb = ya * ka, yb * kb
        e = e_ptr + (h * M + p).to(tl.int64)[:, None] * D + cols[None, :]  # BP, d: the first halves
        acc = dot(ya.to(tl.bfloat16), tl.load(e), acc)
        acc = dot(yb.to(tl.bfloat16), tl.load(e + half * D), acc)
    z = z_ptr + (tl.program_id(1) * R + rows).to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(z, acc, mask=in_rows)


@dataclass(frozen=True)
class GateTiles:
    """The kernel's tiles: rows, pairs a step, splits of each head's pairs, warps, stages."""

    BM: int = 64
    BP: int = 64
    splits: int = 4
    num_warps: int = 8
    num_stages: int = 2


TILES = GateTiles()


def gate_decoder(
    x: torch.Tensor, ahat: torch.Tensor, Dy: torch.Tensor, E: torch.Tensor, p_drop: float, seed: int,
    tiles: GateTiles | None = None,
) -> torch.Tensor:  # fmt: skip
    """z = (relu(ahat Dy) * relu(x) * keep) E, float32 R x d. x: R x n bf16 (v Dx, before the relu, pair
    order); ahat: h, R, d bf16; Dy: h, d, M bf16; E: n, d bf16; keep as _gate_kernel draws it."""
    t = tiles or TILES
    R, (H, D, M) = x.shape[0], Dy.shape
    half = M // 2
    BP = min(t.BP, half)
    splits = max(1, min(t.splits, half // BP))
    if half % (BP * splits):
        raise ValueError(f"{half} pairs a head do not split into {splits} parts of {BP}-pair tiles")
    z = torch.empty((H * splits, R, D), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(R, t.BM), H * splits)
    _gate_decoder_kernel[grid](
        x, ahat, Dy, E, z, R, M, H, p_drop, seed, half // splits, D=D, HAS_DROPOUT=p_drop > 0,
        BM=t.BM, BP=BP, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return z.sum(0)

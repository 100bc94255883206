"""The gate and the decoder of a layer with the neurons kept on chip (issue 29, part 1): the forward's
z = (relu(u) * relu(x) * keep) E with u = LN(a) Dy, tile by tile over the neurons, so that neither u
nor y (each B*T x n) is written to memory; and backward's gradient of the gate, with u and
g_y = g_z E^T made on chip and g_LN(a) = g_u Dy^T summed there. Their plain forms are what
fused_parallel.FusedNeurons did before: the products by cuBLAS through memory and a pass of
_gate_kernel or _gate_grad_kernel between them (tests/test_fused_gate.py holds each to its plain form,
dropout included).

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


@triton.jit
def _store_halves(ptr, half, mask, a, b):
    """A tile of pairs as bf16: its first halves at ptr, its second at ptr + half."""
    tl.store(ptr, a.to(tl.bfloat16), mask=mask)
    tl.store(ptr + half, b.to(tl.bfloat16), mask=mask)


@triton.jit
def _gate_grad_kernel(
    x_ptr, ahat_ptr, dy_ptr, e_ptr, gz_ptr, y_ptr, gu_ptr, gx_ptr, ga_ptr, R, M, H, p_drop, seed,
    pairs_per_split, D: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """From g_z, for BM rows and one split of a head's pairs: y (for dL/dE), g_u = dL/du (for dL/dDy),
    the gate's part of g_x (before the relu's mask) and one part of g_LN(a) = g_u Dy^T (float32). u and
    g_y are made on chip. x, y, g_u, g_x: R x n; ahat: h, R, d; g_z: R, d; ga: h x splits, R, d."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    splits = tl.num_programs(1) // H
    h, first = tl.program_id(1) // splits, (tl.program_id(1) % splits) * pairs_per_split
    half, cols = M // 2, tl.arange(0, D)
    in_rows = (rows < R)[:, None]
    a = tl.load(ahat_ptr + (h * R + rows).to(tl.int64)[:, None] * D + cols[None, :], mask=in_rows, other=0.0)
    g = tl.load(gz_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=in_rows, other=0.0)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    for start in range(first, first + pairs_per_split, BP):
        p = start + tl.arange(0, BP)
        zero = tl.zeros((BM, BP), dtype=tl.float32)
        dy = dy_ptr + h * D * M + cols[:, None] * M + p[None, :]  # d, BP: the first halves
        dya, dyb = tl.load(dy), tl.load(dy + half)
        e = e_ptr + (h * M + p).to(tl.int64)[:, None] * D + cols[None, :]  # BP, d
        ua, ub = dot(a, dya, zero), dot(a, dyb, zero)
        ga, gb = dot(g, tl.trans(tl.load(e)), zero), dot(g, tl.trans(tl.load(e + half * D)), zero)
        offs = rows.to(tl.int64)[:, None] * (H * M) + h * M + p[None, :]
        xa = relu(tl.load(x_ptr + offs, mask=in_rows, other=0.0).to(tl.float32))
        xb = relu(tl.load(x_ptr + offs + half, mask=in_rows, other=0.0).to(tl.float32))
        ya, yb = relu(ua) * xa, relu(ub) * xb
        if HAS_DROPOUT:
            ka, kb = keep_pair(seed, rows, h, p, half, M, H, p_drop)
            ya, yb, ga, gb = ya * ka, yb * kb, ga * ka, gb * kb  # g from here on: before dropout
        gua, gub = tl.where(ua > 0, ga * xa, 0.0), tl.where(ub > 0, gb * xb, 0.0)
        _store_halves(y_ptr + offs, half, in_rows, ya, yb)
        _store_halves(gu_ptr + offs, half, in_rows, gua, gub)
        _store_halves(gx_ptr + offs, half, in_rows, ga * relu(ua), gb * relu(ub))
        acc = dot(gua.to(tl.bfloat16), tl.trans(dya), acc)
        acc = dot(gub.to(tl.bfloat16), tl.trans(dyb), acc)
    out = ga_ptr + (tl.program_id(1) * R + rows).to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc, mask=in_rows)


@dataclass(frozen=True)
class GateTiles:
    """The kernel's tiles: rows, pairs a step, splits of each head's pairs, warps, stages."""

    BM: int = 64
    BP: int = 64
    splits: int = 4
    num_warps: int = 8
    num_stages: int = 2


TILES = GateTiles()  # the forward's
BACKWARD_TILES = GateTiles(BM=64, BP=32)


def gate_decoder(
    x: torch.Tensor, ahat: torch.Tensor, Dy: torch.Tensor, E: torch.Tensor, p_drop: float, seed: int,
    tiles: GateTiles | None = None,
) -> torch.Tensor:  # fmt: skip
    """z = (relu(ahat Dy) * relu(x) * keep) E, float32 R x d. x: R x n bf16 (v Dx, before the relu, pair
    order); ahat: h, R, d bf16; Dy: h, d, M bf16; E: n, d bf16; keep as _gate_kernel draws it."""
    t, (H, D, M) = tiles or TILES, Dy.shape
    BP, splits = _split(M // 2, t)
    z = torch.empty((H * splits, x.shape[0], D), device=x.device, dtype=torch.float32)
    _gate_decoder_kernel[(triton.cdiv(x.shape[0], t.BM), H * splits)](
        x, ahat, Dy, E, z, x.shape[0], M, H, p_drop, seed, M // 2 // splits, D=D, HAS_DROPOUT=p_drop > 0,
        BM=t.BM, BP=BP, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return z.sum(0)


def gate_grad(
    x: torch.Tensor, ahat: torch.Tensor, Dy: torch.Tensor, E: torch.Tensor, gz: torch.Tensor, p_drop: float,
    seed: int, tiles: GateTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gate's gradient from gz = dL/dz (R, d bf16), operands as gate_decoder's: y, g_u = dL/du,
    the gate's part of g_x (each R x n bf16, pair order) and g_LN(a) = g_u Dy^T (h, R, d float32)."""
    t, (H, D, M), R = tiles or BACKWARD_TILES, Dy.shape, x.shape[0]
    BP, splits = _split(M // 2, t)
    y, gu, gx = (torch.empty_like(x) for _ in range(3))
    ga = torch.empty((H * splits, R, D), device=x.device, dtype=torch.float32)
    _gate_grad_kernel[(triton.cdiv(R, t.BM), H * splits)](
        x, ahat, Dy, E, gz, y, gu, gx, ga, R, M, H, p_drop, seed, M // 2 // splits, D=D,
        HAS_DROPOUT=p_drop > 0, BM=t.BM, BP=BP, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return y, gu, gx, ga.view(H, splits, R, D).sum(1)


def _split(half: int, t: GateTiles) -> tuple[int, int]:
    """The pairs a step and the splits of a head's `half` pairs (each a whole number of steps)."""
    BP = min(t.BP, half)
    splits = max(1, min(t.splits, half // BP))
    if half % (BP * splits):
        raise ValueError(f"{half} pairs a head do not split into {splits} parts of {BP}-pair tiles")
    return BP, splits

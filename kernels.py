"""Fused Triton kernels for BDH-GPU's training step: the n-dimensional neurons stay out of memory.

`fused_forward(model, idx, targets)` computes what `BDH.forward` computes (the plain reference in
model.py, which stays the CPU path), with each layer's neuron work in four kernels:

    forward   _scores_kernel   S = RoPE(x) RoPE(x)^T            x = relu(v Dx) recomputed per tile
              _out_kernel      z = (relu(LN(a) Dy) * x * keep) E    keep: dropout, from a seed
    backward  _grad_y_kernel   y, g_u = dL/d(LN(a) Dy), g_x from the gate       (bf16, transient)
              _grad_x_kernel   g_x += RoPE^T(G RoPE(x)), times (x > 0)            G = dL/dS + its T

Forward keeps no B x T x n tensor; backward writes three bf16 ones per layer and frees them once
the weight gradients are taken (by cuBLAS). Operands are bf16, every product accumulates in float32.
The small parts (a = tril(S) v, the LayerNorms) stay in PyTorch, and autograd differentiates them.

RoPE rotates pairs of neurons. The kernels order each head's neurons as [first of every pair,
second of every pair] (the "half" layout; an "interleaved" model's weights are permuted into it),
so that a tile holds whole pairs. Windows of up to MAX_T bytes: one program sees a whole window.
On a GPU the three heaviest kernels autotune their tiles (*_CONFIGS); every candidate is tested.

`FusedStep` is the recurrent step (generation) in two kernels a layer: it reads Dx whole but, of
the state, Dy and E, only the rows of neurons that are non-zero. `BDH.step` is its reference.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model import BDH, BDHConfig, RecurrentState, layer_norm, rope_cos_sin, rope_frequencies

MAX_T = 128  # the longest window the fused kernels take (a T x T score tile per program)
# Triton's CPU interpreter (TRITON_INTERPRET=1, for the tests) multiplies bf16 wrongly: upcast there.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def _tuned(configs: list[triton.Config], key: list[str]):
    """Autotune over configs on a GPU (the fastest is kept per key); the first alone in the interpreter."""
    return triton.autotune(configs=configs[:1] if _INTERPRET else configs, key=key)


def _configs(*shapes: tuple[int, int, int, int]) -> list[triton.Config]:
    """(BR, BP, num_warps, num_stages) tuples as Triton configs."""
    return [triton.Config({"BR": r, "BP": p}, num_warps=w, num_stages=s) for r, p, w, s in shapes]


# Tiles tried on a GPU, (BR, BP, warps, stages); the first is the interpreter's. Equal results, other speed.
SCORES_CONFIGS = [
    triton.Config({"BP": p}, num_warps=w, num_stages=s)
    for p, w, s in ((64, 8, 3), (32, 8, 3), (64, 8, 2), (128, 8, 2), (32, 4, 3))
]
OUT_CONFIGS = _configs((64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2))
GRAD_Y_CONFIGS = _configs((128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (256, 32, 8, 2))


@triton.jit
def _dot(a, b, acc):
    """acc + a b: float32 accumulation (bf16 operands on tensor cores; float32 ones exactly, not tf32)."""
    if _INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _pair_products(
    a_ptr, a_rows, row_mask, w_ptr, cols_a, cols_b, col_mask, K, stride_k, stride_n,
    BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """A (BR x K, rows at a_rows) times W's columns cols_a and cols_b: two BR x BP float32 tiles."""
    acc_a = tl.zeros((BR, BP), dtype=tl.float32)
    acc_b = tl.zeros((BR, BP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_mask = kk < K
        a = tl.load(
            a_ptr + a_rows[:, None] + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w_mask = k_mask[:, None] & col_mask[None, :]
        wa = tl.load(w_ptr + kk[:, None] * stride_k + cols_a[None, :] * stride_n, mask=w_mask, other=0.0)
        wb = tl.load(w_ptr + kk[:, None] * stride_k + cols_b[None, :] * stride_n, mask=w_mask, other=0.0)
        acc_a = _dot(a, wa, acc_a)
        acc_b = _dot(a, wb, acc_b)
    return acc_a, acc_b


@triton.jit
def _rope_pairs(xa, xb, cos_ptr, sin_ptr, t, t_mask, p, p_mask, half):
    """RoPE of the pair halves xa, xb (T x BP) at positions t: bf16 ra, rb and the cos, sin tiles."""
    offs = t[:, None] * half + p[None, :]
    mask = t_mask[:, None] & p_mask[None, :]
    c = tl.load(cos_ptr + offs, mask=mask, other=0.0)
    s = tl.load(sin_ptr + offs, mask=mask, other=0.0)
    return (xa * c - xb * s).to(tl.bfloat16), (xb * c + xa * s).to(tl.bfloat16), c, s


@triton.jit
def _keep_scale(seed, rows, cols, N, p_drop):
    """Inverted dropout: 1 / (1 - p) where the neuron is kept, 0 where dropped. Same in fwd and bwd."""
    u = tl.rand(seed, rows[:, None] * N + cols[None, :])
    return tl.where(u >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@_tuned(SCORES_CONFIGS, ["B", "T", "D", "M", "H"])
@triton.jit
def _scores_kernel(
    v_ptr, dx_ptr, cos_ptr, sin_ptr, s_ptr, B, T, D, M, H, n_split,
    T_PAD: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """S[split, b, h] = sum over this split's pair tiles of RoPE(x) RoPE(x)^T, x = relu(v_b Dx_h)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    half = M // 2
    t = tl.arange(0, T_PAD)
    t_mask = t < T
    acc = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
    tiles_per_split = tl.cdiv(tl.cdiv(half, BP), n_split)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(half, BP))
    for k in range(first, last):
        p = k * BP + tl.arange(0, BP)
        p_mask = p < half
        xa, xb = _pair_products(
            v_ptr, (b * T + t) * D, t_mask, dx_ptr + h * D * M, p, p + half, p_mask, D, M, 1, T_PAD, BK, BP
        )
        xa = tl.maximum(xa, 0.0)
        xb = tl.maximum(xb, 0.0)
        ra, rb, _, _ = _rope_pairs(xa, xb, cos_ptr, sin_ptr, t, t_mask, p, p_mask, half)
        acc = _dot(ra, tl.trans(ra), acc)
        acc = _dot(rb, tl.trans(rb), acc)
    out = s_ptr + ((split * B * H + bh) * T + t[:, None]) * T + t[None, :]
    tl.store(out, acc, mask=t_mask[:, None] & t_mask[None, :])


@_tuned(OUT_CONFIGS, ["R", "D", "M", "H"])
@triton.jit
def _out_kernel(
    v_ptr, ah_ptr, dx_ptr, dy_ptr, e_ptr, z_ptr, R, D, M, H, n_split, p_drop, seed,
    HAS_DROPOUT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """z[split, rows] = sum over this split's tiles of (relu(LN(a) Dy) * relu(v Dx) * keep) E."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    split = tl.program_id(1)
    r_mask = rows < R
    half = M // 2
    tiles_per_head = tl.cdiv(half, BP)
    dcol = tl.arange(0, D_PAD)
    d_mask = dcol < D
    acc = tl.zeros((BR, D_PAD), dtype=tl.float32)
    tiles_per_split = tl.cdiv(H * tiles_per_head, n_split)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, H * tiles_per_head)
    for tile in range(first, last):
        h = tile // tiles_per_head
        p = (tile % tiles_per_head) * BP + tl.arange(0, BP)
        p_mask = p < half
        w_off = h * D * M
        xa, xb = _pair_products(
            v_ptr, rows * D, r_mask, dx_ptr + w_off, p, p + half, p_mask, D, M, 1, BR, BK, BP
        )
        ua, ub = _pair_products(
            ah_ptr, (rows * H + h) * D, r_mask, dy_ptr + w_off, p, p + half, p_mask, D, M, 1, BR, BK, BP
        )
        ya = tl.maximum(ua, 0.0) * tl.maximum(xa, 0.0)
        yb = tl.maximum(ub, 0.0) * tl.maximum(xb, 0.0)
        if HAS_DROPOUT:
            ya *= _keep_scale(seed, rows, h * M + p, H * M, p_drop)
            yb *= _keep_scale(seed, rows, h * M + p + half, H * M, p_drop)
        e_mask = p_mask[:, None] & d_mask[None, :]
        ea = tl.load(e_ptr + (h * M + p)[:, None] * D + dcol[None, :], mask=e_mask, other=0.0)
        eb = tl.load(e_ptr + (h * M + p + half)[:, None] * D + dcol[None, :], mask=e_mask, other=0.0)
        acc = _dot(ya.to(tl.bfloat16), ea, acc)
        acc = _dot(yb.to(tl.bfloat16), eb, acc)
    tl.store(
        z_ptr + (split * R + rows)[:, None] * D + dcol[None, :], acc, mask=r_mask[:, None] & d_mask[None, :]
    )


@_tuned(GRAD_Y_CONFIGS, ["R", "D", "M", "H"])
@triton.jit
def _grad_y_kernel(
    v_ptr, ah_ptr, gz_ptr, dx_ptr, dy_ptr, e_ptr, y_ptr, gu_ptr, gx_ptr, R, D, M, H, p_drop, seed,
    HAS_DROPOUT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """Recompute x, u = LN(a) Dy and g_y = g_z E^T on one tile; write y, g_u and g_x (the gate's part)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_mask = rows < R
    half = M // 2
    tiles_per_head = tl.cdiv(half, BP)
    h = tl.program_id(1) // tiles_per_head
    p = (tl.program_id(1) % tiles_per_head) * BP + tl.arange(0, BP)
    p_mask = p < half
    w_off = h * D * M
    xa, xb = _pair_products(v_ptr, rows * D, r_mask, dx_ptr + w_off, p, p + half, p_mask, D, M, 1, BR, BK, BP)
    ua, ub = _pair_products(
        ah_ptr, (rows * H + h) * D, r_mask, dy_ptr + w_off, p, p + half, p_mask, D, M, 1, BR, BK, BP
    )
    # g_y = g_z E^T: E is (n, d), so E^T's column j is E's row h*M + j
    ga, gb = _pair_products(
        gz_ptr, rows * D, r_mask, e_ptr + h * M * D, p, p + half, p_mask, D, 1, D, BR, BK, BP
    )
    xa = tl.maximum(xa, 0.0)
    xb = tl.maximum(xb, 0.0)
    ya = tl.maximum(ua, 0.0) * xa  # y = relu(u) * x, then dropout
    yb = tl.maximum(ub, 0.0) * xb
    if HAS_DROPOUT:
        ka = _keep_scale(seed, rows, h * M + p, H * M, p_drop)
        kb = _keep_scale(seed, rows, h * M + p + half, H * M, p_drop)
        ya *= ka
        yb *= kb
        ga *= ka  # from here on, g_y is the gradient of the gate before dropout
        gb *= kb
    out_a = rows[:, None] * (H * M) + (h * M + p)[None, :]
    out_mask = r_mask[:, None] & p_mask[None, :]
    tl.store(y_ptr + out_a, ya.to(tl.bfloat16), mask=out_mask)
    tl.store(y_ptr + out_a + half, yb.to(tl.bfloat16), mask=out_mask)
    tl.store(gu_ptr + out_a, tl.where(ua > 0, ga * xa, 0.0).to(tl.bfloat16), mask=out_mask)
    tl.store(gu_ptr + out_a + half, tl.where(ub > 0, gb * xb, 0.0).to(tl.bfloat16), mask=out_mask)
    tl.store(gx_ptr + out_a, (ga * tl.maximum(ua, 0.0)).to(tl.bfloat16), mask=out_mask)
    tl.store(gx_ptr + out_a + half, (gb * tl.maximum(ub, 0.0)).to(tl.bfloat16), mask=out_mask)


@triton.jit
def _grad_x_kernel(
    v_ptr, dx_ptr, cos_ptr, sin_ptr, g_ptr, gx_ptr, T, D, M, H,
    T_PAD: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """g_x += RoPE^T(G RoPE(x)) on one (window, head, pair tile), then g_x *= (x > 0), in place."""
    b = tl.program_id(0)
    half = M // 2
    tiles_per_head = tl.cdiv(half, BP)
    h = tl.program_id(1) // tiles_per_head
    p = (tl.program_id(1) % tiles_per_head) * BP + tl.arange(0, BP)
    p_mask = p < half
    t = tl.arange(0, T_PAD)
    t_mask = t < T
    xa, xb = _pair_products(
        v_ptr, (b * T + t) * D, t_mask, dx_ptr + h * D * M, p, p + half, p_mask, D, M, 1, T_PAD, BK, BP
    )
    ra, rb, c, s = _rope_pairs(
        tl.maximum(xa, 0.0), tl.maximum(xb, 0.0), cos_ptr, sin_ptr, t, t_mask, p, p_mask, half
    )
    cs_mask = t_mask[:, None] & p_mask[None, :]
    g_offs = ((b * H + h) * T + t[:, None]) * T + t[None, :]
    G = tl.load(g_ptr + g_offs, mask=t_mask[:, None] & t_mask[None, :], other=0.0).to(tl.bfloat16)
    gra = _dot(G, ra, tl.zeros((T_PAD, BP), dtype=tl.float32))  # T, BP   dL/dRoPE(x)
    grb = _dot(G, rb, tl.zeros((T_PAD, BP), dtype=tl.float32))
    out_a = (b * T + t)[:, None] * (H * M) + (h * M + p)[None, :]
    gxa = tl.load(gx_ptr + out_a, mask=cs_mask, other=0.0).to(tl.float32) + gra * c + grb * s
    gxb = tl.load(gx_ptr + out_a + half, mask=cs_mask, other=0.0).to(tl.float32) + grb * c - gra * s
    tl.store(gx_ptr + out_a, tl.where(xa > 0, gxa, 0.0).to(tl.bfloat16), mask=cs_mask)
    tl.store(gx_ptr + out_a + half, tl.where(xb > 0, gxb, 0.0).to(tl.bfloat16), mask=cs_mask)


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def _splits(programs: int, tiles: int, target: int) -> int:
    """How many splits of a reduction of `tiles` tiles make programs * splits reach about `target`."""
    splits = max(1, min(tiles, math.ceil(target / max(programs, 1))))
    return math.ceil(tiles / math.ceil(tiles / splits))  # none left empty


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def scores(v: torch.Tensor, Dx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """S = RoPE(x) RoPE(x)^T per window and head, x = relu(v Dx). v: B, T, d. Returns B, h, T, T fp32."""
    B, T, D = v.shape
    H, _, M = Dx.shape
    tiles = triton.cdiv(M // 2, 64)  # splits sized for 64-pair tiles; the tuned tile may differ
    n_split = _splits(B * H, tiles, _target_programs(v.device))
    part = torch.empty((n_split, B, H, T, T), device=v.device, dtype=torch.float32)
    _scores_kernel[(B * H, n_split)](
        v, Dx, cos, sin, part, B, T, D, M, H, n_split, T_PAD=_pow2(T), BK=min(64, _pow2(D)),
    )  # fmt: skip
    return part.sum(0) if n_split > 1 else part[0]


def gated_output(
    v: torch.Tensor, ahat: torch.Tensor, Dx: torch.Tensor, Dy: torch.Tensor, E: torch.Tensor,
    p_drop: float, seed: int,
) -> torch.Tensor:  # fmt: skip
    """z = (relu(ahat Dy) * relu(v Dx) * keep) E. v: R, d; ahat: R, h, d. Returns R, d float32."""
    R, D = v.shape
    H, _, M = Dx.shape
    tiles = H * triton.cdiv(M // 2, 64)  # splits sized for 64 x 64 tiles; the tuned tile may differ
    n_split = _splits(triton.cdiv(R, 64), tiles, _target_programs(v.device))
    part = torch.empty((n_split, R, D), device=v.device, dtype=torch.float32)
    _out_kernel[lambda meta: (triton.cdiv(R, meta["BR"]), n_split)](
        v, ahat, Dx, Dy, E, part, R, D, M, H, n_split, p_drop, seed,
        HAS_DROPOUT=p_drop > 0, BK=min(64, _pow2(D)), D_PAD=_pow2(D),
    )  # fmt: skip
    return part.sum(0) if n_split > 1 else part[0]


class FusedNeurons(torch.autograd.Function):
    """z = (relu(LN(tril(S) v) Dy) * x * keep) E with S = RoPE(x) RoPE(x)^T, x = relu(v Dx): one layer's
    neuron work, for windows of up to MAX_T bytes. Inputs bf16, neurons in the kernels' pair order."""

    @staticmethod
    def forward(ctx, v, Dx, Dy, E, cos, sin, p_drop: float, seed: int):  # v: B, T, d bf16
        B, T, D = v.shape
        S = scores(v, Dx, cos, sin)  # B, h, T, T
        ahat = layer_norm(S.tril(-1) @ v.unsqueeze(1).float())  # B, h, T, d
        ahat = ahat.transpose(1, 2).to(torch.bfloat16).contiguous()  # B, T, h, d
        z = gated_output(v.view(B * T, D), ahat.view(B * T, -1, D), Dx, Dy, E, p_drop, seed)
        ctx.save_for_backward(v, Dx, Dy, E, cos, sin, S)
        ctx.p_drop, ctx.seed = p_drop, seed
        return z.view(B, T, D)

    @staticmethod
    def backward(ctx, gz):
        v, Dx, Dy, E, cos, sin, S = ctx.saved_tensors
        B, T, D = v.shape
        H, _, M = Dx.shape
        R, N = B * T, H * M
        with torch.enable_grad():  # the small PyTorch part, recomputed and differentiated by autograd
            S_ = S.detach().requires_grad_()
            v_ = v.detach().float().requires_grad_()
            ahat_ = layer_norm(S_.tril(-1) @ v_.unsqueeze(1))  # B, h, T, d
        ahat = ahat_.detach().transpose(1, 2).to(torch.bfloat16).contiguous()  # B, T, h, d
        gz = gz.reshape(R, D).to(torch.bfloat16).contiguous()
        y, gu, gx = (torch.empty((R, N), device=v.device, dtype=torch.bfloat16) for _ in range(3))
        _grad_y_kernel[lambda meta: (triton.cdiv(R, meta["BR"]), H * triton.cdiv(M // 2, meta["BP"]))](
            v, ahat, gz, Dx, Dy, E, y, gu, gx, R, D, M, H, ctx.p_drop, ctx.seed,
            HAS_DROPOUT=ctx.p_drop > 0, BK=min(64, _pow2(D)),
        )  # fmt: skip
        gE = y.mT @ gz  # n, d
        del y
        gu_h = gu.view(R, H, M).transpose(0, 1)  # h, R, M
        gahat = (gu_h @ Dy.mT).transpose(0, 1).reshape(B, T, H, D)  # B, T, h, d
        gDy = ahat.view(R, H, D).transpose(0, 1).mT @ gu_h  # h, d, M
        del gu, gu_h
        torch.autograd.backward(ahat_, gahat.transpose(1, 2).float())
        G = S_.grad + S_.grad.mT  # B, h, T, T   S is symmetric in RoPE(x)
        BP = min(32, _pow2(M // 2))
        _grad_x_kernel[(B, H * triton.cdiv(M // 2, BP))](
            v,
            Dx,
            cos,
            sin,
            G.contiguous(),
            gx,
            T,
            D,
            M,
            H,
            T_PAD=_pow2(T),
            BK=min(64, _pow2(D)),
            BP=BP,
            num_warps=8,
        )
        gx_h = gx.view(R, H, M).transpose(0, 1)  # h, R, M
        gDx = v.view(R, D).mT @ gx_h  # h, d, M
        gv = v_.grad.view(R, D) + (gx_h @ Dx.mT).sum(0)  # R, d
        return gv.view(B, T, D).to(v.dtype), gDx, gDy, gE, None, None, None, None


class Fused(torch.nn.Module):
    """A BDH called through the fused kernels, for loops that call module(idx, targets)."""

    def __init__(self, model: BDH) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets, fused=True)


def pair_order(model: BDH) -> torch.Tensor:
    """Neuron order of the kernels: per head, the first of every RoPE pair, then the second."""
    cfg = model.config
    m = cfg.head_size
    if cfg.rope_style == "half":
        local = torch.arange(m)
    else:
        local = torch.cat((torch.arange(0, m, 2), torch.arange(1, m, 2)))
    return torch.cat([h * m + local for h in range(cfg.n_head)]).to(model.E.device)


def first_of_pairs(cfg: BDHConfig) -> slice:
    """Which of a head's n/h dimensions come first in their RoPE pair (each pair has one angle)."""
    return slice(0, None, 2) if cfg.rope_style == "interleaved" else slice(0, cfg.head_size // 2)


def pair_cos_sin(model: BDH, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every pair's angle at positions 0..T-1, each (T, n/2h) float32."""
    cos, sin = rope_cos_sin(model.config, torch.arange(T, device=device))  # T, n/h: per dimension
    first = first_of_pairs(model.config)
    return cos[:, first].contiguous(), sin[:, first].contiguous()


def fused_forward(
    model: BDH, idx: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BDH.forward through the fused kernels (bf16 operands, float32 accumulation). idx: B, T <= MAX_T."""
    cfg = model.config
    B, T = idx.shape
    if T > MAX_T:
        raise ValueError(f"the fused kernels take windows of up to {MAX_T} bytes, got {T}")
    if B * T * cfg.n_neurons >= 2**31:
        raise ValueError(f"batch x window x neurons must stay under 2**31, got {B} x {T} x {cfg.n_neurons}")
    order = pair_order(model)
    m = cfg.head_size
    local = order[:m]
    bf16 = torch.bfloat16
    Dx = model.Dx[:, :, local].to(bf16).contiguous()  # h, d, M   (pair order)
    Dy = model.Dy[:, :, local].to(bf16).contiguous()
    E = model.E[order].to(bf16).contiguous()  # n, d
    cos, sin = pair_cos_sin(model, T, idx.device)
    p_drop = model.active_dropout
    with torch.autocast(idx.device.type, enabled=False):  # the kernels choose their own precision
        return _layers(model, idx, targets, Dx, Dy, E, cos, sin, p_drop)


def _layers(model, idx, targets, Dx, Dy, E, cos, sin, p_drop):
    bf16 = torch.bfloat16
    v = layer_norm(model.embed(idx).float())  # B, T, d
    for _ in range(model.config.n_layer):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p_drop > 0 else 0
        z = FusedNeurons.apply(v.to(bf16), Dx, Dy, E, cos, sin, p_drop, seed)  # B, T, d
        v = layer_norm(v + layer_norm(z))
    logits = (v.to(bf16) @ model.readout.to(bf16)).float()  # B, T, V
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return logits, loss


# The recurrent step (generation): one byte per call, two kernels a layer, sparse reads.
#
#     _step_attention_kernel  x = relu(v Dx); a_part = RoPE(x) S; S += RoPE(x)^T v   (live rows of S)
#                             the last program of a head: a = sum of the parts, LN(a)
#     _step_gate_kernel       y = relu(LN(a) Dy) * x; z_part = y E      (rows of Dy^T, E where x, y > 0)
#                             the last program of a batch row: v <- LN(v + LN(sum of the z parts))
#
# Only Dx is read whole; of the state, Dy and E only the rows of live neurons are read (x is
# sparse, y sparser). The sums over programs happen inside the kernels: each program stores its
# part and takes a ticket from an atomic counter; the last of every GROUP parts sums them, and the
# last of the groups sums those (_finish_sum). The order of every addition is fixed, so the step is
# deterministic. No host synchronisation, so the whole step can be one CUDA graph. On Hopper and
# later each kernel is a programmatic dependent launch: it starts while the kernel before it ends
# (the attention kernel reads its columns of Dx meanwhile) and waits for it before reading what it
# wrote. The tiles (FusedStep.*_TILES) are the fastest of a sweep on an H100
# (results/benchmark/step_tiles.py).

BATCH_TILE = 16  # batch rows per attention program (the fewest rows tl.dot takes); each Dx tile read once


@triton.jit
def _relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does (tl.maximum alone would return 0)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _last_to_arrive(count_ptr, arrivals):
    """Whether this program is the last of `arrivals` to arrive at count_ptr (an int32, zero before).
    Whatever the others stored before arriving is then visible to it (read it with .cg)."""
    tl.debug_barrier()  # all this program's stores are made before its arrival (released, GPU scope)
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    tl.debug_barrier()
    return ticket == arrivals - 1


@triton.jit
def _sum_parts(ptr, n, D, ROWS: tl.constexpr, D_PAD: tl.constexpr):
    """The sum of n <= ROWS rows of D float32 values at ptr that other programs stored (read from L2)."""
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    mask = (r < n)[:, None] & (d < D)[None, :]
    return tl.sum(tl.load(ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0, cache_modifier=".cg"), 0)


@triton.jit
def _layer_norm_row(z, mask, D):
    """LayerNorm without weight or bias (eps 1e-5, as F.layer_norm) of a float32 row of D values."""
    mean = tl.sum(z, 0) / D
    centred = tl.where(mask, z - mean, 0.0)
    return centred * tl.rsqrt(tl.sum(centred * centred, 0) / D + 1e-5)


@triton.jit
def _finish_sum(
    parts_ptr, groups_ptr, count_ptr, out_ptr, part, n_parts, row0, row_stride, rows, D,
    RESIDUAL: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Called by every program once it has stored part `part` (of n_parts) of each of its rows.

    parts: (row, n_parts, D); groups: (row, cdiv(n_parts, GROUP) <= GROUPS, D); count_ptr: that many
    counters plus one, zero (and zero again after the kernel). The last program of each GROUP parts
    sums them; the last of the groups sums the groups: out[row] = LN(total), or with RESIDUAL (one
    row only) out[row] = LN(out[row] + LN(total)).
    """
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    if RESIDUAL:  # loaded by every program, so that the last one need not wait for it (rows == 1)
        v = tl.load(out_ptr + row0 * D + d, mask=d_mask, other=0.0)
    n_groups = tl.cdiv(n_parts, GROUP)
    group = part // GROUP
    first = group * GROUP
    size = tl.minimum(GROUP, n_parts - first)
    if _last_to_arrive(count_ptr + group, size):
        tl.store(count_ptr + group, 0)  # no one else uses it in this launch: zero for the next one
        for i in range(rows):
            row = row0 + i * row_stride
            s = _sum_parts(parts_ptr + (row * n_parts + first) * D, size, D, GROUP, D_PAD)
            tl.store(groups_ptr + (row * n_groups + group) * D + d, s, mask=d_mask)
        if _last_to_arrive(count_ptr + n_groups, n_groups):
            tl.store(count_ptr + n_groups, 0)
            for i in range(rows):
                row = row0 + i * row_stride
                total = _sum_parts(groups_ptr + row * n_groups * D, n_groups, D, GROUPS, D_PAD)
                total = _layer_norm_row(total, d_mask, D)
                if RESIDUAL:
                    total = _layer_norm_row(v + total, d_mask, D)
                tl.store(out_ptr + row * D + d, total, mask=d_mask)


@triton.jit
def _step_attention_kernel(
    v_ptr, dx_ptr, freq_ptr, pos_ptr, s_ptr, x_ptr, a_ptr, groups_ptr, count_ptr, ln_ptr, B, H, M, D,
    INTERLEAVED: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """For BP rotation pairs of head h and BB batch rows: x = relu(v Dx), then per row a_part = RoPE(x) S
    (old S) and S += RoPE(x)^T v. The last program of the head writes LN(a), a the sum of the parts.
    PDL: launched while the previous kernel ends; its columns of Dx are read before waiting for it."""
    tile_h = tl.program_id(0)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    b0 = (tile_h // H) * BB
    h = tile_h % H
    half = M // 2
    bb = b0 + tl.arange(0, BB)
    c = tl.arange(0, 2 * BP)  # the 2 BP neurons of BP pairs, each pair's two members side by side
    p_of_c = block * BP + c // 2
    if INTERLEAVED:  # the model's neuron index of each column
        j = 2 * p_of_c + c % 2
    else:
        j = p_of_c + (c % 2) * half
    k = tl.arange(0, D_PAD)
    w_mask = (k < D)[:, None] & (p_of_c < half)[None, :]
    w = tl.load(dx_ptr + (h * D + k)[:, None] * M + j[None, :], mask=w_mask, other=0.0)  # D, 2 BP of Dx
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the gate kernel may start (it waits for this one)
        tl.extra.cuda.gdc_wait()  # the previous kernel has finished: v is written
    v_mask = (bb < B)[:, None] & (k < D)[None, :]
    v_rows = tl.load(v_ptr + bb[:, None] * D + k[None, :], mask=v_mask, other=0.0)  # BB, D
    x = _relu(_dot(v_rows.to(w.dtype), w, tl.zeros((BB, 2 * BP), dtype=tl.float32)))  # BB, 2 BP
    x_mask = (bb < B)[:, None] & (p_of_c < half)[None, :]
    tl.store(x_ptr + (bb * H + h)[:, None] * M + j[None, :], x, mask=x_mask)
    xa, xb = tl.split(tl.reshape(x, (BB, BP, 2)))  # BB, BP: first and second members of the pairs
    p = block * BP + tl.arange(0, BP)
    p_mask = p < half
    phase = tl.load(pos_ptr).to(tl.float32) * tl.load(freq_ptr + p, mask=p_mask, other=0.0)  # turns
    angle = (phase - tl.floor(phase)) * 6.283185307179586
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    ra = xa * cos - xb * sin
    rb = xb * cos + xa * sin
    if INTERLEAVED:
        ja = 2 * p
        jb = ja + 1
    else:
        ja = p
        jb = p + half
    rows = tl.minimum(BB, B - b0)
    for i in range(rows):  # each batch row has its own state
        pick = (tl.arange(0, BB) == i)[:, None]
        ra_i = tl.sum(tl.where(pick, ra, 0.0), 0)  # BP
        rb_i = tl.sum(tl.where(pick, rb, 0.0), 0)
        live_a = p_mask & (ra_i != 0.0)  # rows where RoPE(x) is zero are neither read nor written
        live_b = p_mask & (rb_i != 0.0)
        bh = (b0 + i) * H + h
        for d0 in range(0, D, BD):  # BD columns of the state rows at a time
            d = d0 + tl.arange(0, BD)
            d_mask = d < D
            v = tl.load(v_ptr + (b0 + i) * D + d, mask=d_mask, other=0.0)
            rows_a = s_ptr + (bh * M + ja)[:, None] * D + d[None, :]
            rows_b = s_ptr + (bh * M + jb)[:, None] * D + d[None, :]
            mask_a = live_a[:, None] & d_mask[None, :]
            mask_b = live_b[:, None] & d_mask[None, :]
            Sa = tl.load(rows_a, mask=mask_a, other=0.0)
            Sb = tl.load(rows_b, mask=mask_b, other=0.0)
            part = tl.sum(ra_i[:, None] * Sa, 0) + tl.sum(rb_i[:, None] * Sb, 0)
            tl.store(a_ptr + (bh * blocks + block) * D + d, part, mask=d_mask)
            tl.store(rows_a, Sa + ra_i[:, None] * v[None, :], mask=mask_a)
            tl.store(rows_b, Sb + rb_i[:, None] * v[None, :], mask=mask_b)
    count_ptr += tile_h * (tl.cdiv(blocks, GROUP) + 1)  # this (batch tile, head)'s counters
    _finish_sum(
        a_ptr, groups_ptr, count_ptr, ln_ptr, block, blocks, b0 * H + h, H, rows, D,
        RESIDUAL=False, GROUP=GROUP, GROUPS=GROUPS, D_PAD=D_PAD,
    )  # fmt: skip


@triton.jit
def _step_gate_kernel(
    ln_ptr, x_ptr, dyt_ptr, e_ptr, z_ptr, groups_ptr, count_ptr, v_ptr, H, M, D,
    BN: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, D_PAD: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """For BN neurons of head h: y = relu(LN(a) Dy) * x, z_part = y E (rows where x, y > 0). The
    last program of the batch row writes v <- LN(v + LN(z)), z the sum of the parts of all heads.
    PDL: launched while the attention kernel ends, and waits for it."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    b = bh // H
    h = bh % H
    j = block * BN + tl.arange(0, BN)
    x = tl.load(x_ptr + bh * M + j, mask=j < M, other=0.0)
    rows = (h * M + j)[:, None] * D  # Dy^T (h*M, d) and E (n, d) share the row index
    y = tl.zeros((BN,), dtype=tl.float32)  # LN(a) Dy, BD columns of Dy^T's live rows at a time
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        ln_a = tl.load(ln_ptr + bh * D + d, mask=d < D, other=0.0)
        live = (x > 0.0)[:, None] & (d < D)[None, :]
        dyt = tl.load(dyt_ptr + rows + d[None, :], mask=live, other=0.0).to(tl.float32)
        y += tl.sum(dyt * ln_a[None, :], 1)
    y = _relu(y) * x  # BN; sparser than x
    part = z_ptr + (bh * blocks + block) * D  # part h * blocks + block of batch row b
    for d0 in range(0, D, BD):  # z_part = y E, BD columns of E's live rows at a time
        d = d0 + tl.arange(0, BD)
        live = (y != 0.0)[:, None] & (d < D)[None, :]
        e = tl.load(e_ptr + rows + d[None, :], mask=live, other=0.0).to(tl.float32)
        tl.store(part + d, tl.sum(y[:, None] * e, 0), mask=d < D)
    count_ptr += b * (tl.cdiv(H * blocks, GROUP) + 1)  # this batch row's counters
    _finish_sum(
        z_ptr, groups_ptr, count_ptr, v_ptr, h * blocks + block, H * blocks, b, 1, 1, D,
        RESIDUAL=True, GROUP=GROUP, GROUPS=GROUPS, D_PAD=D_PAD,
    )  # fmt: skip


@triton.jit
def _step_embed_kernel(
    byte_ptr, embed_ptr, v_ptr, pos_ptr, pos_now_ptr, D, D_PAD: tl.constexpr, PDL: tl.constexpr
):  # fmt: skip
    """v = LN(embedding of the byte), float32, for one batch row; the first also moves the position on
    (pos_now: this byte's position, which the attention kernels read)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the first attention kernel may start reading Dx
    b = tl.program_id(0)
    if b == 0:
        pos = tl.load(pos_ptr)
        tl.store(pos_now_ptr, pos)
        tl.store(pos_ptr, pos + 1)
    d = tl.arange(0, D_PAD)
    row = tl.load(byte_ptr + b)
    e = tl.load(embed_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(v_ptr + b * D + d, _layer_norm_row(e, d < D, D), mask=d < D)


class FusedStep:
    """BDH.step through the step kernels: logits (B, V) after one more byte; the state in place.

    Holds the weights in the layouts the kernels read (Dy transposed, so that a neuron's row is
    contiguous) in the model's dtype; every sum is float32. Inference only: no dropout.
    """

    # pairs, state columns; parts a group (see _finish_sum)
    ATTENTION_TILES = {"BP": 32, "BD": 64, "GROUP": 16, "num_warps": 2}
    GATE_TILES = {"BN": 64, "BD": 128, "GROUP": 32, "num_warps": 2}  # neurons, columns; parts a group

    def __init__(self, model: BDH, attention: dict | None = None, gate: dict | None = None) -> None:
        """attention, gate: tiles that replace some of ATTENTION_TILES, GATE_TILES (kernel arguments)."""
        cfg = model.config
        if model.active_dropout > 0:
            raise ValueError(
                "FusedStep applies no dropout: call model.eval() first (BDH.step would apply it)"
            )
        self.config = cfg
        self.attention = {**self.ATTENTION_TILES, **(attention or {})}
        self.gate = {**self.GATE_TILES, **(gate or {})}
        self.embed, self.readout = model.embed.weight, model.readout
        self.Dx = model.Dx.contiguous()  # h, d, M
        self.DyT = model.Dy.mT.contiguous()  # h, M, d
        self.E = model.E.contiguous()  # n, d
        freq = rope_frequencies(cfg, model.E.device)  # M: both members of a pair share a frequency
        self.pair_freq = freq[first_of_pairs(cfg)].contiguous()  # M/2, turns per position
        self.counts: dict[int, torch.Tensor] = {}  # per batch size: the sums' counters, zero between kernels
        # Programmatic dependent launch (Hopper on): each kernel starts while the one before ends
        dev = model.E.device
        self.pdl = dev.type == "cuda" and not _INTERPRET and torch.cuda.get_device_capability(dev)[0] >= 9

    def __call__(self, byte: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        cfg = self.config
        B, H, M, D = state.layers[0].shape
        att, gate = self.attention, self.gate
        att_blocks = triton.cdiv(M // 2, att["BP"])  # parts of each (batch row, head)'s a
        gate_blocks = triton.cdiv(M, gate["BN"])  # parts of each head's share of z
        att_groups = triton.cdiv(att_blocks, att["GROUP"])
        gate_groups = triton.cdiv(H * gate_blocks, gate["GROUP"])
        tiles = triton.cdiv(B, BATCH_TILE)
        att_counts = tiles * H * (att_groups + 1)
        dev = state.pos.device
        if B not in self.counts:  # made once (before any CUDA graph captures the step)
            self.counts[B] = torch.zeros(att_counts + B * (gate_groups + 1), device=dev, dtype=torch.int32)
        counts = self.counts[B]
        f32 = torch.float32
        v = torch.empty((B, D), device=dev, dtype=f32)
        x = torch.empty((B, H, M), device=dev, dtype=f32)
        a_parts = torch.empty((B * H, att_blocks, D), device=dev, dtype=f32)
        a_groups = torch.empty((B * H, att_groups, D), device=dev, dtype=f32)
        ln_a = torch.empty((B * H, D), device=dev, dtype=f32)
        z_parts = torch.empty((B, H * gate_blocks, D), device=dev, dtype=f32)
        z_groups = torch.empty((B, gate_groups, D), device=dev, dtype=f32)
        pos_now = torch.empty((), device=dev, dtype=state.pos.dtype)
        _step_embed_kernel[(B,)](byte, self.embed, v, state.pos, pos_now, D, D_PAD=_pow2(D), PDL=self.pdl)
        for S in state.layers:  # B, h, M, d float32
            _step_attention_kernel[(tiles * H, att_blocks)](
                v, self.Dx, self.pair_freq, pos_now, S, x, a_parts, a_groups, counts, ln_a, B, H, M, D,
                INTERLEAVED=cfg.rope_style == "interleaved", BB=BATCH_TILE, GROUPS=_pow2(att_groups, 1),
                D_PAD=_pow2(D), PDL=self.pdl, launch_pdl=self.pdl, **att,
            )  # fmt: skip
            _step_gate_kernel[(B * H, gate_blocks)](
                ln_a, x, self.DyT, self.E, z_parts, z_groups, counts[att_counts:], v, H, M, D,
                GROUPS=_pow2(gate_groups, 1), D_PAD=_pow2(D), PDL=self.pdl, launch_pdl=self.pdl, **gate,
            )  # fmt: skip
        return v.to(self.readout.dtype) @ self.readout  # B, V

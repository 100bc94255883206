"""Triton kernels for BDH-GPU's training step and its recurrent step (generation).

`fused_forward(model, idx, targets)` computes what `BDH.forward` computes (the plain reference in
model.py, which stays the CPU path and knows nothing of this file). cuBLAS runs each layer's
matrix products in bf16 with float32 sums; four Triton kernels do everything between them, one pass
each over a B*T x n tensor (and a fifth, _mirror_kernel, one over the B x h x T x T gradient of the
scores):

    forward   x = v Dx                  cuBLAS     (before the relu)
              _rope_kernel              RoPE(relu(x)), per head
              S = tril(RoPE(x) RoPE(x)^T, -1) (times the decay weights with decay), a = S v, LN(a),
              u = LN(a) Dy                                                       cuBLAS and PyTorch
              _gate_kernel              y = relu(u) * relu(x) * keep     keep: dropout, from a seed
              z = y E                   cuBLAS
    backward  x, u again; g_y = g_z E^T                                    cuBLAS
              _gate_grad_kernel         y, g_u = dL/du and the gate's part of g_x
              dL/dE, dL/dDy, dL/dLN(a), then autograd through LN(S v)   cuBLAS and PyTorch
              _mirror_kernel            G = L + L^T, L = tril(dL/dS, -1)
              _rope_kernel; g_r = G RoPE(x)                                 cuBLAS
              _grad_x_kernel            g_x = (g_x + RoPE^T(g_r)) * (x > 0)
              dL/dDx, dL/dv             cuBLAS

No B x T x n tensor outlives its layer's pass: forward keeps only S (B x h x T x T) for backward, and
backward computes x and u again. (An earlier design fused the products into Triton kernels as well,
so that no B x T x n tensor was written at all; those ran at 120-250 TFLOP/s against cuBLAS's
600-770 on an H100, and the training step was no faster than compiled plain PyTorch:
results/benchmark/README.md.)

RoPE rotates pairs of neurons. The kernels order each head's neurons as [first of every pair,
second of every pair] (the "half" layout; an "interleaved" model's weights are permuted into it),
so that a tile holds whole pairs.

`FusedStep` is the recurrent step (generation) in two kernels a layer: it reads Dx whole but, of
the state, Dy and E, only the rows of neurons that are non-zero. `BDH.step` is its reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model import BDH, BDHConfig, RecurrentState, chunk_decay, layer_norm, rope_cos_sin, rope_frequencies

# Triton's CPU interpreter (TRITON_INTERPRET=1, for the tests) multiplies bf16 wrongly: upcast there.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
BR, BP = 32, 64  # tile of the training kernels: rows, and pairs of neurons (BP first halves, BP second)


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
def _tile(R, M, H, BR: tl.constexpr, BP: tl.constexpr):
    """This program's rows and its head's pairs of neurons: the first of each pair at h*M + p, the
    second at h*M + p + M/2 (the kernels' pair order). Grid: (row tiles, heads x pair tiles).
    Also the first halves' offsets in the two layouts: R x n (offs) and h x R x M (head_offs)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    half = M // 2
    tiles_per_head = tl.cdiv(half, BP)
    h = tl.program_id(1) // tiles_per_head
    p = (tl.program_id(1) % tiles_per_head) * BP + tl.arange(0, BP)
    mask = (rows < R)[:, None] & (p < half)[None, :]
    offs = rows.to(tl.int64)[:, None] * (H * M) + h * M + p[None, :]  # 64 bits: R x n may pass 2**31
    head_offs = (h * R + rows).to(tl.int64)[:, None] * M + p[None, :]
    return rows, h, p, half, mask, offs, head_offs


@triton.jit
def _load_pair(ptr, offs, half, mask):
    """The two halves of a tile of pairs at ptr + offs, as float32."""
    a = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return a, tl.load(ptr + offs + half, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_pair(ptr, offs, half, mask, a, b):
    tl.store(ptr + offs, a.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + offs + half, b.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, p, half, mask):
    """cos and sin of the pairs' angles at positions t (tables T x M/2)."""
    offs = t[:, None] * half + p[None, :]
    return tl.load(cos_ptr + offs, mask=mask, other=0.0), tl.load(sin_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _keep_pair(seed, rows, h, p, half, M, H, p_drop):
    """Inverted dropout for both halves of a tile of pairs: 1 / (1 - p) where a neuron is kept, 0 where
    dropped; the same in forward and backward. One Philox draw per pair gives four numbers: the
    first decides the pair's first member, the second its second."""
    pair = rows[:, None] * (H * half) + (h * half + p)[None, :]  # the pair's index among all B*T*n/2
    ua, ub, _, _ = tl.rand4x(seed, pair)
    scale = 1.0 / (1.0 - p_drop)
    return tl.where(ua >= p_drop, scale, 0.0), tl.where(ub >= p_drop, scale, 0.0)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, r_ptr, R, T, M, H, BR: tl.constexpr, BP: tl.constexpr):
    """r[h, b, t] = RoPE(relu(x[b, t, h])) on one tile. x: R x n (v Dx, before the relu); r: h, R, M."""
    rows, h, p, half, mask, offs, head_offs = _tile(R, M, H, BR, BP)
    xa, xb = _load_pair(x_ptr, offs, half, mask)
    xa, xb = _relu(xa), _relu(xb)
    c, s = _cos_sin(cos_ptr, sin_ptr, rows % T, p, half, mask)
    _store_pair(r_ptr, head_offs, half, mask, xa * c - xb * s, xb * c + xa * s)


@triton.jit
def _gate_kernel(
    x_ptr, u_ptr, y_ptr, R, M, H, p_drop, seed,
    HAS_DROPOUT: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """y = relu(u) * relu(x) * keep on one tile. x, y: R x n; u = LN(a) Dy: h, R, M."""
    rows, h, p, half, mask, offs, head_offs = _tile(R, M, H, BR, BP)
    xa, xb = _load_pair(x_ptr, offs, half, mask)
    ua, ub = _load_pair(u_ptr, head_offs, half, mask)
    ya, yb = _relu(ua) * _relu(xa), _relu(ub) * _relu(xb)
    if HAS_DROPOUT:
        ka, kb = _keep_pair(seed, rows, h, p, half, M, H, p_drop)
        ya, yb = ya * ka, yb * kb
    _store_pair(y_ptr, offs, half, mask, ya, yb)


@triton.jit
def _gate_grad_kernel(
    x_ptr, u_ptr, gy_ptr, y_ptr, gu_ptr, gx_ptr, R, M, H, p_drop, seed,
    HAS_DROPOUT: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """From x, u and g_y = dL/dy on one tile: y again (for dL/dE), g_u = dL/du and the gate's part of
    g_x = dL/dx (before the relu's mask, which _grad_x_kernel applies). Layouts as in _gate_kernel."""
    rows, h, p, half, mask, offs, head_offs = _tile(R, M, H, BR, BP)
    xa, xb = _load_pair(x_ptr, offs, half, mask)
    ua, ub = _load_pair(u_ptr, head_offs, half, mask)
    ga, gb = _load_pair(gy_ptr, offs, half, mask)
    ya, yb = _relu(ua) * _relu(xa), _relu(ub) * _relu(xb)
    if HAS_DROPOUT:
        ka, kb = _keep_pair(seed, rows, h, p, half, M, H, p_drop)
        ya, yb, ga, gb = ya * ka, yb * kb, ga * ka, gb * kb  # g from here on: before dropout
    _store_pair(y_ptr, offs, half, mask, ya, yb)
    _store_pair(
        gu_ptr, offs, half, mask, tl.where(ua > 0, ga * _relu(xa), 0.0), tl.where(ub > 0, gb * _relu(xb), 0.0)
    )
    _store_pair(gx_ptr, offs, half, mask, ga * _relu(ua), gb * _relu(ub))


@triton.jit
def _grad_x_kernel(x_ptr, gr_ptr, cos_ptr, sin_ptr, gx_ptr, R, T, M, H, BR: tl.constexpr, BP: tl.constexpr):
    """g_x = (g_x + RoPE^T(g_r)) * (x > 0) on one tile, in place. g_r = dL/dRoPE(x): h, R, M."""
    rows, h, p, half, mask, offs, head_offs = _tile(R, M, H, BR, BP)
    xa, xb = _load_pair(x_ptr, offs, half, mask)
    gra, grb = _load_pair(gr_ptr, head_offs, half, mask)
    gxa, gxb = _load_pair(gx_ptr, offs, half, mask)
    c, s = _cos_sin(cos_ptr, sin_ptr, rows % T, p, half, mask)
    gxa += gra * c + grb * s
    gxb += grb * c - gra * s
    _store_pair(gx_ptr, offs, half, mask, tl.where(xa > 0, gxa, 0.0), tl.where(xb > 0, gxb, 0.0))


@triton.jit
def _mirror_kernel(ds_ptr, g_ptr, T, BT: tl.constexpr):
    """G = L + L^T, L = tril(dS, -1), on tile (i, j) of one T x T matrix (grid: matrices, T/BT, T/BT).
    A tile below the diagonal also writes its mirror (j, i); a tile above it has nothing left to do."""
    ti, tj = tl.program_id(1), tl.program_id(2)
    if ti >= tj:
        base = tl.program_id(0).to(tl.int64) * T * T
        i = ti * BT + tl.arange(0, BT)
        j = tj * BT + tl.arange(0, BT)
        mask = (i < T)[:, None] & (j < T)[None, :]
        ij = base + i[:, None] * T + j[None, :]
        L = tl.load(ds_ptr + ij, mask=mask & (i[:, None] > j[None, :]), other=0.0)
        if ti == tj:
            tl.store(g_ptr + ij, L + tl.trans(L), mask=mask)  # one of the two is zero: exact
        else:
            tl.store(g_ptr + ij, L, mask=mask)
            tl.store(g_ptr + base + j[:, None] * T + i[None, :], tl.trans(L), mask=tl.trans(mask))


def mirrored(dS: torch.Tensor, BT: int = 64) -> torch.Tensor:
    """G = L + L^T with L = tril(dS, -1), over the last two dims: the gradient of S = RoPE(x) RoPE(x)^T
    masked to tril(S, -1), as one factor. One pass; tril and a transposed add took two, the second
    at a third of the bandwidth."""
    T = dS.shape[-1]
    dS = dS.contiguous()
    G = torch.empty_like(dS)
    tiles = triton.cdiv(T, BT)
    _mirror_kernel[(dS.numel() // (T * T), tiles, tiles)](dS, G, T, BT=BT)
    return G


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def _grid(R: int, H: int, M: int) -> tuple[int, int]:
    return triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP)


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """RoPE(relu(x)) per head, bf16. x: R, n (v Dx in pair order, R = B*T). Returns h, R, n/h."""
    R, N = x.shape
    r = torch.empty((H, R, N // H), device=x.device, dtype=torch.bfloat16)
    _rope_kernel[_grid(R, H, N // H)](x, cos, sin, r, R, T, N // H, H, BR=BR, BP=BP)
    return r


def _attention(S: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LN(a), a = S v per head with S masked already: S h, B, T, T bf16; v B, T, d. Returns h, B, T, d
    float32. bf16 operands, as in the plain path under autocast."""
    return layer_norm((S @ v.to(S.dtype)).float())


def _pre_relu(v: torch.Tensor, Dx: torch.Tensor) -> torch.Tensor:
    """v Dx, before the relu (cuBLAS, bf16). v: B, T, d; Dx: h, d, M. Returns R, n in pair order."""
    H, D, M = Dx.shape
    return v.reshape(-1, D) @ Dx.transpose(0, 1).reshape(D, H * M)


def _mask_scores(S: torch.Tensor, decay: torch.Tensor | None) -> torch.Tensor:
    """In place: tril(S, -1), or S * decay (h, T, T, zero on and above the diagonal). S: h, B, T, T."""
    return S.tril_(-1) if decay is None else S.mul_(decay.unsqueeze(1))


class FusedNeurons(torch.autograd.Function):
    """z = (relu(LN(W * S) v) Dy) * x * keep) E with S = RoPE(x) RoPE(x)^T, x = relu(v Dx): one layer's
    neuron work, W = tril(1, -1) or the model's decay. Inputs bf16, neurons in the kernels' pair order.
    cuBLAS multiplies; the Triton kernels do everything between the products in one pass each. No
    B x T x n tensor is kept for backward: backward multiplies x and u again."""

    @staticmethod
    def forward(ctx, v, Dx, Dy, E, cos, sin, p_drop: float, seed: int, decay=None):  # v: B, T, d bf16
        B, T, D = v.shape
        H, _, M = Dx.shape
        R = B * T
        x = _pre_relu(v, Dx)  # R, n
        r = rotated(x, cos, sin, T, H).view(H, B, T, M)
        S = _mask_scores(r @ r.mT, decay)  # h, B, T, T
        del r
        ahat = _attention(S, v).to(torch.bfloat16)  # h, B, T, d
        u = ahat.view(H, R, D) @ Dy  # h, R, M
        y = torch.empty_like(x)
        _gate_kernel[_grid(R, H, M)](x, u, y, R, M, H, p_drop, seed, HAS_DROPOUT=p_drop > 0, BR=BR, BP=BP)
        del x, u
        z = y @ E  # R, d
        ctx.save_for_backward(v, Dx, Dy, E, cos, sin, S, decay)
        ctx.p_drop, ctx.seed = p_drop, seed
        return z.view(B, T, D)

    @staticmethod
    def backward(ctx, gz):
        v, Dx, Dy, E, cos, sin, S, decay = ctx.saved_tensors
        B, T, D = v.shape
        H, _, M = Dx.shape
        R = B * T
        with torch.enable_grad():  # the small PyTorch part, recomputed and differentiated by autograd
            S_ = S.detach().requires_grad_()
            v_ = v.detach().float().requires_grad_()
            ahat_ = _attention(S_, v_)  # h, B, T, d
        ahat = ahat_.detach().to(torch.bfloat16)
        gz = gz.reshape(R, D).to(torch.bfloat16)
        x, u = _pre_relu(v, Dx), ahat.view(H, R, D) @ Dy  # R, n and h, R, M: as in forward
        gy = gz @ E.mT  # R, n
        y, gu, gx = torch.empty_like(x), torch.empty_like(x), gy  # g_x overwrites g_y, element by element
        _gate_grad_kernel[_grid(R, H, M)](
            x, u, gy, y, gu, gx, R, M, H, ctx.p_drop, ctx.seed, HAS_DROPOUT=ctx.p_drop > 0, BR=BR, BP=BP
        )
        del u
        gE = y.mT @ gz  # n, d
        del y
        gu_h = gu.view(R, H, M).transpose(0, 1)  # h, R, M
        gahat = gu_h @ Dy.mT  # h, R, d
        gDy = ahat.view(H, R, D).mT @ gu_h  # h, d, M
        del gu, gu_h
        torch.autograd.backward(ahat_, gahat.view(H, B, T, D).float())
        G = mirrored(S_.grad if decay is None else S_.grad * decay.unsqueeze(1))  # h, B, T, T
        gr = G @ rotated(x, cos, sin, T, H).view(H, B, T, M)  # dL/dRoPE(x)
        del G
        _grad_x_kernel[_grid(R, H, M)](x, gr, cos, sin, gx, R, T, M, H, BR=BR, BP=BP)
        del x, gr
        gx_h = gx.view(R, H, M).transpose(0, 1)  # h, R, M
        gDx = v.view(R, D).mT @ gx_h  # h, d, M
        gv = v_.grad.view(R, D) + (gx_h @ Dx.mT).sum(0)  # R, d
        return gv.view(B, T, D).to(v.dtype), gDx, gDy, gE, None, None, None, None, None


class Fused(torch.nn.Module):
    """A BDH called through the fused kernels, for loops that call module(idx, targets)."""

    def __init__(self, model: BDH) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return fused_forward(self.model, idx, targets)


def pair_order(model: BDH) -> torch.Tensor:
    """Neuron order of the kernels: per head, the first of every RoPE pair, then the second."""
    cfg = model.config
    m = cfg.head_size
    if cfg.rope_style == "half":
        local = torch.arange(m)
    else:
        local = torch.cat((torch.arange(0, m, 2), torch.arange(1, m, 2)))
    return torch.cat([h * m + local for h in range(cfg.n_head)]).to(model.E.device)


class _InPairOrder(torch.autograd.Function):
    """w.index_select(dim, order).to(bf16) for a permutation `order`. Its gradient is a gather through
    the inverse permutation: autograd's scatter for indexing took about 4 ms of a 39 ms step."""

    @staticmethod
    def forward(ctx, w, dim: int, order):
        ctx.dim, ctx.dtype = dim, w.dtype
        ctx.save_for_backward(order)
        return w.index_select(dim, order).to(torch.bfloat16).contiguous()

    @staticmethod
    def backward(ctx, g):
        (order,) = ctx.saved_tensors
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return g.index_select(ctx.dim, inverse).to(ctx.dtype), None, None


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
    """BDH.forward through the fused kernels (bf16 operands, float32 accumulation). idx: B, T."""
    cfg = model.config
    B, T = idx.shape
    order = pair_order(model)
    local = order[: cfg.head_size]
    Dx = _InPairOrder.apply(model.Dx, 2, local)  # h, d, M   bf16, pair order
    Dy = _InPairOrder.apply(model.Dy, 2, local)
    E = _InPairOrder.apply(model.E, 0, order)  # n, d
    cos, sin = pair_cos_sin(model, T, idx.device)
    decay = model.decay_weights(T, idx.device)  # h, T, T or None
    decay = None if decay is None else decay.to(torch.bfloat16)
    p_drop = model.active_dropout
    with torch.autocast(idx.device.type, enabled=False):  # the kernels choose their own precision
        return _layers(model, idx, targets, Dx, Dy, E, cos, sin, p_drop, decay)


def _layers(model, idx, targets, Dx, Dy, E, cos, sin, p_drop, decay):
    bf16 = torch.bfloat16
    v = layer_norm(model.embed(idx).float())  # B, T, d
    for _ in range(model.config.n_layer):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p_drop > 0 else 0
        z = FusedNeurons.apply(v.to(bf16), Dx, Dy, E, cos, sin, p_drop, seed, decay)  # B, T, d
        v = layer_norm(v + layer_norm(z.float()))
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
    v_ptr, dx_ptr, freq_ptr, pos_ptr, s_ptr, x_ptr, a_ptr, groups_ptr, count_ptr, ln_ptr, gamma_ptr,
    B, H, M, D,
    INTERLEAVED: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr, DECAY: tl.constexpr,
):  # fmt: skip
    """For BP rotation pairs of head h and BB batch rows: x = relu(v Dx), then per row a_part = RoPE(x) S
    (old S) and S += RoPE(x)^T v (S <- gamma_h S + RoPE(x)^T v with DECAY: then every row of S is
    read and written, not only the live ones). The last program of the head writes LN(a), a the sum
    of the parts. PDL: launched while the previous kernel ends; its columns of Dx are read before
    waiting for it."""
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
    if DECAY:
        gamma = tl.load(gamma_ptr + h)
    for i in range(rows):  # each batch row has its own state
        pick = (tl.arange(0, BB) == i)[:, None]
        ra_i = tl.sum(tl.where(pick, ra, 0.0), 0)  # BP
        rb_i = tl.sum(tl.where(pick, rb, 0.0), 0)
        if DECAY:  # every row decays
            live_a = p_mask
            live_b = p_mask
        else:  # rows where RoPE(x) is zero are neither read nor written
            live_a = p_mask & (ra_i != 0.0)
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
            if DECAY:
                Sa *= gamma
                Sb *= gamma
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
        decay = chunk_decay(cfg, 1, model.E.device)  # gamma per head, or None
        # gamma per head; without decay the kernel takes some pointer there and never reads it
        self.gamma = decay.whole.flatten().contiguous() if decay is not None else self.pair_freq
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
                v, self.Dx, self.pair_freq, pos_now, S, x, a_parts, a_groups, counts, ln_a, self.gamma,
                B, H, M, D, INTERLEAVED=cfg.rope_style == "interleaved", BB=BATCH_TILE,
                GROUPS=_pow2(att_groups, 1), D_PAD=_pow2(D), PDL=self.pdl, DECAY=cfg.half_lives is not None,
                launch_pdl=self.pdl, **att,
            )  # fmt: skip
            _step_gate_kernel[(B * H, gate_blocks)](
                ln_a, x, self.DyT, self.E, z_parts, z_groups, counts[att_counts:], v, H, M, D,
                GROUPS=_pow2(gate_groups, 1), D_PAD=_pow2(D), PDL=self.pdl, launch_pdl=self.pdl, **gate,
            )  # fmt: skip
        return v.to(self.readout.dtype) @ self.readout  # B, V

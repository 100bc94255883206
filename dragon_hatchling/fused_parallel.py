"""The training step of BDH-GPU in Triton kernels: `fused_forward(model, idx, targets)` computes what
the parallel form `BDH.forward` computes (model.py, the plain reference, which stays the CPU path and
knows nothing of this file; tests/test_fused_parallel.py holds the two together). cuBLAS runs each
layer's matrix products in bf16 with float32 sums; four Triton kernels do everything between them,
one pass each over a B*T x n tensor (and a fifth, _mirror_kernel, one over the B x h x T x T gradient
of the scores):

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

A window that continues a text (truncated backpropagation through time, carried.py) reads the
state S of the bytes before it, one per layer (CarriedInput): two more products a layer, its read
gamma^t RoPE(x_t) S added to a (d more columns of the scores' product), and the next state
gamma^T S + RoPE(x)^T (gamma^(T-1-t) v_t), which one Triton kernel adds into S in place while
writing the bf16 copy the next window reads (update_state); gradients stop at S, as the paper's
TBPTT detaches it.
fused_forward(model, idx, targets, state) is BDH.forward_chunked's one chunk, the state in the
kernels' pair order.

RoPE rotates pairs of neurons. The kernels order each head's neurons as [first of every pair,
second of every pair] (the "half" layout; an "interleaved" model's weights are permuted into it),
so that a tile holds whole pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dragon_hatchling.fused_common import INTERPRET, first_of_pairs, relu
from model import BDH, ChunkDecay, RecurrentState, head_values, layer_norm, read_in_chunks, rope_cos_sin

BR, BP = 32, 64  # tile of the training kernels: rows, and pairs of neurons (BP first halves, BP second)


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
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, r_ptr, R, T, TP, M, H, BR: tl.constexpr, BP: tl.constexpr):
    """r[h, b, t] = RoPE(relu(x[b, t, h])) on one tile. x: R x n (v Dx, before the relu); r: h, B, TP, M
    (TP >= T: rows T.. of each window are left to the caller)."""
    rows, h, p, half, mask, offs, _ = _tile(R, M, H, BR, BP)
    head_offs = ((h * (R // T) + rows // T) * TP + rows % T).to(tl.int64)[:, None] * M + p[None, :]
    xa, xb = _load_pair(x_ptr, offs, half, mask)
    xa, xb = relu(xa), relu(xb)
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
    ya, yb = relu(ua) * relu(xa), relu(ub) * relu(xb)
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
    ya, yb = relu(ua) * relu(xa), relu(ub) * relu(xb)
    if HAS_DROPOUT:
        ka, kb = _keep_pair(seed, rows, h, p, half, M, H, p_drop)
        ya, yb, ga, gb = ya * ka, yb * kb, ga * ka, gb * kb  # g from here on: before dropout
    _store_pair(y_ptr, offs, half, mask, ya, yb)
    _store_pair(
        gu_ptr, offs, half, mask, tl.where(ua > 0, ga * relu(xa), 0.0), tl.where(ub > 0, gb * relu(xb), 0.0)
    )
    _store_pair(gx_ptr, offs, half, mask, ga * relu(ua), gb * relu(ub))


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


def _grid(R: int, H: int, M: int) -> tuple[int, int]:
    return triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP)


def rotated(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int, H: int, into: torch.Tensor | None = None
) -> torch.Tensor:
    """RoPE(relu(x)) per head, bf16. x: R, n (v Dx in pair order, R = B*T). Returns h, B, T, n/h, or
    into (h, B, T', n/h contiguous, T' >= T) with RoPE in the first T rows of each window and the rows
    below left as they were (the caller's rows of the same product)."""
    R, N = x.shape
    r = torch.empty((H, R // T, T, N // H), device=x.device, dtype=torch.bfloat16) if into is None else into
    assert r.is_contiguous() and r.shape[:2] == (H, R // T) and r.shape[2] >= T and r.shape[3] == N // H
    _rope_kernel[_grid(R, H, N // H)](x, cos, sin, r, R, T, r.shape[2], N // H, H, BR=BR, BP=BP)
    return r


def _attention(
    S: torch.Tensor, v: torch.Tensor, earlier: torch.Tensor | None = None, shifted: int = 0
) -> torch.Tensor:
    """LN(a), a = S v per head with S masked already (+ earlier, the bytes before the window through
    the carried state): S h, B, T, T bf16; v B, T, d; earlier h, B, T, d. Returns h, B, T, d float32.
    The last `shifted` heads read successors(v) instead (model.head_values). bf16 operands, as in the
    plain path under autocast."""
    values = head_values(v.to(S.dtype), S.shape[0], shifted).transpose(0, 1)  # 1 or h, B, T, d
    a = (S @ values).float()
    return layer_norm(a if earlier is None else a + earlier)


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
    def forward(
        ctx, v, Dx, Dy, E, cos, sin, p_drop: float, seed: int, decay=None, carried=None, since_start=None,
        shifted: int = 0,
    ):  # fmt: skip
        # v: B, T, d bf16. carried: the state of the bytes before the window (CarriedInput), or None;
        # since_start: carried.decay.since_start (h, T, 1), given when the half-lives are learned;
        # shifted: the last heads that read successors(v) (BDHConfig.shifted_heads; not with carried)
        B, T, D = v.shape
        H, _, M = Dx.shape
        R = B * T
        x = _pre_relu(v, Dx)  # R, n
        earlier = None
        if carried is None:
            r = rotated(x, cos, sin, T, H)  # h, B, T, M
            S = _mask_scores(r @ r.mT, decay)  # h, B, T, T
        else:  # the earlier bytes through the state, read in the scores' product; the state after
            padded = rotated(x, cos, sin, T, H, into=carried.padded(T))  # h, B, T + d, M
            r, scores, earlier = carried.scores_and_read(padded, T)
            S = _mask_scores(scores, decay)  # h, B, T, T (a view of T + d columns)
            carried.advance(r, v)
        del r
        ahat = _attention(S, v, earlier, shifted).to(torch.bfloat16)  # h, B, T, d
        u = ahat.view(H, R, D) @ Dy  # h, R, M
        y = torch.empty_like(x)
        _gate_kernel[_grid(R, H, M)](x, u, y, R, M, H, p_drop, seed, HAS_DROPOUT=p_drop > 0, BR=BR, BP=BP)
        del x, u
        z = y @ E  # R, d
        ctx.save_for_backward(v, Dx, Dy, E, cos, sin, S, decay, earlier)
        ctx.p_drop, ctx.seed, ctx.carried, ctx.learned_read = p_drop, seed, carried, since_start is not None
        ctx.shifted = shifted
        return z.view(B, T, D)

    @staticmethod
    def backward(ctx, gz):
        v, Dx, Dy, E, cos, sin, S, decay, earlier = ctx.saved_tensors
        B, T, D = v.shape
        H, _, M = Dx.shape
        R = B * T
        with torch.enable_grad():  # the small PyTorch part, recomputed and differentiated by autograd
            S_ = S.detach().requires_grad_()
            v_ = v.detach().float().requires_grad_()
            earlier_ = None if earlier is None else earlier.detach().requires_grad_()
            ahat_ = _attention(S_, v_, earlier_, ctx.shifted)  # h, B, T, d
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
        gdecay = learned_decay_grad(S, S_.grad, decay) if ctx.needs_input_grad[8] else None  # h, T, T
        gsince = None  # the read of a carried state: earlier = since_start * (RoPE(x) S), h, T, 1
        if ctx.learned_read and ctx.needs_input_grad[10]:
            gsince = learned_read_grad(earlier, earlier_.grad, ctx.carried.decay.since_start)
        G = mirrored(S_.grad if decay is None else S_.grad * decay.unsqueeze(1))  # h, B, T, T
        if earlier is None:
            gr = G @ rotated(x, cos, sin, T, H)  # dL/dRoPE(x): h, B, T, M
        else:  # and the part that reached it through the state, in the same product
            gr = ctx.carried.grad_of_r(
                G, rotated(x, cos, sin, T, H, into=ctx.carried.padded(T)), earlier_.grad
            )
        del G
        _grad_x_kernel[_grid(R, H, M)](x, gr, cos, sin, gx, R, T, M, H, BR=BR, BP=BP)
        del x, gr
        gx_h = gx.view(R, H, M).transpose(0, 1)  # h, R, M
        gDx = v.view(R, D).mT @ gx_h  # h, d, M
        gv = v_.grad.view(R, D) + (gx_h @ Dx.mT).sum(0)  # R, d
        return gv.view(B, T, D).to(v.dtype), gDx, gDy, gE, None, None, None, None, gdecay, None, gsince, None


def learned_decay_grad(S: torch.Tensor, gS: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """dL/d decay (h, T, T float32) for learned half-lives: with S = W * scores kept (h, B, T, T) and
    gS = dL/dS, it is the sum over the batch of gS * scores = gS * S / W, zero where W is."""
    return _over_factor((gS.float() * S.float()).sum(1), decay.float())


def learned_read_grad(
    earlier: torch.Tensor, g_earlier: torch.Tensor, since_start: torch.Tensor
) -> torch.Tensor:
    """dL/d since_start (h, T, 1) for learned half-lives with a carried state: the read is earlier =
    since_start * (RoPE(x) S) (h, B, T, d), so it is the sum over batch and d of g_earlier * earlier /
    since_start, zero where since_start is (a short half-life far into a long window)."""
    g = (g_earlier.float() * earlier.float()).sum((1, 3))  # h, T
    return _over_factor(g, since_start.float()[..., 0])[..., None]


def _over_factor(g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """g / W where W > 0, else 0: the gradient of a factor W from that of the product it scaled."""
    return torch.where(W > 0, g / W.where(W > 0, 1.0), 0.0)


class CarriedInput:
    """One layer's attention state before a window, for FusedNeurons: S, the sum of
    gamma^(pos-1-s) RoPE(x_s)^T v_s over every earlier byte s, float32 in the kernels' pair order,
    kept transposed in the (h, B) layout, P = S^T: h, B, d, M. The state holds it as
    P.permute(1, 0, 3, 2) (B, h, M, d); a state in any other layout is copied once. The state given
    is consumed: the window's update is added into it in place, and it becomes the state after.

    Two products a layer: its read, earlier_t = gamma^t RoPE(x_t) S, in bf16 from the copy S^T that
    the window before wrote (or one made here), and the next state gamma^T S + RoPE(x)^T
    (gamma^(T-1-t) v_t), added into P by update_state, which writes the next window's copy in the same
    pass. The copy is written as the last d rows of a buffer of a window's T + d (copy_buffer), so
    that RoPE(x), written above it, finds S^T in place: the read is d more columns of the scores'
    product, r [r; S^T]^T, and backward's g_r = [G, gamma^t g_a] [r; S^T] is d more of G's."""

    def __init__(self, state: torch.Tensor, buffer: torch.Tensor | None, decay: ChunkDecay | None) -> None:
        P = state.permute(1, 0, 3, 2)  # h, B, d, M
        self.P = P if P.is_contiguous() else P.contiguous()
        H, B, D, M = self.P.shape
        fits = buffer is not None and P is self.P and buffer.shape[:2] == (H, B) and buffer.shape[3] == M
        self.buffer = buffer if fits else None  # h, B, T' + d, M bf16: S^T in its last d rows a window
        self.St = buffer[:, :, -D:] if fits else self.P.to(torch.bfloat16)  # S^T: h, B, d, M bf16
        self.decay = decay
        self.after: torch.Tensor | None = None
        self.after_buffer: torch.Tensor | None = None

    def scores_and_read(self, padded: torch.Tensor, T: int) -> tuple[torch.Tensor, ...]:
        """From padded (h, B, T + d, M: RoPE(x) above S^T), one product r [r; S^T]^T: r = RoPE(x) (h,
        B, T, M, a view), the window's scores r r^T (h, B, T, T, unmasked, a view) and its read of the
        state, earlier = gamma^t r S (h, B, T, d float32)."""
        r = padded[:, :, :T]
        both = r @ padded.mT  # h, B, T, T + d
        earlier = both[..., T:].float()
        if self.decay is not None:
            earlier = earlier * self.decay.since_start.unsqueeze(1)
        return r, both[..., :T], earlier

    def advance(self, r: torch.Tensor, v: torch.Tensor) -> None:
        """self.after: the state after the window (B, h, M, d, a view of P, updated in place), and
        self.after_buffer, the same in bf16 below T rows (the next window's S^T)."""
        T = r.shape[2]
        self.after_buffer = copy_buffer(self.P.shape, T, self.P.device)
        update_state(self.P, v, r, self.after_buffer[:, :, T:], self.decay)
        self.after, self.P = self.P.permute(1, 0, 3, 2), None

    def padded(self, T: int) -> torch.Tensor:
        """h, B, T + d, M bf16 with S^T in the last d rows of each window: the buffer the copy was
        written into when it was made for a window of T bytes (no copy), else a new one."""
        if self.buffer is None or self.buffer.shape[2] != T + self.St.shape[2]:
            self.buffer = copy_buffer(self.St.shape, T, self.St.device)  # kept: backward reads it again
            self.buffer[:, :, T:].copy_(self.St)  # after a plain state, or a window of another length
            self.St = self.buffer[:, :, T:]
        return self.buffer

    def grad_of_r(self, G: torch.Tensor, r: torch.Tensor, g_earlier: torch.Tensor) -> torch.Tensor:
        """dL/dRoPE(x) (h, B, T, M) from G (h, B, T, T), the window's part, and g_earlier = dL/d earlier
        (h, B, T, d), the state's; r: h, B, T + d, M, RoPE(x) above S^T (padded)."""
        if self.decay is not None:
            g_earlier = g_earlier * self.decay.since_start.unsqueeze(1)
        return torch.cat((G, g_earlier.to(torch.bfloat16)), dim=-1) @ r


def copy_buffer(shape: torch.Size | tuple, T: int, device: torch.device) -> torch.Tensor:
    """h, B, T + d, M bf16 (empty) for a state of shape h, B, d, M: its last d rows a window hold S^T."""
    H, B, D, M = shape
    return torch.empty((H, B, T + D, M), device=device, dtype=torch.bfloat16)


# fmt: off
@triton.jit
def _update_kernel(
    p_ptr, v_ptr, r_ptr, whole_ptr, to_end_ptr, copy_ptr, B, D, T, M, sv_b, sv_t, sr_h, sr_b, sr_t, sc_hb,
    HAS_DECAY: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    # fmt: on
    """One BD x BM tile of one (head, row): P = gamma^T P + (gamma^(T-1-t) v_t)^T r, copy = bf16(P).
    Grid: tiles, h * B; the d tiles of one M tile are neighbours, so that they read the same r from
    L2. The faded v is made on chip and rounded to bf16, as a product of bf16 operands reads it."""
    hb = tl.program_id(1).to(tl.int64)
    h, b = hb // B, hb % B
    n_d = tl.cdiv(D, BD)
    offs_d = (tl.program_id(0) % n_d) * BD + tl.arange(0, BD)
    offs_m = (tl.program_id(0) // n_d) * BM + tl.arange(0, BM)
    v_ptr += b * sv_b  # v: T, D (unit stride in D), read as D, T
    r_ptr += h * sr_h + b * sr_b  # r: T, M (unit stride in M)
    acc = tl.zeros((BD, BM), dtype=tl.float32)
    for k in range(0, T, BK):
        t = k + tl.arange(0, BK)
        a_mask = (t[None, :] < T) & (offs_d[:, None] < D)
        a = tl.load(v_ptr + t[None, :] * sv_t + offs_d[:, None], mask=a_mask, other=0.0)
        if HAS_DECAY:
            a = a.to(tl.float32) * tl.load(to_end_ptr + h * T + t, mask=t < T, other=0.0)[None, :]
        r_mask = (t[:, None] < T) & (offs_m[None, :] < M)
        r = tl.load(r_ptr + t[:, None] * sr_t + offs_m[None, :], mask=r_mask, other=0.0)
        if INTERPRET:
            a, r = a.to(tl.float32), r.to(tl.float32)
        else:
            a = a.to(tl.bfloat16)
        acc = tl.dot(a, r, acc)
    offs = offs_d[:, None] * M + offs_m[None, :]
    mask = (offs_d[:, None] < D) & (offs_m[None, :] < M)
    p = tl.load(p_ptr + hb * D * M + offs, mask=mask)
    if HAS_DECAY:
        p *= tl.load(whole_ptr + h)
    p += acc
    tl.store(p_ptr + hb * D * M + offs, p, mask=mask)
    tl.store(copy_ptr + hb * sc_hb + offs, p.to(tl.bfloat16), mask=mask)


UPDATE_TILE = (64, 128, 64, 4, 3)  # BD, BM, BK, warps, stages of update_state (results/tbptt/update_tiles.py)


def update_state(P: torch.Tensor, v: torch.Tensor, r: torch.Tensor, copy, decay: ChunkDecay | None) -> None:
    """P = gamma^T P + (gamma^(T-1-t) v_t)^T RoPE(x_t) in place for every (head, row), and copy = P in
    bf16, in one pass over P. P: h, B, d, M float32, contiguous; copy: the same shape in bf16, each
    (head, row) contiguous (rows of a larger buffer); v: B, T, d bf16, unit stride in d; r: h, B, T,
    M bf16, unit stride in M; decay: the window's (whole, to_end), or None (gamma = 1)."""
    H, B, D, M = P.shape
    T = v.shape[1]
    hb_stride = copy.stride(1)
    assert P.is_contiguous() and copy.stride() == (B * hb_stride, hb_stride, M, 1)
    assert v.stride(2) == 1 and r.stride(3) == 1
    whole, to_end = (P, P) if decay is None else (decay.whole.reshape(H), decay.to_end.reshape(H, T))
    BD, BM, BK, warps, stages = UPDATE_TILE
    BD, BM, BK = (min(tile, max(16, triton.next_power_of_2(n))) for tile, n in ((BD, D), (BM, M), (BK, T)))
    grid = (triton.cdiv(D, BD) * triton.cdiv(M, BM), H * B)
    _update_kernel[grid](
        P, v, r, whole.contiguous(), to_end.contiguous(), copy, B, D, T, M, *v.stride()[:2], *r.stride()[:3],
        hb_stride, HAS_DECAY=decay is not None, BD=BD, BM=BM, BK=BK, num_warps=warps, num_stages=stages,
    )  # fmt: skip


class Fused(torch.nn.Module):
    """A BDH called through the fused kernels, for loops that call module(idx, targets), and for
    those that read a text in pieces, the state carried (forward_chunked, as BDH's; the state in the
    kernels' pair order: to_model_order and from_model_order translate it)."""

    def __init__(self, model: BDH) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return fused_forward(self.model, idx, targets)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        return self.model.initial_state(batch_size, device)  # zeros: the same in either order

    def forward_chunked(self, idx, targets=None, chunk_size: int = 256, state=None, checkpoint: bool = False):
        """BDH.forward_chunked through the kernels (state in pair order); checkpoint is not needed:
        the kernels keep no B x T x n tensor for backward."""
        state = state if state is not None else self.initial_state(idx.shape[0], idx.device)

        def step(part: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
            logits, _, after = fused_forward(self.model, part, state=state)
            return logits, after

        return read_in_chunks(step, idx, targets, chunk_size, state)

    def to_model_order(self, state: RecurrentState) -> RecurrentState:
        inverse = torch.argsort(pair_order(self.model)[: self.model.config.head_size])
        return RecurrentState([S.index_select(2, inverse) for S in state.layers], state.pos.clone())

    def from_model_order(self, state: RecurrentState) -> RecurrentState:
        local = pair_order(self.model)[: self.model.config.head_size]
        return RecurrentState([S.index_select(2, local) for S in state.layers], state.pos.clone())


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


def pair_cos_sin(model: BDH, T: int, device: torch.device, start=0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every pair's angle at positions start..start+T-1, each (T, n/2h) float32."""
    cos, sin = rope_cos_sin(model.config, start + torch.arange(T, device=device))  # T, n/h: per dimension
    first = first_of_pairs(model.config)
    return cos[:, first].contiguous(), sin[:, first].contiguous()


def fused_forward(
    model: BDH, idx: torch.Tensor, targets: torch.Tensor | None = None, state: RecurrentState | None = None
):
    """BDH.forward through the fused kernels (bf16 operands, float32 accumulation). idx: B, T.
    Returns logits and loss; with state (the bytes before idx, in the kernels' pair order, as
    BDH.chunk takes it), also the state after idx, as BDH.forward_chunked does."""
    cfg = model.config
    B, T = idx.shape
    if state is not None and state.pos.dim() != 0:
        raise ValueError("the fused kernels read windows of one position for all rows, not a pos a row")
    if state is not None and cfg.shifted_heads:
        raise ValueError("the fused kernels carry no shifted head's state (BDH.forward_chunked does)")
    order = pair_order(model)
    local = order[: cfg.head_size]
    Dx = _InPairOrder.apply(model.Dx, 2, local)  # h, d, M   bf16, pair order
    Dy = _InPairOrder.apply(model.Dy, 2, local)
    E = _InPairOrder.apply(model.E, 0, order)  # n, d
    cos, sin = pair_cos_sin(model, T, idx.device, 0 if state is None else state.pos)
    chunk = model.decay(T, idx.device)  # float32, or None (learned half-lives: with their gradient)
    decay = None if chunk is None else chunk.weights.to(torch.bfloat16)  # h, T, T
    with torch.autocast(idx.device.type, enabled=False):  # the kernels choose their own precision
        weights = Weights(Dx, Dy, E, cos, sin, decay, chunk)
        logits, loss, (layers, buffers) = _layers(model, idx, targets, weights, state)
    if state is None:
        return logits, loss
    return logits, loss, FusedState(layers, state.pos + T, buffers=buffers)


@dataclass
class FusedState(RecurrentState):
    """The state after a window through the kernels (pair order), with each layer's state also in
    bf16, as the update that wrote it left it: the next window reads that copy instead of making
    one. Whatever changes layers in place must change buffers alike (empty_rows does); RecurrentState's
    own methods return plain states, which the next window copies again."""

    # per layer: h, B, T + d, M bf16, the copy S^T in the last d rows a window
    buffers: list[torch.Tensor] = field(default_factory=list)

    def empty_rows(self, rows: torch.Tensor) -> None:
        super().empty_rows(rows)
        for buffer in self.buffers:
            buffer[:, rows.to(buffer.device)] = 0


@dataclass
class Weights:
    """What every layer of one pass reads: the weights in pair order (bf16), RoPE's tables, the decay."""

    Dx: torch.Tensor
    Dy: torch.Tensor
    E: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    decay: torch.Tensor | None  # h, T, T bf16
    chunk: ChunkDecay | None  # float32, for a carried state


def _layers(model, idx, targets, w: Weights, state: RecurrentState | None):
    bf16, p_drop = torch.bfloat16, model.active_dropout
    v = layer_norm(model.embed(idx).float())  # B, T, d
    after, buffers = [], []  # with a state: each layer's state after the window, and its bf16 copy
    for layer in range(model.config.n_layer):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p_drop > 0 else 0
        args = (v.to(bf16), w.Dx, w.Dy, w.E, w.cos, w.sin, p_drop, seed, w.decay)
        if state is None:
            z = FusedNeurons.apply(*args, None, None, model.config.shifted_heads)  # B, T, d
        else:
            buffer = state.buffers[layer] if isinstance(state, FusedState) else None
            carried = CarriedInput(state.layers[layer], buffer, w.chunk)
            learned = w.chunk is not None and w.chunk.since_start.requires_grad
            z = FusedNeurons.apply(*args, carried, w.chunk.since_start if learned else None)
            after.append(carried.after)
            buffers.append(carried.after_buffer)
        v = layer_norm(v + layer_norm(z.float()))
    logits = (v.to(bf16) @ model.readout.to(bf16)).float()  # B, T, V
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return logits, loss, (after, buffers)

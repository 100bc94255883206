"""The recurrent form of BDH-GPU in Triton kernels: `FusedStep(model)(byte, state)` is `BDH.step`
(model.py, its plain reference; tests/test_fused_recurrent.py holds the two together), one byte per
call, two kernels a layer, with sparse reads; generation (sampling.py) captures it in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dragon_hatchling.fused_common import INTERPRET, first_of_pairs, relu
from model import BDH, RecurrentState, rope_frequencies

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

DOT_ROWS = 16  # the fewest rows tl.dot takes: an attention program of fewer batch rows pads to it


@triton.jit
def dot(a, b, acc):
    """acc + a b: float32 accumulation (bf16 operands on tensor cores; float32 ones exactly, not tf32)."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


def pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


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
def _row_angles(pos, freq_ptr, p, p_mask, half):
    """cos and sin of pairs p at position pos: pos * freq = hi * (4096 freq mod 1) + lo * freq turns,
    exact enough in float32 at millions of bytes."""
    hi, lo = (pos // 4096).to(tl.float32), (pos % 4096).to(tl.float32)
    phase = hi * tl.load(freq_ptr + half + p, mask=p_mask, other=0.0)
    phase = (phase - tl.floor(phase)) + lo * tl.load(freq_ptr + p, mask=p_mask, other=0.0)  # turns
    angle = (phase - tl.floor(phase)) * 6.283185307179586
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _step_attention_kernel(
    v_ptr, dx_ptr, freq_ptr, pos_ptr, s_ptr, origin_ptr, x_ptr, a_ptr, groups_ptr, count_ptr, ln_ptr,
    gamma_ptr, B, H, M, D,
    INTERLEAVED: tl.constexpr, BB: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
    GROUP: tl.constexpr, GROUPS: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr, DECAY: tl.constexpr,
    LAZY: tl.constexpr,
):  # fmt: skip
    """For BP rotation pairs of head h and BB batch rows (BR >= BB: the dot's rows, padded): x = relu(v
    Dx), then per row a_part = RoPE(x) S
    (old S) and S += RoPE(x)^T v (S <- gamma_h S + RoPE(x)^T v with DECAY: then every row of S is
    read and written, not only the live ones; with LAZY as well, only the live ones, of the state
    scaled as LazyDecay keeps it: S = gamma^k stored, k = pos - origin_ptr[row], so the read is
    gamma^k RoPE(x) stored and the update adds RoPE(x)^T v / gamma^(k+1)). Each row's RoPE angle is
    at its own position (pos_ptr: B).
    The last program of the head writes LN(a), a the sum of the parts. PDL: launched while the
    previous kernel ends; its columns of Dx are read before waiting for it."""
    tile_h = tl.program_id(0)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    b0 = (tile_h // H) * BB
    h = tile_h % H
    half = M // 2
    rows = tl.minimum(BB, B - b0)
    bb = b0 + tl.arange(0, BR)
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
    v_mask = (bb < b0 + rows)[:, None] & (k < D)[None, :]
    v_rows = tl.load(v_ptr + bb[:, None] * D + k[None, :], mask=v_mask, other=0.0)  # BR, D
    x = relu(dot(v_rows.to(w.dtype), w, tl.zeros((BR, 2 * BP), dtype=tl.float32)))  # BR, 2 BP
    x_mask = (bb < b0 + rows)[:, None] & (p_of_c < half)[None, :]
    tl.store(x_ptr + (bb * H + h)[:, None] * M + j[None, :], x, mask=x_mask)
    xa, xb = tl.split(tl.reshape(x, (BR, BP, 2)))  # BR, BP: first and second members of the pairs
    p = block * BP + tl.arange(0, BP)
    p_mask = p < half
    if INTERLEAVED:
        ja = 2 * p
        jb = ja + 1
    else:
        ja = p
        jb = p + half
    if DECAY:
        log2_gamma = tl.load(gamma_ptr + H + h)
        gamma = tl.load(gamma_ptr + h)
    for i in range(rows):  # each batch row has its own state and position
        pos = tl.load(pos_ptr + b0 + i)
        cos, sin = _row_angles(pos, freq_ptr, p, p_mask, half)
        pick = (tl.arange(0, BR) == i)[:, None]
        xa_i = tl.sum(tl.where(pick, xa, 0.0), 0)  # BP
        xb_i = tl.sum(tl.where(pick, xb, 0.0), 0)
        ra_i = xa_i * cos - xb_i * sin
        rb_i = xb_i * cos + xa_i * sin
        if DECAY and not LAZY:  # every row decays
            live_a = p_mask
            live_b = p_mask
        else:  # rows where RoPE(x) is zero are neither read nor written
            live_a = p_mask & (ra_i != 0.0)
            live_b = p_mask & (rb_i != 0.0)
        bh = (b0 + i) * H + h
        if LAZY:  # the stored rows are S / gamma^k: read gamma^k of them, add the update / gamma^(k+1)
            since = (pos - tl.load(origin_ptr + b0 + i)).to(tl.float32)  # bytes since the origin
            read_scale = tl.exp2(since * log2_gamma)
            write_scale = tl.exp2(-(since + 1.0) * log2_gamma)
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
            if LAZY:
                part *= read_scale
                v *= write_scale
            elif DECAY:
                Sa *= gamma
                Sb *= gamma
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
    y = relu(y) * x  # BN; sparser than x
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
    byte_ptr, embed_ptr, v_ptr, pos_ptr, pos_now_ptr, B, D,
    ROW_POS: tl.constexpr, B_PAD: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """v = LN(embedding of the byte), float32, for one batch row, and the position moved on (pos_now,
    B: each row's position of this byte, which the attention kernels read). ROW_POS: pos holds a
    position a row, each program moves its own; else one for all rows, which the first moves on."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the first attention kernel may start reading Dx
    b = tl.program_id(0)
    if ROW_POS:
        pos = tl.load(pos_ptr + b)
        tl.store(pos_now_ptr + b, pos)
        tl.store(pos_ptr + b, pos + 1)
    elif b == 0:
        pos = tl.load(pos_ptr)
        rows = tl.arange(0, B_PAD)
        tl.store(pos_now_ptr + rows, tl.zeros((B_PAD,), dtype=pos.dtype) + pos, mask=rows < B)
        tl.store(pos_ptr, pos + 1)
    d = tl.arange(0, D_PAD)
    row = tl.load(byte_ptr + b)
    e = tl.load(embed_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(v_ptr + b * D + d, _layer_norm_row(e, d < D, D), mask=d < D)


class LazyDecay:
    """Lazy decay of a state that FusedStep steps (a model with decay): the state is kept scaled, S
    = gamma_h^k * stored for head h of each batch row, k the bytes since `origin`, the row's position
    when it was last settled. A step reads gamma^k times the stored rows of live neurons and adds
    its update divided by gamma^(k+1), so the rows of silent neurons are neither read nor written:
    a step costs what it costs without decay, with no bookkeeping a row. 1 / gamma^k grows with k, so
    tick() (after every step) settles every `every` steps, before it passes 2^HEADROOM; settle()
    also before anything else reads the state, mark_current() after the state was set from outside.
    """

    HEADROOM = 64  # the most doublings of 1 / gamma^k a step uses: far from float32's 2^128

    def __init__(self, model: BDH, state: RecurrentState) -> None:
        doublings = self.doublings(model)  # h
        if not (doublings <= self.HEADROOM).all():
            raise ValueError(f"a half-life under 1/{self.HEADROOM} byte: 1 / gamma alone passes the headroom")
        self.log2_gamma = -doublings.view(1, -1, 1, 1).to(state.pos.device)  # 1, h, 1, 1
        # the shortest half-life's (0 for one so long that gamma rounds to 1)
        fastest = max(float(doublings.max()), self.HEADROOM / 2**30)
        self.every = max(1, int(self.HEADROOM / fastest))  # steps between settles, at most 2^30
        self.origin = torch.empty(state.layers[0].shape[0], dtype=torch.long, device=state.pos.device)
        self.mark_current(state)

    @staticmethod
    def doublings(model: BDH) -> torch.Tensor:
        """-log2 gamma per head (h, float32): the doublings of 1 / gamma a byte."""
        return -model.decay(1, model.E.device).whole.detach().flatten().log2()

    @classmethod
    def holds(cls, model: BDH) -> bool:
        """Whether a scaled state can hold this model's decay: 1 / gamma within 2^HEADROOM for every
        head (a half-life of at least 1/HEADROOM byte; below, every row decays every step instead)."""
        return bool((cls.doublings(model) <= cls.HEADROOM).all())

    def mark_current(self, state: RecurrentState, row: int | None = None) -> None:
        """Every row of S (of batch row `row` only, if given) is current at the state's position."""
        pos = state.pos.expand_as(self.origin)
        if row is None:
            self.origin.copy_(pos)
            self.since = 0  # steps since every row was current
        else:
            self.origin[row] = pos[row]

    def settle(self, state: RecurrentState) -> None:
        """Make S what BDH.step would hold: every row current, the scale back to 1."""
        k = (state.pos.expand_as(self.origin) - self.origin).float()  # B
        scale = torch.exp2(k.view(-1, 1, 1, 1) * self.log2_gamma)  # B, h, 1, 1
        for S in state.layers:
            S.mul_(scale.to(S.dtype))
        self.mark_current(state)

    def tick(self, state: RecurrentState) -> None:
        """Call after every step (outside a CUDA graph): settles once every `every` steps."""
        self.since += 1
        if self.since >= self.every:
            self.settle(state)


@dataclass
class StepScratch:
    """What one FusedStep call writes besides the state (float32; the parts and groups of the sums,
    see _finish_sum), its counters (views of FusedStep.counts) and its two kernels' grids."""

    v: torch.Tensor  # B, d: the layer's input, then its output
    x: torch.Tensor  # B, h, M
    a_parts: torch.Tensor  # B*h, attention programs a head, d
    a_groups: torch.Tensor  # B*h, groups of them, d
    ln_a: torch.Tensor  # B*h, d
    z_parts: torch.Tensor  # B, gate programs of every head, d
    z_groups: torch.Tensor  # B, groups of them, d
    pos_now: torch.Tensor  # B: each row's position of this byte
    att_counts: torch.Tensor
    gate_counts: torch.Tensor
    att_grid: tuple[int, int]
    gate_grid: tuple[int, int]


class FusedStep:
    """BDH.step through the step kernels: logits (B, V) after one more byte; the state in place.

    Holds the weights in the layouts the kernels read (Dy transposed, so that a neuron's row is
    contiguous) in the model's dtype; every sum is float32. Inference only: no dropout. With a
    LazyDecay of the state (a model with decay), only the live rows of the state are read and
    written (call lazy.tick(state) after each step); without one, every row decays every step.
    """

    # batch rows, pairs, state columns; parts a group (see _finish_sum)
    ATTENTION_TILES = {"BB": 16, "BP": 32, "BD": 64, "GROUP": 16, "num_warps": 2}
    GATE_TILES = {"BN": 64, "BD": 128, "GROUP": 32, "num_warps": 2}  # neurons, columns; parts a group

    def __init__(self, model: BDH, attention: dict | None = None, gate: dict | None = None) -> None:
        """attention, gate: tiles that replace some of ATTENTION_TILES, GATE_TILES (kernel arguments)."""
        cfg = model.config
        if model.active_dropout > 0:
            raise ValueError(
                "FusedStep applies no dropout: call model.eval() first (BDH.step would apply it)"
            )
        if not model.has_fused_step:
            raise ValueError("FusedStep has no shifted heads (BDHConfig.shifted_heads): BDH.step has")
        self.config = cfg
        self.attention = {**self.ATTENTION_TILES, **(attention or {})}
        self.gate = {**self.GATE_TILES, **(gate or {})}
        self.embed, self.readout = model.embed.weight, model.readout
        self.Dx = model.Dx.contiguous()  # h, d, M
        self.DyT = model.Dy.mT.contiguous()  # h, M, d
        self.E = model.E.contiguous()  # n, d
        freq = rope_frequencies(cfg, model.E.device)  # M: both members of a pair share a frequency
        pair = freq[first_of_pairs(cfg)].double()  # M/2, turns per position
        self.pair_freq = torch.stack([pair, (4096 * pair) % 1.0]).float().contiguous()  # 2, M/2: and per 4096
        decay = model.decay(1, model.E.device)  # gamma per head, or None (no gradient: sampling)
        # gamma and log2 gamma per head; without decay the kernel takes some pointer and never reads it
        if decay is not None:
            gamma = decay.whole.detach().flatten()
            self.gamma = torch.stack([gamma, gamma.log2()]).contiguous()
        else:
            self.gamma = self.pair_freq
        self.counts: dict[int, torch.Tensor] = {}  # per batch size: the sums' counters, zero between kernels
        # Programmatic dependent launch (Hopper on): each kernel starts while the one before ends
        dev = model.E.device
        self.pdl = dev.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(dev)[0] >= 9

    def _scratch(self, state: RecurrentState) -> StepScratch:
        """The buffers a step of this state writes, and its kernels' grids."""
        B, H, M, D = state.layers[0].shape
        att, gate = self.attention, self.gate
        att_blocks = triton.cdiv(M // 2, att["BP"])  # parts of each (batch row, head)'s a
        gate_blocks = triton.cdiv(M, gate["BN"])  # parts of each head's share of z
        att_groups = triton.cdiv(att_blocks, att["GROUP"])
        gate_groups = triton.cdiv(H * gate_blocks, gate["GROUP"])
        tiles = triton.cdiv(B, att["BB"])
        att_counts = tiles * H * (att_groups + 1)
        dev, f32 = state.pos.device, torch.float32
        if B not in self.counts:  # made once (before any CUDA graph captures the step)
            self.counts[B] = torch.zeros(att_counts + B * (gate_groups + 1), device=dev, dtype=torch.int32)
        empty = lambda *shape: torch.empty(shape, device=dev, dtype=f32)  # noqa: E731
        return StepScratch(
            v=empty(B, D), x=empty(B, H, M), a_parts=empty(B * H, att_blocks, D),
            a_groups=empty(B * H, att_groups, D), ln_a=empty(B * H, D), z_parts=empty(B, H * gate_blocks, D),
            z_groups=empty(B, gate_groups, D), pos_now=torch.empty((B,), device=dev, dtype=state.pos.dtype),
            att_counts=self.counts[B][:att_counts], gate_counts=self.counts[B][att_counts:],
            att_grid=(tiles * H, att_blocks), gate_grid=(B * H, gate_blocks),
        )  # fmt: skip

    def __call__(
        self, byte: torch.Tensor, state: RecurrentState, lazy: LazyDecay | None = None
    ) -> torch.Tensor:
        cfg, att, gate = self.config, self.attention, self.gate
        B, H, M, D = state.layers[0].shape
        s = self._scratch(state)
        _step_embed_kernel[(B,)](
            byte, self.embed, s.v, state.pos, s.pos_now, B, D, ROW_POS=state.pos.dim() == 1,
            B_PAD=pow2(B, 1), D_PAD=pow2(D), PDL=self.pdl,
        )  # fmt: skip
        origin = lazy.origin if lazy is not None else s.pos_now  # without one: a pointer, never read
        for S in state.layers:  # B, h, M, d float32
            _step_attention_kernel[s.att_grid](
                s.v, self.Dx, self.pair_freq, s.pos_now, S, origin, s.x, s.a_parts, s.a_groups, s.att_counts,
                s.ln_a, self.gamma, B, H, M, D, INTERLEAVED=cfg.rope_style == "interleaved",
                BR=pow2(att["BB"], DOT_ROWS), GROUPS=pow2(s.a_groups.shape[1], 1), D_PAD=pow2(D),
                PDL=self.pdl, DECAY=cfg.half_lives is not None, LAZY=lazy is not None, launch_pdl=self.pdl,
                **att,
            )  # fmt: skip
            _step_gate_kernel[s.gate_grid](
                s.ln_a, s.x, self.DyT, self.E, s.z_parts, s.z_groups, s.gate_counts, s.v, H, M, D,
                GROUPS=pow2(s.z_groups.shape[1], 1), D_PAD=pow2(D), PDL=self.pdl, launch_pdl=self.pdl, **gate,
            )  # fmt: skip
        return s.v.to(self.readout.dtype) @ self.readout  # B, V

"""What the fused kernels share: the interpreter's switch, the relu that keeps NaN, which neurons come
first in their RoPE pairs, dropout's mask of a tile of pairs, and a dot that the interpreter computes
right."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from model import BDHConfig

# Triton's CPU interpreter (TRITON_INTERPRET=1, for the tests) multiplies bf16 wrongly: upcast there.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does (tl.maximum alone would return 0)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


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


def first_of_pairs(cfg: BDHConfig) -> slice:
    """Which of a head's n/h dimensions come first in their RoPE pair (each pair has one angle)."""
    return slice(0, None, 2) if cfg.rope_style == "interleaved" else slice(0, cfg.head_size // 2)


@triton.jit
def keep_pair(seed, rows, h, p, half, M, H, p_drop):
    """Inverted dropout for both halves of a tile of pairs: 1 / (1 - p) where a neuron is kept, 0 where
    dropped; the same in forward and backward. One Philox draw per pair gives four numbers: the
    first decides the pair's first member, the second its second."""
    pair = rows[:, None] * (H * half) + (h * half + p)[None, :]  # the pair's index among all B*T*n/2
    ua, ub, _, _ = tl.rand4x(seed, pair)
    scale = 1.0 / (1.0 - p_drop)
    return tl.where(ua >= p_drop, scale, 0.0), tl.where(ub >= p_drop, scale, 0.0)

"""What the fused kernels of both forms share: the interpreter's switch, the relu that keeps NaN, and
which neurons come first in their RoPE pairs."""

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


def first_of_pairs(cfg: BDHConfig) -> slice:
    """Which of a head's n/h dimensions come first in their RoPE pair (each pair has one angle)."""
    return slice(0, None, 2) if cfg.rope_style == "interleaved" else slice(0, cfg.head_size // 2)

"""Compile every Triton kernel of the fused paths for a Hopper GPU, on the CPU: Triton's CUDA
compiler runs without a device (a stand-in driver names the target; each launch compiles and returns
before it would run). The CPU interpreter, which the other tests use, accepts code the compiler
refuses (a name reused with another type in a loop, say): this is the check that catches it.

    python tests/compile_kernels.py   # prints the compiled kernels' names, one line of JSON

Run by tests/test_kernels_compile.py in a process of its own, without TRITON_INTERPRET.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: real JIT functions
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # an H100 or H200: what the kernels are tuned for
COMPILED: list[str] = []


class CompileOnlyDriver:
    """What JITFunction.run asks of a driver before it compiles: a device, a stream, a target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


def compile_only(run):
    """JITFunction.run that compiles (warmup) and never launches; it records the kernel's name."""

    def wrapped(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append(self.fn.__name__)
        return kernel

    return wrapped


def generation_steps() -> None:
    """FusedStep with and without decay, lazy and every row decaying, with the Hopper launch."""
    from dragon_hatchling.fused_recurrent import FusedStep, LazyDecay
    from model import BDH, BDHConfig

    for half_lives in (None, [4.0, 16.0]):
        cfg = BDHConfig(n_embd=64, n_head=2, n_neurons=512, n_layer=1, dropout=0.0, half_lives=half_lives)
        model = BDH(cfg).eval()
        state = model.initial_state(2, "cpu")
        step = FusedStep(model)
        step.pdl = True  # what an H100 or H200 launches
        step(torch.tensor([1, 2]), state)
        if half_lives is not None:
            step(torch.tensor([1, 2]), state, LazyDecay(model, state))


def training_steps() -> None:
    """The training layer forward and backward, with dropout: no decay, decay, learned decay, each
    without a state and with one carried over two windows."""
    from dragon_hatchling.fused_parallel import Fused, fused_forward
    from model import BDH, BDHConfig

    for half_lives, learn in ((None, False), ([4.0, 16.0], False), ([4.0, 16.0], True)):
        cfg = BDHConfig(n_embd=64, n_head=2, n_neurons=512, n_layer=1, dropout=0.1)
        model = BDH(dataclasses.replace(cfg, half_lives=half_lives, learn_decay=learn)).train()
        idx = torch.randint(0, 256, (2, 16))
        fused_forward(model, idx, idx)[1].backward()
        state = Fused(model).initial_state(2)
        for _ in range(2):
            _, loss, state = fused_forward(model, idx, idx, state)
            loss.backward()


if __name__ == "__main__":
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_only(JITFunction.run)
    generation_steps()
    training_steps()
    print(json.dumps(sorted(set(COMPILED))))

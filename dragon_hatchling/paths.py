"""Which forward pass a script runs, the fastest tested one by default:

    fused     the Triton kernels of fused_parallel.py (BDH on CUDA with Triton: the default there)
    compiled  plain PyTorch through torch.compile (a GPT on CUDA, or BDH with --no_fused)
    eager     plain PyTorch as it is (the CPU, or --no_compile)

Every path computes the model's forward(); the tests hold the fused one to the plain one.
"""

from __future__ import annotations

import torch

from dragon_hatchling.cli import UsageError

FUSED, COMPILED, EAGER = "fused", "compiled", "eager"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(
    model_cls: type,
    device: torch.device,
    fused: bool | None,
    compile: bool | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> str:
    """The path for a model class on a device in a dtype: --fused / --no_fused (None: the fused
    kernels wherever they run: CUDA, Triton, bfloat16) and --compile / --no-compile (None: compiled
    on CUDA). A UsageError for a path that cannot run there."""
    if fused:
        check_fused(model_cls, device, dtype)
    elif fused is None:
        try:
            check_fused(model_cls, device, dtype)
        except UsageError:
            fused = False
        else:
            fused = True
    if fused:
        if compile:
            raise UsageError(
                "--compile compiles the plain PyTorch path; the fused kernels run on their own "
                "(add --no_fused for the plain path, compiled)"
            )
        return FUSED
    on = compile if compile is not None else device.type == "cuda"
    return COMPILED if on else EAGER


def check_fused(model_cls: type, device: torch.device, dtype: torch.dtype | None) -> None:
    """A UsageError, saying why, if the fused kernels cannot compute this model here."""
    if device.type != "cuda":
        raise UsageError(f"--fused runs Triton kernels on CUDA; the device is {device} (leave out --fused)")
    if not model_cls.has_fused_path:
        name = model_cls.display_name
        raise UsageError(f"--fused runs BDH's kernels; a {name} runs through torch (leave out --fused)")
    if dtype != torch.bfloat16:
        raise UsageError(
            f"--fused computes in bfloat16; --dtype {str(dtype).removeprefix('torch.')} asks for "
            "another precision (pass --no_fused)"
        )
    if not triton_available():
        raise UsageError("--fused needs Triton, which is not installed here (pass --no_fused)")


def forward_of(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module a path calls as module(idx, targets) -> (logits, loss)."""
    if path == FUSED:
        from dragon_hatchling.fused_parallel import Fused  # imports Triton

        return Fused(model)
    return torch.compile(model) if path == COMPILED else model

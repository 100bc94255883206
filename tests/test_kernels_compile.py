"""Every Triton kernel of the fused paths compiles for a Hopper GPU (tests/compile_kernels.py, on the
CPU): the interpreter the other tests run in accepts code that the compiler refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dragon_hatchling import fused_parallel, fused_recurrent

HERE = Path(__file__).resolve().parent


def launched_kernels() -> set[str]:
    """The names of the modules' kernels (the JIT functions each path launches)."""
    return {
        name
        for module in (fused_parallel, fused_recurrent)
        for name in vars(module)
        if name.startswith("_") and name.endswith("_kernel")
    }


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(HERE / "compile_kernels.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert compiled == launched_kernels(), (compiled, launched_kernels())

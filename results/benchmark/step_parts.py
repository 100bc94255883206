"""Where FusedStep's time goes: each kernel's time with parts of its work switched off through the weights.

The same kernels, timed by the profiler (eager, 20 steps) on copies of the trained model whose weights
make parts of the work vanish:
- trained: the model as it is;
- no E rows: Dy = 0, so y = 0 and the gate reads no row of E (it still reads Dy^T's live rows);
- nothing live: the byte embedding = 0, so v = 0 and x = 0 in every layer: the attention kernel
  reads Dx but no state row, the gate reads x and nothing else. What is left is each kernel's fixed
  cost: launch, Dx, and the sums over programs.

    python3 results/benchmark/step_parts.py --model_path .gpu/model
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_tiles  # noqa: E402

import benchmark  # noqa: E402
from kernels import FusedStep  # noqa: E402


def kernel_us(model, state0, byte, steps: int = 20) -> dict[str, float]:
    """Mean microseconds per launch of each step kernel over `steps` eager steps."""
    fused, state = FusedStep(model), state0.clone()
    fused(byte, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fused(byte, state)
        torch.cuda.synchronize()
    return {
        e.key: e.device_time_total / e.count
        for e in prof.key_averages()
        if e.key.startswith("_step_") and e.count
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    args = p.parse_args()
    model, _, byte, _ = step_tiles.prepared(args.model_path)
    prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
    no_e = copy.deepcopy(model)
    no_e.Dy.data.zero_()
    nothing = copy.deepcopy(model)
    nothing.embed.weight.data.zero_()
    print(f"tiles: {FusedStep.ATTENTION_TILES} {FusedStep.GATE_TILES}")
    with torch.no_grad():
        for name, m in (("trained", model), ("no E rows", no_e), ("nothing live", nothing)):
            _, _, state0 = m.forward_chunked(prompt, chunk_size=256)
            times = kernel_us(m, state0, byte)
            shown = ", ".join(f"{k} {t:.1f} us" for k, t in sorted(times.items()))
            print(f"{name:>14}: {shown}", flush=True)


if __name__ == "__main__":
    main()

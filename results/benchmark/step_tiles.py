"""Tile sweep for kernels.FusedStep (the recurrent step of generation) on one GPU.

Times one step of the whole model (all layers, readout) replayed as a CUDA graph, for tiles of the
attention kernel (gate tiles at their defaults), then for gate tiles (the fastest attention tiles),
checks each against the default tiles' logits, and runs `benchmark.py --parts generate` with the
fastest: those become FusedStep's defaults.

    python3 results/benchmark/step_tiles.py --model_path .gpu/model --out OUT_DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import benchmark  # noqa: E402
from hub import load_model  # noqa: E402
from kernels import FusedStep  # noqa: E402

BEFORE = (  # the tiles timed before this sweep (state and Dy^T read a whole row at a time)
    {"BP": 32, "BK": 32, "BD": 256, "num_warps": 4},
    {"BN": 64, "CHUNKS": 8, "BD": 256, "num_warps": 4},
)


def ms_per_step(model, state0, byte, attention: dict, gate: dict, reference: torch.Tensor | None):
    fused = FusedStep(model, attention, gate)
    state = state0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = fused(byte, state).float()  # compiles
    torch.cuda.current_stream().wait_stream(side)
    if reference is not None:
        torch.testing.assert_close(first, reference, rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused(byte, state)
    for _ in range(10):
        graph.replay()
    return 1000 * benchmark.cuda_time(graph.replay, 100, 3) / 100, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(args.model_path)
    model = model.cuda().to(torch.bfloat16).eval()
    prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
    byte = torch.tensor([101], device="cuda")
    rows = []
    with torch.no_grad():
        _, _, state0 = model.forward_chunked(prompt, chunk_size=256)
        before, ref = ms_per_step(model, state0, byte, *BEFORE, None)
        rows.append({"attention": BEFORE[0], "gate": BEFORE[1], "ms": before, "note": "before"})
        print(f"before: {before:.3f} ms {BEFORE}", flush=True)

        def run(att, gate):
            try:
                ms, _ = ms_per_step(model, state0, byte, att, gate, ref)
            except Exception as e:  # a tile the GPU cannot take (registers, shared memory)
                ms = None
                print(f"failed {att} {gate}: {str(e)[:200]}", flush=True)
            rows.append({"attention": att, "gate": gate, "ms": ms})
            print(f"{'-' if ms is None else f'{ms:.3f}'} ms {att} {gate}", flush=True)
            return ms if ms is not None else float("inf")

        gate0 = dict(FusedStep.GATE_TILES)
        best_att = min(
            (
                {"BP": bp, "BK": bk, "BD": bd, "num_warps": w}
                for bp, bk, bd, w in itertools.product([32, 64, 128], [8, 16], [64], [4, 8])
            ),
            key=lambda att: run(att, gate0),
        )
        best_gate = min(
            (
                {"BN": bn, "CHUNKS": c, "BD": bd, "num_warps": w}
                for bn, c, bd, w in itertools.product([64, 128], [2, 4], [128], [4])
            ),
            key=lambda gate: run(best_att, gate),
        )
        best = run(best_att, best_gate)
        print(f"fastest: {best:.3f} ms (before {before:.3f} ms) {best_att} {best_gate}", flush=True)
        from torch.profiler import ProfilerActivity, profile

        for label, tiles in (("before", BEFORE), ("fastest", (best_att, best_gate))):
            fused, state = FusedStep(model, *tiles), state0.clone()
            fused(byte, state)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fused(byte, state)
                torch.cuda.synchronize()
            print(label, "(eager, 20 steps)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    (args.out / "step_tiles.json").write_text(
        json.dumps({"best": {"attention": best_att, "gate": best_gate}, "rows": rows}, indent=1)
    )
    FusedStep.ATTENTION_TILES, FusedStep.GATE_TILES = best_att, best_gate
    benchmark.main(
        ["--parts", "generate", "--model_path", args.model_path, "--out", str(args.out / "generate.json")]
    )


if __name__ == "__main__":
    main()

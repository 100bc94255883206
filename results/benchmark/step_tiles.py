"""Tile sweep for fused_recurrent.FusedStep (the recurrent step of generation) on one GPU.

Times one step of the whole model (all layers, readout) as generation runs it:
`sampling.GraphedStep`, a CUDA graph replayed per byte. Sweeps the attention kernel's tiles (gate
tiles at their defaults), then the gate kernel's (the fastest attention tiles), then the group size
of both kernels' sums; checks each step's logits against the plain PyTorch step; profiles the
fastest eagerly; and runs `python -m dragon_hatchling.benchmark --parts generate` with the fastest
tiles (which become FusedStep's defaults) for the trained model and for a freshly initialised one.
--before times the FusedStep of an earlier kernels.py or fused_recurrent.py (with its own default
tiles) in the same run.

    python3 results/benchmark/step_tiles.py --model_path .gpu/model --out OUT_DIR [--before FILE]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dragon_hatchling import benchmark  # noqa: E402
from dragon_hatchling.cli import Parser, UsageError, module_from_file, run_command  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402
from dragon_hatchling.fused_recurrent import FusedStep  # noqa: E402
from dragon_hatchling.loading import load_model  # noqa: E402
from dragon_hatchling.sampling import GraphedStep  # noqa: E402


@torch.no_grad()
def prepared(model_path: str) -> tuple:
    """What every step timing starts from: the model in bf16 on the GPU (eval), its state after
    benchmark.PROMPT, the byte each step takes, and the plain PyTorch step's logits for that byte."""
    model, _ = load_model(model_path)
    model = model.cuda().to(torch.bfloat16).eval()
    prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
    byte = torch.tensor([101], device="cuda")
    _, _, state0 = model.forward_chunked(prompt, chunk_size=256)
    reference = model.step(byte, state0.clone()).float()  # the plain PyTorch step, bf16
    return model, state0, byte, reference


def ms_per_step(model, state0, byte, fused, reference: torch.Tensor, lazy: bool = True) -> tuple:
    """Milliseconds per replay of the captured step, and its first logits' error against reference
    (lazy: with lazy decay, for a model with decay; an earlier FusedStep takes none)."""
    run = GraphedStep(model, state0.clone(), fused, lazy_decay=lazy)
    first = run(byte).float()
    err = ((first - reference).norm() / reference.norm()).item()
    for _ in range(10):
        run(byte)
    return 1000 * cuda_time(lambda: run(byte), 100, 3) / 100, err


def attention_tiles(att0: dict) -> list[dict]:
    """The attention kernel's candidates: pairs a program (BP) by state values a row (BD) by warps,
    at most 8,192 values a tile, whole rows in flight and no idle warps."""
    return [{**att0, "BP": bp, "BD": bd, "num_warps": w}
            for bp, bd, w in itertools.product([16, 32, 64], [32, 64, 128, 256], [2, 4, 8])
            if bp * bd <= 8192 and w * 32 <= bp * bd // 16]  # fmt: skip


def gate_tiles(gate0: dict) -> list[dict]:
    """The gate kernel's candidates: neurons a program (BN) by d a step (BD) by warps; BD 256 reads
    the default model's whole rows in one pass (fewer dependent round trips)."""
    return [{**gate0, "BN": bn, "BD": bd, "num_warps": w}
            for bn, bd, w in itertools.product([64, 128, 256], [64, 128, 256], [2, 4, 8])
            if bn * bd <= 128 * 128]  # fmt: skip


def group_pairs(att: dict, gate: dict) -> list[tuple[dict, dict]]:
    """Both kernels' group sizes of their sums, every pair."""
    return [({**att, "GROUP": g1}, {**gate, "GROUP": g2})
            for g1, g2 in itertools.product([8, 16, 32], [8, 16, 32])]  # fmt: skip


class Sweep:
    """Times FusedStep at one pair of tiles after another on one model, keeping every row (written to
    OUT/step_tiles.json after each, so that a command stopped mid-sweep keeps what it measured)."""

    def __init__(self, model_path: str, out: Path) -> None:
        self.model, self.state0, self.byte, self.reference = prepared(model_path)
        self.out, self.rows = out, []

    def time(self, att: dict | None, gate: dict | None, make=None, note: str = "") -> float:
        """ms a step at these tiles (inf where the GPU cannot take them or the logits are wrong);
        make: the class of the step (FusedStep, or an earlier one with its own tiles)."""
        make = make or FusedStep
        try:
            step = make(self.model, att, gate)
            ms, err = ms_per_step(self.model, self.state0, self.byte, step, self.reference, make is FusedStep)
        except Exception as e:  # a tile the GPU cannot take (registers, shared memory)
            ms, err = None, None
            print(f"failed {att} {gate}: {str(e)[:300]}", flush=True)
        self.rows.append({"attention": att, "gate": gate, "ms": ms, "rel_err_vs_plain": err, "note": note})
        self.save()
        print(f"{'-' if ms is None else f'{ms:.3f} ms, error {err:.1e}'} {note} {att} {gate}", flush=True)
        return float("inf") if ms is None or err > 5e-2 else ms

    def save(self, best: tuple[dict, dict] | None = None) -> None:
        found = {"best": {"attention": best[0], "gate": best[1]}} if best else {}
        (self.out / "step_tiles.json").write_text(json.dumps({**found, "rows": self.rows}, indent=1))

    def fastest(self) -> tuple[dict, dict]:
        """Attention tiles first (gate at its defaults), then the gate's, then both group sizes."""
        att0, gate0 = dict(FusedStep.ATTENTION_TILES), dict(FusedStep.GATE_TILES)
        self.time(att0, gate0, note="default tiles")
        att = min(attention_tiles(att0), key=lambda a: self.time(a, gate0))
        gate = min(gate_tiles(gate0), key=lambda g: self.time(att, g))
        return min(group_pairs(att, gate), key=lambda tiles: self.time(*tiles))


def profile_fastest(sweep: Sweep, att: dict, gate: dict) -> None:
    """Print where 20 eager steps at these tiles spend the GPU's time."""
    from torch.profiler import ProfilerActivity, profile

    fused, state = FusedStep(sweep.model, att, gate), sweep.state0.clone()
    fused(sweep.byte, state)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fused(sweep.byte, state)
        torch.cuda.synchronize()
    print("fastest tiles, eager, 20 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def run(argv: list[str] | None) -> None:
    """Parse the flags, sweep the tiles, profile the fastest, then benchmark generation with them."""
    p = Parser(description=__doc__)
    p.add_argument("--model_path", required=True, help="the trained model (evaluate.py's --model_path)")
    p.add_argument("--out", type=Path, required=True, help="folder for step_tiles.json and the benchmarks")
    p.add_argument("--before", type=Path, help="an earlier kernels.py whose FusedStep to time alongside")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError("step_tiles.py times the fused step's CUDA graph: it needs a CUDA GPU")
    before = module_from_file(args.before, "kernels_before", "--before") if args.before else None
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        sweep = Sweep(args.model_path, args.out)
        if before is not None:
            sweep.time(None, None, before.FusedStep, f"before ({args.before.name}, its default tiles)")
        att, gate = sweep.fastest()
        print(f"fastest: {sweep.time(att, gate, note='fastest'):.3f} ms {att} {gate}", flush=True)
        profile_fastest(sweep, att, gate)
    sweep.save((att, gate))
    FusedStep.ATTENTION_TILES, FusedStep.GATE_TILES = att, gate
    generate = ["--parts", "generate", "--out"]
    benchmark.main([*generate, str(args.out / "generate.json"), "--model_path", args.model_path])
    benchmark.main([*generate, str(args.out / "generate-init.json")])  # a fresh model


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags and files (--before, --model_path)."""
    run_command(run, argv)


if __name__ == "__main__":
    main()

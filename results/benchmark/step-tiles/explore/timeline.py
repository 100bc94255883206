"""Where a generation step's time goes, program by program: the step kernels of kernels.py with
%globaltimer stamps at their phase boundaries, captured and replayed as generation runs them.
Ad-hoc, from the repository root (the trained model in .gpu/model):

    python3 results/benchmark/step-tiles/explore/timeline.py [KERNELS_PY]

Stamps, per program: attention 0 start, 1 after waiting for the previous kernel, 2 after x is
stored, 3 after the state rows, 4 end; gate 0 start, 1 after waiting, 2 after y, 3 before the
sums, 4 end. The patched copy is made by text replacement (each must match once), so the kernels
timed are the file's own. Also times generate()'s parts: the prompt, building the graph, the loop.

timeline-1-68fba39.log: the kernels and generate() of commit 68fba39 (the graph captured with
torch.cuda.graph, sampling outside it). timeline-2-fixed-point.log: the fixed-point sums of
ab-5-fixed-point.diff (its phase columns are in ms: an earlier version of this script divided by
1000 twice). timeline-3-graph-sampling.log: the kernels of 68fba39 with generate() of 8274cef.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles  # noqa: E402

import benchmark  # noqa: E402

STAMP = (
    "tl.store(stamp_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 8 + {i}, "
    "tl.extra.cuda.globaltimer())"
)


def patched(source: str) -> str:
    """kernels.py with stamps: of commit 68fba39 (two-level sums) or of the fixed-point sums after it."""

    def sub(olds: str | tuple, new: str) -> None:  # the first of olds that is there, once
        nonlocal source
        for old in (olds,) if isinstance(olds, str) else olds:
            if old in source:
                assert source.count(old) == 1, old
                source = source.replace(old, new.replace("{old}", old))
                return
        raise AssertionError(olds)

    def stamp(i: int) -> str:
        return "    " + STAMP.format(i=i) + "\n"

    sub("    INTERLEAVED: tl.constexpr, BB", "    stamp_ptr, INTERLEAVED: tl.constexpr, BB")
    sub("    BN: tl.constexpr, BD: tl.constexpr, ", "    stamp_ptr, BN: tl.constexpr, BD: tl.constexpr, ")
    sub("    tile_h = tl.program_id(0)\n", stamp(0) + "{old}")
    sub(
        "        tl.extra.cuda.gdc_wait()  # the previous kernel has finished: v is written\n",
        "{old}" + stamp(1),
    )
    sub("    tl.store(x_ptr + (bb * H + h)[:, None] * M + j[None, :], x, mask=x_mask)\n", "{old}" + stamp(2))
    sub(
        ("    count_ptr += tile_h *", "    _finish_sum(\n        acc_ptr, bad_ptr, count_ptr + tile_h"),
        stamp(3) + "{old}",
    )
    sub(
        (
            "        RESIDUAL=False, GROUP=GROUP, GROUPS=GROUPS, D_PAD=D_PAD,\n    )  # fmt: skip\n",
            "        RESIDUAL=False, D_PAD=D_PAD,\n    )  # fmt: skip\n",
        ),
        "{old}" + stamp(4),
    )
    sub('    PDL: launched while the attention kernel ends, and waits for it."""\n', "{old}" + stamp(0))
    sub("gdc_wait()\n    bh = tl.program_id(0)\n", "gdc_wait()\n" + stamp(1) + "    bh = tl.program_id(0)\n")
    sub(
        (
            "    y = tl.maximum(y, 0.0) * x  # BN; sparser than x\n",
            "    y = _relu(y) * x  # BN; sparser than x\n",
        ),
        "{old}" + stamp(2),
    )
    sub(
        ("    count_ptr += b *", "    _finish_sum(\n        acc_ptr, bad_ptr, count_ptr + b"),
        stamp(3) + "{old}",
    )
    sub(
        (
            "        RESIDUAL=True, GROUP=GROUP, GROUPS=GROUPS, D_PAD=D_PAD,\n    )  # fmt: skip\n",
            "        RESIDUAL=True, D_PAD=D_PAD,\n    )  # fmt: skip\n",
        ),
        "{old}" + stamp(4),
    )
    sub("        for S in state.layers:", "        for li, S in enumerate(state.layers):")
    sub("launch_pdl=self.pdl, **att,", "launch_pdl=self.pdl, stamp_ptr=self.stamps[li, 0], **att,")
    sub(
        ("launch_pdl=self.pdl, **gate,", "launch_pdl=self.pdl,\n                **gate,"),
        "launch_pdl=self.pdl, stamp_ptr=self.stamps[li, 1], **gate,",
    )
    return source


def load(path: Path, stamps: bool = True):
    name = "kernels_timeline" if stamps else "kernels_untimed"
    out = Path(tempfile.mkdtemp()) / f"{name}.py"
    out.write_text(patched(path.read_text()) if stamps else path.read_text())
    return step_tiles.module_from_file(out, name)


def q(t: torch.Tensor) -> str:
    return f"med {t.median():6.2f} max {t.max():6.2f}"


@torch.no_grad()
def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "kernels.py")
    mod = load(path)
    model, s0, byte, ref = step_tiles.prepared(".gpu/model")
    fused = mod.FusedStep(model)
    L = model.config.n_layer
    fused.stamps = torch.zeros((L, 2, 1024, 8), dtype=torch.int64, device="cuda")
    ms, err = step_tiles.ms_per_step(model, s0, byte, fused, ref)
    plain_ms, _ = step_tiles.ms_per_step(model, s0, byte, load(path, stamps=False).FusedStep(model), ref)
    print(f"{path}: instrumented {ms:.4f} ms a step (err {err:.1e}); not instrumented {plain_ms:.4f} ms")
    st = fused.stamps.cpu()  # of the last replay
    n = 512  # programs of each kernel (the default tiles)
    origin = st[0, 0, :n, 0].min()
    prev_end = None
    for li in range(L):
        for k, name in enumerate(("attention", "gate")):
            s = (st[li, k, :n, :5] - origin).double() / 1000  # µs
            start, end = s[:, 0], s[:, 4]
            line = f"layer {li} {name:9s} start {start.min():7.2f}..{start.max():7.2f}"
            line += f" end {end.min():7.2f}..{end.max():7.2f} µs |"
            for a, b in ((0, 1), (1, 2), (2, 3), (3, 4)):
                line += f" {a}-{b} {q(s[:, b] - s[:, a])} |"
            line += f" wait done {s[:, 1].min():7.2f}..{s[:, 1].max():7.2f}"
            if prev_end is not None:
                line += f" (previous kernel's last end {prev_end:7.2f})"
            prev_end = end.max()
            print(line)
    # generate()'s parts, and the whole
    prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        logits, _, state = model.forward_chunked(prompt, chunk_size=256)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        run = model.graphed_step(state, sample=lambda logits: logits.argmax(-1, keepdim=True))
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        run(logits[:, -1].argmax(-1))
        for _ in range(998):
            run().clone()
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        model.generate(prompt, 1000, temperature=0.0)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        ms = [1e3 * (b - a) for a, b in zip(t, t[1:], strict=False)]
        print(
            "generate parts: prompt {:.2f} ms, graph {:.2f} ms, 999 steps {:.2f} ms;".format(*ms[:3]), end=""
        )
        print(f" generate() {ms[3]:.2f} ms")


if __name__ == "__main__":
    main()

"""The scaling table of results/several-gpus: 1 and 2 GPUs measured in the same command, 8 projected.

    python3 results/several-gpus/scaling.py ddp1.json ddp2.json --out scaling.json

Projection to N GPUs from the measured 2-GPU run: a ring all-reduce moves 2 (N-1)/N of the gradients
through each GPU's links, so at the same bus bandwidth it takes (2 (N-1)/N) / (2 (2-1)/2) times as long as
on 2 GPUs (1.75x for 8). Two estimates: the time a 2-GPU step takes beyond a 1-GPU step (the
exposed all-reduce, with DDP's bucket copies) grows 1.75x; or the bare all-reduce, grown 1.75x, is
added to the 1-GPU step with nothing hidden behind backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser, UsageError, in_file, out_file, positive_int, run_command  # noqa: E402
from dragon_hatchling.files import write_text  # noqa: E402

RUN_KEYS = {"device", "date", "torch", "command", "ddp"}
ROW_KEYS = {"batch_per_gpu", "window", "step_s", "bytes_per_s"}
ALLREDUCE_KEYS = {"allreduce_s", "allreduce_bytes"}  # what a run of several GPUs measures besides


def ring_factor(n: int) -> float:
    return (2 * (n - 1) / n) / (2 * (2 - 1) / 2)


def ddp_runs(path: Path, flag: str, row_keys: set[str]) -> dict:
    """A benchmark JSON with DDP rows (`benchmark.py --parts ddp`), or a one-line UsageError."""
    try:
        run = json.loads(path.read_text())
        rows_ok = all(row_keys <= row.keys() for row in run["ddp"])
        if RUN_KEYS <= run.keys() and run["ddp"] and rows_ok:
            return run
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise UsageError(f"{flag} {path}: expected benchmark.py's JSON with --parts ddp rows")


def scaling_row(r1: dict, r2: dict, n: int) -> dict:
    """One shape: the 1- and 2-GPU steps measured, and n GPUs projected both ways (the docstring's)."""
    t1, t2 = r1["step_s"], r2["step_s"]
    exposed = max(0.0, t2 - t1)
    t_overlap = t1 + exposed * ring_factor(n)
    t_none = t1 + r2["allreduce_s"] * ring_factor(n)
    two = {"world_size": 2, "bytes_per_s": r2["bytes_per_s"], "step_s": t2,
           "speedup": r2["bytes_per_s"] / r1["bytes_per_s"], "allreduce_s": r2["allreduce_s"],
           "allreduce_bytes": r2["allreduce_bytes"], "exposed_allreduce_s": exposed}  # fmt: skip
    return {
        "batch_per_gpu": r1["batch_per_gpu"],
        "window": r1["window"],
        "gpus": [{"world_size": 1, "bytes_per_s": r1["bytes_per_s"], "step_s": t1, "speedup": 1.0}, two],
        f"projected_{n}_gpus": {
            "world_size": n,
            "allreduce_s": r2["allreduce_s"] * ring_factor(n),
            "speedup_from_exposed": n * t1 / t_overlap,
            "speedup_from_allreduce": n * t1 / t_none,
        },
    }


def run(argv: list[str] | None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("one", type=in_file, help="benchmark.py --parts ddp JSON of 1 GPU")
    p.add_argument("two", type=in_file, help="the same of 2 GPUs")
    p.add_argument("--out", type=out_file, required=True, help="the table as JSON")
    p.add_argument("--project", type=positive_int, default=8, help="GPUs to project to (8; at least 2)")
    args = p.parse_args(argv)
    if args.project < 2:
        raise UsageError(f"--project: expected at least 2 GPUs, got {args.project}")
    one, two = ddp_runs(args.one, "one", ROW_KEYS), ddp_runs(args.two, "two", ROW_KEYS | ALLREDUCE_KEYS)
    if len(one["ddp"]) != len(two["ddp"]):
        raise UsageError(f"one, two: expected the same shapes, got {len(one['ddp'])} and {len(two['ddp'])}")
    rows = [scaling_row(r1, r2, args.project) for r1, r2 in zip(one["ddp"], two["ddp"], strict=True)]
    out = {"device": two["device"], "date": two["date"], "torch": two["torch"], "commands": [one["command"],
           two["command"]], "method": __doc__.strip().split("\n\n")[-1], "rows": rows}  # fmt: skip
    write_text(args.out, json.dumps(out, indent=2) + "\n")
    for r in rows:
        g2, proj = r["gpus"][1], r[f"projected_{args.project}_gpus"]
        ms = g2["allreduce_s"] * 1e3, g2["exposed_allreduce_s"] * 1e3
        low, high = sorted((proj["speedup_from_allreduce"], proj["speedup_from_exposed"]))
        print(
            f"{r['batch_per_gpu']} x {r['window']} per GPU: 2 GPUs {g2['speedup']:.2f}x (all-reduce "
            f"{ms[0]:.2f} ms, exposed {ms[1]:.2f} ms); {args.project} GPUs: {low:.2f}x to {high:.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags and files."""
    run_command(run, argv)


if __name__ == "__main__":
    main()

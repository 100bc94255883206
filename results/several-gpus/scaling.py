"""The scaling table of results/several-gpus: 1 and 2 GPUs measured in the same command, 8 projected.

    python3 results/several-gpus/scaling.py ddp1.json ddp2.json --out scaling.json

Projection to N GPUs from the measured 2-GPU run: a ring all-reduce moves 2 (N-1)/N of the gradients
through each GPU's links, so at the same bus bandwidth it takes (2 (N-1)/N) / (2 (2-1)/2) times as long as
on 2 GPUs (1.75x for 8). Two estimates: the time a 2-GPU step takes beyond a 1-GPU step (the
exposed all-reduce, with DDP's bucket copies) grows 1.75x; or the bare all-reduce, grown 1.75x, is
added to the 1-GPU step with nothing hidden behind backward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.files import write_text  # noqa: E402


def ring_factor(n: int) -> float:
    return (2 * (n - 1) / n) / (2 * (2 - 1) / 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("one", type=Path)
    p.add_argument("two", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--project", type=int, default=8)
    args = p.parse_args()
    one, two = (json.loads(f.read_text()) for f in (args.one, args.two))
    rows = []
    for r1, r2 in zip(one["ddp"], two["ddp"], strict=True):
        t1, t2 = r1["step_s"], r2["step_s"]
        exposed = max(0.0, t2 - t1)
        n = args.project
        t_overlap = t1 + exposed * ring_factor(n)
        t_none = t1 + r2["allreduce_s"] * ring_factor(n)
        rows.append(
            {
                "batch_per_gpu": r1["batch_per_gpu"],
                "window": r1["window"],
                "gpus": [
                    {"world_size": 1, "bytes_per_s": r1["bytes_per_s"], "step_s": t1, "speedup": 1.0},
                    {
                        "world_size": 2,
                        "bytes_per_s": r2["bytes_per_s"],
                        "step_s": t2,
                        "speedup": r2["bytes_per_s"] / r1["bytes_per_s"],
                        "allreduce_s": r2["allreduce_s"],
                        "allreduce_bytes": r2["allreduce_bytes"],
                        "exposed_allreduce_s": exposed,
                    },
                ],
                f"projected_{n}_gpus": {
                    "world_size": n,
                    "allreduce_s": r2["allreduce_s"] * ring_factor(n),
                    "speedup_from_exposed": n * t1 / t_overlap,
                    "speedup_from_allreduce": n * t1 / t_none,
                },
            }
        )
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

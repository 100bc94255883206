"""Does a trained model copy what it has just read? Windows of a text with a span of their own text
written again later in them (data.copy_plan: the spans that --copy_spans trains on), each scored
from an empty state: the mean loss over the span's bytes after its first, at its first reading and
at its second, by the distance between the two and by the span's length. A model that copies reads
the second almost free; one that does not pays for it what it paid the first time.

    uv run python results/tbptt/planted_copies.py --model_path RUN/checkpoints/last \
        --data_file ../shared/data/wikitext-2-raw-v1/wiki.valid.raw --out planted.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py

from dragon_hatchling.cli import Parser, UsageError, nonneg_int, out_file, positive_int, run_command  # noqa: E402
from dragon_hatchling.data import MIN_COPY, copy_plan, load_bytes_file, num_windows, windows_at  # noqa: E402
from dragon_hatchling.devices import resolve_device, resolve_dtype  # noqa: E402
from dragon_hatchling.loading import load_model  # noqa: E402
from dragon_hatchling.scoring import edge_bucket, edge_buckets, eval_mode, window_losses  # noqa: E402

DISTANCES = (64, 256, 1024)  # bucket edges, bytes between the two readings' starts
LENGTHS = (16, 64)  # bucket edges, the span's bytes


def planted(
    data: np.ndarray, seq_len: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The first `count` windows of the evaluation protocol (bytes [i T, i T + T + 1)), each with a
    span planted again later in it: inputs, targets (count, T) and the plan (count, 3: L, source,
    target), drawn as training draws --copy_spans 1 at step 0 of `seed`."""
    plan = copy_plan(count, seq_len, 1.0, seed, step=0)
    x, y = windows_at(data, [i * seq_len for i in range(count)], seq_len, plan)
    return x, y, plan


def losses_of(model, x: torch.Tensor, y: torch.Tensor, device, dtype, batch_size: int) -> np.ndarray:
    """The loss (nats) of every target of every window, each read from an empty state: count, T."""
    with eval_mode(model):
        parts = [
            window_losses(model, xb, yb, device, dtype)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
        ]
    return torch.cat(parts).cpu().numpy().astype(np.float64)


def readings(losses: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """(distance, length, first, second) a window: the mean loss over the span's bytes after its first
    at each reading. losses[:, j] scores the window's byte j + 1, so a span at s is losses[s : s+L-1]."""
    rows = []
    for row, (length, source, target) in enumerate(plan):
        first, second = (losses[row, s : s + length - 1].mean() for s in (source, target))
        rows.append((target - source, length, first, second))
    return np.array(rows, dtype=np.float64)


def summary(table: np.ndarray) -> dict:
    """The first and second readings' mean loss over all windows, by distance and by length."""

    def means(rows: np.ndarray) -> dict:
        return {"windows": len(rows), "first": float(rows[:, 2].mean()), "second": float(rows[:, 3].mean())}

    result = {"all": means(table)}
    for name, column, edges in (("by_distance", 0, DISTANCES), ("by_length", 1, LENGTHS)):
        keys = [edge_bucket(v, edges) for v in table[:, column]]
        result[name] = {k: means(table[[key == k for key in keys]]) for k in edge_buckets(edges) if k in keys}
    return result


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags, files and texts."""
    run_command(run, argv)


def run(argv: list[str] | None) -> None:
    """Parse the flags, then measure and write."""
    p = Parser(description=__doc__)
    p.add_argument("--model_path", required=True, help="a checkpoint folder or file (evaluate.py's)")
    p.add_argument("--data_file", required=True, help="the text to plant copies in (wiki.valid.raw)")
    p.add_argument("--seq_len", type=positive_int, default=1024, help="bytes a window (1024)")
    p.add_argument(
        "--windows", type=positive_int, default=512, help="windows scored, from the text's start (512)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="the plan's seed (0)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="windows a forward pass (16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (evaluate.py's)")
    p.add_argument("--out", type=out_file, default=None, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    if args.seq_len + 1 < 2 * MIN_COPY:
        raise UsageError(f"--seq_len {args.seq_len}: a span and its copy need {2 * MIN_COPY - 1} or more")
    data = load_bytes_file(args.data_file, "--data_file")
    if num_windows(data, args.seq_len) < args.windows:
        have = num_windows(data, args.seq_len)
        raise UsageError(
            f"--windows {args.windows}: --data_file holds {have} windows of {args.seq_len} bytes"
        )
    device = resolve_device(args.device)
    model = load_model(args.model_path)[0].to(device)
    x, y, plan = planted(data, args.seq_len, args.windows, args.seed)
    losses = losses_of(model, x, y, device, resolve_dtype("auto", device), args.batch_size)
    result = {**vars(args), **summary(readings(losses, plan))}
    print(json.dumps({k: result[k] for k in ("all", "by_distance", "by_length")}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The table and the figure of results/long-context/README.md, from the runs' own metrics files.

uv run python results/long-context/plot.py     # prints the table, writes loss_by_position.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402
from dragon_hatchling.plots import bucket_middles, plt, save  # noqa: E402 (matplotlib off screen, atomic writes)

HERE = Path(__file__).parent
RUNS = ["ref", "decay-t128", "decay-t128-same", "decay-t256", "decay-t512", "decay-t512-long"]


def metrics(run: str, folder: str = "") -> dict:
    return json.loads((HERE / "runs" / run / folder / "metrics.json").read_text())


def describe(run: str) -> tuple[str, str]:
    args = metrics(run)["args"]
    lives = ", ".join(f"{t:g}" for t in args["half_lives"]) if args["half_lives"] else "none"
    return f"{args['batch_size']} x {args['seq_len']}", lives


def table() -> str:
    buckets = ["0-127", "128-255", "256-511", "512-1023", "1024-2047", "2048-4095"]
    head = ["run", "windows", "half-lives", "stream", "128-byte windows", *buckets, "tokens: 128 / stream"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for run in RUNS:
        shape, lives = describe(run)
        by_position = metrics(run, "eval-valid-raw-4096")["loss_by_position"]
        row = [
            f"`{run}`",
            shape,
            lives,
            f"{metrics(run, 'eval-valid-raw-stream')['loss']:.4f}",
            f"{metrics(run, 'eval-valid-raw-128')['loss']:.4f}",
            *(f"{by_position[b]:.4f}" for b in buckets),
            f"{metrics(run, 'eval-valid-tokens-128')['loss']:.4f} / "
            f"{metrics(run, 'eval-valid-tokens-stream')['loss']:.4f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, folder, title in (
        (axes[0], "eval-valid-raw-4096", "wiki.valid.raw in 4,096-byte windows"),
        (axes[1], "eval-valid-raw-stream", "wiki.valid.raw read as one text (--stream)"),
    ):
        for run in RUNS:
            shape, lives = describe(run)
            middles, losses = bucket_middles(metrics(run, folder)["loss_by_position"])
            ax.plot(middles, losses, "o-", ms=3, label=f"{run} ({shape}; {lives})")
        ax.set_xscale("log")
        ax.set(title=title, xlabel="position (bytes before the scored byte)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set(ylabel="loss (nats/byte)", ylim=(0.6, 2.0))
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "BDH-GPU, 7,908 steps of 4,096 bytes of wiki.train.tokens, one H200 (2026-11-30)", fontsize=10
    )
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    print(table())


if __name__ == "__main__":
    main()
    plot(HERE / "loss_by_position.png")

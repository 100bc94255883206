"""The table and the figure of results/tbptt/README.md, from the runs' own metrics files (and the
long-context row's, in results/long-context/runs/default).

uv run python results/tbptt/plot.py     # prints the table, writes loss_by_position.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.plots import bucket_middles, plt, save  # noqa: E402 (matplotlib off screen, atomic writes)

HERE = Path(__file__).parent
RUNS = {  # name: its folder
    "long-context": HERE.parent / "long-context" / "runs" / "default",
    "tbptt-2048": HERE / "runs" / "tbptt-2048",
    "tbptt-512": HERE / "runs" / "tbptt-512",
    "gptxl": HERE / "runs" / "gptxl",
    "tbptt-512-reset": HERE / "runs" / "tbptt-512-reset",  # round 2: the RoPE fix, resets at articles
    "tbptt-512-recipe-lives": HERE / "runs" / "tbptt-512-recipe-lives",
    "lc-2048-lives": HERE / "runs" / "lc-2048-lives",  # round 2: not carried, longer windows and lives
    "lc-1024-lives": HERE / "runs" / "lc-1024-lives",
}
BUCKETS = ["256-511", "512-1023", "1024-2047", "2048-4095"]
LONG = ["4096-8191", "8192-16383"]


def metrics(run: str, folder: str = "") -> dict | None:
    path = RUNS[run] / folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recipe(run: str) -> str:
    m = metrics(run)
    args, shape = m["args"], f"{m['args']['batch_size']} x {m['args']['seq_len']}"
    if m.get("arch") == "gpt":
        return f"GPT, {shape}, memory {args['memory']}, ALiBi"
    lives = ", ".join(f"{t:g}" for t in args["half_lives"]) if args["half_lives"] else "none"
    carried = ", carried" + (f", reset at each {args['reset_state']}" if args.get("reset_state") else "")
    return f"BDH, {shape}, half-lives {lives}" + (carried if args.get("carry_state") else "")


def loss(run: str, folder: str) -> str:
    m = metrics(run, folder)
    return "-" if m is None else f"{m['loss']:.4f}"


def rise(by_position: dict | None) -> str:
    """2048-4095 minus 256-511: below zero where the loss falls with context."""
    return "-" if by_position is None else f"{by_position['2048-4095'] - by_position['256-511']:+.4f}"


def row(run: str) -> list[str]:
    m = metrics(run)
    w4096 = metrics(run, "eval-valid-raw-4096")["loss_by_position"]
    shifted = (metrics(run, "eval-valid-raw-4096-shifted") or {}).get("loss_by_position")
    w16k = (metrics(run, "eval-valid-raw-16384") or {}).get("loss_by_position", {})
    return [
        f"`{run}`",
        recipe(run),
        f"{m['steps']:,} of {m['total_steps']:,}",
        loss(run, "eval-valid-raw-128"),
        loss(run, "eval-valid-raw-stream"),
        loss(run, "eval-valid-tokens-128"),
        loss(run, "eval-valid-tokens-stream"),
        *(f"{w4096[b]:.4f}" for b in BUCKETS),
        rise(w4096),
        rise(shifted),
        *(f"{w16k[b]:.4f}" if b in w16k else "-" for b in LONG),
    ]


def table() -> str:
    head = ["run", "recipe", "steps", "raw 128", "raw whole", "tokens 128", "tokens whole",
            *BUCKETS, "2048-4095 minus 256-511", "shifted", *(f"16k: {b}" for b in LONG)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    return "\n".join(lines + ["| " + " | ".join(row(run)) + " |" for run in RUNS])


def plot(path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, folder, title in (
        (axes[0], "eval-valid-raw-4096", "wiki.valid.raw in 4,096-byte windows"),
        (axes[1], "eval-valid-raw-16384", "wiki.valid.raw in 16,384-byte windows"),
    ):
        for i, run in enumerate(RUNS):
            m = metrics(run, folder)
            if m is None:  # the long-context row was not scored in 16,384-byte windows
                continue
            middles, losses = bucket_middles(m["loss_by_position"])
            ax.plot(middles, losses, "o-", ms=3, color=f"C{i}", label=f"{run} ({recipe(run)})")
        ax.set_xscale("log")
        ax.set(title=title, xlabel="position in the window (bytes)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set(ylabel="loss (nats/byte)", ylim=(1.05, 1.45))
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Reference budget of wiki.train.tokens (round 1's tbptt-2048 and tbptt-512 cut at 88-89%), one H200",
        fontsize=10,
    )
    save(fig, path, dpi=110)


if __name__ == "__main__":
    print(table())
    plot(HERE / "loss_by_position.png")

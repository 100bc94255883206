"""The table and the figure of results/merging/README.md, from the evaluations' own metrics files.

uv run python results/merging/plot.py     # prints the table, writes merging.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402
from dragon_hatchling.plots import plt, save  # noqa: E402 (matplotlib off screen, atomic writes)

RUNS = Path(__file__).parent / "runs"
MODELS = {"base": "base", "tuned-a": "tuned on A", "tuned-b": "tuned on B", "merged": "A + B merged"}
TEXTS = {"a.heldout": "part A held out", "b.heldout": "part B held out", "valid": "wiki.valid.raw"}


def loss(model: str, text: str) -> float:
    return json.loads((RUNS / f"eval-{model}-{text}" / "metrics.json").read_text())["loss"]


def main(argv: list[str] | None = None) -> None:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    table = {m: [loss(m, t) for t in TEXTS] for m in MODELS}
    print("| model | " + " | ".join(TEXTS.values()) + " |")
    for m, row in table.items():
        print(f"| {MODELS[m]} | " + " | ".join(f"{x:.4f}" for x in row) + " |")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(MODELS)
    for i, (m, row) in enumerate(table.items()):  # one bar a model in each text's group
        xs = [t + (i - (len(MODELS) - 1) / 2) * width for t in range(len(TEXTS))]
        ax.bar(xs, row, width, label=MODELS[m])
    ax.set_xticks(range(len(TEXTS)), list(TEXTS.values()))
    low = min(min(r) for r in table.values())
    ax.set_ylim(low - 0.05, max(max(r) for r in table.values()) + 0.02)
    ax.set_ylabel("loss (nats/byte), 128-byte windows")
    ax.set_title("two tuned models merged into one of 2n neurons, no training after (section 7.1)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, Path(__file__).parent / "merging.png")


if __name__ == "__main__":
    main()

"""Validation loss of the fused run against the plain foundation run: results/fused/compare.png.

uv run results/fused/compare.py
"""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402
from dragon_hatchling.plots import plt, save  # noqa: E402 (matplotlib off screen, atomic writes)

HERE = Path(__file__).resolve().parent
RUNS = {
    "fused, cuBLAS + Triton (8593fcb)": HERE / "run/log.csv",
    "plain (torch.compile)": HERE / "../foundation/run/log.csv",
}
COLUMNS = {"val_loss": "raw validation", "val_loss_wiki_valid_tokens": "tokenized validation"}


def validation_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r["val_loss"]]


def main(argv: list[str] | None = None) -> None:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (column, title) in zip(axes, COLUMNS.items(), strict=True):
        for (label, path), style in zip(RUNS.items(), ("-o", "--s"), strict=True):
            rows = validation_rows(path)
            ax.plot(
                [int(r["step"]) for r in rows], [float(r[column]) for r in rows], style, label=label, ms=4
            )
        ax.set(title=f"{title} loss", xlabel="step", ylabel="nats/byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("BDH-GPU d=256 h=4 n=32768 L=6, 3 epochs, H100 bf16: fused vs plain")
    save(fig, HERE / "compare.png")
    for column in COLUMNS:
        print(column, {label: validation_rows(path)[-1][column] for label, path in RUNS.items()})


if __name__ == "__main__":
    main()

"""The default command after the epoch sampler's fix (run/) against results/long-context/runs/default
(before it): the rows before the first epoch edge (step 2636) are the same, and where they part.

    uv run python results/epoch-edges/compare.py
"""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402

HERE = Path(__file__).resolve().parent
BEFORE = HERE.parent / "long-context/runs/default/log.csv"


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    before, now = rows(BEFORE), rows(HERE / "run/log.csv")
    same = [b["train_loss"] == n["train_loss"] for b, n in zip(before, now, strict=True)]
    first = same.index(False) if False in same else None
    last_same, first_other = now[first - 1]["step"], now[first]["step"]
    print(f"{len(now)} logged rows; the same train loss in the first {first} (to step {last_same}); "
          f"the first that differs is step {first_other}")  # fmt: skip
    return 0 if first is not None and all(same[:first]) and int(now[first]["step"]) >= 2636 else 1


if __name__ == "__main__":
    raise SystemExit(main())

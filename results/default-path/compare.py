"""The default command of 2026-12-02 (fused by default) against the committed run of 2026-11-30
(`--fused` asked for): the same loss at every logged step?

    uv run python results/default-path/compare.py
"""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402

HERE = Path(__file__).resolve().parent
BEFORE = HERE.parent / "long-context/runs/default/log.csv"
KEYS = ("train_loss", "val_loss", "val_bpb", "lr", "val_loss_wiki_valid_tokens", "val_bpb_wiki_valid_tokens")


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    before, now = rows(BEFORE), rows(HERE / "run/log.csv")
    assert [r["step"] for r in before] == [r["step"] for r in now], "the logged steps differ"
    differ = [
        (b["step"], k, b[k], n[k]) for b, n in zip(before, now, strict=True) for k in KEYS if b[k] != n[k]
    ]
    print(f"{len(now)} logged steps, {len(differ)} values differ" + "".join(f"\n  {d}" for d in differ[:10]))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())

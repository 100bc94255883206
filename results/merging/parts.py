"""The texts of the merging experiment (issue 28, section 3), cut from wiki.train.tokens by article:
the first half of the articles trains the base model, the next quarter (part A) and the last quarter
(part B) tune its two copies, and the last tenth of each part's articles is held out to score them.

    python3 results/merging/parts.py --train_file .gpu/data/wiki.train.tokens --out_dir .gpu/parts

Writes base.txt, a.txt, a.heldout.txt, b.txt, b.heldout.txt (bytes as they are in the file). An
article begins at a top-level heading line (" = Title = ", dragon_hatchling.carried.article_starts,
the rule --reset_state article uses); the bytes before the first heading, if any, go with the first
article.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.carried import article_starts  # noqa: E402
from dragon_hatchling.cli import Parser, UsageError, in_file, make_out_dir, run_command  # noqa: E402


def articles(text: bytes) -> list[bytes]:
    """The file cut before every article's first line (keeping every byte)."""
    starts = article_starts(np.frombuffer(text, dtype=np.uint8)).tolist()
    bounds = [0, *starts[1:], len(text)]  # what comes before the first heading goes with the first article
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def parts(pieces: list[bytes]) -> dict[str, bytes]:
    n = len(pieces)
    base, a, b = pieces[: n // 2], pieces[n // 2 : 3 * n // 4], pieces[3 * n // 4 :]
    out = {"base.txt": b"".join(base)}
    for name, part in (("a", a), ("b", b)):
        cut = len(part) - max(1, len(part) // 10)
        out[f"{name}.txt"], out[f"{name}.heldout.txt"] = b"".join(part[:cut]), b"".join(part[cut:])
    return out


def run(argv: list[str] | None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--train_file", type=in_file, required=True, help="wiki.train.tokens")
    p.add_argument("--out_dir", required=True, help="folder for the five files")
    args = p.parse_args(argv)
    text = args.train_file.read_bytes()
    pieces = articles(text)
    assert b"".join(pieces) == text, "the articles hold every byte of the file"
    if len(pieces) < 8:  # each part's last tenth must leave it an article to tune on
        raise UsageError(f"--train_file {args.train_file}: expected at least 8 articles, found {len(pieces)}")
    out = make_out_dir(args.out_dir)
    for name, data in parts(pieces).items():
        (out / name).write_bytes(data)
        print(f"{name}: {len(data):,} bytes")
    print(f"{len(pieces):,} articles")


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags and files."""
    run_command(run, argv)


if __name__ == "__main__":
    main()

"""The texts of the merging experiment (issue 28, section 3), cut from wiki.train.tokens by article:
the first half of the articles trains the base model, the next quarter (part A) and the last quarter
(part B) tune its two copies, and the last tenth of each part's articles is held out to score them.

    python3 results/merging/parts.py --train_file .gpu/data/wiki.train.tokens --out_dir .gpu/parts

Writes base.txt, a.txt, a.heldout.txt, b.txt, b.heldout.txt (bytes as they are in the file). An
article begins at a top-level heading line (" = Title = "); the bytes before the first heading, if
any, go with the first article.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

HEADING = re.compile(rb"^ = [^=].* = $")


def articles(text: bytes) -> list[bytes]:
    """The file cut before every top-level heading line (keeping every byte)."""
    lines = text.split(b"\n")
    starts = [i for i, line in enumerate(lines) if HEADING.match(line)] or [0]
    starts[0] = 0
    bounds = [*starts, len(lines)]
    spans = itertools.pairwise(bounds)
    return [b"\n".join(lines[a:b]) + (b"\n" if b < len(lines) else b"") for a, b in spans]


def parts(pieces: list[bytes]) -> dict[str, bytes]:
    n = len(pieces)
    base, a, b = pieces[: n // 2], pieces[n // 2 : 3 * n // 4], pieces[3 * n // 4 :]
    out = {"base.txt": b"".join(base)}
    for name, part in (("a", a), ("b", b)):
        cut = len(part) - max(1, len(part) // 10)
        out[f"{name}.txt"], out[f"{name}.heldout.txt"] = b"".join(part[:cut]), b"".join(part[cut:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", required=True, help="wiki.train.tokens")
    p.add_argument("--out_dir", required=True, help="folder for the five files")
    args = p.parse_args()
    text = Path(args.train_file).read_bytes()
    pieces = articles(text)
    assert b"".join(pieces) == text, "the articles hold every byte of the file"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in parts(pieces).items():
        (out / name).write_bytes(data)
        print(f"{name}: {len(data):,} bytes")
    print(f"{len(pieces):,} articles")


if __name__ == "__main__":
    main()

"""The concept and contrast sentences of the monosemantic-synapse runs, taken from Wikitext-2 itself
(issue 28): sentences of wiki.valid.raw (search) and wiki.test.raw (test) that name a currency, or a
month, against sentences that name none.

    uv run python results/synapses/concepts.py --data_dir ../shared/data/wikitext-2-raw-v1

A sentence is a piece of an article's paragraph line ending in " . " (Wikitext's spacing), 40 to 400
bytes; headings (" = ... = ") are skipped. Search sets: up to 200 concept sentences of the
validation split and as many contrast ones drawn at random (seed 0); test sets: 50 and 50 of the
test split, as in the paper. Writes sentences/CONCEPT-{search,test}-{concept,contrast}.txt.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser, UsageError, in_file, run_command  # noqa: E402

HERE = Path(__file__).parent
CONCEPTS = {  # what a sentence must contain to name the concept
    "currency": re.compile(
        rb"\$|\xc2\xa3|\xe2\x82\xac|\xc2\xa5|\b(dollars?|euros?|yen|francs?|pesos?|rupees?|shillings?|"
        rb"pounds? sterling)\b",  # $, the pound, euro and yen signs in UTF-8, or a currency's name
        re.IGNORECASE,
    ),
    "months": re.compile(
        rb"\b(January|February|March|April|June|July|August|September|October|November|December)\b"
    ),  # not May, also a verb
}
SIZES = {"search": 200, "test": 50}
SPLITS = (("search", "valid"), ("test", "test"))  # which file each set is drawn from


def sentences(text: bytes) -> list[bytes]:
    """The sentences of a Wikitext split: paragraph lines cut after each " . ", 40 to 400 bytes."""
    out = []
    for line in text.split(b"\n"):
        line = line.strip()
        if not line or line.startswith(b"="):
            continue
        for piece in re.split(rb"(?<= \.) ", line):
            if 40 <= len(piece) <= 400 and piece.endswith(b" ."):
                out.append(piece)
    return out


def split_sets(found: list[bytes], pattern: re.Pattern, size: int, rng: random.Random) -> tuple[list, list]:
    concept = [s for s in found if pattern.search(s)]
    contrast = [s for s in found if not pattern.search(s)]
    concept = rng.sample(concept, min(size, len(concept)))
    return concept, rng.sample(contrast, len(concept))


def run(argv: list[str] | None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--data_dir", type=Path, required=True, help="holds wiki.valid.raw and wiki.test.raw")
    args = p.parse_args(argv)
    try:
        texts = {split: in_file(str(args.data_dir / f"wiki.{split}.raw")) for _, split in SPLITS}
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--data_dir {args.data_dir}: {e}") from None
    found = {split: sentences(path.read_bytes()) for split, path in texts.items()}  # each split read once
    folder = HERE / "sentences"
    folder.mkdir(exist_ok=True)
    for concept, pattern in CONCEPTS.items():
        for part, split in SPLITS:
            sets = split_sets(found[split], pattern, SIZES[part], random.Random(0))
            for name, lines in zip(("concept", "contrast"), sets, strict=True):
                (folder / f"{concept}-{part}-{name}.txt").write_bytes(b"\n".join(lines) + b"\n")
            print(f"{concept} {part}: {len(sets[0])} + {len(sets[1])} sentences of {len(found[split]):,}")


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags and files."""
    run_command(run, argv)


if __name__ == "__main__":
    main()

"""Where the whole-text loss on the raw validation text goes: the bytes of the words that the
tokenized split (our training text's form) writes as <unk>, against the rest.

The raw split has every rare word spelled out; the tokenized one, line for line and word for word the
same text, has <unk> in their place, and so has the training text that every model here learned
from. This reads the raw text as one stream (evaluate.py --stream: the chunked form, the state
carried from the first byte to the last) and splits the loss of every byte by what it belongs to: a
rare word (its bytes and the space after it, the byte that says the word has ended), or the rest.
The same for the tokenized text, where the split is the <unk> strings and the rest. And whether the
model copies: each rare word's first and second occurrence in the raw text, paired, by the distance
between them (copy_pairs): the only place such a word can come from is the context. The losses come
from a model, or from the byte_losses.npy that evaluate.py --stream wrote for each text:

    python3 results/tbptt/rare_words.py --model_path .gpu/runs/NAME/checkpoints/last \\
        --raw .gpu/data/wiki.valid.raw --tokens .gpu/data/wiki.valid.tokens --out $OUT/rare_words.json
    uv run python results/tbptt/rare_words.py --raw ../shared/data/wikitext-2-raw-v1/wiki.valid.raw \\
        --tokens ../shared/data/wikitext-2-tokens/wiki.valid.tokens \\
        --losses RUN/eval-valid-raw-stream/byte_losses.npy RUN/eval-valid-tokens-stream/byte_losses.npy
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py

from dragon_hatchling.cli import Parser, UsageError, out_file, positive_int, run_command  # noqa: E402
from dragon_hatchling.data import load_bytes_file  # noqa: E402
from dragon_hatchling.devices import resolve_device, resolve_dtype  # noqa: E402
from dragon_hatchling.loading import load_model  # noqa: E402
from dragon_hatchling.scoring import edge_bucket, edge_buckets, stream_byte_losses  # noqa: E402

UNK = "<unk>"


def rare_word_masks(raw: bytes, tokens: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Per byte of each text: True where it belongs to a word the tokenized text writes as <unk>
    (with the space that ends it). The texts are aligned line by line and, in each line, word by word
    (difflib where a line's word counts differ: a raw word may hold a space the tokens lack)."""
    raw_lines, tok_lines = raw.split(b"\n"), tokens.split(b"\n")
    if len(raw_lines) != len(tok_lines):
        raise ValueError(f"the texts have {len(raw_lines)} and {len(tok_lines)} lines; they must match")
    raw_mask, tok_mask = [], []
    for a, b in zip(raw_lines, tok_lines, strict=True):
        ra, rb = line_masks(a.split(b" "), b.split(b" "))
        raw_mask += ra + [False]  # the newline
        tok_mask += rb + [False]
    return np.array(raw_mask[:-1]), np.array(tok_mask[:-1])


def line_masks(wa: list[bytes], wb: list[bytes]) -> tuple[list[bool], list[bool]]:
    """One line's byte masks from its words (split on single spaces), raw and tokenized."""
    rare_a, rare_b = [False] * len(wa), [w == UNK.encode() for w in wb]
    ops = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "replace" and all(rare_b[j1:j2]):
            rare_a[i1:i2] = [True] * (i2 - i1)
    return word_bytes(wa, rare_a), word_bytes(wb, rare_b)


def word_bytes(words: list[bytes], rare: list[bool]) -> list[bool]:
    """Spread each word's mark over its bytes and the space after it (the last word has none)."""
    mask = []
    for w, r in zip(words, rare, strict=True):
        mask += [r] * (len(w) + 1)
    return mask[:-1]


def split_loss(losses: np.ndarray, mask: np.ndarray) -> dict:
    """Mean loss (nats/byte) over the whole text, its marked bytes and the rest; the marked share."""
    scored = mask[1:]  # losses[i] scores byte i + 1
    whole, marked, rest = losses.mean(), losses[scored].mean(), losses[~scored].mean()
    return {
        "bytes": int(len(losses)), "marked_bytes": int(scored.sum()), "marked_share": float(scored.mean()),
        "whole": float(whole), "marked": float(marked), "rest": float(rest),
        "marked_part_of_whole": float(losses[scored].sum() / len(losses)),
        "whole_bits": float(whole / math.log(2)), "rest_bits": float(rest / math.log(2)),
    }  # fmt: skip


REPEAT_EDGES = (256, 1024, 4096, 16384)  # bytes between a word's first two starts


def rare_words(raw: bytes, mask: np.ndarray) -> list[tuple[bytes, int, int]]:
    """Each rare word of the raw text: (the word, its first byte, the end of its marked bytes: the byte
    after its space, or after the word at a line's end)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    words = []
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):  # runs of marked bytes
        at = start
        for w in raw[start:end].split(b" "):
            if w:  # a doubled space leaves an empty piece
                words.append((w, at, min(at + len(w) + 1, end)))
            at += len(w) + 1
    return words


def repeat_bucket(distance: int) -> str:
    """The bucket of REPEAT_EDGES a distance in bytes falls in."""
    return edge_bucket(distance, REPEAT_EDGES)


def copy_pairs(losses: np.ndarray, words: list[tuple[bytes, int, int]]) -> dict:
    """Does the model copy a rare word it has just read? For each rare word that occurs twice or more,
    its first and its second occurrence, paired: the mean loss over the word's bytes after its first
    (the first says which word comes; the rest a model that copies gets almost free), at each, by the
    distance in bytes between the two starts (REPEAT_EDGES). Words of fewer than 3 bytes are left out."""
    seen: dict[bytes, list[int]] = {}
    for w, start, _ in words:
        if len(w) >= 3 and start > 0:
            seen.setdefault(w, []).append(start)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for w, starts in seen.items():
        if len(starts) >= 2:
            # losses[i] scores byte i + 1: the bytes after a word's first are losses[s : s + len - 1]
            first, second = (losses[s : s + len(w) - 1].mean() for s in starts[:2])
            pairs.setdefault(repeat_bucket(starts[1] - starts[0]), []).append((first, second))
    return {
        k: {"pairs": len(pairs[k]), "first": float(np.mean([a for a, _ in pairs[k]])),
            "second": float(np.mean([b for _, b in pairs[k]]))}
        for k in edge_buckets(REPEAT_EDGES)
        if k in pairs
    }  # fmt: skip


def load_losses(path: str) -> np.ndarray:
    """A byte_losses.npy, or a ValueError naming --losses and the file."""
    try:
        losses = np.load(path)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise ValueError(f"--losses {path}: expected evaluate.py --stream's byte_losses.npy ({e})") from None
    if losses.ndim != 1 or not np.issubdtype(losses.dtype, np.floating):
        raise ValueError(f"--losses {path}: expected one float per byte, got {losses.dtype} {losses.shape}")
    return losses


def byte_losses(args, texts: dict[str, np.ndarray]):
    """(name, the loss of every byte but the first) of each text: read from --losses, or scored."""
    if args.losses:  # the raw text's, and the tokenized text's if given
        yield from zip(list(texts)[: len(args.losses)], map(load_losses, args.losses), strict=True)
        return
    device = resolve_device(args.device)
    model = load_model(args.model_path)[0].to(device).eval()
    for name, data in texts.items():
        yield name, stream_byte_losses(model, data, device, resolve_dtype("auto", device), args.chunk_size)


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags, files and texts."""
    run_command(run, argv)


def run(argv: list[str] | None) -> None:
    """Parse the flags, then measure and write."""
    p = Parser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_path", help="a checkpoint folder or file (evaluate.py's)")
    source.add_argument(
        "--losses", nargs="+", metavar="RAW [TOKENS]",
        help="evaluate.py --stream's byte_losses.npy of the raw text (and of the tokenized one)",
    )  # fmt: skip
    p.add_argument("--raw", required=True, help="wiki.valid.raw")
    p.add_argument("--tokens", required=True, help="wiki.valid.tokens, the same text with <unk>")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (evaluate.py's)")
    p.add_argument("--chunk_size", type=positive_int, default=2048, help="bytes read at a time")
    p.add_argument("--out", type=out_file, default=None, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    if args.losses and len(args.losses) > 2:
        count = len(args.losses)
        raise UsageError(f"--losses takes the raw text's byte losses and the tokenized text's, got {count}")
    texts = {"raw": load_bytes_file(args.raw, "--raw"), "tokens": load_bytes_file(args.tokens, "--tokens")}
    masks = dict(zip(texts, rare_word_masks(texts["raw"].tobytes(), texts["tokens"].tobytes()), strict=True))
    result = {"model_path": args.model_path, "losses": args.losses, "chunk_size": args.chunk_size}
    for name, losses in byte_losses(args, texts):
        if len(losses) != len(texts[name]) - 1:
            raise ValueError(f"{name}: {len(losses)} losses for a text of {len(texts[name])} bytes")
        losses = losses.astype(np.float64)
        result[name] = split_loss(losses, masks[name])
        print(name, json.dumps(result[name]), flush=True)
        if name == "raw":
            words = rare_words(texts["raw"].tobytes(), masks["raw"])
            result["raw_rare_copies"] = copy_pairs(losses, words)
            print("raw, rare words read twice", json.dumps(result["raw_rare_copies"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Byte-level Wikitext-2: the splits (Hub or local files), the windows, the order of an epoch. Any other
text dataset becomes byte files first (corpora.py)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling.cli import UsageError

HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
SPLITS = ("train", "valid", "test")
HUB_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}


def rows_to_bytes(rows: Iterable[str]) -> bytes:
    """Rebuild a raw Wikitext file from the Hub's rows, byte-exact.

    The Hub keeps each line as a row with its trailing newline, except blank lines (" \\n" in the
    file), which it stores as empty strings. Rows of other datasets (documents, say) that do not end
    with a newline get one, so that they do not run into each other; Wikitext's rows all have one.
    """
    return "".join(" \n" if not row else row if row.endswith("\n") else row + "\n" for row in rows).encode()


def local_split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"wiki.{split}.raw"


def load_bytes_file(path: str | Path, what: str = "data file") -> np.ndarray:
    """A file's bytes as a read-only, memory-mapped uint8 array; errors name the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, expected a file")
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a regular file (a device or a pipe), expected a file")
    if path.stat().st_size == 0:
        raise UsageError(f"{what} {path} is empty")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be read ({e.strerror or e})") from None


def load_hub_split(split: str) -> np.ndarray:
    """A split of Salesforce/wikitext (wikitext-2-raw-v1) from the Hub, as UTF-8 bytes."""
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UsageError(
            "the `datasets` package is needed to load Wikitext-2 from the Hub; "
            "or pass --data_dir with local wiki.*.raw files"
        ) from e
    try:
        rows = load_dataset(*HUB_DATASET, split=HUB_SPLIT_NAMES[split])["text"]
    except Exception as e:
        raise UsageError(
            f"could not load {HUB_DATASET[0]} ({HUB_DATASET[1]}, {split}) from the Hub "
            f"({type(e).__name__}); pass --data_dir DIR with wiki.{split}.raw instead"
        ) from e
    data = np.frombuffer(rows_to_bytes(rows), dtype=np.uint8)
    if data.size == 0:
        raise UsageError(f"the Hub's {split} split is empty")
    return data


def load_split(split: str, data_dir: str | Path | None = None) -> np.ndarray:
    """Split `split` of byte-level Wikitext-2: local `wiki.{split}.raw` if data_dir, else the Hub."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if data_dir is None:
        return load_hub_split(split)
    if not Path(data_dir).is_dir():
        raise UsageError(f"--data_dir {data_dir} is not a folder")
    return load_bytes_file(local_split_path(data_dir, split), what=f"{split} split")


HASH_LIMIT = 1 << 30  # files up to 1 GiB get a sha256 in a run's records; larger ones their size and time


def describe_source(split: str, data_dir: str | Path | None, path: str | Path | None = None) -> dict:
    """Where a split came from, for a run's records (path, size, sha256), read in pieces."""
    if path is None and data_dir is None:
        return {"split": split, "source": f"hub:{HUB_DATASET[0]}/{HUB_DATASET[1]}"}
    path = Path(path) if path is not None else local_split_path(data_dir, split)
    size = path.stat().st_size
    if size > HASH_LIMIT:  # hashing a corpus of many GB would cost minutes at every start
        return {"split": split, "source": str(path), "bytes": size, "sha256": None,
                "modified": path.stat().st_mtime}  # fmt: skip
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"split": split, "source": str(path), "bytes": size, "sha256": digest}


def num_windows(data: np.ndarray, seq_len: int) -> int:
    """Windows [i*T, i*T+T+1) that fit in the data."""
    return max(0, (len(data) - 1) // seq_len)


def window_batches(
    data: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_chunks: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation protocol: window i = bytes [i*T, i*T+T+1), in order, in batches.

    shard (rank, world): only the windows i with i % world == rank (validation split over ranks)."""
    count = num_windows(data, seq_len)
    if max_chunks is not None:
        count = min(count, max_chunks)
    mine = range(shard[0], count, shard[1])
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        yield windows_at(data, [i * seq_len for i in rows], seq_len)


def windows_at(
    data: np.ndarray, offsets: Iterable[int], seq_len: int, copies: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (each B, T, int64) of the windows starting at `offsets`, with the spans of
    a copy_plan (one row a window) written again where it says."""
    chunk = np.stack([np.asarray(data[o : o + seq_len + 1]) for o in offsets]).astype(np.int64)
    if copies is not None:
        for row, (length, source, target) in zip(chunk, copies, strict=True):
            row[target : target + length] = row[source : source + length].copy()
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


MIN_COPY = 8  # bytes: about a word, the shortest span --copy_spans repeats
COPY_STREAM = 0xC0  # the copies' random numbers, apart from an epoch's order ([seed, epoch])


def copy_plan(batch: int, seq_len: int, fraction: float, seed: int, step: int) -> np.ndarray:
    """Copying mixed into the text (--copy_spans) at training step `step`, drawn from (seed, step)
    alone: for each of `batch` windows (T + 1 bytes), with probability `fraction`, a span of L bytes
    (L log-uniform from MIN_COPY to a quarter of the window: as many of 8-16 bytes, a name's length,
    as of 128-256) to be written again later in the same window, at a distance uniform from L to
    what the window allows.

    Returns (batch, 3) int64 rows (L, source, target); L = 0 leaves the window as it is. The target
    span's bytes after its first are then predictable by copying what the window has already read,
    as a rare name's second reading is in the text (results/tbptt, round 9)."""
    rng = np.random.default_rng([seed, step, COPY_STREAM])
    size = seq_len + 1
    longest = max(MIN_COPY, size // 4)
    plan = np.zeros((batch, 3), dtype=np.int64)
    for row in np.flatnonzero(rng.random(batch) < fraction):
        drawn = int(np.exp(rng.uniform(np.log(MIN_COPY), np.log(longest + 1))))
        length = min(max(drawn, MIN_COPY), longest)  # exp(log 8) may round below 8
        source = int(rng.integers(0, size - 2 * length + 1))
        target = int(rng.integers(source + length, size - length + 1))
        plan[row] = (length, source, target)
    return plan


UNKNOWN = b"<unk>"  # how WikiText's tokenized splits write a word seen fewer than 3 times in its train split
FILL_COUNT = 3  # --fill_unk's stand-ins: words that occur exactly this often in the train text
FILL_LIMIT = 1 << 30  # bytes: --fill_unk reads the whole train text into memory, twice
FILL_STREAM = 0xF1  # the fill's random numbers, apart from the copies' and an epoch's order


def fill_unknowns(text: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, int]:
    """--fill_unk: this fraction of the text's <unk> tokens, each replaced by a word drawn from those
    that occur exactly FILL_COUNT times in the text (rare words of the kind the raw text spells where
    the tokenized text writes <unk>: 'Calakmul', 'complacency', '1630s' in the raw validation split;
    'Metrodome', 'prudence', '157th' among the stand-ins). Drawn once from the seed alone, so every
    rank and every resumption trains the same text. Returns the text and how many were filled."""
    if len(text) > FILL_LIMIT:
        raise ValueError(
            f"the train text ({len(text):,} bytes) is larger than it reads in memory ({FILL_LIMIT:,})"
        )
    raw = np.asarray(text).tobytes()
    pieces = raw.split(UNKNOWN)
    if len(pieces) == 1:
        raise ValueError(f"the train text holds no {UNKNOWN.decode()} tokens to fill")
    counts = Counter(raw.split())
    pool = sorted(w for w, c in counts.items() if c == FILL_COUNT and w != UNKNOWN)
    if not pool:
        raise ValueError(f"the train text has no word that occurs exactly {FILL_COUNT} times to fill with")
    rng = np.random.default_rng([seed, FILL_STREAM])
    filled = rng.random(len(pieces) - 1) < fraction
    words = rng.integers(0, len(pool), len(pieces) - 1)
    out = [pieces[0]]
    for piece, fill, word in zip(pieces[1:], filled, words, strict=True):
        out += [pool[word] if fill else UNKNOWN, piece]
    return np.frombuffer(b"".join(out), dtype=np.uint8), int(filled.sum())


SHUFFLE_LIMIT = 1 << 24  # an epoch of more windows (2 GB of text at 128 bytes) is not shuffled as an array


def epoch_offsets(n_bytes: int, seq_len: int, epoch: int, seed: int) -> np.ndarray | AffineOrder:
    """Start offsets of one training epoch: non-overlapping windows after a random shift, shuffled.

    Depends only on (seed, epoch), so a resumed run sees the same order. Up to SHUFFLE_LIMIT windows,
    an array of them in random order; beyond, an AffineOrder (the same indexing, no memory). The
    shift leaves at least one window (n_bytes > seq_len).
    """
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(min(seq_len, n_bytes - seq_len)))
    count = (n_bytes - 1 - shift) // seq_len
    if count > SHUFFLE_LIMIT:
        return AffineOrder(shift, seq_len, count, rng)
    return shift + seq_len * rng.permutation(count)


def batch_offsets(order: np.ndarray | AffineOrder, step_in_epoch: int, batch_size: int) -> np.ndarray:
    """The offsets of a step's batch: windows step*B .. step*B + B - 1 of the epoch's order, wrapping
    round to its start where the epoch's random shift left fewer than steps x B windows (as
    torch.utils.data.DistributedSampler pads its last batch): every step trains exactly B windows."""
    return order[(step_in_epoch * batch_size + np.arange(batch_size)) % len(order)]


class AffineOrder:
    """The windows of an epoch too large to shuffle in memory: the epoch's j-th window is window
    (a j + b) mod count, a permutation as a is coprime to count. Indexing it (a slice or an array of
    positions) gives offsets, as the array would; it holds three numbers, whatever the corpus."""

    def __init__(self, shift: int, seq_len: int, count: int, rng: np.random.Generator) -> None:
        self.shift, self.seq_len, self.count = shift, seq_len, count
        a = int(rng.integers(count // 3, 2 * count // 3 + 1))  # a stride far from 0 and 1
        while math.gcd(a, count) != 1:
            a += 1
        self.a, self.b = a, int(rng.integers(count))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, part: slice | np.ndarray) -> np.ndarray:
        j = range(*part.indices(self.count)) if isinstance(part, slice) else part.tolist()
        windows = [(self.a * i + self.b) % self.count for i in j]
        return self.shift + self.seq_len * np.array(windows, dtype=np.int64)

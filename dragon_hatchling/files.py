"""Writing files so that a kill never leaves half of one: every writer of the project goes through
`atomic_path` (JSON, the CSV log, plots, checkpoints, the dataset cache)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (a file or a folder); when the block
    ends without an error it replaces `path` in one rename, else it is removed and `path` stays.

    A folder cannot be renamed onto a folder that exists: the old one is moved to `<name>.old` first
    and removed after (a reader that finds no `path` in that instant finds `<name>.old`).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        old = path.with_name(f"{path.name}.old")
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file or a folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def finite_json(obj, where: str = "", replaced: dict | None = None):
    """obj with every NaN or infinite float replaced by None (strict JSON has neither), and what was
    replaced, by its path, in `replaced`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if replaced is not None:
            replaced[where] = repr(obj)
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj


def write_json(path: str | Path, obj: dict) -> None:
    """Write strict JSON atomically. A value that is not a finite number is written as null, and the
    object's "not_finite" field says which were, and what they were."""
    replaced: dict[str, str] = {}
    obj = finite_json(obj, replaced=replaced)
    if replaced:
        obj["not_finite"] = replaced
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")

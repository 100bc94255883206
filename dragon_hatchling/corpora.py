"""Any text dataset of the Hub (or on disk), converted once into byte files, as nanoGPT prepares its
data: `experiment.py --dataset NAME` trains on them as it does on Wikitext-2.

Rows become bytes by Wikitext-2's rule (data.rows_to_bytes: UTF-8, an empty row is a blank line
" \n"), with a newline added to a row that lacks one. Validation is the dataset's own `validation`
(or `valid`, `val`) split, else a fraction of its train rows held out at random.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from dragon_hatchling.cli import UsageError
from dragon_hatchling.data import rows_to_bytes
from dragon_hatchling.files import atomic_path, write_text
from dragon_hatchling.hub_client import hub_error, with_deadline

VALID_SPLITS = ("validation", "valid", "val")  # a dataset's own validation split, by these names


def dataset_folder(
    cache_dir: str | Path, name: str, config: str | None, column: str, val_fraction: float, seed: int,
    source: dict,
) -> Path:  # fmt: skip
    """Where --dataset's byte files live: a folder keyed by what was converted, so that another
    dataset of the same name (another folder, an edited file, a new revision on the Hub), another
    column or another held-out split never reuses them: the source (dataset_source(name)), the config, the
    column, the held-out fraction and its seed."""
    key = {"source": source, "config": config, "column": column, "val_fraction": val_fraction,
           "seed": seed}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "__".join(str(part).strip("/").replace("/", "--") for part in (name, config or "default", column))
    return Path(cache_dir).expanduser() / f"{slug[-80:]}__{digest}"


def dataset_source(name: str) -> dict:
    """What --dataset NAME is now: a local file or folder (its resolved path, and every file's size
    and modification time), else a Hub dataset at the commit the Hub resolves it to."""
    path = Path(name)
    if not path.exists():
        return {"hub": name, "revision": hub_revision(name)}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]  # fmt: skip
    return {"path": str(path.resolve()), "files": stats}


def hub_revision(name: str) -> str:
    """The commit of the Hub's dataset `name` now; a UsageError if the Hub cannot say."""
    from huggingface_hub import HfApi

    try:
        return with_deadline(lambda: HfApi().dataset_info(name).sha)
    except Exception as e:  # no such dataset, no network, offline: one line
        raise UsageError(
            f"--dataset {name}: no such local path, and the Hub could not say what it is ({hub_error(e)})"
        ) from None


def load_text_dataset(name: str, config: str | None, progress: bool = True):
    """A DatasetDict from the Hub (name, config) or from disk (a folder saved by save_to_disk, or of
    json/csv/parquet/text files that `datasets` reads); a UsageError if it cannot be had."""
    from datasets import (
        Dataset,
        DatasetDict,
        disable_progress_bars,
        enable_progress_bars,
        load_dataset,
        load_from_disk,
    )

    if progress:
        enable_progress_bars()
    else:
        disable_progress_bars()
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = load_from_disk(str(path))
        else:
            ds = load_dataset(name, config)
    except Exception as e:  # no such dataset, no network, a bad config, bytes that are not text: one line
        root = e
        while root.__cause__ is not None or root.__context__ is not None:  # what datasets wraps says why
            root = root.__cause__ or root.__context__
        first = str(root).splitlines()[0][:200] if str(root) else "no rows or no files it can read"
        raise UsageError(f"--dataset {name}: could not load it ({type(root).__name__}: {first})") from None
    return DatasetDict({"train": ds}) if isinstance(ds, Dataset) else ds


def prepare_dataset(
    name: str,
    config: str | None,
    column: str,
    val_fraction: float,
    folder: Path,
    source: dict,
    seed: int = 1337,
    progress: bool = True,
) -> Path:
    """Convert a text dataset once into train.bin and valid.bin (its rows as bytes, by rows_to_bytes'
    rule) in its cache folder (dataset_folder), which it returns; a folder converted before is kept.
    Validation is the dataset's own split, else val_fraction of its train rows held out at random (seed)."""
    if (folder / "meta.json").is_file():
        return folder
    ds = load_text_dataset(name, config, progress)
    train = text_rows(ds, name, column)
    own = next((s for s in VALID_SPLITS if s in ds), None)
    train, valid = (train, ds[own]) if own is not None else held_out(train, name, val_fraction, seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {
        split: write_bytes(folder / f"{split}.bin", rows, column, name, progress)
        for split, rows in (("train", train), ("valid", valid))
    }
    meta = {
        "dataset": name,
        "source": source,
        "config": config,
        "text_column": column,
        "valid": own or f"{val_fraction:g} of train",
        "seed": seed,
        "bytes": sizes,
        "rows": {"train": train.num_rows, "valid": valid.num_rows},
    }
    write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the folder is complete
    return folder


def text_rows(ds, name: str, column: str):
    """The dataset's train split, checked: it has rows, and a column of text by that name."""
    if "train" not in ds:
        raise UsageError(f"--dataset {name}: no train split (it has {', '.join(ds) or 'none'})")
    train = ds["train"]
    if train.num_rows == 0:
        raise UsageError(f"--dataset {name} is empty: its train split has no rows")
    if column not in train.column_names:
        raise UsageError(
            f"--text_column {column}: --dataset {name} has no such column "
            f"(it has {', '.join(train.column_names)})"
        )
    kind = getattr(train.features[column], "dtype", type(train.features[column]).__name__)
    if kind not in ("string", "large_string"):
        raise UsageError(f"--text_column {column} of --dataset {name} is not text (its type is {kind})")
    return train


def held_out(train, name: str, val_fraction: float, seed: int) -> tuple:
    """(train, valid): val_fraction of the rows (at least one) held out at random."""
    if train.num_rows < 2:
        raise UsageError(f"--dataset {name}: {train.num_rows} rows, too few to hold out a validation split")
    size = max(1, round(val_fraction * train.num_rows))
    if size >= train.num_rows:
        raise UsageError(
            f"--val_fraction {val_fraction:g} holds out {size} of --dataset {name}'s {train.num_rows} rows: "
            "none would be left to train on"
        )
    held = train.train_test_split(test_size=size, seed=seed)
    return held["train"], held["test"]


def write_bytes(path: Path, rows, column: str, name: str, progress: bool) -> int:
    """A split's rows as one byte file (train.bin, valid.bin), atomically; its size. A UsageError if
    it holds no text."""
    split = path.stem
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            bar = tqdm(total=rows.num_rows, unit="row", desc=f"{name} {split} -> bytes", disable=not progress)
            for batch in rows.iter(batch_size=1000):
                f.write(rows_to_bytes(batch[column]))
                bar.update(len(batch[column]))
            bar.close()
        if tmp.stat().st_size == 0:
            raise UsageError(f"--dataset {name}: its {split} split has no text in column {column}")
        return tmp.stat().st_size

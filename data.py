"""What experiment.py and evaluate.py share: byte-level Wikitext-2, batches, checkpoints, errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
SPLITS = ("train", "valid", "test")
HUB_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}


class UsageError(Exception):
    """A bad argument or input file: reported as one line and exit code 2."""


def fail(message: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit (never a traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ----------------------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def half_lives(text: str) -> list[float]:
    """--half_lives: comma-separated positive numbers of bytes; none: no decay (an empty list)."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers of bytes (or none), got {text!r}"
        ) from None
    if not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers of bytes, got {text!r}")
    return values


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        fail(message)


def add_device_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device and --dtype, as both scripts take them."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 autocast on CUDA, float32 elsewhere), float32, bfloat16, float16",
    )


def make_out_dir(path: str | Path) -> Path:
    """Create the output folder and check that a file can be written in it, or a UsageError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out_dir {path} is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out_dir {path} cannot be written ({e.strerror or e})") from e
    return path


# ----------------------------------------------------------------------------- data


def rows_to_bytes(rows: Iterable[str]) -> bytes:
    """Rebuild a raw Wikitext file from the Hub's rows, byte-exact.

    The Hub keeps each line as a row with its trailing newline, except blank lines (" \\n" in the
    file), which it stores as empty strings.
    """
    return "".join(row if row else " \n" for row in rows).encode("utf-8")


def local_split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"wiki.{split}.raw"


def load_bytes_file(path: str | Path, what: str = "data file") -> np.ndarray:
    """A file's bytes as a read-only, memory-mapped uint8 array; errors name the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, expected a file")
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
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


def describe_source(split: str, data_dir: str | Path | None, path: str | Path | None = None) -> dict:
    """Where a split came from, for a run's records (path, size, sha256)."""
    if path is None and data_dir is None:
        return {"split": split, "source": f"hub:{HUB_DATASET[0]}/{HUB_DATASET[1]}"}
    path = Path(path) if path is not None else local_split_path(data_dir, split)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"split": split, "source": str(path), "bytes": path.stat().st_size, "sha256": digest}


def num_windows(data: np.ndarray, seq_len: int) -> int:
    """Windows [i*T, i*T+T+1) that fit in the data."""
    return max(0, (len(data) - 1) // seq_len)


def window_batches(
    data: np.ndarray, seq_len: int, batch_size: int, max_chunks: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation protocol: window i = bytes [i*T, i*T+T+1), in order, in batches."""
    count = num_windows(data, seq_len)
    if max_chunks is not None:
        count = min(count, max_chunks)
    for start in range(0, count, batch_size):
        rows = range(start, min(start + batch_size, count))
        yield windows_at(data, [i * seq_len for i in rows], seq_len)


def windows_at(data: np.ndarray, offsets: Iterable[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (each B, T, int64) of the windows starting at `offsets`."""
    chunk = np.stack([np.asarray(data[o : o + seq_len + 1]) for o in offsets]).astype(np.int64)
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


def epoch_offsets(n_bytes: int, seq_len: int, epoch: int, seed: int) -> np.ndarray:
    """Start offsets of one training epoch: non-overlapping windows after a random shift, shuffled.

    Depends only on (seed, epoch), so a resumed run sees the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(seq_len))
    count = (n_bytes - 1 - shift) // seq_len
    return shift + seq_len * rng.permutation(count)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for mixed precision, or a no-op for float32."""
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a usable torch.device, or a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA was asked for but is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS was asked for but is not available here")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes free on the device now (CUDA: as the driver sees it; CPU: MemAvailable), None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def check_fits(need: int, device: torch.device, what: str) -> None:
    """A UsageError, with the estimate, if `need` bytes are more than the device has free."""
    free = available_memory(device)
    if free is not None and need > free:
        raise UsageError(
            f"{what} needs at least {need / 1e9:,.1f} GB; {device} has {free / 1e9:,.1f} GB free"
        )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 autocast on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- checkpoints


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
    """Write strict JSON atomically (temporary file, then rename). A value that is not a finite number
    is written as null, and the object's "not_finite" field says which were, and what they were."""
    path = Path(path)
    replaced: dict[str, str] = {}
    obj = finite_json(obj, replaced=replaced)
    if replaced:
        obj["not_finite"] = replaced
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class SaveFailed(Exception):
    """A checkpoint could not be written (a full disk, say); the previous one is kept."""


def save_checkpoint(model, folder: str | Path, training_state: dict | None = None) -> None:
    """Weights (model.safetensors) and config (config.json), with the optimizer state beside them.

    Written into a temporary folder that then replaces `folder`, so a crash mid-save leaves
    the previous checkpoint whole; a save that fails (SaveFailed) removes its temporary folder.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise SaveFailed(
            f"could not save the checkpoint {folder} ({detail}); the previous one is kept"
        ) from e
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def is_checkpoint(folder: str | Path) -> bool:
    """A checkpoint folder of this project: config.json + model.safetensors."""
    return (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()


RUN_FILES = ("checkpoints", "log.csv", "metrics.json", "loss.png", "bpb.png", "lr.png", "sparsity.png")


def holds_run(folder: str | Path) -> bool:
    """Whether a folder holds a training run: a checkpoint, a run's metrics, or a log with at least
    one row. A folder where a run never took a step (a log with its header alone), or that holds an
    evaluation (evaluate.py's metrics.json), holds none."""
    folder = Path(folder)
    if checkpoint_folder(folder, "last") or checkpoint_folder(folder, "best"):
        return True
    try:
        metrics = folder / "metrics.json"
        if metrics.is_file() and "total_steps" in json.loads(metrics.read_text()):
            return True
        log = folder / "log.csv"
        return log.is_file() and len(log.read_text(errors="replace").strip().splitlines()) > 1
    except (OSError, ValueError, TypeError):
        return True  # unreadable: treat it as a run rather than risk replacing one


def clear_run(folder: str | Path) -> None:
    """Remove the files a training run writes (its checkpoints, log, metrics and plots), nothing else."""
    for name in RUN_FILES:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def lock_folder(folder: str | Path, what: str = "--out_dir") -> object:
    """Hold FOLDER/.lock for the life of this process (released by the system, even on kill -9);
    a UsageError if another process holds it. Returns the open file: keep it."""
    import fcntl

    path = Path(folder) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(
            f"{what} {folder} is in use by another run ({holder}); wait for it or choose another folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def checkpoint_folder(run_dir: str | Path, which: str = "last") -> Path | None:
    """RUN/checkpoints/<which>, or its `.old` twin if a save was cut short between its two renames."""
    base = Path(run_dir) / "checkpoints"
    return next((f for f in (base / which, base / f"{which}.old") if is_checkpoint(f)), None)


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of FOLDER/model.safetensors; a UsageError if the file is truncated or corrupted."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    try:
        return load_file(path)
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from e
    except Exception as e:
        raise UsageError(f"{path} is truncated or corrupted ({type(e).__name__})") from e


def load_training_state(folder: str | Path) -> dict:
    """FOLDER/training_state.pt (optimizer, step, random states), read with weights_only=True."""
    path = Path(folder) / "training_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from e
    except Exception as e:
        raise UsageError(f"{path} is truncated or corrupted ({type(e).__name__})") from e
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise UsageError(f"{path} is not a training state of this project")
    return state

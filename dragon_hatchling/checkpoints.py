"""Checkpoints and run folders: saving and loading, what holds a run, its lock."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from dragon_hatchling.architectures import ARCHITECTURES, arch_of, checked_config
from dragon_hatchling.cli import UsageError
from dragon_hatchling.files import atomic_path


class SaveFailed(Exception):
    """A checkpoint could not be written (a full disk, say); the previous one is kept."""


CARRIED_STATE = "carried_state.safetensors"  # a --carry_state run's state at the step (carried.py)


def save_checkpoint(
    model, folder: str | Path, training_state: dict | None = None, carried: dict | None = None
) -> None:
    """Weights (model.safetensors) and config (config.json), with the optimizer state beside them
    (and a --carry_state run's carried state, its tensors by name).

    Written into a temporary folder that then replaces `folder` (files.atomic_path), so a crash
    mid-save leaves the previous checkpoint whole; a save that fails (SaveFailed) removes its
    temporary folder.
    """
    try:
        with atomic_path(folder) as tmp:
            model.save_pretrained(tmp)
            if training_state is not None:
                torch.save(training_state, tmp / "training_state.pt")
            if carried:
                save_file(carried, str(tmp / CARRIED_STATE))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise SaveFailed(
            f"could not save the checkpoint {folder} ({detail}); the previous one is kept"
        ) from e


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


def run_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint folder (RUN/checkpoints/last), or the folder itself."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


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


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of the model in `tensors`, of its shape and dtype, and no other; a UsageError
    naming the first that is not (load_state_dict would cast a dtype, and from_pretrained leaves a
    missing tensor as it was initialised)."""
    expected = model.state_dict()
    for name, want in expected.items():
        got = tensors.get(name)
        if got is None:
            raise UsageError(
                f"{where}: model.safetensors has no tensor {name} (expected {tuple(want.shape)})"
            )
        if got.shape != want.shape:
            raise UsageError(
                f"{where}: size mismatch for {name}: {tuple(got.shape)} in the checkpoint, "
                f"{tuple(want.shape)} in the model its config.json describes"
            )
        if got.dtype != want.dtype:
            raise UsageError(f"{where}: tensor {name} is {got.dtype}, expected {want.dtype}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UsageError(f"{where}: model.safetensors has a tensor {unknown[0]} that this model does not")


def read_config(folder: str | Path) -> object:
    """FOLDER/config.json's contents; a UsageError if it cannot be read as JSON."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e})") from None


def load_checkpoint(folder: str | Path) -> torch.nn.Module:
    """The model of a checkpoint folder of this project, loaded strictly: its config.json complete
    and of the right types (architectures.checked_config), every tensor of model.safetensors there
    with its shape and dtype (check_tensors). A UsageError naming what is not."""
    where = f"{folder}: could not load the checkpoint"
    config = checked_config(read_config(folder), where)
    architecture = ARCHITECTURES[arch_of(config)][0]
    try:
        tensors = load_weights(folder)
    except UsageError as e:
        raise UsageError(f"{where} ({e})") from None
    held, needed = sum(t.numel() for t in tensors.values()), config.num_params
    if needed > 2 * held:  # far more than the file: refused before the model is made, not allocated
        raise UsageError(
            f"{where}: config.json describes {needed:,} parameters, model.safetensors holds {held:,} values"
        )
    model = architecture(config)
    check_tensors(model, tensors, where)
    model.load_state_dict(tensors)
    return model.eval()


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return _int(x) or isinstance(x, float)


# What each field of training_state.pt must be (None: absent, for the fields that runs from before
# them lack); a damaged one is refused at once, not met as a traceback steps later
STATE_FIELDS = {
    "step": lambda x: _int(x) and x >= 0,
    "optimizer": lambda x: (
        isinstance(x, dict) and isinstance(x.get("state"), dict) and isinstance(x.get("param_groups"), list)
    ),
    "args": lambda x: x is None or isinstance(x, dict),
    "best": lambda x: isinstance(x, dict) and _number(x.get("val_loss")),
    "last_eval": lambda x: x is None or isinstance(x, dict),
    "eval_step": lambda x: x is None or _int(x),
    "rng": lambda x: isinstance(x, dict) and torch.is_tensor(x.get("torch")),
    "rng_ranks": lambda x: x is None or isinstance(x, list),
    "train_time_s": _number,
    "elapsed_s": _number,
    "interval": lambda x: (
        x is None
        or (isinstance(x, dict) and all(_number(x.get(k)) for k in ("loss_sum", "steps", "bytes", "seconds")))
    ),
    "validation_cut": lambda x: x is None or isinstance(x, bool),
    "data": lambda x: x is None or isinstance(x, dict),
    "data_changes": lambda x: x is None or isinstance(x, list),
}


def read_pt(path: str | Path, what: str) -> object:
    """A .pt file through torch.load(weights_only=True): tensors and plain containers, never code;
    torch's warnings kept quiet; a UsageError in one line, naming the file, if it cannot be had."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from None
    except pickle.UnpicklingError:
        raise UsageError(
            f"{path}: not {what}: corrupted, or more than tensors "
            "(torch.load with weights_only=True refused it)"
        ) from None
    except Exception as e:
        raise UsageError(f"{path}: not {what}: truncated or corrupted ({type(e).__name__})") from None


def load_training_state(folder: str | Path) -> dict:
    """FOLDER/training_state.pt (optimizer, step, random states), read with weights_only=True."""
    path = Path(folder) / "training_state.pt"
    state = read_pt(path, "a training state")
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise UsageError(f"{path} is not a training state of this project")
    wrong = next((name for name, ok in STATE_FIELDS.items() if not ok(state.get(name))), None)
    if wrong is not None:
        value = state.get(wrong)
        shown = repr(value)[:60] if isinstance(value, (int, float, str, type(None))) else type(value).__name__
        raise UsageError(f"{path}: its {wrong} is {shown}, not what a run saves (a damaged file)")
    return state

"""Loading a model from any of the formats dragon_hatchling.hub's docstring lists (this project's
checkpoints, local or on the Hub, and the legacy .pt state dicts), telling them apart without being
told. `load_model` is the one entry; evaluate.py, the Hub tool's convert and the benchmark use it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dragon_hatchling.architectures import VOCAB
from dragon_hatchling.checkpoints import checkpoint_folder, is_checkpoint, load_checkpoint, read_pt
from dragon_hatchling.cli import UsageError
from dragon_hatchling.hub_client import REPO_ID, HubUnreachable, hub_error, with_deadline
from model import BDH, BDHConfig

# Appendix E names <- each legacy format's names. The paper authors' code calls the d -> n matrices
# "encoder" and the n -> d matrix "decoder", the opposite of Appendix E and of the reference report.
LEGACY_FORMATS = {
    "reference report": {
        "keys": {
            "wte.weight": "embed.weight",
            "decoder_x": "Dx",
            "decoder_y": "Dy",
            "encoder": "E",
            "readout": "readout",
        },
        "rope": {"rope_style": "half", "rope_theta": 10000.0},
    },
    "paper authors": {
        "keys": {
            "embed.weight": "embed.weight",
            "encoder": "Dx",
            "encoder_v": "Dy",
            "decoder": "E",
            "lm_head": "readout",
        },
        "rope": {"rope_style": "interleaved", "rope_theta": 65536.0},
    },
}
IGNORED_LEGACY_KEYS = {"attn.freqs"}  # recomputed, never trusted
LEGACY_RANKS = {"embed.weight": 2, "Dx": 3, "Dy": 3, "E": 2, "readout": 2}  # dimensions of each tensor
EPOCH_FILE = re.compile(r"model_epoch_(\d+)\.pt$")
DEFAULT_N_LAYER = 6

# ----------------------------------------------------------------------------- legacy formats


def detect_legacy_format(state_dict: dict) -> str:
    """Which legacy format a state dict is in, or a UsageError naming what was expected."""
    keys = set(state_dict) - IGNORED_LEGACY_KEYS
    for name, fmt in LEGACY_FORMATS.items():
        if keys == set(fmt["keys"]):
            return name
    expected = "; ".join(f"{n}: {', '.join(sorted(f['keys']))}" for n, f in LEGACY_FORMATS.items())
    raise UsageError(f"unrecognised state dict (keys {', '.join(sorted(keys))}); expected {expected}")


def model_from_legacy(state_dict: dict, n_layer: int = DEFAULT_N_LAYER) -> BDH:
    """A BDH model from a legacy state dict; dimensions are read from the tensor shapes."""
    fmt = LEGACY_FORMATS[detect_legacy_format(state_dict)]
    weights = {ours: state_dict[theirs] for theirs, ours in fmt["keys"].items()}
    for theirs, ours in fmt["keys"].items():  # h x d x n/h, or a matrix
        t = weights[ours]
        if t.dim() != LEGACY_RANKS[ours] or not t.is_floating_point():
            raise UsageError(
                f"legacy checkpoint: {theirs} is {t.dtype} of shape {tuple(t.shape)}, expected a "
                f"{LEGACY_RANKS[ours]}-dimensional floating-point tensor"
            )
    h, d, m = weights["Dx"].shape
    vocab = weights["embed.weight"].shape[0]
    if vocab != VOCAB:
        raise UsageError(f"legacy checkpoint: an embedding of {vocab} rows, expected {VOCAB} (bytes)")
    try:
        config = BDHConfig(
            n_embd=d, n_head=h, n_neurons=h * m, n_layer=n_layer, vocab_size=vocab, dropout=0.0, **fmt["rope"]
        )
        model = BDH(config)
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"inconsistent legacy checkpoint: {first_cause(e)}") from e
    return model


def load_pt(path: str | Path, n_layer: int = DEFAULT_N_LAYER) -> BDH:
    """A legacy `.pt` state dict, read with weights_only=True (never unpickling code)."""
    state_dict = read_pt(path, "a readable PyTorch state dict")
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UsageError(f"{path}: expected a state dict of tensors")
    try:
        return model_from_legacy(state_dict, n_layer)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from e


def newest_epoch_file(names: list[str]) -> str | None:
    """The `model_epoch_N.pt` with the largest N, or None."""
    epochs = [(int(m.group(1)), n) for n in names if (m := EPOCH_FILE.search(Path(n).name))]
    return max(epochs)[1] if epochs else None


def choose_pt(names: list[str], checkpoint: str | None, where: str) -> str:
    """The .pt file to load from a folder or repo: the one named, or the newest epoch."""
    pts = sorted(n for n in names if n.endswith(".pt") and Path(n).name != "training_state.pt")
    if checkpoint is not None:
        if checkpoint not in names:
            raise UsageError(
                f"--checkpoint {checkpoint} is not in {where} (it has: {', '.join(pts) or 'no .pt'})"
            )
        return checkpoint
    chosen = newest_epoch_file(pts) or (pts[0] if len(pts) == 1 else None)
    if chosen is None:
        raise UsageError(f"{where} holds several .pt files ({', '.join(pts)}); name one with --checkpoint")
    return chosen


# ----------------------------------------------------------------------------- loading


def load_ours(folder: str | Path, revision: str | None = None) -> torch.nn.Module:
    """A checkpoint in this project's format, loaded strictly (checkpoints.load_checkpoint): a folder,
    or a Hub repo id (its config.json and model.safetensors at revision, downloaded)."""
    if not Path(folder).is_dir():
        from huggingface_hub import hf_hub_download

        for name in ("config.json", "model.safetensors"):
            local = hf_hub_download(str(folder), name, revision=revision)
        return load_checkpoint(Path(local).parent)  # the repo's snapshot in the local cache
    return load_checkpoint(folder)


def first_cause(e: Exception) -> str:
    """One line for an exception: its type and the first line that says what is wrong (for
    load_state_dict, the first tensor it names rather than its "Error(s) in loading" header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return f"{type(e).__name__}: {(named or lines or [''])[0][:240]}"


def load_local(path: Path, checkpoint: str | None, n_layer: int | None) -> tuple[torch.nn.Module, dict]:
    if path.is_file():
        if path.suffix == ".pt":
            return load_pt(path, n_layer or DEFAULT_N_LAYER), {"format": "legacy .pt", "file": str(path)}
        if path.name in ("model.safetensors", "config.json") and is_checkpoint(path.parent):
            return load_local(path.parent, checkpoint, n_layer)
        raise UsageError(
            f"--model_path {path}: expected a .pt state dict, a checkpoint folder "
            "(config.json + model.safetensors), a run folder or a Hub repo id"
        )
    if is_checkpoint(path):
        return load_ours(path), {"format": "dragon-hatchling", "folder": str(path)}
    if (path / "config.json").is_file():
        raise UsageError(
            f"--model_path {path}: config.json but no model.safetensors (an incomplete checkpoint)"
        )
    which = checkpoint or "best"
    if (path / "checkpoints").is_dir():
        folder = checkpoint_folder(path, which) if which in ("best", "last") else None
        if folder is None:
            raise UsageError(
                f"--model_path {path}: a run folder, but it has no checkpoints/{which}/ "
                "(--checkpoint takes best or last for a run folder)"
            )
        return load_ours(folder), {"format": "dragon-hatchling", "folder": str(folder)}
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".pt") for n in names):
        name = choose_pt(names, checkpoint, f"folder {path}")
        return load_pt(path / name, n_layer or DEFAULT_N_LAYER), {
            "format": "legacy .pt",
            "file": str(path / name),
        }
    raise UsageError(
        f"--model_path {path}: no checkpoint in this folder (expected config.json + "
        "model.safetensors, checkpoints/best/, or .pt state dicts)"
    )


def load_hub(
    repo_id: str, checkpoint: str | None, revision: str | None, n_layer: int | None
) -> tuple[torch.nn.Module, dict]:
    """A model from a Hub repo (from the local cache alone with HF_HUB_OFFLINE=1), within HUB_DEADLINE."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return load_cached(repo_id, checkpoint, revision, n_layer)
    try:
        return with_deadline(download, repo_id, checkpoint, revision, n_layer)
    except HubUnreachable as e:
        raise HubUnreachable(f"--model_path {repo_id}: {e}") from None


def load_cached(
    repo_id: str, checkpoint: str | None, revision: str | None, n_layer: int | None
) -> tuple[torch.nn.Module, dict]:
    """A Hub repo's files as the local cache holds them (HF_HUB_OFFLINE=1: no listing, no download)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as e:  # not in the cache
        raise UsageError(
            f"--model_path {repo_id}: HF_HUB_OFFLINE is set and the local cache does not hold this repo"
            + (f" at revision {revision}" if revision else "")
        ) from e
    model, info = load_local(folder, checkpoint, n_layer)
    return model, {**info, "repo_id": repo_id, "revision": revision, "from": "the local cache (offline)"}


def download(
    repo_id: str, checkpoint: str | None, revision: str | None, n_layer: int | None
) -> tuple[torch.nn.Module, dict]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    info = {"format": None, "repo_id": repo_id, "revision": revision}
    try:
        names = HfApi().list_repo_files(repo_id, revision=revision)
        if checkpoint is None and "config.json" in names and "model.safetensors" in names:
            info["format"] = "dragon-hatchling"
            return load_ours(repo_id, revision=revision), info
        name = choose_pt(names, checkpoint, f"Hub repo {repo_id}")
        if not name.endswith(".pt"):
            raise UsageError(f"--checkpoint {name}: expected a .pt file in Hub repo {repo_id}")
        local = hf_hub_download(repo_id, name, revision=revision)
    except RevisionNotFoundError as e:
        raise UsageError(f"--revision {revision} does not exist in Hub repo {repo_id}") from e
    except RepositoryNotFoundError as e:
        raise UsageError(
            f"--model_path {repo_id}: no such local path, and no such Hub repo (or no access to it)"
        ) from e
    except HfHubHTTPError as e:
        raise UsageError(f"--model_path {repo_id}: the Hub answered an error ({hub_error(e)})") from e
    except UsageError:
        raise
    except Exception as e:  # connection errors come from the HTTP library, not as OSError
        raise HubUnreachable(
            f"--model_path {repo_id}: no such local path, and the Hub could not be reached ({hub_error(e)})"
        ) from e
    info.update(format="legacy .pt", file=name)
    return load_pt(local, n_layer or DEFAULT_N_LAYER), info


def load_model(
    model_path: str,
    checkpoint: str | None = None,
    revision: str | None = None,
    n_layer: int | None = None,
    flag: str = "--model_path",
) -> tuple[torch.nn.Module, dict]:
    """Any checkpoint (the formats of dragon_hatchling.hub's docstring) and a note of where it came from.

    n_layer: layers for legacy formats (default 6); for this project's format it must match the
    checkpoint's config if given. flag: the argument that gave model_path, as the errors name it
    (experiment.py's --init_from, the Hub tool's model_a).
    """
    try:
        return load_any(model_path, checkpoint, revision, n_layer)
    except (UsageError, HubUnreachable) as e:
        if flag == "--model_path":
            raise
        raise type(e)(str(e).replace("--model_path", flag)) from None


def load_any(
    model_path: str, checkpoint: str | None, revision: str | None, n_layer: int | None
) -> tuple[torch.nn.Module, dict]:
    path = Path(model_path)
    if path.exists() and revision is not None:
        raise UsageError(f"--revision {revision} picks a Hub revision: --model_path {model_path} is local")
    if checkpoint is not None and (path.is_file() or is_checkpoint(path)):
        raise UsageError(
            f"--checkpoint {checkpoint} picks one of a run folder or of a folder of .pt files: "
            f"--model_path {path} is one checkpoint already"
        )
    if path.exists():
        model, info = load_local(path, checkpoint, n_layer)
    elif REPO_ID.match(model_path) and not model_path.startswith((".", "/")):
        model, info = load_hub(model_path, checkpoint, revision, n_layer)
    else:
        raise UsageError(f"--model_path {model_path} is no file, folder or Hub repo id (USER/NAME)")
    if info["format"] == "dragon-hatchling" and n_layer is not None and n_layer != model.config.n_layer:
        raise UsageError(
            f"--n_layer {n_layer} disagrees with the checkpoint's config "
            f"(n_layer={model.config.n_layer}); leave it out for this format"
        )
    return model, info

"""BDH checkpoints in every format, and the Hugging Face Hub both ways.

Formats that `load_model` detects without being told:
  1. a run folder or checkpoint folder of this project (config.json + model.safetensors);
  2. a Hub repo in this project's format (`BDH.from_pretrained`, through PyTorchModelHubMixin);
  3. a `.pt` state dict of the reference report (`model_epoch_N.pt`: wte, decoder_x, decoder_y,
     encoder, readout), local or on the Hub, the newest epoch unless a file is named;
  4. a `.pt` state dict of the paper authors' `bdh.py` (embed, encoder, encoder_v, decoder, lm_head).
The legacy formats do not store the number of layers (the weights are shared): pass n_layer.

    uv run hub.py push RUN_DIR --hf_repo_id USER/NAME     # push a finished run (again)
    uv run hub.py convert model_epoch_3.pt OUT_DIR        # a legacy .pt -> this project's format
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch

from checkpoints import checkpoint_folder, is_checkpoint
from cli import Parser, UsageError, fail, make_out_dir, positive_int
from gpt import GPT
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
# Every Hub call ends: a request waits at most HUB_TIMEOUT seconds for an answer (the client's own
# default is no limit), and a whole push or download at most HUB_DEADLINE (retries included).
HUB_TIMEOUT = float(os.environ.get("BDH_HUB_TIMEOUT", "30"))
HUB_DEADLINE = float(os.environ.get("BDH_HUB_DEADLINE", "150"))
EPOCH_FILE = re.compile(r"model_epoch_(\d+)\.pt$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_N_LAYER = 6


# ----------------------------------------------------------------------------- the Hub's client


class HubUnreachable(Exception):
    """The Hub did not answer in time, or could not be reached: not bad input (exit code 1)."""


class _OneRetryLine(logging.Filter):
    """huggingface_hub logs two lines for every retry: let one line through, the first time only."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Retrying in" not in message and "thrown while requesting" not in message:
            return True
        if not _OneRetryLine.said:
            _OneRetryLine.said = True
            print(f"the Hub did not answer; retrying for up to {HUB_DEADLINE:.0f} s", file=sys.stderr)
        return False


def _client_with_timeout():
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.timeout = HUB_TIMEOUT
    return client


def _configure_client() -> None:
    from huggingface_hub import set_client_factory

    set_client_factory(_client_with_timeout)
    logging.getLogger("huggingface_hub.utils._http").addFilter(_OneRetryLine())


def with_deadline(fn, *args, deadline: float | None = None, **kwargs):
    """fn(*args, **kwargs) in a worker thread, given up after `deadline` seconds (HUB_DEADLINE by
    default) with HubUnreachable. The caller's thread waits, so Ctrl-C reaches it at once. Some of
    the client's requests ask for no timeout at all (listing a repo's files): this ends them too."""
    deadline = HUB_DEADLINE if deadline is None else deadline
    result: dict = {}

    def work() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise HubUnreachable(f"the Hub did not answer within {deadline:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


_configure_client()

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
    h, d, m = weights["Dx"].shape
    vocab = weights["embed.weight"].shape[0]
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
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'truncated or corrupted'})"
        ) from e
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


def model_class(config: dict) -> type[BDH] | type[GPT]:
    """The model a config.json describes: a GPT says arch "gpt"; BDH's configs have no arch."""
    return GPT if config.get("arch") == "gpt" else BDH


def load_ours(folder: str | Path, **kwargs) -> BDH | GPT:
    """A checkpoint in this project's format (a folder, or a Hub repo id with revision=...)."""
    try:
        if Path(folder).is_dir():
            config_file = Path(folder) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(str(folder), "config.json", revision=kwargs.get("revision"))
        config = json.loads(Path(config_file).read_text())
        return model_class(config).from_pretrained(folder, **kwargs)
    except Exception as e:  # safetensors, JSON, shape and I/O errors alike: a bad checkpoint
        raise UsageError(f"{folder}: could not load the checkpoint ({first_cause(e)})") from e


def first_cause(e: Exception) -> str:
    """One line for an exception: its type and the first line that says what is wrong (for
    load_state_dict, the first tensor it names rather than its "Error(s) in loading" header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return f"{type(e).__name__}: {(named or lines or [''])[0][:240]}"


def load_local(path: Path, checkpoint: str | None, n_layer: int | None) -> tuple[BDH, dict]:
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
) -> tuple[BDH, dict]:
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
) -> tuple[BDH, dict]:
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
) -> tuple[BDH, dict]:
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
    model_path: str, checkpoint: str | None = None, revision: str | None = None, n_layer: int | None = None
) -> tuple[BDH, dict]:
    """Any BDH checkpoint (see the module docstring) and a note of where it came from.

    n_layer: layers for legacy formats (default 6); for this project's format it must match the
    checkpoint's config if given.
    """
    path = Path(model_path)
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


# ----------------------------------------------------------------------------- pushing


def hub_error(e: Exception) -> str:
    """A one-line description of a Hub failure that never contains the token."""
    from huggingface_hub import get_token

    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    token = get_token()
    return text.replace(token, "***") if token else text


def model_card(run_dir: Path, repo_id: str) -> str:
    """The model card: YAML metadata, what the model is, the run's metrics, command and plots."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = metrics["config"]
    loss = metrics["final_val_loss"]
    args = metrics.get("args", {})
    window = args.get("eval_seq_len") or args.get("seq_len")  # runs from before validated in their windows
    lives = cfg.get("half_lives")
    attention = (
        f"attention that decays with half-lives of {', '.join(f'{t:g}' for t in lives)} bytes (one a head)"
        if lives
        else "the paper's attention, without decay"
    )
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type="Salesforce/wikitext",
            dataset_name="Wikitext-2 (raw, byte-level)",
            dataset_config="wikitext-2-raw-v1",
            dataset_split="validation",
            metric_type=name,
            metric_name=label,
            metric_value=value,
        )
        for name, label, value in [
            ("loss", "loss (nats/byte)", loss),
            ("bpb", "bits per byte", loss / math.log(2)),
            ("perplexity", "byte perplexity", math.exp(loss)),
        ]
    ]
    data = ModelCardData(
        library_name="dragon-hatchling",
        datasets=["Salesforce/wikitext"],
        tags=[
            "gpt" if cfg.get("arch") == "gpt" else "bdh",
            "dragon-hatchling",
            "byte-level",
            "text-generation",
        ],
        pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1],
        eval_results=results,
    )
    rows = [
        ("validation windows", f"{window} bytes"),
        ("validation loss (nats/byte)", f"{loss:.4f}"),
        ("validation bits/byte", f"{metrics['final_val_bpb']:.4f}"),
        ("validation byte perplexity", f"{metrics['final_val_perplexity']:.4f}"),
    ]
    rows += [
        (f"{name} loss (nats/byte)", f"{v['loss']:.4f}")
        for name, v in metrics.get("final_extra_val", {}).items()
    ]
    rows += [
        ("bytes trained", f"{metrics['bytes_trained']:,}"),
        ("steps", str(metrics["steps"])),
        ("wall time", f"{metrics['wall_time_s']:.0f} s"),
        ("device", metrics["device"]),
        ("torch", metrics["torch_version"]),
        ("date", metrics["date"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    plots = "\n".join(f"![{p.stem}]({p.name})" for p in sorted(run_dir.glob("*.png")))
    if cfg.get("arch") == "gpt":
        name, code = "GPT", "from gpt import GPT   # gpt.py of dragon-hatchling\nmodel = GPT"
        what = (
            f"A GPT in nanoGPT's shape, the Transformer baseline of dragon-hatchling's BDH-GPU, over UTF-8 "
            f"bytes, trained on Wikitext-2: {cfg['n_layer']} layers, width {cfg['n_embd']}, "
            f"{cfg['n_head']} heads, no biases, learned positions over {cfg['block_size']} bytes, "
            f"{metrics['num_params']:,} parameters."
        )
    else:
        name, code = "BDH-GPU", "from model import BDH   # model.py of dragon-hatchling\nmodel = BDH"
        what = f"""A [BDH-GPU](https://arxiv.org/abs/2509.26507) ("Dragon Hatchling", Appendix E) language
model over UTF-8 bytes, trained with dragon-hatchling on Wikitext-2: d={cfg["n_embd"]},
h={cfg["n_head"]}, n={cfg["n_neurons"]} neurons, {cfg["n_layer"]} layers sharing one set of weights,
{metrics["num_params"]:,} parameters, {attention}."""
    body = f"""
# {repo_id.split("/")[-1]}: {name} on byte-level Wikitext-2

{what}

```python
{code}.from_pretrained("{repo_id}")
```

or `uv run evaluate.py --model_path {repo_id}`.

## Results

| | |
|---|---|
{table}

Command: `{metrics["command"]}`

Data: {", ".join(f"{k}: {v['source']}" for k, v in metrics["data"].items() if isinstance(v, dict))}

{plots}

The run's `log.csv` and `metrics.json` are in this repository.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, checkpoint: str = "best") -> str:
    """Push a run's checkpoint (safetensors + config), a model card and its results in one commit."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    folder = checkpoint_folder(run_dir, checkpoint)
    if folder is None or not (run_dir / "metrics.json").is_file():
        raise UsageError(
            f"{run_dir} is not a finished run folder (expected checkpoints/{checkpoint}/ and metrics.json)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(folder / name, stage / name)
        for p in [run_dir / "log.csv", run_dir / "metrics.json", *run_dir.glob("*.png")]:
            if p.is_file():
                shutil.copy2(p, stage / p.name)
        (stage / "README.md").write_text(model_card(run_dir, repo_id))

        def upload() -> str:
            api = HfApi()
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=stage,
                commit_message=f"dragon-hatchling run {run_dir.name} ({checkpoint} checkpoint)",
            )
            return str(url)

        size = sum(p.stat().st_size for p in stage.iterdir())
        return with_deadline(upload, deadline=HUB_DEADLINE + size / 1e6)  # and 1 s a MB: a slow link ends


def push_later(run_dir: Path, repo_id: str) -> str:
    """What a failed push keeps, and the command that pushes later."""
    command = f"uv run hub.py push {run_dir} --hf_repo_id {repo_id}"
    return f"every local file is kept in {run_dir}; push later with: {command}"


def try_push(run_dir: Path, repo_id: str, private: bool = False) -> bool:
    """Push, or print one line saying what failed and how to push later. Never raises."""
    try:
        url = push_run(run_dir, repo_id, private)
    except UsageError as e:
        print(f"error: push to the Hub failed: {e}", file=sys.stderr)
        return False
    except KeyboardInterrupt:  # Ctrl-C while waiting for the Hub
        print(f"error: push to the Hub interrupted; {push_later(run_dir, repo_id)}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # network, auth, server errors, no answer in time: the local run stays
        print(
            f"error: push to the Hub failed ({hub_error(e)}); {push_later(run_dir, repo_id)}", file=sys.stderr
        )
        return False
    print(f"pushed {run_dir} to {url}")
    return True


# ----------------------------------------------------------------------------- command line

CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "training_state.pt",
)  # what a checkpoint holds


def convert_target(out_dir: Path, overwrite: bool) -> Path:
    """The folder `convert` writes into: new or empty, or holding a checkpoint that --overwrite replaces."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(
                f"out_dir {out_dir} is not empty; pass --overwrite to replace the checkpoint in it"
            )
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in CHECKPOINT_FILES)
        if others:
            raise UsageError(
                f"out_dir {out_dir} holds more than a checkpoint ({', '.join(others[:5])}); "
                "choose another folder"
            )
    try:
        return make_out_dir(out_dir)
    except UsageError as e:
        raise UsageError(str(e).replace("--out_dir", "out_dir", 1)) from None


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="push a finished run folder to the Hub")
    push.add_argument("run_dir", help="a run folder written by experiment.py")
    push.add_argument("--hf_repo_id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    conv = sub.add_parser("convert", help="convert any BDH checkpoint into this project's format")
    conv.add_argument("model_path", help="a .pt state dict, folder or Hub repo id")
    conv.add_argument("out_dir", help="folder for config.json + model.safetensors")
    conv.add_argument("--checkpoint", default=None, help="which file of a folder or repo")
    conv.add_argument("--revision", default=None, help="Hub revision")
    conv.add_argument("--n_layer", type=positive_int, default=None, help="layers, for legacy formats (6)")
    conv.add_argument(
        "--overwrite", action="store_true", help="replace the checkpoint in out_dir if it has one"
    )
    args = p.parse_args(argv)
    try:
        if args.command == "push":
            if not REPO_ID.match(args.hf_repo_id):
                raise UsageError(f"--hf_repo_id {args.hf_repo_id!r}: expected USER/NAME")
            return 0 if try_push(Path(args.run_dir), args.hf_repo_id, args.private) else 1
        out_dir = convert_target(Path(args.out_dir), args.overwrite)
        model, info = load_model(args.model_path, args.checkpoint, args.revision, args.n_layer)
        for name in CHECKPOINT_FILES:  # --overwrite: no file of the old checkpoint stays beside the new
            (out_dir / name).unlink(missing_ok=True)
        model.save_pretrained(out_dir)
    except UsageError as e:
        fail(str(e))
    except HubUnreachable as e:
        fail(str(e), code=1)
    print(f"converted {args.model_path} ({info['format']}, {model.config}) into {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BDH checkpoints in every format, and the Hugging Face Hub both ways.

    uv run python -m dragon_hatchling.hub push RUN_DIR --hf_repo_id USER/NAME   # push a finished run (again)
    uv run python -m dragon_hatchling.hub convert model_epoch_3.pt OUT_DIR     # any format -> this project's
    uv run python -m dragon_hatchling.hub merge MODEL_A MODEL_B OUT_DIR       # n1 + n2 neurons (merging.py)

A push sends a run's best checkpoint (model.safetensors + config.json), a model card (YAML metadata,
the metrics, command, hardware, date and plots) and the run's log.csv, metrics.json and plots, in one
commit; the token comes from HF_TOKEN or `hf auth login` and is never printed. A push that fails
keeps every local file and prints one line with the command that pushes later (exit 1). Every Hub
call ends by itself: BDH_HUB_TIMEOUT seconds (30) a request, BDH_HUB_DEADLINE (150) a whole push or
download (hub_client.py). With HF_HUB_OFFLINE=1 a repo already in the local cache loads from there.

Formats that `evaluate.py --model_path` and `convert` read (loading.py), told apart without being told:
  1. a run folder (its checkpoints/best, or checkpoints/last with --checkpoint last) or checkpoint
     folder of this project: config.json + model.safetensors (BDH, or the GPT: config "arch": "gpt");
  2. a Hub repo in this project's format (`BDH.from_pretrained`, through PyTorchModelHubMixin;
     --revision pins a branch, tag or commit);
  3. a `.pt` state dict of the reference report (`model_epoch_N.pt`: wte, decoder_x, decoder_y,
     encoder, readout; RoPE pairs (i, i + m/2), base 10000), local or on the Hub; of a folder or repo
     of them the newest epoch unless --checkpoint names a file (e.g. daichi202/dragon-hatchling);
  4. a `.pt` state dict of the paper authors' `bdh.py` (embed, encoder, encoder_v, decoder, lm_head;
     RoPE pairs (2i, 2i+1), base 65536): their encoder is our Dx, encoder_v our Dy, decoder our E.
The legacy formats do not store the number of layers (the weights are shared): --n_layer, default 6.
`.pt` files are read with torch.load(..., weights_only=True) only, and both legacy formats load to the
logits their own code computes (tests/test_hub.py, on ../shared/fixtures/legacy).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from dragon_hatchling.architectures import arch_of, config_of, model_class
from dragon_hatchling.checkpoints import SaveFailed, checkpoint_folder, save_checkpoint
from dragon_hatchling.cli import Parser, UsageError, fail, make_out_dir, positive_int
from dragon_hatchling.hub_client import HUB_DEADLINE, REPO_ID, HubUnreachable, hub_error, with_deadline
from dragon_hatchling.loading import load_model
from dragon_hatchling.stopping import interruptible

# ----------------------------------------------------------------------------- pushing


def card_results(loss: float) -> list:
    """The validation results as the Hub's model-index reads them."""
    from huggingface_hub.repocard_data import EvalResult

    return [
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


def card_table(metrics: dict) -> str:
    """The model card's table: the results, and how they were made."""
    args = metrics.get("args", {})
    window = args.get("eval_seq_len") or args.get("seq_len")  # runs from before validated in their windows
    rows = [
        ("validation windows", f"{window} bytes"),
        ("validation loss (nats/byte)", f"{metrics['final_val_loss']:.4f}"),
        ("validation bits/byte", f"{metrics['final_val_bpb']:.4f}"),
        ("validation byte perplexity", f"{metrics['final_val_perplexity']:.4f}"),
    ]
    extra = metrics.get("final_extra_val", {})
    rows += [(f"{name} loss (nats/byte)", f"{v['loss']:.4f}") for name, v in extra.items()]
    rows += [
        ("bytes trained", f"{metrics['bytes_trained']:,}"),
        ("steps", str(metrics["steps"])),
        ("wall time", f"{metrics['wall_time_s']:.0f} s"),
        ("device", metrics["device"]),
        ("torch", metrics["torch_version"]),
        ("date", metrics["date"]),
    ]
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def model_card(run_dir: Path, repo_id: str) -> str:
    """The model card: YAML metadata, what the model is, the run's metrics, command and plots."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cls, config = model_class(metrics["config"]), config_of(metrics["config"])
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        library_name="dragon-hatchling",
        datasets=["Salesforce/wikitext"],
        tags=[arch_of(metrics["config"]), "dragon-hatchling", "byte-level", "text-generation"],
        pipeline_tag="text-generation",
        model_name=name,
        eval_results=card_results(metrics["final_val_loss"]),
    )
    sources = ", ".join(f"{k}: {v['source']}" for k, v in metrics["data"].items() if isinstance(v, dict))
    plots = "\n".join(f"![{p.stem}]({p.name})" for p in sorted(run_dir.glob("*.png")))
    body = f"""
# {name}: {cls.display_name} on byte-level Wikitext-2

A {cls.description} language model over UTF-8 bytes, trained with dragon-hatchling on Wikitext-2:
{metrics.get("shape", config.describe())}; {metrics["num_params"]:,} parameters.

```python
from {cls.__module__} import {cls.__name__}   # dragon-hatchling
model = {cls.__name__}.from_pretrained("{repo_id}")
```

or `uv run evaluate.py --model_path {repo_id}`.

## Results

| | |
|---|---|
{card_table(metrics)}

Command: `{metrics["command"]}`

Data: {sources}

{plots}

The run's `log.csv` and `metrics.json` are in this repository.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def finished_run(run_dir: Path, checkpoint: str = "best") -> Path:
    """The checkpoint folder of a finished run folder; a UsageError if it is not one."""
    folder = checkpoint_folder(run_dir, checkpoint)
    if folder is None or not (run_dir / "metrics.json").is_file():
        raise UsageError(
            f"{run_dir} is not a finished run folder (expected checkpoints/{checkpoint}/ and metrics.json)"
        )
    return folder


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, checkpoint: str = "best") -> str:
    """Push a run's checkpoint (safetensors + config), a model card and its results in one commit."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    folder = finished_run(run_dir, checkpoint)
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
    command = f"uv run python -m dragon_hatchling.hub push {run_dir} --hf_repo_id {repo_id}"
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


def convert_target(out_dir: Path, overwrite: bool, make: bool = True) -> Path:
    """The folder `convert` and `merge` write into: new or empty, or holding a checkpoint that
    --overwrite replaces; made now unless make=False (checked only)."""
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
    if not make:
        return out_dir
    try:
        return make_out_dir(out_dir)
    except UsageError as e:
        raise UsageError(str(e).replace("--out_dir", "out_dir", 1)) from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
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
    merge = sub.add_parser(
        "merge",
        help="merge two BDH models of the same d, heads and layers into one of n1 + n2 neurons, no "
        "training (the paper's section 7.1; dragon_hatchling/merging.py)",
    )
    merge.add_argument("model_a", help="a run folder (its best checkpoint), checkpoint, .pt or Hub repo id")
    merge.add_argument("model_b", help="the other model, in any of those formats")
    merge.add_argument("out_dir", help="folder for the merged config.json + model.safetensors")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace the checkpoint in out_dir if it has one"
    )
    return p


def merged(args: argparse.Namespace):
    """The two models of `merge`, loaded and merged (a UsageError if either is no BDH)."""
    from dragon_hatchling.merging import merge

    models = []
    for name, path in (("model_a", args.model_a), ("model_b", args.model_b)):
        model, _ = load_model(path, flag=name)
        if not model.has_neurons:
            raise UsageError(f"{path}: a {model.display_name} has no neurons to merge (BDH models merge)")
        models.append(model)
    return merge(*models)


@interruptible("before it finished (a convert writes its folder whole or not at all)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "push":
            if not REPO_ID.match(args.hf_repo_id):
                raise UsageError(f"--hf_repo_id {args.hf_repo_id!r}: expected USER/NAME")
            finished_run(Path(args.run_dir))  # bad input before any work: exit 2
            return 0 if try_push(Path(args.run_dir), args.hf_repo_id, args.private) else 1
        out_dir = convert_target(Path(args.out_dir), args.overwrite, make=args.command != "merge")
        if args.command == "merge":  # the models are checked first: a refusal leaves no folder
            model = merged(args)
            convert_target(out_dir, args.overwrite)
            done = f"merged {args.model_a} and {args.model_b} into {args.out_dir} ({model.config})"
        else:
            model, info = load_model(args.model_path, args.checkpoint, args.revision, args.n_layer)
            done = f"converted {args.model_path} ({info['format']}, {model.config}) into {args.out_dir}"
        save_checkpoint(model, out_dir)  # the old checkpoint, with --overwrite, is replaced whole
    except UsageError as e:
        fail(str(e))
    except (HubUnreachable, SaveFailed) as e:
        fail(str(e), code=1)
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())

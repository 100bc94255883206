"""Train BDH-GPU (or, with --arch gpt, a GPT of the same size) on byte-level Wikitext-2: logs, plots,
checkpoints, metrics.

uv run experiment.py --device cuda --fused                     # BDH-GPU, the default recipe
uv run experiment.py --device cuda --fused --recipe reference  # the reference report's run
uv run experiment.py --device cuda --arch gpt --recipe reference  # a 25.6M nanoGPT, the same bytes
uv run experiment.py --device cpu --n_neurons 512 --n_layer 2 --max_steps 200   # a small one
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import (
    checkpoint_folder,
    clear_run,
    holds_run,
    load_training_state,
    load_weights,
    lock_folder,
    save_checkpoint,
    write_json,
)
from cli import (
    Parser,
    UsageError,
    add_device_args,
    fail,
    half_lives,
    make_out_dir,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from data import (
    dataset_folder,
    describe_source,
    epoch_offsets,
    load_bytes_file,
    load_split,
    num_windows,
    prepare_dataset,
    window_batches,
    windows_at,
)
from devices import autocast, check_fits, resolve_device, resolve_dtype
from distributed import (
    Quiet,
    Ranks,
    agreed,
    all_reduce,
    gather,
    rank_device,
    ranks_from_env,
    share,
    start,
    stop,
)
from evaluate import Stopped, activation_summary, eval_batch_windows, eval_mode, position_loss_sums
from gpt import GPT, GPTConfig
from hub import REPO_ID, first_cause, try_push
from model import BDH, BDHConfig

LN2 = math.log(2)
CSV_FIELDS = [
    "step",
    "epoch",
    "bytes_seen",
    "train_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "bytes_per_s",
    "elapsed_s",
]
# at every validation: the fraction of non-zero neurons x and y (the paper reports about 5%), averaged
# over the layers, on the first 8 validation windows
SPARSITY_FIELDS = ["x_nonzero", "y_nonzero"]


# The defaults of the flags a recipe sets. long-context: the recipe that won results/long-context
# (better than the reference on every measure there); reference: the reference report's.
RECIPES = {
    "long-context": {"batch_size": 8, "seq_len": 512, "half_lives": [8.0, 32.0, 128.0, 256.0]},
    "reference": {"batch_size": 32, "seq_len": 128, "half_lives": None},
}


# The model flags each architecture fills in when they are left out.
ARCH_DEFAULTS = {
    "bdh": {"n_embd": 256, "n_head": 4, "n_neurons": 32768, "n_layer": 6, "rope_theta": 65536.0,
            "rope_style": "interleaved"},
    "gpt": {"n_embd": 512, "n_head": 8, "n_layer": 8, "block_size": 512},
}  # fmt: skip
# The flags of one architecture alone; the other refuses them.
ARCH_ONLY = {"bdh": ("n_neurons", "rope_theta", "rope_style", "half_lives"), "gpt": ("block_size",)}


def recipe_half_lives(lives: list[float], n_head: int) -> list[float]:
    """A recipe's half-lives (for 4 heads) for n_head heads: its curve, log-linear, at n_head points
    from its first to its last (one head: the last, the longest)."""
    if n_head == len(lives):
        return list(lives)
    at = np.linspace(0, len(lives) - 1, n_head) if n_head > 1 else np.array([len(lives) - 1.0])
    return [round(float(t), 2) for t in np.exp(np.interp(at, np.arange(len(lives)), np.log(lives)))]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("hardware")
    add_device_args(g)
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for CUDA, off elsewhere)",
    )
    g.add_argument(
        "--fused",
        action="store_true",
        help="train through the fused Triton kernels (kernels.py; CUDA)",
    )
    g.add_argument(
        "--dist_timeout",
        type=positive_float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others before the run stops (600)",
    )
    g = p.add_argument_group("schedule (the paper's recipe by default)")
    g.add_argument("--epochs", type=positive_int, default=3, help="passes over the train split (3)")
    g.add_argument(
        "--max_steps",
        type=positive_int,
        default=None,
        help="stop after this many optimizer steps (default: --epochs worth)",
    )
    g.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help="what --batch_size, --seq_len and --half_lives default to: long-context (the default: 8 x 512 "
        "bytes, half-lives 8,32,128,256; results/long-context) or reference (the reference report's 32 x 128 "
        "bytes, no decay: the paper's model); flags given explicitly win, and a resumed run keeps its own",
    )
    g.add_argument("--batch_size", type=positive_int, default=None, help="windows per step (recipe: 8)")
    g.add_argument("--seq_len", type=positive_int, default=None, help="bytes per window (recipe: 512)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (1e-3)")
    g.add_argument(
        "--min_lr",
        type=nonneg_float,
        default=1e-4,
        help="learning rate at the last step, reached linearly after warm-up (1e-4)",
    )
    g.add_argument("--warmup_steps", type=nonneg_int, default=1000, help="linear warm-up (1000)")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.1, help="AdamW weight decay (0.1)")
    g.add_argument(
        "--grad_clip",
        type=nonneg_float,
        default=1.0,
        help="clip the gradient's global norm to this; 0 turns clipping off (1.0)",
    )
    g.add_argument("--seed", type=int, default=1337, help="random seed for weights and data order")
    g = p.add_argument_group("model (BDH-GPU by default, with the reference report's dimensions)")
    g.add_argument(
        "--arch",
        choices=list(ARCH_DEFAULTS),
        default=None,
        help="bdh: BDH-GPU (model.py; the default); gpt: a GPT in nanoGPT's shape (gpt.py), to compare",
    )
    g.add_argument("--n_embd", type=positive_int, default=None, help="d (bdh 256, gpt 512)")
    g.add_argument("--n_head", type=positive_int, default=None, help="h (bdh 4, gpt 8)")
    g.add_argument("--n_neurons", type=positive_int, default=None, help="bdh: n, total over heads (32768)")
    g.add_argument(
        "--n_layer",
        type=positive_int,
        default=None,
        help="L (bdh 6, layers sharing one set of weights; gpt 8)",
    )
    g.add_argument(
        "--block_size",
        type=positive_int,
        default=None,
        help="gpt: the longest window, learned positions (512)",
    )
    g.add_argument("--dropout", type=nonneg_float, default=0.1, help="dropout on y (0.1)")
    g.add_argument("--rope_theta", type=positive_float, default=None, help="bdh: RoPE base (65536)")
    g.add_argument(
        "--rope_style",
        choices=["interleaved", "half"],
        default=None,
        help="bdh: RoPE pairing, interleaved (paper authors; the default) or half (reference report)",
    )
    g.add_argument(
        "--half_lives",
        type=half_lives,
        default=None,
        metavar="H1,H2,...",
        help="bdh: attention decay, per head the bytes after which the state's weight on a byte halves "
        "(one number: every head; none: no decay, the paper's model; recipe: 8,32,128,256)",
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data_dir",
        default=None,
        help="folder with wiki.{train,valid,test}.raw (default: Salesforce/wikitext from the Hub)",
    )
    g.add_argument(
        "--train_file",
        default=None,
        help="train on this file's bytes instead of the train split (e.g. wiki.train.tokens)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help="train on this text dataset instead of Wikitext-2: a Hub id or a local folder (save_to_disk, "
        "or json/csv/parquet/text files), converted once into byte files under --data_cache",
    )
    g.add_argument("--dataset_config", default=None, help="--dataset's configuration (its subset)")
    g.add_argument("--text_column", default="text", help="--dataset's column of text (text)")
    g.add_argument(
        "--val_fraction",
        type=positive_float,
        default=0.005,
        help="--dataset without a validation split: this fraction of its train rows is held out (0.005)",
    )
    g.add_argument(
        "--data_cache",
        default=os.environ.get("BDH_DATA_CACHE", "~/.cache/dragon-hatchling/datasets"),
        help="where --dataset's byte files are kept (BDH_DATA_CACHE; ~/.cache/dragon-hatchling/datasets)",
    )
    g.add_argument(
        "--extra_val_file",
        action="append",
        default=[],
        metavar="PATH",
        help="also report validation loss on this file (repeatable)",
    )
    g.add_argument(
        "--eval_every",
        type=positive_int,
        default=500,
        help="validate on the whole validation split every N steps, and at the end (500)",
    )
    g.add_argument(
        "--eval_seq_len",
        type=positive_int,
        default=None,
        help="bytes per validation window (128: the reference report's protocol, the same for every recipe)",
    )
    g.add_argument("--eval_batch_size", type=positive_int, default=64, help="windows per eval batch (64)")
    g.add_argument("--log_every", type=positive_int, default=10, help="CSV row every N steps (10)")
    g.add_argument("--out_dir", default=None, help="run folder (default: results/runs/<date-time>)")
    g.add_argument("--overwrite", action="store_true", help="allow reusing a folder that has a run")
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue a run from a checkpoint folder or run folder; auto: --out_dir's last checkpoint",
    )
    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the best checkpoint, a model card and "
        "the results at the end of the run (token from HF_TOKEN or `hf auth login`)",
    )
    g.add_argument("--hf_repo_id", default=None, help="USER/NAME of the model repo to push to")
    g.add_argument("--push_every_epoch", action="store_true", help="also push after every epoch")
    g.add_argument("--hf_private", action="store_true", help="create the repo private")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def apply_arch(args: argparse.Namespace, saved: dict | None) -> None:
    """Fill the model flags left out: from the checkpoint being resumed, else the architecture's
    defaults. A flag of the other architecture is a UsageError."""
    if args.arch is None:
        args.arch = saved.get("arch", "bdh") if saved is not None else "bdh"
    for other, names in ARCH_ONLY.items():
        given = [name for name in names if other != args.arch and getattr(args, name) is not None]
        if given:
            raise UsageError(f"--{given[0]} is not a flag of --arch {args.arch}")
    for name, default in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, default) if saved is not None else default)


def apply_recipe(args: argparse.Namespace, saved: dict | None) -> None:
    """Fill the flags left out: from the checkpoint being resumed (its own recipe), else the recipe's."""
    apply_arch(args, saved)
    if args.recipe is None:
        args.recipe = saved.get("recipe", "reference") if saved is not None else "long-context"
    for name, default in RECIPES[args.recipe].items():
        if getattr(args, name) is not None or args.arch == "gpt" and name == "half_lives":
            continue
        if saved is not None:  # runs from before --recipe had the reference's windows and no decay
            value = saved.get(name, RECIPES["reference"][name])
        elif name == "half_lives" and default:
            value = recipe_half_lives(default, args.n_head)
        else:
            value = default
        setattr(args, name, value)
    if args.half_lives and len(args.half_lives) == 1:  # one half-life for every head
        args.half_lives = args.half_lives * args.n_head
    args.half_lives = args.half_lives or None  # --half_lives none
    if args.eval_seq_len is None:  # runs from before --eval_seq_len validated in their own windows
        args.eval_seq_len = 128 if saved is None else saved.get("eval_seq_len", saved.get("seq_len", 128))


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then linear decay to --min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, total - 1 - args.warmup_steps)
    frac = min(1.0, (step - args.warmup_steps) / span)
    return args.lr + frac * (args.min_lr - args.lr)


def git_commit() -> str | None:
    try:
        here = Path(__file__).parent
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def extra_labels(paths: list[str]) -> list[str]:
    """A label for each --extra_val_file, unique: the file's name, with as many of its folders in
    front as it takes to tell apart files of the same name. The same file twice is an error."""
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p in paths if resolved.count(Path(p).resolve()) > 1)
        raise UsageError(f"--extra_val_file {twice} is given twice")
    for depth in range(1, max((len(p.parts) for p in resolved), default=1) + 1):
        labels = ["_".join(p.parts[-depth:]).replace(".", "_").replace("/", "") for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    raise AssertionError("distinct files have distinct paths")


MODEL_NAMES = {"bdh": "BDH-GPU", "gpt": "GPT"}


def make_plots(rows: list[dict], extra: list[str], out_dir: Path, model: str = "BDH-GPU") -> None:
    """loss.png (train and val loss against bytes seen), bpb.png and lr.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        pts = [(float(r["bytes_seen"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig, name: str) -> None:  # atomically: a kill never leaves half a PNG
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp"
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out_dir / name)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*series("train_loss"), label="train", alpha=0.6, lw=1)
    ax.plot(*series("val_loss"), "o-", label="validation")
    for label in extra:
        ax.plot(*series(f"val_loss_{label}"), "s--", label=f"validation ({label})")
    ax.set(xlabel="bytes seen", ylabel="loss (nats/byte)", title=f"{model} on byte-level Wikitext-2")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys = series("train_loss")
    ax.plot(xs, [y / LN2 for y in ys], label="train", alpha=0.6, lw=1)
    ax.plot(*series("val_bpb"), "o-", label="validation")
    for label in extra:
        ax.plot(*series(f"val_bpb_{label}"), "s--", label=f"validation ({label})")
    ax.set(xlabel="bytes seen", ylabel="bits per byte", title="Bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "bpb.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*series("lr"))
    ax.set(xlabel="bytes seen", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    xs, x_live = series("x_nonzero")
    if xs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(xs, x_live, "o-", label="x = relu(v Dx)")
        ax.plot(*series("y_nonzero"), "s-", label="y = relu(LN(a) Dy) * x")
        ax.set(
            xlabel="bytes seen",
            ylabel="fraction non-zero",
            title="Sparsity on validation text",
            ylim=(0, None),
        )
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "sparsity.png")


class CsvLog:
    """The training log: one row every --log_every steps, flushed as it goes.

    A resumed run keeps the rows up to its checkpoint's step (rewritten atomically, which also
    drops a line torn by a kill) and appends after them.
    """

    def __init__(self, path: Path, fields: list[str], resume_step: int | None = None) -> None:
        self.fields = fields
        self.rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                old = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]
            self.rows = [{k: r.get(k) or "" for k in fields} for r in old if int(r["step"]) <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, lineterminator="\n")

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in self.fields}
        self.writer.writerow(row)
        self.file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self.file.close()


# Flags that must agree between a run and its resumption (the rest, e.g. --device, may change).
RESUME_MUST_MATCH = (
    "epochs",
    "max_steps",
    "batch_size",
    "seq_len",
    "eval_seq_len",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "seed",
    "n_embd",
    "n_head",
    "n_neurons",
    "n_layer",
    "dropout",
    "rope_theta",
    "rope_style",
    "half_lives",
    "arch",
    "block_size",
    "train_file",
    "data_dir",
    "dataset",
    "dataset_config",
    "text_column",
    "val_fraction",
)


def find_resume(args: argparse.Namespace) -> Path | None:
    """The checkpoint folder that --resume names (auto: --out_dir's last checkpoint), or None."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        if args.out_dir is None:
            raise UsageError("--resume auto needs --out_dir (the run folder to continue)")
        where = Path(args.out_dir)
    else:
        where = Path(args.resume)
    folder = checkpoint_folder(where, "last") if not (where / "training_state.pt").is_file() else where
    if folder is None or not (folder / "training_state.pt").is_file():
        raise UsageError(
            f"--resume {args.resume}: no checkpoint with training state in {where} "
            "(expected checkpoints/last/training_state.pt)"
        )
    return folder


def prepare(args: argparse.Namespace, ranks: Ranks | None = None) -> dict:
    """Check every argument and input before any work; UsageError on the first bad one."""
    ranks = ranks or Ranks()
    device = rank_device(ranks, resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    if args.push_every_epoch and not args.push_to_hub:
        raise UsageError("--push_every_epoch needs --push_to_hub")
    if args.fused and args.compile:
        raise UsageError("--fused runs its own kernels: leave out --compile")
    if args.fused and device.type != "cuda":
        raise UsageError(f"--fused runs Triton kernels on CUDA; the device is {device} (leave out --fused)")
    if args.min_lr > args.lr:
        raise UsageError(
            f"--min_lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min_lr"
        )
    if args.push_to_hub and (args.hf_repo_id is None or not REPO_ID.match(args.hf_repo_id)):
        raise UsageError(f"--push_to_hub needs --hf_repo_id USER/NAME (got {args.hf_repo_id!r})")
    resume = find_resume(args)
    resume_state = None
    if resume is not None:
        resume_state = load_training_state(resume)
        saved = resume_state.get("args", {})
        apply_recipe(args, saved)
        differ = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
        if differ:
            detail = ", ".join(f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})" for k in differ)
            raise UsageError(
                f"--resume {args.resume}: the checkpoint's config disagrees with the flags given: {detail}"
            )
    else:
        apply_recipe(args, None)
    config = model_config(args)
    if args.batch_size % ranks.world:
        raise UsageError(
            f"--batch_size {args.batch_size} (the global batch) does not divide among {ranks.world} processes"
        )
    if args.arch == "gpt":
        if args.fused:
            raise UsageError(
                "--fused runs BDH's kernels; --arch gpt trains through torch (leave out --fused)"
            )
        longest = max(args.seq_len, args.eval_seq_len)
        if longest > config.block_size:
            raise UsageError(
                f"--arch gpt reads at most --block_size {config.block_size} bytes; "
                f"--seq_len {args.seq_len} / --eval_seq_len {args.eval_seq_len} are longer"
            )
        # float32 weights, gradients and AdamW's moments; per layer about 16 d floats a byte kept
        kept = 4 * args.batch_size * args.seq_len * 16 * config.n_embd * config.n_layer
        need = 16 * config.num_params + kept // ranks.world
    else:  # at least: float32 weights, gradients and AdamW's two moments, and one layer's neurons x and y
        neurons = 2 * 4 * args.batch_size * args.seq_len * config.n_neurons
        need = 16 * config.num_params + neurons // ranks.world
    check_fits(
        need,
        device,
        f"training this model ({config.num_params:,} parameters) on {args.batch_size} x {args.seq_len} bytes"
        + (f" ({args.batch_size // ranks.world} windows a process)" if ranks.several else ""),
    )
    train_path, valid_path = args.train_file, None  # None: the split of --data_dir or the Hub
    if args.dataset is not None:
        check_dataset_flags(args)
        folder = dataset_folder(
            args.data_cache, args.dataset, args.dataset_config, args.text_column, args.val_fraction
        )
        train_path, valid_path = folder / "train.bin", folder / "valid.bin"
        train = load_bytes_file(train_path, what=f"--dataset {args.dataset}: train")
        valid = load_bytes_file(valid_path, what=f"--dataset {args.dataset}: validation")
    elif args.train_file is not None:
        train = load_bytes_file(args.train_file, what="--train_file")
        valid = load_split("valid", args.data_dir)
    else:
        train = load_split("train", args.data_dir)
        valid = load_split("valid", args.data_dir)
    extra_files = dict(zip(extra_labels(args.extra_val_file), args.extra_val_file, strict=True))
    extra = {label: load_bytes_file(p, what="--extra_val_file") for label, p in extra_files.items()}
    windows = [("train", train, "--seq_len"), ("valid", valid, "--eval_seq_len")]
    for name, data, flag in windows + [(name, data, "--eval_seq_len") for name, data in extra.items()]:
        T = args.seq_len if flag == "--seq_len" else args.eval_seq_len
        if num_windows(data, T) == 0:
            raise UsageError(
                f"{name} data ({len(data)} bytes) is shorter than one window of {flag} + 1 = {T + 1} bytes"
            )
    steps_per_epoch = num_windows(train, args.seq_len) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"train data has {num_windows(train, args.seq_len)} windows of "
            f"{args.seq_len} bytes, fewer than --batch_size {args.batch_size}"
        )
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
    elif resume is not None:
        out_dir = resume.parent.parent  # RUN/checkpoints/last
    else:
        out_dir = Path(f"results/runs/{dt.datetime.now():%Y%m%d-%H%M%S}")
    lock = None
    if ranks.main:  # rank 0 alone writes
        make_out_dir(out_dir)
        lock = lock_folder(out_dir)  # held for the run's life: two runs never share a folder
    if ranks.main and holds_run(out_dir) and not args.overwrite and resume is None:
        raise UsageError(
            f"--out_dir {out_dir} already holds a run; pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    return dict(
        lock=lock,
        device=device,
        dtype=dtype,
        config=config,
        train=train,
        valid=valid,
        extra=extra,
        extra_files=extra_files,
        train_path=train_path,
        valid_path=valid_path,
        steps_per_epoch=steps_per_epoch,
        out_dir=out_dir,
        resume=resume,
        resume_state=resume_state,
    )


def check_dataset_flags(args: argparse.Namespace) -> None:
    if args.data_dir is not None or args.train_file is not None:
        raise UsageError("--dataset replaces Wikitext-2: leave out --data_dir and --train_file")
    if not args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be below 1, got {args.val_fraction}")


def convert_dataset(args: argparse.Namespace) -> Path:
    """--dataset's byte files, converted now unless they were before."""
    check_dataset_flags(args)
    return prepare_dataset(
        args.dataset,
        args.dataset_config,
        args.text_column,
        args.val_fraction,
        args.data_cache,
        seed=args.seed,
        progress=not args.no_progress,
    )


def model_config(args: argparse.Namespace) -> BDHConfig | GPTConfig:
    """The model's config from the (filled-in) flags of the same names; a UsageError if it is not a
    valid model."""
    cls = GPTConfig if args.arch == "gpt" else BDHConfig
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**flags)
    except ValueError as e:
        raise UsageError(f"model config: {e}") from e


def shell_command(argv: list[str]) -> str:
    """This script's command line with `argv`, as a user would type it."""
    launcher = "uv run" if "UV" in os.environ else Path(sys.executable).name
    return " ".join([launcher, *(shlex.quote(a) for a in [Path(sys.argv[0]).name, *argv])])


def resume_argv(argv: list[str], out_dir: Path) -> list[str]:
    """The arguments that continue this run: the same, less --overwrite and --resume, into out_dir."""
    kept, skip = [], False
    for a in argv:
        if skip or a == "--overwrite" or a.startswith("--resume="):
            skip = False
        elif a == "--resume":
            skip = True  # and its value
        else:
            kept.append(a)
    if not any(a == "--out_dir" or a.startswith("--out_dir=") for a in kept):
        kept += ["--out_dir", str(out_dir)]
    return [*kept, "--resume", "auto"]


class RunFailed(Exception):
    """An unexpected exception stopped the run; what the last whole step holds was saved."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved and can be resumed."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.code = 128 + signum


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def kept_checkpoint(out_dir: Path) -> str:
    folder = checkpoint_folder(out_dir, "last")
    if folder is None:
        return "No checkpoint had been saved yet."
    step = load_training_state(folder)["step"]
    return f"The last good checkpoint (step {step}) is kept in {folder}."


@torch.no_grad()
def check_validation_fits(fwd, valid, seq_len: int, batch: int, device: torch.device, dtype) -> None:
    """One validation batch before the first step: a run whose validation cannot run fails at its
    start, not at its first validation hours later."""
    x, _ = next(window_batches(valid, seq_len, batch))
    try:
        with eval_mode(fwd), autocast(device, dtype):
            fwd(x.to(device))
    except torch.OutOfMemoryError:
        raise UsageError(
            f"a validation batch of {batch} x {seq_len} bytes does not fit on {device} (out of memory); "
            "lower --eval_batch_size or --eval_seq_len"
        ) from None


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank > 0's random numbers (dropout) from `step` on, when it has no state of its own."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def peer_failed(error: Exception) -> bool:
    """An error that says another rank is gone (its collective failed), not what went wrong there."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    )


class NoLog:
    """The log of a rank that writes nothing (every rank but 0)."""

    rows: list[dict] = []

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(args: argparse.Namespace, setup: dict, ranks: Ranks | None = None) -> dict:
    """The training loop. Returns the final metrics; raises Interrupted on SIGINT/SIGTERM.

    Under torchrun every rank runs it: each trains on its share of every step's windows through
    DistributedDataParallel, validation is split over the ranks, and rank 0 alone writes."""
    ranks = ranks or Ranks()
    device, dtype, config = setup["device"], setup["dtype"], setup["config"]
    train_data, valid, extra = setup["train"], setup["valid"], setup["extra"]
    out_dir: Path = setup["out_dir"]
    steps_per_epoch = setup["steps_per_epoch"]
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    resumed: dict | None = setup["resume_state"]

    torch.manual_seed(args.seed)
    model = (GPT(config) if args.arch == "gpt" else BDH(config)).to(device)
    if ranks.rank > 0:  # the same weights on every rank, dropout of its own
        torch.manual_seed(rank_seed(args.seed, ranks.rank, 0))
    use_compile = args.compile if args.compile is not None else device.type == "cuda" and not args.fused
    if args.fused:
        from kernels import Fused

        base = Fused(model)
    else:
        base = model
    fwd = torch.compile(base) if use_compile else base  # validation's, and training's with one process
    train_fwd = fwd
    if ranks.several:  # gradients averaged over the ranks as backward goes
        from torch.nn.parallel import DistributedDataParallel

        # around the compiled model, and without dynamo's DDP graph splitter, which fails to compile
        # either model (BackendCompilerFailed in its compile_fn, torch 2.11, 2 H200s); the gradients'
        # all-reduce then starts after the compiled backward, not inside it
        torch._dynamo.config.optimize_ddp = False
        train_fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )

    command = shell_command(sys.argv[1:])
    resume_command = shell_command(resume_argv(sys.argv[1:], out_dir))
    data_files = {}  # rank 0's records
    if ranks.main:
        data_files = {
            "train": describe_source("train", args.data_dir, setup["train_path"]),
            "valid": describe_source("valid", args.data_dir, setup["valid_path"]),
            "extra_valid": [describe_source(label, None, p) for label, p in setup["extra_files"].items()],
        }

    start_step, best, train_time, elapsed_before = 0, {"val_loss": float("inf")}, 0.0, 0.0
    last_eval: dict = {}
    eval_step: int | None = None  # the step last_eval was measured at
    if resumed is not None:
        try:
            model.load_state_dict(load_weights(setup["resume"]))
            optimizer.load_state_dict(resumed["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # weights or optimizer state of another model
            raise UsageError(
                f"--resume {args.resume}: the checkpoint is not this model's ({first_cause(e)})"
            ) from e
        start_step, best = resumed["step"], resumed["best"]
        train_time, elapsed_before = resumed["train_time_s"], resumed["elapsed_s"]
        last_eval = resumed.get("last_eval", {})
        eval_step = resumed.get("eval_step", start_step if last_eval else None)
        rngs = resumed.get("rng_ranks")
        if rngs and len(rngs) == ranks.world:  # each rank where it was
            set_rng_state(rngs[ranks.rank], device)
        else:  # saved by another number of processes: rank 0 where it was, the others anew
            set_rng_state(resumed["rng"], device)
            if ranks.rank > 0:
                torch.manual_seed(rank_seed(args.seed, ranks.rank, start_step))
    if ranks.main:
        print(f"{MODEL_NAMES[args.arch]}: {model.num_params():,} parameters, {config}")
        print(
            f"train {len(train_data):,} bytes ({data_files['train']['source']}), "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps; device {device_name(device)}, "
            f"{str(dtype).removeprefix('torch.')}, compile={use_compile}; out {out_dir}"
            + (
                f"; {ranks.world} processes, {args.batch_size // ranks.world} windows a step each"
                * ranks.several
            )
            + (f"; resuming at step {start_step}" if resumed is not None else "")
        )

    # a validation batch holds no more bytes than a training batch (or 64 x 128): every window that
    # trains also validates
    eval_batch = eval_batch_windows(
        args.eval_batch_size, args.eval_seq_len, max(args.batch_size * args.seq_len, 8192)
    )

    stop_signal: list[int] = []

    def validate() -> dict:
        """Every validation file, its windows split over the ranks; with one process, Stopped as soon
        as a signal arrives (between batches). Several wait for the next agreed step."""
        out = {}
        for label, data in {"": valid, **extra}.items():
            sums, windows = position_loss_sums(
                fwd,
                data,
                args.eval_seq_len,
                eval_batch,
                device,
                autocast_dtype=dtype,
                stop=None if ranks.several else lambda: bool(stop_signal),
                shard=(ranks.rank, ranks.world),
            )
            total, count = all_reduce(np.array([sums.sum(), windows]))
            loss = float(total / (count * args.eval_seq_len))
            suffix = f"_{label}" if label else ""
            out.update({f"val_loss{suffix}": loss, f"val_bpb{suffix}": loss / LN2})
        return out

    check_validation_fits(fwd, valid, args.eval_seq_len, eval_batch, device, dtype)
    if resumed is None and ranks.main:  # --overwrite: the old run goes before the new one writes anything
        clear_run(out_dir)
    fields = (
        CSV_FIELDS + [f"{k}_{label}" for label in extra for k in ("val_loss", "val_bpb")] + SPARSITY_FIELDS
    )
    log = NoLog()
    if ranks.main:
        log = CsvLog(out_dir / "log.csv", fields, resume_step=start_step if resumed is not None else None)

    saved = [start_step if resumed is not None else None]  # the step of the last checkpoint

    def save(done: int, which: tuple[str, ...] = ("last",), together: bool = True) -> None:
        """Rank 0 saves step `done`. together: every rank calls this at the same step (their random
        states are gathered, so that each resumes where it was)."""
        rngs = gather(rng_state(device)) if together and ranks.several else None
        saved[0] = done
        if not ranks.main:
            return
        state = {
            "step": done,
            "optimizer": optimizer.state_dict(),
            "args": vars(args),
            "best": best,
            "last_eval": last_eval,
            "eval_step": eval_step,
            "rng": rng_state(device),
            "rng_ranks": rngs,
            "world_size": ranks.world,
            "train_time_s": train_time,
            "elapsed_s": elapsed_before + time.time() - start,
        }
        for name in which:
            save_checkpoint(model, out_dir / "checkpoints" / name, state)
        saved[0] = done

    def validation_at(done: int) -> None:
        """Validate after step `done`, keep the best checkpoint, save; Stopped if a signal cuts it short."""
        nonlocal last_eval, best, eval_step
        last_eval = validate()
        if not math.isfinite(last_eval["val_loss"]):
            raise FloatingPointError(
                f"validation loss became {last_eval['val_loss']} at step {done}; stopped. "
                + kept_checkpoint(out_dir)
            )
        eval_step = done
        improved = last_eval["val_loss"] < best["val_loss"]
        if improved:
            best = {"step": done, **last_eval}
        save(done, ("last", "best") if improved else ("last",))

    def write_results(done: int, finished: bool) -> dict:
        if not ranks.main:
            return {"push_failed": False}
        metrics = summarize(
            model,
            args,
            setup,
            done,
            total_steps,
            last_eval,
            best,
            train_time,
            elapsed_before + time.time() - start,
            use_compile,
            command,
            data_files,
        )
        metrics["world_size"] = ranks.world
        metrics["finished"] = finished
        write_json(out_dir / "metrics.json", metrics)
        make_plots(log.rows, list(extra), out_dir, MODEL_NAMES[args.arch])
        return metrics

    push_failed = False

    def on_signal(signum, frame) -> None:  # finish the current step, then save and stop
        stop_signal.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.time()
    interval_time, interval_bytes = 0.0, 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    offsets = None
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=args.no_progress or not ranks.main,
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    t0 = time.time()
    consistent: int | None = start_step  # steps the weights and optimizer state hold (None: mid-update)

    def stopped_at(done: int, saved_now: bool) -> Interrupted:
        """After a signal: save step `done` (unless just saved) and the results, say how to resume."""
        if not saved_now:
            save(done)
        write_results(done, finished=False)
        name = signal.Signals(stop_signal[0]).name
        return Interrupted(
            stop_signal[0],
            f"{name} at step {done}: saved {out_dir / 'checkpoints' / 'last'}; resume with: {resume_command}",
        )

    def rescue(error: Exception) -> str:
        """After an unexpected exception: save what the last whole step holds, say how to resume."""
        message = str(error).splitlines()[0][:300] if str(error) else ""
        if consistent is not None and consistent > 0 and consistent != saved[0]:
            try:
                save(consistent, together=False)
            except Exception:  # e.g. a full disk: the previous checkpoint stays as it was
                pass
        try:
            write_results(saved[0] or 0, finished=False)
        except Exception:
            pass
        when = f"after step {consistent}" if consistent is not None else "during an optimizer update"
        kept = kept_checkpoint(out_dir)
        return f"{type(error).__name__} {when}: {message}. {kept} Resume with: {resume_command}"

    try:
        if resumed is not None and start_step >= total_steps and eval_step != start_step:
            try:
                validation_at(start_step)  # the final validation, which a signal had cut short
            except Stopped:
                raise stopped_at(start_step, saved_now=True) from None
        for step in range(start_step, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            if offsets is None or pos == 0:
                offsets = epoch_offsets(len(train_data), args.seq_len, epoch, args.seed)
            batch = offsets[pos * args.batch_size : (pos + 1) * args.batch_size]
            x, y = windows_at(train_data, share(batch, ranks), args.seq_len)  # this rank's share
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, dtype):
                _, loss = train_fwd(x, y)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            consistent = None
            optimizer.step()
            consistent = step + 1
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            interval_bytes += x.numel() * ranks.world

            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            is_eval = (
                done % args.eval_every == 0 or done == total_steps or (args.push_every_epoch and epoch_end)
            )
            if done % args.log_every == 0 or is_eval or (stop_signal and not ranks.several):
                train_loss = loss_sum.item() / loss_count  # syncs the device
                if ranks.several:  # the ranks agree: the mean loss, and whether any was told to stop
                    train_loss = float(all_reduce(np.array([train_loss]))[0]) / ranks.world
                    signum = int(all_reduce(np.array([stop_signal[0] if stop_signal else 0]), "max")[0])
                    if signum and not stop_signal:
                        stop_signal.append(signum)
                now = time.time()
                interval_time += now - t0
                train_time += now - t0
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training loss became {train_loss} by step {done}; stopped. "
                        + kept_checkpoint(out_dir)
                    )
                row = {
                    "step": done,
                    "epoch": round(done / steps_per_epoch, 4),
                    "bytes_seen": done * args.batch_size * args.seq_len,
                    "train_loss": round(train_loss, 5),
                    "lr": f"{lr:.6g}",
                    "bytes_per_s": round(interval_bytes / max(interval_time, 1e-9)),
                }
                speed = row["bytes_per_s"]
                loss_sum.zero_()
                loss_count, interval_bytes, interval_time = 0, 0, 0.0
                cut = False  # a signal cut this step's validation short
                if is_eval:
                    try:
                        validation_at(done)
                        row.update({k: round(v, 5) for k, v in last_eval.items()})
                        if args.arch == "bdh" and ranks.main:
                            live = activation_summary(model, valid, args.eval_seq_len, 8, device, dtype)
                            row.update(x_nonzero=round(live["x_mean"], 5), y_nonzero=round(live["y_mean"], 5))
                        say = tqdm.write if ranks.main else lambda _: None
                        say(
                            f"step {done}: train {train_loss:.4f}, val {last_eval['val_loss']:.4f} "
                            f"nats/byte ({last_eval['val_bpb']:.4f} bpb)"
                            + "".join(
                                f", {k} {v:.4f}" for k, v in last_eval.items() if k.startswith("val_loss_")
                            )
                        )
                    except Stopped:
                        is_eval, cut = False, True
                row["elapsed_s"] = round(elapsed_before + time.time() - start, 1)
                log.write(row)
                bar.set_postfix(loss=f"{train_loss:.3f}", bytes_s=f"{speed:,.0f}")
                if args.push_every_epoch and epoch_end and done < total_steps:
                    write_results(done, finished=False)
                    if ranks.main:
                        push_failed |= not try_push(out_dir, args.hf_repo_id, args.hf_private)
                if stop_signal and (done < total_steps or cut):
                    raise stopped_at(done, saved_now=is_eval)
                t0 = time.time()
            bar.update(1)
        metrics = write_results(total_steps, finished=True)
    except (Interrupted, FloatingPointError):
        raise
    except Exception as e:  # validation, plotting, a push, the data: lose no more than the last step
        if ranks.several and (stop_signal or peer_failed(e)):  # another rank failed and says why
            rescue(e)
            raise Quiet(1) from e
        raise RunFailed(rescue(e)) from e
    finally:
        bar.close()
        log.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    if not ranks.main:
        return metrics
    print(
        f"done: val loss {metrics['final_val_loss']:.4f} nats/byte, "
        f"{metrics['final_val_bpb']:.4f} bits/byte, "
        f"perplexity {metrics['final_val_perplexity']:.3f}; {metrics['bytes_per_s']:,} bytes/s; "
        f"results in {out_dir}"
    )
    if args.push_to_hub:
        push_failed |= not try_push(out_dir, args.hf_repo_id, args.hf_private)
    metrics["push_failed"] = push_failed
    return metrics


def summarize(
    model, args, setup, done, total_steps, last_eval, best, train_time, wall, use_compile, command, data_files
) -> dict:
    """metrics.json: the run's results and everything needed to say how they were made."""
    device, dtype, valid, extra = setup["device"], setup["dtype"], setup["valid"], setup["extra"]
    sparsity = None  # a GPT has no sparse neurons
    if args.arch == "bdh":
        sparsity = activation_summary(
            model, valid, args.eval_seq_len, min(8, args.eval_batch_size), device, dtype
        )
    trained_bytes = done * args.batch_size * args.seq_len
    val = last_eval.get("val_loss")  # None: no validation has run yet
    validated = val is not None
    return {
        "final_val_loss": val,
        "final_val_bpb": val / LN2 if validated else None,
        "final_val_perplexity": math.exp(val) if validated else None,
        "final_val_note": None if validated else f"no validation had run by step {done}",
        "best_val_loss": best.get("val_loss") if best.get("step") is not None else None,
        "best_val_bpb": best.get("val_bpb"),
        "best_step": best.get("step"),
        "final_extra_val": {
            label: {
                "loss": last_eval[f"val_loss_{label}"],
                "bpb": last_eval[f"val_bpb_{label}"],
                "perplexity": math.exp(last_eval[f"val_loss_{label}"]),
            }
            for label in extra
            if f"val_loss_{label}" in last_eval
        },
        "activation_nonzero": sparsity,
        "steps": done,
        "total_steps": total_steps,
        "epochs": round(done / setup["steps_per_epoch"], 4),
        "bytes_trained": trained_bytes,
        "wall_time_s": round(wall, 1),
        "train_time_s": round(train_time, 1),
        "bytes_per_s": round(trained_bytes / max(train_time, 1e-9)),
        "arch": args.arch,
        "num_params": model.num_params(),
        "config": model.config.to_dict(),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": use_compile,
        "fused": args.fused,
        "torch_version": torch.__version__,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "data": data_files,
        "args": vars(args),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup: dict = {}
    ranks = Ranks()
    try:
        ranks = ranks_from_env()
        start(ranks, args.dist_timeout)
        if args.dataset is not None:  # rank 0 converts it (once); the others wait for it
            agreed(ranks, lambda: ranks.main and convert_dataset(args))
        setup = agreed(ranks, lambda: prepare(args, ranks))
        metrics = train(args, setup, ranks)
    except Quiet as e:  # another rank says why
        raise SystemExit(e.code) from None
    except UsageError as e:
        fail(str(e))
    except RunFailed as e:  # on the rank where it happened
        fail(f"rank {ranks.rank}: {e}" if ranks.several else str(e), code=1)
    except FloatingPointError as e:  # every rank sees the same losses: rank 0 says it
        fail(str(e), code=1) if ranks.main else sys.exit(1)
    except Interrupted as e:  # every rank stops at the same step: rank 0 says it
        fail(str(e), code=e.code) if ranks.main else sys.exit(e.code)
    finally:
        if setup.get("lock") is not None:
            setup["lock"].close()  # the run's folder is free again
        stop()
    return 1 if metrics["push_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

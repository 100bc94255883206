"""What experiment.py checks and reads before its first step: the recipe and the architecture's
defaults filled in, the run to resume, the model's config, the data, the run folder. Every bad
argument or input is a UsageError here, before any work.

The recipes set the flags left out (explicit flags win, and a resumed run keeps its own):
    long-context  8 x 512-byte windows, attention half-lives 8, 32, 128, 256 bytes (the default; the
                  recipe that won results/long-context)
    reference     the reference report's 32 x 128-byte windows, no decay (the paper's model)
    shifted-copy  2 x 2,048-byte windows, half-lives learned from 8, 64, 512, 4,096, lr 2e-3, a span
                  copied in every window, the last two heads shifted (not the paper's model; the
                  best BDH over the whole text and with context, results/tbptt round 12)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling.architectures import ARCHITECTURES, arch_of, foreign_flags, model_flags
from dragon_hatchling.carried import article_starts, stream_steps
from dragon_hatchling.checkpoints import (
    checkpoint_folder,
    holds_run,
    load_training_state,
    lock_folder,
    run_of,
)
from dragon_hatchling.cli import UsageError, check_needs, make_out_dir, unique_folder
from dragon_hatchling.corpora import dataset_folder, dataset_source, prepare_dataset
from dragon_hatchling.data import (
    MIN_COPY,
    describe_source,
    fill_unknowns,
    load_bytes_file,
    load_split,
    num_windows,
)
from dragon_hatchling.devices import check_fits, resolve_device, resolve_dtype
from dragon_hatchling.distributed import Ranks, rank_device
from dragon_hatchling.hub_client import REPO_ID
from dragon_hatchling.loading import load_model
from dragon_hatchling.paths import choose_path

_PLAIN = {"lr": 1e-3, "learn_decay": False, "shifted_heads": 0, "copy_spans": 0.0}
RECIPES = {  # every recipe names the same flags; "reference" also fills a run from before a flag
    "long-context": {"batch_size": 8, "seq_len": 512, "half_lives": [8.0, 32.0, 128.0, 256.0], **_PLAIN},
    "reference": {"batch_size": 32, "seq_len": 128, "half_lives": None, **_PLAIN},
    "shifted-copy": {
        "batch_size": 2,
        "seq_len": 2048,
        "half_lives": [8.0, 64.0, 512.0, 4096.0],
        "lr": 2e-3,
        "learn_decay": True,
        "shifted_heads": 2,
        "copy_spans": 1.0,
    },
}
# Flags that must agree between a run and its resumption (the rest, e.g. --device, may change);
# resume_from adds every field of the architecture's config (model_flags), listed here or not.
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
    "learn_decay",
    "arch",
    "block_size",
    "train_file",
    "data_dir",
    "dataset",
    "dataset_config",
    "text_column",
    "val_fraction",
    "recipe",
    "carry_state",
    "memory",
    "position",
    "init_from",
    "reset_state",
    "article_order",
    "copy_spans",
    "fill_unk",
)

# The flags of --dataset, and their defaults
DATASET_FLAGS = {
    "dataset_config": None,
    "text_column": "text",
    "val_fraction": 0.005,
    "data_cache": "~/.cache/dragon-hatchling/datasets",  # or BDH_DATA_CACHE
}
# Flags that mean something only beside another (cli.check_needs): the flags each serves, its default
NEEDS = {
    "push_every_epoch": (("push_to_hub",), False),
    "hf_private": (("push_to_hub",), False),
    "accept_new_data": (("resume",), False),
}
# Flags that mix something into the training text, and their value for runs from before them: none.
LATER_MIXES = {"copy_spans": 0.0, "fill_unk": 0.0}

Extra = tuple[dict[str, str], dict[str, np.ndarray]]  # --extra_val_file: label: path, label: bytes


@dataclass
class Data:
    """The bytes a run trains and validates on, and where each came from (None: the Hub)."""

    train: np.ndarray
    valid: np.ndarray
    extra: dict[str, np.ndarray]  # --extra_val_file, by label
    train_path: str | Path | None
    valid_path: str | Path | None
    extra_files: dict[str, str]  # label: path
    filled: int = 0  # --fill_unk: <unk> tokens of the train text replaced by words


@dataclass
class Plan:
    """What the flags and checkpoints decide, checked before any data is read (or converted)."""

    ranks: Ranks
    device: torch.device
    dtype: torch.dtype
    path: str  # paths.FUSED, COMPILED or EAGER
    config: object  # BDHConfig or GPTConfig
    resume: Path | None  # the checkpoint folder resumed from
    resume_state: dict | None  # its training_state.pt
    init_weights: dict | None  # --init_from's tensors (a new run that starts from them)
    extra: Extra  # --extra_val_file's paths and bytes (extra_texts): local, read first


@dataclass
class Setup(Plan):
    """Everything train() starts from, checked: the plan, then the data read and the folder claimed."""

    args: argparse.Namespace
    data: Data
    steps_per_epoch: int
    out_dir: Path
    lock: object | None  # the run folder's lock, held by rank 0
    sources: dict  # where each file came from (data_sources; rank 0)
    data_changes: list  # files that changed under the run, with the step (--accept_new_data)

    @property
    def total_steps(self) -> int:
        return total_steps(self.args, self.steps_per_epoch)

    @property
    def val_labels(self) -> list[str]:
        """The validation losses beside val_loss: each --extra_val_file's, and with --carry_state
        each file's read as one text (stream, stream_<label>)."""
        extra = list(self.data.extra)
        streams = ["stream"] + [f"stream_{label}" for label in extra] if self.args.carry_state else []
        return extra + streams


def total_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """The optimizer steps of the whole run: --max_steps, else --epochs worth."""
    return args.max_steps or args.epochs * steps_per_epoch


def plan(args: argparse.Namespace, ranks: Ranks | None = None) -> Plan:
    """Check every flag, the checkpoints named and the model against the device, before any data is
    read or converted (a dataset may take hours); UsageError on the first bad one."""
    ranks = ranks or Ranks()
    device = rank_device(ranks, resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    check_flags(args)
    init_weights = initial_weights(args) if args.resume is None else None
    resume, resume_state = resume_from(args)
    check_schedule(args)
    config = model_config(args)
    check_carry(args, config)
    check_copies(args)
    compile = False if args.carry_state else args.compile  # the carried forward runs as it is
    path = choose_path(ARCHITECTURES[args.arch][0], device, args.fused, compile, dtype)
    check_model(args, config, device, ranks)
    extra = extra_texts(args)
    return Plan(ranks, device, dtype, path, config, resume, resume_state, init_weights, extra)


def prepare(args: argparse.Namespace, plan: Plan, dataset: Path | None = None) -> Setup:
    """Read the data and claim the run folder, after plan(); UsageError on the first bad input.
    dataset: --dataset's converted folder (convert_dataset)."""
    ranks, resume = plan.ranks, plan.resume
    data = load_data(args, plan.extra, dataset)
    steps_per_epoch = check_windows(args, data)
    total = total_steps(args, steps_per_epoch)
    if plan.resume_state is not None and plan.resume_state["step"] > total:
        raise UsageError(
            f"--resume {args.resume}: the checkpoint is at step {plan.resume_state['step']:,}, past this "
            f"run's {total:,} steps (a damaged training_state.pt, or train data that shrank)"
        )
    out_dir = run_folder(args, resume, make=ranks.main)
    sources = data_sources(args, data) if ranks.main else {}  # rank 0 alone writes
    changes = data_changes(args, plan.resume_state, resume, sources) if ranks.main else []
    lock = claim(out_dir, args, resume) if ranks.main else None
    return Setup(**vars(plan), args=args, data=data, steps_per_epoch=steps_per_epoch, out_dir=out_dir,
                 lock=lock, sources=sources, data_changes=changes)  # fmt: skip


def claim(out_dir: Path, args: argparse.Namespace, resume: Path | None):
    """Make the run folder and hold its lock for the run's life (two runs never share a folder); a
    UsageError if it holds a run that this one would replace: a new run without --overwrite, or a
    resumed run continuing into another run's folder. Returns the lock."""
    make_out_dir(out_dir)
    lock = lock_folder(out_dir)
    if holds_run(out_dir) and resume is None and not args.overwrite:
        lock.close()
        raise UsageError(
            f"--out_dir {out_dir} already holds a run; pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    if resume is not None and out_dir.resolve() != run_of(resume).resolve() and holds_run(out_dir):
        lock.close()
        raise UsageError(
            f"--out_dir {out_dir} holds another run than the one --resume {args.resume} continues; "
            "choose an empty folder (or leave out --out_dir to continue in the run's own)"
        )
    return lock


def data_sources(args: argparse.Namespace, data: Data) -> dict:
    """Where each file of the run came from, for its records (path, size, sha256)."""
    return {
        "train": describe_source("train", args.data_dir, data.train_path),
        "valid": describe_source("valid", args.data_dir, data.valid_path),
        "extra_valid": [describe_source(label, None, p) for label, p in data.extra_files.items()],
    }


def data_changes(args: argparse.Namespace, state: dict | None, resume: Path | None, sources: dict) -> list:
    """The run's record of files that changed under it: a UsageError if the train or validation file
    of a resumed run is not the one its checkpoint (or, before checkpoints kept it, its metrics.json)
    recorded, unless --accept_new_data, which adds the change to the record."""
    if state is None:
        return []
    before = state.get("data") or recorded_sources(run_of(resume))
    changed = [k for k in ("train", "valid") if k in before and before[k] != sources[k]]
    if changed and not args.accept_new_data:
        k = changed[0]
        then, now = describe(before[k]), describe(sources[k])
        raise UsageError(
            f"--resume {args.resume}: the {k} file is not the one the run trained on "
            f"({before[k].get('source')}: {then} then, {now} now); pass --accept_new_data to continue on it"
        )
    changes = list(state.get("data_changes", []))
    if changed:
        changes.append({"step": state["step"], **{k: before[k] for k in changed}})
    return changes


def recorded_sources(run: Path) -> dict:
    """The data a run's metrics.json recorded (checkpoints from before they kept it)."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("data", {})
    except (OSError, ValueError, AttributeError):
        return {}


def describe(source: dict) -> str:
    if source.get("sha256"):
        return f"sha256 {source['sha256'][:12]}"
    return f"{source.get('bytes', '?')} bytes, modified {source.get('modified', '?')}"


def check_flags(args: argparse.Namespace) -> None:
    """The flags that disagree with each other, whatever the model and data."""
    dataset_flags(args)
    if args.dataset is not None:
        check_dataset_flags(args)  # before it is converted
    check_needs(args, NEEDS)
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite replaces a run and --resume continues one: leave out one of them")
    if args.push_to_hub and (args.hf_repo_id is None or not REPO_ID.match(args.hf_repo_id)):
        raise UsageError(f"--push_to_hub needs --hf_repo_id USER/NAME (got {args.hf_repo_id!r})")


def check_schedule(args: argparse.Namespace) -> None:
    """The learning rate decays from --lr (the recipe's if left out) down to --min_lr, and AdamW's
    decoupled weight decay multiplies each weight by 1 - lr x weight_decay a step."""
    if args.min_lr > args.lr:
        raise UsageError(
            f"--min_lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min_lr"
        )
    if args.lr * args.weight_decay >= 1:
        raise UsageError(
            f"--lr {args.lr} times --weight_decay {args.weight_decay} must be below 1: AdamW multiplies "
            "every weight by 1 - lr x weight_decay a step"
        )
    if args.lr > torch.finfo(torch.float32).max:  # the optimizer holds it in float32
        raise UsageError(f"--lr {args.lr}: expected at most {torch.finfo(torch.float32).max:.3g} (float32)")


def initial_weights(args: argparse.Namespace) -> dict | None:
    """--init_from's tensors, with the model flags left out filled from its config; a flag given that
    disagrees with it is a UsageError (--dropout may differ: it changes no weight)."""
    if args.init_from is None:
        return None
    model, _ = load_model(args.init_from, flag="--init_from")
    config = model.config
    arch = arch_of(config.to_dict())
    if args.arch is not None and args.arch != arch:
        raise UsageError(f"--arch {args.arch}: --init_from {args.init_from} holds a {model.display_name}")
    args.arch = arch
    for name in model_flags(arch):
        value, given = getattr(config, name), getattr(args, name, None)
        if name == "dropout":
            continue
        if name == "half_lives" and value is None:
            value = []  # no decay, as --half_lives none says (the recipe's would fill None)
        if given is not None and given != value:
            raise UsageError(f"--{name} {given} disagrees with --init_from {args.init_from} ({name} {value})")
        setattr(args, name, value)
    args.rope_parts = getattr(config, "rope_parts", None)  # a merged model's parts (no flag sets them)
    return model.state_dict()


def check_carry(args: argparse.Namespace, config) -> None:
    """--carry_state and --memory agree with each other and with the path."""
    memory = getattr(config, "memory", None)
    if args.carry_state and memory == 0:
        raise UsageError(
            "--carry_state carries a GPT's memory of keys and values: give it --memory M (e.g. 4096)"
        )
    if memory and not args.carry_state:
        raise UsageError(f"--memory {memory} is carried from step to step: leave out --no_carry_state")
    if args.reset_state == "article" and not (args.carry_state and memory is None):
        raise UsageError("--reset_state article empties a carried BDH state: it needs --carry_state and BDH")
    if args.article_order == "shuffled" and not args.carry_state:
        raise UsageError(
            "--article_order shuffled orders the stretches of carried rows: it needs --carry_state"
        )
    if args.carry_state and getattr(config, "shifted_heads", 0):
        message = (
            f"--shifted_heads {config.shifted_heads}: a shifted head's state is not carried from "
            "window to window (leave out --carry_state, or give --shifted_heads 0)"
        )
        raise UsageError(message + recipe_note(args, message))
    if args.carry_state and args.compile:
        raise UsageError("--carry_state runs the plain path as it is: leave out --compile (BDH's "
                         "fused kernels carry the state on CUDA)")  # fmt: skip


def check_copies(args: argparse.Namespace) -> None:
    """--copy_spans needs windows that hold a span and its copy (2 x MIN_COPY bytes)."""
    if args.copy_spans > 0 and args.seq_len + 1 < 2 * MIN_COPY:
        raise UsageError(
            f"--copy_spans repeats spans of {MIN_COPY} bytes or more within a window: it needs "
            f"--seq_len {2 * MIN_COPY - 1} or more, got {args.seq_len}"
        )


def resume_from(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """The checkpoint folder and training state of --resume (None, None: a new run), with every flag
    left out filled in: from the checkpoint, else the recipe's and the architecture's defaults."""
    resume = find_resume(args)
    if resume is None:
        apply_recipe(args, None)
        return None, None
    state = load_training_state(resume)
    saved = {**LATER_MIXES, **state.get("args", {})}  # runs from before these flags mixed nothing in
    if saved.get("rope_parts") is not None:  # a run that started from a merged model (--init_from)
        args.rope_parts = saved["rope_parts"]
    apply_recipe(args, saved)
    must_match = dict.fromkeys([*RESUME_MUST_MATCH, *model_flags(args.arch)])  # every config field too
    differ = [k for k in must_match if k in saved and saved[k] != getattr(args, k)]
    if differ:
        detail = ", ".join(f"--{k} {shown(getattr(args, k))} (checkpoint: {shown(saved[k])})" for k in differ)
        raise UsageError(
            f"--resume {args.resume}: the checkpoint's config disagrees with the flags given: {detail}"
        )
    return resume, state


def shown(value: object) -> object:
    """A flag's value as a resume error prints it: "left out" for a flag not given."""
    return "left out" if value is None else value


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


def apply_recipe(args: argparse.Namespace, saved: dict | None) -> None:
    """Fill the flags left out: from the checkpoint being resumed (its own recipe), else the recipe's."""
    apply_arch(args, saved)
    if args.recipe is None:
        args.recipe = saved.get("recipe", "reference") if saved is not None else "long-context"
    fill_model_flags(args, saved, but=RECIPES[args.recipe])
    # a half-life a head, unless no model has so many heads (model_config says why, at once)
    heads = args.n_head if args.n_head <= (getattr(args, "n_neurons", None) or args.n_head) else None
    for name, default in RECIPES[args.recipe].items():
        if getattr(args, name) is not None or name in foreign_flags(args.arch):
            continue
        if saved is not None:  # runs from before --recipe had the reference's windows and no decay
            value = saved.get(name, RECIPES["reference"][name])
        elif name == "half_lives" and default:
            value = recipe_half_lives(default, heads) if heads else None
        else:
            value = default
        setattr(args, name, value)
    if args.half_lives and len(args.half_lives) == 1 and heads:  # one half-life for every head
        args.half_lives = args.half_lives * heads
    args.half_lives = args.half_lives or None  # --half_lives none
    if args.eval_seq_len is None:  # runs from before --eval_seq_len validated in their own windows
        args.eval_seq_len = 128 if saved is None else saved.get("eval_seq_len", saved.get("seq_len", 128))
    if args.carry_state is None:  # a GPT's memory is carried; runs from before --carry_state were not
        args.carry_state = saved.get("carry_state", False) if saved is not None else bool(args.memory or 0)
    if args.reset_state is None:
        args.reset_state = saved.get("reset_state", "epoch") if saved is not None else "epoch"
    if args.article_order is None:  # runs from before --article_order read the text's
        args.article_order = saved.get("article_order", "text") if saved is not None else "text"
    for flag, none in LATER_MIXES.items():  # runs from before these flags: none
        if getattr(args, flag) is None:
            setattr(args, flag, saved.get(flag, none) if saved is not None else none)


def apply_arch(args: argparse.Namespace, saved: dict | None) -> None:
    """The architecture: --arch, else the checkpoint's, else BDH. A flag of another architecture is
    a UsageError."""
    if args.arch is None:
        args.arch = saved.get("arch", "bdh") if saved is not None else "bdh"
    given = [name for name in foreign_flags(args.arch) if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"--{given[0]} is not a flag of --arch {args.arch}")


def fill_model_flags(args: argparse.Namespace, saved: dict | None, but: dict) -> None:
    """Fill the model flags left out, except those the recipe sets (`but`): from the checkpoint being
    resumed, else the architecture's defaults (its config's)."""
    for name, default in model_flags(args.arch).items():
        if getattr(args, name) is None and name not in but:
            setattr(args, name, saved.get(name, default) if saved is not None else default)


def recipe_half_lives(lives: list[float], n_head: int) -> list[float]:
    """A recipe's half-lives (for 4 heads) for n_head heads: its curve, log-linear, at n_head points
    from its first to its last (one head: the last, the longest)."""
    if n_head == len(lives):
        return list(lives)
    at = np.linspace(0, len(lives) - 1, n_head) if n_head > 1 else np.array([len(lives) - 1.0])
    return [round(float(t), 2) for t in np.exp(np.interp(at, np.arange(len(lives)), np.log(lives)))]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on the weights, none on learned half-lives (it would
    pull every head's towards one byte)."""
    weights, free = [], []
    for name, p in model.named_parameters():
        (free if name.endswith("log2_half_lives") else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay}] + (
        [{"params": free, "weight_decay": 0.0}] if free else []
    )


def model_config(args: argparse.Namespace):
    """The model's config from the (filled-in) flags of the same names; a UsageError if it is not a
    valid model."""
    cls = ARCHITECTURES[args.arch][1]
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**flags)
    except ValueError as e:
        raise UsageError(f"model config: {e}{recipe_note(args, str(e))}") from e


def recipe_note(args: argparse.Namespace, message: str) -> str:
    """For an error: which of the flags it names hold the recipe's value (the recipe may have set
    them), e.g. " (if left out, --learn_decay: --recipe shifted-copy's)"; "" if none."""
    recipe = RECIPES[args.recipe]
    named = [k for k, value in recipe.items() if k in message and getattr(args, k, None) == value]
    flags = " and ".join(f"--{k}" for k in named)
    return f" (if left out, {flags}: --recipe {args.recipe}'s)" if named else ""


def check_model(args: argparse.Namespace, config, device: torch.device, ranks: Ranks) -> None:
    """The model fits its windows, the batch divides among the ranks, and the device holds them."""
    if args.batch_size % ranks.world:
        raise UsageError(
            f"--batch_size {args.batch_size} (the global batch) does not divide among {ranks.world} processes"
        )
    longest = max(args.seq_len, args.eval_seq_len)
    if config.max_window is not None and longest > config.max_window:
        raise UsageError(
            f"--arch {args.arch} reads at most --block_size {config.max_window} bytes; "
            f"--seq_len {args.seq_len} / --eval_seq_len {args.eval_seq_len} are longer"
        )
    # at least: float32 weights, gradients and AdamW's two moments, and the activations kept
    kept = config.activation_bytes(args.batch_size * args.seq_len, training=True)
    check_fits(
        16 * config.num_params + kept // ranks.world,
        device,
        f"training this model ({config.num_params:,} parameters) on {args.batch_size} x {args.seq_len} bytes"
        + (f" ({args.batch_size // ranks.world} windows a process)" if ranks.several else ""),
    )


def load_data(args: argparse.Namespace, extra: Extra, dataset: Path | None = None) -> Data:
    """The train and validation bytes: --dataset's converted files, --train_file beside the
    validation split, or the splits of --data_dir (or the Hub); beside extra (extra_texts). dataset:
    --dataset's folder, if convert_dataset made it already."""
    extra_files, extra = extra
    train_path, valid_path = args.train_file, None  # None: the split of --data_dir or the Hub
    if args.dataset is not None:
        folder = dataset or convert_dataset(args, convert=False)
        train_path, valid_path = folder / "train.bin", folder / "valid.bin"
        train = load_bytes_file(train_path, what=f"--dataset {args.dataset}: train")
        valid = load_bytes_file(valid_path, what=f"--dataset {args.dataset}: validation")
    elif args.train_file is not None:
        train = load_bytes_file(args.train_file, what="--train_file")
        valid = load_split("valid", args.data_dir)
    else:
        train = load_split("train", args.data_dir)
        valid = load_split("valid", args.data_dir)
    train, filled = filled_train(args, train)
    return Data(train, valid, extra, train_path, valid_path, extra_files, filled)


def extra_texts(args: argparse.Namespace) -> Extra:
    """Each --extra_val_file's path and bytes, by label (extra_labels)."""
    extra_files = dict(zip(extra_labels(args.extra_val_file), args.extra_val_file, strict=True))
    texts = {label: load_bytes_file(p, what="--extra_val_file") for label, p in extra_files.items()}
    return extra_files, texts


def filled_train(args: argparse.Namespace, train: np.ndarray) -> tuple[np.ndarray, int]:
    """The train text with --fill_unk's share of its <unk> tokens replaced by rare words (data.py)."""
    if not args.fill_unk:
        return train, 0
    try:
        return fill_unknowns(train, args.fill_unk, args.seed)
    except ValueError as e:
        raise UsageError(f"--fill_unk {args.fill_unk}: {e}") from None


def check_windows(args: argparse.Namespace, data: Data) -> int:
    """Every file holds a window, and the train file a batch of them; returns the steps of an epoch."""
    windows = [("train", data.train, "--seq_len"), ("valid", data.valid, "--eval_seq_len")]
    for name, text, flag in windows + [(name, text, "--eval_seq_len") for name, text in data.extra.items()]:
        T = args.seq_len if flag == "--seq_len" else args.eval_seq_len
        if num_windows(text, T) == 0:
            raise UsageError(
                f"{name} data ({len(text)} bytes) is shorter than one window of {flag} + 1 = {T + 1} bytes"
            )
    if args.carry_state:
        return stream_windows(args, data)
    steps_per_epoch = num_windows(data.train, args.seq_len) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"train data has {num_windows(data.train, args.seq_len)} windows of "
            f"{args.seq_len} bytes, fewer than --batch_size {args.batch_size}"
        )
    return steps_per_epoch


def stream_windows(args: argparse.Namespace, data: Data) -> int:
    """--carry_state: the steps of an epoch, the windows of each row's stretch (at least one); with
    --article_order shuffled, articles to shuffle (two at least)."""
    if args.article_order == "shuffled" and len(found := article_starts(data.train)) < 2:
        raise UsageError(
            f"--article_order shuffled: the train data has {len(found)} article(s) (' = Title = ' lines), "
            "nothing to shuffle"
        )
    steps = stream_steps(len(data.train), args.seq_len, args.batch_size)
    if steps == 0:
        stretch = max(0, len(data.train) - args.seq_len) // args.batch_size
        raise UsageError(
            f"--carry_state: train data of {len(data.train)} bytes gives each of --batch_size "
            f"{args.batch_size} rows {stretch} bytes, less than one window of --seq_len {args.seq_len}"
        )
    return steps


def run_folder(args: argparse.Namespace, resume: Path | None, make: bool = True) -> Path:
    """--out_dir; else the folder of the run resumed (RUN/checkpoints/last); else a new one, made now
    so that no two runs share it (make=False, the ranks after 0, which write nothing: only its name)."""
    if args.out_dir is not None:
        return Path(args.out_dir)
    if resume is not None:
        return run_of(resume)
    base = f"results/runs/{dt.datetime.now():%Y%m%d-%H%M%S}"
    return unique_folder(base) if make else Path(base)


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


def dataset_flags(args: argparse.Namespace) -> None:
    """The flags of --dataset: refused without it where they differ from their defaults (Wikitext-2
    has no use for them); their defaults filled in (a resumed run compares them)."""
    defaults = {**DATASET_FLAGS, "data_cache": os.environ.get("BDH_DATA_CACHE", DATASET_FLAGS["data_cache"])}
    check_needs(args, {name: (("dataset",), default) for name, default in defaults.items()})


def check_dataset_flags(args: argparse.Namespace) -> None:
    dataset_flags(args)
    if args.data_dir is not None or args.train_file is not None:
        raise UsageError("--dataset replaces Wikitext-2: leave out --data_dir and --train_file")
    if not args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be below 1, got {args.val_fraction}")


def convert_dataset(args: argparse.Namespace, convert: bool = True) -> Path:
    """--dataset's cache folder (keyed by what the dataset is now), converted now unless it was
    before (convert=False: only the folder, for the ranks that wait for rank 0 to convert)."""
    check_dataset_flags(args)
    source = dataset_source(args.dataset)  # what the dataset is now, asked once
    folder = dataset_folder(args.data_cache, args.dataset, args.dataset_config, args.text_column,
                            args.val_fraction, args.seed, source)  # fmt: skip
    if not convert:
        return folder
    try:
        return prepare_dataset(args.dataset, args.dataset_config, args.text_column, args.val_fraction, folder,
                               source, seed=args.seed, progress=not args.no_progress)  # fmt: skip
    except OSError as e:  # a full disk, a folder that cannot be written
        raise UsageError(
            f"--data_cache {args.data_cache}: cannot write {folder.name} ({e.strerror or e})"
        ) from e

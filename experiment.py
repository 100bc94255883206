"""Train BDH-GPU (or, with --arch gpt, a GPT of the same size) on byte-level Wikitext-2: logs, plots,
checkpoints, metrics, and the Hub.

uv run experiment.py --device cuda                          # BDH-GPU, the default (long-context) recipe
uv run experiment.py --device cuda --recipe reference       # the reference report's run
uv run experiment.py --device cuda --recipe shifted-copy    # the best BDH with context (results/tbptt)
uv run experiment.py --device cuda --arch gpt --recipe reference   # a 25.6M nanoGPT, the same bytes
uv run experiment.py --device cpu --n_neurons 512 --n_layer 2 --max_steps 200   # a small one

On CUDA, BDH trains through the fused Triton kernels (dragon_hatchling/fused_parallel.py), and a GPT
(or BDH with --no_fused) through torch.compile; elsewhere through plain PyTorch. metrics.json says
which path ran ("path"). What a run writes: dragon_hatchling/run_folder.py.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dragon_hatchling.architectures import ARCHITECTURES, model_class
from dragon_hatchling.carried import (
    Carried,
    StreamText,
    holds_a_start,
    load_state,
    rows_of,
    stream_offsets,
)
from dragon_hatchling.checkpoints import check_tensors, load_weights
from dragon_hatchling.cli import (
    Parser,
    UsageError,
    add_device_args,
    fail,
    half_lives,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    probability,
    seed,
    timeout_seconds,
)
from dragon_hatchling.data import batch_offsets, copy_plan, epoch_offsets, window_batches, windows_at
from dragon_hatchling.devices import autocast
from dragon_hatchling.distributed import (
    Quiet,
    Ranks,
    agreed,
    all_reduce,
    exit_with,
    ranks_from_env,
    share,
    start,
    stop,
)
from dragon_hatchling.loading import first_cause
from dragon_hatchling.paths import forward_of
from dragon_hatchling.run_folder import (
    Meter,
    Progress,
    RunFolder,
    device_name,
    rank_seed,
    set_rng_state,
)
from dragon_hatchling.run_setup import RECIPES, Setup, convert_dataset, parameter_groups, plan, prepare
from dragon_hatchling.scoring import (
    Stopped,
    activation_summary,
    eval_batch_windows,
    eval_mode,
    position_loss_sums,
    stream_loss_sums,
)
from dragon_hatchling.stopping import (
    Interrupted,
    RunFailed,
    StopSignals,
    interruptible,
    kept_checkpoint,
    peer_failed,
)

LN2 = math.log(2)


# ----------------------------------------------------------------------------- the flags


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_hardware_flags(p.add_argument_group("hardware"))
    add_schedule_flags(p.add_argument_group("schedule (the paper's recipe by default)"))
    add_model_flags(
        p.add_argument_group("model (BDH-GPU by default, with the reference report's dimensions)")
    )
    add_data_flags(p.add_argument_group("data"))
    add_output_flags(p.add_argument_group("validation and output"))
    add_hub_flags(p.add_argument_group("Hugging Face Hub"))
    return p


def add_hardware_flags(g) -> None:
    add_device_args(g, "train and validate")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the plain PyTorch path (default: on for CUDA, off elsewhere)",
    )
    g.add_argument(
        "--dist_timeout",
        type=timeout_seconds,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others before the run stops (600)",
    )


def add_schedule_flags(g) -> None:
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
        help="what --batch_size, --seq_len, --half_lives, --learn_decay, --shifted_heads, --lr and "
        "--copy_spans default to: long-context (the default: 8 x 512 bytes, half-lives 8,32,128,256; "
        "results/long-context), reference (the reference report's 32 x 128 bytes, no decay: the "
        "paper's model) or shifted-copy (2 x 2048 bytes, half-lives learned from 8,64,512,4096, two "
        "heads shifted, lr 2e-3, a span copied in every window; not the paper's model: "
        "results/tbptt round 12); flags given explicitly win, and a resumed run keeps its own",
    )
    g.add_argument("--batch_size", type=positive_int, default=None, help="windows per step (recipe: 8)")
    g.add_argument("--seq_len", type=positive_int, default=None, help="bytes per window (recipe: 512)")
    g.add_argument("--lr", type=positive_float, default=None, help="peak AdamW learning rate (recipe: 1e-3)")
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
    g.add_argument("--seed", type=seed, default=1337, help="random seed for weights and data order")
    g.add_argument(
        "--carry_state",
        action="store_const",
        const=True,
        default=None,
        help="truncated backpropagation through time (the paper's Appendix B.2): row i of the batch "
        "reads the i-th of --batch_size stretches of the train text in order, one window a step, and "
        "the model's state (BDH's attention state, a GPT's --memory) is carried, detached, from each "
        "step into the next, emptied at each epoch; validation also reads each file as one text "
        "(val_loss_stream). Default: on for a GPT with --memory, off otherwise",
    )
    g.add_argument(
        "--no_carry_state", dest="carry_state", action="store_const", const=False, help="independent windows"
    )
    g.add_argument(
        "--reset_state",
        choices=["epoch", "article"],
        default=None,
        help="with --carry_state, when a row's state starts empty: at each epoch (epoch, the default), "
        "or also at the window that holds an article's first line, ' = Title = ' (article; BDH)",
    )
    g.add_argument(
        "--article_order",
        choices=["text", "shuffled"],
        default=None,
        help="with --carry_state, the order the rows' stretches read the articles (' = Title = ' to "
        "the next) in: the text's (text, the default), or a new order each epoch drawn from --seed "
        "(shuffled), so that no row reads the same sequence twice",
    )


def add_model_flags(g) -> None:
    g.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        default=None,
        help="bdh: BDH-GPU (model.py; the default); gpt: a GPT in nanoGPT's shape "
        "(dragon_hatchling/gpt.py), to compare",
    )
    g.add_argument(
        "--init_from",
        default=None,
        metavar="MODEL",
        help="start from this model's weights instead of drawing them from --seed (fine-tuning): a run "
        "folder (its best checkpoint), a checkpoint folder, a .pt or a Hub repo id, as evaluate.py reads; "
        "the model flags left out take its config's values (a flag given must agree; --dropout is free)",
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
    g.add_argument(
        "--memory",
        type=nonneg_int,
        default=None,
        help="gpt: carry the keys and values of each row's last M bytes from step to step "
        "(Transformer-XL; the paper's GPTXL has 4096), with ALiBi positions (0: none, the default)",
    )
    g.add_argument(
        "--position",
        choices=["learned", "alibi"],
        default=None,
        help="gpt: learned positions over --block_size, or ALiBi's distance bias (any length; the "
        "default with --memory)",
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
        help="bdh: attention decay, per head the bytes after which the state's weight on a byte "
        "halves (one number: every head; none: no decay, the paper's model; recipe: 8,32,128,256)",
    )
    g.add_argument(
        "--learn_decay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bdh: learn each head's half-life, starting from --half_lives (a parameter per head, "
        "without weight decay; recipe: not learned)",
    )
    g.add_argument(
        "--shifted_heads",
        type=nonneg_int,
        default=None,
        metavar="K",
        help="bdh: the last K heads pair each byte's key with the next byte's value, so that a match "
        "reads what followed it (an induction head's copy; 0: none, the paper's model)",
    )


def add_data_flags(g) -> None:
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
        help="train on this text dataset instead of Wikitext-2: a Hub id or a local folder "
        "(save_to_disk, or json/csv/parquet/text files), converted once into byte files under --data_cache",
    )
    g.add_argument("--dataset_config", default=None, help="--dataset's configuration (its subset)")
    g.add_argument("--text_column", default=None, help="--dataset's column of text (text)")
    g.add_argument(
        "--val_fraction",
        type=positive_float,
        default=None,
        help="--dataset without a validation split: this fraction of its train rows is held out (0.005)",
    )
    g.add_argument(
        "--data_cache",
        default=None,
        help="where --dataset's byte files are kept (BDH_DATA_CACHE; ~/.cache/dragon-hatchling/datasets)",
    )
    g.add_argument(
        "--copy_spans",
        type=probability,
        default=None,
        metavar="FRACTION",
        help="copying mixed into training: this fraction of the training windows each repeat a span of "
        "their own text (8 bytes to a quarter of the window, log-uniform) later in the window, so that "
        "the model learns to reuse what it has read; validation reads the text as it is (recipe: 0, none; a "
        "resumed run keeps its own)",
    )
    g.add_argument(
        "--fill_unk",
        type=probability,
        default=None,
        metavar="FRACTION",
        help="this fraction of the train text's <unk> tokens (the tokenized WikiText's words rarer than 3) "
        "each replaced by a word that occurs exactly 3 times in it, drawn once from --seed: a stand-in for "
        "the rare words the raw train split spells out; validation reads its text as it is (default 0; a "
        "resumed run keeps its own)",
    )
    g.add_argument(
        "--extra_val_file",
        action="append",
        default=[],
        metavar="PATH",
        help="also report validation loss on this file (repeatable)",
    )


def add_output_flags(g) -> None:
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
        "--accept_new_data",
        action="store_true",
        help="with --resume: continue although the train or validation file changed since the checkpoint "
        "(metrics.json records the change, data_changes)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="continue a run from a checkpoint folder or run folder; auto: --out_dir's last checkpoint",
    )


def add_hub_flags(g) -> None:
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the best checkpoint, a model card and the results at the end of the run (token "
        "from HF_TOKEN or `hf auth login`)",
    )
    g.add_argument("--hf_repo_id", default=None, help="USER/NAME of the model repo to push to")
    g.add_argument("--push_every_epoch", action="store_true", help="also push after every epoch")
    g.add_argument("--hf_private", action="store_true", help="create the repo private")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- the loop


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then linear decay to --min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, total - 1 - args.warmup_steps)
    frac = min(1.0, (step - args.warmup_steps) / span)
    return args.lr + frac * (args.min_lr - args.lr)


def train(run: Setup) -> dict:
    """The training loop. Returns the final metrics; raises Interrupted on SIGINT/SIGTERM.

    Under torchrun every rank runs it: each trains on its share of every step's windows through
    DistributedDataParallel, validation is split over the ranks, and rank 0 alone writes."""
    args, ranks, total = run.args, run.ranks, run.total_steps
    nets = build(run)
    progress = resumed(run, nets) if run.resume is not None else Progress()
    announce(run, nets.model, progress)
    check_validation_fits(run, nets.forward)
    meter = Meter(run.device, progress.interval)
    folder = RunFolder(run, nets, progress, meter)
    stream = StreamText(
        run.data.train, args.seed, args.article_order == "shuffled", args.reset_state == "article"
    )
    progress.started = time.time()
    with StopSignals() as signals, folder, progress_bar(run, progress) as bar:
        try:
            if run.resume is not None and cut_short(run, progress):
                cut_validation(run, nets, folder, signals)
            for step in range(progress.done, total):
                # forward, backward, update (a carried state starts empty at each epoch)
                if nets.carried is not None and step % run.steps_per_epoch == 0:
                    nets.carried.reset()
                if args.reset_state == "article":  # and each row whose window begins an article
                    nets.carried.reset_rows(article_rows(run, step, stream))
                x, y = training_batch(run, step, stream)
                lr = lr_at(step, total, args)
                meter.add(nets.step(x, y, lr, run, progress), x.numel() * ranks.world)
                done = step + 1
                bar.update(1)
                evaluating = evaluation_due(run, done)
                if not (done % args.log_every == 0 or evaluating):
                    if signals.caught and not ranks.several:  # between log rows: the interval is saved
                        raise folder.stopped(done, signals, saved_now=False)
                    continue
                # a log row: the ranks agree on the mean loss and on whether any was told to stop
                row = meter.row(done, lr, run, progress, signals)
                # validation, the best checkpoint and a save (a signal may cut it short)
                evaluated = evaluating and validation(done, row, meter.mean, run, nets, folder, signals)
                progress.validation_cut = evaluating and not evaluated
                row["elapsed_s"] = round(progress.elapsed(), 1)
                folder.log.write(row)
                bar.set_postfix(loss=f"{meter.mean:.3f}", bytes_s=f"{row['bytes_per_s']:,.0f}")
                # after an epoch (--push_every_epoch): the results so far, and a push
                if push_after(run, done) and done < total:
                    folder.write_results(done, finished=False)
                    folder.push()
                # a signal: save, say how to resume, stop
                if signals.caught and (done < total or not evaluated):
                    raise folder.stopped(done, signals, saved_now=evaluated)
                meter.restart()
            metrics = folder.write_results(total, finished=True)
        except (Interrupted, FloatingPointError):
            raise
        except Exception as e:  # validation, plotting, a push, the data: lose no more than the last step
            if ranks.several and (signals.caught or peer_failed(e)):  # another rank failed and says why
                folder.rescue(e)
                raise Quiet(1) from e
            raise RunFailed(folder.rescue(e)) from e
    finish(run, folder, metrics)
    return {**metrics, "push_failed": folder.push_failed}


@dataclass
class Nets:
    """The model, what the loop calls it through (paths.py; DistributedDataParallel under torchrun for
    training) and its optimizer."""

    model: torch.nn.Module
    forward: torch.nn.Module  # validation's
    train_forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    carried: Carried | None = None  # --carry_state: the forward that carries the state across steps

    def step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, run: Setup, progress: Progress
    ) -> torch.Tensor:
        """One optimizer step on a batch at learning rate lr; its loss, on the device (not synchronised)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(run.device, run.dtype):
            _, loss = self.train_forward(x, y)
        loss.backward()
        if run.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), run.args.grad_clip)
        done, progress.done = progress.done, None  # in the middle of an update
        self.optimizer.step()
        progress.done = done + 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build(run: Setup) -> Nets:
    """The model drawn from --seed (the same weights on every rank), its forwards and AdamW."""
    args, ranks, device = run.args, run.ranks, run.device
    torch.manual_seed(args.seed)
    model = model_class(run.config)(run.config)
    if run.init_weights is not None:  # --init_from: its weights, checked against this model
        check_tensors(model, run.init_weights, f"--init_from {args.init_from}")
        model.load_state_dict(run.init_weights)
    model = model.to(device)
    if ranks.rank > 0:  # the same weights on every rank, dropout of its own
        torch.manual_seed(rank_seed(args.seed, ranks.rank, 0))
    forward = forward_of(model, run.path)
    carried = Carried(forward) if args.carry_state else None
    train_forward = carried if carried is not None else forward
    if ranks.several:  # gradients averaged over the ranks as backward goes
        from torch.nn.parallel import DistributedDataParallel

        # around the compiled model, and without dynamo's DDP graph splitter, which fails to compile
        # either model (BackendCompilerFailed in its compile_fn, torch 2.11, 2 H200s); the gradients'
        # all-reduce then starts after the compiled backward, not inside it
        torch._dynamo.config.optimize_ddp = False
        train_forward = DistributedDataParallel(
            train_forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.lr, fused=device.type == "cuda"
    )
    return Nets(model, forward, train_forward, optimizer, carried)


def resumed(run: Setup, nets: Nets) -> Progress:
    """The weights, optimizer state, counters and random states of the checkpoint resumed from."""
    args, ranks, state = run.args, run.ranks, run.resume_state
    tensors = load_weights(run.resume)
    check_tensors(nets.model, tensors, f"--resume {args.resume}: the checkpoint is not this model's")
    try:
        nets.model.load_state_dict(tensors)
        nets.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # the optimizer state of another model
        raise UsageError(
            f"--resume {args.resume}: the checkpoint is not this model's ({first_cause(e)})"
        ) from e
    progress = Progress.of_checkpoint(state)
    if nets.carried is not None:  # this rank's rows of the state the checkpoint's step left
        saved = load_state(run.resume, f"--resume {args.resume}")
        nets.carried.restore(rows_of(saved, ranks), run.device)
    rngs = state.get("rng_ranks")
    if rngs and len(rngs) == ranks.world:  # each rank where it was
        set_rng_state(rngs[ranks.rank], run.device)
    else:  # saved by another number of processes: rank 0 where it was, the others anew
        set_rng_state(state["rng"], run.device)
        if ranks.rank > 0:
            torch.manual_seed(rank_seed(args.seed, ranks.rank, progress.done))
    return progress


def announce(run: Setup, model: torch.nn.Module, progress: Progress) -> None:
    """The model, the data and the plan, in two lines (rank 0)."""
    if not run.ranks.main:
        return
    args, ranks = run.args, run.ranks
    print(f"{model.display_name}: {model.num_params():,} parameters, {run.config}")
    source = run.sources["train"]["source"] + (
        f"; {run.data.filled:,} <unk> filled" if run.data.filled else ""
    )
    print(
        f"train {len(run.data.train):,} bytes ({source}), "
        f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps; device {device_name(run.device)}, "
        f"{str(run.dtype).removeprefix('torch.')}, {run.path} path; out {run.out_dir}"
        + (f"; {ranks.world} processes, {args.batch_size // ranks.world} windows a step each" * ranks.several)
        + (f"; resuming at step {progress.done}" if run.resume is not None else "")
    )


def progress_bar(run: Setup, progress: Progress) -> tqdm:
    return tqdm(
        total=run.total_steps,
        initial=progress.done,
        disable=run.args.no_progress or not run.ranks.main,
        unit="step",
        dynamic_ncols=True,
    )


@functools.lru_cache(maxsize=1)  # the epoch in hand: its order is drawn once
def epoch_order(n_bytes: int, seq_len: int, epoch: int, seed: int):
    return epoch_offsets(n_bytes, seq_len, epoch, seed)


def training_batch(run: Setup, step: int, stream: StreamText) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step `step`'s windows (inputs, targets), on the device: a shuffled
    epoch's, or with --carry_state each row's next window of its stretch of the epoch's text."""
    args, text = run.args, run.data.train
    if args.carry_state:
        mine, text = stream_batch(run, step), stream.at(step // run.steps_per_epoch).text
    else:
        epoch, pos = divmod(step, run.steps_per_epoch)
        order = epoch_order(len(run.data.train), args.seq_len, epoch, args.seed)
        mine = share(batch_offsets(order, pos, args.batch_size), run.ranks)  # always batch_size windows
    x, y = windows_at(text, mine, args.seq_len, step_copies(run, step))
    return x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def step_copies(run: Setup, step: int) -> np.ndarray | None:
    """--copy_spans: this rank's share of step `step`'s copy_plan, drawn for the whole batch, so that
    a resumed run and any number of ranks copy the same spans."""
    args = run.args
    if args.copy_spans == 0:
        return None
    return share(copy_plan(args.batch_size, args.seq_len, args.copy_spans, args.seed, step), run.ranks)


def stream_batch(run: Setup, step: int) -> np.ndarray:
    """This rank's windows of step `step` in stream order (--carry_state): their start offsets."""
    args = run.args
    epoch, pos = divmod(step, run.steps_per_epoch)
    offsets = stream_offsets(len(run.data.train), args.seq_len, args.batch_size, epoch, args.seed, pos)
    return share(offsets, run.ranks)


def article_rows(run: Setup, step: int, stream: StreamText) -> torch.Tensor:
    """--reset_state article: which of this rank's rows read an article's first line (one of the
    epoch's text's article starts) this step."""
    starts = stream.at(step // run.steps_per_epoch).starts
    return torch.from_numpy(holds_a_start(starts, stream_batch(run, step), run.args.seq_len))


def evaluation_due(run: Setup, done: int) -> bool:
    """Whether step `done` validates: every --eval_every steps, at the end, after an epoch pushed."""
    return done % run.args.eval_every == 0 or done == run.total_steps or push_after(run, done)


def push_after(run: Setup, done: int) -> bool:
    """Whether step `done` ends an epoch that --push_every_epoch pushes (and validates) after."""
    return run.args.push_every_epoch and done % run.steps_per_epoch == 0


# ----------------------------------------------------------------------------- validation


def eval_batch(run: Setup) -> int:
    """Windows per validation batch: --eval_batch_size, but no more bytes than a training batch (or
    64 x 128), so that every window that trains also validates."""
    args = run.args
    return eval_batch_windows(
        args.eval_batch_size, args.eval_seq_len, max(args.batch_size * args.seq_len, 8192)
    )


def validate(run: Setup, nets: Nets, signals: StopSignals) -> dict:
    """The loss on every validation file in --eval_seq_len windows, split over the ranks (and with
    --carry_state read as one text); with one process, Stopped as soon as a signal arrives (between
    batches). Several wait for the next log step."""
    args, ranks = run.args, run.ranks
    out = {}
    for label, data in {"": run.data.valid, **run.data.extra}.items():
        sums, windows = position_loss_sums(
            nets.forward,
            data,
            args.eval_seq_len,
            eval_batch(run),
            run.device,
            autocast_dtype=run.dtype,
            stop=None if ranks.several else lambda: signals.caught,
            shard=(ranks.rank, ranks.world),
        )
        total, count = all_reduce(np.array([sums.sum(), windows]))
        loss = float(total / (count * args.eval_seq_len))
        suffix = f"_{label}" if label else ""
        out.update({f"val_loss{suffix}": loss, f"val_bpb{suffix}": loss / LN2})
        if args.carry_state:  # and read as one text, in training's windows, as the run trains
            loss = validate_stream(run, nets.carried, data)
            out.update({f"val_loss_stream{suffix}": loss, f"val_bpb_stream{suffix}": loss / LN2})
    return out


def validate_stream(run: Setup, carried: Carried, data: np.ndarray) -> float:
    """The loss of a validation file read as one text, --seq_len bytes at a time, the state carried
    from its first byte to its last (rank 0 reads it; the others wait for its number)."""
    total = np.zeros(2)
    if run.ranks.main:
        sums, counts, _ = stream_loss_sums(carried, data, run.device, run.dtype, chunk_size=run.args.seq_len)
        total[:] = sums.sum(), counts.sum()
    total, count = all_reduce(total)
    return float(total / count)


def validate_and_save(done: int, run: Setup, nets: Nets, folder: RunFolder, signals: StopSignals) -> None:
    """Validate after step `done`, keep the best checkpoint, save; Stopped if a signal cuts it short."""
    p = folder.progress
    p.last_eval = validate(run, nets, signals)
    if not math.isfinite(p.last_eval["val_loss"]):
        raise FloatingPointError(
            f"validation loss became {p.last_eval['val_loss']} at step {done}; stopped. "
            + kept_checkpoint(run.out_dir)
        )
    p.eval_step = done
    improved = p.last_eval["val_loss"] < p.best["val_loss"]
    if improved:
        p.best = {"step": done, **p.last_eval}
    folder.save(done, ("last", "best") if improved else ("last",))


def validation(
    done: int, row: dict, train_loss: float, run: Setup, nets: Nets, folder: RunFolder, signals: StopSignals
) -> bool:
    """validate_and_save, then its losses and the neurons' sparsity into the row and on the console
    (with the mean training loss since the last row); False if a signal cut it short."""
    try:
        validate_and_save(done, run, nets, folder, signals)
    except Stopped:
        return False
    last = folder.progress.last_eval
    row.update({k: round(v, 5) for k, v in last.items()})
    if not run.ranks.main:
        return True
    if nets.model.has_neurons:
        live = activation_summary(nets.model, run.data.valid, run.args.eval_seq_len, 8, run.device, run.dtype)
        row.update(x_nonzero=round(live["x_mean"], 5), y_nonzero=round(live["y_mean"], 5))
    if getattr(nets.model.config, "learn_decay", False):  # how far each head reaches by now
        row["half_lives"] = " ".join(f"{t:.2f}" for t in nets.model.half_lives())
    extra = "".join(f", {k} {v:.4f}" for k, v in last.items() if k.startswith("val_loss_"))
    tqdm.write(
        f"step {done}: train {train_loss:.4f}, val {last['val_loss']:.4f} nats/byte "
        f"({last['val_bpb']:.4f} bpb){extra}"
    )
    return True


def cut_short(run: Setup, progress: Progress) -> bool:
    """Whether a signal cut short the validation of the step the checkpoint resumed from saved
    (checkpoints from before it said so: the last step's, unless it had validated)."""
    if progress.done >= run.total_steps and progress.eval_step != progress.done:
        return True
    return progress.validation_cut


def cut_validation(run: Setup, nets: Nets, folder: RunFolder, signals: StopSignals) -> None:
    """On resuming at a step whose validation a signal had cut short: that validation, into the log
    row the stop wrote without it, and onto the console."""
    done = folder.progress.done
    row = folder.log.row_at(done)
    loss = float(row.get("train_loss") or "nan")
    folder.progress.validation_cut = False  # what the validation's checkpoint says
    if not validation(done, row, loss, run, nets, folder, signals):
        folder.progress.validation_cut = True
        raise folder.stopped(done, signals, saved_now=True)
    folder.log.rewrite()


@torch.no_grad()
def check_validation_fits(run: Setup, forward: torch.nn.Module) -> None:
    """One validation batch before the first step: a run whose validation cannot run fails at its
    start, not at its first validation hours later."""
    batch, seq_len = eval_batch(run), run.args.eval_seq_len
    x, _ = next(window_batches(run.data.valid, seq_len, batch))
    try:
        with eval_mode(forward), autocast(run.device, run.dtype):
            forward(x.to(run.device))
    except torch.OutOfMemoryError:
        raise UsageError(
            f"a validation batch of {batch} x {seq_len} bytes does not fit on {run.device} (out of memory); "
            "lower --eval_batch_size or --eval_seq_len"
        ) from None


# ----------------------------------------------------------------------------- the command


def finish(run: Setup, folder: RunFolder, metrics: dict) -> None:
    """The last line, and the push at the end (--push_to_hub), on rank 0."""
    if not run.ranks.main:
        return
    m = metrics
    print(
        f"done: val loss {m['final_val_loss']:.4f} nats/byte, {m['final_val_bpb']:.4f} bits/byte, "
        f"perplexity {m['final_val_perplexity']:.3f}; {m['bytes_per_s']:,} bytes/s; results in {run.out_dir}"
    )
    if run.args.push_to_hub:
        folder.push()


@interruptible("before its first step: nothing was trained, and a resumed run's checkpoints are as they were")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Setup | None = None
    ranks = Ranks()
    try:
        ranks = ranks_from_env()
        start(ranks, args.dist_timeout)
        checked = agreed(ranks, lambda: plan(args, ranks))  # every flag, before the data's wait
        dataset = None
        if args.dataset is not None:  # rank 0 converts it (once); the others wait for it
            dataset = agreed(ranks, lambda: convert_dataset(args, convert=ranks.main))
        run = agreed(ranks, lambda: prepare(args, checked, dataset))
        metrics = train(run)
        stop(together=True)
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
        if run is not None and run.lock is not None:
            run.lock.close()  # the run's folder is free again
        stop()
    return 1 if metrics["push_failed"] else 0


if __name__ == "__main__":
    exit_with(main)

"""What a training run writes into its folder, and the counters it saves with every checkpoint.

    RUN/log.csv                 a row every --log_every steps (validation columns at each validation)
    RUN/metrics.json            the results, and everything needed to say how they were made
    RUN/{loss,bpb,lr,sparsity}.png
    RUN/checkpoints/{best,last}/  model.safetensors, config.json, training_state.pt

Under torchrun rank 0 writes; the other ranks' RunFolder writes nothing but takes part in what the
ranks do together (gathering their random states for a checkpoint).
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling import plots
from dragon_hatchling.carried import gathered
from dragon_hatchling.checkpoints import clear_run, run_of, save_checkpoint
from dragon_hatchling.cli import UsageError
from dragon_hatchling.distributed import all_reduce, gather
from dragon_hatchling.files import atomic_path, write_json
from dragon_hatchling.hub import try_push
from dragon_hatchling.paths import COMPILED, FUSED
from dragon_hatchling.run_setup import Setup
from dragon_hatchling.scoring import activation_summary
from dragon_hatchling.stopping import Interrupted, StopSignals, kept_checkpoint, resume_argv, shell_command

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


@dataclass
class Progress:
    """The run's counters, saved in every checkpoint beside the weights and the optimizer's state."""

    done: int | None = 0  # the optimizer steps the weights hold (None: in the middle of an update)
    best: dict = field(default_factory=lambda: {"val_loss": float("inf")})  # the best validation, its step
    last_eval: dict = field(default_factory=dict)  # the last validation's losses
    eval_step: int | None = None  # the step last_eval was measured at
    train_time: float = 0.0  # seconds of training steps, over every stretch of the run
    elapsed_before: float = 0.0  # wall seconds of the stretches before this one
    saved: int | None = None  # the step of the last checkpoint
    interval: dict | None = None  # the log interval the checkpoint was saved in (Meter.state)
    validation_cut: bool = False  # a signal cut short the validation of the step saved
    started: float = field(default_factory=time.time)

    @classmethod
    def of_checkpoint(cls, state: dict) -> Progress:
        """The counters a training_state.pt saved (runs from before eval_step: the step saved at)."""
        last_eval = state.get("last_eval", {})
        eval_step = state.get("eval_step", state["step"] if last_eval else None)
        return cls(
            state["step"],
            state["best"],
            last_eval,
            eval_step,
            state["train_time_s"],
            state["elapsed_s"],
            saved=state["step"],
            interval=state.get("interval"),
            validation_cut=state.get(
                "validation_cut", state["step"] != eval_step and "interval" not in state
            ),
        )

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started


class Meter:
    """The training loss and speed since the last log row; a checkpoint saves it (state), so that
    the first row after resuming averages the steps the unstopped run's row does."""

    def __init__(self, device: torch.device, saved: dict | None = None) -> None:
        saved = saved or {"loss_sum": 0.0, "steps": 0, "bytes": 0, "seconds": 0.0}
        self.loss_sum = torch.tensor(saved["loss_sum"], dtype=torch.float32, device=device)
        self.steps, self.bytes = saved["steps"], saved["bytes"]
        self.mean = math.nan  # the last row's mean loss, unrounded
        self.t0 = time.time() - saved["seconds"]

    def state(self) -> dict:
        """The interval in hand, for a checkpoint."""
        return {"loss_sum": self.loss_sum.item(), "steps": self.steps, "bytes": self.bytes,
                "seconds": time.time() - self.t0}  # fmt: skip

    def add(self, loss: torch.Tensor, n_bytes: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.bytes += n_bytes

    def row(self, done: int, lr: float, run: Setup, progress: Progress, signals: StopSignals) -> dict:
        """The log row of step `done`; the ranks agree on the loss and on a signal (every rank calls this)."""
        loss = self.loss_sum.item() / self.steps  # syncs the device
        if run.ranks.several:
            loss = float(all_reduce(np.array([loss]))[0]) / run.ranks.world
        signals.agree(run.ranks)
        seconds = time.time() - self.t0
        progress.train_time += seconds
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} by step {done}; stopped. " + kept_checkpoint(run.out_dir)
            )
        args = run.args
        row = {
            "step": done,
            "epoch": round(done / run.steps_per_epoch, 4),
            "bytes_seen": done * args.batch_size * args.seq_len,
            "train_loss": round(loss, 5),
            "lr": f"{lr:.6g}",
            "bytes_per_s": round(self.bytes / max(seconds, 1e-9)),
        }
        self.mean, self.steps, self.bytes = loss, 0, 0
        self.loss_sum.zero_()
        return row

    def restart(self) -> None:
        """Start timing the next interval (what a log step did besides training is not counted)."""
        self.t0 = time.time()


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def logged_rows(source: Path, resume_step: int) -> tuple[list[dict], list[str]]:
    """The rows of a log.csv up to resume_step, and its columns; a UsageError, the file kept as it
    is, if it is not a CSV this project wrote (the run then stops before a step)."""
    try:
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
            return rows, list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(
            f"{source} is not a log this project wrote ({type(e).__name__}); "
            "move it aside to resume without its rows"
        ) from None


class CsvLog:
    """The training log: one row every --log_every steps, flushed as it goes.

    A resumed run keeps the rows up to its checkpoint's step (from `source`, the resumed run's log,
    by default this one) and every column they had, rewritten atomically (which also drops a line
    torn by a kill), and appends after them.
    """

    def __init__(
        self, path: Path, fields: list[str], resume_step: int | None = None, source: Path | None = None
    ):
        self.path, self.file = path, None
        old, old_fields = [], []
        source = source or path
        if resume_step is not None and source.is_file():
            old, old_fields = logged_rows(source, resume_step)
        self.fields = old_fields + [k for k in fields if k not in old_fields]
        self.rows = [{k: r.get(k) or "" for k in self.fields} for r in old]
        self.rewrite()

    def rewrite(self) -> None:
        """The whole log again, atomically (after a row changed), and appending after it."""
        if self.file is not None:
            self.file.close()
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields, lineterminator="\n")

    def write(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in self.fields}
        self.writer.writerow(row)
        self.file.flush()
        self.rows.append(row)

    def row_at(self, step: int) -> dict:
        """The row of step `step` (to fill in), or a new one at the end."""
        found = next((r for r in self.rows if str(r.get("step")) == str(step)), None)
        if found is None:
            found = {"step": str(step)}
            self.rows.append(found)
        return found

    def close(self) -> None:
        self.file.close()


class NoLog:
    """The log of a rank that writes nothing (every rank but 0)."""

    rows: list[dict] = []

    def write(self, row: dict) -> None:
        pass

    def row_at(self, step: int) -> dict:
        return {}

    def rewrite(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunFolder:
    """The run's folder: its log, checkpoints, metrics and plots (a context manager that closes the log)."""

    def __init__(self, run: Setup, nets, progress: Progress, meter: Meter) -> None:
        """nets: the model and its optimizer (experiment.Nets); meter: the loop's, whose interval
        every checkpoint saves."""
        self.run, self.model, self.optimizer, self.progress = run, nets.model, nets.optimizer, progress
        self.meter, self.carried = meter, nets.carried
        self.push_failed = False
        self.command = shell_command(sys.argv[1:])
        self.resume_command = shell_command(resume_argv(sys.argv[1:], run.out_dir))
        self.log = NoLog()
        if not run.ranks.main:
            return
        if run.resume is None:  # --overwrite: the old run goes before the new one writes anything
            clear_run(run.out_dir)
        extra = [f"{k}_{label}" for label in run.val_labels for k in ("val_loss", "val_bpb")]
        learned = ["half_lives"] if getattr(run.config, "learn_decay", False) else []  # "h1 h2 ..." bytes
        fields = CSV_FIELDS + extra + SPARSITY_FIELDS + learned
        resumed = run.resume is not None
        source = run_of(run.resume) / "log.csv" if resumed else None
        self.log = CsvLog(run.out_dir / "log.csv", fields, progress.done if resumed else None, source)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.log.close()

    def save(self, step: int, which: tuple[str, ...] = ("last",), together: bool = True) -> None:
        """Rank 0 saves step `step`. together: every rank calls this at the same step (their random
        states are gathered, so that each resumes where it was)."""
        run, p = self.run, self.progress
        rngs = gather(rng_state(run.device)) if together and run.ranks.several else None
        carried = self.carried_state(together)
        p.saved = step
        if not run.ranks.main:
            return
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "args": vars(run.args),
            "best": p.best,
            "last_eval": p.last_eval,
            "eval_step": p.eval_step,
            "rng": rng_state(run.device),
            "rng_ranks": rngs,
            "world_size": run.ranks.world,
            "train_time_s": p.train_time,
            "elapsed_s": p.elapsed(),
            "interval": self.meter.state(),
            "validation_cut": p.validation_cut,
            "data": run.sources,
            "data_changes": run.data_changes,
        }
        for name in which:
            save_checkpoint(self.model, run.out_dir / "checkpoints" / name, state, carried)

    def carried_state(self, together: bool) -> dict | None:
        """--carry_state: every rank's rows of the state, gathered (None without one, or when rank 0
        saves alone under torchrun: a resumed run then starts its rows empty)."""
        if self.carried is None or (self.run.ranks.several and not together):
            return None
        return gathered(self.carried.tensors())

    def write_results(self, step: int, finished: bool) -> dict:
        """metrics.json and the plots, after step `step` (rank 0; the others return no metrics)."""
        if not self.run.ranks.main:
            return {}
        metrics = run_metrics(self, step)
        metrics["world_size"] = self.run.ranks.world
        metrics["finished"] = finished
        write_json(self.run.out_dir / "metrics.json", metrics)
        extra = self.run.val_labels
        plots.training_curves(self.log.rows, extra, self.run.out_dir, self.model.display_name)
        return metrics

    def stopped(self, step: int, signals: StopSignals, saved_now: bool) -> Interrupted:
        """After a signal: save step `step` (unless just saved) and the results, say how to resume."""
        if not saved_now:
            self.save(step)
        self.write_results(step, finished=False)
        where = self.run.out_dir / "checkpoints" / "last"
        return Interrupted(
            signals.signum,
            f"{signals.name} at step {step}: saved {where}; resume with: {self.resume_command}",
        )

    def rescue(self, error: Exception) -> str:
        """After an unexpected exception: save what the last whole step holds, say how to resume."""
        p = self.progress
        message = str(error).splitlines()[0][:300] if str(error) else ""
        if p.done is not None and p.done > 0 and p.done != p.saved:
            try:
                self.save(p.done, together=False)
            except Exception:  # e.g. a full disk: the previous checkpoint stays as it was
                pass
        try:
            self.write_results(p.saved or 0, finished=False)
        except Exception:
            pass
        when = f"after step {p.done}" if p.done is not None else "during an optimizer update"
        kept = kept_checkpoint(self.run.out_dir)
        return f"{type(error).__name__} {when}: {message}. {kept} Resume with: {self.resume_command}"

    def push(self) -> None:
        """Push the run's best checkpoint and results to the Hub (rank 0); a failure is one line, kept."""
        if self.run.ranks.main:
            self.push_failed |= not try_push(
                self.run.out_dir, self.run.args.hf_repo_id, self.run.args.hf_private
            )


def run_metrics(folder: RunFolder, step: int) -> dict:
    """metrics.json: the run's results and everything needed to say how they were made."""
    run, model, p, args = folder.run, folder.model, folder.progress, folder.run.args
    sparsity = None  # a GPT has no sparse neurons
    if model.has_neurons:
        sparsity = activation_summary(
            model, run.data.valid, args.eval_seq_len, min(8, args.eval_batch_size), run.device, run.dtype
        )
    trained_bytes = step * args.batch_size * args.seq_len
    val = p.last_eval.get("val_loss")  # None: no validation has run yet
    return {
        **final_validation(val, step, p.best),
        "final_extra_val": {
            label: {
                "loss": p.last_eval[f"val_loss_{label}"],
                "bpb": p.last_eval[f"val_bpb_{label}"],
                "perplexity": math.exp(p.last_eval[f"val_loss_{label}"]),
            }
            for label in run.val_labels
            if f"val_loss_{label}" in p.last_eval
        },
        "activation_nonzero": sparsity,
        "steps": step,
        "total_steps": run.total_steps,
        "epochs": round(step / run.steps_per_epoch, 4),
        "bytes_trained": trained_bytes,
        "wall_time_s": round(p.elapsed(), 1),
        "train_time_s": round(p.train_time, 1),
        "bytes_per_s": round(trained_bytes / max(p.train_time, 1e-9)),
        "arch": args.arch,
        "num_params": model.num_params(),
        "config": model.config.to_dict(),
        "shape": model.describe(),  # with learned half-lives, those it ended with
        **hardware(run),
        "command": folder.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "data": run.sources,
        "data_changes": run.data_changes,
        "args": vars(args),
    }


def final_validation(val: float | None, step: int, best: dict) -> dict:
    """The last validation's loss, bits/byte and perplexity (None before the first), and the best's."""
    validated = val is not None
    return {
        "final_val_loss": val,
        "final_val_bpb": val / LN2 if validated else None,
        "final_val_perplexity": math.exp(val) if validated else None,
        "final_val_note": None if validated else f"no validation had run by step {step}",
        "best_val_loss": best.get("val_loss") if best.get("step") is not None else None,
        "best_val_bpb": best.get("val_bpb"),
        "best_step": best.get("step"),
    }


def hardware(run: Setup) -> dict:
    """Where and how the run computed: device, dtype, the forward path (paths.py), torch's version."""
    return {
        "device": device_name(run.device),
        "dtype": str(run.dtype).removeprefix("torch."),
        "path": run.path,
        "compile": run.path == COMPILED,
        "fused": run.path == FUSED,
        "torch_version": torch.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def git_commit() -> str | None:
    """The commit this code is at, with -dirty if tracked files changed; None outside a checkout."""
    here = Path(__file__).parent

    def git(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *words], capture_output=True, text=True, timeout=5, cwd=here)

    try:
        out = git("rev-parse", "--verify", "HEAD")
        if out.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank > 0's random numbers (dropout) from `step` on, when it has no state of its own."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])

"""Train the paper authors' BDH (bdh.py of github.com/pathwaycom/bdh, not in this repository) on the
bytes this project's runs see, with their train.py's recipe, and score it with this project's protocol.

    python3 results/report/authors_bdh.py --bdh_py .gpu/authors/bdh.py --data_dir .gpu/data \
        --train_file .gpu/data/wiki.train.tokens --extra_val_file .gpu/data/wiki.valid.tokens --out_dir RUN

Their recipe (train.py at 714bc80): their default BDHConfig (d=256, h=4, n=32768, L=6, dropout 0.1),
torch.compile, bf16 autocast, AdamW at a constant lr 1e-3 with weight decay 0.1, no warm-up, no
clipping, windows at random offsets. Here with this project's budget: batch 32 x 128 bytes, as many
steps as 3 epochs of this project's windows (7,908 on wiki.train.tokens). Validation: this project's
`evaluate_loss` (128-byte windows of the whole file). Writes log.csv, metrics.json and model.pt (their
state dict, which `evaluate.py --model_path RUN/model.pt` loads as the paper authors' format).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's modules

from dragon_hatchling.cli import (  # noqa: E402
    Parser,
    UsageError,
    make_out_dir,
    module_from_file,
    positive_int,
    run_command,
    seed,
)
from dragon_hatchling.data import load_bytes_file, load_split, num_windows, windows_at  # noqa: E402
from dragon_hatchling.devices import resolve_device  # noqa: E402
from dragon_hatchling.files import write_json  # noqa: E402
from dragon_hatchling.run_folder import CsvLog  # noqa: E402
from dragon_hatchling.scoring import evaluate_loss  # noqa: E402

VALID_LEN = 128  # this project's protocol: validation in windows of 128 bytes
RECIPE = (
    "their train.py: AdamW lr 1e-3 constant, weight decay 0.1, no warm-up, no clipping, random offsets, "
    "torch.compile, bf16 autocast"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--bdh_py", required=True, help="their bdh.py")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--train_file", required=True)
    p.add_argument("--extra_val_file", default=None)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--seq_len", type=positive_int, default=128)
    p.add_argument(
        "--epochs", type=positive_int, default=3, help="the budget: this many epochs of our windows"
    )
    p.add_argument("--eval_every", type=positive_int, default=1000)
    p.add_argument("--seed", type=seed, default=1337)
    p.add_argument(
        "--smoke", action="store_true", help="a tiny model and 20 steps, to try the script on a CPU"
    )
    return p.parse_args(argv)


class Their:
    """Their model, compiled on CUDA, with their optimiser, and the texts it reads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, resolve_device(args.device)
        self.train = load_bytes_file(args.train_file, "--train_file")
        self.valid = {"": load_split("valid", args.data_dir)}  # key: the suffix of its log columns
        if args.extra_val_file:
            name = "_" + Path(args.extra_val_file).name.replace(".", "_")
            self.valid[name] = load_bytes_file(args.extra_val_file, "--extra_val_file")
        self.check_texts()
        bdh = module_from_file(args.bdh_py, "their_bdh", "--bdh_py", "their bdh.py")
        if not (hasattr(bdh, "BDH") and hasattr(bdh, "BDHConfig")):
            raise UsageError(f"--bdh_py {args.bdh_py}: has no BDH and BDHConfig; expected their bdh.py")
        torch.manual_seed(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        small = dict(n_layer=2, n_embd=32, mlp_internal_dim_multiplier=8) if args.smoke else {}
        self.model = bdh.BDH(bdh.BDHConfig(**small)).to(self.device)
        self.compiled = torch.compile(self.model) if self.device.type == "cuda" else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.gen = torch.Generator().manual_seed(args.seed)

    def check_texts(self) -> None:
        """Before any work: the train text holds a batch of windows and a window at a random offset
        (step), each validation text a 128-byte window."""
        T, B = self.args.seq_len, self.args.batch_size
        if num_windows(self.train, T) < B or len(self.train) <= T + 1:
            raise UsageError(
                f"--train_file ({len(self.train)} bytes) must hold --batch_size {B} windows of --seq_len "
                f"{T} + 1 bytes and a byte more; it holds {num_windows(self.train, T)} windows"
            )
        for name, text in self.valid.items():
            if num_windows(text, VALID_LEN) == 0:
                what = "--extra_val_file" if name else "wiki.valid.raw of --data_dir"
                raise UsageError(
                    f"{what} ({len(text)} bytes) is shorter than one window of {VALID_LEN + 1} bytes"
                )

    def step(self) -> torch.Tensor:
        """One step of their train.py on windows at random offsets; the loss, detached."""
        T = self.args.seq_len
        offsets = torch.randint(len(self.train) - T - 1, (self.args.batch_size,), generator=self.gen)
        x, y = (t.contiguous().to(self.device) for t in windows_at(self.train, offsets.tolist(), T))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            _, loss = self.compiled(x, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def validate(self) -> dict:
        """This project's protocol: 128-byte windows of each validation text, loss and bits per byte."""
        self.model.eval()
        res = {}
        for key, text in self.valid.items():
            res[f"val_loss{key}"] = evaluate_loss(
                self.model, text, VALID_LEN, 64, self.device, autocast_dtype=self.dtype
            )[0]
        self.model.train()
        return {**res, **{k.replace("loss", "bpb"): v / math.log(2) for k, v in res.items()}}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class Interval:
    """The steps since the last log row: their summed loss and the time they took (and all of
    training's time so far, train_time)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum, self.count, self.t0 = torch.zeros((), device=device), 0, time.time()
        self.train_time = 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.count += 1

    def close(self, step: int, bytes_a_step: int) -> dict:
        """The interval's log row (a sync: .item()), and a new interval begun."""
        seconds = time.time() - self.t0
        self.train_time += seconds
        row = {"step": step, "bytes_seen": step * bytes_a_step, "lr": 1e-3,
               "train_loss": round(self.loss_sum.item() / self.count, 5),
               "bytes_per_s": round(self.count * bytes_a_step / seconds)}  # fmt: skip
        self.loss_sum.zero_()
        self.count = 0
        return row

    def restart(self) -> None:
        """Validation's time is not training time."""
        self.t0 = time.time()


def metrics(their: Their, last: dict, steps: int, interval: Interval, start: float, finished: bool) -> dict:
    """metrics.json: the final validation, how far the run got, how fast, on what."""
    args, cuda = their.args, their.device.type == "cuda"
    trained = steps * args.batch_size * args.seq_len
    extra = {k.removeprefix("val_loss_"): v for k, v in last.items() if k.startswith("val_loss_")}
    return {
        "final_val_loss": last["val_loss"],
        "final_val_bpb": last["val_bpb"],
        "final_extra_val": extra,
        "steps": steps,
        "finished": finished,
        "bytes_trained": trained,
        "train_time_s": round(interval.train_time, 1),
        "wall_time_s": round(time.time() - start, 1),
        "bytes_per_s": round(trained / interval.train_time),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "num_params": their.num_params(),
        "recipe": RECIPE,
        "device": torch.cuda.get_device_name(their.device) if cuda else "cpu",
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> int:
    """The command: one-line errors (exit 2) for bad flags and files, before any work."""
    run_command(run, argv)
    return 0


def run(argv: list[str] | None) -> None:
    """Train their model for the budget, validating as it goes, then save it and its metrics."""
    args = parse_args(argv)
    their = Their(args)
    out = make_out_dir(args.out_dir)
    total = 20 if args.smoke else args.epochs * (num_windows(their.train, args.seq_len) // args.batch_size)
    fields = ["step", "bytes_seen", "train_loss", "lr", "bytes_per_s", "elapsed_s"]
    log = CsvLog(out / "log.csv", fields + [f"val_{m}{k}" for m in ("loss", "bpb") for k in their.valid])
    print(f"their BDH: {their.num_params():,} parameters, {total} steps", flush=True)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # stop, validate, save
    start, interval, last, done = time.time(), Interval(their.device), {}, 0
    while done < total:
        interval.add(their.step())
        done += 1
        total = done if stop else total  # a SIGTERM ends the run here: validated, saved, metrics say so
        # a row every 100 steps, validation every --eval_every and at the end
        if done % 100 == 0 or done % args.eval_every == 0 or done == total:
            row = interval.close(done, args.batch_size * args.seq_len)
            if done % args.eval_every == 0 or done == total:
                last = their.validate()
                row.update({k: round(v, 5) for k, v in last.items()})
                shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
                print(f"step {done}: train {row['train_loss']:.4f}, {shown}", flush=True)
            log.write({**row, "elapsed_s": round(time.time() - start, 1)})
            interval.restart()
    log.close()
    torch.save(their.model.state_dict(), out / "model.pt")
    result = metrics(their, last, total, interval, start, finished=not stop)
    write_json(out / "metrics.json", result)
    print(f"done: val {result['final_val_loss']:.4f} nats/byte; {result['bytes_per_s']:,} bytes/s")


if __name__ == "__main__":
    sys.exit(main())

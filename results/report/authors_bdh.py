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
import csv
import datetime as dt
import importlib.util
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's modules

from dragon_hatchling.data import load_bytes_file, load_split, num_windows, windows_at  # noqa: E402
from dragon_hatchling.scoring import evaluate_loss  # noqa: E402


def load_their_module(path: str):
    spec = importlib.util.spec_from_file_location("authors_bdh", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bdh_py", required=True, help="their bdh.py")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--train_file", required=True)
    p.add_argument("--extra_val_file", default=None)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="the budget: this many epochs of our windows")
    p.add_argument("--eval_every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--smoke", action="store_true", help="a tiny model and 20 steps, to try the script on a CPU"
    )
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bdh = load_their_module(args.bdh_py)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = (
        bdh.BDHConfig(n_layer=2, n_embd=32, mlp_internal_dim_multiplier=8) if args.smoke else bdh.BDHConfig()
    )
    model = bdh.BDH(config).to(device)
    compiled = torch.compile(model) if device.type == "cuda" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    train = load_bytes_file(args.train_file)
    valid = {"": load_split("valid", args.data_dir)}
    if args.extra_val_file:
        valid["_" + Path(args.extra_val_file).name.replace(".", "_")] = load_bytes_file(args.extra_val_file)
    total = args.epochs * (num_windows(train, args.seq_len) // args.batch_size)
    total = 20 if args.smoke else total
    gen = torch.Generator().manual_seed(args.seed)
    fields = ["step", "bytes_seen", "train_loss", "lr", "bytes_per_s", "elapsed_s"]
    fields += [f"val_loss{k}" for k in valid] + [f"val_bpb{k}" for k in valid]
    log = open(out / "log.csv", "w", newline="")
    writer = csv.DictWriter(log, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    print(f"their BDH: {sum(p.numel() for p in model.parameters()):,} parameters, {total} steps", flush=True)

    def validate() -> dict:
        model.eval()
        with torch.no_grad():
            res = {f"val_loss{k}": evaluate_loss(model, v, 128, 64, device, autocast_dtype=dtype)[0]
                   for k, v in valid.items()}  # fmt: skip
        model.train()
        return {**res, **{k.replace("loss", "bpb"): v / math.log(2) for k, v in res.items()}}

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))  # stop, validate, save
    start = time.time()
    train_time, t0, loss_sum, count, last = 0.0, time.time(), torch.zeros((), device=device), 0, {}
    for step in range(total):
        offsets = torch.randint(len(train) - args.seq_len - 1, (args.batch_size,), generator=gen).tolist()
        x, y = (t.contiguous().to(device) for t in windows_at(train, offsets, args.seq_len))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        count += 1
        done = step + 1
        if stop or done == total:
            total = done  # a SIGTERM ends the run here: validated, saved, its metrics say how far it got
        if done % 100 == 0 or done % args.eval_every == 0 or done == total:
            train_loss = loss_sum.item() / count
            train_time += time.time() - t0
            speed = round(count * args.batch_size * args.seq_len / (time.time() - t0))
            row = {"step": done, "bytes_seen": done * args.batch_size * args.seq_len,
                   "train_loss": round(train_loss, 5), "lr": 1e-3, "bytes_per_s": speed}  # fmt: skip
            loss_sum.zero_()
            count = 0
            if done % args.eval_every == 0 or done == total:
                last = validate()
                row.update({k: round(v, 5) for k, v in last.items()})
                shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
                print(f"step {done}: train {train_loss:.4f}, {shown}", flush=True)
            row["elapsed_s"] = round(time.time() - start, 1)
            writer.writerow(row)
            log.flush()
            t0 = time.time()
        if done == total:
            break
    torch.save(model.state_dict(), out / "model.pt")
    trained = total * args.batch_size * args.seq_len
    metrics = {
        "final_val_loss": last["val_loss"],
        "final_val_bpb": last["val_bpb"],
        "final_extra_val": {
            k.removeprefix("val_loss_"): v for k, v in last.items() if k.startswith("val_loss_")
        },
        "steps": total,
        "finished": not stop,
        "bytes_trained": trained,
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.time() - start, 1),
        "bytes_per_s": round(trained / train_time),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if device.type == "cuda"
        else None,
        "num_params": sum(p.numel() for p in model.parameters()),
        "recipe": "their train.py: AdamW lr 1e-3 constant, weight decay 0.1, no warm-up, no clipping, "
        "random offsets, torch.compile, bf16 autocast",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"done: val {metrics['final_val_loss']:.4f} nats/byte; {metrics['bytes_per_s']:,} bytes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train and score several recipes at once on the lent GPU machine, within one command's time.

    python3 results/long-context/gpu_runs.py --out $OUT/runs.tar.gz --deadline 560 \
        'ref:0:' 'decay-t512:0:--batch_size 8 --seq_len 512 --half_lives 8,32,128,256'

Each NAME:GPU:FLAGS trains `experiment.py --fused` with the reference budget (3 epochs of
wiki.train.tokens) plus FLAGS into .gpu/runs/NAME on that GPU, then scores its last checkpoint with
evaluate.py: 128-byte windows of wiki.valid.raw (and a 2,000-byte sample with the whole text in
view), 128-byte windows of wiki.valid.tokens, 4,096-byte windows of wiki.valid.raw, and both files
read as one text (--stream). Runs on one GPU share it. A training still going at --train_deadline is
stopped with SIGTERM (it saves a checkpoint, which is then scored: its metrics say how far it got).
The small files (logs, metrics, plots, samples) go into one tar file (the machine returns few files).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

DATA = Path(".gpu/data")
RUNS = Path(".gpu/runs")
TOKENS = str(DATA / "wiki.valid.tokens")
TRAIN = shlex.split(
    f"--data_dir {DATA} --train_file {DATA / 'wiki.train.tokens'} --extra_val_file {TOKENS} "
    "--eval_every 2000 --no_progress"
)
SAMPLE = ["--prompt", " = Dragon = "] + shlex.split(
    "--max_new_bytes 2000 --temperature 0.8 --top_k 40 --seed 1337 --context 0"
)
EVALS = {  # folder: evaluate.py flags
    "eval-valid-raw-128": ["--seq_len", "128", *SAMPLE],
    "eval-valid-tokens-128": shlex.split(f"--data_file {TOKENS} --seq_len 128 --no_plots"),
    "eval-valid-raw-4096": shlex.split("--seq_len 4096 --chunk_size 4096 --batch_size 16"),
    "eval-valid-raw-stream": shlex.split("--stream --chunk_size 2048"),
    "eval-valid-tokens-stream": shlex.split(f"--data_file {TOKENS} --stream --chunk_size 2048 --no_plots"),
}
KEEP = (".csv", ".json", ".png", ".txt", ".log")


def chain(name: str, gpu: str, flags: str, t_start: float, args: argparse.Namespace) -> None:
    run = RUNS / name
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    device = ["--device", args.device, *(["--fused"] if args.device == "cuda" else [])]
    cmd = [sys.executable, "experiment.py", *device, *TRAIN, "--out_dir", str(run), "--overwrite"]
    cmd += shlex.split(flags)
    with open(run / "train.log", "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.time() - t_start > args.train_deadline:
                proc.send_signal(signal.SIGTERM)  # saves a checkpoint and stops
                proc.wait()
                break
            time.sleep(1)
    for folder, extra in EVALS.items():
        remaining = args.deadline - (time.time() - t_start)
        if remaining < 20:
            break
        cmd = [sys.executable, "evaluate.py", "--model_path", str(run), "--checkpoint", "last", "--data_dir",
               str(DATA), "--device", args.device, "--out_dir", str(run / folder), *extra]  # fmt: skip
        with open(run / f"{folder}.log", "w") as log:
            log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            try:
                subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=remaining - 10)
            except subprocess.TimeoutExpired:
                log.write("stopped: the command's time ran out\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME:GPU:FLAGS")
    p.add_argument("--out", required=True, help="tar.gz to write")
    p.add_argument("--deadline", type=float, default=560, help="seconds from start to writing the tar")
    p.add_argument("--train_deadline", type=float, default=450, help="seconds from start to stop training")
    p.add_argument("--device", default="cuda", help="cuda (fused training) or cpu (a smoke test)")
    p.add_argument("--also", default="", help="a shell command to run beside (e.g. the GPU tests)")
    args = p.parse_args()
    t_start = time.time()
    threads = []
    for spec in args.runs:
        name, gpu, flags = spec.split(":", 2)
        threads.append(threading.Thread(target=chain, args=(name, gpu, flags, t_start, args), daemon=True))
    side = None
    if args.also:
        side = subprocess.Popen(
            args.also, shell=True, stdout=open(RUNS / "also.log", "w"), stderr=subprocess.STDOUT
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, args.deadline - (time.time() - t_start)))
    if side is not None and side.poll() is None:
        side.kill()
    with tarfile.open(args.out, "w:gz") as tar:
        for path in sorted(RUNS.rglob("*")):
            if path.is_file() and path.suffix in KEEP and "checkpoints" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(RUNS)))
    print(f"wrote {args.out} after {time.time() - t_start:.0f} s")
    for spec in args.runs:
        name = spec.split(":", 1)[0]
        for f in [RUNS / name / "train.log", *(RUNS / name / f"{e}.log" for e in EVALS)]:
            if f.is_file():
                lines = f.read_text().strip().splitlines()
                print(f"== {f}: " + (lines[-1] if lines else "")[:300])
    return 0


if __name__ == "__main__":
    RUNS.mkdir(parents=True, exist_ok=True)
    sys.exit(main())

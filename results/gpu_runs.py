"""Train and score several runs at once on the lent GPU machine, within one command's time.

    python3 results/gpu_runs.py --out $OUT/runs.tar.gz --deadline 560 \
        'ref:0:--recipe reference' 'gpt:1:--arch gpt --recipe reference' 'authors:1:AUTHORS'

Each NAME:GPU:FLAGS trains `experiment.py` with the reference budget (3 epochs of wiki.train.tokens)
plus FLAGS into .gpu/runs/NAME on that GPU (BDH through `--fused`, `--arch gpt` compiled), then scores
its last checkpoint with evaluate.py: 128-byte windows of wiki.valid.raw (with a 2,000-byte sample
and, for BDH, the neuron graph), 128-byte windows of wiki.valid.tokens and, for BDH, 4,096-byte
windows of wiki.valid.raw (also with --shifts 16: each bucket over the same text) and both files read
as one text (--stream). FLAGS `AUTHORS [flags]` trains the paper authors' bdh.py instead
(results/report/authors_bdh.py, their file at .gpu/authors/bdh.py) and scores the .pt it saves. Runs
of the same GPU share it, and run one after another when separated by `;` (`'a:0:...;b:0:...'`).
`--evals none` skips the scoring (the training log's final validation has both files in 128-byte
windows); `--only NAME=FOLDER[,FOLDER]` scores run NAME with those alone. A training still going at
--train_deadline is stopped with SIGTERM (it saves a checkpoint, which is then scored: its metrics
say how far it got); `--resume` continues each run from its last checkpoint instead of starting it
anew (the machine keeps .gpu/runs between commands while it is warm), so that a run can span
commands. The small files (logs, metrics, plots, samples) go into one tar file (the machine returns
few files).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
from dragon_hatchling.cli import Parser, UsageError, out_file, run_command, timeout_seconds  # noqa: E402

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder of .gpu/runs, never . or ..
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
EVALS = {  # folder: evaluate.py flags, in the order they run: the targets first, so that a
    # command whose time runs out loses the secondary ones (16 KB windows) rather than the whole text
    "eval-valid-raw-128": ["--seq_len", "128", "--neuron_graph", *SAMPLE],
    "eval-valid-tokens-128": shlex.split(f"--data_file {TOKENS} --seq_len 128 --no_plots"),
    "eval-valid-raw-stream": shlex.split("--stream --chunk_size 2048"),
    "eval-valid-raw-4096-shifted": shlex.split(
        "--seq_len 4096 --chunk_size 4096 --batch_size 16 --shifts 16 --no_plots"
    ),
    "eval-valid-tokens-stream": shlex.split(f"--data_file {TOKENS} --stream --chunk_size 2048 --no_plots"),
    "eval-valid-raw-4096": shlex.split("--seq_len 4096 --chunk_size 4096 --batch_size 16"),
    "eval-valid-raw-16384": shlex.split("--seq_len 16384 --chunk_size 2048 --batch_size 4 --no_plots"),
}
WINDOW_EVALS = ("eval-valid-raw-128", "eval-valid-tokens-128")  # all a GPT without a memory can do
GPT_SAMPLE = ["--context", "512"]  # a GPT sees at most its block
KEEP = (".csv", ".json", ".png", ".txt", ".log", ".npy")  # .npy: --stream's loss of every byte


def chain(runs: list[tuple[str, str, str]], t_start: float, args: argparse.Namespace) -> None:
    """The runs of one chain (chain_spec's), one after another, on its first run's GPU."""
    gpu = runs[0][1]
    for name, _, flags in runs:
        run_one(name, gpu, flags, t_start, args)


def run_names(chains: list[list[tuple[str, str, str]]]) -> list[str]:
    """The names of every run of every chain, in order."""
    return [name for runs in chains for name, _, _ in runs]


def run_one(name: str, gpu: str, flags: str, t_start: float, args: argparse.Namespace) -> None:
    """Train run `name` on GPU `gpu` until it ends or --train_deadline, then score its last checkpoint."""
    run = RUNS / name
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    words = shlex.split(flags)
    cmd, model = training_command(run, words, args)
    with open(run / "train.log", "a" if args.resume else "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.time() - t_start > args.train_deadline:
                proc.send_signal(signal.SIGTERM)  # saves a checkpoint and stops
                proc.wait()
                break
            time.sleep(1)
    which = [] if words[:1] == ["AUTHORS"] else ["--checkpoint", "last"]
    for folder, extra in evaluations(name, words, args).items():
        remaining = args.deadline - (time.time() - t_start)
        if remaining < 20:
            break
        cmd = [sys.executable, "evaluate.py", "--model_path", model, *which, "--data_dir",
               str(DATA), "--device", args.device, "--out_dir", str(run / folder), *extra]  # fmt: skip
        score(run / f"{folder}.log", cmd, env, remaining - 10)


def training_command(run: Path, words: list[str], args: argparse.Namespace) -> tuple[list[str], str]:
    """The command that trains the run (experiment.py, or the authors' bdh.py after AUTHORS), and the
    path evaluate.py scores afterwards."""
    if words[:1] == ["AUTHORS"]:
        cmd = [sys.executable, "results/report/authors_bdh.py", "--bdh_py", ".gpu/authors/bdh.py",
               "--data_dir", str(DATA), "--train_file", str(DATA / "wiki.train.tokens"), "--extra_val_file",
               TOKENS, "--out_dir", str(run), "--device", args.device, *words[1:]]  # fmt: skip
        return cmd, str(run / "model.pt")
    fused = args.device == "cuda" and "gpt" not in words
    device = ["--device", args.device, *(["--fused"] if fused else [])]
    again = args.resume and (run / "checkpoints" / "last" / "training_state.pt").is_file()
    start = ["--resume", "auto"] if again else ["--overwrite"]
    return [sys.executable, "experiment.py", *device, *TRAIN, "--out_dir", str(run), *start, *words], str(run)


def evaluations(name: str, words: list[str], args: argparse.Namespace) -> dict[str, list[str]]:
    """The evaluations a run gets (EVALS; --evals, --only): a GPT has no neurons, and without a
    memory it reads windows of its block alone."""
    evals = {} if args.evals == "none" else EVALS
    if name in args.only:
        evals = {k: v for k, v in EVALS.items() if k in args.only[name]}
    if "gpt" in words:
        evals = {k: [*(f for f in v if f != "--neuron_graph"), *GPT_SAMPLE] if "--prompt" in v else v
                 for k, v in evals.items() if k in WINDOW_EVALS or "--memory" in words}  # fmt: skip
    return evals


def score(log_path: Path, cmd: list[str], env: dict, timeout: float) -> None:
    """Run one evaluation, its command at the top of its log; a timeout is logged, not raised."""
    with open(log_path, "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write("stopped: the command's time ran out\n")


def only_spec(item: str) -> tuple[str, list[str]]:
    """--only's NAME=FOLDER[,FOLDER]: a run's name and the evaluations it gets."""
    name, _, folders = item.partition("=")
    chosen = folders.split(",")
    if not name or not all(f in EVALS for f in chosen):
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER[,FOLDER] of {', '.join(EVALS)}, got {item!r}")
    return name, chosen


def chain_spec(item: str) -> list[tuple[str, str, str]]:
    """A positional NAME:GPU:FLAGS[;NAME:GPU:FLAGS...]: the runs of one chain, each (name, gpu, flags);
    a name is a folder of .gpu/runs, and the chain runs on its first run's GPU."""
    runs = [tuple(part.split(":", 2)) for part in item.split(";")]
    for run in runs:
        if len(run) != 3 or not NAME.fullmatch(run[0]) or not run[1].isdigit():
            raise argparse.ArgumentTypeError(
                f"expected NAME:GPU:FLAGS (NAME of letters, digits, ._- after the first), got {item!r}"
            )
    return runs


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument(
        "runs",
        nargs="+",
        type=chain_spec,
        help="NAME:GPU:FLAGS, or several joined by ; to run one after another",
    )
    p.add_argument("--out", type=out_file, required=True, help="tar.gz to write")
    p.add_argument(
        "--deadline", type=timeout_seconds, default=560, help="seconds from start to writing the tar"
    )
    p.add_argument(
        "--train_deadline", type=timeout_seconds, default=450, help="seconds from start to stop training"
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cuda (fused training) or cpu (a smoke test)",
    )
    p.add_argument("--also", default=None, help="a shell command to run beside (e.g. the GPU tests)")
    p.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    p.add_argument("--evals", choices=["all", "none"], default="all", help="score the runs afterwards (all)")
    p.add_argument("--only", action="append", default=[], type=only_spec, metavar="NAME=FOLDER[,FOLDER]",
                   help=f"score run NAME with these evaluations alone, of: {', '.join(EVALS)}")  # fmt: skip
    args = p.parse_args(argv)
    args.only, names = dict(args.only), run_names(args.runs)
    if len(set(names)) < len(names):
        raise UsageError(f"runs: expected each NAME once, got {', '.join(names)}")
    if not set(args.only) <= set(names):
        raise UsageError(f"--only: expected the NAME of a run, got {', '.join(set(args.only) - set(names))}")
    if args.train_deadline >= args.deadline:
        raise UsageError(f"--train_deadline: expected less than --deadline ({args.deadline:g} s)")
    return args


def run(argv: list[str] | None) -> None:
    args, t_start = parse(argv), time.time()
    threads = [threading.Thread(target=chain, args=(runs, t_start, args), daemon=True) for runs in args.runs]
    RUNS.mkdir(parents=True, exist_ok=True)
    side = args.also and subprocess.Popen(
        args.also, shell=True, stdout=open(RUNS / "also.log", "w"), stderr=subprocess.STDOUT
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, args.deadline - (time.time() - t_start)))
    if side and side.poll() is None:
        side.kill()
    names = run_names(args.runs)
    pack(args.out, names)
    print(f"wrote {args.out} after {time.time() - t_start:.0f} s")
    report(names)


def report(names: list[str]) -> None:
    """The last line of each run's training and evaluation logs."""
    for name in names:
        for f in [RUNS / name / "train.log", *(RUNS / name / f"{e}.log" for e in EVALS)]:
            if f.is_file():
                lines = f.read_text().strip().splitlines()
                print(f"== {f}: " + (lines[-1] if lines else "")[:300])


def pack(out: str | Path, names: list[str]) -> None:
    """The small files (KEEP) of this command's runs, and --also's log, into one tar. Runs of earlier
    commands on the same machine stay out: their files came back with those commands, and with
    them the tar could pass the 16 MiB a returned file may hold."""
    files = [RUNS / "also.log"] + [path for name in names for path in sorted((RUNS / name).rglob("*"))]
    with tarfile.open(out, "w:gz") as tar:
        for path in files:
            if path.is_file() and path.suffix in KEEP and "checkpoints" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(RUNS)))


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad arguments; the runs' own failures are in their logs."""
    run_command(run, argv, (UsageError,))


if __name__ == "__main__":
    main()

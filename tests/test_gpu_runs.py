"""results/gpu_runs.py: what a command's tar holds."""

from __future__ import annotations

import tarfile
import time
from argparse import Namespace
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "results/gpu_runs.py"


def test_a_commands_tar_holds_its_own_runs_small_files(tmp_path: Path, monkeypatch):
    """Only the runs this command named (an earlier command's run stays out), without checkpoints
    or files of other kinds, and the side command's log."""
    gpu_runs = load_script(SCRIPT)
    monkeypatch.setattr(gpu_runs, "RUNS", tmp_path / "runs")
    for name in ("earlier", "now"):
        (tmp_path / "runs" / name / "eval-valid-raw-stream" / "x").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "last").mkdir(parents=True)
        (tmp_path / "runs" / name / "log.csv").write_text("step\n")
        (tmp_path / "runs" / name / "eval-valid-raw-stream" / "byte_losses.npy").write_bytes(b"0")
        (tmp_path / "runs" / name / "checkpoints" / "last" / "config.json").write_text("{}")
        (tmp_path / "runs" / name / "model.safetensors").write_bytes(b"0")
    (tmp_path / "runs" / "also.log").write_text("tests\n")
    gpu_runs.pack(tmp_path / "out.tar.gz", ["now"])
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["also.log", "now/eval-valid-raw-stream/byte_losses.npy", "now/log.csv"]


def test_a_run_trains_then_scores_its_last_checkpoint(tmp_path: Path, small_data: Path, monkeypatch):
    """run_one on the CPU with a tiny model: experiment.py then evaluate.py, each command at the top
    of its log; a GPT gets no neuron graph and, without a memory, no stream."""
    gpu_runs = load_script(SCRIPT)
    monkeypatch.setattr(gpu_runs, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(gpu_runs, "DATA", small_data)
    monkeypatch.setattr(gpu_runs, "TRAIN", ["--data_dir", str(small_data), "--no_progress"])
    monkeypatch.chdir(SCRIPT.parents[1])  # the scripts run from the repository's root
    args = Namespace(device="cpu", deadline=200, train_deadline=100, resume=False, evals="all",
                     only={"tiny": ["eval-valid-raw-stream"]})  # fmt: skip
    tiny = "--n_embd 16 --n_head 2 --n_neurons 64 --n_layer 1 --batch_size 2 --seq_len 32 --max_steps 2"
    gpu_runs.run_one("tiny", "0", tiny, time.time(), args)
    run = tmp_path / "runs" / "tiny"
    assert "experiment.py --device cpu --data_dir" in (run / "train.log").read_text().splitlines()[0]
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    log = (run / "eval-valid-raw-stream.log").read_text().splitlines()
    assert "evaluate.py --model_path" in log[0] and "--checkpoint last" in log[0] and "--stream" in log[0]
    assert (run / "eval-valid-raw-stream" / "metrics.json").is_file()
    everything = Namespace(evals="all", only={})
    assert "eval-valid-raw-stream" not in gpu_runs.evaluations("gpt", ["--arch", "gpt"], everything)
    windows = gpu_runs.evaluations("gpt", ["--arch", "gpt"], everything)["eval-valid-raw-128"]
    assert "--neuron_graph" not in windows and "--context" in windows

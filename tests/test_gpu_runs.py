"""results/gpu_runs.py: what a command's tar holds."""

from __future__ import annotations

import tarfile
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

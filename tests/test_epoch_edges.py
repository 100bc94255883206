"""Epoch edges: every step trains exactly --batch_size windows, whatever the epoch's random shift
left (tests/test_distributed.py runs the same edges in two processes)."""

import csv
import json

import pytest

import experiment
from conftest import TINY_MODEL, call_main


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_every_step_trains_a_whole_batch_across_epochs(
    batch, edge_train, small_data, tmp_path, capsys, monkeypatch
):
    seen = []
    real = experiment.windows_at

    def recording(data, offsets, seq_len, copies=None):
        seen.append(len(offsets))
        return real(data, offsets, seq_len, copies)

    monkeypatch.setattr(experiment, "windows_at", recording)
    run = tmp_path / "run"
    argv = ["--device", "cpu", "--data_dir", str(small_data), "--train_file", str(edge_train), *TINY_MODEL,
            "--out_dir", str(run), "--batch_size", str(batch), "--seq_len", "32", "--epochs", "4",
            "--eval_every", "1000", "--log_every", "1", "--no_progress"]  # fmt: skip
    result = call_main(experiment.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    steps = 4 * (12 // batch)
    assert seen == [batch] * steps  # every step, the last of each epoch too
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["bytes_trained"] == steps * batch * 32
    with open(run / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, steps + 1))

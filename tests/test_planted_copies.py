"""results/tbptt/planted_copies.py: windows with a span of their own text planted again later in them,
and the loss at each reading of the span."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import call_main, load_script
from model import BDH, BDHConfig
from test_cli import assert_clean_error

SCRIPT = Path(__file__).resolve().parent.parent / "results/tbptt/planted_copies.py"


def test_each_window_holds_its_span_twice():
    pc = load_script(SCRIPT)
    data = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8)
    x, y, plan = pc.planted(data, 256, 8, seed=3)
    whole = np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1)  # each window's T + 1 bytes
    for row, (length, source, target) in enumerate(plan):
        first, second = whole[row, source : source + length], whole[row, target : target + length]
        assert length >= 8 and np.array_equal(first, second)
        assert np.array_equal(whole[row, :target], data[row * 256 : row * 256 + target])  # the text before it


def test_readings_take_the_bytes_after_each_readings_first():
    pc = load_script(SCRIPT)
    plan = np.array([[10, 5, 40], [20, 100, 600]])
    losses = np.ones((2, 1024))
    for row, (length, source, target) in enumerate(plan):
        losses[row, source - 1] = losses[row, target - 1] = 9.0  # the span's first byte: not counted
        losses[row, source : source + length - 1] = 4.0
        losses[row, target : target + length - 1] = 0.5
    table = pc.readings(losses, plan)
    assert table.tolist() == [[35, 10, 4.0, 0.5], [500, 20, 4.0, 0.5]]
    result = pc.summary(table)
    assert result["all"] == {"windows": 2, "first": 4.0, "second": 0.5}
    assert set(result["by_distance"]) == {"0-63", "256-1023"}
    assert set(result["by_length"]) == {"0-15", "16-63"}


def test_the_script_scores_a_model_and_refuses_what_it_cannot_measure(tmp_path: Path, capsys):
    BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=1)).save_pretrained(tmp_path / "m")
    (tmp_path / "text").write_bytes(bytes(range(256)) * 20)
    paths = ["--model_path", str(tmp_path / "m"), "--data_file", str(tmp_path / "text")]
    cmd = [sys.executable, str(SCRIPT), *paths, "--device", "cpu", "--seq_len", "64"]
    done = subprocess.run(
        [*cmd, "--windows", "20", "--out", str(tmp_path / "o.json")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["all"]["windows"] == 20 and 0 < result["all"]["first"] < 10
    assert sum(b["windows"] for b in result["by_length"].values()) == 20
    pc = load_script(SCRIPT)
    for flags, says in ((["--windows", "100"], "holds 79 windows"), (["--seq_len", "14"], "--seq_len 14")):
        assert_clean_error(call_main(pc.main, [*cmd[2:], *flags], capsys), says)

"""results/tbptt/copy_probe.py: the synthetic copying task and its scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import call_main, load_script
from test_cli import assert_clean_error

SCRIPT = Path(__file__).resolve().parent.parent / "results/tbptt/copy_probe.py"


def test_windows_repeat_their_string_and_a_copier_scores_zero_on_the_copy():
    cp = load_script(SCRIPT)
    w = cp.windows(5, 7, torch.Generator().manual_seed(0))
    assert w.shape == (5, 16) and torch.equal(w[:, :7], w[:, 8:15])
    assert (w[:, 7] == ord("|")).all() and (w[:, 15] == ord("\n")).all()

    class Copier(torch.nn.Module):  # knows the windows: certain of every byte, as a perfect copier is
        def forward(self, idx):
            full = w[: idx.shape[0], 1 : idx.shape[1] + 1]
            return (torch.nn.functional.one_hot(full, 256).float() * 100.0,)

    first, copy = cp.copy_loss(Copier(), w, 7)
    assert first < 1e-6 and copy < 1e-6


def test_the_probe_trains_each_model_and_refuses_bad_flags(tmp_path: Path, capsys):
    out = tmp_path / "probe.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--steps",
        "2",
        "--eval_every",
        "1",
        "--length",
        "4",
        "--n_embd",
        "16",
    ]
    done = subprocess.run([*cmd, "--only", "bdh-decay", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    curve = result["models"]["bdh-decay"]["curve"]
    assert list(result["models"]) == ["bdh-decay"] and [row["step"] for row in curve] == [0, 1, 2]
    assert curve[-1]["first"] < curve[0]["first"]  # it learns the letters' frequencies
    probe = load_script(SCRIPT)
    for bad, needle in (
        (["--only", "rnn"], "--only"),
        (["--lr", "nan"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--length", "257"], "--length"),
        (["--batch_size", str(10**12)], "--batch_size"),
        (["--n_embd", "6"], "--n_embd"),
        (["--n_embd", "516"], "--n_embd"),
    ):
        assert_clean_error(call_main(probe.main, [*cmd[2:], *bad], capsys), needle)

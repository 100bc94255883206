"""results/report/authors_bdh.py: training the paper authors' model on our bytes, scored our way.

Their bdh.py is not in this repository; a stand-in with its interface (BDHConfig with their field
names, BDH(config)(idx, targets) -> (logits, loss)) takes its place.
"""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from conftest import call_main, load_script
from test_cli import assert_clean_error

SCRIPT = Path(__file__).resolve().parent.parent / "results/report/authors_bdh.py"

STANDIN = """
import torch
from torch.nn import functional as F


class BDHConfig:
    def __init__(self, n_layer=6, n_embd=256, mlp_internal_dim_multiplier=128, vocab_size=256):
        self.n_embd, self.vocab_size = n_embd, vocab_size


class BDH(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.head = torch.nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(self.embed(idx))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
"""


@pytest.fixture
def their_main(monkeypatch):
    """The script's main in this process: its SIGTERM handler left out, its TF32 switch put back."""
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield load_script(SCRIPT).main
    torch.backends.cuda.matmul.allow_tf32 = tf32


def test_their_model_trains_logs_and_saves_what_it_scored(tmp_path: Path, small_data: Path, their_main):
    """--smoke on the CPU: a log row at each --eval_every with both validation texts, metrics.json
    holding the last row's losses, and their state dict saved, which loads into their model again."""
    (tmp_path / "bdh.py").write_text(STANDIN)
    out = tmp_path / "run"
    argv = ["--bdh_py", str(tmp_path / "bdh.py"), "--data_dir", str(small_data), "--out_dir", str(out),
            "--train_file", str(small_data / "wiki.train.raw"), "--device", "cpu", "--smoke",
            "--extra_val_file", str(small_data / "wiki.test.raw"), "--eval_every", "10",
            "--batch_size", "4", "--seq_len", "32"]  # fmt: skip
    assert their_main(argv) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in rows] == ["10", "20"]
    assert [r["bytes_seen"] for r in rows] == ["1280", "2560"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["finished"] and metrics["bytes_trained"] == 2560
    assert math.isclose(metrics["final_val_loss"], float(rows[-1]["val_loss"]), abs_tol=1e-5)
    extra = metrics["final_extra_val"]["wiki_test_raw"]
    assert math.isclose(extra, float(rows[-1]["val_loss_wiki_test_raw"]), abs_tol=1e-5)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) < math.log(256) + 0.5
    assert math.isclose(metrics["final_val_bpb"], metrics["final_val_loss"] / math.log(2))
    their = load_script(tmp_path / "bdh.py")
    model = their.BDH(their.BDHConfig(n_layer=2, n_embd=32, mlp_internal_dim_multiplier=8))
    model.load_state_dict(torch.load(out / "model.pt"))


BAD = [  # (flags replacing the good ones, what the one line must name)
    (["--batch_size", "0"], ["--batch_size", "positive"]),
    (["--seq_len", "x"], ["--seq_len"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--eval_every", "1.5"], ["--eval_every"]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", ""], ["--device", "empty"]),
    (["--data_dir", "/nonexistent/wikitext"], ["--data_dir", "/nonexistent/wikitext"]),
    (["--train_file", "absent.raw"], ["--train_file", "absent.raw", "does not exist"]),
    (["--train_file", "short.raw"], ["--train_file", "--batch_size 4", "3 windows"]),
    (["--seq_len", "1000000"], ["--train_file", "0 windows"]),
    (["--extra_val_file", "short.raw"], ["--extra_val_file", "shorter than one window of 129 bytes"]),
    (["--bdh_py", "notes.txt"], ["--bdh_py", "expected their bdh.py"]),
    (["--bdh_py", "empty.py"], ["--bdh_py", "has no BDH and BDHConfig"]),
    (["--bdh_py", "broken.py"], ["--bdh_py", "could not be imported (ZeroDivisionError"]),
    (["--out_dir", "notes.txt"], ["--out_dir", "is a file"]),
]


@pytest.mark.parametrize("bad, needles", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_flags_and_files_end_in_one_line_before_training(
    bad, needles, tmp_path, small_data, capsys, their_main, monkeypatch
):
    """Every flag's bad values and every file's bad contents: one line naming it, exit 2, no log."""
    monkeypatch.chdir(tmp_path)
    Path("bdh.py").write_text(STANDIN)
    Path("empty.py").write_text("x = 1\n")
    Path("broken.py").write_text("1 / 0\n")
    Path("notes.txt").write_text("not a model\n")
    Path("short.raw").write_bytes((small_data / "wiki.train.raw").read_bytes()[:100])
    good = {"--bdh_py": "bdh.py", "--data_dir": str(small_data), "--out_dir": "run", "--device": "cpu",
            "--train_file": str(small_data / "wiki.train.raw"), "--batch_size": "4",
            "--seq_len": "32"}  # fmt: skip
    flags = {**good, **dict(zip(bad[::2], bad[1::2], strict=True))}
    ran = call_main(their_main, [*(w for kv in flags.items() for w in kv), "--smoke"], capsys)
    assert_clean_error(ran, *needles)
    assert not Path("run", "log.csv").exists()

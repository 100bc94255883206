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

import torch

from conftest import load_script

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


def test_their_model_trains_logs_and_saves_what_it_scored(tmp_path: Path, small_data: Path, monkeypatch):
    """--smoke on the CPU: a log row at each --eval_every with both validation texts, metrics.json
    holding the last row's losses, and their state dict saved, which loads into their model again.
    In this process (its SIGTERM handler and TF32 switch put back afterwards)."""
    (tmp_path / "bdh.py").write_text(STANDIN)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    out = tmp_path / "run"
    argv = ["--bdh_py", str(tmp_path / "bdh.py"), "--data_dir", str(small_data), "--out_dir", str(out),
            "--train_file", str(small_data / "wiki.train.raw"), "--device", "cpu", "--smoke",
            "--extra_val_file", str(small_data / "wiki.test.raw"), "--eval_every", "10",
            "--batch_size", "4", "--seq_len", "32"]  # fmt: skip
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        code = load_script(SCRIPT).main(argv)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert code == 0
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

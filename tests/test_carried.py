"""Truncated backpropagation through time (--carry_state, carried.py): the stream order, the state
carried across steps and restored on --resume, and GPTXL's memory trained the same way."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import experiment
from conftest import tiny_run
from dragon_hatchling import carried as carried_py
from dragon_hatchling.carried import Carried, stream_offsets, stream_steps
from dragon_hatchling.checkpoints import CARRIED_STATE
from model import BDH, BDHConfig
from test_cli import assert_clean_error
from test_reliability import interrupt_at_step, logged, train

FLAGS = (
    "--batch_size 4 --seq_len 32 --warmup_steps 3 --log_every 4 --max_steps 20 --eval_every 12 --carry_state"
)
STREAM = ("train_loss", "val_loss", "val_loss_stream", "val_loss_stream_edge_train", "x_nonzero")


@pytest.mark.parametrize("n, T, B", [(60_000, 32, 4), (1000, 7, 3), (390, 32, 4)])
def test_each_row_reads_its_own_stretch_in_order(n, T, B):
    """Row i's window of step k+1 starts where its window of step k ended; the rows never overlap,
    every target lies in the text, and each epoch starts at a shift of its own below T."""
    steps = stream_steps(n, T, B)
    assert steps >= 1
    for epoch in range(4):
        starts = np.array([stream_offsets(n, T, B, epoch, 7, k) for k in range(steps)])  # steps, B
        assert (np.diff(starts, axis=0) == T).all()  # one window a step, in order
        assert (starts[-1] + T + 1 <= n).all()  # the last target is in the text
        assert (starts[-1, :-1] + T <= starts[0, 1:]).all()  # row i ends before row i+1 begins
        assert 0 <= starts[0, 0] < T
    shifts = {int(stream_offsets(n, T, B, e, 7, 0)[0]) for e in range(8)}
    assert len(shifts) > 1  # the shift is drawn anew each epoch


def test_carried_windows_compute_the_text_read_in_one_pass():
    """Two calls of Carried on consecutive windows give the logits of one chunked pass over both
    (the state detached, its values carried); reset() starts the next call from nothing."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0, half_lives=[4.0, 64.0]))
    idx = torch.randint(0, 256, (3, 40))
    step = Carried(model)
    first, _ = step(idx[:, :20])
    second, _ = step(idx[:, 20:])
    whole, _, state = model.forward_chunked(idx, chunk_size=20)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    assert not any(t.requires_grad for t in step.state.layers) and step.state.pos.item() == 40
    restored = Carried(model)
    restored.restore(step.tensors(), torch.device("cpu"))
    torch.testing.assert_close(restored(idx[:, :20])[0], model.forward_chunked(idx[:, :20], state=state)[0])
    step.reset()
    torch.testing.assert_close(step(idx[:, :20])[0], first)


WHAT = {
    "bdh": "--reset_state article --article_order shuffled",
    "gpt": "--arch gpt --n_layer 2 --n_embd 32 --n_head 2 --memory 48",
}


@pytest.mark.parametrize("arch, stop_at", [("bdh", 6), ("gpt", 12)])  # in an interval, at a validation
def test_a_resumed_carried_run_logs_what_an_unstopped_one_logs(
    arch, stop_at, tmp_path, small_data, edge_train, capsys, monkeypatch
):
    """The carried state (BDH's with article resets and the articles shuffled, GPTXL's memory) is saved
    with the checkpoint and restored on --resume: the same training and stream losses row for row as a
    run never stopped."""
    gpt = WHAT[arch]
    flags = f"{FLAGS} {gpt} --extra_val_file {edge_train}"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = tiny_run(small_data, whole, flags)
    argv = argv if arch == "bdh" else [a for a in argv if a not in ("--n_neurons", "128")]
    assert train(argv, capsys).returncode == 0
    interrupt_at_step(monkeypatch, stop_at)
    cut = [a if a != str(whole) else str(parts) for a in argv]
    assert train(cut, capsys).returncode == 130
    saved = load_file(parts / "checkpoints" / "last" / CARRIED_STATE)
    assert saved and all(t.shape[0] == 4 for t in saved.values() if t.ndim)  # every row's state
    monkeypatch.undo()
    assert train([*cut, "--resume", "auto"], capsys).returncode == 0
    assert logged(parts, STREAM) == logged(whole, STREAM)
    assert logged(whole, STREAM)[-1][3]  # the stream was validated
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["args"]["carry_state"] and "stream" in metrics["final_extra_val"]


def test_the_state_starts_empty_at_each_epoch(tmp_path, small_data, edge_train, capsys, monkeypatch):
    """On a train file of 2 steps an epoch, the state is emptied before steps 0, 2, 4, ..."""
    resets = []
    real = experiment.training_batch
    monkeypatch.setattr(
        carried_py.Carried, "reset", lambda self: resets.append(None) or setattr(self, "state", None)
    )

    def batch(run, step, *rest):
        resets.append(step)
        return real(run, step, *rest)

    monkeypatch.setattr(experiment, "training_batch", batch)
    flags = f"{FLAGS} --train_file {edge_train} --max_steps 7 --eval_every 7"
    assert train(tiny_run(small_data, tmp_path / "run", flags), capsys).returncode == 0
    before = [resets[i + 1] for i, r in enumerate(resets) if r is None]  # the steps that follow a reset
    assert before == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--arch gpt --carry_state", "--carry_state carries a GPT's memory"),
        ("--arch gpt --memory 64 --no_carry_state", "leave out --no_carry_state"),
        ("--memory 64", "--memory is not a flag of --arch bdh"),
        ("--arch gpt --memory -1", "--memory"),
        ("--arch gpt --memory 64 --position learned", "position 'alibi'"),
        ("--arch gpt --position sideways", "--position"),
        ("--carry_state --compile", "leave out --compile"),
        ("--carry_state --batch_size 2000 --seq_len 32", "--carry_state: train data of 60000 bytes"),
        ("--carry_state --carry_state=1", "--carry_state"),
        ("--reset_state article", "needs --carry_state and BDH"),
        ("--arch gpt --memory 64 --reset_state article", "needs --carry_state and BDH"),
        ("--carry_state --reset_state title", "--reset_state"),
        ("--article_order shuffled", "needs --carry_state"),
        ("--carry_state --article_order random", "--article_order"),
    ],
)
def test_carried_flags_that_cannot_run_are_one_line(flags, says, tmp_path, small_data, capsys):
    argv = tiny_run(small_data, tmp_path / "run", f"--max_steps 2 {flags}")
    if "gpt" in flags:
        argv = [a for a in argv if a not in ("--n_neurons", "128")]
    assert_clean_error(train(argv, capsys), says)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_a_carried_run_without_carrying_is_refused(tmp_path, small_data, capsys, monkeypatch):
    interrupt_at_step(monkeypatch, 3)
    run = tmp_path / "run"
    assert train(tiny_run(small_data, run, FLAGS), capsys).returncode == 130
    monkeypatch.undo()
    argv = tiny_run(small_data, run, FLAGS.replace("--carry_state", "--no_carry_state") + " --resume auto")
    assert_clean_error(train(argv, capsys), "--carry_state False (checkpoint: True)")


def test_articles_are_found_and_the_windows_that_hold_them():
    text = np.frombuffer(b" = A = \n x\n = = Sub = = \n y\n = B = \n z", dtype=np.uint8)
    starts = carried_py.article_starts(text)
    assert starts.tolist() == [0, 28]  # the second-level heading starts no article
    windows = carried_py.holds_a_start(starts, np.array([0, 1, 25, 27, 29]), 2)
    assert windows.tolist() == [True, False, False, True, False]


def test_shuffled_articles_are_the_same_articles_in_a_new_order_each_epoch():
    text = np.frombuffer(b"head\n = A = \n a\n = B = \n bb\n = C = \n ccc\n = D = \n dddd\n", dtype=np.uint8)
    starts = carried_py.article_starts(text)
    orders = set()
    for epoch in range(6):
        shuffled, new_starts = carried_py.shuffled_articles(text, starts, seed=3, epoch=epoch)
        assert bytes(shuffled[:5]) == b"head\n"  # what comes before the first article stays first
        assert new_starts.tolist() == carried_py.article_starts(shuffled).tolist()
        pieces = np.split(shuffled, new_starts)
        assert sorted(map(bytes, pieces[1:])) == sorted(map(bytes, np.split(text, starts)[1:]))
        orders.add(bytes(shuffled))
    assert len(orders) > 1  # drawn anew each epoch
    again, _ = carried_py.shuffled_articles(text, starts, seed=3, epoch=5)
    assert bytes(again) == bytes(shuffled)  # and the same for a seed and an epoch


def test_shuffling_a_text_without_articles_is_refused(tmp_path, small_data, capsys):
    plain = tmp_path / "plain.train"
    plain.write_bytes(b"no headings here. " * 400)
    argv = tiny_run(small_data, tmp_path / "run", f"{FLAGS} --article_order shuffled --train_file {plain}")
    assert_clean_error(train(argv, capsys), "--article_order shuffled", "0 article(s)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reset_rows_empties_those_rows_alone():
    """After reset_rows, row 0 reads its next window as from nothing (an empty state: only distances
    count) and row 1 goes on as it was."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0, half_lives=[4.0, 64.0]))
    idx = torch.randint(0, 256, (2, 30))
    step, kept = Carried(model), Carried(model)
    for c in (step, kept):
        c(idx[:, :15])
    step.reset_rows(torch.tensor([True, False]))
    after, going_on = step(idx[:, 15:])[0], kept(idx[:, 15:])[0]
    torch.testing.assert_close(after[1], going_on[1])
    torch.testing.assert_close(after[0], model(idx[:1, 15:])[0][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["text", "shuffled"])
def test_rows_reset_where_their_windows_hold_an_article_start(
    order, tmp_path, small_data, capsys, monkeypatch
):
    """--reset_state article: every step empties the rows whose window holds an article's first line
    (of the epoch's text: with --article_order shuffled, the articles in their new order)."""
    seen = []
    real = carried_py.Carried.reset_rows
    monkeypatch.setattr(
        carried_py.Carried, "reset_rows", lambda self, rows: seen.append(rows.tolist()) or real(self, rows)
    )
    flags = f"{FLAGS} --reset_state article --max_steps 60 --eval_every 60 --batch_size 2 --seq_len 256"
    assert (
        train(tiny_run(small_data, tmp_path / "run", f"{flags} --article_order {order}"), capsys).returncode
        == 0
    )
    text = np.frombuffer((small_data / "wiki.train.raw").read_bytes(), dtype=np.uint8)
    starts = carried_py.article_starts(text)
    if order == "shuffled":
        text, starts = carried_py.shuffled_articles(text, starts, 1337, 0)
    want = [
        carried_py.holds_a_start(starts, stream_offsets(len(text), 256, 2, 0, 1337, k), 256).tolist()
        for k in range(60)
    ]
    assert seen == want and sum(map(sum, want)) >= 1  # some row met an article

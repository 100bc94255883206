"""--copy_spans: copying mixed into training (data.copy_plan): spans repeated inside their own window,
drawn from (seed, step) alone, so that a resumed run and any number of ranks train the same bytes."""

import numpy as np
import pytest
import torch

from conftest import tiny_run
from dragon_hatchling.data import MIN_COPY, copy_plan, windows_at
from dragon_hatchling.distributed import Ranks, share
from test_cli import assert_clean_error
from test_reliability import interrupt_at_step, logged, train

FLAGS = "--batch_size 4 --seq_len 32 --warmup_steps 3 --log_every 4 --max_steps 12 --eval_every 12"


@pytest.mark.parametrize("seq_len", [15, 16, 33, 128, 1024])
def test_each_span_and_its_copy_lie_in_the_window_one_after_the_other(seq_len):
    size = seq_len + 1
    plans = np.concatenate([copy_plan(8, seq_len, 1.0, seed=3, step=k) for k in range(200)])
    length, source, target = plans.T
    assert (length >= MIN_COPY).all() and (length <= max(MIN_COPY, size // 4)).all()
    assert (source >= 0).all() and (source + length <= target).all() and (target + length <= size).all()
    assert len(set(length.tolist())) > 1 or size // 4 <= MIN_COPY  # drawn, where the window allows
    assert len(set((target - source).tolist())) > 1 or size == 2 * MIN_COPY


def test_the_fraction_of_windows_with_a_copy():
    def copied(fraction):
        return np.mean([copy_plan(32, 128, fraction, seed=1, step=k)[:, 0] > 0 for k in range(100)])

    assert copied(0.0) == 0 and copied(1.0) == 1
    assert 0.45 < copied(0.5) < 0.55


def test_a_plan_is_drawn_from_the_seed_and_step_alone():
    a = copy_plan(16, 128, 0.5, seed=7, step=5)
    assert np.array_equal(a, copy_plan(16, 128, 0.5, seed=7, step=5))
    assert not np.array_equal(a, copy_plan(16, 128, 0.5, seed=7, step=6))
    assert not np.array_equal(a, copy_plan(16, 128, 0.5, seed=8, step=5))


def test_windows_repeat_their_spans_and_nothing_else():
    text = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8)
    offsets, T = [0, 700, 3000, 9000], 128
    plan = copy_plan(4, T, 1.0, seed=2, step=0)
    plain_x, plain_y = windows_at(text, offsets, T)
    x, y = windows_at(text, offsets, T, plan)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are still the inputs moved by one
    for row, (length, source, target) in enumerate(plan):
        whole = np.concatenate([x[row].numpy(), y[row, -1:].numpy()])  # the window's T + 1 bytes
        plain = np.concatenate([plain_x[row].numpy(), plain_y[row, -1:].numpy()])
        assert np.array_equal(whole[target : target + length], plain[source : source + length])
        outside = np.ones(T + 1, bool)
        outside[target : target + length] = False
        assert np.array_equal(whole[outside], plain[outside])


def test_ranks_share_the_batch_and_its_copies_alike():
    """Under torchrun each rank takes its share of the offsets and of the same plan: together they
    make the one-process batch."""
    text = np.random.default_rng(1).integers(0, 256, 5_000).astype(np.uint8)
    offsets, plan = np.array([10, 900, 2000, 4000]), copy_plan(4, 64, 1.0, seed=3, step=9)
    whole, _ = windows_at(text, offsets, 64, plan)
    parts = [windows_at(text, share(offsets, Ranks(r, 2)), 64, share(plan, Ranks(r, 2)))[0] for r in range(2)]
    assert np.array_equal(np.concatenate(parts), whole.numpy())


def test_copies_change_training_and_a_resumed_run_trains_the_same_bytes(tmp_path, small_data, capsys,
                                                                        monkeypatch):  # fmt: skip
    plain, whole, parts = tmp_path / "plain", tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_run(small_data, plain, FLAGS), capsys).returncode == 0
    assert train(tiny_run(small_data, whole, f"{FLAGS} --copy_spans 0.5"), capsys).returncode == 0
    assert [r[1] for r in logged(whole)] != [r[1] for r in logged(plain)]  # the train losses differ
    assert logged(whole)[-1][2] != logged(plain)[-1][2]  # validation reads the same text, other weights
    interrupt_at_step(monkeypatch, 6)
    assert train(tiny_run(small_data, parts, f"{FLAGS} --copy_spans 0.5"), capsys).returncode == 130
    monkeypatch.undo()
    resumed = train(tiny_run(small_data, parts, f"{FLAGS} --resume auto"), capsys)  # keeps its 0.5
    assert resumed.returncode == 0
    assert logged(parts) == logged(whole)
    refused = train(tiny_run(small_data, parts, f"{FLAGS} --copy_spans 0.25 --resume auto"), capsys)
    assert_clean_error(refused, "--copy_spans 0.25 (checkpoint: 0.5)")


def test_a_window_too_short_for_a_span_and_its_copy_is_refused(tmp_path, small_data, capsys):
    result = train(tiny_run(small_data, tmp_path / "r", f"{FLAGS} --seq_len 14 --copy_spans 0.5"), capsys)
    assert_clean_error(result, "--copy_spans", "--seq_len 15 or more, got 14")
    assert not (tmp_path / "r").exists()
    shortest = train(tiny_run(small_data, tmp_path / "r", f"{FLAGS} --seq_len 15 --copy_spans 1"), capsys)
    assert shortest.returncode == 0


def test_a_run_from_before_copy_spans_copied_nothing_and_resumes_so(
    tmp_path, small_data, capsys, monkeypatch
):
    """A checkpoint whose args lack copy_spans (saved before the flag) resumes without copies, and
    refuses --copy_spans as it refuses any flag that disagrees with the run."""
    run = tmp_path / "run"
    interrupt_at_step(monkeypatch, 6)
    assert train(tiny_run(small_data, run, FLAGS), capsys).returncode == 130
    monkeypatch.undo()
    path = run / "checkpoints" / "last" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    del state["args"]["copy_spans"]
    torch.save(state, path)
    refused = train(tiny_run(small_data, run, f"{FLAGS} --copy_spans 0.5 --resume auto"), capsys)
    assert_clean_error(refused, "--copy_spans 0.5 (checkpoint: 0.0)")
    assert train(tiny_run(small_data, run, f"{FLAGS} --resume auto"), capsys).returncode == 0

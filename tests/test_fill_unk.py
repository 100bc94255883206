"""--fill_unk: the train text's <unk> tokens replaced by words that occur exactly 3 times in it, drawn
once from the seed (data.fill_unknowns); validation reads its text as it is."""

import re

import numpy as np
import pytest

from conftest import tiny_run
from dragon_hatchling import data
from dragon_hatchling.data import FILL_COUNT, UNKNOWN, fill_unknowns
from test_cli import assert_clean_error
from test_copies import FLAGS
from test_reliability import interrupt_at_step, logged, train


def tokens_text(n_unk: int = 400) -> bytes:
    """Words of three kinds: common (many times), rare (exactly 3 times: the stand-ins), and <unk>."""
    rng = np.random.default_rng(0)
    common = [b"the", b"of", b"and", b"Dragon"]
    rare = [b"Calakmul", b"1630s", b"prudence"]
    words = [common[i] for i in rng.integers(0, 4, 4000)] + rare * FILL_COUNT + [UNKNOWN] * n_unk
    rng.shuffle(words)
    lines = [b" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    return b" \n ".join(lines) + b" \n"


def as_array(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def test_every_unknown_becomes_a_word_of_the_pool_and_nothing_else_changes():
    text = tokens_text()
    filled, count = fill_unknowns(as_array(text), 1.0, seed=3)
    out = filled.tobytes()
    assert count == 400 and UNKNOWN not in out
    pool = b"(Calakmul|1630s|prudence)"  # the words that occur exactly 3 times
    shape = pool.join(re.escape(piece) for piece in text.split(UNKNOWN))  # the text around each <unk>
    match = re.fullmatch(shape, out)
    assert match is not None
    assert set(match.groups()) == {b"Calakmul", b"1630s", b"prudence"}  # each stand-in drawn


def test_the_fill_is_drawn_from_the_seed_alone_at_its_fraction():
    text = as_array(tokens_text(2000))
    a, count = fill_unknowns(text, 0.5, seed=1)
    assert 900 < count < 1100
    assert a.tobytes().count(UNKNOWN) == 2000 - count
    assert np.array_equal(a, fill_unknowns(text, 0.5, seed=1)[0])
    assert not np.array_equal(a, fill_unknowns(text, 0.5, seed=2)[0])
    none, zero = fill_unknowns(text, 0.0, seed=1)
    assert zero == 0 and np.array_equal(none, text)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"the of and the of \n" * 50, "holds no <unk> tokens"),
        (b"the <unk> of the of \n" * 50, "no word that occurs exactly 3 times"),
        (b"", "holds no <unk> tokens"),
    ],
)
def test_a_text_it_cannot_fill_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        fill_unknowns(as_array(text), 1.0, seed=0)


def test_a_text_too_large_to_hold_twice_in_memory_is_refused(monkeypatch):
    text = as_array(tokens_text())
    monkeypatch.setattr(data, "FILL_LIMIT", len(text) - 1)
    with pytest.raises(ValueError, match=f"{len(text):,} bytes"):
        fill_unknowns(text, 1.0, seed=0)
    monkeypatch.setattr(data, "FILL_LIMIT", len(text))
    assert fill_unknowns(text, 1.0, seed=0)[1] == 400  # at the limit


def test_training_fills_the_train_text_and_a_resumed_run_keeps_it(tmp_path, small_data, capsys, monkeypatch):
    plain, whole, parts = tmp_path / "plain", tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_run(small_data, plain, FLAGS), capsys).returncode == 0
    run = train(tiny_run(small_data, whole, f"{FLAGS} --fill_unk 1"), capsys)
    assert run.returncode == 0 and "<unk> filled" in run.stdout
    assert [r[1] for r in logged(whole)] != [r[1] for r in logged(plain)]  # other training bytes
    interrupt_at_step(monkeypatch, 6)
    assert train(tiny_run(small_data, parts, f"{FLAGS} --fill_unk 1"), capsys).returncode == 130
    monkeypatch.undo()
    assert train(tiny_run(small_data, parts, f"{FLAGS} --resume auto"), capsys).returncode == 0
    assert logged(parts) == logged(whole)  # the same fill after the resumption
    refused = train(tiny_run(small_data, parts, f"{FLAGS} --fill_unk 0.5 --resume auto"), capsys)
    assert_clean_error(refused, "--fill_unk 0.5 (checkpoint: 1.0)")


def test_a_train_text_without_unknowns_is_refused_before_any_work(tmp_path, small_data_dir, capsys):
    train_file = tmp_path / "plain.txt"
    train_file.write_bytes((small_data_dir / "wiki.train.raw").read_bytes().replace(UNKNOWN, b"word"))
    args = f"{FLAGS} --train_file {train_file} --fill_unk 0.5"
    result = train(tiny_run(small_data_dir, tmp_path / "r", args), capsys)
    assert_clean_error(result, "--fill_unk 0.5", "no <unk> tokens")
    assert not (tmp_path / "r").exists()

"""results/tbptt/rare_words.py: which bytes of the raw and tokenized validation texts belong to the
words written as <unk>, and the loss split over them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from conftest import call_main, load_script
from model import BDH, BDHConfig
from test_cli import assert_clean_error

SCRIPT = Path(__file__).resolve().parent.parent / "results/tbptt/rare_words.py"


def test_rare_words_are_marked_with_the_space_that_ends_them():
    rw = load_script(SCRIPT)
    raw = b" a Zyx b\n = T = \nDenial  doi c"
    tok = b" a <unk> b\n = T = \n<unk> <unk> c"  # the raw line's doubled space: one word fewer
    raw_mask, tok_mask = rw.rare_word_masks(raw, tok)
    assert len(raw_mask) == len(raw) and len(tok_mask) == len(tok)
    assert bytes(b for b, m in zip(raw, raw_mask, strict=True) if m) == b"Zyx Denial  doi "
    assert bytes(b for b, m in zip(tok, tok_mask, strict=True) if m) == b"<unk> <unk> <unk> "


def test_the_validation_texts_align_word_for_word(raw_dir: Path, tokens_dir: Path):
    rw = load_script(SCRIPT)
    raw = (raw_dir / "wiki.valid.raw").read_bytes()
    tok = (tokens_dir / "wiki.valid.tokens").read_bytes()
    raw_mask, tok_mask = rw.rare_word_masks(raw, tok)
    unks = tok.count(b"<unk>")
    assert tok_mask.sum() == 6 * unks - tok.count(b"<unk>\n")  # each with its space, but at a line's end
    unmarked_raw = bytes(b for b, m in zip(raw, raw_mask, strict=True) if not m)
    unmarked_tok = bytes(b for b, m in zip(tok, tok_mask, strict=True) if not m)
    assert unmarked_raw.replace(b"  ", b" ") == unmarked_tok  # what is left is the same text
    assert 0.05 < raw_mask.mean() < 0.1  # 11.7k rare words, about 7% of the raw bytes


def test_split_loss_means_each_part():
    rw = load_script(SCRIPT)
    losses, mask = np.array([1.0, 3.0, 1.0, 3.0]), np.array([False, False, True, False, True])
    split = rw.split_loss(losses, mask)  # losses[i] scores byte i + 1
    assert (split["whole"], split["marked"], split["rest"], split["marked_share"]) == (2.0, 3.0, 1.0, 0.5)
    assert split["marked_part_of_whole"] == 1.5


def test_copy_pairs_compare_a_rare_words_first_and_second_reading():
    rw = load_script(SCRIPT)
    raw = b" a Zyxw b Qrs  Zyxw\n Qrs c" + b" d" * 200 + b" Qrs Zyxw\n"
    tok = b" a <unk> b <unk> <unk>\n <unk> c" + b" d" * 200 + b" <unk> <unk>\n"
    mask, _ = rw.rare_word_masks(raw, tok)
    words = rw.rare_words(raw, mask)
    assert [(w, raw[s:e]) for w, s, e in words] == [
        (b"Zyxw", b"Zyxw "), (b"Qrs", b"Qrs "), (b"Zyxw", b"Zyxw"), (b"Qrs", b"Qrs "), (b"Qrs", b"Qrs "),
        (b"Zyxw", b"Zyxw"),
    ]  # fmt: skip
    losses = np.ones(len(raw) - 1)
    first_zyxw, second_zyxw = words[0][1], words[2][1]
    losses[first_zyxw : first_zyxw + 3] = 5.0  # "yxw" read the first time: 5 nats a byte
    losses[second_zyxw : second_zyxw + 3] = 0.5  # and copied the second
    losses[second_zyxw - 1] = 9.0  # the "Z" that says the word comes again: not counted
    pairs = rw.copy_pairs(losses, words)
    assert set(pairs) == {"0-255"}  # the second readings are 12 (Zyxw) and 11 bytes on; third ones unpaired
    assert pairs["0-255"] == {"pairs": 2, "first": (5.0 + 1.0) / 2, "second": (0.5 + 1.0) / 2}
    assert rw.repeat_bucket(255) == "0-255" and rw.repeat_bucket(16384) == ">=16384"


def test_the_script_scores_both_texts_and_refuses_texts_that_do_not_align(tmp_path: Path, capsys):
    cfg = BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=1, half_lives=[8, 64])
    BDH(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "raw").write_bytes(b" = A = \n a Zyx b c \n" * 20)
    (tmp_path / "tok").write_bytes(b" = A = \n a <unk> b c \n" * 20)
    texts = ["--raw", str(tmp_path / "raw"), "--tokens", str(tmp_path / "tok")]
    cmd = [sys.executable, str(SCRIPT), "--model_path", str(tmp_path / "m"), "--device", "cpu", *texts]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["raw"]["marked_bytes"] == 20 * 4 and result["tokens"]["marked_bytes"] == 20 * 6
    assert result["raw_rare_copies"]["0-255"]["pairs"] == 1  # Zyx, read again 20 bytes on
    model = ["--model_path", str(tmp_path / "m"), "--device", "cpu"]
    for name in ("raw", "tok"):  # the same split from evaluate.py --stream's byte losses
        args = ["--data_file", str(tmp_path / name), "--out_dir", str(tmp_path / f"eval-{name}")]
        flags = [*model, "--stream", "--no_plots", "--chunk_size", "64", *args]
        assert call_main(evaluate.main, flags, capsys).returncode == 0
    saved = [str(tmp_path / f"eval-{name}" / "byte_losses.npy") for name in ("raw", "tok")]
    rw = load_script(SCRIPT)
    again = call_main(rw.main, [*texts, "--losses", *saved, "--out", str(tmp_path / "o2.json")], capsys)
    assert again.returncode is None, again.stderr
    from_files = json.loads((tmp_path / "o2.json").read_text())
    for name in ("raw", "tokens"):
        assert from_files[name]["whole"] == pytest.approx(result[name]["whole"], rel=1e-6)
        assert from_files[name]["marked"] == pytest.approx(result[name]["marked"], rel=1e-6)
    raw_only = call_main(rw.main, [*texts, "--losses", saved[0], "--out", str(tmp_path / "o3.json")], capsys)
    assert raw_only.returncode is None  # the raw text's losses alone: its split and its pairs, no tokens
    alone = json.loads((tmp_path / "o3.json").read_text())
    assert "tokens" not in alone and alone["raw_rare_copies"] == from_files["raw_rare_copies"]
    (tmp_path / "tok").write_bytes(b" = A = \n")
    assert_clean_error(call_main(rw.main, [*cmd[2:], "--out", str(tmp_path / "o4.json")], capsys), "lines")


def test_losses_that_are_no_byte_losses_are_refused_with_one_line(tmp_path: Path, capsys):
    (tmp_path / "raw").write_bytes(b" a Zyx b \n")
    (tmp_path / "tok").write_bytes(b" a <unk> b \n")
    np.save(tmp_path / "grid.npy", np.zeros((3, 2)))
    np.save(tmp_path / "short.npy", np.zeros(3))
    (tmp_path / "empty.npy").write_bytes(b"")
    texts = ["--raw", str(tmp_path / "raw"), "--tokens", str(tmp_path / "tok")]
    cases = [(["missing.npy"] * 2, "missing.npy"), (["raw"] * 2, "byte_losses.npy"),
             (["grid.npy"] * 2, "one float per byte"), (["short.npy"] * 2, "3 losses"),
             (["short.npy"] * 3, "got 3"), (["empty.npy"] * 2, "No data left in file")]  # fmt: skip
    for bad, needle in cases:
        losses = [str(tmp_path / name) for name in bad]
        assert_clean_error(call_main(load_script(SCRIPT).main, [*texts, "--losses", *losses], capsys), needle)

"""Monosemantic synapses (dragon_hatchling/monosemantic.py): the Mann-Whitney test, an entry's value
byte by byte against sigma, and the search finding a synapse for a planted concept that holds on
held-out sentences, and none for a concept that is not there."""

import json
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import call_main
from dragon_hatchling import monosemantic, plots, synapses
from dragon_hatchling.checkpoints import save_checkpoint
from model import BDH, BDHConfig
from test_cli import assert_clean_error


def test_mann_whitney_counts_pairs_and_matches_a_permutation_test():
    exact = monosemantic.mann_whitney(np.array([3.0, 4, 5]), np.array([1.0, 2]))
    assert exact["U"] == 6 and exact["rank_biserial"] == 1
    tied = monosemantic.mann_whitney(np.array([1.0, 2]), np.array([1.0, 2]))
    assert tied["U"] == 2 and tied["rank_biserial"] == 0  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 8, 40).astype(float) + 0.8, rng.integers(0, 8, 50).astype(float)
    got = monosemantic.mann_whitney(a, b)
    assert got["U"] == sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    both = np.concatenate([a, b])
    perms = [monosemantic.mann_whitney(*np.split(rng.permutation(both), [40]))["U"] for _ in range(2000)]
    assert abs(got["p"] - np.mean(np.array(perms) >= got["U"])) < 0.02


def tiny(rope_theta: float = 20.0, half_lives: list | None = None) -> BDH:
    torch.manual_seed(0)
    model = BDH(
        BDHConfig(
            n_embd=16,
            n_head=2,
            n_neurons=32,
            n_layer=2,
            dropout=0.0,
            rope_theta=rope_theta,
            half_lives=half_lives or [4.0, 40.0],
        )
    )
    model.reset_parameters(std=0.3)
    return model.eval()


def test_an_entry_after_every_byte_is_sigma_there():
    model = tiny()
    idx = torch.randint(0, 256, (1, 25), generator=torch.Generator().manual_seed(1))
    neurons = synapses.layer_neurons(model, idx)
    series = synapses.entry_series(model, neurons, 1, 1, 3, 6)
    for t in (1, 9, 25):
        want = synapses.sigma(model, idx, 1, t)[1, 3, 6]
        assert series[t - 1].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def sentences(count: int, seed: int, cue: bytes = b"") -> list[bytes]:
    """Random lowercase sentences of 30-60 bytes; with a cue, the cue somewhere in each."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(30, 60)))
        at = rng.randint(0, len(text))
        out.append(text[:at] + cue + text[at:])
    return out


def write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


CUE = b"Z"


def planted() -> BDH:
    """A tiny model with a planted synapse: the pair of x neurons m-2, m-1 (the slowest RoPE pair) of
    every head fires on byte Z and on nothing else (Z's embedding e is orthogonal to the sentences'
    other bytes and to everything E writes, and has mean 0, so LayerNorm keeps it apart)."""
    model = tiny(rope_theta=10000.0, half_lives=[40.0, 400.0])
    m = model.config.head_size
    with torch.no_grad():
        e = torch.randn(16, generator=torch.Generator().manual_seed(5))
        e -= e.mean()
        e /= e.norm()
        others = torch.tensor(list(set(ALPHABET)))
        w = model.embed.weight
        w[others] -= (w[others] @ e)[:, None] * e  # the other bytes see nothing of e
        w[CUE[0]] = 3 * e
        model.E -= (model.E @ e)[:, None] * e  # nor does what y writes into v
        model.Dx[:, :, m - 2 :] = 4 * e[None, :, None]
    return model


ALPHABET = b"abcdefghij klmnop"


@pytest.mark.parametrize("cue, found, candidates", [(CUE, True, 512), (CUE, True, 8), (b"", False, 512)])
def test_a_planted_synapse_is_found_and_holds_out(cue, found, candidates, tmp_path, capsys):
    """Concept sentences carry the planted byte: the search's best synapse ends in the planted x
    neurons and separates held-out sentences (one-sided p < 1e-3; all 512 entries scored: p 1e-7,
    rank-biserial 0.88), also when the search scores only the 8 entries of each layer most above in
    mean; without the cue, nothing holds out."""
    checkpoint = tmp_path / "model"
    model = planted()
    save_checkpoint(model, checkpoint)
    files = [
        write(tmp_path / f"{n}.txt", sentences(24, seed, cue if n.endswith("concept") else b""))
        for n, seed in (("concept", 1), ("contrast", 2), ("test_concept", 3), ("test_contrast", 4))
    ]
    out = tmp_path / "out"
    argv = [
        "--model_path",
        str(checkpoint),
        "--concept",
        files[0],
        "--contrast",
        files[1],
        "--test_concept",
        files[2],
        "--test_contrast",
        files[3],
        "--device",
        "cpu",
        "--out_dir",
        str(out),
        "--top",
        "5",
        "--candidates",
        str(candidates),
    ]
    result = call_main(monosemantic.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "monosemantic.json").read_text())["entries"][0]
    assert (best["p"] < 1e-3 and best["rank_biserial"] > 0.6) == found, best
    if found:
        assert best["j"] >= model.config.head_size - 2, best  # the planted neurons
    assert (out / "synapse.png").is_file() and "best synapse: layer 1" in result.stdout


def test_sentence_files_that_cannot_be_used_are_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "model"
    save_checkpoint(tiny(), checkpoint)
    good, one = write(tmp_path / "good.txt", sentences(4, 0)), write(tmp_path / "one.txt", [b"alone"])
    three = write(tmp_path / "three.txt", sentences(3, 0))  # a held-out set of one
    base = ["--model_path", str(checkpoint), "--device", "cpu", "--out_dir", str(tmp_path / "out")]
    for flags, *says in [
        (
            ["--concept", one, "--contrast", good, "--test_concept", good, "--test_contrast", good],
            "at least 2",
        ),
        (
            ["--concept", good, "--contrast", three],
            "--contrast",
            "at least 4 sentences",
            "odd lines are held out",
        ),
        (["--concept", str(tmp_path / "no.txt"), "--contrast", good], "cannot be read"),
        (["--concept", good, "--contrast", good, "--test_concept", good], "go together"),
    ]:
        assert_clean_error(call_main(monosemantic.main, [*base, *flags], capsys), *says)
    assert not (tmp_path / "out").exists()


def test_sentences_with_dollars_and_control_bytes_are_drawn_as_written(tmp_path):
    """A held-out sentence is a label: "$^" made matplotlib's mathtext parser fail after the whole
    search, and a control byte has no glyph; both are drawn as text now (plots.literal)."""
    texts = {"concept": ["the $ rose ^{ and $_ fell .", "ten \x01 euros"], "contrast": ["a cat", "a dog"]}
    series = {name: [[0.0, 1.0, 0.5]] * 2 for name in texts}
    entry = {"layer": 1, "head": 0, "y_neuron": 3, "x_neuron": 4, "p": 0.5, "rank_biserial": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph is a warning
        plots.synapse_series(series, texts, entry, tmp_path / "synapse.png")
    assert (tmp_path / "synapse.png").stat().st_size > 0
    assert plots.literal("a $x$ \x00b") == "a \\$x\\$ \ufffdb"

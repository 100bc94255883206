"""The synapse state sigma (dragon_hatchling/synapses.py, the paper's eq. 16) against a direct
computation, term by term, and the degrees of its graph against counting its entries."""

import json
import math

import pytest
import torch

import evaluate
from conftest import call_main
from dragon_hatchling import synapses
from dragon_hatchling.checkpoints import save_checkpoint
from model import BDH, BDHConfig, rope_frequencies
from test_cli import assert_clean_error


def tiny(style: str, decay: bool) -> BDH:
    torch.manual_seed(0)
    config = BDHConfig(n_embd=16, n_head=2, n_neurons=48, n_layer=3, dropout=0.1, rope_style=style,
                       rope_theta=20.0, half_lives=[2.0, 9.0] if decay else None)  # fmt: skip
    model = BDH(config)
    model.reset_parameters(std=0.3)
    return model  # in training mode: sigma must not apply dropout


def turned(model: BDH, x: torch.Tensor, angle_positions: int) -> torch.Tensor:
    """x (n/h,) rotated pair by pair by angle_positions * 2 pi freq, written out by hand."""
    c, freq = model.config, rope_frequencies(model.config).double()
    m, out = c.head_size, x.clone().double()
    pairs = [(2 * i, 2 * i + 1) for i in range(m // 2)] if c.rope_style == "interleaved" else [
        (i, i + m // 2) for i in range(m // 2)]  # fmt: skip
    for a, b in pairs:
        angle = 2 * math.pi * freq[a].item() * angle_positions
        out[a] = x[a] * math.cos(angle) - x[b] * math.sin(angle)
        out[b] = x[b] * math.cos(angle) + x[a] * math.sin(angle)
    return out


def direct_sigma(model: BDH, idx: torch.Tensor, layer: int, t: int) -> torch.Tensor:
    """Eq. (16) term by term: the sum over tau < t of gamma^(t-1-tau) y_{tau,l-1} (U^(tau-t) x_tau)^T."""
    neurons = synapses.layer_neurons(model, idx)
    (x, _), (_, y) = neurons[layer], neurons[layer - 1]
    h, m = model.config.n_head, model.config.head_size
    out = torch.zeros(h, m, m, dtype=torch.float64)
    for head in range(h):
        life = model.config.half_lives[head] if model.config.half_lives else math.inf
        for tau in range(t):
            weight = 2 ** (-(t - 1 - tau) / life)
            out[head] += weight * torch.outer(y[head, tau].double(), turned(model, x[head, tau], tau - t))
    return out


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", True)])
def test_sigma_is_eq_16_term_by_term(style, decay):
    model = tiny(style, decay)
    idx = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    for layer, t in ((1, 20), (2, 13)):
        want = direct_sigma(model, idx, layer, t)
        got = synapses.sigma(model, idx, layer, t)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
        # at position t it is the sigma of the text's first t bytes: what comes later changes nothing
        torch.testing.assert_close(synapses.sigma(model, idx[:, :t], layer), got, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer must be 1"):
        synapses.sigma(model, idx, 0)


def test_the_graph_counts_the_positive_entries_above_the_threshold():
    """synapse_degrees, block by block, against counting the whole sigma: out-degree = row counts,
    in-degree = column counts, no loops; the fresh model's graph comes with the trained one's."""
    model = tiny("interleaved", decay=True)
    idx = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    whole = synapses.sigma(model, idx, 2)  # h, m, m
    graph = synapses.synapse_degrees(model, idx, 2)
    threshold = torch.tensor(graph["threshold"])[:, None, None]
    assert (threshold >= 0).all()
    edges = whole > threshold
    edges[:, torch.arange(24), torch.arange(24)] = False
    assert graph["out_degree"].tolist() == edges.sum(2).flatten().tolist()
    assert graph["in_degree"].tolist() == edges.sum(1).flatten().tolist()
    summary = synapses.synapse_graph(model, idx, 2)
    assert summary["layer"] == 2 and summary["text_bytes"] == 30 and "negatives" in summary["edges"]
    assert summary["model"]["out_degree"]["mean"] == pytest.approx(edges.sum().item() / 48)


def test_evaluate_draws_the_synapse_graph(tmp_path, small_data, capsys):
    """evaluate.py --synapse_graph writes the degrees of sigma's graph, for the model and a fresh one;
    values it cannot honour are one line."""
    checkpoint = tmp_path / "model"
    save_checkpoint(tiny("interleaved", decay=True), checkpoint)
    base = ["--model_path", str(checkpoint), "--data_dir", str(small_data), "--device", "cpu", "--no_plots",
            "--max_chunks", "2"]  # fmt: skip
    out = tmp_path / "eval"
    assert (
        call_main(evaluate.main, [*base, "--out_dir", str(out), "--synapse_graph", "300"], capsys).returncode
        == 0
    )
    graph = json.loads((out / "synapse_graph.json").read_text())
    assert graph["layer"] == 2 and graph["text_bytes"] == 300 and (out / "synapse_graph.png").is_file()
    assert set(graph) >= {"model", "initial", "edges"} and graph["initial"]["seed"] == 1337
    for flags, says in [("--synapse_graph 20000", "at most 16,384"), ("--synapse_graph 9 --synapse_layer 3",
                                                                     "expected 1 .. 2")]:  # fmt: skip
        result = call_main(evaluate.main, [*base, "--out_dir", str(tmp_path / "e2"), *flags.split()], capsys)
        assert_clean_error(result, says)

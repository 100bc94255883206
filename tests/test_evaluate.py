"""Scoring: the whole text read as one (--stream), long windows, loss by position."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from dragon_hatchling import measures
from dragon_hatchling.sampling import sample_context
from dragon_hatchling.scoring import (
    eval_batch_windows,
    position_buckets,
    position_loss_sums,
    score_windows,
    stream_loss_sums,
)
from model import BDH, BDHConfig


def tiny(half_lives=None) -> BDH:
    torch.manual_seed(0)
    cfg = BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=2, dropout=0.0, half_lives=half_lives)
    model = BDH(cfg).eval()
    model.reset_parameters(std=0.1)
    return model


def test_position_buckets_double_up_to_the_length():
    assert position_buckets(100) == [(0, 100)]
    assert position_buckets(128) == [(0, 128)]
    assert position_buckets(700) == [(0, 128), (128, 256), (256, 512), (512, 700)]
    assert position_buckets(1024) == [(0, 128), (128, 256), (256, 512), (512, 1024)]


def test_batches_of_long_windows_hold_fewer_windows():
    assert eval_batch_windows(32, 128) == 32
    assert eval_batch_windows(32, 4096) == 16
    assert eval_batch_windows(32, 30000) == 2
    assert eval_batch_windows(32, 10**6) == 1


@pytest.mark.parametrize("half_lives", [None, [3.0, 50.0]])
def test_stream_equals_one_forward_over_the_whole_text(raw_dir, half_lives):
    """The state carried chunk by chunk gives what one parallel pass over the whole text gives."""
    model = tiny(half_lives)
    data = np.frombuffer((raw_dir / "wiki.valid.raw").read_bytes()[:700], dtype=np.uint8)
    sums, counts, buckets = stream_loss_sums(model, data, torch.device("cpu"), chunk_size=96)
    idx = torch.from_numpy(data.astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = model(idx[:, :-1])
    per_byte = F.cross_entropy(logits[0], idx[0, 1:], reduction="none").double().numpy()
    assert buckets == position_buckets(699) and counts.tolist() == [b - a for a, b in buckets]
    want = [per_byte[a:b].sum() for a, b in buckets]
    np.testing.assert_allclose(sums, want, rtol=1e-4)
    assert sums.sum() / counts.sum() == pytest.approx(per_byte.mean(), rel=1e-5)


def test_long_windows_through_the_chunked_form_score_as_the_parallel_form(raw_dir):
    model = tiny([5.0, 20.0])
    data = np.frombuffer((raw_dir / "wiki.valid.raw").read_bytes()[:2000], dtype=np.uint8)
    cpu = torch.device("cpu")
    parallel, n = position_loss_sums(model, data, 300, 2, cpu, max_chunks=5)
    chunked, m = position_loss_sums(model, data, 300, 2, cpu, max_chunks=5, chunk_size=64)
    assert n == m == 5
    np.testing.assert_allclose(chunked, parallel, rtol=1e-4)


class AlwaysZero(torch.nn.Module):
    """Predicts byte 0 whatever it reads: its loss is the text's, not the context's."""

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.zeros(*idx.shape, 256)
        logits[..., 0] = 5.0
        return logits, None


def test_shifted_windows_put_the_same_text_in_every_bucket():
    """Text of period 512 whose first half is easy (zeros) and second half hard: in 512-byte windows
    the buckets hold different halves, unless the windows' starts are shifted by 128 bytes at a time."""
    period = np.concatenate([np.zeros(256, np.uint8), np.arange(1, 257).astype(np.uint8)])
    data = np.tile(period, 40)
    cpu = torch.device("cpu")
    plain = score_windows(AlwaysZero(), data, 512, 8, cpu)
    shifted = score_windows(AlwaysZero(), data, 512, 8, cpu, shifts=4)
    assert plain["loss_by_position"]["256-511"] - plain["loss_by_position"]["128-255"] > 4  # the text
    buckets = list(shifted["loss_by_position"].values())
    assert max(buckets) - min(buckets) < 0.05 * np.mean(buckets)  # the same text in each
    assert shifted["bytes"] == 4 * 39 * 512  # 39 windows at each shift
    assert shifted["loss"] == pytest.approx(plain["loss"], rel=0.02)


def evaluate_args(tmp_path, raw_dir, text_bytes: int) -> tuple[BDH, list[str]]:
    """A tiny decayed model saved as a checkpoint, the start of wiki.valid.raw as a file, and the
    evaluate.py arguments that score the one on the other."""
    model = tiny([4.0, 64.0])
    model.save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "text.raw"
    text.write_bytes((raw_dir / "wiki.valid.raw").read_bytes()[:text_bytes])
    return model, ["--model_path", str(tmp_path / "ckpt"), "--data_file", str(text), "--device", "cpu"]


def test_evaluate_stream_writes_metrics_and_a_plot(raw_dir, tmp_path, capsys):
    _, args = evaluate_args(tmp_path, raw_dir, 1500)
    out = tmp_path / "eval"
    assert evaluate.main([*args, "--stream", "--chunk_size", "256", "--out_dir", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["mode"] == "stream" and got["bytes"] == 1499 and got["config"]["half_lives"] == [4.0, 64.0]
    assert list(got["loss_by_position"]) == ["0-127", "128-255", "256-511", "512-1023", "1024-1498"]
    assert got["bpb"] == pytest.approx(got["loss"] / math.log(2))
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert (out / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
    assert "(stream): loss" in capsys.readouterr().out
    # the same text in windows longer than a chunk: scored through the chunked form, same buckets
    assert evaluate.main([*args, "--seq_len", "700", "--chunk_size", "256", "--out_dir", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["mode"] == "windows" and got["bytes"] == 1400 and got["shifts"] == 1
    assert list(got["loss_by_position"]) == ["0-127", "128-255", "256-511", "512-699"]
    # and shifted: the first 700 + 1 bytes, then the windows 350 bytes on
    argv = [*args, "--seq_len", "700", "--chunk_size", "256", "--shifts", "2", "--out_dir", str(out)]
    assert evaluate.main(argv) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["bytes"] == 2100 and got["shifts"] == 2


def test_the_sampler_sees_the_whole_text_by_default_when_the_model_decays():
    assert sample_context(None, 64, tiny([4.0, 64.0]).config) is None  # the whole text
    assert sample_context(None, 64, tiny(None).config) == 64  # the paper's model: its window
    assert sample_context(0, 64, tiny(None).config) is None
    assert sample_context(300, 64, tiny([4.0, 64.0]).config) == 300


def test_the_hill_estimator_recovers_the_exponent_of_a_pareto_sample():
    rng = np.random.default_rng(0)
    pareto = rng.pareto(3.0, 1_000_000) + 1.0  # P(X > x) = x^-3 for x >= 1
    fit = measures.hill_tail_index(pareto * rng.choice([-1.0, 1.0], pareto.size))  # on |x|
    assert fit["k"] == 10_000 and abs(fit["alpha"] - 3.0) < 0.1, fit
    assert fit["threshold"] == pytest.approx(100 ** (1 / 3), rel=0.05)  # the 1% quantile of x^-3
    assert measures.hill_tail_index(rng.normal(size=1_000_000))["alpha"] > 5  # a light tail
    assert measures.hill_tail_index(np.array([-1.0, 1.0]))["alpha"] == np.inf  # equal values: no tail


def test_neuron_degrees_count_the_edges_of_a_known_graph():
    """With E the identity (d = n), G = E Dx is Dx itself: the degrees are its row and column sums."""
    model = BDH(BDHConfig(n_embd=6, n_head=1, n_neurons=6, n_layer=1))
    A = torch.tensor(
        [[0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1],
         [0, 0, 0, 1, 0, 0]], dtype=torch.float32,
    )  # fmt: skip
    with torch.no_grad():
        model.E.copy_(torch.eye(6))
        model.Dx.copy_(A[None])
    got = measures.neuron_degrees(model, threshold=0.5, block=4)  # blocks of rows that do not divide n
    loops = A.diagonal()
    assert got["out_degree"].tolist() == (A.sum(1) - loops).long().tolist() == [2, 1, 4, 0, 2, 1]
    assert got["in_degree"].tolist() == (A.sum(0) - loops).long().tolist() == [1, 2, 2, 2, 1, 2]
    summary = measures.degree_summary(got["out_degree"])
    assert summary["histogram"] == {"degree": [0, 1, 2, 4], "neurons": [1, 2, 2, 1]}
    k, at_least = measures.degree_ccdf(summary["histogram"])  # P(out-degree >= k) over all 6
    assert k.tolist() == [1, 2, 4] and at_least.tolist() == pytest.approx([5 / 6, 3 / 6, 1 / 6])
    # heads: neuron h*m + j reads column j of head h
    two = BDH(BDHConfig(n_embd=4, n_head=2, n_neurons=4, n_layer=1))
    with torch.no_grad():
        two.E.copy_(torch.eye(4))
        two.Dx.copy_(torch.zeros(2, 4, 2))
        two.Dx[1, 0, 1] = 1.0  # neuron 0 -> neuron 3
    assert measures.neuron_degrees(two, threshold=0.5)["in_degree"].tolist() == [0, 0, 0, 1]


def test_evaluate_measures_the_neuron_graph_and_the_tails(tmp_path, raw_dir, capsys):
    model, args = evaluate_args(tmp_path, raw_dir, 700)
    out = tmp_path / "eval"
    assert evaluate.main([*args, "--neuron_graph", "--out_dir", str(out)]) == 0
    graph = json.loads((out / "neuron_graph.json").read_text())
    assert set(graph) == {"model", "initial", "edges"}
    for which in ("model", "initial"):
        degrees = graph[which]["out_degree"]
        assert 0 <= degrees["mean"] <= degrees["max"] < 64 and graph[which]["threshold"] > 0
    assert (out / "neuron_graph.png").read_bytes()[:4] == b"\x89PNG"
    for which in ("out_degree", "in_degree"):  # the histogram counts every neuron once
        assert sum(graph["model"][which]["histogram"]["neurons"]) == 64, graph["model"][which]
    stats = json.loads((out / "weight_stats.json").read_text())
    assert stats["E"]["tail"]["k"] == len(model.E.flatten()) // 100 and stats["E"]["tail"]["alpha"] > 0


def test_the_neuron_graphs_fresh_model_is_the_runs_own_initial_weights(tmp_path, raw_dir, capsys):
    """A model as experiment.py draws it (torch.manual_seed(--seed), then BDH(config)) and
    --init_seed of the same seed: the fresh model is the same model, so the graphs are equal (to
    the threshold, 5 sd of its G); another seed gives another graph."""
    torch.manual_seed(7)
    BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=256, n_layer=1)).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "text.raw").write_bytes((raw_dir / "wiki.valid.raw").read_bytes()[:300])
    args = ["--model_path", str(tmp_path / "ckpt"), "--data_file", str(tmp_path / "text.raw"), "--device",
            "cpu", "--neuron_graph", "--no_plots"]  # fmt: skip
    graphs = {}
    for seed in (7, 8):
        out = tmp_path / f"seed{seed}"
        assert evaluate.main([*args, "--init_seed", str(seed), "--out_dir", str(out)]) == 0
        graphs[seed] = json.loads((out / "neuron_graph.json").read_text())
    assert graphs[7]["initial"]["seed"] == 7
    assert graphs[7]["initial"] == {**graphs[7]["model"], "seed": 7}  # threshold (5 sd of G), degrees
    assert graphs[8]["initial"]["threshold"] != pytest.approx(graphs[8]["model"]["threshold"])


def test_a_constant_matrix_is_measured_not_divided_by(tmp_path, raw_dir, capsys):
    """An ablation that zeroes a matrix (and a GPT's LayerNorm weights, all ones): std 0, so no
    kurtosis or tail index, and the scoring, the statistics and the plots are all written."""
    model, args = evaluate_args(tmp_path, raw_dir, 700)
    with torch.no_grad():
        model.E.zero_()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval"
    assert evaluate.main([*args, "--out_dir", str(out)]) == 0
    stats = json.loads((out / "weight_stats.json").read_text())
    assert stats["E"]["std"] == 0 and stats["E"]["excess_kurtosis"] is None and stats["E"]["tail"] is None
    assert stats["Dx"]["tail"]["alpha"] > 0
    assert json.loads((out / "metrics.json").read_text())["loss"] > 0
    assert (out / "weights.png").read_bytes()[:4] == b"\x89PNG"

"""results/report/report.py: the fit it adds to evaluate.py's and the tables it prints from the
committed runs' files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

HERE = Path(__file__).resolve().parent.parent / "results/report"


def test_ccdf_slope_recovers_a_known_power_law():
    """Degrees with P(D >= k) = k^-1.5 exactly, for k = 1..1000: the least-squares slope is 1.5,
    over any range."""
    k = np.arange(1, 1001)
    at_least = k.astype(float) ** -1.5
    neurons = np.round(1e9 * (at_least - np.append(at_least[1:], 0.0))).astype(int)  # P(D = k)
    histogram = {"degree": k.tolist(), "neurons": neurons.tolist()}
    report = load_script(HERE / "report.py")
    assert report.ccdf_slope(histogram, 10, 200) == pytest.approx(1.5, abs=0.01)
    assert report.ccdf_slope(histogram, 2, 50) == pytest.approx(1.5, abs=0.01)


def test_the_trained_model_tables_come_from_the_runs_files():
    report = load_script(HERE / "report.py")
    init = json.loads((HERE / "init.json").read_text())
    table = report.trained_tables(init)
    stats = json.loads((report.TRAINED / "weight_stats.json").read_text())
    for name, s in stats.items():  # one row per matrix, fresh against trained
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{s['excess_kurtosis']:.3f} / {s['tail']['alpha']:.1f}" in row
        assert f"{init['weights'][name]['tail']['alpha']:.1f}" in row
    graph = json.loads((report.TRAINED / "neuron_graph.json").read_text())
    assert f"| trained | {graph['model']['threshold']:.4f} | out |" in table
    assert f"{graph['model']['in_degree']['max']} |" in table
    assert table.count("| BDH") == len(report.STREAMS)

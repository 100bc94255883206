"""The paper's measurements of a trained model: heavy-tailed weights (excess kurtosis, the Hill tail
index) and the neuron graph that E and Dx make (its degrees and their tail). evaluate.py writes
them (weight_stats.json, neuron_graph.json) and results/report/report.py reads them."""

from __future__ import annotations

import numpy as np
import torch

TAIL_FRACTION = 0.01  # the Hill estimator fits the largest 1% of |w|


def hill_tail_index(values: np.ndarray, fraction: float = TAIL_FRACTION) -> dict[str, float]:
    """The tail index alpha of |values| (P(|X| > x) ~ x^-alpha) by the Hill estimator over the k
    largest, k = fraction * size: alpha = k / sum_{i<k} ln(x_(i) / x_(k)), x_(0) >= x_(1) >= ...
    Returns alpha, k and the fit's threshold x_(k)."""
    x = np.abs(np.asarray(values, dtype=np.float64).ravel())
    k = min(max(2, int(fraction * x.size)), x.size - 1)
    top = -np.sort(-np.partition(x, x.size - k - 1)[x.size - k - 1 :])  # the k + 1 largest, descending
    threshold = top[k]
    logs = np.log(top[:k] / threshold) if threshold > 0 else np.array([np.inf])
    alpha = k / logs.sum() if logs.sum() > 0 else np.inf  # the k largest all equal: no tail at all
    return {"alpha": float(alpha), "k": k, "threshold": float(threshold), "fraction": fraction}


def weight_stats(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Mean, std, excess kurtosis, the fraction beyond 3 std and the tail index (Hill, the largest 1%
    of |w|) of each weight matrix. A Gaussian has excess kurtosis 0 and no finite tail index. A
    constant matrix (a LayerNorm's ones, a zeroed ablation) has std 0 and no shape: None for those."""
    stats = {}
    for name, w in model.named_parameters():
        w = w.detach().double().flatten()
        mean, std = w.mean().item(), w.std().item() if w.numel() > 1 else 0.0
        stats[name] = {"numel": w.numel(), "mean": mean, "std": std, **shape_stats(w, mean, std)}
    return stats


def shape_stats(w: torch.Tensor, mean: float, std: float) -> dict:
    """The shape of a matrix's distribution beyond its mean and std (None for each if std is 0)."""
    if not std > 0:
        return {"excess_kurtosis": None, "frac_beyond_3std": None, "max_abs_over_std": None, "tail": None}
    z = (w - mean) / std
    return {
        "excess_kurtosis": (z**4).mean().item() - 3.0,
        "frac_beyond_3std": (z.abs() > 3).double().mean().item(),
        "max_abs_over_std": (w.abs().max().item() / std),
        "tail": hill_tail_index((w - mean).numpy()),
    }


@torch.no_grad()
def neuron_degrees(
    model: torch.nn.Module, threshold: float | None = None, threshold_sd: float = 5.0, block: int = 1024
) -> dict:
    """The graph that E and Dx make between neurons: G = E Dx (n x n), G[i, j] = how strongly neuron
    i's output (through E, into the d-dimensional v) drives neuron j's input (through Dx). An edge
    i -> j (i != j) where G[i, j] > threshold (default: threshold_sd standard deviations of G).
    G is computed `block` rows at a time, never whole. Returns the out- and in-degree of each neuron."""
    E = model.E.detach().float()  # n, d
    H, D, M = model.Dx.shape
    Dx = model.Dx.detach().float().permute(1, 0, 2).reshape(D, H * M)  # d, n: neuron h*M + j
    n = E.shape[0]
    if threshold is None:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(n, 512)].to(E.device)
        threshold = threshold_sd * (E[rows] @ Dx).std().item()
    out_degree = torch.zeros(n, dtype=torch.long, device=E.device)
    in_degree = torch.zeros(n, dtype=torch.long, device=E.device)
    for i0 in range(0, n, block):
        edges = (E[i0 : i0 + block] @ Dx) > threshold  # block, n
        rows = torch.arange(i0, min(i0 + block, n), device=E.device)
        edges[rows - i0, rows] = False  # no loops
        out_degree[i0 : i0 + block] = edges.sum(1)
        in_degree += edges.sum(0)
    return {
        "threshold": threshold,
        "out_degree": out_degree.cpu().numpy(),
        "in_degree": in_degree.cpu().numpy(),
    }


def degree_summary(degrees: np.ndarray, fraction: float = 0.1) -> dict:
    """Mean and largest degree, the tail index of the degrees above zero (Hill, the largest
    `fraction` of them): the exponent of their complementary CDF, P(deg > k) ~ k^-alpha, and the
    histogram (how many neurons have each degree that occurs), from which the CCDF is drawn."""
    live = degrees[degrees > 0]
    out = {"mean": float(degrees.mean()), "max": int(degrees.max()), "nonzero": int(live.size)}
    if live.size > 20:
        out["ccdf_tail"] = hill_tail_index(live, fraction)
    values, counts = np.unique(degrees, return_counts=True)
    out["histogram"] = {"degree": values.tolist(), "neurons": counts.tolist()}
    return out


def degree_ccdf(histogram: dict) -> tuple[np.ndarray, np.ndarray]:
    """The degrees k >= 1 that occur and P(degree >= k) over all neurons, from degree_summary's
    histogram."""
    k, neurons = np.asarray(histogram["degree"]), np.asarray(histogram["neurons"], dtype=np.float64)
    at_least = neurons[::-1].cumsum()[::-1] / neurons.sum()  # P(degree >= k[i])
    return k[k > 0], at_least[k > 0]


EDGES = "G = E Dx (n x n); an edge i -> j, i != j, where G[i, j] > 5 standard deviations of G"


def neuron_graph(model: torch.nn.Module, init_seed: int = 1337) -> dict:
    """The degrees of the neuron graph (neuron_degrees) of the model and of a fresh one of its config
    drawn with `init_seed` (experiment.py's --seed: the run's own initial weights), summarised."""
    torch.manual_seed(init_seed)
    initial = type(model)(model.config).to(model.E.device)  # drawn on the CPU, as experiment.py does
    out = {}
    for name, m in (("model", model), ("initial", initial)):
        graph = neuron_degrees(m)
        out[name] = {
            "threshold": graph["threshold"],
            "out_degree": degree_summary(graph["out_degree"]),
            "in_degree": degree_summary(graph["in_degree"]),
        }
    out["initial"]["seed"] = init_seed
    out["edges"] = EDGES
    return out

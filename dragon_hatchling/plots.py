"""The figures the scripts write: a run's curves, weight histograms, loss by position, the neuron
graph. matplotlib draws off screen (its Agg backend, chosen here once), and every figure is
written atomically (files.atomic_path)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dragon_hatchling.files import atomic_path  # noqa: E402
from dragon_hatchling.measures import degree_ccdf  # noqa: E402
from model import INIT_STD  # noqa: E402

LN2 = math.log(2)


def literal(text: str) -> str:
    """Text from outside (a path, a sentence) drawn as written: a "$" is not mathtext (whose parser
    fails on, say, "$^"), and a control character, which no font has, shows as U+FFFD."""
    return "".join("\\$" if c == "$" else c if c.isprintable() else "\ufffd" for c in text)


def save(fig, path: str | Path, dpi: int = 120) -> None:
    """Write the figure as a PNG (atomically) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(bytes seen, value) of the log rows that have a value for `key`."""
    pts = [(float(r["bytes_seen"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(rows: list[dict], extra: list[str], out_dir: Path, model: str) -> None:
    """loss.png and bpb.png (train and validation against bytes seen), lr.png and, for a model
    with sparse neurons, sparsity.png."""
    for name, scale, ylabel, title in (
        ("loss", 1.0, "loss (nats/byte)", f"{model} on byte-level Wikitext-2"),
        ("bpb", 1 / LN2, "bits per byte", "Bits per byte"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs, ys = series(rows, "train_loss")
        ax.plot(xs, [y * scale for y in ys], label="train", alpha=0.6, lw=1)
        ax.plot(*series(rows, f"val_{name}"), "o-", label="validation")
        for label in extra:
            ax.plot(*series(rows, f"val_{name}_{label}"), "s--", label=f"validation ({literal(label)})")
        ax.set(xlabel="bytes seen", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, out_dir / f"{name}.png")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*series(rows, "lr"))
    ax.set(xlabel="bytes seen", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    save(fig, out_dir / "lr.png")
    if series(rows, "x_nonzero")[0]:
        sparsity_curve(rows, out_dir / "sparsity.png")


def sparsity_curve(rows: list[dict], path: Path) -> None:
    """The fraction of non-zero x and y at every validation."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*series(rows, "x_nonzero"), "o-", label="x = relu(v Dx)")
    ax.plot(*series(rows, "y_nonzero"), "s-", label="y = relu(LN(a) Dy) * x")
    ax.set(
        xlabel="bytes seen", ylabel="fraction non-zero", title="Sparsity on validation text", ylim=(0, None)
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def bucket_middles(by_position: dict[str, float]) -> tuple[list[float], list[float]]:
    """The points of a loss by position ({"first-last": loss}) on a log scale: each bucket at its
    geometric middle, and its loss."""
    spans = [tuple(int(p) for p in k.split("-")) for k in by_position]
    return [math.sqrt(max(a, 1) * (b + 1)) for a, b in spans], list(by_position.values())


def loss_by_position(by_position: dict[str, float], path: Path, title: str) -> None:
    """Loss against position (log scale): one point per bucket, at its geometric middle."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*bucket_middles(by_position), "o-")
    ax.set_xscale("log")
    ax.set(
        xlabel="position (bytes seen before the scored byte)", ylabel="loss (nats/byte)", title=literal(title)
    )
    ax.grid(alpha=0.3, which="both")
    save(fig, path, dpi=110)


def gaussian_counts(centers: np.ndarray, width: float, size: int, mean: float, std: float) -> np.ndarray:
    """The counts a Gaussian of `size` draws puts in bins of `width` at `centers` (NaN under 0.5)."""
    counts = size * width * np.exp(-0.5 * ((centers - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return np.where(counts >= 0.5, counts, np.nan)


def weight_histograms(
    weights: dict[str, tuple[str, np.ndarray]], stats: dict, path: Path, title: str
) -> None:
    """Log-scale histograms of each weight matrix (name: (label, values)), with a Gaussian of the
    same std dashed and the initial weights' distribution (Normal, std INIT_STD) dotted."""
    fig, axes = plt.subplots(1, len(weights), figsize=(4 * len(weights), 3.6))
    for ax, (name, (label, w)) in zip(np.atleast_1d(axes), weights.items(), strict=True):
        _, edges, _ = ax.hist(w, bins=121, log=True, color="tab:blue", alpha=0.8)
        s, width = stats[name], edges[1] - edges[0]
        centers = (edges[:-1] + edges[1:]) / 2
        if s["std"] > 0:
            ax.plot(
                centers,
                gaussian_counts(centers, width, w.size, s["mean"], s["std"]),
                "k--",
                lw=1,
                label="Gaussian, same std",
            )
        ax.plot(
            centers,
            gaussian_counts(centers, width, w.size, 0.0, INIT_STD),
            ":",
            color="tab:red",
            lw=1.2,
            label="initial weights",
        )
        ax.set_ylim(bottom=0.5)
        shape = (
            "constant"
            if s["tail"] is None
            else (f"excess kurtosis {s['excess_kurtosis']:.2f}, tail index {s['tail']['alpha']:.1f}")
        )
        ax.set_title(f"{label}\n{shape}", fontsize=9)
        ax.set_xlabel("weight")
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("count (log)")
    first.legend(fontsize=7)
    fig.suptitle(literal(title), fontsize=10)
    save(fig, path, dpi=110)


def degree_ccdfs(graph: dict, path: Path, title: str) -> None:
    """Log-log plots of the out- and in-degrees' complementary CDF of the model's and the fresh
    model's neuron graphs (measures.neuron_graph's summaries), with the Hill fits over their range."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, which in zip(axes, ("out_degree", "in_degree"), strict=True):
        for name, color in (("model", "C0"), ("initial", "C1")):
            summary = graph[name][which]
            k, at_least = degree_ccdf(summary["histogram"])
            if not k.size:
                ax.plot([], [], " ", label=f"{name}: no edge above the threshold")
                continue
            ax.loglog(
                k,
                at_least,
                "o",
                ms=2.5,
                color=color,
                label=f"{name}: {summary['nonzero']:,} neurons with one",
            )
            tail = summary.get("ccdf_tail")
            if tail:  # the Hill fit, P(D >= k) ~ k^-alpha, through its threshold, over its range
                k0 = tail["threshold"]
                span = np.array([k0, summary["max"]], dtype=np.float64)
                at_k0 = at_least[np.searchsorted(k, k0)]
                ax.loglog(
                    span,
                    at_k0 * (span / k0) ** -tail["alpha"],
                    "--",
                    color=color,
                    lw=1,
                    label=f"Hill fit: alpha {tail['alpha']:.2f} over k >= {k0:.0f}",
                )
        what = which.replace("_", "-")
        ax.set(xlabel=f"{what} k", ylabel=f"P({what} >= k), all neurons")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    heading = textwrap.fill(literal(f"{title}: neuron graph {graph['edges']}"), 150)  # fits the figure
    fig.suptitle(heading, fontsize=9)
    save(fig, path, dpi=110)


def synapse_series(series: dict, texts: dict, entry: dict, path: Path) -> None:
    """A synapse's value byte by byte through a few held-out sentences of each set (monosemantic.py):
    concept sentences solid, contrast ones dashed, each labelled with its first words."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (name, style), color in zip((("concept", "-"), ("contrast", "--")), ("C0", "C1"), strict=True):
        for k, (values, text) in enumerate(zip(series[name], texts[name], strict=True)):
            label = literal(f"{name}: {text[:40]}..." if len(text) > 40 else f"{name}: {text}")
            ax.plot(
                range(1, len(values) + 1), values, style, color=color, alpha=1 - 0.25 * k, lw=1.2, label=label
            )
    ax.set(
        xlabel="bytes read",
        ylabel="sigma[i, j]",
        title=f"layer {entry['layer']}, head {entry['head']}: y neuron {entry['y_neuron']} -> x neuron "
        f"{entry['x_neuron']} (held out: p = {entry['p']:.2g}, rank-biserial {entry['rank_biserial']:.2f})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)

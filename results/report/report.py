"""The figures and tables of results/README.md, from the runs' own files (nothing typed in by hand).

    uv run python results/report/report.py            # writes results/report/*.png, prints the tables

Reads results/report/runs: the three sizes of each architecture (bdh-25M, this project's BDH at the
reference budget, with evaluate.py's weight statistics and neuron graph of the trained model), the
paper authors' bdh.py (authors, and authors-rerun for the whole text read as one); and
results/long-context/runs/ref (the same command as bdh-25M, with the same loss at every logged step,
scored over the whole text).
Measures the freshly initialised models on the CPU (sparsity, weight tails, the neuron graph's
degrees) into init.json, once.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
sys.path.insert(0, str(RESULTS.parent))
from dragon_hatchling.cli import Parser  # noqa: E402

RUNS = {  # label: run folder
    "BDH 3.3M": HERE / "runs/bdh-3M",
    "BDH 10.7M": HERE / "runs/bdh-10M",
    "BDH 25.3M (reference)": HERE / "runs/bdh-25M",
    "GPT 3.3M": HERE / "runs/gpt-3M",
    "GPT 10.9M": HERE / "runs/gpt-10M",
    "GPT 25.6M": HERE / "runs/gpt-25M",
}
AUTHORS = HERE / "runs/authors"
TRAINED = HERE / "runs/bdh-25M/eval-valid-raw-128"  # evaluate.py --neuron_graph of the reference run
STREAMS = {  # label: evaluation folders over the whole text (--stream), raw and tokens
    "BDH-GPU, this project": RESULTS / "long-context/runs/ref",
    "BDH, the paper authors' bdh.py": HERE / "runs/authors-rerun",
}
CCDF_RANGE = (10, 200)  # degrees over which the neuron graph's CCDF is fitted by a straight line
LN2 = math.log(2)


def rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def tokens_loss(m: dict) -> float:
    extra = m["final_extra_val"]["wiki_valid_tokens"]
    return extra["loss"] if isinstance(extra, dict) else extra


def plt():
    from dragon_hatchling.plots import plt as pyplot  # matplotlib off screen

    return pyplot


def save(fig, path: Path) -> None:
    from dragon_hatchling.plots import save as save_figure  # tight, atomically, closed

    save_figure(fig, path)


def curves() -> None:
    """Validation loss against bytes seen: BDH (ours), the GPT and the paper authors' code at 25M."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    runs = {
        "BDH-GPU, this project (reference recipe)": HERE / "runs/bdh-25M",
        "BDH, the paper authors' bdh.py (their recipe)": AUTHORS,
        "GPT (nanoGPT shape, reference recipe)": HERE / "runs/gpt-25M",
    }
    for label, run in runs.items():
        evals = [r for r in rows(run) if r.get("val_loss")]
        x = [int(r["bytes_seen"]) / 1e6 for r in evals]
        axes[0].plot(x, [float(r["val_loss"]) for r in evals], "o-", label=label)
        axes[1].plot(x, [float(r["val_loss_wiki_valid_tokens"]) for r in evals], "o-", label=label)
    for ax, what in zip(axes, ("wiki.valid.raw", "wiki.valid.tokens"), strict=True):
        ax.set(
            xlabel="bytes seen (millions)",
            ylabel="loss (nats/byte), 128-byte windows",
            title=what,
            ylim=(0.95, 1.8),
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("About 25M parameters, 32.4M bytes of wiki.train.tokens, one H200")
    save(fig, HERE / "curves.png")


def scaling() -> dict:
    """Final loss against parameters, log-log, with a power law fitted to each architecture."""
    pyplot = plt()
    fits = {}
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for arch, marker in (("BDH", "o"), ("GPT", "s")):
        chosen = {k: metrics(v) for k, v in RUNS.items() if k.startswith(arch)}
        n = np.array([m["num_params"] for m in chosen.values()], dtype=float)
        for ax, loss in zip(axes, ([m["final_val_loss"] for m in chosen.values()],
                                   [tokens_loss(m) for m in chosen.values()]), strict=True):  # fmt: skip
            loss = np.array(loss)
            slope, lead = np.polyfit(np.log(n), np.log(loss), 1)
            fits.setdefault(arch, []).append(-slope)
            ax.loglog(n, loss, marker, ms=8, label=f"{arch}: loss ~ N^-{-slope:.3f}")
            grid = np.geomspace(n.min(), n.max(), 20)
            ax.loglog(grid, np.exp(lead) * grid**slope, "--", lw=1, color=ax.lines[-1].get_color())
    for ax, what in zip(axes, ("wiki.valid.raw", "wiki.valid.tokens"), strict=True):
        ax.set(xlabel="parameters", ylabel="final loss (nats/byte), 128-byte windows", title=what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Scaling at the reference budget (32.4M bytes), one H200")
    save(fig, HERE / "scaling.png")
    return fits


def sparsity_during_training(init: dict) -> None:
    """Non-zero fractions of x and y at every validation, from the training logs, and at step 0."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.2))
    runs = (("3.3M", "bdh-3M", "bdh-3M"), ("10.7M", "bdh-10M", "bdh-10M"), ("25.3M", "bdh-25M", "ref"))
    for label, run, fresh in runs:  # fresh: the size's key in init.json
        evals = [r for r in rows(HERE / "runs" / run) if r.get("x_nonzero")]
        x0, y0 = init["sparsity"][fresh]["x_mean"], init["sparsity"][fresh]["y_mean"]
        x = [0.0] + [int(r["bytes_seen"]) / 1e6 for r in evals]
        line = ax.plot(x, [x0] + [float(r["x_nonzero"]) for r in evals], "o-", label=f"x, BDH {label}")[0]
        ax.plot(
            x,
            [y0] + [float(r["y_nonzero"]) for r in evals],
            "s--",
            color=line.get_color(),
            label=f"y, BDH {label}",
        )
    ax.axhline(0.05, color="k", lw=0.8, ls=":", label="5% (the paper)")
    ax.set(xlabel="bytes seen (millions)", ylabel="fraction of neurons non-zero", yscale="log",
           title="Sparsity on wiki.valid.raw during training (mean over layers)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save(fig, HERE / "sparsity.png")


def measure_init() -> dict:
    """Sparsity of fresh models of the three sizes and the weight statistics of the fresh reference
    model, on the CPU (seed 1337, as experiment.py initialises)."""
    import torch

    from dragon_hatchling.data import load_bytes_file
    from dragon_hatchling.measures import degree_summary, neuron_degrees, weight_stats
    from dragon_hatchling.scoring import activation_summary
    from model import BDH, BDHConfig

    valid = load_bytes_file(RESULTS.parent.parent / "shared/data/wikitext-2-raw-v1/wiki.valid.raw")
    out = {"sparsity": {}, "seed": 1337}
    for name, n in (("bdh-3M", 4096), ("bdh-10M", 13824), ("ref", 32768)):
        torch.manual_seed(1337)
        model = BDH(BDHConfig(n_neurons=n))
        out["sparsity"][name] = activation_summary(model, valid, 128, 8, torch.device("cpu"))
    out["weights"] = weight_stats(model)
    graph = neuron_degrees(model)  # G = E Dx, an edge above 5 standard deviations of G
    out["neuron_graph"] = {"threshold": graph["threshold"], "threshold_sd": 5.0,
                           "out_degree": degree_summary(graph["out_degree"]),
                           "in_degree": degree_summary(graph["in_degree"])}  # fmt: skip
    return out


def fmt(x: float) -> str:
    return f"{x:.4f}"


def tables(fits: dict, init: dict) -> str:
    """Final losses and speed of every run, the scaling fits, and the fresh models' sparsity."""
    lines = ["| model | parameters | raw valid: loss / bits per byte | tokens valid: loss / bits per byte "
             "| training time | bytes/s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, run in {**RUNS, "BDH, paper authors' bdh.py": AUTHORS}.items():
        m = metrics(run)
        raw, tok = m["final_val_loss"], tokens_loss(m)
        lines.append(
            f"| {label} | {m['num_params']:,} | {fmt(raw)} / {fmt(raw / LN2)} "
            f"| {fmt(tok)} / {fmt(tok / LN2)} | {m['train_time_s']:.0f} s | {m['bytes_per_s']:,} |"
        )
    lines.append("")
    lines.append("Power-law exponents (loss ~ N^-b), raw / tokens: " + "; ".join(
        f"{arch} {b[0]:.3f} / {b[1]:.3f}" for arch, b in fits.items()))  # fmt: skip
    lines.append("")
    lines.append("| fresh model | x non-zero | y non-zero |")
    lines.append("|---|---:|---:|")
    for name, s in init["sparsity"].items():
        lines.append(f"| {name} | {s['x_mean']:.3f} | {s['y_mean']:.3f} |")
    return "\n".join(
        lines
    )  # the fresh reference model's weights and graph: trained_tables, beside the trained


def ccdf_slope(histogram: dict, lo: int, hi: int) -> float:
    """The exponent b of a least-squares line log P(D >= k) = c - b log k over the degrees lo..hi."""
    from dragon_hatchling.measures import degree_ccdf

    k, at_least = degree_ccdf(histogram)
    keep = (k >= lo) & (k <= hi)
    return -float(np.polyfit(np.log(k[keep]), np.log(at_least[keep]), 1)[0])


def trained_tables(init: dict) -> str:
    """The reference model's weights and neuron graph, fresh (init.json) against trained (TRAINED),
    and both BDH models over the whole text."""
    trained = json.loads((TRAINED / "weight_stats.json").read_text())
    lines = ["| matrix | fresh: excess kurtosis / Hill (1%) | trained: excess kurtosis / Hill (1%) "
             "| trained: beyond 3 std | trained: largest / std |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, t in trained.items():
        f = init["weights"][name]
        lines.append(
            f"| {name} | {f['excess_kurtosis']:.3f} / {f['tail']['alpha']:.1f} "
            f"| {t['excess_kurtosis']:.3f} / {t['tail']['alpha']:.1f} "
            f"| {t['frac_beyond_3std']:.2%} | {t['max_abs_over_std']:.1f} |"
        )
    graph = json.loads((TRAINED / "neuron_graph.json").read_text())
    lo, hi = CCDF_RANGE
    lines += ["", f"| neuron graph | threshold (5 sd of G) | degree | mean | largest | neurons with one "
              f"| Hill tail index (top 10% of those) | least-squares CCDF slope, k = {lo}-{hi} |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for which, g in (
        ("trained", graph["model"]),
        (f"fresh (seed {graph['initial']['seed']})", graph["initial"]),
    ):
        for degree in ("out_degree", "in_degree"):
            d = g[degree]
            tail = d.get("ccdf_tail")
            hill = f"{tail['alpha']:.2f} (k >= {tail['threshold']:.0f})" if tail else "-"
            slope = f"{ccdf_slope(d['histogram'], lo, hi):.2f}" if d["max"] >= hi else "-"
            lines.append(
                f"| {which} | {g['threshold']:.4f} | {degree.split('_')[0]} | {d['mean']:.3f} | {d['max']} "
                f"| {d['nonzero']:,} | {hill} | {slope} |"
            )
    lines += [
        "",
        "| over the whole text (--stream) | wiki.valid.raw | wiki.valid.tokens |",
        "|---|---:|---:|",
    ]
    for label, run in STREAMS.items():
        raw, tok = (metrics(run / f"eval-valid-{what}-stream")["loss"] for what in ("raw", "tokens"))
        lines.append(f"| {label} | {fmt(raw)} | {fmt(tok)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    init_file = HERE / "init.json"
    if not init_file.is_file():
        from dragon_hatchling.files import write_text  # atomically

        write_text(init_file, json.dumps(measure_init(), indent=2) + "\n")
    init = json.loads(init_file.read_text())
    curves()
    fits = scaling()
    sparsity_during_training(init)
    print(tables(fits, init))
    print()
    print(trained_tables(init))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

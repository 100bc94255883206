"""Evaluate a BDH-GPU checkpoint: loss, byte perplexity, bits per byte, weight histograms.

    uv run evaluate.py --model_path results/runs/<run>            # a run folder (its best checkpoint)
    uv run evaluate.py --model_path <checkpoint folder> --split test --max_chunks 100

Protocol: window i covers bytes [i*T, i*T+T+1) of the split; input its first T bytes, targets its
last T; loss = mean cross-entropy in nats over all targets of the first --max_chunks windows.
metrics.json also splits the loss by position in the window (0-127, 128-255, 256-511, ...): score
with a --seq_len longer than the training window to see how far the model's quality carries.
With --prompt it samples through the recurrent form, keeping at most --context bytes in view.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import holds_run, write_json
from cli import Parser, UsageError, add_device_args, fail, make_out_dir, nonneg_int, positive_int
from data import SPLITS, load_bytes_file, load_split, window_batches
from devices import autocast, check_fits, resolve_device, resolve_dtype
from generate import generate, generate_recompute
from gpt import GPT, GPTConfig
from hub import HubUnreachable, load_model
from model import BDH, INIT_STD, BDHConfig

WEIGHTS = {
    "E": "E (n x d)",
    "Dx": "Dx (h x d x n/h)",
    "Dy": "Dy (h x d x n/h)",
    "embed.weight": "embedding (V x d)",
    "readout": "readout (d x V)",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model_path",
        required=True,
        help="a run folder, checkpoint folder, legacy .pt file or folder, or Hub repo id (USER/NAME)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="best or last for a run folder (best); a file name for a folder or Hub repo of .pt files "
        "(default: the newest model_epoch_N.pt)",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to load")
    p.add_argument(
        "--n_layer", type=positive_int, default=None, help="layers, for legacy .pt formats that lack it (6)"
    )
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="split to score (valid)")
    p.add_argument("--seq_len", type=positive_int, default=128, help="window length T (128)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="windows per batch (32)")
    p.add_argument(
        "--max_chunks", type=positive_int, default=None, help="score only the first N windows (default: all)"
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read the text as one, the state carried from its first byte to its last (the chunked form), "
        "instead of in windows of --seq_len",
    )
    p.add_argument(
        "--chunk_size",
        type=positive_int,
        default=CHUNK_SIZE,
        help="bytes the chunked form reads at a time, for --stream and for windows longer than this "
        f"({CHUNK_SIZE})",
    )
    add_device_args(p)
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with wiki.{split}.raw (default: Salesforce/wikitext from the Hub)",
    )
    p.add_argument(
        "--data_file",
        default=None,
        help="score this file's bytes instead of a split (e.g. wiki.valid.tokens)",
    )
    p.add_argument("--out_dir", default=None, help="where to write (default: results/eval/<name>)")
    p.add_argument("--prompt", default=None, help="also sample a continuation of this text")
    p.add_argument(
        "--max_new_bytes",
        type=positive_int,
        default=500,
        help=f"bytes to sample (500; at most {MAX_NEW_BYTES:,}), with a progress bar at a terminal",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0.8)")
    p.add_argument("--top_k", type=positive_int, default=None, help="sample from the k likeliest bytes")
    p.add_argument(
        "--context",
        type=nonneg_int,
        default=None,
        help="bytes the sampler keeps in view; past that it restarts from the last half "
        "(0: the whole text; default: the whole text for a model with decay, whose quality holds at any "
        "length, else --seq_len)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling (1337)")
    p.add_argument("--no_plots", action="store_true", help="skip the weight histograms")
    p.add_argument(
        "--neuron_graph",
        action="store_true",
        help="also the degrees of the graph E and Dx make between neurons (n x n, in blocks), for the "
        "model and a fresh one: neuron_graph.json and .png",
    )
    p.add_argument(
        "--init_seed",
        type=int,
        default=1337,
        help="the seed of --neuron_graph's fresh model (1337, experiment.py's default --seed: the run's "
        "own initial weights)",
    )
    return p


# ----------------------------------------------------------------------------- scoring

MAX_NEW_BYTES = 1_000_000  # the most bytes one sample may have (a recurrent step each)
EVAL_BATCH_BYTES = 65536  # an evaluation batch holds at most this many bytes (fewer windows when long)
CHUNK_SIZE = 1024  # the chunked form's chunk: --stream reads this many bytes at a time


def eval_batch_windows(batch_size: int, seq_len: int, batch_bytes: int = EVAL_BATCH_BYTES) -> int:
    """Windows per evaluation batch: batch_size, fewer for long windows, at least one."""
    return max(1, min(batch_size, batch_bytes // seq_len))


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Positions [0, 128), [128, 256), [256, 512), ... doubling, the last one ending at length."""
    edges = [0, min(128, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(itertools.pairwise(edges))


def by_bucket(sums: np.ndarray, counts: np.ndarray, buckets: list[tuple[int, int]]) -> dict[str, float]:
    """Mean loss in each bucket, keyed "first-last" position."""
    return {f"{a}-{b - 1}": float(s / c) for (a, b), s, c in zip(buckets, sums, counts, strict=True) if c}


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Stopped(Exception):
    """The caller's stop() asked scoring to end before its last batch (a signal arrived)."""


@torch.no_grad()
def position_loss_sums(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    max_chunks: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    stop: Callable[[], bool] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[np.ndarray, int]:
    """Cross-entropy (nats) summed over the windows at each position 0..T-1, and the windows scored.

    chunk_size: read each window through model.forward_chunked, chunk_size bytes at a time (memory
    linear in T); None: one parallel pass a window (model(x), which may be a compiled or fused model).
    stop: asked after every batch; True ends the scoring with Stopped.
    shard (rank, world): score only this rank's windows (every world-th); the caller adds up the ranks.
    """
    sums, windows = np.zeros(seq_len), 0
    with eval_mode(model):
        for x, y in window_batches(data, seq_len, batch_size, max_chunks, shard):
            x, y = x.to(device), y.to(device)
            with autocast(device, autocast_dtype):
                logits = model.forward_chunked(x, chunk_size=chunk_size)[0] if chunk_size else model(x)[0]
            loss = F.cross_entropy(logits.float().mT, y, reduction="none")  # B, T
            sums += loss.sum(0).double().cpu().numpy()
            windows += y.shape[0]
            if stop is not None and stop():
                raise Stopped
    if windows == 0 and shard[1] == 1:
        raise UsageError(f"the split ({len(data)} bytes) is shorter than one window of {seq_len + 1}")
    return sums, windows


def evaluate_loss(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    max_chunks: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[float, int]:
    """Mean cross-entropy (nats per byte) over all targets of the windows, and the bytes scored."""
    sums, windows = position_loss_sums(
        model, data, seq_len, batch_size, device, max_chunks, autocast_dtype, stop=stop
    )
    return float(sums.sum() / (windows * seq_len)), windows * seq_len


def loss_by_position(sums: np.ndarray, windows: int) -> dict[str, float]:
    """Mean loss over positions 0-127, 128-255, 256-511, ... of the window (a model trained on short
    windows may not carry its quality to later positions)."""
    buckets = position_buckets(len(sums))
    return by_bucket(
        np.array([sums[a:b].sum() for a, b in buckets]), [windows * (b - a) for a, b in buckets], buckets
    )


@torch.no_grad()
def stream_loss_sums(
    model: BDH,
    data: np.ndarray,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The text read as one: the chunked form carries its state from the first byte to the last.

    Byte i + 1 is scored at position i, having seen bytes 0..i. Returns the cross-entropy summed
    in each position bucket, the bytes in each, and the buckets (position_buckets). Memory does not
    grow with the text: one chunk, the state (float32, B = 1) and the sums.
    """
    buckets = position_buckets(len(data) - 1)
    starts = np.array([a for a, _ in buckets])
    sums, counts = np.zeros(len(buckets)), np.zeros(len(buckets), dtype=np.int64)
    state = model.initial_state(1, device)
    with eval_mode(model):
        for p0 in tqdm(range(0, len(data) - 1, chunk_size), desc="stream", unit="chunk", disable=None):
            chunk = torch.from_numpy(np.asarray(data[p0 : p0 + chunk_size + 1]).astype(np.int64)).to(device)
            with autocast(device, autocast_dtype):
                logits, _, state = model.forward_chunked(chunk[None, :-1], chunk_size=chunk_size, state=state)
            loss = F.cross_entropy(logits[0].float(), chunk[1:], reduction="none").double().cpu().numpy()
            which = np.searchsorted(starts, np.arange(p0, p0 + len(loss)), side="right") - 1
            np.add.at(sums, which, loss)
            np.add.at(counts, which, 1)
    return sums, counts, buckets


@torch.no_grad()
def activation_summary(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    windows: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Fraction of non-zero neurons x and y, per layer and averaged, on the first `windows` windows."""
    idx = next(window_batches(data, seq_len, windows))[0].to(device)
    with eval_mode(model), autocast(device, autocast_dtype):
        per_layer = model.activation_stats(idx)
    return {
        "x_mean": float(np.mean([s["x_nonzero"] for s in per_layer])),
        "rope_x_mean": float(np.mean([s["rope_x_nonzero"] for s in per_layer])),
        "y_mean": float(np.mean([s["y_nonzero"] for s in per_layer])),
        "per_layer": per_layer,
    }


def plot_loss_by_position(by_position: dict[str, float], path: Path, title: str) -> None:
    """Loss against position (log scale): one point per bucket, at its geometric middle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = [tuple(int(p) for p in k.split("-")) for k in by_position]
    middles = [math.sqrt(max(a, 1) * (b + 1)) for a, b in spans]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(middles, list(by_position.values()), "o-")
    ax.set_xscale("log")
    ax.set(xlabel="position (bytes seen before the scored byte)", ylabel="loss (nats/byte)", title=title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_context(args: argparse.Namespace, config: BDHConfig | GPTConfig) -> int | None:
    """The sampler's window (None: the whole text): --context (0: the whole text), else the whole text
    for a model with decay (its quality holds at any length) and --seq_len for one without. A GPT:
    at most its block_size."""
    if isinstance(config, GPTConfig):
        return min(args.context or args.seq_len, config.block_size)
    if args.context is not None:
        return args.context or None
    return None if config.half_lives is not None else args.seq_len


def sample_text(model: BDH, prompt: str, args: argparse.Namespace, device, dtype) -> str:
    """The prompt and a sampled continuation, decoded as UTF-8 (invalid bytes replaced)."""
    idx = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sampler = copy.deepcopy(model).to(dtype)  # weights in the dtype itself: a CUDA graph takes no autocast
    if isinstance(model, GPT):  # no recurrent form: the window again for every byte
        out = generate_recompute(
            sampler,
            idx,
            args.max_new_bytes,
            args.temperature,
            args.top_k,
            gen,
            sample_context(args, model.config),
        )
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")
    context = sample_context(args, model.config)
    out = generate(
        sampler, idx, args.max_new_bytes, args.temperature, args.top_k, gen, context, progress=True
    )
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


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
    return {"alpha": float(k / logs.sum()), "k": k, "threshold": float(threshold), "fraction": fraction}


def weight_stats(model: BDH) -> dict[str, dict[str, float]]:
    """Mean, std, excess kurtosis, the fraction beyond 3 std and the tail index (Hill, the largest 1%
    of |w|) of each weight matrix. A Gaussian has excess kurtosis 0 and no finite tail index."""
    stats = {}
    for name, w in model.named_parameters():
        w = w.detach().double().flatten()
        mean, std = w.mean().item(), w.std().item()
        z = (w - mean) / std
        stats[name] = {
            "numel": w.numel(),
            "mean": mean,
            "std": std,
            "excess_kurtosis": (z**4).mean().item() - 3.0,
            "frac_beyond_3std": (z.abs() > 3).double().mean().item(),
            "max_abs_over_std": (w.abs().max().item() / std),
            "tail": hill_tail_index((w - mean).numpy()),
        }
    return stats


@torch.no_grad()
def neuron_degrees(
    model: BDH, threshold: float | None = None, threshold_sd: float = 5.0, block: int = 1024
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


def gpt_weights(config: GPTConfig) -> dict[str, str]:
    """The GPT's matrices weights.png shows: embedding, positions, the first layer's and the last's
    (those that start Normal(0, INIT_STD), as the initial-weights curve assumes)."""
    last = config.n_layer - 1
    return {
        "wte.weight": "embedding = readout (V x d)",
        "wpe.weight": "positions (block x d)",
        "blocks.0.attn.qkv.weight": "layer 1 attention qkv (3d x d)",
        "blocks.0.mlp.0.weight": "layer 1 MLP in (4d x d)",
        f"blocks.{last}.mlp.0.weight": f"layer {last + 1} MLP in (4d x d)",
    }


def plot_histograms(model: BDH, stats: dict, path: Path, title: str) -> None:
    """Log-scale histograms of every weight matrix, with a Gaussian of the same std dashed and the
    initial weights' distribution (Normal, std INIT_STD) dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = dict(model.named_parameters())
    shown = gpt_weights(model.config) if isinstance(model, GPT) else WEIGHTS
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6))
    for ax, (name, label) in zip(axes, shown.items(), strict=True):
        w = params[name].detach().float().flatten().numpy()
        counts, edges, _ = ax.hist(w, bins=121, log=True, color="tab:blue", alpha=0.8)
        s = stats[name]
        centers = (edges[:-1] + edges[1:]) / 2
        gauss = w.size * (edges[1] - edges[0]) * np.exp(-0.5 * ((centers - s["mean"]) / s["std"]) ** 2)
        gauss /= s["std"] * math.sqrt(2 * math.pi)
        ax.plot(centers, np.where(gauss >= 0.5, gauss, np.nan), "k--", lw=1, label="Gaussian, same std")
        init = w.size * (edges[1] - edges[0]) * np.exp(-0.5 * (centers / INIT_STD) ** 2)
        init /= INIT_STD * math.sqrt(2 * math.pi)
        ax.plot(
            centers,
            np.where(init >= 0.5, init, np.nan),
            ":",
            color="tab:red",
            lw=1.2,
            label="initial weights",
        )
        ax.set_ylim(bottom=0.5)
        kurtosis, alpha = s["excess_kurtosis"], s["tail"]["alpha"]
        ax.set_title(f"{label}\nexcess kurtosis {kurtosis:.2f}, tail index {alpha:.1f}", fontsize=9)
        ax.set_xlabel("weight")
    axes[0].set_ylabel("count (log)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def neuron_graph(model: BDH, path: Path, title: str, init_seed: int = 1337) -> dict:
    """Degrees of the neuron graph (neuron_degrees) of the model and of a fresh one of its config
    drawn with `init_seed` (experiment.py's --seed: the run's own initial weights), their summaries,
    and log-log plots of the out- and in-degrees' complementary CDF, with the Hill fits, at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(init_seed)
    initial = BDH(model.config).to(model.E.device)  # drawn on the CPU, as experiment.py does
    out = {}
    for name, m in (("model", model), ("initial", initial)):
        graph = neuron_degrees(m)
        out[name] = {
            "threshold": graph["threshold"],
            "out_degree": degree_summary(graph["out_degree"]),
            "in_degree": degree_summary(graph["in_degree"]),
        }
    out["initial"]["seed"] = init_seed
    out["edges"] = "G = E Dx (n x n); an edge i -> j, i != j, where G[i, j] > 5 standard deviations of G"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, which in zip(axes, ("out_degree", "in_degree"), strict=True):
        for name, color in (("model", "C0"), ("initial", "C1")):
            summary = out[name][which]
            k, ccdf = degree_ccdf(summary["histogram"])
            if not k.size:
                ax.plot([], [], " ", label=f"{name}: no edge above the threshold")
                continue
            ax.loglog(
                k, ccdf, "o", ms=2.5, color=color, label=f"{name}: {summary['nonzero']:,} neurons with one"
            )
            tail = summary.get("ccdf_tail")
            if tail:  # the Hill fit, P(D >= k) ~ k^-alpha, through its threshold, over its range
                k0 = tail["threshold"]
                span = np.array([k0, summary["max"]], dtype=np.float64)
                at_k0 = ccdf[np.searchsorted(k, k0)]
                ax.loglog(span, at_k0 * (span / k0) ** -tail["alpha"], "--", color=color, lw=1,
                          label=f"Hill fit: alpha {tail['alpha']:.2f} over k >= {k0:.0f}")  # fmt: skip
        what = which.replace("_", "-")
        ax.set(xlabel=f"{what} k", ylabel=f"P({what} >= k), all neurons")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: neuron graph {out['edges']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def check_gpt_args(args: argparse.Namespace, config: GPTConfig) -> None:
    """What a GPT cannot do: read a text as one (it has no recurrent form), windows longer than its
    block_size, the neuron graph (it has no neurons)."""
    if args.stream:
        raise UsageError("--stream reads the text through BDH's recurrent form; a GPT has none (use windows)")
    if args.seq_len > config.block_size:
        raise UsageError(f"--seq_len {args.seq_len} is longer than this GPT's block_size {config.block_size}")
    if args.neuron_graph:
        raise UsageError("--neuron_graph is the graph of BDH's neurons; a GPT has none")
    if args.context is not None and args.context > config.block_size:
        raise UsageError(f"--context {args.context} is longer than this GPT's block_size {config.block_size}")


def scoring_bytes(config: BDHConfig | GPTConfig, args: argparse.Namespace) -> int:
    """A lower bound on the memory scoring takes: float32 weights, and x and y of one layer for a
    batch (of one chunk of the window or text, when it goes through the chunked form), with the
    chunked form's state. A GPT: its weights and one layer's activations (about 16 d a byte)."""
    if isinstance(config, GPTConfig):
        return (
            4 * config.num_params
            + 4 * eval_batch_windows(args.batch_size, args.seq_len) * args.seq_len * 16 * config.n_embd
        )
    chunked = args.stream or args.seq_len > args.chunk_size
    batch = 1 if args.stream else eval_batch_windows(args.batch_size, args.seq_len)
    chunk = args.chunk_size if chunked else args.seq_len
    state = 4 * batch * config.n_layer * config.n_neurons * config.n_embd if chunked else 0
    return 4 * config.num_params + 2 * 4 * batch * chunk * config.n_neurons + state


def score(model: BDH, data: np.ndarray, args: argparse.Namespace, device, dtype) -> dict:
    """Loss, bits/byte, perplexity and loss by position: of windows (the protocol), or of the whole
    text read as one (--stream)."""
    if args.stream:
        sums, counts, buckets = stream_loss_sums(model, data, device, dtype, args.chunk_size)
        by_position = by_bucket(sums, counts, buckets)
        n_bytes, loss = int(counts.sum()), float(sums.sum() / counts.sum())
    else:
        chunked = args.chunk_size if args.seq_len > args.chunk_size else None  # long windows: linear memory
        batch = eval_batch_windows(args.batch_size, args.seq_len)
        sums, windows = position_loss_sums(
            model, data, args.seq_len, batch, device, args.max_chunks, dtype, chunk_size=chunked
        )
        by_position = loss_by_position(sums, windows)
        n_bytes = windows * args.seq_len
        loss = float(sums.sum() / n_bytes)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": loss / math.log(2),
        "bytes": n_bytes,
        "mode": "stream" if args.stream else "windows",
        "loss_by_position": by_position,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.temperature < math.inf:
            raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
        if args.prompt == "":
            raise UsageError("--prompt must not be empty")
        if args.max_new_bytes > MAX_NEW_BYTES:
            raise UsageError(f"--max_new_bytes {args.max_new_bytes:,} is more than {MAX_NEW_BYTES:,}")
        if args.context == 1:
            raise UsageError("--context must be 0 (no limit) or at least 2 bytes, got 1")
        if args.stream and args.max_chunks is not None:
            raise UsageError(
                "--max_chunks counts windows; --stream reads the whole text (cut it with --data_file)"
            )
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.data_file is not None:
            data = load_bytes_file(args.data_file, what="--data_file")
        else:
            data = load_split(args.split, args.data_dir)
        if args.stream and len(data) < 2:
            raise UsageError(f"--stream needs a text of at least 2 bytes, got {len(data)}")
        out_dir = Path(args.out_dir or Path("results/eval") / Path(args.model_path).resolve().name)
        if holds_run(out_dir):
            raise UsageError(
                f"--out_dir {out_dir} holds a training run, whose metrics.json this would replace; "
                f"choose another folder (e.g. {out_dir / 'eval'})"
            )
        make_out_dir(out_dir)
        model, source = load_model(args.model_path, args.checkpoint, args.revision, args.n_layer)
        if isinstance(model, GPT):
            check_gpt_args(args, model.config)
        check_fits(scoring_bytes(model.config, args), device, "scoring this model")
        model = model.to(device).eval()
        if args.prompt is not None and sample_context(args, model.config) == 1:
            raise UsageError("--seq_len 1 as the sampler's window: pass --context 0 or at least 2")
        metrics = score(model, data, args, device, dtype)
    except UsageError as e:
        fail(str(e))
    except HubUnreachable as e:
        fail(str(e), code=1)

    shown = min(8, args.batch_size, args.max_chunks or 8)
    metrics.update(
        {
            "split": args.split if args.data_file is None else None,
            "data_file": args.data_file,
            "seq_len": None if args.stream else args.seq_len,
            "chunk_size": args.chunk_size,
            "max_chunks": args.max_chunks,
            "model_path": str(args.model_path),
            "model_source": source,
            "data_dir": args.data_dir,
            "dtype": str(dtype).removeprefix("torch."),
            "config": model.config.to_dict(),
            "num_params": model.num_params(),
            "activation_nonzero": None
            if isinstance(model, GPT)
            else activation_summary(model, data, min(args.seq_len, len(data) - 1), shown, device, dtype),
        }
    )
    if args.prompt is not None:
        sample = sample_text(model, args.prompt, args, device, dtype)
        (out_dir / "sample.txt").write_text(sample)
        print(f"--- sample (temperature {args.temperature}, top_k {args.top_k}) ---\n{sample}\n---")
        metrics["sample"] = {
            "prompt": args.prompt,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "max_new_bytes": args.max_new_bytes,
            "context": sample_context(args, model.config),
            "seed": args.seed,
        }
    if args.neuron_graph:
        write_json(
            out_dir / "neuron_graph.json",
            neuron_graph(model, out_dir / "neuron_graph.png", str(args.model_path), args.init_seed),
        )
    model = model.cpu()
    stats = weight_stats(model)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "weight_stats.json", stats)
    what = args.data_file or args.split
    if not args.no_plots:
        name = "GPT" if isinstance(model, GPT) else "BDH-GPU"
        plot_histograms(model, stats, out_dir / "weights.png", f"{name} weights: {args.model_path}")
        read = "one text, state carried" if args.stream else f"windows of {args.seq_len} bytes"
        plot_loss_by_position(
            metrics["loss_by_position"],
            out_dir / "loss_by_position.png",
            f"{what} ({read}): {args.model_path}",
        )
    print(
        f"{what}{' (stream)' if args.stream else ''}: loss {metrics['loss']:.4f} nats/byte, "
        f"perplexity {metrics['perplexity']:.4f}, {metrics['bpb']:.4f} bits/byte "
        f"over {metrics['bytes']:,} bytes; "
        + (
            f"non-zero neurons x {live['x_mean']:.1%}, y {live['y_mean']:.1%}; "
            if (live := metrics["activation_nonzero"])
            else ""
        )
        + f"wrote {out_dir}"
    )
    by_position = metrics["loss_by_position"]
    if len(by_position) > 1:
        print("loss by position: " + ", ".join(f"{k} {v:.4f}" for k, v in by_position.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

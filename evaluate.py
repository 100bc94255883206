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
import math
import sys
from pathlib import Path

import numpy as np
import torch

from data import (
    SPLITS,
    Parser,
    UsageError,
    activation_summary,
    add_device_args,
    fail,
    load_bytes_file,
    load_split,
    loss_by_position,
    make_out_dir,
    nonneg_int,
    position_loss_sums,
    positive_int,
    resolve_device,
    resolve_dtype,
    write_json,
)
from generate import generate
from hub import load_model
from model import BDH

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
    p.add_argument("--max_new_bytes", type=positive_int, default=500, help="bytes to sample (500)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0.8)")
    p.add_argument("--top_k", type=positive_int, default=None, help="sample from the k likeliest bytes")
    p.add_argument(
        "--context",
        type=nonneg_int,
        default=None,
        help="bytes the sampler keeps in view; past that it restarts from the last half "
        "(default: --seq_len, the window it was trained and scored on; 0: the whole text)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed for sampling (1337)")
    p.add_argument("--no_plots", action="store_true", help="skip the weight histograms")
    return p


def sample_context(args: argparse.Namespace) -> int | None:
    """The sampler's window: --context, else --seq_len; 0 means no limit."""
    context = args.seq_len if args.context is None else args.context
    return context or None


def sample_text(model: BDH, prompt: str, args: argparse.Namespace, device, dtype) -> str:
    """The prompt and a sampled continuation, decoded as UTF-8 (invalid bytes replaced)."""
    idx = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sampler = copy.deepcopy(model).to(dtype)  # weights in the dtype itself: a CUDA graph takes no autocast
    context = sample_context(args)
    out = generate(sampler, idx, args.max_new_bytes, args.temperature, args.top_k, gen, context)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def weight_stats(model: BDH) -> dict[str, dict[str, float]]:
    """Mean, std, excess kurtosis and the fraction beyond 3 std of each weight matrix."""
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
        }
    return stats


def plot_histograms(model: BDH, stats: dict, path: Path, title: str) -> None:
    """Log-scale histograms of every weight matrix, with a Gaussian of the same std dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = dict(model.named_parameters())
    fig, axes = plt.subplots(1, len(WEIGHTS), figsize=(4 * len(WEIGHTS), 3.6))
    for ax, (name, label) in zip(axes, WEIGHTS.items(), strict=True):
        w = params[name].detach().float().flatten().numpy()
        counts, edges, _ = ax.hist(w, bins=121, log=True, color="tab:blue", alpha=0.8)
        s = stats[name]
        centers = (edges[:-1] + edges[1:]) / 2
        gauss = w.size * (edges[1] - edges[0]) * np.exp(-0.5 * ((centers - s["mean"]) / s["std"]) ** 2)
        gauss /= s["std"] * math.sqrt(2 * math.pi)
        ax.plot(centers, np.where(gauss >= 0.5, gauss, np.nan), "k--", lw=1, label="Gaussian, same std")
        ax.set_ylim(bottom=0.5)
        ax.set_title(f"{label}\nexcess kurtosis {s['excess_kurtosis']:.2f}", fontsize=9)
        ax.set_xlabel("weight")
    axes[0].set_ylabel("count (log)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
        if args.prompt == "":
            raise UsageError("--prompt must not be empty")
        if sample_context(args) == 1:
            raise UsageError("--context must be 0 (no limit) or at least 2 bytes, got 1")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.data_file is not None:
            data = load_bytes_file(args.data_file, what="--data_file")
        else:
            data = load_split(args.split, args.data_dir)
        model, source = load_model(args.model_path, args.checkpoint, args.revision, args.n_layer)
        model = model.to(device).eval()
        sums, scored = position_loss_sums(
            model, data, args.seq_len, args.batch_size, device, args.max_chunks, dtype
        )
        out_dir = make_out_dir(args.out_dir or Path("results/eval") / Path(args.model_path).resolve().name)
    except UsageError as e:
        fail(str(e))

    shown = min(8, args.batch_size, args.max_chunks or 8)
    sparsity = activation_summary(model, data, args.seq_len, shown, device, dtype)
    n_bytes = scored * args.seq_len
    loss = float(sums.sum() / n_bytes)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": loss / math.log(2),
        "bytes": n_bytes,
        "split": args.split if args.data_file is None else None,
        "data_file": args.data_file,
        "seq_len": args.seq_len,
        "max_chunks": args.max_chunks,
        "model_path": str(args.model_path),
        "model_source": source,
        "data_dir": args.data_dir,
        "dtype": str(dtype).removeprefix("torch."),
        "config": model.config.to_dict(),
        "num_params": model.num_params(),
        "activation_nonzero": sparsity,
        "loss_by_position": loss_by_position(sums, scored),
    }
    if args.prompt is not None:
        sample = sample_text(model, args.prompt, args, device, dtype)
        (out_dir / "sample.txt").write_text(sample)
        print(f"--- sample (temperature {args.temperature}, top_k {args.top_k}) ---\n{sample}\n---")
        metrics["sample"] = {
            "prompt": args.prompt,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "max_new_bytes": args.max_new_bytes,
            "context": sample_context(args),
            "seed": args.seed,
        }
    model = model.cpu()
    stats = weight_stats(model)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "weight_stats.json", stats)
    if not args.no_plots:
        plot_histograms(model, stats, out_dir / "weights.png", f"BDH-GPU weights: {args.model_path}")
    print(
        f"{args.data_file or args.split}: loss {loss:.4f} nats/byte, perplexity {metrics['perplexity']:.4f}, "
        f"{metrics['bpb']:.4f} bits/byte over {n_bytes:,} bytes; "
        f"non-zero neurons x {metrics['activation_nonzero']['x_mean']:.1%}, "
        f"y {metrics['activation_nonzero']['y_mean']:.1%}; wrote {out_dir}"
    )
    by_position = metrics["loss_by_position"]
    if len(by_position) > 1:
        print("loss by position: " + ", ".join(f"{k} {v:.4f}" for k, v in by_position.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

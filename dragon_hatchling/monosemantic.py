"""Monosemantic synapses (the paper's section 6.3): entries of the synapse state sigma (synapses.py)
whose value at a sentence's end separates sentences that name a concept from contrast sentences.

    uv run python -m dragon_hatchling.monosemantic --model_path RUN --concept A.txt --contrast B.txt \\
        --test_concept C.txt --test_contrast D.txt --out_dir results/synapses/currency

Every file holds one sentence a line. On the search sets, every entry (layer l >= 1, head, i, j) is
scored by how far its mean over the concept sentences lies above its mean over the contrast ones,
in standard errors (Welch's t). The best entries are then tested on the held-out sets (without
--test_concept/--test_contrast: the odd lines of the search files, searched on the even ones): the
one-sided Mann-Whitney U (concept above contrast), its p-value (normal approximation, ties
corrected) and the rank-biserial correlation 2U / (n1 n2) - 1. Writes monosemantic.json (the entries,
their neurons, the statistics) and synapse.png (the best entry's value byte by byte through a few
held-out sentences of each set).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling import plots
from dragon_hatchling.cli import Parser, UsageError, fail, make_out_dir, positive_int
from dragon_hatchling.devices import resolve_device
from dragon_hatchling.files import write_json
from dragon_hatchling.loading import load_model
from dragon_hatchling.synapses import entry_series, layer_neurons, sigma_of
from model import BDH

MAX_SENTENCE = 1024  # bytes of a sentence that are read (the rest is cut)


# ----------------------------------------------------------------------------- statistics


def mann_whitney(a: np.ndarray, b: np.ndarray) -> dict:
    """One-sided Mann-Whitney U of a above b: U (pairs a > b, ties half), the p-value of the normal
    approximation with the tie correction, and the rank-biserial correlation 2U / (n1 n2) - 1."""
    n1, n2 = len(a), len(b)
    values = np.concatenate([a, b])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, ranks)[inverse] / counts[inverse]  # ties share their mean rank
    U = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - (counts**3 - counts).sum() / (n * (n - 1)))
    z = (U - n1 * n2 / 2 - 0.5) / math.sqrt(var) if var > 0 else 0.0  # continuity-corrected
    return {
        "U": U,
        "n1": n1,
        "n2": n2,
        "p": 0.5 * math.erfc(z / math.sqrt(2)),
        "rank_biserial": 2 * U / (n1 * n2) - 1,
    }


@dataclass
class Moments:
    """Running sums of one set's sigma entries (h, n/h, n/h each), for means and variances."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        self.total += values
        self.squares += values * values
        self.count += 1

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean * mean).clamp(min=0) * self.count / max(
            1, self.count - 1
        )


def welch_t(concept: Moments, contrast: Moments) -> torch.Tensor:
    """(mean_concept - mean_contrast) / its standard error, entry by entry (0 where both are constant)."""
    (m1, v1), (m2, v2) = concept.mean_var(), contrast.mean_var()
    se = (v1 / concept.count + v2 / contrast.count).sqrt()
    return torch.where(se > 0, (m1 - m2) / se.clamp(min=1e-30), torch.zeros_like(se))


# ----------------------------------------------------------------------------- search and test


@dataclass
class Entry:
    """One synapse: sigma[i, j] of a head at a layer (i: y of the layer before, j: x of this one)."""

    layer: int
    head: int
    i: int
    j: int
    search_t: float

    def neurons(self, model: BDH) -> dict:
        m = model.config.head_size
        return {"y_neuron": self.head * m + self.i, "x_neuron": self.head * m + self.j}


def sentence_tensor(sentence: bytes, device) -> torch.Tensor:
    return torch.tensor([list(sentence[:MAX_SENTENCE])], dtype=torch.long, device=device)  # 1, T


@torch.no_grad()
def search(model: BDH, concept: list[bytes], contrast: list[bytes], top: int, device) -> list[Entry]:
    """The `top` entries of every layer's sigma (at each sentence's end) by Welch's t, concept above
    contrast, best first."""
    h, m = model.config.n_head, model.config.head_size
    found = []
    for layer in range(1, model.config.n_layer):
        moments = [
            Moments(torch.zeros(h, m, m, device=device), torch.zeros(h, m, m, device=device)) for _ in "ab"
        ]
        for group, sentences in zip(moments, (concept, contrast), strict=True):
            for s in sentences:
                idx = sentence_tensor(s, device)
                group.add(sigma_of(model, layer_neurons(model, idx), layer, idx.shape[1]))
        t = welch_t(*moments).flatten()
        values, where = t.topk(min(top, t.numel()))
        for value, flat in zip(values.tolist(), where.tolist(), strict=True):
            head, rest = divmod(flat, m * m)
            found.append(Entry(layer, head, *divmod(rest, m), search_t=value))
    return sorted(found, key=lambda e: -e.search_t)[:top]


@torch.no_grad()
def end_values(model: BDH, entries: list[Entry], sentences: list[bytes], device) -> np.ndarray:
    """Each entry's value at each sentence's end (sentences x entries)."""
    out = np.zeros((len(sentences), len(entries)))
    for row, s in enumerate(sentences):
        neurons = layer_neurons(model, sentence_tensor(s, device))
        for col, e in enumerate(entries):
            out[row, col] = entry_series(model, neurons, e.layer, e.head, e.i, e.j)[-1].item()
    return out


def test_entries(
    model: BDH, entries: list[Entry], concept: list[bytes], contrast: list[bytes], device
) -> list:
    """The held-out test of every entry: its neurons, search t, Mann-Whitney U, p, rank-biserial."""
    a, b = end_values(model, entries, concept, device), end_values(model, entries, contrast, device)
    return [{**vars(e), **e.neurons(model), **mann_whitney(a[:, k], b[:, k])} for k, e in enumerate(entries)]


@torch.no_grad()
def series_of(model: BDH, entry: Entry, sentences: list[bytes], device) -> list[list[float]]:
    """The entry's value after every byte of each sentence."""
    out = []
    for s in sentences:
        neurons = layer_neurons(model, sentence_tensor(s, device))
        out.append(entry_series(model, neurons, entry.layer, entry.head, entry.i, entry.j).tolist())
    return out


# ----------------------------------------------------------------------------- the command


def read_sentences(path: str, flag: str) -> list[bytes]:
    """A file's non-empty lines, as bytes (at least 2)."""
    try:
        lines = [line.strip() for line in Path(path).read_bytes().split(b"\n")]
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise UsageError(f"{flag} {path}: expected at least 2 sentences, one a line; it has {len(lines)}")
    return lines


def sentence_sets(args: argparse.Namespace) -> tuple[list[bytes], ...]:
    """Search concept, search contrast, test concept, test contrast (test: the odd lines if no test files)."""
    concept, contrast = read_sentences(args.concept, "--concept"), read_sentences(args.contrast, "--contrast")
    if (args.test_concept is None) != (args.test_contrast is None):
        raise UsageError(
            "--test_concept and --test_contrast go together (or neither: the odd lines are held out)"
        )
    if args.test_concept is None:
        return concept[0::2], contrast[0::2], concept[1::2], contrast[1::2]
    return concept, contrast, read_sentences(args.test_concept, "--test_concept"), read_sentences(
        args.test_contrast, "--test_contrast")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="a run folder, checkpoint, .pt or Hub repo id (BDH)")
    p.add_argument("--checkpoint", default=None, help="best or last for a run folder (best)")
    p.add_argument("--concept", required=True, help="sentences that name the concept, one a line (search)")
    p.add_argument("--contrast", required=True, help="sentences that do not, one a line (search)")
    p.add_argument("--test_concept", default=None, help="held-out concept sentences (default: odd lines)")
    p.add_argument("--test_contrast", default=None, help="held-out contrast sentences")
    p.add_argument(
        "--top", type=positive_int, default=10, help="entries kept from the search and tested (10)"
    )
    p.add_argument("--show", type=positive_int, default=3, help="held-out sentences of each set drawn (3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out_dir", required=True, help="where monosemantic.json and synapse.png go")
    return p


SETS = ("search_concept", "search_contrast", "test_concept", "test_contrast")


def run(args: argparse.Namespace) -> dict:
    """Search, test, the best entry's series: everything monosemantic.json holds."""
    sets = dict(zip(SETS, sentence_sets(args), strict=True))
    device = resolve_device(args.device)
    model, _ = load_model(args.model_path, args.checkpoint)
    if not model.has_neurons or model.config.n_layer < 2:
        raise UsageError(f"--model_path {args.model_path}: sigma needs a BDH of at least 2 layers")
    make_out_dir(Path(args.out_dir))
    model = model.to(device).eval()
    entries = search(model, sets["search_concept"], sets["search_contrast"], args.top, device)
    held = {"concept": sets["test_concept"], "contrast": sets["test_contrast"]}
    return {
        "model_path": args.model_path,
        "sentences": {name: len(s) for name, s in sets.items()},
        "entries": test_entries(model, entries, held["concept"], held["contrast"], device),
        "best_series": {
            name: series_of(model, entries[0], s[: args.show], device) for name, s in held.items()
        },
        "best_texts": {
            name: [t.decode("utf-8", "replace") for t in s[: args.show]] for name, s in held.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UsageError as e:
        fail(str(e))
    out_dir, best = Path(args.out_dir), result["entries"][0]
    write_json(out_dir / "monosemantic.json", result)
    plots.synapse_series(result["best_series"], result["best_texts"], best, out_dir / "synapse.png")
    print(
        f"best synapse: layer {best['layer']}, head {best['head']}, y neuron {best['y_neuron']} -> x "
        f"neuron {best['x_neuron']}: held out U = {best['U']:.0f} of {best['n1'] * best['n2']}, "
        f"p = {best['p']:.2g}, rank-biserial {best['rank_biserial']:.2f}; wrote {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

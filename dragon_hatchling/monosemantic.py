"""Monosemantic synapses (the paper's section 6.3): entries of the synapse state sigma (synapses.py)
whose value at a sentence's end separates sentences that name a concept from contrast sentences.

    uv run python -m dragon_hatchling.monosemantic --model_path RUN --concept A.txt --contrast B.txt \\
        --test_concept C.txt --test_contrast D.txt --out_dir results/synapses/currency

Every file holds one sentence a line. On the search sets, the entries (layer l >= 1, head, i, j)
whose mean at the sentences' ends is most above over the concept sentences (--candidates of each
layer, from sums of products: no sentence's whole sigma is made) are scored by how far, in standard
errors (Welch's t, from every sentence's value of the entry). The best entries are then tested on
the held-out sets (without --test_concept/--test_contrast: the odd lines of the search files,
searched on the even ones): the one-sided Mann-Whitney U (concept above contrast), its p-value
(normal approximation, ties corrected) and the rank-biserial correlation 2U / (n1 n2) - 1. Writes
monosemantic.json (the entries, their neurons, the statistics) and synapse.png (the best entry's
value byte by byte through a few held-out sentences of each set).
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
from dragon_hatchling.synapses import entry_series, layer_neurons, terms
from model import BDH

MAX_SENTENCE = 1024  # bytes of a sentence that are read (the rest is cut)
CANDIDATES = 65536  # entries of each layer whose every sentence's value the search computes


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


def sentence_terms(model: BDH, sentences: list[bytes], layer: int, device):
    """Each sentence's factors of sigma at its end (synapses.terms): [(y, x)], h, T, n/h each."""
    out = []
    for s in sentences:
        idx = sentence_tensor(s, device)
        out.append(terms(model, layer_neurons(model, idx), layer, idx.shape[1]))
    return out


def mean_sigma(factors: list, group: int = 64) -> torch.Tensor:
    """The mean of the sentences' sigma (h, n/h, n/h), as products of their stacked factors, group
    sentences at a time: no sentence's sigma is ever made alone."""
    total = 0
    for g in range(0, len(factors), group):
        part = factors[g : g + group]
        total = total + torch.cat([y for y, _ in part], 1).mT @ torch.cat([x for _, x in part], 1)
    return total / len(factors)


def entry_values(factors: list, heads: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> np.ndarray:
    """sigma[head, i, j] at each sentence's end, for K entries (sentences x K)."""
    return np.stack([(y[heads, :, i] * x[heads, :, j]).sum(1).cpu().double().numpy() for y, x in factors])


def welch_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(mean a - mean b) / its standard error, column by column (0 where both sets are constant)."""
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return np.where(se > 0, (a.mean(0) - b.mean(0)) / np.where(se > 0, se, 1), 0.0)


@torch.no_grad()
def search(
    model: BDH, concept: list[bytes], contrast: list[bytes], top: int, device, candidates: int = CANDIDATES
) -> list[Entry]:
    """The `top` entries of every layer's sigma at the sentences' ends by Welch's t, concept above
    contrast, best first: among the `candidates` of each layer whose mean is most above (sigma of
    the default model is 4 x 8192 x 8192 a layer; every entry's t would need every sentence's sigma)."""
    m, found = model.config.head_size, []
    for layer in range(1, model.config.n_layer):
        sets = [sentence_terms(model, s, layer, device) for s in (concept, contrast)]
        diff = (mean_sigma(sets[0]) - mean_sigma(sets[1])).flatten()
        where = diff.topk(min(candidates, diff.numel())).indices
        heads, i, j = where // (m * m), where % (m * m) // m, where % m
        t = welch_t(*(entry_values(f, heads, i, j) for f in sets))
        for k in np.argsort(-t)[:top]:
            found.append(Entry(layer, int(heads[k]), int(i[k]), int(j[k]), search_t=float(t[k])))
    return sorted(found, key=lambda e: -e.search_t)[:top]


def held_out(model: BDH, entries: list[Entry], concept: list[bytes], contrast: list[bytes], device) -> list:
    """The held-out test of every entry: its neurons, search t, Mann-Whitney U, p, rank-biserial."""
    tested = [None] * len(entries)
    for layer in sorted({e.layer for e in entries}):
        mine = [k for k, e in enumerate(entries) if e.layer == layer]
        heads, i, j = (
            torch.tensor([getattr(entries[k], f) for k in mine], device=device) for f in ("head", "i", "j")
        )
        a, b = (
            entry_values(sentence_terms(model, s, layer, device), heads, i, j) for s in (concept, contrast)
        )
        for col, k in enumerate(mine):
            e = entries[k]
            tested[k] = {**vars(e), **e.neurons(model), **mann_whitney(a[:, col], b[:, col])}
    return tested


@torch.no_grad()
def series_of(model: BDH, entry: Entry, sentences: list[bytes], device) -> list[list[float]]:
    """The entry's value after every byte of each sentence."""
    out = []
    for s in sentences:
        neurons = layer_neurons(model, sentence_tensor(s, device))
        out.append(entry_series(model, neurons, entry.layer, entry.head, entry.i, entry.j).tolist())
    return out


# ----------------------------------------------------------------------------- the command


def read_sentences(path: str, flag: str, least: int = 2) -> list[bytes]:
    """A file's non-empty lines, as bytes (at least `least`: a variance needs 2 of each set)."""
    try:
        lines = [line.strip() for line in Path(path).read_bytes().split(b"\n")]
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    lines = [line for line in lines if line]
    if len(lines) < least:
        held = " (its odd lines are held out without --test_concept)" if least > 2 else ""
        raise UsageError(
            f"{flag} {path}: expected at least {least} sentences, one a line{held}; it has {len(lines)}"
        )
    return lines


def sentence_sets(args: argparse.Namespace) -> tuple[list[bytes], ...]:
    """Search concept, search contrast, test concept, test contrast (test: the odd lines if no test files)."""
    if (args.test_concept is None) != (args.test_contrast is None):
        raise UsageError(
            "--test_concept and --test_contrast go together (or neither: the odd lines are held out)"
        )
    least = 4 if args.test_concept is None else 2  # 2 a set: searched and held out
    concept = read_sentences(args.concept, "--concept", least)
    contrast = read_sentences(args.contrast, "--contrast", least)
    if args.test_concept is None:
        return concept[0::2], contrast[0::2], concept[1::2], contrast[1::2]
    return concept, contrast, read_sentences(args.test_concept, "--test_concept"), read_sentences(
        args.test_contrast, "--test_contrast")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--model_path", required=True, help="a run folder, checkpoint, .pt or Hub repo id (BDH)")
    p.add_argument("--checkpoint", default=None, help="best or last for a run folder (best)")
    p.add_argument("--concept", required=True, help="sentences that name the concept, one a line (search)")
    p.add_argument("--contrast", required=True, help="sentences that do not, one a line (search)")
    p.add_argument("--test_concept", default=None, help="held-out concept sentences (default: odd lines)")
    p.add_argument("--test_contrast", default=None, help="held-out contrast sentences")
    p.add_argument(
        "--top", type=positive_int, default=10, help="entries kept from the search and tested (10)"
    )
    p.add_argument(
        "--candidates",
        type=positive_int,
        default=CANDIDATES,
        help=f"entries of each layer, the most above in mean, whose t the search computes ({CANDIDATES:,})",
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
    entries = search(
        model, sets["search_concept"], sets["search_contrast"], args.top, device, args.candidates
    )
    held = {"concept": sets["test_concept"], "contrast": sets["test_contrast"]}
    return {
        "model_path": args.model_path,
        "sentences": {name: len(s) for name, s in sets.items()},
        "entries": held_out(model, entries, held["concept"], held["contrast"], device),
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

"""Evaluate a checkpoint of BDH-GPU (or of the GPT): loss, byte perplexity, bits per byte, weight
histograms, and on request samples and the neuron graph.

    uv run evaluate.py --model_path daichi202/dragon-hatchling        # the reference report's model
    uv run evaluate.py --model_path results/runs/<run>                # a run folder (its best checkpoint)
    uv run evaluate.py --model_path <checkpoint> --split test --max_chunks 100
    uv run evaluate.py --model_path <checkpoint> --stream             # the whole split read as one text
    uv run evaluate.py --model_path <checkpoint> --seq_len 4096       # loss by position in long windows
    uv run evaluate.py --model_path <checkpoint> --seq_len 4096 --shifts 16  # ..., each over the same text
    uv run evaluate.py --model_path <checkpoint> --prompt " = Dragon = " --max_new_bytes 300

Protocol: window i covers bytes [i*T, i*T+T+1) of the split (T = --seq_len); the model reads its
first T bytes and is scored on its last T; the loss is the mean cross-entropy in nats over all
targets of the first --max_chunks windows. --stream reads the text as one instead, the state carried
from its first byte to its last (scoring.py). Every format --model_path takes: dragon_hatchling/hub.py.

Writes into --out_dir: metrics.json (loss, perplexity, bpb = loss / ln 2, bytes scored, the loss by
position 0-127, 128-255, 256-511, ..., the fraction of non-zero neurons x, RoPE(x) and y, and which
path scored: "fused", the Triton kernels, by default for BDH on CUDA, or "eager"), weight_stats.json
(mean, std, excess kurtosis, the fraction beyond 3 std and the Hill tail index of every matrix:
measures.py), weights.png and loss_by_position.png; with --prompt, sample.txt (several --prompt, sampled
side by side as one batch: sample-1.txt, sample-2.txt, ...); with --neuron_graph,
neuron_graph.json and .png (the graph G = E Dx of the model and of a fresh one); with --synapse_graph,
synapse_graph.json and .png (the graph of the synapse state sigma after the text's first bytes); with
--stream, byte_losses.npy (float32, entry i the loss of byte i + 1: results/tbptt/rare_words.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling import plots
from dragon_hatchling.architectures import VOCAB
from dragon_hatchling.checkpoints import holds_run, run_of
from dragon_hatchling.cli import (
    Parser,
    UsageError,
    add_device_args,
    check_needs,
    fail,
    make_out_dir,
    nonneg_int,
    positive_int,
    seed,
    unique_folder,
)
from dragon_hatchling.data import SPLITS, load_bytes_file, load_split, num_windows
from dragon_hatchling.devices import check_fits, resolve_device, resolve_dtype
from dragon_hatchling.files import write_json, write_text
from dragon_hatchling.hub_client import HubUnreachable
from dragon_hatchling.loading import load_model
from dragon_hatchling.measures import neuron_graph, weight_stats
from dragon_hatchling.paths import FUSED, choose_path, forward_of
from dragon_hatchling.sampling import generate, generate_recompute, sample_context
from dragon_hatchling.scoring import (
    CHUNK_SIZE,
    activation_summary,
    eval_batch_windows,
    score_stream,
    score_windows,
)
from dragon_hatchling.stopping import interruptible
from dragon_hatchling.synapses import synapse_graph

MAX_NEW_BYTES = 1_000_000  # the most bytes one sample may have (a recurrent step each)
MAX_SYNAPSE_BYTES = 16_384  # --synapse_graph reads its text in one parallel pass (T x T scores a head)


# ----------------------------------------------------------------------------- the flags


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_model_flags(p.add_argument_group("the model"))
    add_text_flags(p.add_argument_group("the text and how it is read"))
    add_sample_flags(p.add_argument_group("sampling (--prompt)"))
    add_output_flags(p.add_argument_group("output"))
    return p


def add_model_flags(g) -> None:
    g.add_argument(
        "--model_path",
        required=True,
        help="a run folder, checkpoint folder, legacy .pt file or folder, or Hub repo id (USER/NAME)",
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        help="best or last for a run folder (best); a file name for a folder or Hub repo of .pt files "
        "(default: the newest model_epoch_N.pt)",
    )
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to load")
    g.add_argument(
        "--n_layer", type=positive_int, default=None, help="layers, for legacy .pt formats that lack it (6)"
    )
    add_device_args(g, "score and sample")


def add_text_flags(g) -> None:
    g.add_argument("--split", default="valid", choices=list(SPLITS), help="split to score (valid)")
    g.add_argument(
        "--data_dir",
        default=None,
        help="folder with wiki.{split}.raw (default: Salesforce/wikitext from the Hub)",
    )
    g.add_argument(
        "--data_file",
        default=None,
        help="score this file's bytes instead of a split (e.g. wiki.valid.tokens)",
    )
    g.add_argument("--seq_len", type=positive_int, default=128, help="window length T (128)")
    g.add_argument("--batch_size", type=positive_int, default=32, help="windows per batch (32)")
    g.add_argument(
        "--max_chunks", type=positive_int, default=None, help="score only the first N windows (default: all)"
    )
    g.add_argument(
        "--shifts",
        type=positive_int,
        default=1,
        help="score the windows N times, their starts moved by k * seq_len / N bytes (k < N), and add "
        "them up, so that the buckets of loss by position hold the same text (N >= seq_len / 256 for "
        "the 256-511 bucket); 1: the protocol",
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="read the text as one, the state carried from its first byte to its last (the chunked form), "
        "instead of in windows of --seq_len",
    )
    g.add_argument(
        "--chunk_size",
        type=positive_int,
        default=CHUNK_SIZE,
        help="bytes the chunked form reads at a time, for --stream and for windows longer than this "
        f"({CHUNK_SIZE})",
    )


def add_sample_flags(g) -> None:
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="also sample a continuation of this text (repeat it for several prompts, sampled side by side)",
    )
    g.add_argument(
        "--max_new_bytes",
        type=positive_int,
        default=None,
        help=f"bytes to sample (500; at most {MAX_NEW_BYTES:,}), with a progress bar at a terminal",
    )
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (0.8)")
    g.add_argument(
        "--top_k", type=positive_int, default=None, help="sample from the k likeliest bytes (1 to 256)"
    )
    g.add_argument(
        "--context",
        type=nonneg_int,
        default=None,
        help="bytes the sampler keeps in view; past that it restarts from the last half "
        "(0: the whole text; default: the whole text for a model with decay, whose quality holds at any "
        "length, else --seq_len)",
    )
    g.add_argument("--seed", type=seed, default=None, help="random seed for sampling (1337)")


def add_output_flags(g) -> None:
    g.add_argument(
        "--out_dir",
        default=None,
        help="where to write (default: a new folder results/eval/MODEL-TEXT-READ, e.g. run-last-valid-w128)",
    )
    g.add_argument("--no_plots", action="store_true", help="skip the weight histograms")
    g.add_argument(
        "--neuron_graph",
        action="store_true",
        help="also the degrees of the graph E and Dx make between neurons (n x n, in blocks), for the "
        "model and a fresh one: neuron_graph.json and .png",
    )
    g.add_argument(
        "--synapse_graph",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="also the degrees of the graph of the synapse state sigma (the paper's eq. 16) at the end of "
        f"the text's first BYTES bytes (at most {MAX_SYNAPSE_BYTES:,}; all of a shorter text), every head "
        "of --synapse_layer, for the model and a fresh one: synapse_graph.json and .png "
        "(dragon_hatchling/synapses.py)",
    )
    g.add_argument(
        "--synapse_layer",
        type=positive_int,
        default=None,
        help="--synapse_graph's layer l (sigma pairs layer l-1's y with layer l's x): 1 .. L-1 (default L-1)",
    )
    g.add_argument(
        "--init_seed",
        type=seed,
        default=None,
        help="the seed of --neuron_graph's and --synapse_graph's fresh model (1337, experiment.py's "
        "default --seed: the run's own initial weights)",
    )


# ----------------------------------------------------------------------------- checks


# Flags that mean something only beside another (cli.check_needs): the flags each serves, its default
NEEDS = {
    "max_new_bytes": (("prompt",), 500),
    "temperature": (("prompt",), 0.8),
    "top_k": (("prompt",), None),
    "context": (("prompt",), None),
    "seed": (("prompt",), 1337),
    "synapse_layer": (("synapse_graph",), None),
    "init_seed": (("neuron_graph", "synapse_graph"), 1337),
}


def check_args(args: argparse.Namespace) -> None:
    """The flags that disagree with each other, whatever the model."""
    check_needs(args, NEEDS)
    if not 0 <= args.temperature < math.inf:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k > VOCAB:
        raise UsageError(f"--top_k {args.top_k}: expected at most {VOCAB}, the bytes there are to sample")
    if args.max_new_bytes > MAX_NEW_BYTES:
        raise UsageError(f"--max_new_bytes {args.max_new_bytes:,} is more than {MAX_NEW_BYTES:,}")
    if args.context == 1:
        raise UsageError("--context must be 0 (no limit) or at least 2 bytes, got 1")
    if args.shifts > 1 and args.stream:
        raise UsageError("--shifts moves the windows' starts; --stream reads the text as one, in no windows")
    if args.shifts > args.seq_len:
        raise UsageError(
            f"--shifts {args.shifts} moves the starts by less than a byte: at most --seq_len {args.seq_len}"
        )
    if args.stream and args.max_chunks is not None:
        raise UsageError(
            "--max_chunks counts windows; --stream reads the whole text (cut it with --data_file)"
        )


def check_model(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """What this architecture cannot do: read a text as one (no recurrent form), windows longer than
    it reads, the neuron graph (no neurons)."""
    name, longest = model.display_name, model.config.max_window
    if args.stream and not model.reads_streams:
        raise UsageError(
            f"--stream reads the text as one, the state carried; a {name} without a memory has none "
            "(use windows, or train a GPT with --memory)"
        )
    if (args.neuron_graph or args.synapse_graph) and not model.has_neurons:
        flag = "--neuron_graph" if args.neuron_graph else "--synapse_graph"
        raise UsageError(f"{flag} is a graph of BDH's neurons; a {name} has none")
    if args.synapse_graph:
        check_synapse_args(args, model.config)
    if longest is not None and args.seq_len > longest:
        raise UsageError(f"--seq_len {args.seq_len} is longer than this {name}'s block_size {longest}")
    if longest is not None and args.context is not None and args.context > longest:
        raise UsageError(f"--context {args.context} is longer than this {name}'s block_size {longest}")
    if args.prompt is not None and sample_context(args.context, args.seq_len, model.config) == 1:
        raise UsageError("--seq_len 1 as the sampler's window: pass --context 0 or at least 2")


def check_synapse_args(args: argparse.Namespace, config) -> None:
    """--synapse_graph's bytes and --synapse_layer fit the model (the text is checked in prepare)."""
    if args.synapse_graph > MAX_SYNAPSE_BYTES:
        raise UsageError(
            f"--synapse_graph {args.synapse_graph:,}: at most {MAX_SYNAPSE_BYTES:,} bytes (one parallel pass)"
        )
    if config.n_layer < 2:
        raise UsageError("--synapse_graph pairs a layer with the one before: the model has 1 layer")
    args.synapse_layer = args.synapse_layer or config.n_layer - 1
    if args.synapse_layer > config.n_layer - 1:
        raise UsageError(f"--synapse_layer {args.synapse_layer}: expected 1 .. {config.n_layer - 1}")


def scoring_bytes(model, args: argparse.Namespace) -> int:
    """A lower bound on the memory scoring takes: float32 weights, and the activations of a batch (of
    one chunk of the window or text, when it goes through the chunked form), with the chunked form's state."""
    config = model.config
    chunked = model.reads_streams and (args.stream or args.seq_len > args.chunk_size)
    batch = 1 if args.stream else eval_batch_windows(args.batch_size, args.seq_len)
    positions = batch * (args.chunk_size if chunked else args.seq_len)
    state = config.state_bytes(batch) if chunked else 0
    return 4 * config.num_params + config.activation_bytes(positions, training=False) + state


# ----------------------------------------------------------------------------- scoring, sampling, writing


def score(
    model: torch.nn.Module,
    data: np.ndarray,
    args: argparse.Namespace,
    device,
    dtype,
    path: str,
    out_dir: Path,
) -> dict:
    """Loss, bits/byte, perplexity and loss by position: of windows (the protocol; through the path
    chosen, or the chunked form for windows longer than --chunk_size), or of the text read as one
    (and then the loss of every byte into byte_losses.npy)."""
    if args.stream:
        metrics, losses = score_stream(model, data, device, dtype, args.chunk_size)
        np.save(out_dir / "byte_losses.npy", losses.astype(np.float32))
        return metrics
    if args.seq_len > args.chunk_size and model.reads_streams:  # long windows: linear memory
        return score_windows(
            model,
            data,
            args.seq_len,
            args.batch_size,
            device,
            dtype,
            args.max_chunks,
            args.chunk_size,
            args.shifts,
        )
    forward = forward_of(model, path)
    return score_windows(
        forward, data, args.seq_len, args.batch_size, device, dtype, args.max_chunks, shifts=args.shifts
    )


def sample_texts(model: torch.nn.Module, args: argparse.Namespace, device, dtype, path: str) -> list[str]:
    """Each prompt and a sampled continuation, decoded as UTF-8 (invalid bytes replaced): recurrent
    steps of all prompts at once (a CUDA graph of the fused step on the fused path), or the window
    again for every byte, one prompt after another, for a model without a recurrent form."""
    prompts = [os.fsencode(prompt) for prompt in args.prompt]  # the bytes as given, UTF-8 or not
    idx = [torch.tensor(list(prompt), dtype=torch.long, device=device) for prompt in prompts]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sampler = copy.deepcopy(model).to(dtype)  # weights in the dtype itself: a CUDA graph takes no autocast
    context = sample_context(args.context, args.seq_len, model.config)
    sampling = (args.max_new_bytes, args.temperature, args.top_k, gen, context)
    if model.steps_recurrently:
        out = generate(sampler, idx, *sampling, progress=True, cuda_graph=path == FUSED)
    else:
        out = generate_recompute(sampler, idx, *sampling)
    return [bytes(row.tolist()).decode("utf-8", errors="replace") for row in out]


def describe_run(
    args: argparse.Namespace, model, source: dict, data: np.ndarray, device, dtype, path: str
) -> dict:
    """What metrics.json says of the scoring besides its results: what was read, by what model, how."""
    shown = min(8, args.batch_size, args.max_chunks or 8)
    live = None  # a GPT has no sparse neurons
    if model.has_neurons:
        live = activation_summary(model, data, min(args.seq_len, len(data) - 1), shown, device, dtype)
    return {
        "split": args.split if args.data_file is None else None,
        "data_file": args.data_file,
        "seq_len": None if args.stream else args.seq_len,
        "shifts": None if args.stream else args.shifts,
        "chunk_size": args.chunk_size,
        "max_chunks": args.max_chunks,
        "model_path": str(args.model_path),
        "model_source": source,
        "data_dir": args.data_dir,
        "dtype": str(dtype).removeprefix("torch."),
        "path": path,
        "config": model.config.to_dict(),
        "num_params": model.num_params(),
        "activation_nonzero": live,
    }


def sample_record(args: argparse.Namespace, model) -> dict:
    return {
        **({"prompt": args.prompt[0]} if len(args.prompt) == 1 else {"prompts": args.prompt}),
        "temperature": args.temperature,
        "top_k": args.top_k,
        "max_new_bytes": args.max_new_bytes,
        "context": sample_context(args.context, args.seq_len, model.config),
        "seed": args.seed,
    }


def write_plots(model, stats: dict, metrics: dict, args: argparse.Namespace, out_dir: Path) -> None:
    """weights.png (the model's weight_labels matrices) and loss_by_position.png."""
    params = dict(model.named_parameters())
    weights = {name: (label, params[name].detach().float().flatten().numpy())
               for name, label in model.histogram_weights.items()}  # fmt: skip
    plots.weight_histograms(
        weights, stats, out_dir / "weights.png", f"{model.display_name} weights: {args.model_path}"
    )
    read = "one text, state carried" if args.stream else f"windows of {args.seq_len} bytes"
    title = f"{args.data_file or args.split} ({read}): {args.model_path}"
    plots.loss_by_position(metrics["loss_by_position"], out_dir / "loss_by_position.png", title)


def report(metrics: dict, args: argparse.Namespace, out_dir: Path) -> None:
    """The results on the console."""
    what = args.data_file or args.split
    live = metrics["activation_nonzero"]
    sparsity = f"non-zero neurons x {live['x_mean']:.1%}, y {live['y_mean']:.1%}; " if live else ""
    print(
        f"{what}{' (stream)' if args.stream else ''}: loss {metrics['loss']:.4f} nats/byte, "
        f"perplexity {metrics['perplexity']:.4f}, {metrics['bpb']:.4f} bits/byte "
        f"over {metrics['bytes']:,} bytes; {sparsity}wrote {out_dir}"
    )
    by_position = metrics["loss_by_position"]
    if len(by_position) > 1:
        print("loss by position: " + ", ".join(f"{k} {v:.4f}" for k, v in by_position.items()))


# ----------------------------------------------------------------------------- the command


def default_folder(args: argparse.Namespace) -> Path:
    """results/eval/MODEL-TEXT-READ, e.g. runA-last-valid-w128 (made unique by cli.unique_folder)."""
    path = Path(args.model_path)
    if path.exists():
        path = path.resolve()
        model = f"{run_of(path).name}-{path.name}" if run_of(path) != path else path.name
    else:  # a Hub repo id
        model = args.model_path.replace("/", "--")
    text = Path(args.data_file).name if args.data_file else args.split
    read = "stream" if args.stream else f"w{args.seq_len}"
    return Path("results/eval") / f"{model}-{text}-{read}"


def read_text(args: argparse.Namespace) -> np.ndarray:
    """The bytes to score: --data_file, or --split (from --data_dir, else the Hub), long enough to read."""
    data = (
        load_bytes_file(args.data_file, what="--data_file")
        if args.data_file
        else load_split(args.split, args.data_dir)
    )
    what = f"--data_file {args.data_file}" if args.data_file else f"the {args.split} split"
    if args.stream and len(data) < 2:
        raise UsageError(f"--stream needs a text of at least 2 bytes; {what} has {len(data)}")
    if not args.stream and num_windows(data, args.seq_len) == 0:
        window = args.seq_len + 1
        raise UsageError(
            f"{what} ({len(data)} bytes) is shorter than one window of --seq_len + 1 = {window} bytes"
        )
    return data


def prepare(args: argparse.Namespace) -> tuple:
    """Check every argument and input, then load: the model (on the device), its source, the text,
    the device, dtype, path and output folder. A UsageError on the first bad one."""
    check_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.out_dir is not None and holds_run(args.out_dir):
        raise UsageError(
            f"--out_dir {args.out_dir} holds a training run, whose metrics.json this would replace; "
            f"choose another folder (e.g. {Path(args.out_dir) / 'eval'})"
        )
    if args.out_dir is not None:
        make_out_dir(args.out_dir)
    local = args.data_file or args.data_dir
    data = read_text(args) if local else None  # a local text first: read at once
    model, source = load_model(args.model_path, args.checkpoint, args.revision, args.n_layer)
    check_model(args, model)
    path = choose_path(type(model), device, args.fused, compile=False, dtype=dtype)
    check_fits(scoring_bytes(model, args), device, "scoring this model")
    if args.prompt and model.steps_recurrently:  # a state for every prompt
        need = 4 * model.config.num_params + model.config.state_bytes(len(args.prompt))
        check_fits(need, device, f"sampling {len(args.prompt)} prompt(s) side by side")
    # the Hub's split last: a bad --model_path fails at once, not after the split's wait
    data = read_text(args) if data is None else data
    out_dir = Path(args.out_dir) if args.out_dir else unique_folder(default_folder(args))  # a new one
    return model.to(device).eval(), source, data, device, dtype, path, out_dir


@interruptible("before it finished: metrics.json and what follows it may be missing")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, source, data, device, dtype, path, out_dir = prepare(args)
        metrics = score(model, data, args, device, dtype, path, out_dir)
    except UsageError as e:
        fail(str(e))
    except HubUnreachable as e:
        fail(str(e), code=1)
    metrics.update(describe_run(args, model, source, data, device, dtype, path))
    if args.prompt is not None:
        samples = sample_texts(model, args, device, dtype, path)
        for i, sample in enumerate(samples):
            write_text(out_dir / ("sample.txt" if len(samples) == 1 else f"sample-{i + 1}.txt"), sample)
            print(f"--- sample (temperature {args.temperature}, top_k {args.top_k}) ---\n{sample}\n---")
        metrics["sample"] = sample_record(args, model)
    if args.neuron_graph:
        graph = neuron_graph(model, args.init_seed)
        write_json(out_dir / "neuron_graph.json", graph)
        plots.degree_ccdfs(graph, out_dir / "neuron_graph.png", str(args.model_path))
    if args.synapse_graph:
        text = torch.from_numpy(np.asarray(data[: args.synapse_graph]).astype(np.int64))[None].to(device)
        graph = synapse_graph(model, text, args.synapse_layer, args.init_seed)  # float32
        write_json(out_dir / "synapse_graph.json", graph)
        title = f"{args.model_path}: sigma, layer {args.synapse_layer}, after {text.shape[1]:,} bytes"
        plots.degree_ccdfs(graph, out_dir / "synapse_graph.png", title)
    write_json(out_dir / "metrics.json", metrics)  # first: the scoring is kept whatever follows
    model = model.cpu()
    stats = weight_stats(model)
    write_json(out_dir / "weight_stats.json", stats)
    if not args.no_plots:
        write_plots(model, stats, metrics, args, out_dir)
    report(metrics, args, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

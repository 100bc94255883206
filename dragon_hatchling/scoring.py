"""Scoring a model on a text: windows (the reference report's protocol, and loss by position in
them), the whole text read as one (the state carried from its first byte to its last), and the
fraction of non-zero neurons. experiment.py validates with it and evaluate.py reports it.

Protocol: window i covers bytes [i*T, i*T+T+1) of the text; the model reads its first T bytes and is
scored on its last T; the loss is the mean cross-entropy in nats over all targets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dragon_hatchling.cli import UsageError
from dragon_hatchling.data import num_windows, window_batches
from dragon_hatchling.devices import autocast

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


def edge_bucket(value: float, edges: Sequence[int]) -> str:
    """The label of the bucket of ascending `edges` that holds value: "lo-hi" from 0 up to the last
    edge, ">=last" past it (distances between two readings, say)."""
    lo = 0
    for hi in edges:
        if value < hi:
            return f"{lo}-{hi - 1}"
        lo = hi
    return f">={lo}"


def edge_buckets(edges: Sequence[int]) -> list[str]:
    """Every label edge_bucket gives for these edges, in order."""
    return [edge_bucket(e - 1, edges) for e in edges] + [edge_bucket(edges[-1], edges)]


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
            loss = window_losses(model, x, y, device, autocast_dtype, chunk_size)  # B, T
            sums += loss.sum(0).double().cpu().numpy()
            windows += y.shape[0]
            if stop is not None and stop():
                raise Stopped
    if windows == 0 and shard[1] == 1:
        raise UsageError(f"the split ({len(data)} bytes) is shorter than one window of {seq_len + 1}")
    return sums, windows


@torch.no_grad()
def window_losses(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy (nats, float32, on the device) of every target of windows x -> y (B, T), each
    read from an empty state; chunk_size as position_loss_sums'. The caller sets the model's mode."""
    x, y = x.to(device), y.to(device)
    with autocast(device, autocast_dtype):
        logits = model.forward_chunked(x, chunk_size=chunk_size)[0] if chunk_size else model(x)[0]
    return F.cross_entropy(logits.float().mT, y, reduction="none")


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
def stream_byte_losses(
    model: torch.nn.Module,
    data: np.ndarray,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> np.ndarray:
    """The text read as one: the chunked form carries its state from the first byte to the last.

    Entry i is the cross-entropy (nats, float64) of byte i + 1, scored having seen bytes 0..i. Memory
    besides the result does not grow with the text: one chunk and the state (float32, B = 1).
    """
    losses = np.zeros(max(len(data) - 1, 0))
    state = model.initial_state(1, device)
    with eval_mode(model):
        for p0 in tqdm(range(0, len(data) - 1, chunk_size), desc="stream", unit="chunk", disable=None):
            chunk = torch.from_numpy(np.asarray(data[p0 : p0 + chunk_size + 1]).astype(np.int64)).to(device)
            with autocast(device, autocast_dtype):
                logits, _, state = model.forward_chunked(chunk[None, :-1], chunk_size=chunk_size, state=state)
            loss = F.cross_entropy(logits[0].float(), chunk[1:], reduction="none")
            losses[p0 : p0 + len(loss)] = loss.double().cpu().numpy()
    return losses


def stream_loss_sums(
    model: torch.nn.Module,
    data: np.ndarray,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """stream_byte_losses in position buckets (bucket_sums)."""
    return bucket_sums(stream_byte_losses(model, data, device, autocast_dtype, chunk_size))


def bucket_sums(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Losses by position summed in each bucket of position_buckets, the positions in each, the buckets."""
    buckets = position_buckets(len(losses))
    sums = np.array([losses[a:b].sum() for a, b in buckets])
    counts = np.array([b - a for a, b in buckets], dtype=np.int64)
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


def summary(loss_sum: float, n_bytes: int, by_position: dict[str, float], mode: str) -> dict:
    """Loss (nats/byte), perplexity (per byte) and bits per byte of a scoring, with its loss by position."""
    loss = loss_sum / n_bytes
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": loss / math.log(2),
        "bytes": n_bytes,
        "mode": mode,
        "loss_by_position": by_position,
    }


def score_windows(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_chunks: int | None = None,
    chunk_size: int | None = None,
    shifts: int = 1,
) -> dict:
    """The protocol over the first max_chunks windows (all by default), in batches of at most
    EVAL_BATCH_BYTES; chunk_size: through the chunked form (see position_loss_sums).

    shifts: the windows again with their starts moved by k * seq_len // shifts bytes, k < shifts,
    all added up. The buckets of loss by position then hold the same text: with a shift of at most a
    bucket's width (shifts >= seq_len / 256 for the 256-511 bucket) every byte falls in each bucket
    as often as in any other, and buckets differ by the context before them alone."""
    batch = eval_batch_windows(batch_size, seq_len)
    sums, windows = np.zeros(seq_len), 0
    for k in range(shifts):
        text = data[k * seq_len // shifts :]
        if k and num_windows(text, seq_len) == 0:  # a text of one window has no room to shift
            break
        s, w = position_loss_sums(model, text, seq_len, batch, device, max_chunks, dtype, chunk_size)
        sums, windows = sums + s, windows + w
    return summary(float(sums.sum()), windows * seq_len, loss_by_position(sums, windows), "windows")


def score_stream(
    model: torch.nn.Module, data: np.ndarray, device: torch.device, dtype: torch.dtype | None, chunk_size: int
) -> tuple[dict, np.ndarray]:
    """The whole text read as one: its summary, and the loss of every byte (stream_byte_losses)."""
    losses = stream_byte_losses(model, data, device, dtype, chunk_size)
    sums, counts, buckets = bucket_sums(losses)
    return summary(float(losses.sum()), len(losses), by_bucket(sums, counts, buckets), "stream"), losses

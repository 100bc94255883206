"""Truncated backpropagation through time (the paper's Appendix B.2): each batch row reads its own
contiguous stretch of the train text, one window a step, and the model's state (BDH's attention state
and RoPE position, a GPT's memory of keys and values) is carried, detached, from one step into the
next. It starts empty at each epoch, and with --reset_state article a row's state also starts empty at
the window that holds an article's first line (" = Title = ", Wikitext's top-level heading). With
--article_order shuffled each epoch reads the articles in an order of its own (StreamText), so that no
row reads the same sequence twice and a step's rows meet new neighbours.

    text   |---- row 0 ----|---- row 1 ----| ... |---- row B-1 ----|     after a random shift < T
    step k: row i reads bytes [shift + i*stretch + k*T, ... + T + 1)

`Carried` wraps the path's forward (model.py's chunked form, the fused kernels, or a GPT with a
memory) so that the loop still calls module(idx, targets).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from safetensors.torch import load_file

from dragon_hatchling.checkpoints import CARRIED_STATE
from dragon_hatchling.cli import UsageError
from dragon_hatchling.distributed import Ranks, gather


def stream_steps(n_bytes: int, seq_len: int, batch_size: int) -> int:
    """Steps of an epoch in stream order: the windows of one row's stretch (0 if none fits)."""
    stretch = max(0, n_bytes - seq_len) // batch_size  # room for a shift below seq_len
    return stretch // seq_len


def stream_offsets(
    n_bytes: int, seq_len: int, batch_size: int, epoch: int, seed: int, step: int
) -> np.ndarray:
    """The start offsets of the B windows of a step in stream order (the same for a seed and epoch)."""
    stretch = (n_bytes - seq_len) // batch_size
    shift = int(np.random.default_rng([seed, epoch, 1]).integers(seq_len))
    return shift + stretch * np.arange(batch_size) + step * seq_len


ARTICLE = re.compile(rb"(?m)^ = [^=].* = $")  # Wikitext's top-level heading: an article's first line


def article_starts(text: np.ndarray) -> np.ndarray:
    """The offsets of every article's first line in a text (sorted)."""
    return np.array([m.start() for m in ARTICLE.finditer(np.asarray(text).tobytes())], dtype=np.int64)


def holds_a_start(starts: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """Which windows [offset, offset + seq_len) hold one of the sorted starts."""
    return np.searchsorted(starts, offsets) < np.searchsorted(starts, offsets + seq_len)


def shuffled_articles(
    text: np.ndarray, starts: np.ndarray, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The text with its articles (each from its first line to the next one's) in an order drawn from
    the seed and the epoch, the bytes before the first article first; and the articles' new starts."""
    bounds = np.append(starts, len(text))
    order = np.random.default_rng([seed, epoch, 2]).permutation(len(starts))
    lengths = np.diff(bounds)[order]
    shuffled = np.concatenate([text[: starts[0]], *(text[bounds[i] : bounds[i + 1]] for i in order)])
    return shuffled, starts[0] + np.concatenate([[0], np.cumsum(lengths)[:-1]])


class StreamText:
    """What stream order reads in an epoch: the train text and where its articles start (found only
    when asked for); with shuffle, the articles in a new order each epoch (shuffled_articles). The
    epoch in hand is kept."""

    def __init__(self, text: np.ndarray, seed: int, shuffle: bool, find_articles: bool) -> None:
        self.base, self.seed, self.shuffle = text, seed, shuffle
        self.base_starts = article_starts(text) if shuffle or find_articles else None
        self.epoch, self.text, self.starts = None, text, self.base_starts

    def at(self, epoch: int) -> StreamText:
        if self.shuffle and epoch != self.epoch:
            self.text, self.starts = shuffled_articles(self.base, self.base_starts, self.seed, epoch)
            self.epoch = epoch
        return self


class Carried(torch.nn.Module):
    """module(idx, targets) -> (logits, loss) that continues every row from the state its last call
    left (detached: gradients stop at the window), until reset(). forward: the path's module (BDH,
    its compiled form, fused_parallel.Fused or a GPT with a memory), with initial_state and
    forward_chunked."""

    def __init__(self, forward: torch.nn.Module) -> None:
        super().__init__()
        self.inner = forward
        self.state = None  # a plain attribute, not a buffer: DistributedDataParallel leaves it alone

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        state = self.state if self.state is not None else self.inner.initial_state(idx.shape[0], idx.device)
        logits, loss, state = self.inner.forward_chunked(idx, targets, chunk_size=idx.shape[1], state=state)
        self.state = detached(state)
        return logits, loss

    def reset(self) -> None:
        """The next call starts from the empty state (an epoch's first step)."""
        self.state = None

    def reset_rows(self, rows: torch.Tensor) -> None:
        """The next call starts these rows (a bool mask over the batch) from an empty attention
        state: BDH's, whose RoPE position carries on (only distances count, from an empty state)."""
        if self.state is not None and bool(rows.any()):
            self.state.empty_rows(rows)

    def initial_state(self, batch_size: int, device=None):
        return self.inner.initial_state(batch_size, device)

    def forward_chunked(self, idx, targets=None, chunk_size: int = 256, state=None, checkpoint: bool = False):
        """The path's chunked form with a state of the caller's (validation's stream); self.state
        stays as it is."""
        return self.inner.forward_chunked(idx, targets, chunk_size=chunk_size, state=state)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The carried state in the model's own order, on the CPU (empty before the first step)."""
        if self.state is None:
            return {}
        state = self.inner.to_model_order(self.state) if hasattr(self.inner, "to_model_order") else self.state
        return {k: t.detach().cpu().contiguous() for k, t in state_tensors(state).items()}

    def restore(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """The state tensors() gave (this rank's rows), back on the device."""
        if not tensors:
            return self.reset()
        state = state_of(type(self.initial_state(1, device)), {k: t.to(device) for k, t in tensors.items()})
        self.state = self.inner.from_model_order(state) if hasattr(self.inner, "from_model_order") else state


def detached(state):
    """The same state with its tensors cut from the graph."""
    return state_of(type(state), {k: t.detach() for k, t in state_tensors(state).items()})


def state_tensors(state) -> dict[str, torch.Tensor]:
    """A state's tensors by name: its list fields as name.i, its tensor fields as name (a field that
    is None, e.g. RecurrentState.last without shifted heads, has none)."""
    out = {}
    for name, value in vars(state).items():
        if value is None:
            continue
        if isinstance(value, list):
            out.update({f"{name}.{i}": t for i, t in enumerate(value)})
        else:
            out[name] = value
    return out


def state_of(cls: type, tensors: dict[str, torch.Tensor]):
    """The state of class cls (a dataclass of tensors and lists of them) from state_tensors' dict."""
    fields: dict[str, object] = {}
    for key in sorted(tensors, key=lambda k: (k.split(".")[0], int(k.split(".")[1]) if "." in k else 0)):
        name, _, i = key.partition(".")
        if i:
            fields.setdefault(name, []).append(tensors[key])
        else:
            fields[name] = tensors[key]
    return cls(**fields)


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's rows of the state, in rank order (the batch's order): what a checkpoint saves."""
    every = gather(tensors)
    if not every[0]:
        return {}
    return {k: torch.cat([t[k] for t in every]) if t.ndim else t for k, t in every[0].items()}


def rows_of(tensors: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's rows of a saved state (its share of the batch, as distributed.share gives)."""

    def mine(t: torch.Tensor) -> torch.Tensor:
        size = len(t) // ranks.world
        return t[ranks.rank * size : (ranks.rank + 1) * size]

    return {k: mine(t) if t.ndim else t for k, t in tensors.items()}


def load_state(folder, where: str) -> dict[str, torch.Tensor]:
    """A checkpoint's carried state ({} if it has none: saved before the first step)."""
    path = folder / CARRIED_STATE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{where}: {path} cannot be read ({type(e).__name__})") from None

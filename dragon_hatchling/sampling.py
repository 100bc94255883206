"""Sampling from BDH-GPU: the prompt through the chunked form, then one recurrent step per byte.

    from dragon_hatchling.sampling import generate
    out = generate(model.eval(), prompt, 500, temperature=0.8, top_k=40)

On CUDA the steps run as one captured CUDA graph of fused_recurrent.FusedStep and the sampling, which
feeds each sampled byte back to the next step; elsewhere (or with cuda_graph=False, or a model with
shifted heads) they are the plain `BDH.step`. `generate_recompute` (the parallel form over the whole
window for every byte, the only way for a model without a recurrent form, the GPT) is the reference
both are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import BDH, RecurrentState

Prompts = torch.Tensor | list[torch.Tensor]  # B, T; or B prompts of their own lengths, each (T_i,)


def check_generate_args(prompts: Prompts, temperature: float, context: int | None) -> None:
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(prompts, torch.Tensor) and prompts.dim() != 2:
        raise ValueError(f"generate takes prompts B, T (or a list of them), got shape {tuple(prompts.shape)}")
    rows = list(prompts)
    if not rows:
        raise ValueError("generate needs at least one prompt")
    if any(row.dim() != 1 or len(row) == 0 for row in rows):
        raise ValueError("generate needs prompts of at least one byte (each of a list: one dimension)")
    if context is not None and context < 2:
        raise ValueError(f"context must be at least 2 bytes (or None), got {context}")


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One byte per row from logits (B, V): greedy at temperature 0, else top-k sampling. B, 1."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # in any dtype: casting keeps the order
    logits = logits.float()
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    # torch.multinomial's own draw of one sample (the same bytes for the same generator state),
    # without its check of probs, which waits for the GPU: so that a CUDA graph can hold it
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1, keepdim=True)


class GraphedStep:
    """The fused step captured once as a CUDA graph over this state.

    Without sample: step(byte) -> logits (B, V). With sample (logits -> next bytes (B, 1), with no
    host synchronisation), the graph samples as well and keeps the sampled bytes as its next input:
    step() -> the next bytes (B, 1), overwritten by the next call; step(byte) steps on byte instead.
    generator: the one sample draws from, if not the default. fused: the step to capture (default:
    fused_recurrent.FusedStep(model)), called as fused(byte, state, lazy) with the LazyDecay of a
    model with decay (`lazy`: mark_current() the rows of the state set from outside, settle() before
    reading it; each call ticks it), as fused(byte, state) without decay or with lazy_decay=False
    (every row decays every step; also for a half-life LazyDecay cannot hold). The graph reads the
    step's tensors (weight layouts, counters, the lazy decay's origins), which this object keeps.
    """

    def __init__(
        self,
        model: BDH,
        state: RecurrentState,
        fused: Callable | None = None,
        sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        lazy_decay: bool = True,
    ) -> None:
        from dragon_hatchling.fused_recurrent import FusedStep, LazyDecay  # imports Triton

        if fused is None:
            fused = FusedStep(model)  # its weight layouts are made once, outside the graph
        decays = lazy_decay and model.config.half_lives is not None and LazyDecay.holds(model)
        self.lazy = LazyDecay(model, state) if decays else None  # else every row decays every step
        self.fused, self.state, self.sample = fused, state, sample
        self.byte = torch.zeros(state.layers[0].shape[0], dtype=torch.long, device=state.pos.device)
        self.graph = torch.cuda.CUDAGraph()
        self.out = self.capture(generator)

    def body(self) -> torch.Tensor:
        """What the graph holds: the step, and the sampling that feeds its byte back."""
        lazy = () if self.lazy is None else (self.lazy,)
        logits = self.fused(self.byte, self.state, *lazy)
        if self.sample is None:
            return logits
        nxt = self.sample(logits)  # B, 1
        self.byte.copy_(nxt[:, 0])
        return nxt

    def capture(self, generator: torch.Generator | None) -> torch.Tensor:
        """Warm up, put the state and the random state back, and capture body() on a side stream."""
        saved = self.state.clone()
        rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body()  # warm up outside the graph: compiles the kernels, makes cuBLAS's handle
            self.state.copy_(saved)
            if self.lazy is not None:
                self.lazy.mark_current(self.state)
            if generator is not None:
                generator.set_state(rng)
                self.graph.register_generator_state(generator)
            else:
                torch.cuda.set_rng_state(rng)
            self.graph.capture_begin()  # not torch.cuda.graph(), which empties the allocator's cache
            out = self.body()
            self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def __call__(self, next_byte: torch.Tensor | None = None) -> torch.Tensor:
        if next_byte is not None:
            self.byte.copy_(next_byte)
        self.graph.replay()
        if self.lazy is not None:  # settles the scaled state every lazy.every steps
            self.lazy.tick(self.state)
        return self.out


def prompt_state(
    model: BDH, prompts: Prompts, context: int | None, chunk_size: int
) -> tuple[torch.Tensor, RecurrentState, list[int]]:
    """The logits after each prompt's last byte (B, V), the state after the prompts (a position a row
    for a list of prompts, each read alone) and the bytes each row's state covers (a long prompt: its
    last `context`)."""
    rows = prompts if isinstance(prompts, list) else [prompts]
    if context is not None:
        rows = [row[..., -context:] for row in rows]
    reads = [
        model.forward_chunked(row if row.dim() == 2 else row[None], chunk_size=chunk_size) for row in rows
    ]
    logits = torch.cat([logits[:, -1] for logits, _, _ in reads])
    if not isinstance(prompts, list):
        return logits, reads[0][2], [rows[0].shape[1]] * rows[0].shape[0]
    return logits, RecurrentState.stack([state for _, _, state in reads]), [len(row) for row in rows]


def state_before_last(model: BDH, windows: torch.Tensor, chunk_size: int) -> RecurrentState:
    """The state after all but the last byte of each window (R, W): the next step reads the last."""
    if windows.shape[1] == 1:
        return model.initial_state(windows.shape[0], windows.device)
    return model.forward_chunked(windows[:, :-1], chunk_size=chunk_size)[2]


def restart_rows(model: BDH, state: RecurrentState, texts: list[torch.Tensor], rows: list[int],
                 keep: int, chunk_size: int, graphed: GraphedStep | None) -> None:  # fmt: skip
    """Rows `rows` of the state start over from the last `keep` bytes of their texts: all at once
    for a state of one position (every row then restarts), else each alone; a lazily decayed state
    marks them current."""
    lazy = graphed.lazy if graphed is not None else None
    windows = [texts[b][-keep:] for b in rows]
    if state.pos.dim() == 0:
        state.copy_(state_before_last(model, torch.stack(windows), chunk_size))
        if lazy is not None:
            lazy.mark_current(state)
        return
    for b, window in zip(rows, windows, strict=True):
        state.put_row(b, state_before_last(model, window[None], chunk_size))
        if lazy is not None:
            lazy.mark_current(state, b)


@torch.no_grad()
def generate(
    model: BDH,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    context: int | None = None,
    chunk_size: int = 256,
    cuda_graph: bool = True,
    progress: bool = False,
) -> Prompts:
    """Append max_new_tokens sampled bytes to each prompt: to idx (B, T), T >= 1, or to each of a
    list of B prompts of their own lengths, sampled side by side (each row its own position and state),
    returned as a list (progress: a bar at a terminal).

    The prompts go through the chunked form, then each new byte costs one recurrent step of the
    batch (on CUDA, a captured graph of the fused step and the sampling, unless cuda_graph=False or
    the model is in training mode with dropout: call model.eval() first, as for any sampling).
    context: the most bytes the model sees at once (None: all of them). Once the bytes of a row since
    its last restart would exceed it, that row restarts from its last context // 2 bytes (one chunked
    pass), so a model trained on windows of `context` bytes is never asked about longer ones.
    """
    check_generate_args(prompts, temperature, context)
    if max_new_tokens <= 0:
        return [p.clone() for p in prompts] if isinstance(prompts, list) else prompts.clone()
    pick = partial(sample_next, temperature=temperature, top_k=top_k, generator=generator)
    logits, state, seen = prompt_state(model, prompts, context, chunk_size)
    graphed = None
    fusable = model.active_dropout == 0 and model.has_fused_step  # FusedStep: no dropout, no shifted heads
    if cuda_graph and state.pos.is_cuda and max_new_tokens > 1 and fusable:
        graphed = GraphedStep(model, state, sample=pick, generator=generator)
    new = [pick(logits)]  # B, 1 a byte
    fed = False  # whether the graph holds the last byte as its next input already
    for _ in tqdm(range(max_new_tokens - 1), unit="byte", disable=None if progress else True, leave=False):
        seen = [n + 1 for n in seen]
        restart = [b for b, n in enumerate(seen) if context is not None and n > context]
        if restart:
            texts = texts_of(prompts, new)
            restart_rows(model, state, texts, restart, context // 2, chunk_size, graphed)
            seen = [context // 2 if b in restart else n for b, n in enumerate(seen)]
        if graphed is not None:  # step and sample in the graph; it keeps the byte for the next
            nxt, fed = graphed(None if fed else new[-1][:, 0]).clone(), True
        else:
            nxt = pick(model.step(new[-1][:, 0], state))
        new.append(nxt)
    return texts_of(prompts, new) if isinstance(prompts, list) else torch.cat([prompts, *new], dim=1)


def texts_of(prompts: Prompts, new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt and the bytes sampled after it so far (new: B, 1 each)."""
    sampled = torch.cat(new, dim=1)
    rows = list(prompts)
    return [torch.cat([row, sampled[b]]) for b, row in enumerate(rows)]


@torch.no_grad()
def generate_recompute(
    model: BDH,
    idx: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    context: int | None = None,
) -> Prompts:
    """generate() the slow way: the parallel form over the whole window for every new byte (a
    list of prompts: one after another)."""
    check_generate_args(idx, temperature, context)
    if isinstance(idx, list):
        args = (max_new_tokens, temperature, top_k, generator, context)
        return [generate_recompute(model, row[None], *args)[0] for row in idx]
    start = 0 if context is None else max(0, idx.shape[1] - context)
    for _ in range(max_new_tokens):
        if context is not None and idx.shape[1] - start > context:
            start = idx.shape[1] - context // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat((idx, sample_next(logits[:, -1], temperature, top_k, generator)), dim=1)
    return idx


def sample_context(context: int | None, seq_len: int, config) -> int | None:
    """The sampler's window (None: the whole text), from --context (0: the whole text) and --seq_len.
    Left out: the whole text for a model with decay (its quality holds at any length), --seq_len for
    one without. A model with a longest window (the GPT's block_size) never sees more than that."""
    if config.max_window is not None:
        return min(context or seq_len, config.max_window)
    if context is not None:
        return context or None
    return None if config.half_lives is not None else seq_len

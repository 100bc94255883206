"""Sampling from BDH-GPU: the prompt through the chunked form, then one recurrent step per byte.

    from dragon_hatchling.sampling import generate
    out = generate(model.eval(), prompt, 500, temperature=0.8, top_k=40)

On CUDA the steps run as one captured CUDA graph of fused_recurrent.FusedStep and the sampling, which
feeds each sampled byte back to the next step; elsewhere (or with cuda_graph=False) they are the plain
`BDH.step`. `generate_recompute` (the parallel form over the whole window for every byte, the only
way for a model without a recurrent form, the GPT) is the reference both are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import BDH, RecurrentState


def check_generate_args(idx: torch.Tensor, temperature: float, context: int | None) -> None:
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one byte")
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
    generator: the one sample draws from, if not the default. fused: the step to capture, called as
    fused(byte, state) (default: fused_recurrent.FusedStep(model)); the graph reads its tensors
    (weight layouts, counters), which this object keeps.
    """

    def __init__(
        self,
        model: BDH,
        state: RecurrentState,
        fused: Callable | None = None,
        sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if fused is None:
            from dragon_hatchling.fused_recurrent import FusedStep  # imports Triton

            fused = FusedStep(model)  # its weight layouts are made once, outside the graph
        self.fused, self.state, self.sample = fused, state, sample
        self.byte = torch.zeros(state.layers[0].shape[0], dtype=torch.long, device=state.pos.device)
        self.graph = torch.cuda.CUDAGraph()
        self.out = self.capture(generator)

    def body(self) -> torch.Tensor:
        """What the graph holds: the step, and the sampling that feeds its byte back."""
        logits = self.fused(self.byte, self.state)
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
        return self.out


@torch.no_grad()
def generate(
    model: BDH,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    context: int | None = None,
    chunk_size: int = 256,
    cuda_graph: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Append max_new_tokens sampled bytes to idx (B, T), T >= 1 (progress: a bar at a terminal).

    The prompt goes through the chunked form, then each new byte costs one recurrent step
    (on CUDA, a captured graph of the fused step and the sampling, unless cuda_graph=False or the
    model is in training mode with dropout: call model.eval() first, as for any sampling).
    context: the most bytes the model sees at once (None: all of them). Once the bytes since the
    last restart would exceed it, the state restarts from the last context // 2 bytes (one chunked
    pass), so a model trained on windows of `context` bytes is never asked about longer ones.
    """
    check_generate_args(idx, temperature, context)
    if max_new_tokens <= 0:
        return idx.clone()

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, generator)

    start = 0 if context is None else max(0, idx.shape[1] - context)  # a long prompt: its end
    logits, _, state = model.forward_chunked(idx[:, start:], chunk_size=chunk_size)
    seen = idx.shape[1] - start  # bytes the state covers
    no_dropout = model.active_dropout == 0  # the plain step applies dropout; FusedStep cannot
    graphed = None
    if cuda_graph and idx.is_cuda and max_new_tokens > 1 and no_dropout:
        graphed = GraphedStep(model, state, sample=pick, generator=generator)
    out = [idx, pick(logits[:, -1])]  # B, 1 a byte
    fed = False  # whether the graph holds the last byte as its next input already
    bar = tqdm(total=max_new_tokens, initial=1, unit="byte", disable=None if progress else True, leave=False)
    for _ in range(max_new_tokens - 1):
        seen += 1
        if context is not None and seen > context:  # restart from the last context // 2 bytes
            logits, _, fresh = model.forward_chunked(
                torch.cat(out, 1)[:, -(context // 2) :], chunk_size=chunk_size
            )
            state.copy_(fresh)
            seen = context // 2
            nxt, fed = pick(logits[:, -1]), False
        elif graphed is not None:  # step and sample in the graph; it keeps the byte for the next
            nxt, fed = graphed(None if fed else out[-1][:, 0]).clone(), True
        else:
            nxt = pick(model.step(out[-1][:, 0], state))
        out.append(nxt)
        bar.update(1)
    bar.close()
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_recompute(
    model: BDH,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    context: int | None = None,
) -> torch.Tensor:
    """generate() the slow way: the parallel form over the whole window for every new byte."""
    check_generate_args(idx, temperature, context)
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

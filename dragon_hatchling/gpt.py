"""A GPT in nanoGPT's shape, bytes in and out: the Transformer that BDH-GPU is measured against.

`experiment.py --arch gpt` trains it, and `evaluate.py` and `dragon_hatchling.hub` score, save and
share it, exactly as they do BDH (same data, windows, recipe, checkpoint format and Hub path). The
default is nanoGPT's small shape at 8 layers: width 512, 8 heads, no biases, learned positions over
512 bytes, the readout tied to the embedding; 25.6M parameters.

    v = wte[idx] + wpe[pos]                                      # B, T, d
    repeat L times, each layer its own weights:
        v = v + attn(LN(v))   causal softmax attention, h heads  # B, T, d
        v = v + mlp(LN(v))    d -> 4d -> d, GELU
    logits = LN(v) wte^T                                         # B, T, V

GPTXL, the paper's Transformer baseline (Appendix B.2: GPT-2 with ALiBi and a FIFO of the last 4,096
KV-cache entries carried across minibatches), is the same model with `memory` M > 0 (`--arch gpt
--memory 4096`): each layer's attention also reads the keys and values of the row's last M bytes
(GPTMemory, detached between steps: Transformer-XL's recurrence), and positions are ALiBi's, no
wpe: the score of query i on key j is q.k / sqrt(d/h) - slope_head * (i - j), slopes 2^(-8/h),
2^(-16/h), ..., 2^(-8).
A bias of the distance needs no table of positions, so a window and its memory may be of any length,
and every byte is at the same distance from its neighbours in every window (learned positions would
be absolute to the window: the memory would have none). forward_chunked reads a text in pieces
through it, as BDH's chunked form does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from model import CardOfItsOwn, read_in_chunks


@dataclass
class GPTConfig:
    """Dimensions of the GPT; saved with every checkpoint (config.json) and enough to rebuild it."""

    n_layer: int = 8
    n_embd: int = 512  # d
    n_head: int = 8
    block_size: int = 512  # the longest window it reads (learned positions)
    vocab_size: int = 256  # bytes
    dropout: float = 0.1
    arch: str = "gpt"  # how a checkpoint says which model it holds (BDH's configs have no arch)
    memory: int = 0  # M: bytes of keys and values carried from one window to the next (0: none)
    position: str | None = None  # "learned" (wpe over block_size) or "alibi"; None: alibi with a memory

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch != "gpt":
            raise ValueError(f"arch must be 'gpt', got {self.arch!r}")
        if int(self.memory) < 0:
            raise ValueError(f"memory must be 0 or a positive number of bytes, got {self.memory}")
        if self.position is None:
            self.position = "alibi" if self.memory else "learned"
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.memory and self.position != "alibi":
            raise ValueError(
                "a memory of earlier bytes needs position 'alibi' (learned positions end at the window)"
            )

    @property
    def learned_positions(self) -> bool:
        return self.position == "learned"

    @property
    def num_params(self) -> int:
        """Parameters: 12 d^2 per layer (attention 4 d^2, MLP 8 d^2), 2 d of LayerNorm per layer and
        d at the end, the embedding (tied to the readout) and the learned positions."""
        d = self.n_embd
        positions = self.block_size if self.learned_positions else 0
        return self.n_layer * (12 * d * d + 2 * d) + d + (self.vocab_size + positions) * d

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_window(self) -> int | None:
        """The longest window the model reads: its learned positions (None: any, with ALiBi)."""
        return self.block_size if self.learned_positions else None

    def activation_bytes(self, positions: int, training: bool) -> int:
        """At least the memory a pass over `positions` bytes keeps: about 16 d floats a byte in each
        layer that backward needs (all of them in training, one at a time otherwise)."""
        return 4 * positions * 16 * self.n_embd * (self.n_layer if training else 1)

    def state_bytes(self, batch_size: int) -> int:
        """The memory's keys and values (float32 at most): 2 x L x B x M x d."""
        return 4 * 2 * self.n_layer * batch_size * self.memory * self.n_embd

    def describe(self) -> str:
        """The model in a line, as the model card says it."""
        positions = (
            f"learned positions over {self.block_size} bytes"
            if self.learned_positions
            else "ALiBi positions"
            + (f", a memory of the last {self.memory} bytes (GPTXL)" * bool(self.memory))
        )
        return f"{self.n_layer} layers, width {self.n_embd}, {self.n_head} heads, no biases, {positions}"


POSITIONS = ("learned", "alibi")


@dataclass
class GPTMemory:
    """What a GPT with a memory carries from one window to the next: per layer, the keys and values
    of the row's last bytes (B, h, M', d/h each, M' <= memory)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's slope of each head (Press et al. 2022): 2^(-8 i / h), i = 1..h."""
    return torch.exp2(-8.0 * torch.arange(1, n_head + 1) / n_head)


def alibi_bias(slopes: torch.Tensor, T: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive scores of T queries on past + T keys (the memory's, then the window's): minus
    slope times the distance, -inf on keys after the query. Returns h, T, past + T."""
    i = torch.arange(T, device=slopes.device)[:, None] + past  # the query's place among the keys
    j = torch.arange(past + T, device=slopes.device)[None, :]
    distance = (i - j).to(torch.float32)  # T, past + T
    bias = -slopes[:, None, None].float() * distance
    return bias.masked_fill(j > i, float("-inf")).to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (nanoGPT's bias=False)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, v: torch.Tensor, bias: torch.Tensor | None = None, past: tuple | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """v: B, T, d. bias: h, T, P + T (ALiBi's) or None (causal, learned positions); past: the
        memory's keys and values (B, h, P, d/h each). Returns the output and the keys and values read."""
        B, T, d = v.shape
        q, k, u = (
            self.qkv(v).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        )  # B, h, T, d/h
        if past is not None:  # the memory's bytes come first
            k, u = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(u.dtype), u], 2)
        p = self.dropout if self.training else 0.0
        if bias is None:
            a = F.scaled_dot_product_attention(q, k, u, dropout_p=p, is_causal=True)  # B, h, T, d/h
        else:
            a = F.scaled_dot_product_attention(q, k, u, attn_mask=bias.to(q.dtype), dropout_p=p)
        return self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d))), (k, u)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.ln_attn, self.attn = LayerNorm(d), Attention(config)
        self.ln_mlp = LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d, bias=False),
            nn.GELU(),
            nn.Linear(4 * d, d, bias=False),
            nn.Dropout(config.dropout),
        )

    def forward(self, v: torch.Tensor, bias: torch.Tensor | None = None, past: tuple | None = None):
        """v: B, T, d. Returns the new v and the keys and values its attention read (Attention)."""
        a, kv = self.attn(self.ln_attn(v), bias, past)
        v = v + a
        return v + self.mlp(self.ln_mlp(v)), kv


class GPT(
    CardOfItsOwn,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dragon-hatchling",
    tags=["gpt", "dragon-hatchling", "byte-level", "language-model"],
):
    """nanoGPT's model without biases, over bytes: forward(idx, targets) -> (logits, loss), as BDH's."""

    # What this architecture offers (model.BDH asks the same questions)
    display_name = "GPT"
    description = "GPT in nanoGPT's shape, the Transformer baseline of dragon-hatchling's BDH-GPU"
    steps_recurrently = False  # sampling recomputes the window for every byte (sampling.generate_recompute)
    has_neurons = False  # no sparse neurons, no neuron graph
    has_fused_path = False  # trained and scored through PyTorch (compiled on CUDA)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)  # also the readout (tied)
        self.wpe = nn.Embedding(config.block_size, d) if config.learned_positions else None
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT's initialisation: Normal(0, 0.02), the projections into the residual stream
        scaled by 1/sqrt(2 L); LayerNorm weights 1."""
        for name, p in self.named_parameters():
            if name.endswith(("ln_attn.weight", "ln_mlp.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def reads_streams(self) -> bool:
        """Whether a text can be read in pieces, the state carried (forward_chunked, initial_state):
        with a memory. Without one a text is read in windows of at most block_size."""
        return self.config.memory > 0

    @property
    def histogram_weights(self) -> dict[str, str]:
        """The weights evaluate.py draws: embedding, positions, the first layer's and the last's (those
        that start Normal(0, 0.02), as the initial-weights curve assumes)."""
        last = self.config.n_layer - 1
        positions = {"wpe.weight": "positions (block x d)"} if self.config.learned_positions else {}
        return {
            "wte.weight": "embedding = readout (V x d)",
            **positions,
            "blocks.0.attn.qkv.weight": "layer 1 attention qkv (3d x d)",
            "blocks.0.mlp.0.weight": "layer 1 MLP in (4d x d)",
            f"blocks.{last}.mlp.0.weight": f"layer {last + 1} MLP in (4d x d)",
        }

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: B, T bytes (T <= block_size with learned positions). Returns logits (B, T, V) and,
        with targets, the mean cross-entropy."""
        T, longest = idx.shape[1], self.config.max_window
        if longest is not None and T > longest:
            raise ValueError(f"a window of {T} bytes is longer than the GPT's block_size {longest}")
        logits, _ = self.window(idx, None)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def window(self, idx: torch.Tensor, memory: GPTMemory | None) -> tuple[torch.Tensor, GPTMemory | None]:
        """Logits (B, T, V) of a window read after the memory's bytes (None: alone), and the memory
        after it: the last `memory` bytes' keys and values of each layer (carried.Carried detaches
        them between training steps)."""
        T = idx.shape[1]
        v = self.wte(idx)  # B, T, d
        if self.wpe is not None:
            v = v + self.wpe(torch.arange(T, device=idx.device))
        v = self.drop(v)
        past = 0 if memory is None else memory.keys[0].shape[2]
        bias = None if self.wpe is not None else alibi_bias(self.slopes, T, past, v.dtype)  # h, T, past + T
        read = []
        for i, block in enumerate(self.blocks):
            v, kv = block(v, bias, None if memory is None else (memory.keys[i], memory.values[i]))
            read.append(kv)
        logits = self.ln_f(v) @ self.wte.weight.T  # B, T, V
        if memory is None:
            return logits, None
        M = self.config.memory
        kept = GPTMemory([k[:, :, -M:] for k, _ in read], [u[:, :, -M:] for _, u in read])
        return logits, kept

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> GPTMemory:
        """The memory before the first byte: no keys, no values (B, h, 0, d/h each)."""
        c = self.config
        device = device if device is not None else self.wte.weight.device
        empty = lambda: torch.zeros(batch_size, c.n_head, 0, c.n_embd // c.n_head, device=device)  # noqa: E731
        return GPTMemory([empty() for _ in range(c.n_layer)], [empty() for _ in range(c.n_layer)])

    def forward_chunked(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        chunk_size: int = 256,
        state: GPTMemory | None = None,
        checkpoint: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, GPTMemory]:
        """A text read chunk_size bytes at a time through the memory (a GPT with one). Returns
        logits, loss and the memory after the text. checkpoint: accepted, as BDH's; not needed."""
        if not self.reads_streams:
            raise ValueError("forward_chunked reads through a memory; this GPT has none (memory 0)")
        state = state if state is not None else self.initial_state(idx.shape[0], idx.device)
        return read_in_chunks(self.window, idx, targets, chunk_size, state)

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


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

    @property
    def num_params(self) -> int:
        """Parameters: 12 d^2 per layer (attention 4 d^2, MLP 8 d^2), 2 d of LayerNorm per layer and
        d at the end, the embedding (tied to the readout) and the positions."""
        d = self.n_embd
        return self.n_layer * (12 * d * d + 2 * d) + d + (self.vocab_size + self.block_size) * d

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_window(self) -> int:
        """The longest window the model reads: its learned positions."""
        return self.block_size

    def activation_bytes(self, positions: int, training: bool) -> int:
        """At least the memory a pass over `positions` bytes keeps: about 16 d floats a byte in each
        layer that backward needs (all of them in training, one at a time otherwise)."""
        return 4 * positions * 16 * self.n_embd * (self.n_layer if training else 1)

    def describe(self) -> str:
        """The model in a line, as the model card says it."""
        return (
            f"{self.n_layer} layers, width {self.n_embd}, {self.n_head} heads, no biases, learned "
            f"positions over {self.block_size} bytes"
        )


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

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        B, T, d = v.shape
        q, k, u = (
            self.qkv(v).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        )  # B, h, T, d/h
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, u, dropout_p=p, is_causal=True)  # B, h, T, d/h
        return self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))


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

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v + self.attn(self.ln_attn(v))
        return v + self.mlp(self.ln_mlp(v))


class GPT(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dragon-hatchling",
    tags=["gpt", "dragon-hatchling", "byte-level", "language-model"],
):
    """nanoGPT's model without biases, over bytes: forward(idx, targets) -> (logits, loss), as BDH's."""

    # What this architecture offers (model.BDH asks the same questions)
    display_name = "GPT"
    description = "GPT in nanoGPT's shape, the Transformer baseline of dragon-hatchling's BDH-GPU"
    reads_streams = False  # no recurrent form: a text is read in windows of at most block_size
    has_neurons = False  # no sparse neurons, no neuron graph
    has_fused_path = False  # trained and scored through PyTorch (compiled on CUDA)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)  # also the readout (tied)
        self.wpe = nn.Embedding(config.block_size, d)
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
    def histogram_weights(self) -> dict[str, str]:
        """The weights evaluate.py draws: embedding, positions, the first layer's and the last's (those
        that start Normal(0, 0.02), as the initial-weights curve assumes)."""
        last = self.config.n_layer - 1
        return {
            "wte.weight": "embedding = readout (V x d)",
            "wpe.weight": "positions (block x d)",
            "blocks.0.attn.qkv.weight": "layer 1 attention qkv (3d x d)",
            "blocks.0.mlp.0.weight": "layer 1 MLP in (4d x d)",
            f"blocks.{last}.mlp.0.weight": f"layer {last + 1} MLP in (4d x d)",
        }

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: B, T bytes (T <= block_size). Returns logits (B, T, V) and, with targets, the mean
        cross-entropy."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"a window of {T} bytes is longer than the GPT's block_size {self.config.block_size}"
            )
        v = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # B, T, d
        for block in self.blocks:
            v = block(v)
        logits = self.ln_f(v) @ self.wte.weight.T  # B, T, V
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

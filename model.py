"""BDH-GPU, the GPU form of the Dragon Hatchling (Kosowski et al. 2025, arXiv 2509.26507, App. E).

Names follow Appendix E: Dx and Dy map d -> n (the sparse neuron space), E maps n -> d.
The paper authors' code names them the other way round (their `encoder` is our Dx, their
`decoder` is our E); `checkpoints.py` translates their files.

    v = LN(embed[idx])                               # B, T, d
    repeat L times, the same weights every time:
        x = relu(v Dx)                               # B, h, T, n/h   sparse, positive neurons
        a = causal linear attention, q = k = RoPE(x), values v, diagonal masked   # B, h, T, d
        y = relu(LN(a) Dy) * x                       # B, h, T, n/h   (dropout here)
        v = LN(v + LN(y E))                          # B, T, d
    logits = v readout                               # B, T, V
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

ROPE_STYLES = ("interleaved", "half")


@dataclass
class BDHConfig:
    """Dimensions of BDH-GPU; saved with every checkpoint and enough to rebuild the model."""

    n_embd: int = 256  # d
    n_head: int = 4  # h
    n_neurons: int = 32768  # n, total over heads (n/h per head)
    n_layer: int = 6  # L, all layers share one set of weights
    vocab_size: int = 256  # bytes
    dropout: float = 0.1
    rope_theta: float = 65536.0
    # "interleaved": dims (2i, 2i+1) paired, frequency theta^(-2i/m) (the paper authors' code);
    # "half": dims (i, i+m/2) paired, frequency theta^(-2i/m) (the reference report's code).
    rope_style: str = "interleaved"

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_head", "n_neurons", "n_layer", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_neurons % self.n_head:
            raise ValueError(f"n_neurons ({self.n_neurons}) must be divisible by n_head ({self.n_head})")
        if (self.n_neurons // self.n_head) % 2:
            raise ValueError(
                f"neurons per head (n_neurons / n_head = {self.n_neurons // self.n_head}) "
                "must be even: RoPE rotates pairs"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.rope_theta <= 1.0:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")

    @property
    def head_size(self) -> int:
        """Neurons per head, n/h."""
        return self.n_neurons // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension, without weight or bias."""
    return F.layer_norm(x, x.shape[-1:])


def rope_frequencies(config: BDHConfig) -> torch.Tensor:
    """Per-dimension rotation frequency in turns per position, shape (n/h,), float32."""
    m = config.head_size
    pair = torch.arange(m // 2, dtype=torch.float32)
    freq = config.rope_theta ** (-2.0 * pair / m) / (2 * math.pi)  # turns per position
    if config.rope_style == "interleaved":
        return freq.repeat_interleave(2)  # dims 2i, 2i+1 share frequency i
    return freq.repeat(2)  # dims i, i + m/2 share frequency i


def rope_cos_sin(config: BDHConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle at each position, each (T, n/h) float32.

    The phase is kept in turns and reduced modulo 1 before it becomes an angle, which keeps
    large positions accurate in float32 (as the paper authors' code does).
    """
    freq = rope_frequencies(config).to(positions.device)
    phase = positions.to(torch.float32)[:, None] * freq  # T, n/h   (turns)
    angle = torch.remainder(phase, 1.0) * (2 * math.pi)
    return angle.cos(), angle.sin()


def rotate_pairs(x: torch.Tensor, style: str) -> torch.Tensor:
    """The partner of each dimension in its rotation pair, with the sign of a +90 degree turn."""
    if style == "interleaved":  # x_rot[2i] = -x[2i+1], x_rot[2i+1] = x[2i]
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # rotate half: concat(-x[m/2:], x[:m/2])
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (..., T, n/h) by the position angles; result in x's dtype."""
    return (x * cos).to(x.dtype) + (rotate_pairs(x, style) * sin).to(x.dtype)


def causal_linear_attention(qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a_t = sum_{s<t} <qk_t, qk_s> v_s: linear attention, queries = keys, diagonal masked.

    qk: B, h, T, n/h    v: B, 1, T, d    returns B, h, T, d
    """
    scores = (qk @ qk.mT).tril(diagonal=-1)  # B, h, T, T
    return scores @ v


class BDH(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dragon-hatchling",
    tags=["bdh", "dragon-hatchling", "byte-level", "language-model"],
):
    """BDH-GPU with Appendix E's names: embed, Dx, Dy, E, readout (one set for all layers)."""

    def __init__(self, config: BDHConfig) -> None:
        super().__init__()
        if isinstance(config, dict):  # tolerate a plain dict from an older config.json
            config = BDHConfig(**config)
        self.config = config
        d, h, m, V = config.n_embd, config.n_head, config.head_size, config.vocab_size
        self.embed = nn.Embedding(V, d)
        self.Dx = nn.Parameter(torch.empty(h, d, m))  # d -> n, per head
        self.Dy = nn.Parameter(torch.empty(h, d, m))  # d -> n, per head
        self.E = nn.Parameter(torch.empty(h * m, d))  # n -> d
        self.readout = nn.Parameter(torch.empty(d, V))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, 0.02) for every weight, as the paper authors' code initialises them."""
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layer(
        self, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One BDH-GPU layer. v: B, T, d. Returns the new v and the neurons x, y (B, h, T, n/h)."""
        B, T, d = v.shape
        v1 = v.unsqueeze(1)  # B, 1, T, d
        x = F.relu(v1 @ self.Dx)  # B, h, T, n/h
        a = causal_linear_attention(rope(x, cos, sin, self.config.rope_style), v1)  # B, h, T, d
        y = F.relu(layer_norm(a) @ self.Dy) * x  # B, h, T, n/h
        y_flat = self.dropout(y).transpose(1, 2).reshape(B, T, -1)  # B, T, n
        v = layer_norm(v + layer_norm(y_flat @ self.E))  # B, T, d
        return v, x, y

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: B, T bytes. Returns logits (B, T, V) and, with targets, the mean cross-entropy."""
        T = idx.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=idx.device))  # T, n/h
        v = layer_norm(self.embed(idx))  # B, T, d
        for _ in range(self.config.n_layer):
            v, _, _ = self.layer(v, cos, sin)
        logits = v @ self.readout  # B, T, V
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def activation_stats(self, idx: torch.Tensor) -> list[dict[str, float]]:
        """Fraction of non-zero neurons in x and y at every layer, for a batch of bytes."""
        T = idx.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=idx.device))
        v = layer_norm(self.embed(idx))
        stats = []
        for _ in range(self.config.n_layer):
            v, x, y = self.layer(v, cos, sin)
            stats.append(
                {"x_nonzero": (x > 0).float().mean().item(), "y_nonzero": (y > 0).float().mean().item()}
            )
        return stats

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled bytes to idx (B, T), recomputing the prefix each step."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            logits = logits[:, -1, :].float()  # B, V
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

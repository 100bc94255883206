"""BDH-GPU, the GPU form of the Dragon Hatchling (Kosowski et al. 2025, arXiv 2509.26507, App. E).

Names follow Appendix E: Dx and Dy map d -> n (the sparse neuron space), E maps n -> d.
The paper authors' code names them the other way round (their `encoder` is our Dx, their
`decoder` is our E); `dragon_hatchling/loading.py` translates their files.

    v = LN(embed[idx])                               # B, T, d
    repeat L times, the same weights every time:
        x = relu(v Dx)                               # B, h, T, n/h   sparse, positive neurons
        a = causal linear attention, q = k = RoPE(x), values v, diagonal masked   # B, h, T, d
            (a shifted head's value at s is v_{s+1}: a match returns the byte after it)
        y = relu(LN(a) Dy) * x                       # B, h, T, n/h   (dropout here)
        v = LN(v + LN(y E))                          # B, T, d
    logits = v readout                               # B, T, V
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

ROPE_STYLES = ("interleaved", "half")
INIT_STD = 0.02  # every weight starts Normal(0, INIT_STD), as in the paper authors' code


@dataclass
class RecurrentState:
    """What the chunked and recurrent forms carry from one chunk to the next."""

    layers: list[torch.Tensor]  # per layer: B, h, n/h, d float32, sum of RoPE(x_s)^T v_s over s < pos
    # int64, the absolute position of the next byte (RoPE continues from it): 0-dim, one for every
    # row, or B, each row its own (prompts of different lengths, sampled side by side)
    pos: torch.Tensor
    # With shifted heads (BDHConfig.shifted_heads), per layer: B, h, 1, n/h float32, RoPE(x) of the
    # byte before pos in the shifted heads (zero in the others). Its term waits for the value of the
    # byte at pos, which the next chunk or step adds to the state before reading it. None: no such heads.
    last: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor with a row for each row of the batch: the layers' states, then their last."""
        return self.layers + (self.last or [])

    def clone(self) -> RecurrentState:
        return RecurrentState([S.clone() for S in self.layers], self.pos.clone(), clone_all(self.last))

    @staticmethod
    def stack(states: list[RecurrentState]) -> RecurrentState:
        """One state of the rows of all, one after another, each row keeping its own position."""
        pos = [s.pos.expand(s.layers[0].shape[0]) for s in states]
        last = None if states[0].last is None else cat_rows([s.last for s in states])
        return RecurrentState(cat_rows([s.layers for s in states]), torch.cat(pos), last)

    def put_row(self, b: int, other: RecurrentState) -> None:
        """Row b takes other's one row in place (its position too: self.pos must be per row)."""
        for S, new in zip(self.tensors(), other.tensors(), strict=True):
            S[b].copy_(new[0])
        self.pos[b] = other.pos.reshape(-1)[0]

    def empty_rows(self, rows: torch.Tensor) -> None:
        """In place, these rows (a bool mask over the batch) start again from an empty attention state;
        their positions carry on (only distances count)."""
        for S in self.tensors():
            S[rows.to(S.device)] = 0

    def copy_(self, other: RecurrentState) -> None:
        """Take other's values in place (a captured CUDA graph reads these very tensors)."""
        for live, new in zip(self.tensors() + [self.pos], other.tensors() + [other.pos], strict=True):
            live.copy_(new)


def clone_all(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if tensors is None else [t.clone() for t in tensors]


def cat_rows(per_state: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each layer's tensors of several states, their rows one after another."""
    return [torch.cat(rows) for rows in zip(*per_state, strict=True)]


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
    # Per head, in bytes: the attention state's weight on a byte halves every half_lives[h] bytes
    # (a_t = sum_{s<t} gamma^(t-1-s) <RoPE(x_t), RoPE(x_s)> v_s, gamma = 2^(-1/half_life)).
    # None: no decay, every earlier byte counts fully (the paper's model).
    half_lives: list[float] | None = None
    # Learn the half-lives: a parameter per head, log2 of its half-life, starting from half_lives.
    learn_decay: bool = False
    # The last shifted_heads heads pair each key RoPE(x_s) with the value of the byte after it, v_{s+1}
    # (a_t = sum_{s<t} w_ts <RoPE(x_t), RoPE(x_s)> v_{s+1}): a byte that matches an earlier one reads
    # what followed it, as a Transformer's induction head does. 0: none (the paper's model).
    shifted_heads: int = 0
    # A merged model's heads (dragon_hatchling/merging.py): the head sizes of the models merged, in
    # order; each part's RoPE frequencies follow the rule for its own size. None: one part.
    rope_parts: list[int] | None = None

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
        self.check_heads()
        if self.rope_parts is not None:
            self.check_rope_parts()

    def check_heads(self) -> None:
        """half_lives: one positive number a head; learn_decay needs them; shifted_heads in [0, h]."""
        if self.half_lives is not None:
            self.half_lives = [float(t) for t in self.half_lives]
            if len(self.half_lives) != self.n_head or not all(0 < t < math.inf for t in self.half_lives):
                raise ValueError(
                    f"half_lives must be {self.n_head} positive numbers of bytes (one a head), "
                    f"got {self.half_lives}"
                )
        if self.learn_decay and self.half_lives is None:
            raise ValueError("learn_decay needs half_lives to start from")
        if not 0 <= self.shifted_heads <= self.n_head:
            raise ValueError(
                f"shifted_heads must be in [0, n_head = {self.n_head}], got {self.shifted_heads}"
            )

    def check_rope_parts(self) -> None:
        parts = self.rope_parts
        if sum(parts) != self.head_size or not all(int(m) > 0 and m % 2 == 0 for m in parts):
            raise ValueError(
                f"rope_parts must be positive even head sizes adding up to n/h = {self.head_size}, "
                f"got {parts}"
            )
        if self.rope_style != "interleaved":
            raise ValueError("rope_parts needs rope_style 'interleaved' (merging converts the parts to it)")

    @property
    def head_size(self) -> int:
        """Neurons per head, n/h."""
        return self.n_neurons // self.n_head

    @property
    def num_params(self) -> int:
        """Parameters of the model this config makes: Dx, Dy, E (n x d each), embedding and readout."""
        return 3 * self.n_neurons * self.n_embd + 2 * self.vocab_size * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_window(self) -> None:
        """The longest window the model reads: any (the GPT's is its block_size)."""
        return None

    def activation_bytes(self, positions: int, training: bool) -> int:
        """At least the memory a pass over `positions` bytes keeps: x and y of one layer, float32
        (training recomputes what backward needs, layer by layer)."""
        return 2 * 4 * positions * self.n_neurons

    def state_bytes(self, batch_size: int) -> int:
        """The recurrent state of `batch_size` rows (float32): L x B x h x n/h x d."""
        return 4 * batch_size * self.n_layer * self.n_neurons * self.n_embd

    def describe(self) -> str:
        """The model in a line, as the model card says it."""
        attention = (
            f"attention that decays with half-lives of {', '.join(f'{t:g}' for t in self.half_lives)} "
            f"bytes (one a head{', learned from there' if self.learn_decay else ''})"
            if self.half_lives
            else "the paper's attention, without decay"
        )
        parts = " + ".join(map(str, self.rope_parts or []))
        merged = f"; merged, each head of {parts} neurons" if self.rope_parts else ""
        shifted = (
            f"; the last {self.shifted_heads} head(s) read the byte after each match"
            if self.shifted_heads
            else ""
        )
        return (
            f"d={self.n_embd}, h={self.n_head}, n={self.n_neurons} neurons, {self.n_layer} layers sharing "
            f"one set of weights, {attention}{merged}{shifted}"
        )


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension, without weight or bias."""
    return F.layer_norm(x, x.shape[-1:])


def rope_frequencies(config: BDHConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-dimension rotation frequency in turns per position, shape (n/h,), float32: for a merged
    model, each part's own (config.rope_parts), one after the other."""
    if config.rope_parts is not None:
        return torch.cat([part_frequencies(config, m, device) for m in config.rope_parts])
    return part_frequencies(config, config.head_size, device)


def part_frequencies(config: BDHConfig, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The frequencies of a head of m neurons: pair i turns theta^(-2i/m) / 2 pi a position."""
    pair = torch.arange(m // 2, dtype=torch.float32, device=device)
    freq = config.rope_theta ** (-2.0 * pair / m) / (2 * math.pi)  # turns per position
    if config.rope_style == "interleaved":
        return freq.repeat_interleave(2)  # dims 2i, 2i+1 share frequency i
    return freq.repeat(2)  # dims i, i + m/2 share frequency i


def rope_cos_sin(config: BDHConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle at each position (..., T), each (..., T, n/h) float32.

    The phase is kept in turns, computed in float64 and reduced modulo 1 before it becomes an angle:
    a text read as one (a stream, TBPTT) reaches positions of millions, where a float32 product
    pos * freq is off by up to 0.3 rad at 5M and RoPE's relative angles turn to noise.
    """
    freq = rope_frequencies(config, positions.device)  # made there: no copy (CUDA graphs allow none)
    phase = positions.to(torch.float64)[..., None] * freq.double()  # T, n/h   (turns)
    angle = (torch.remainder(phase, 1.0) * (2 * math.pi)).float()
    return angle.cos(), angle.sin()


def state_cos_sin(config: BDHConfig, pos: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at the T positions that follow a state's pos: (T, n/h), or (B, 1, T, n/h) for a
    pos of each row (B,), to broadcast against B, h, T, n/h."""
    positions = pos[..., None] + torch.arange(T, device=pos.device)  # T, or B, T
    cos, sin = rope_cos_sin(config, positions)
    return (cos, sin) if pos.dim() == 0 else (cos[:, None], sin[:, None])


def rotate_pairs(x: torch.Tensor, style: str) -> torch.Tensor:
    """The partner of each dimension in its rotation pair, with the sign of a +90 degree turn."""
    if style == "interleaved":  # x_rot[2i] = -x[2i+1], x_rot[2i+1] = x[2i]
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # rotate half: concat(-x[m/2:], x[:m/2])
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (..., T, n/h) by the position angles; result in x's dtype."""
    return (x * cos).to(x.dtype) + (rotate_pairs(x, style) * sin).to(x.dtype)


def successors(v: torch.Tensor) -> torch.Tensor:
    """v_{t+1} at t along dim -2, zero at the last position (its successor is not there yet)."""
    return F.pad(v[..., 1:, :], (0, 0, 0, 1))


def head_values(v: torch.Tensor, n_head: int, shifted: int) -> torch.Tensor:
    """The attention's values: v (B, T, d) for every head (B, 1, T, d), or with shifted heads
    (B, h, T, d) v for the first h - shifted and successors(v) for the last shifted."""
    v1 = v.unsqueeze(1)  # B, 1, T, d
    if shifted == 0:
        return v1
    B, _, T, d = v1.shape
    return torch.cat((v1.expand(B, n_head - shifted, T, d), successors(v1).expand(B, shifted, T, d)), dim=1)


def causal_linear_attention(
    qk: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None
) -> torch.Tensor:
    """a_t = sum_{s<t} w_ts <qk_t, qk_s> v_s: linear attention, queries = keys, diagonal masked.

    w = 1 (the paper's model), or decay (h, T, T) = gamma_h^(t-1-s) for s < t and 0 elsewhere.
    qk: B, h, T, n/h    v: B, 1, T, d (or B, h, T, d: head_values)    returns B, h, T, d
    """
    scores = qk @ qk.mT  # B, h, T, T
    scores = scores.tril(diagonal=-1) if decay is None else scores * decay.to(scores.dtype)
    return scores @ v


@dataclass
class ChunkDecay:
    """The decay of the attention state over a chunk of C bytes, per head (float32)."""

    weights: torch.Tensor  # h, C, C: gamma^(i-1-j) for j < i, else 0 (inside the chunk)
    since_start: torch.Tensor  # h, C, 1: gamma^i, what is left at byte i of the state before the chunk
    to_end: torch.Tensor  # h, C, 1: gamma^(C-1-j), what is left of byte j's term when the chunk ends
    whole: torch.Tensor  # h, 1, 1: gamma^C, what is left of the state before the chunk when it ends


def chunk_decay(
    config: BDHConfig, C: int, device: torch.device | str | None = None, log2_half: torch.Tensor | None = None
) -> ChunkDecay | None:
    """The decay factors of a chunk of C bytes; None for a model without decay. log2_half (h): the
    learned half-lives (BDH.log2_half_lives; the factors then carry their gradient), else the config's."""
    if config.half_lives is None:
        return None
    if log2_half is None:
        half = torch.tensor(config.half_lives, dtype=torch.float32, device=device)[:, None, None]  # h, 1, 1
    else:
        half = torch.exp2(log2_half.float().to(device))[:, None, None]
    i = torch.arange(C, dtype=torch.float32, device=device)
    lag = i[:, None] - i[None, :] - 1  # C, C: t - 1 - s
    weights = torch.where(lag >= 0, torch.exp2(-lag.clamp(min=0) / half), 0.0)
    return ChunkDecay(
        weights=weights,
        since_start=torch.exp2(-i[:, None] / half),
        to_end=torch.exp2(-(C - 1 - i)[:, None] / half),
        whole=torch.exp2(-C / half),
    )


def read_in_chunks(step, idx: torch.Tensor, targets: torch.Tensor | None, chunk_size: int, state):
    """The loop of every chunked form (BDH's, fused_parallel.Fused's, a GPT's with a memory):
    step(part, state) -> (logits, state) over idx (B, T), chunk_size bytes at a time. Returns the
    logits (B, T, V), with targets their mean cross-entropy, and the state after the last chunk."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logits = []
    for start in range(0, idx.shape[1], chunk_size):
        out, state = step(idx[:, start : start + chunk_size], state)
        logits.append(out)
    logits = torch.cat(logits, dim=1)  # B, T, V
    loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return logits, loss, state


CARD = """---
{{ card_data }}
---

# {{ display_name }} over bytes, saved by dragon-hatchling

A {{ description }} language model over UTF-8 bytes: {{ shape }}; {{ parameters }} parameters
(`config.json`, `model.safetensors`).

```python
from {{ module }} import {{ class_name }}   # dragon-hatchling
model = {{ class_name }}.from_pretrained("THIS_REPO_OR_FOLDER")
```

or `uv run evaluate.py --model_path THIS_REPO_OR_FOLDER` (loss, bits per byte, perplexity, weight
histograms; `--prompt TEXT` samples). A run pushed with `experiment.py --push_to_hub` or `python -m
dragon_hatchling.hub push` carries a card with its results and command instead of this one.
"""


class CardOfItsOwn:
    """The model card that save_pretrained and push_to_hub write (PyTorchModelHubMixin asks
    generate_model_card): what the model is and how to load it, instead of the mixin's blanks."""

    def describe(self) -> str:
        """The model in a line, as the model card says it (the config's line)."""
        return self.config.describe()

    def generate_model_card(self, *args, **kwargs):
        from huggingface_hub import ModelCard

        return ModelCard.from_template(
            card_data=self._hub_mixin_info.model_card_data, template_str=CARD, display_name=self.display_name,
            description=self.description, shape=self.describe(), class_name=type(self).__name__,
            module=type(self).__module__, parameters=f"{self.num_params():,}",
        )  # fmt: skip


class BDH(
    CardOfItsOwn,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dragon-hatchling",
    tags=["bdh", "dragon-hatchling", "byte-level", "language-model"],
):
    """BDH-GPU with Appendix E's names: embed, Dx, Dy, E, readout (one set for all layers)."""

    # What this architecture offers; the scripts ask these instead of testing types (gpt.GPT's differ)
    display_name = "BDH-GPU"
    description = "BDH-GPU (the Dragon Hatchling, arXiv 2509.26507, Appendix E)"  # as the model card says
    reads_streams = True  # forward_chunked, initial_state: a text read as one, the state carried
    steps_recurrently = True  # step(): sampling at constant work a byte (sampling.generate)
    has_neurons = True  # sparse positive neurons x, y (activation_stats) and the neuron graph of E Dx
    has_fused_path = True  # dragon_hatchling/fused_parallel.py computes forward() in Triton kernels
    histogram_weights = {
        "E": "E (n x d)",
        "Dx": "Dx (h x d x n/h)",
        "Dy": "Dy (h x d x n/h)",
        "embed.weight": "embedding (V x d)",
        "readout": "readout (d x V)",
    }  # the weights evaluate.py draws, and their labels

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
        if config.learn_decay:  # h: log2 of each head's half-life in bytes
            self.log2_half_lives = nn.Parameter(torch.empty(h))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD) -> None:
        """Normal(0, 0.02) for every weight, as the paper authors' code initialises them; learned
        half-lives start at the config's."""
        for p in (self.embed.weight, self.Dx, self.Dy, self.E, self.readout):
            nn.init.normal_(p, mean=0.0, std=std)
        if self.config.learn_decay:
            with torch.no_grad():
                self.log2_half_lives.copy_(torch.tensor(self.config.half_lives).log2())

    def decay(self, C: int, device: torch.device | str | None = None) -> ChunkDecay | None:
        """The decay factors of a chunk of C bytes (chunk_decay), the learned half-lives if any."""
        return chunk_decay(self.config, C, device, getattr(self, "log2_half_lives", None))

    def describe(self) -> str:
        """The config's line, and the half-lives learned so far."""
        if not self.config.learn_decay:
            return self.config.describe()
        return f"{self.config.describe()}, now {', '.join(f'{t:.4g}' for t in self.half_lives())} bytes"

    def half_lives(self) -> list[float] | None:
        """Each head's half-life in bytes as the model has it now (learned or the config's)."""
        if not self.config.learn_decay:
            return self.config.half_lives
        return torch.exp2(self.log2_half_lives.detach().float()).tolist()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def has_fused_step(self) -> bool:
        """Whether fused_recurrent.FusedStep computes step(): not with shifted heads, whose state
        keeps the byte before's RoPE(x) (RecurrentState.last) that its kernels do not."""
        return not self.config.shifted_heads

    @property
    def active_dropout(self) -> float:
        """The dropout probability a pass applies now: the config's in training mode, else 0."""
        return self.dropout.p if self.training else 0.0

    def neurons(self, v: torch.Tensor) -> torch.Tensor:
        """x = relu(v Dx), the sparse positive neurons. v: B, T, d. Returns B, h, T, n/h."""
        return F.relu(v.unsqueeze(1) @ self.Dx)

    def mix(self, v: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y = relu(LN(a) Dy) * x, then v <- LN(v + LN(y E)). Returns the new v (B, T, d) and y."""
        B, T, d = v.shape
        y = F.relu(layer_norm(a) @ self.Dy) * x  # B, h, T, n/h
        y_flat = self.dropout(y).transpose(1, 2).reshape(B, T, -1)  # B, T, n
        return layer_norm(v + layer_norm(y_flat @ self.E)), y  # B, T, d

    def values(self, v: torch.Tensor) -> torch.Tensor:
        """The attention's values of v (B, T, d): B, 1, T, d, or B, h, T, d with shifted heads."""
        return head_values(v, self.config.n_head, self.config.shifted_heads)

    def layer(
        self, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, decay: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One BDH-GPU layer, parallel form. v: B, T, d. Returns the new v and the neurons x, y."""
        x = self.neurons(v)  # B, h, T, n/h
        r = rope(x, cos, sin, self.config.rope_style)
        a = causal_linear_attention(r, self.values(v), decay)  # B, h, T, d
        v, y = self.mix(v, x, a)
        return v, x, y

    def layer_chunk(
        self,
        v: torch.Tensor,
        state: torch.Tensor,
        last: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        decay: ChunkDecay | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer over a chunk of C bytes that carries the attention state of all earlier bytes:
        state B, h, n/h, d (float32 or wider), the sum of RoPE(x_s)^T v_s over every earlier position s
        (each term weighted gamma^(pos-1-s) with decay). Inside the chunk the attention is the quadratic
        one; earlier chunks come in through the state. With shifted heads, last (B, h, 1, n/h) is the
        byte before the chunk, its term waiting for this chunk's first v; returned for its last byte."""
        vals = self.values(v)  # B, 1 or h, C, d
        x = self.neurons(v)  # B, h, C, n/h
        r = rope(x, cos, sin, self.config.rope_style)  # B, h, C, n/h
        if last is not None:  # the byte before the chunk meets its successor, this chunk's first byte
            state = state + (last.mT @ v[:, None, :1].to(last.dtype)).to(state.dtype)
        if decay is None:
            a = causal_linear_attention(r, vals) + r @ state.to(r.dtype)  # B, h, C, d
            state = state + (r.mT @ vals).to(state.dtype)  # B, h, n/h, d
        else:  # the state before the chunk fades by gamma^i at its byte i, and by gamma^C to its end
            earlier = (r * decay.since_start.to(r.dtype)) @ state.to(r.dtype)  # B, h, C, d
            a = causal_linear_attention(r, vals, decay.weights) + earlier
            state = decay.whole * state + ((r * decay.to_end.to(r.dtype)).mT @ vals).to(state.dtype)
        if last is not None:
            last = (r[:, :, -1:] * self.shifted_mask(r.device)).to(last.dtype)  # B, h, 1, n/h
        v, _ = self.mix(v, x, a)
        return v, state, last

    def shifted_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """1 for the shifted heads, 0 for the others: h, 1, 1 float32."""
        h, k = self.config.n_head, self.config.shifted_heads
        return (torch.arange(h, device=device) >= h - k).float()[:, None, None]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: B, T bytes. Returns logits (B, T, V) and, with targets, the mean cross-entropy.

        dragon_hatchling.fused_parallel.fused_forward computes the same function in Triton (CUDA, bf16).
        """
        T = idx.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=idx.device))  # T, n/h
        decay = self.decay_weights(T, idx.device)  # h, T, T or None
        v = layer_norm(self.embed(idx))  # B, T, d
        for _ in range(self.config.n_layer):
            v, _, _ = self.layer(v, cos, sin, decay)
        logits = v @ self.readout  # B, T, V
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def decay_weights(self, T: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """gamma_h^(t-1-s) for s < t, else 0 (h, T, T) float32; None for a model without decay."""
        decay = self.decay(T, device)
        return None if decay is None else decay.weights

    @torch.no_grad()
    def activation_stats(self, idx: torch.Tensor) -> list[dict[str, float]]:
        """Fraction of non-zero neurons in x, RoPE(x) and y at every layer, for a batch of bytes.

        RoPE(x) is non-zero where either neuron of a rotation pair is: the rows of the attention
        state that a recurrent step reads and writes (fused_recurrent.FusedStep skips the others).
        """
        T = idx.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=idx.device))
        decay = self.decay_weights(T, idx.device)
        v = layer_norm(self.embed(idx))
        stats = []
        for _ in range(self.config.n_layer):
            v, x, y = self.layer(v, cos, sin, decay)
            r = rope(x, cos, sin, self.config.rope_style)
            fraction = lambda t: (t != 0).float().mean().item()  # noqa: E731
            stats.append({"x_nonzero": fraction(x), "rope_x_nonzero": fraction(r), "y_nonzero": fraction(y)})
        return stats

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        """The state before the first byte: every layer's attention state is zero."""
        c = self.config
        device = device if device is not None else self.E.device
        shape = (batch_size, c.n_head, c.head_size, c.n_embd)
        dtype = torch.promote_types(self.E.dtype, torch.float32)  # at least float32, even under bf16
        layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        last = None
        if c.shifted_heads:  # no byte before the first
            last = [torch.zeros(shape[:2] + (1, c.head_size), device=device, dtype=dtype) for _ in layers]
        return RecurrentState(layers, torch.zeros((), dtype=torch.long, device=device), last)

    def chunk(self, idx: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """Logits (B, C, V) for the next C bytes idx (B, C), continuing from state."""
        C = idx.shape[1]
        cos, sin = state_cos_sin(self.config, state.pos, C)  # C, n/h   (absolute positions)
        decay = self.decay(C, idx.device)
        v = layer_norm(self.embed(idx))  # B, C, d
        layer_states, lasts = [], []
        for layer_state, last in zip(state.layers, state.last or [None] * len(state.layers), strict=True):
            v, layer_state, last = self.layer_chunk(v, layer_state, last, cos, sin, decay)  # same weights
            layer_states.append(layer_state)
            lasts.append(last)
        lasts = None if state.last is None else lasts  # None: no shifted heads
        return v @ self.readout, RecurrentState(layer_states, state.pos + C, lasts)

    def forward_chunked(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        chunk_size: int = 256,
        state: RecurrentState | None = None,
        checkpoint: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RecurrentState]:
        """The chunked form: the same function as forward(), chunk_size bytes at a time.

        Memory grows linearly with T (with checkpoint=True, training keeps only each chunk's
        input state and recomputes the chunk in backward). Returns logits, loss and the final state.
        """
        state = state if state is not None else self.initial_state(idx.shape[0], idx.device)

        def step(part: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
            if checkpoint and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(self.chunk, part, state, use_reentrant=False)
            return self.chunk(part, state)

        return read_in_chunks(step, idx, targets, chunk_size, state)

    @torch.no_grad()
    def step(self, byte: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """The recurrent form: logits (B, V) after one more byte (B,). Updates state in place.

        Constant work per byte: each layer reads its B x h x n/h x d state once for the attention
        and adds RoPE(x)^T v to it (S <- gamma S + RoPE(x)^T v with decay). fused_recurrent.FusedStep
        is the same step in Triton, reading only the rows of the state, Dy and E that belong to non-zero
        neurons; this is its reference. Shifted heads first add the byte before's term, which waited
        for this v, and keep this byte's RoPE(x) for the next step (their own value is the next v).
        """
        cos, sin = state_cos_sin(self.config, state.pos, 1)  # 1, n/h (or B, 1, 1, n/h: a pos a row)
        decay = self.decay(1, state.pos.device)  # whole: h, 1, 1, gamma per head
        v = layer_norm(self.embed(byte[:, None]))  # B, 1, d
        shifted = None if state.last is None else self.shifted_mask(state.pos.device)  # h, 1, 1
        for i, S in enumerate(state.layers):  # B, h, n/h, d
            x = self.neurons(v)  # B, h, 1, n/h
            r = rope(x, cos, sin, self.config.rope_style)
            if shifted is not None:  # S += last^T v, then last = RoPE(x) in the shifted heads
                S.addcmul_(state.last[i].mT, v.unsqueeze(1).to(S.dtype))
                state.last[i].copy_(r * shifted)
            a = (r.to(S.dtype) @ S).to(r.dtype)  # B, h, 1, d   every earlier byte, through the state
            if decay is not None:
                S.mul_(decay.whole.to(S.dtype))
            S.addcmul_(r.mT.to(S.dtype), self.values(v).to(S.dtype))  # S += RoPE(x)^T v, in place
            v, _ = self.mix(v, x, a)
        state.pos.add_(1)
        return (v @ self.readout)[:, 0]

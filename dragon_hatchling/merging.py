"""Merge two BDH-GPU models into one of n1 + n2 neurons, as the paper's section 7.1 does (Table 2):
"(a) concatenate all parameter tensors that have an n dimension (e.g. Dy, Dx, E, RoPE frequency
buffers) along their n dimension, (b) average all other parameters". No training follows.

    uv run python -m dragon_hatchling.hub merge MODEL_A MODEL_B OUT_DIR

Per head the merged model's neurons are A's, then B's: Dx and Dy (h, d, n/h) are concatenated along
n/h, E (n, d) head by head. The embedding and the readout are averaged. Each part keeps the RoPE
frequencies it was trained with: the config records the parts' head sizes (BDHConfig.rope_parts),
and rope_frequencies computes each part's by its own rule. A part in the "half" RoPE layout (pairs
(i, i + m/2)) is first permuted into the interleaved one (pairs (2i, 2i + 1)), which is the same
model with its neurons renumbered.

Two copies of one model merge into that model: x and y appear twice, the attention and y E double,
and the layer norms that follow take the factor out.
"""

from __future__ import annotations

import dataclasses

import torch

from dragon_hatchling.cli import UsageError
from model import BDH, BDHConfig

SHARED_FIELDS = (
    "n_embd", "n_head", "n_layer", "vocab_size", "rope_theta", "half_lives", "learn_decay", "shifted_heads"
)  # fmt: skip


def interleaved_order(config: BDHConfig) -> torch.Tensor:
    """The neuron order (within a head) that puts a model's RoPE pairs side by side: identity for
    the interleaved layout, [0, m/2, 1, m/2 + 1, ...] for the half layout."""
    m = config.head_size
    if config.rope_style == "interleaved":
        return torch.arange(m)
    return torch.stack([torch.arange(m // 2), torch.arange(m // 2) + m // 2], dim=1).flatten()


def parts(config: BDHConfig) -> list[int]:
    """The head sizes a model's heads are made of (one, unless it was merged already)."""
    return list(config.rope_parts) if config.rope_parts is not None else [config.head_size]


def check_mergeable(a: BDHConfig, b: BDHConfig) -> None:
    """A UsageError naming the first field two models must share (d, heads, layers, RoPE base, decay)."""
    for name in SHARED_FIELDS:
        if getattr(a, name) != getattr(b, name):
            raise UsageError(
                f"the models differ in {name} ({getattr(a, name)} and {getattr(b, name)}): only models of "
                f"the same {', '.join(SHARED_FIELDS)} merge"
            )


def merged_config(a: BDHConfig, b: BDHConfig) -> BDHConfig:
    return dataclasses.replace(
        a,
        n_neurons=a.n_neurons + b.n_neurons,
        rope_style="interleaved",
        rope_parts=parts(a) + parts(b),
        dropout=a.dropout,
    )


def per_head(model: BDH) -> dict[str, torch.Tensor]:
    """A model's n-dimensional weights, per head and in the interleaved layout: Dx, Dy (h, d, m) and
    E (h, m, d)."""
    c, order = model.config, interleaved_order(model.config)
    E = model.E.detach().view(c.n_head, c.head_size, c.n_embd)
    return {
        "Dx": model.Dx.detach()[:, :, order],
        "Dy": model.Dy.detach()[:, :, order],
        "E": E[:, order, :],
    }


@torch.no_grad()
def merge(a: BDH, b: BDH) -> BDH:
    """The model of a's and b's neurons side by side in every head; the other weights averaged."""
    check_mergeable(a.config, b.config)
    config = merged_config(a.config, b.config)
    model = BDH(config)
    wa, wb = per_head(a), per_head(b)
    model.Dx.copy_(torch.cat([wa["Dx"], wb["Dx"]], dim=2))  # h, d, m1 + m2
    model.Dy.copy_(torch.cat([wa["Dy"], wb["Dy"]], dim=2))
    model.E.copy_(torch.cat([wa["E"], wb["E"]], dim=1).flatten(0, 1))  # h (m1 + m2), d
    model.embed.weight.copy_((a.embed.weight + b.embed.weight) / 2)
    model.readout.copy_((a.readout + b.readout) / 2)
    if config.learn_decay:  # each head's learned half-life: the geometric mean of the two
        model.log2_half_lives.copy_((a.log2_half_lives + b.log2_half_lives) / 2)
    return model

"""The synapse state sigma of the paper's section 6.2, eq. (16), and the graph it makes between
neurons (Fig. 11): per layer l >= 1 and head, an n/h x n/h matrix

    sigma_{t-1,l} = sum_{tau < t} gamma^(t-1-tau) y_{tau,l-1} (U^(tau-t) x_{tau,l})^T

y_{tau,l-1} the previous layer's output neurons at byte tau, x_{tau,l} this layer's input neurons,
U^(tau-t) RoPE's rotation by the distance back to t (what the attention at t reads of byte tau:
<RoPE_t(x_t), RoPE_tau(x_tau)> = <x_t, U^(tau-t) x_tau>) and gamma the head's decay (1 without).
sigma[i, j] is how much neuron i's firing, earlier in the text, now feeds neuron j.

It is computed from the neurons of one parallel pass (BDH.layer), `block` rows at a time, never more
than block x n/h of it at once. Its graph: an edge i -> j where sigma[i, j] is above a threshold
(negative entries filtered out, as the paper does), each head a graph of n/h neurons.
"""

from __future__ import annotations

import math

import torch

from dragon_hatchling.measures import degree_summary
from dragon_hatchling.scoring import eval_mode
from model import BDH, layer_norm, rope, rope_cos_sin, rope_frequencies


@torch.no_grad()
def layer_neurons(model: BDH, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x and y of every layer for a text (idx: 1, T), no dropout: [(x, y)] per layer, each h, T, n/h."""
    T = idx.shape[1]
    cos, sin = rope_cos_sin(model.config, torch.arange(T, device=idx.device))
    decay = model.decay_weights(T, idx.device)
    out = []
    with eval_mode(model):
        v = layer_norm(model.embed(idx))
        for _ in range(model.config.n_layer):
            v, x, y = model.layer(v, cos, sin, decay)
            out.append((x[0].float(), y[0].float()))
    return out


def rotated_back(model: BDH, x: torch.Tensor, t: int) -> torch.Tensor:
    """U^(tau-t) x_tau for every tau < t: x (h, t, n/h) rotated by the distance to t."""
    cos, sin = rope_cos_sin(model.config, torch.arange(t, device=x.device) - t)  # t, n/h
    return rope(x, cos, sin, model.config.rope_style)


def weights_back(model: BDH, t: int, device) -> torch.Tensor | float:
    """gamma_h^(t-1-tau) for tau < t (h, t, 1): what is left of byte tau's term at t, the chunked
    form's to_end over a chunk of t bytes; 1 without decay."""
    decay = model.decay(t, device)
    return 1.0 if decay is None else decay.to_end


def sigma_blocks(model: BDH, neurons, layer: int, t: int, block: int = 1024):
    """sigma_{t-1,layer} in blocks of rows: yields (i0, rows), rows h, block, n/h (neurons i0 .. i0 +
    block of each head's y against all of its x)."""
    y, x = terms(model, neurons, layer, t)
    for i0 in range(0, y.shape[2], block):
        yield i0, y[:, :, i0 : i0 + block].mT @ x  # h, block, n/h


def terms(model: BDH, neurons, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of sigma_{t-1,layer} = y^T x: y_tau weighted by the decay to t and U^(tau-t)
    x_tau, for tau < t (h, t, n/h each)."""
    if not 1 <= layer < model.config.n_layer:
        raise ValueError(
            f"sigma needs the layer before: layer must be 1 .. {model.config.n_layer - 1}, got {layer}"
        )
    x = rotated_back(model, neurons[layer][0][:, :t], t)  # h, t, n/h
    return neurons[layer - 1][1][:, :t] * weights_back(model, t, x.device), x


def sigma(model: BDH, idx: torch.Tensor, layer: int, t: int | None = None) -> torch.Tensor:
    """sigma_{t-1,layer} whole (h, n/h, n/h), after the first t bytes of the text (all)."""
    return sigma_of(model, layer_neurons(model, idx), layer, idx.shape[1] if t is None else t)


def sigma_of(model: BDH, neurons, layer: int, t: int) -> torch.Tensor:
    """sigma_{t-1,layer} whole (h, n/h, n/h) from a text's neurons (layer_neurons)."""
    return torch.cat([rows for _, rows in sigma_blocks(model, neurons, layer, t)], dim=1)


def pair_partner(model: BDH, j: int) -> tuple[int, float]:
    """The other neuron of j's RoPE pair, and the sign its sine takes in j's rotation (rope(): the
    first of a pair turns to x_a cos - x_b sin, the second to x_b cos + x_a sin)."""
    m = model.config.head_size
    if model.config.rope_style == "interleaved":
        return j ^ 1, -1.0 if j % 2 == 0 else 1.0
    return (j + m // 2) % m, -1.0 if j < m // 2 else 1.0


def entry_series(model: BDH, neurons, layer: int, head: int, i: int, j: int) -> torch.Tensor:
    """One entry sigma[i, j] of a head after every byte of the text: values at t = 1 .. T (T,)."""
    x, y = neurons[layer][0][head].double(), neurons[layer - 1][1][head][:, i].double()  # T, n/h; T
    T = x.shape[0]
    partner, sign = pair_partner(model, j)
    freq = rope_frequencies(model.config).double()[j].item()
    t, tau = torch.arange(1, T + 1, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
    theta = 2 * math.pi * torch.remainder(freq * (tau - t).double(), 1.0)  # T, T: the turn back to t
    turned = x[:, j] * theta.cos() + sign * x[:, partner] * theta.sin()  # U^(tau-t) x_tau, entry j
    decay = model.decay(T + 1, x.device)  # weights[i, j] = gamma^(i-1-j) for j < i
    w = (tau < t).double() if decay is None else decay.weights[head, 1:, :-1].double()  # T, T
    return (w * y * turned).sum(1)


def synapse_degrees(model: BDH, idx: torch.Tensor, layer: int, threshold_sd: float = 5.0) -> dict:
    """The graph of sigma at the end of the text: an edge i -> j (i != j) where sigma[i, j] is
    positive and above threshold_sd standard deviations of sigma's entries (per head, measured on
    its first block). Returns the threshold and every neuron's out- and in-degree (h * n/h each)."""
    neurons = layer_neurons(model, idx)
    h, m = model.config.n_head, model.config.head_size
    out_degree = torch.zeros(h, m, dtype=torch.long, device=idx.device)
    in_degree = torch.zeros(h, m, dtype=torch.long, device=idx.device)
    threshold = None
    for i0, rows in sigma_blocks(model, neurons, layer, idx.shape[1]):
        if threshold is None:  # per head: a stated number of standard deviations, at least 0
            threshold = (threshold_sd * rows.flatten(1).std(1)).clamp(min=0)[:, None, None]
        edges = rows > threshold  # h, block, n/h
        i = torch.arange(i0, i0 + rows.shape[1], device=idx.device)
        edges[:, i - i0, i] = False  # no loops
        out_degree[:, i0 : i0 + rows.shape[1]] = edges.sum(2)
        in_degree += edges.sum(1)
    return {
        "threshold": threshold.flatten().tolist(),
        "out_degree": out_degree.flatten().cpu().numpy(),
        "in_degree": in_degree.flatten().cpu().numpy(),
    }


EDGES = (
    "sigma (eq. 16) at the text's end, per head n/h x n/h; an edge i -> j, i != j, where sigma[i, j] > 5 "
    "standard deviations of the head's entries (negatives filtered out)"
)


def synapse_graph(model: BDH, idx: torch.Tensor, layer: int, init_seed: int = 1337) -> dict:
    """The degrees of sigma's graph for the model and for a fresh one of its config (drawn with
    init_seed), on the same text, summarised as measures.neuron_graph summarises the weights' graph."""
    torch.manual_seed(init_seed)
    initial = type(model)(model.config).to(idx.device)
    out = {}
    for name, m in (("model", model), ("initial", initial)):
        graph = synapse_degrees(m, idx, layer)
        out[name] = {
            "threshold": graph["threshold"],
            "out_degree": degree_summary(graph["out_degree"]),
            "in_degree": degree_summary(graph["in_degree"]),
        }
    out["initial"]["seed"] = init_seed
    out.update(edges=EDGES, layer=layer, text_bytes=int(idx.shape[1]))
    return out

"""Shifted heads (BDHConfig.shifted_heads): a head whose key RoPE(x_s) carries the value of the byte
after it, v_{s+1}, so that a byte matching an earlier one reads what followed it. The attention
against a loop over its definition, the three forms against each other, causality, the copy it makes
possible, the state's rows, and the config."""

import pytest
import torch

from dragon_hatchling.architectures import checked_config
from model import BDH, BDHConfig, causal_linear_attention, chunk_decay, head_values
from test_forms import random_model


def by_definition(r: torch.Tensor, v: torch.Tensor, shifted: int, weights=None) -> torch.Tensor:
    """a_t = sum_{s<t} w_ts <r_t, r_s> u_s, u_s = v_{s+1} in the last `shifted` heads, v_s in the
    others, one term at a time. r: B, h, T, m; v: B, T, d; weights: h, T, T or None (all 1)."""
    B, h, T, _ = r.shape
    a = torch.zeros(B, h, T, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        for t in range(T):
            for s in range(t):  # s + 1 <= t: the byte after s is never past the present
                u = v[:, s + 1] if head >= h - shifted else v[:, s]
                w = 1.0 if weights is None else float(weights[head, t, s])
                a[:, head, t] += w * (r[:, head, t] * r[:, head, s]).sum(-1, keepdim=True) * u
    return a


@pytest.mark.parametrize("shifted", [0, 1, 3])
@pytest.mark.parametrize("decay", [False, True])
def test_the_attention_with_shifted_values_is_its_definition(shifted, decay):
    torch.manual_seed(shifted)
    B, h, T, m, d = 2, 3, 9, 4, 5
    r, v = torch.randn(B, h, T, m, dtype=torch.float64), torch.randn(B, T, d, dtype=torch.float64)
    cfg = BDHConfig(n_embd=d, n_head=h, n_neurons=h * m, half_lives=[2.0, 5.0, 30.0] if decay else None)
    weights = chunk_decay(cfg, T).weights.double() if decay else None
    got = causal_linear_attention(r, head_values(v, h, shifted), weights)
    torch.testing.assert_close(got, by_definition(r, v, shifted, weights))


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_and_recurrent_forms_give_the_parallel_logits(seed, decay):
    """The byte before each chunk (or step) waits in the state's `last` for the next byte's value."""
    model = random_model(seed, "interleaved", decay, shifted=True)
    assert model.config.shifted_heads > 0
    idx = torch.randint(0, 256, (2, 31))
    with torch.no_grad():
        ref, _ = model(idx)
        for chunk_size in (1, 5, 16):
            out, _, _ = model.forward_chunked(idx, chunk_size=chunk_size)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        state = model.initial_state(2)
        steps = torch.stack([model.step(idx[:, t], state) for t in range(idx.shape[1])], dim=1)
    torch.testing.assert_close(steps, ref, rtol=1e-4, atol=1e-4)
    unshifted = BDH(BDHConfig(**{**model.config.to_dict(), "shifted_heads": 0})).eval()
    unshifted.load_state_dict(model.state_dict())
    assert not torch.allclose(unshifted(idx)[0], ref, atol=1e-3)  # the shift changes the function


def test_no_byte_is_seen_before_its_turn():
    """v_{s+1} reaches only the bytes after s + 1: changing byte j changes no logit before j."""
    model = random_model(3, "half", decay=True, shifted=True)
    idx = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ref, _ = model(idx)
        for j in (1, 7, 23):
            changed = idx.clone()
            changed[0, j] = (changed[0, j] + 1) % 256
            out, _ = model(changed)
            torch.testing.assert_close(out[:, :j], ref[:, :j])
            assert not torch.allclose(out[:, j:], ref[:, j:])


def test_a_shifted_head_reads_the_byte_that_followed_the_match():
    """Keys that are one-hot codes of the byte: at a byte read once before, the shifted head's value
    is the byte that followed it then, which is the next byte of a repeated text (an induction head's
    copy); an unshifted head's value is that byte itself."""
    text = torch.tensor(list(b"qwertyuiop|qwertyu"))
    r = torch.eye(256, dtype=torch.float64)[text][None, None]  # 1, 1, T, 256
    v = torch.eye(256, dtype=torch.float64)[text][None]  # 1, T, 256
    shifted = causal_linear_attention(r, head_values(v, 1, 1))[0, 0].argmax(-1)
    plain = causal_linear_attention(r, head_values(v, 1, 0))[0, 0].argmax(-1)
    for t in range(11, len(text) - 1):  # the second "qwertyu"
        assert int(shifted[t]) == int(text[t + 1])
        assert int(plain[t]) == int(text[t])


def test_emptied_rows_forget_the_byte_that_waits():
    """empty_rows clears `last` with the state: the row then reads as from nothing, at its position."""
    model = random_model(4, "interleaved", decay=True, shifted=True)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        _, _, state = model.forward_chunked(idx[:, :5], chunk_size=5)
        state.empty_rows(torch.tensor([True, False]))
        out, _, _ = model.forward_chunked(idx[:, 5:], chunk_size=7, state=state)
        fresh = model.initial_state(1)
        fresh.pos = torch.tensor(5)
        alone, _, _ = model.forward_chunked(idx[:1, 5:], chunk_size=7, state=fresh)
        whole, _ = model(idx[1:])
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1:], whole[:, 5:], rtol=1e-4, atol=1e-4)


def test_the_config_checks_and_describes_its_shifted_heads():
    with pytest.raises(ValueError, match=r"shifted_heads must be in \[0, n_head = 2\]"):
        BDHConfig(n_embd=8, n_head=2, n_neurons=16, shifted_heads=3)
    cfg = BDHConfig(n_embd=8, n_head=2, n_neurons=16, shifted_heads=1)
    assert "the last 1 head(s) read the byte after each match" in cfg.describe()
    older = {k: v for k, v in cfg.to_dict().items() if k != "shifted_heads"}  # a config.json before it
    assert checked_config(older, "m").shifted_heads == 0
    assert not BDH(cfg).has_fused_step and BDH(checked_config(older, "m")).has_fused_step

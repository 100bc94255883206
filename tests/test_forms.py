"""The parallel, chunked and recurrent forms compute one function (float32, random configs)."""

import pytest
import torch

from model import BDH, BDHConfig, causal_linear_attention, chunk_decay


def random_model(seed: int, style: str, decay: bool = False, shifted: bool = False) -> BDH:
    """A random small model; with decay, a half-life of 2 to 40 bytes a head; shifted: 1 to h of its
    heads shifted (BDHConfig.shifted_heads)."""
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(1, 4, (1,), generator=g))
    m = 2 * int(torch.randint(4, 24, (1,), generator=g))
    d = int(torch.randint(8, 40, (1,), generator=g))
    L = int(torch.randint(1, 4, (1,), generator=g))
    half_lives = (2 + 38 * torch.rand(h, generator=g)).tolist() if decay else None
    k = int(torch.randint(1, h + 1, (1,), generator=g)) if shifted else 0
    cfg = BDHConfig(
        n_embd=d, n_head=h, n_neurons=h * m, n_layer=L, dropout=0.0, rope_style=style, half_lives=half_lives,
        shifted_heads=k,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BDH(cfg).eval()
    model.reset_parameters(std=0.1)  # larger than the default init, so that errors would show
    return model


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("style", ["interleaved", "half"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_and_recurrent_give_the_parallel_logits(seed, style, decay):
    model = random_model(seed, style, decay)
    idx = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        ref, _ = model(idx)
        for chunk_size in (1, 7, 16, 64):  # 45 is a multiple of none but 1
            out, _, state = model.forward_chunked(idx, chunk_size=chunk_size)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            assert int(state.pos) == 45
        state = model.initial_state(2)
        steps = [model.step(idx[:, t], state) for t in range(idx.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", [False, True])
def test_chunked_form_continues_from_a_state(decay):
    # two calls carrying the state equal one call: the RoPE phase continues from the absolute position
    model = random_model(3, "interleaved", decay)
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        ref, _ = model(idx)
        first, _, state = model.forward_chunked(idx[:, :13], chunk_size=5)
        second, _, _ = model.forward_chunked(idx[:, 13:], chunk_size=4, state=state)
    torch.testing.assert_close(torch.cat((first, second), dim=1), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpoint, decay", [(False, False), (True, False), (True, True)])
def test_chunked_gradients_match_parallel(checkpoint, decay):
    model = random_model(4, "half", decay)
    idx = torch.randint(0, 256, (2, 27))
    targets = torch.randint(0, 256, (2, 27))
    _, loss = model(idx, targets)
    ref = torch.autograd.grad(loss, list(model.parameters()))
    _, loss_c, _ = model.forward_chunked(idx, targets, chunk_size=8, checkpoint=checkpoint)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss_c, list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_form_rejects_a_chunk_size_that_is_not_positive():
    model = random_model(6, "half")
    with pytest.raises(ValueError, match="chunk_size"):
        model.forward_chunked(torch.zeros((1, 4), dtype=torch.long), chunk_size=0)


def test_decay_weighs_each_earlier_byte_by_gamma_to_its_distance():
    """The parallel form's attention against its definition, term by term:
    a_t = sum_{s<t} gamma_h^(t-1-s) <r_t, r_s> v_s with gamma_h = 2^(-1 / half_life_h)."""
    torch.manual_seed(0)
    r, v = torch.randn(2, 3, 9, 6, dtype=torch.float64), torch.randn(2, 1, 9, 5, dtype=torch.float64)
    cfg = BDHConfig(n_embd=5, n_head=3, n_neurons=6, half_lives=[1.0, 4.0, 1e6])
    decay = chunk_decay(cfg, 9).weights.double()
    want = torch.zeros(2, 3, 9, 5, dtype=torch.float64)
    for h, half_life in enumerate(cfg.half_lives):
        for t in range(9):
            for s in range(t):
                want[:, h, t] += (
                    2 ** (-(t - 1 - s) / half_life)
                    * (r[:, h, t] * r[:, h, s]).sum(-1, keepdim=True)
                    * v[:, 0, s]
                )
    torch.testing.assert_close(causal_linear_attention(r, v, decay), want)
    # a very long half-life is the paper's model
    torch.testing.assert_close(
        causal_linear_attention(r, v, decay)[:, 2], causal_linear_attention(r, v)[:, 2], rtol=1e-4, atol=1e-4
    )


def test_with_decay_the_distant_past_stops_mattering():
    """What lies many half-lives back no longer changes the logits: a model with decay computes the
    same function at every position once its state has forgotten the start (no cliff past a window)."""
    torch.manual_seed(1)
    cfg = BDHConfig(n_embd=16, n_head=2, n_neurons=32, n_layer=2, dropout=0.0, half_lives=[1.0, 2.0])
    model = BDH(cfg).eval()
    recent = torch.randint(0, 256, (1, 60))  # the same last 60 bytes after two different pasts
    with torch.no_grad():
        logits = [model(torch.cat((torch.randint(0, 256, (1, 50)), recent), 1))[0][:, -8:] for _ in range(2)]
        logits.append(model(recent)[0][:, -8:])  # and after none
    for other in logits[1:]:
        torch.testing.assert_close(logits[0], other, rtol=1e-5, atol=1e-5)  # 52 bytes back: 2^-26
    # without decay the same weights do remember: the test could fail
    plain = BDH(BDHConfig(**{**cfg.to_dict(), "half_lives": None})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        past = plain(torch.cat((torch.zeros(1, 50, dtype=torch.long), recent), 1))[0][:, -8:]
        assert not torch.allclose(past, plain(recent)[0][:, -8:], atol=1e-3)


def test_half_lives_are_checked():
    with pytest.raises(ValueError, match="half_lives"):
        BDHConfig(n_head=4, half_lives=[10.0, 20.0])
    with pytest.raises(ValueError, match="half_lives"):
        BDHConfig(n_head=2, n_neurons=8, half_lives=[10.0, 0.0])

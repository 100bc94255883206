"""The parallel, chunked and recurrent forms compute one function (float32, random configs)."""

import pytest
import torch

from model import BDH, BDHConfig


def random_model(seed: int, style: str) -> BDH:
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(1, 4, (1,), generator=g))
    m = 2 * int(torch.randint(4, 24, (1,), generator=g))
    d = int(torch.randint(8, 40, (1,), generator=g))
    L = int(torch.randint(1, 4, (1,), generator=g))
    cfg = BDHConfig(n_embd=d, n_head=h, n_neurons=h * m, n_layer=L, dropout=0.0, rope_style=style)
    torch.manual_seed(seed)
    model = BDH(cfg).eval()
    model.reset_parameters(std=0.1)  # larger than the default init, so that errors would show
    return model


@pytest.mark.parametrize("style", ["interleaved", "half"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_and_recurrent_give_the_parallel_logits(seed, style):
    model = random_model(seed, style)
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


def test_chunked_form_continues_from_a_state():
    # two calls carrying the state equal one call: the RoPE phase continues from the absolute position
    model = random_model(3, "interleaved")
    idx = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        ref, _ = model(idx)
        first, _, state = model.forward_chunked(idx[:, :13], chunk_size=5)
        second, _, _ = model.forward_chunked(idx[:, 13:], chunk_size=4, state=state)
    torch.testing.assert_close(torch.cat((first, second), dim=1), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_chunked_gradients_match_parallel(checkpoint):
    model = random_model(4, "half")
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

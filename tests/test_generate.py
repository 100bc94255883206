"""Sampling: the recurrent form with a context window, against recomputing the prefix."""

import pytest
import torch

from dragon_hatchling.sampling import generate, generate_recompute, sample_next
from model import BDH, BDHConfig
from test_forms import random_model


def tiny() -> BDH:
    torch.manual_seed(0)
    return BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0))


def test_generate_appends_bytes_and_is_greedy_at_zero_temperature():
    model = tiny().eval()
    prompt = torch.tensor([list(b"Hello")])
    out = generate(model, prompt, 6, temperature=0.0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    again = generate(model, prompt, 6, temperature=0.0)
    assert torch.equal(out, again)
    g = torch.Generator().manual_seed(1)
    sampled = generate(model, prompt, 6, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (1, 11) and int(sampled.max()) < 256


def test_recurrent_generation_equals_recomputing_the_prefix():
    model = random_model(5, "interleaved")
    prompt = torch.randint(0, 256, (2, 11))
    fast = generate(model, prompt, 20, temperature=0.0, chunk_size=4)
    slow = generate_recompute(model, prompt, 20, temperature=0.0)
    assert torch.equal(fast, slow)
    fast = generate(model, prompt, 20, 0.8, 10, torch.Generator().manual_seed(7), chunk_size=4)
    slow = generate_recompute(model, prompt, 20, 0.8, 10, torch.Generator().manual_seed(7))
    assert torch.equal(fast, slow)


def test_generation_with_a_context_window_equals_recomputing_that_window():
    model = random_model(8, "half")
    prompt = torch.randint(0, 256, (2, 13))
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    fast = generate(model, prompt, 30, 1.0, None, gen(3), context=8, chunk_size=3)  # restarts 4 times
    slow = generate_recompute(model, prompt, 30, 1.0, None, gen(3), context=8)
    assert torch.equal(fast, slow)
    # a prompt longer than the window: only its last `context` bytes matter
    cut = generate_recompute(model, prompt[:, -8:], 30, 1.0, None, gen(3), context=8)
    assert torch.equal(slow[:, -30:], cut[:, -30:])
    whole = generate_recompute(model, prompt, 30, 1.0, None, gen(3))
    assert not torch.equal(whole, slow)
    with pytest.raises(ValueError, match="context"):
        generate(model, prompt, 3, context=1)


def test_generation_rejects_an_empty_prompt():
    model = random_model(6, "half")
    with pytest.raises(ValueError, match="at least one byte"):
        generate(model, torch.zeros((1, 0), dtype=torch.long), 3)


def test_sampling_draws_what_torch_multinomial_draws():
    """sample_next skips multinomial's check (it waits for the GPU) but draws the same bytes."""
    logits = torch.randn(4, 256) * 3
    for seed in range(20):
        want = torch.multinomial(
            torch.softmax(logits / 0.7, -1), 1, generator=torch.Generator().manual_seed(seed)
        )
        got = sample_next(logits, 0.7, None, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)
    top = sample_next(logits, 1.0, 3, torch.Generator().manual_seed(0))
    assert (logits.gather(1, top) >= logits.topk(3).values[:, -1:]).all()


@pytest.mark.parametrize(
    "decay, context, shifted",
    [(False, None, False), (True, None, False), (False, 9, False), (True, 9, False), (True, 9, True)],
)
def test_each_row_of_a_batch_generates_what_its_prompt_alone_does(decay, context, shifted):
    """B prompts of their own lengths sampled side by side (greedy, float32): each row is that prompt
    generated alone, with the rows' context restarts at their own bytes (shifted heads: the byte
    before each row's next waits in its own row of the state)."""
    model = random_model(9, "interleaved", decay=decay, shifted=shifted)
    prompts = [torch.randint(0, 256, (n,)) for n in (1, 7, 12, 4)]
    together = generate(model, prompts, 17, temperature=0.0, context=context, chunk_size=4)
    for prompt, row in zip(prompts, together, strict=True):
        alone = generate(model, prompt[None], 17, temperature=0.0, context=context, chunk_size=4)[0]
        assert torch.equal(row, alone)
        assert torch.equal(row, generate_recompute(model, [prompt], 17, 0.0, context=context)[0])


def test_generation_rejects_prompts_it_cannot_read():
    model = random_model(6, "half")
    empty = torch.zeros(0, dtype=torch.long)
    cases = [([], "at least one prompt"), ([torch.tensor([1]), empty], "at least one byte"), (empty, "B, T")]
    for prompts, needle in cases:
        with pytest.raises(ValueError, match=needle):
            generate(model, prompts, 3)


def test_the_same_weights_without_decay_get_their_own_floor():
    from dragon_hatchling import step_speed

    torch.manual_seed(0)
    model = BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0, half_lives=[2.0, 8.0]))
    model.eval()
    one = step_speed.prompts(b"The cat sat on the mat, and then it sat again.", 1, "cpu")
    rates = {"batch 1": 100.0, "batch 32": 400.0, "batch 1, every row decays": 50.0}
    rates["batch 1, same weights without decay"] = 110.0
    floors = step_speed.floors(model, one, one * 32, rates, bandwidth_bytes_per_s=1e9)
    own, plain = floors["batch 1"], floors["batch 1, same weights without decay"]
    assert own["x_nonzero"] != plain["x_nonzero"]  # the first layer's x agrees; the second's does not
    at_floor = step_speed.floor_ratios(floors)["lazy_decay_over_no_decay_at_floor"]
    own_share, plain_share = 100.0 / own["floor_bytes_per_s"], 110.0 / plain["floor_bytes_per_s"]
    assert at_floor == pytest.approx(own_share / plain_share)
    assert step_speed.floor_ratios({"batch 1": own}) == {}


def test_the_latency_fit_recovers_a_fixed_cost_and_a_bandwidth():
    """Steps that take a fixed 40 us plus their bytes at 2 TB/s: the fit over fresh models of several
    n finds both, the model's own share of fixed time, and the benchmark prints them."""
    from dragon_hatchling import benchmark, step_speed

    cfg = BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0, half_lives=[2.0, 8.0])
    assert [step_speed.width_config(cfg, k).n_neurons for k in step_speed.WIDTHS] == [16, 32, 64, 128, 256]
    assert step_speed.width_config(cfg, 0.001).n_neurons == 4  # one pair a head at least

    def rate(model, one, steps):  # bytes/s of a step that costs 40 us + its bytes at 2 TB/s
        return 1 / (40e-6 + step_speed.floor_bytes(model, one, False)["bytes_per_byte"] / 2e12)

    torch.manual_seed(1)
    model = BDH(cfg).eval()
    fit = step_speed.latency_fit(model, b"The cat sat on the mat, and then it sat again.", 10, rate)
    assert [p["n_neurons"] for p in fit["points"]] == [16, 32, 64, 128, 256]
    assert len({p["bytes_per_byte"] for p in fit["points"]}) == 5  # the fit has bytes to go on
    assert fit["fixed_seconds_a_step"] == pytest.approx(40e-6, rel=1e-6)
    assert fit["bytes_per_s"] == pytest.approx(2e12, rel=1e-6)
    assert fit["model"]["fixed_share"] == pytest.approx(40e-6 / fit["model"]["seconds_a_step"])
    printed = benchmark.latency_lines(fit)
    assert "40.0 us fixed + bytes at 2.00 TB/s" in printed and "128 (the model)" in printed

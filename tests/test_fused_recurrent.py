"""The fused recurrent step (dragon_hatchling/fused_recurrent.py) against the recurrent form of
model.py, `BDH.step`, and generation through its CUDA graph against the plain steps.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) at tiny
sizes; on a GPU the same tests run compiled at the default model's full size.
"""

import dataclasses

import pytest
import torch

from dragon_hatchling import fused_recurrent
from dragon_hatchling.sampling import generate
from model import BDH, BDHConfig, RecurrentState
from test_fused_parallel import DEVICE, make_model


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", False), ("interleaved", True)])
def test_fused_recurrent_step_matches_the_plain_step(style, decay):
    model = make_model(style, seed=2, decay=decay).eval()
    prompt = torch.randint(0, 256, (2, 9), device=DEVICE)
    _, _, plain = model.forward_chunked(prompt, chunk_size=4)
    _, _, fused = model.forward_chunked(prompt, chunk_size=4)
    for byte in torch.randint(0, 256, (5, 2), device=DEVICE):
        want = model.step(byte, plain)
        got = fused_recurrent.FusedStep(model)(byte, fused)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


def test_lazy_decay_leaves_silent_rows_alone_and_settles_to_the_plain_state():
    """With a LazyDecay the fused step keeps the state scaled (S = gamma^k stored): the logits are
    the plain step's at every byte, the rows of neurons silent at both steps are not written (the
    plain state's decay), and settle() makes the state the plain one."""
    model = make_model("interleaved", seed=2, decay=True).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (2, 9), device=DEVICE), chunk_size=4)
    fused, before = plain.clone(), plain.clone()
    step, lazy = fused_recurrent.FusedStep(model), fused_recurrent.LazyDecay(model, fused)
    for byte in torch.randint(0, 256, (2, 2), device=DEVICE):
        torch.testing.assert_close(step(byte, fused, lazy), model.step(byte, plain), rtol=1e-4, atol=1e-4)
        lazy.tick(fused)
    for f, p, b in zip(fused.layers, plain.layers, before.layers, strict=True):
        alone = (f == b).all(-1) & (b != 0).any(-1)  # B, h, M: rows left alone, not zero
        assert 0 < alone.float().mean() < 0.5, alone.float().mean()
        assert not (p == b).all(-1)[alone].any()  # the plain step decayed them
    lazy.settle(fused)
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
    assert torch.equal(lazy.origin, plain.pos.expand_as(lazy.origin)) and lazy.since == 0


def test_lazy_decay_settles_every_few_steps_before_its_scale_overflows(monkeypatch):
    """tick() settles every `every` steps, as many as keep 1 / gamma^k within 2^HEADROOM for the
    fastest-decaying head; at every byte in between the logits stay the plain step's."""
    monkeypatch.setattr(fused_recurrent.LazyDecay, "HEADROOM", 2)  # 3-byte half-life: every 6 bytes
    model = make_model("half", seed=8, decay=True).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (2, 5), device=DEVICE), chunk_size=5)
    fused = plain.clone()
    step, lazy = fused_recurrent.FusedStep(model), fused_recurrent.LazyDecay(model, fused)
    assert lazy.every in (5, 6)  # 2 / (1/3 doublings a byte), as float32 rounds log2 gamma
    for i, byte in enumerate(torch.randint(0, 256, (14, 2), device=DEVICE), 1):
        torch.testing.assert_close(step(byte, fused, lazy), model.step(byte, plain), rtol=1e-4, atol=1e-4)
        lazy.tick(fused)
        assert lazy.since == i % lazy.every
        assert torch.equal(lazy.origin, plain.pos.expand_as(lazy.origin) - lazy.since)
    lazy.settle(fused)
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


def test_lazy_decay_takes_half_lives_from_a_hundredth_of_a_byte_to_a_trillion_bytes():
    """A half-life so long that gamma rounds to 1 settles at most every 2^30 steps (no division by
    zero) and steps as the plain step does; one under 1/HEADROOM byte, whose 1 / gamma alone passes the
    headroom, is not lazily decayed (GraphedStep then decays every row every step)."""
    torch.manual_seed(9)
    cfg = BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=1, dropout=0.0, half_lives=[1e12, 5.0])
    model = BDH(cfg).to(DEVICE).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (2, 5), device=DEVICE), chunk_size=5)
    fused = plain.clone()
    step, lazy = fused_recurrent.FusedStep(model), fused_recurrent.LazyDecay(model, fused)
    assert lazy.every == 320  # 64 doublings over the 5-byte head's 1/5 a byte
    for byte in torch.randint(0, 256, (3, 2), device=DEVICE):
        torch.testing.assert_close(step(byte, fused, lazy), model.step(byte, plain), rtol=1e-4, atol=1e-4)
    assert fused_recurrent.LazyDecay.holds(model)
    short = BDH(dataclasses.replace(cfg, half_lives=[0.01, 5.0])).to(DEVICE)
    assert not fused_recurrent.LazyDecay.holds(short)
    with pytest.raises(ValueError, match="half-life under 1/64 byte"):
        fused_recurrent.LazyDecay(short, short.initial_state(2, DEVICE))


@pytest.mark.parametrize("decay", [False, True])
def test_each_row_steps_at_its_own_position(decay):
    """Prompts of different lengths stacked into one state (a position a row): the fused step gives
    each row what the plain step gives that prompt alone."""
    model = make_model("half", seed=7, decay=decay).eval()
    prompts = [torch.randint(0, 256, (1, n), device=DEVICE) for n in (3, 11, 6)]
    alone = [model.forward_chunked(p, chunk_size=4)[2] for p in prompts]
    fused = RecurrentState.stack([s.clone() for s in alone])
    assert fused.pos.tolist() == [3, 11, 6]
    step = fused_recurrent.FusedStep(model)
    lazy = fused_recurrent.LazyDecay(model, fused) if decay else None
    for byte in torch.randint(0, 256, (4, 3), device=DEVICE):
        want = torch.cat([model.step(byte[i : i + 1], s) for i, s in enumerate(alone)])
        torch.testing.assert_close(step(byte, fused, lazy), want, rtol=1e-4, atol=1e-4)
        if lazy is not None:
            lazy.tick(fused)
    assert fused.pos.tolist() == [7, 15, 10]


def test_the_fused_step_keeps_its_angles_millions_of_bytes_in():
    """At position 5,000,000 (a long stream) the kernel's RoPE phase, hi * (4096 freq mod 1) + lo *
    freq, is still the plain step's, which computes it in float64."""
    model = make_model("interleaved", seed=4).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (2, 5), device=DEVICE), chunk_size=5)
    plain.pos.fill_(5_000_000)
    fused = plain.clone()
    for byte in torch.randint(0, 256, (3, 2), device=DEVICE):
        torch.testing.assert_close(fused_recurrent.FusedStep(model)(byte, fused), model.step(byte, plain),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_fused_step_refuses_a_model_that_would_apply_dropout():
    model = make_model("half", dropout=0.1)
    with pytest.raises(ValueError, match="model.eval"):
        fused_recurrent.FusedStep(model.train())
    fused_recurrent.FusedStep(model.eval())


SMALL_TILES = {
    "attention": {"BB": 2, "BP": 8, "BD": 16, "GROUP": 2},
    "gate": {"BN": 16, "BD": 16, "GROUP": 2},
}


@pytest.mark.parametrize("tiles, batch", [({}, 3), (SMALL_TILES, 3)])
def test_fused_step_takes_sizes_that_fill_no_tile(tiles, batch):
    """d, n/h, n/2h not multiples of any block size; three heads; the partner of a pair far away;
    with small tiles, several blocks a head, the last one partial, groups of parts of two, the last
    one short, and attention programs of two batch rows, the last with one (the dot's rows padded)."""
    torch.manual_seed(3)
    cfg = BDHConfig(n_embd=24, n_head=3, n_neurons=3 * 44, n_layer=2, dropout=0.0, rope_style="half")
    model = BDH(cfg).to(DEVICE).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (batch, 7), device=DEVICE), chunk_size=3)
    fused = plain.clone()
    step = fused_recurrent.FusedStep(model, **tiles)
    for byte in torch.randint(0, 256, (2, batch), device=DEVICE):
        torch.testing.assert_close(step(byte, fused), model.step(byte, plain), rtol=1e-4, atol=1e-4)
    assert int(fused.pos) == int(plain.pos) == 9
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


def test_fused_step_is_deterministic():
    """The sums over programs add in a fixed order: the same state and byte give the same bits."""
    model = make_model("interleaved", seed=4).eval()
    _, _, state = model.forward_chunked(torch.randint(0, 256, (2, 9), device=DEVICE), chunk_size=4)
    step, byte = fused_recurrent.FusedStep(model), torch.tensor([7, 200], device=DEVICE)
    runs = [state.clone() for _ in range(2)]
    logits = [step(byte, s) for s in runs]
    assert torch.equal(logits[0], logits[1])
    for a, b in zip(*(s.layers for s in runs), strict=True):
        assert torch.equal(a, b)
    assert not step.counts[2].any()  # the kernels leave their counters at zero for the next launch


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN is the point
def test_fused_step_keeps_nan_as_the_plain_step_does():
    """A non-finite value reaches the logits as NaN, as in the plain step (not lost to a relu)."""
    model = make_model("half", seed=5).eval()
    byte = torch.tensor([7, 200], device=DEVICE)
    _, _, state = model.forward_chunked(torch.randint(0, 256, (2, 9), device=DEVICE), chunk_size=4)
    for S in state.layers:
        S.fill_(float("inf"))  # a is then infinite or NaN, and LN(a) NaN
    assert model.step(byte, state.clone()).isnan().all()
    assert fused_recurrent.FusedStep(model)(byte, state).isnan().all()


@pytest.mark.parametrize("half_lives", [None, [0.25, 6.0]])
def test_generation_through_the_cuda_graph_equals_the_plain_steps(half_lives):
    """On a GPU, generate() captures FusedStep and the sampling in one CUDA graph; it must give the
    plain steps' bytes, greedy and sampled (the graph draws what the generator would). With decay the
    graph's state is lazily decayed, and a quarter-byte half-life makes it settle every 16 bytes. On
    the CPU both runs take the plain steps."""
    torch.manual_seed(6)
    cfg = BDHConfig(n_embd=64, n_head=2, n_neurons=2 * 256, n_layer=2, dropout=0.0, half_lives=half_lives)
    model = BDH(cfg).to(DEVICE).eval()
    model.reset_parameters(std=0.1)  # distinct logits: no near-ties for float32 rounding to tip
    prompt = torch.randint(0, 256, (2, 5), device=DEVICE)
    graphed = generate(model, prompt, 24, temperature=0.0, chunk_size=4)
    plain = generate(model, prompt, 24, temperature=0.0, chunk_size=4, cuda_graph=False)
    assert torch.equal(graphed, plain)
    seeded = lambda: torch.Generator(DEVICE).manual_seed(11)  # noqa: E731
    graphed = generate(model, prompt, 24, 1.0, 20, seeded(), context=12, chunk_size=4)  # restarts twice
    plain = generate(model, prompt, 24, 1.0, 20, seeded(), context=12, chunk_size=4, cuda_graph=False)
    assert torch.equal(graphed, plain)
    assert not torch.equal(
        graphed, generate(model, prompt, 24, 1.0, 20, torch.Generator(DEVICE).manual_seed(12))
    )

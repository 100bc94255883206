import math

import pytest
import torch

from model import BDH, BDHConfig, rope_cos_sin, rope_frequencies, rotate_pairs


def tiny(**kw) -> BDH:
    cfg = dict(n_embd=32, n_head=2, n_neurons=128, n_layer=2, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return BDH(BDHConfig(**cfg))


def test_shapes_and_parameter_count():
    model = tiny()
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    assert model.Dx.shape == (2, 32, 64) and model.Dy.shape == (2, 32, 64)
    assert model.E.shape == (128, 32) and model.readout.shape == (32, 256)
    assert model.num_params() == 2 * 2 * 32 * 64 + 128 * 32 + 2 * 256 * 32


def test_default_config_is_the_reference_model():
    cfg = BDHConfig()
    assert (cfg.n_embd, cfg.n_head, cfg.n_neurons, cfg.n_layer, cfg.vocab_size) == (256, 4, 32768, 6, 256)
    assert cfg.rope_style == "interleaved" and cfg.rope_theta == 65536.0


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_causality(style):
    model = tiny(rope_style=style).eval()
    idx = torch.randint(0, 256, (2, 24))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_first_position_sees_only_its_own_byte():
    # the diagonal is masked, so position 0 attends to nothing: its logits depend on idx[:, 0] alone
    model = tiny().eval()
    idx = torch.randint(0, 256, (2, 9))
    other = torch.randint(0, 256, (2, 9))
    other[:, 0] = idx[:, 0]
    torch.testing.assert_close(model(idx)[0][:, 0], model(other)[0][:, 0])


def test_initial_loss_near_uniform():
    model = tiny()
    idx = torch.randint(0, 256, (4, 64))
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_tiny_model_overfits_a_short_text():
    torch.manual_seed(0)
    model = tiny(n_layer=2, n_neurons=256, n_embd=48)
    text = torch.tensor(list(b"the dragon hatchling learns to read bytes. " * 3))
    x, y = text[:-1].unsqueeze(0), text[1:].unsqueeze(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_is_a_rotation_preserving_relative_positions(style):
    cfg = BDHConfig(n_embd=8, n_head=1, n_neurons=16, n_layer=1, rope_style=style)
    cos, sin = rope_cos_sin(cfg, torch.arange(40))
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def rot(v, t):
        return v * cos[t].double() + rotate_pairs(v, style) * sin[t].double()

    assert torch.isclose(rot(q, 7).norm(), q.norm())
    # <R_s q, R_t k> depends only on t - s
    assert torch.isclose(rot(q, 3) @ rot(k, 10), rot(q, 20) @ rot(k, 27), atol=1e-5)


@pytest.mark.parametrize("at", [4099, 5_000_003, 2**31 + 11])
def test_rope_angles_stay_accurate_at_long_positions(at):
    """A stream or a TBPTT run reaches positions of millions: the angles stay exact there."""
    cfg = BDHConfig(n_embd=8, n_head=1, n_neurons=64, n_layer=1)
    pos = torch.tensor([at, at + 1])
    cos, sin = rope_cos_sin(cfg, pos)
    exact = torch.remainder(pos.double()[:, None] * rope_frequencies(cfg).double(), 1.0) * 2 * math.pi
    assert (cos.double() - exact.cos()).abs().max() < 1e-5
    assert (sin.double() - exact.sin()).abs().max() < 1e-5


def test_a_window_millions_of_bytes_in_reads_as_it_does_at_the_start():
    """From an empty state only relative angles matter: a window read at position 5,000,000 gives the
    logits it gives at position 0 (float32 products pos * freq once made them differ by 0.3 rad)."""
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=256, n_layer=2, dropout=0.0, rope_theta=2.0))
    idx = torch.randint(0, 256, (2, 48))
    state = model.initial_state(2)
    start, _, _ = model.forward_chunked(idx, chunk_size=16, state=state.clone())
    state.pos.fill_(5_000_000)
    later, _, _ = model.forward_chunked(idx, chunk_size=16, state=state)
    torch.testing.assert_close(later, start, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"n_neurons": 100, "n_head": 3}, "divisible"),
        ({"n_neurons": 6, "n_head": 2}, "even"),
        ({"rope_style": "spiral"}, "rope_style"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_config_rejects_bad_dimensions(kw, message):
    with pytest.raises(ValueError, match=message):
        BDHConfig(**kw)


@pytest.mark.parametrize("half_lives", [None, [8.0, 300.0]])
def test_save_and_load_roundtrip(tmp_path, half_lives):
    model = tiny(rope_style="half", rope_theta=10000.0, half_lives=half_lives)
    model.save_pretrained(tmp_path)
    loaded = BDH.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.config.half_lives == half_lives
    idx = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(model.eval()(idx)[0], loaded.eval()(idx)[0])


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_activation_stats_count_the_live_neurons(style):
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=2, rope_style=style)).eval()
    stats = model.activation_stats(torch.randint(0, 256, (2, 16)))
    assert len(stats) == 2
    for s in stats:
        # relu of random projections: about half of x; a pair is live if either member is; y = relu(.) * x
        assert 0.3 < s["x_nonzero"] < 0.7
        assert s["x_nonzero"] < s["rope_x_nonzero"] <= 1 - (1 - s["x_nonzero"]) ** 2 + 0.1
        assert 0 < s["y_nonzero"] <= s["x_nonzero"]


def test_the_plain_model_knows_nothing_of_the_fast_paths():
    """The fused kernels, sampling and the rest of dragon_hatchling build on model.py; model.py imports
    no module of the project (nor Triton): the whole model on one page."""
    import ast
    from pathlib import Path

    repo = Path(__file__).parent.parent
    ours = {p.stem for p in repo.glob("*.py")} | {"dragon_hatchling", "triton"}
    tree = ast.parse((repo / "model.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and not imported & ours, imported & ours


def test_learned_half_lives_start_at_the_config_and_learn():
    fixed, learned = tiny(half_lives=[4.0, 300.0]), tiny(half_lives=[4.0, 300.0], learn_decay=True)
    assert learned.half_lives() == pytest.approx([4.0, 300.0]) and fixed.half_lives() == [4.0, 300.0]
    learned.load_state_dict({**fixed.state_dict(), "log2_half_lives": learned.log2_half_lives.detach()})
    idx = torch.randint(0, 256, (2, 19))
    torch.testing.assert_close(learned(idx)[0], fixed(idx)[0])  # the same function at the start
    chunked, _, _ = learned.forward_chunked(idx, chunk_size=5)
    torch.testing.assert_close(chunked, fixed(idx)[0], rtol=1e-4, atol=1e-4)
    for loss in (learned(idx, idx)[1], learned.forward_chunked(idx, idx, chunk_size=5)[1]):
        (grad,) = torch.autograd.grad(loss, [learned.log2_half_lives])
        assert grad.abs().min() > 0  # both forms reach every head's half-life
    with torch.no_grad():
        learned.log2_half_lives.add_(1.0)  # twice as long: another function
    assert learned.half_lives() == pytest.approx([8.0, 600.0])
    assert not torch.allclose(learned(idx)[0], fixed(idx)[0])
    with pytest.raises(ValueError, match="learn_decay needs half_lives"):
        BDHConfig(n_embd=32, n_head=2, n_neurons=128, learn_decay=True)


def test_learned_half_lives_survive_saving_and_the_recurrent_step(tmp_path):
    model = tiny(half_lives=[4.0, 300.0], learn_decay=True).eval()
    with torch.no_grad():
        model.log2_half_lives.copy_(torch.tensor([1.0, 5.0]))  # 2 and 32 bytes
    model.save_pretrained(tmp_path)
    loaded = BDH.from_pretrained(tmp_path).eval()
    assert loaded.half_lives() == pytest.approx([2.0, 32.0]) and "learned" in loaded.config.describe()
    assert loaded.describe().endswith("learned from there), now 2, 32 bytes")  # the model card's line
    idx = torch.randint(0, 256, (1, 12))
    state = loaded.initial_state(1)
    steps = torch.stack([loaded.step(idx[:, t], state) for t in range(12)], dim=1)
    torch.testing.assert_close(steps, model(idx)[0], rtol=1e-4, atol=1e-4)

"""The fused Triton kernels against the plain PyTorch path.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) at tiny
sizes; on a GPU the same tests run compiled at the default model's full size.
"""

import pytest
import torch

import kernels
from generate import generate
from model import BDH, BDHConfig, layer_norm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# d, h, n/h, B, T: the default model on a GPU; tiny (T not a power of two) in the interpreter
SIZES = (256, 4, 8192, 8, 128) if CUDA else (32, 2, 64, 2, 21)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


HALF_LIVES = [3.0, 40.0, 7.0, 1000.0]  # bytes, one a head (the first h of them)


def make_model(style: str, seed: int = 0, dropout: float = 0.0, decay: bool = False) -> BDH:
    d, h, m, _, _ = SIZES
    torch.manual_seed(seed)
    cfg = BDHConfig(
        n_embd=d, n_head=h, n_neurons=h * m, n_layer=2, dropout=dropout, rope_style=style,
        half_lives=HALF_LIVES[:h] if decay else None,
    )  # fmt: skip
    return BDH(cfg).to(DEVICE)


def reference_neurons(v, Dx, Dy, E, cos, sin, keep=None, decay=None):
    """The layer's neuron work in float32 PyTorch, neurons in the kernels' pair order. keep: B*T x n,
    dropout's 0 or 1 / (1 - p) per neuron; decay: h, T, T (the model's decay weights)."""
    B, T, _ = v.shape
    half = Dx.shape[-1] // 2
    x = torch.relu(v.unsqueeze(1) @ Dx)  # B, h, T, M
    xa, xb = x[..., :half], x[..., half:]
    r = torch.cat((xa * cos - xb * sin, xb * cos + xa * sin), dim=-1)
    scores = (r @ r.mT).tril(-1) if decay is None else (r @ r.mT) * decay.float()
    ahat = layer_norm(scores @ v.unsqueeze(1))  # B, h, T, d
    y = (torch.relu(ahat @ Dy) * x).transpose(1, 2).reshape(B, T, -1)
    if keep is not None:
        y = y * keep.view(B, T, -1)
    return y @ E


def dropout_keep(R: int, H: int, M: int, p_drop: float, seed: int) -> torch.Tensor:
    """The gate kernel's dropout, read out: its y for x = u = 1, R x n."""
    ones = torch.ones((H, R, M), device=DEVICE, dtype=torch.bfloat16)
    y = torch.empty((R, H * M), device=DEVICE, dtype=torch.bfloat16)
    grid = kernels._grid(R, H, M)
    kernels._gate_kernel[grid](
        ones.view(R, H * M), ones, y, R, M, H, p_drop, seed, HAS_DROPOUT=True, BR=kernels.BR, BP=kernels.BP
    )
    return y.float()


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", False), ("interleaved", True)])
def test_fused_layer_values_and_gradients_match_float32(style, decay):
    check_layer_against_float32(style, decay=decay)


# A longer window on a GPU; in the interpreter, small tiles: several pair tiles a head, the last row
# tile partial and tiles of rows that span two windows.
LONG_B, LONG_T = (2, 300) if CUDA else (2, 21)


def small_tiles(monkeypatch) -> None:
    if not CUDA:
        monkeypatch.setattr(kernels, "BR", 16)
        monkeypatch.setattr(kernels, "BP", 16)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_fused_layer_with_small_tiles_or_a_long_window(style, monkeypatch):
    small_tiles(monkeypatch)
    check_layer_against_float32(style, LONG_B, LONG_T)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_fused_model_with_small_tiles_or_a_long_window(style, monkeypatch):
    small_tiles(monkeypatch)
    check_model_against_float32(style, LONG_B, LONG_T)


def check_layer_against_float32(
    style: str, B: int = SIZES[3], T: int = SIZES[4], p_drop: float = 0.0, seed: int = 0, decay: bool = False
) -> None:
    d, h, m, _, _ = SIZES
    keep = dropout_keep(B * T, h, m, p_drop, seed) if p_drop > 0 else None
    model = make_model(style, decay=decay)
    weights_of_decay = model.decay_weights(T, DEVICE)
    if weights_of_decay is not None:
        weights_of_decay = weights_of_decay.to(torch.bfloat16)
    bf16 = torch.bfloat16
    v = torch.randn(B, T, d, device=DEVICE).to(bf16)
    weights = [(torch.randn(s, device=DEVICE) * 0.05).to(bf16) for s in ((h, d, m), (h, d, m), (h * m, d))]
    cos, sin = kernels.pair_cos_sin(model, T, v.device)
    gz = torch.randn(B, T, d, device=DEVICE)
    ref_in = [t.float().requires_grad_() for t in (v, *weights)]
    ref = reference_neurons(*ref_in, cos, sin, keep, weights_of_decay)
    ref.backward(gz)
    ins = [t.clone().requires_grad_() for t in (v, *weights)]
    out = kernels.FusedNeurons.apply(*ins, cos, sin, p_drop, seed, weights_of_decay)
    out.backward(gz)
    plain_in = [t.float().requires_grad_() for t in (v, *weights)]  # yardstick: plain PyTorch in bf16
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        plain = reference_neurons(*plain_in, cos, sin, keep, weights_of_decay)
    plain.backward(gz)
    assert torch.isfinite(out).all()
    assert 1e-4 < rel(out, ref) < 1e-2  # bf16 operands, float32 accumulation
    errors = {
        n: (rel(a.grad, b.grad), rel(p.grad, b.grad))
        for n, a, p, b in zip("v Dx Dy E".split(), ins, plain_in, ref_in, strict=True)
    }
    print("relative error of the gradients (fused, plain bf16):", errors)
    for name, (fused_err, plain_err) in errors.items():
        # gradients pass LayerNorm's backward, which amplifies rounding; plain bf16 is the yardstick
        assert fused_err < max(3e-2, 3 * plain_err), (name, errors)


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", False), ("half", True)])
def test_fused_model_is_as_close_to_float32_as_plain_bf16(style, decay):
    check_model_against_float32(style, *SIZES[3:], decay=decay)


def check_model_against_float32(style: str, B: int, T: int, decay: bool = False) -> None:
    # the reference is the plain path in float32; the yardstick, the plain path under bf16 autocast
    model = make_model(style, seed=1, decay=decay)
    idx = torch.randint(0, 256, (B, T), device=DEVICE)
    targets = torch.randint(0, 256, (B, T), device=DEVICE)
    params = list(model.parameters())

    def run(fused: bool = False):
        logits, loss = kernels.fused_forward(model, idx, targets) if fused else model(idx, targets)
        return [logits.float(), *torch.autograd.grad(loss, params)]

    ref = run()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        plain = run()
    fused = run(fused=True)
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    errors = {n: (rel(f, r), rel(p, r)) for n, f, p, r in zip(names, fused, plain, ref, strict=True)}
    assert errors["logits"][0] < 1e-2
    for name, (fused_err, plain_err) in errors.items():  # tiny sizes: a few relu flips are noisy
        assert fused_err < 3 * plain_err + 5e-3, (name, errors)
    assert sum(f for f, _ in errors.values()) < 2 * sum(p for _, p in errors.values()), errors


def test_dropout_masks_agree_between_forward_and_backward():
    """With dropout, values and every gradient match float32 PyTorch given the kernels' own mask
    (forward drops in y; backward in y, g_u and g_x); a seed gives one mask, another seed another."""
    keep = dropout_keep(4096, 2, 64, 0.5, 1234)
    assert 0.45 < (keep > 0).float().mean().item() < 0.55 and set(keep.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(keep, dropout_keep(4096, 2, 64, 0.5, 1234))
    assert not torch.equal(keep, dropout_keep(4096, 2, 64, 0.5, 99))
    check_layer_against_float32("interleaved", p_drop=0.5, seed=1234)


def test_dropout_drops_each_neuron_independently_at_its_rate():
    """The two members of a pair share one Philox draw (two of its four numbers): they, and
    neighbouring rows, must still be dropped independently, each at rate p."""
    R, H, M = 4096, 2, 64
    for p_drop in (0.1, 0.5):
        kept = (dropout_keep(R, H, M, p_drop, 7) > 0).float().view(R, H, 2, M // 2)  # row, head, member, pair
        assert abs(kept.mean().item() - (1 - p_drop)) < 0.005, p_drop
        both_members = (kept[:, :, 0] * kept[:, :, 1]).mean().item()
        next_row = (kept[1:] * kept[:-1]).mean().item()
        assert abs(both_members - (1 - p_drop) ** 2) < 0.005, (p_drop, both_members)
        assert abs(next_row - (1 - p_drop) ** 2) < 0.005, (p_drop, next_row)


@pytest.mark.parametrize("T", [1, 37, 64, 130])
def test_mirrored_gradient_of_the_scores(T):
    """G = L + L^T with L = tril(dS, -1), by tiles (smaller than T, and not dividing it)."""
    dS = torch.randn(3, 2, T, T, device=DEVICE).to(torch.bfloat16)
    L = dS.tril(-1)
    assert torch.equal(kernels.mirrored(dS, BT=16), L + L.mT)


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", False), ("interleaved", True)])
def test_fused_recurrent_step_matches_the_plain_step(style, decay):
    model = make_model(style, seed=2, decay=decay).eval()
    prompt = torch.randint(0, 256, (2, 9), device=DEVICE)
    _, _, plain = model.forward_chunked(prompt, chunk_size=4)
    _, _, fused = model.forward_chunked(prompt, chunk_size=4)
    for byte in torch.randint(0, 256, (5, 2), device=DEVICE):
        want = model.step(byte, plain)
        got = kernels.FusedStep(model)(byte, fused)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


def test_fused_step_refuses_a_model_that_would_apply_dropout():
    model = make_model("half", dropout=0.1)
    with pytest.raises(ValueError, match="model.eval"):
        kernels.FusedStep(model.train())
    kernels.FusedStep(model.eval())


SMALL_TILES = {
    "attention": {"BP": 8, "BD": 16, "GROUP": 2},
    "gate": {"BN": 16, "BD": 16, "GROUP": 2},
}


@pytest.mark.parametrize("tiles, batch", [({}, 3), (SMALL_TILES, 3), ({}, kernels.BATCH_TILE + 1)])
def test_fused_step_takes_sizes_that_fill_no_tile(tiles, batch):
    """d, n/h, n/2h not multiples of any block size; three heads; the partner of a pair far away;
    with small tiles, several blocks a head, the last one partial, and groups of parts of two, the
    last one short; a batch of one row more than an attention program takes."""
    torch.manual_seed(3)
    cfg = BDHConfig(n_embd=24, n_head=3, n_neurons=3 * 44, n_layer=2, dropout=0.0, rope_style="half")
    model = BDH(cfg).to(DEVICE).eval()
    _, _, plain = model.forward_chunked(torch.randint(0, 256, (batch, 7), device=DEVICE), chunk_size=3)
    fused = plain.clone()
    step = kernels.FusedStep(model, **tiles)
    for byte in torch.randint(0, 256, (2, batch), device=DEVICE):
        torch.testing.assert_close(step(byte, fused), model.step(byte, plain), rtol=1e-4, atol=1e-4)
    assert int(fused.pos) == int(plain.pos) == 9
    for p, f in zip(plain.layers, fused.layers, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


def test_fused_step_is_deterministic():
    """The sums over programs add in a fixed order: the same state and byte give the same bits."""
    model = make_model("interleaved", seed=4).eval()
    _, _, state = model.forward_chunked(torch.randint(0, 256, (2, 9), device=DEVICE), chunk_size=4)
    step, byte = kernels.FusedStep(model), torch.tensor([7, 200], device=DEVICE)
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
    assert kernels.FusedStep(model)(byte, state).isnan().all()


def test_generation_through_the_cuda_graph_equals_the_plain_steps():
    """On a GPU, generate() captures FusedStep and the sampling in one CUDA graph; it must give the
    plain steps' bytes, greedy and sampled (the graph draws what the generator would). On the CPU
    both runs take the plain steps."""
    torch.manual_seed(6)
    cfg = BDHConfig(n_embd=64, n_head=2, n_neurons=2 * 256, n_layer=2, dropout=0.0)
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


@pytest.mark.skipif(not CUDA, reason="2**31 neurons a batch: a GPU's size (the interpreter runs tiny tiles)")
def test_fused_forward_takes_batches_of_more_than_2_31_neurons():
    """B x T x n past 2**31: the kernels index rows in 64 bits (validation of long windows)."""
    model = make_model("interleaved", seed=7).eval()
    T = 1024
    B = 2**31 // (T * model.config.n_neurons) + 2
    idx = torch.randint(0, 256, (B, T), device=DEVICE)
    with torch.no_grad():
        logits, _ = kernels.fused_forward(model, idx)
        last, _ = kernels.fused_forward(model, idx[-1:])
    assert rel(logits[-1:], last) < 1e-2  # bf16: cuBLAS rounds differently at another batch size

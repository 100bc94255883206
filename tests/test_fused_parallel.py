"""The fused training kernels (dragon_hatchling/fused_parallel.py) against the parallel form of
model.py, values and gradients, with dropout and decay.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) at tiny
sizes; on a GPU the same tests run compiled at the default model's full size.
"""

import pytest
import torch
import triton

from dragon_hatchling import fused_parallel
from dragon_hatchling.carried import Carried
from model import BDH, BDHConfig, chunk_decay, layer_norm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# d, h, n/h, B, T: the default model on a GPU; tiny (T not a power of two) in the interpreter
SIZES = (256, 4, 8192, 8, 128) if CUDA else (32, 2, 64, 2, 21)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


HALF_LIVES = [3.0, 40.0, 7.0, 1000.0]  # bytes, one a head (the first h of them)


def make_model(
    style: str, seed: int = 0, dropout: float = 0.0, decay: bool | str = False, shifted: int = 0
) -> BDH:
    """decay: False, True (the config's half-lives) or "learned" (a parameter starting from them);
    shifted: the shifted heads (BDHConfig.shifted_heads)."""
    d, h, m, _, _ = SIZES
    torch.manual_seed(seed)
    cfg = BDHConfig(
        n_embd=d, n_head=h, n_neurons=h * m, n_layer=2, dropout=dropout, rope_style=style,
        half_lives=HALF_LIVES[:h] if decay else None, learn_decay=decay == "learned", shifted_heads=shifted,
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


# The mask depends on each neuron's index alone, not on the tiles (a test below holds them to it): in
# the interpreter, which pays for every program, large batches of masks are read out in large tiles.
BIG_TILES = (fused_parallel.BR, fused_parallel.BP) if CUDA else (512, 32)


def dropout_keep(
    R: int, H: int, M: int, p_drop: float, seed: int, tiles: tuple | None = None
) -> torch.Tensor:
    """The gate kernel's dropout, read out: its y for x = u = 1, R x n. tiles: (BR, BP), the
    kernels' own by default (BIG_TILES for more than 1,024 rows)."""
    BR, BP = tiles or (BIG_TILES if R > 1024 else (fused_parallel.BR, fused_parallel.BP))
    ones = torch.ones((H, R, M), device=DEVICE, dtype=torch.bfloat16)
    y = torch.empty((R, H * M), device=DEVICE, dtype=torch.bfloat16)
    grid = (triton.cdiv(R, BR), H * triton.cdiv(M // 2, BP))
    fused_parallel._gate_kernel[grid](
        ones.view(R, H * M), ones, y, R, M, H, p_drop, seed, HAS_DROPOUT=True, BR=BR, BP=BP
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
        monkeypatch.setattr(fused_parallel, "BR", 16)
        monkeypatch.setattr(fused_parallel, "BP", 16)


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
    cos, sin = fused_parallel.pair_cos_sin(model, T, v.device)
    gz = torch.randn(B, T, d, device=DEVICE)
    ref_in = [t.float().requires_grad_() for t in (v, *weights)]
    ref = reference_neurons(*ref_in, cos, sin, keep, weights_of_decay)
    ref.backward(gz)
    ins = [t.clone().requires_grad_() for t in (v, *weights)]
    out = fused_parallel.FusedNeurons.apply(*ins, cos, sin, p_drop, seed, weights_of_decay)
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


@pytest.mark.parametrize(
    "style, decay", [("interleaved", False), ("half", False), ("half", True), ("interleaved", "learned")]
)
def test_fused_model_is_as_close_to_float32_as_plain_bf16(style, decay):
    # learned: the half-lives' gradient too (learned_decay_grad)
    check_model_against_float32(style, *SIZES[3:], decay=decay)


@pytest.mark.parametrize("decay", [False, "learned"])
def test_fused_model_with_shifted_heads_is_as_close_to_float32_as_plain_bf16(decay):
    # the last head reads the byte after each match (its values shifted inside _attention)
    check_model_against_float32("half", *SIZES[3:], decay=decay, shifted=1)


def test_the_fused_kernels_refuse_a_shifted_heads_state():
    model = make_model("half", shifted=1)
    idx = torch.randint(0, 256, (1, 8), device=DEVICE)
    with pytest.raises(ValueError, match="shifted head"):
        fused_parallel.fused_forward(model, idx, state=model.initial_state(1, DEVICE))


def check_model_against_float32(
    style: str, B: int, T: int, decay: bool | str = False, shifted: int = 0
) -> None:
    # the reference is the plain path in float32; the yardstick, the plain path under bf16 autocast
    model = make_model(style, seed=1, decay=decay, shifted=shifted)
    idx = torch.randint(0, 256, (B, T), device=DEVICE)
    targets = torch.randint(0, 256, (B, T), device=DEVICE)
    params = list(model.parameters())

    def run(fused: bool = False):
        logits, loss = fused_parallel.fused_forward(model, idx, targets) if fused else model(idx, targets)
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
    small = dropout_keep(
        300, 2, 64, 0.5, 1234, (fused_parallel.BR, fused_parallel.BP)
    )  # the tiles training runs
    assert torch.equal(small, dropout_keep(300, 2, 64, 0.5, 1234, BIG_TILES))  # the same mask in any tiles
    assert torch.equal(small, keep[:300])
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
    assert torch.equal(fused_parallel.mirrored(dS, BT=16), L + L.mT)


@pytest.mark.parametrize("T", [5, 32])  # 32: T = d, where the two factors' shapes could be confused
def test_learned_half_lives_gradients_equal_autograd(T):
    """learned_decay_grad and learned_read_grad (the fused backward's gradients of the decay factors)
    against autograd in float64: S = W * scores (h, B, T, T), earlier = since_start * read (h, B, T, d),
    with factors that underflow to zero (a short half-life far into the window)."""
    h, B, d = 2, 3, 32
    half = torch.tensor([0.02, 40.0], dtype=torch.float64)[:, None, None]  # h, 1, 1
    t = torch.arange(T, dtype=torch.float64)
    W = torch.exp2(-(t[:, None] - t[None, :] - 1).clamp(min=0) / half) * (t[:, None] > t[None, :])
    W = W.float().double()  # as float32 holds them (zero from 3 bytes back at 0.02)
    since = torch.exp2(-t[:, None] / half).float().double()  # h, T, 1
    assert (since == 0).any()
    scores, read = torch.randn(h, B, T, T, dtype=torch.float64), torch.randn(h, B, T, d, dtype=torch.float64)
    gS, g_read = torch.randn_like(scores), torch.randn_like(read)
    W_, since_ = W.clone().requires_grad_(), since.clone().requires_grad_()
    torch.autograd.backward([W_.unsqueeze(1) * scores, since_.unsqueeze(1) * read], [gS, g_read])
    S, earlier = W.unsqueeze(1) * scores, since.unsqueeze(1) * read
    got_W = fused_parallel.learned_decay_grad(S, gS, W)
    got_since = fused_parallel.learned_read_grad(earlier, g_read, since)
    assert got_since.shape == since.shape and got_W.shape == W.shape
    live_W, live_since = W > 0, since > 0
    assert torch.allclose(got_W[live_W].double(), W_.grad[live_W], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_since[live_since].double(), since_.grad[live_since], rtol=1e-4, atol=1e-6)
    assert not got_since[~live_since].any()  # no gradient where nothing is left to scale


@pytest.mark.skipif(not CUDA, reason="2**31 neurons a batch: a GPU's size (the interpreter runs tiny tiles)")
def test_fused_forward_takes_batches_of_more_than_2_31_neurons():
    """B x T x n past 2**31: the kernels index rows in 64 bits (validation of long windows)."""
    model = make_model("interleaved", seed=7).eval()
    T = 1024
    B = 2**31 // (T * model.config.n_neurons) + 2
    idx = torch.randint(0, 256, (B, T), device=DEVICE)
    with torch.no_grad():
        logits, _ = fused_parallel.fused_forward(model, idx)
        last, _ = fused_parallel.fused_forward(model, idx[-1:])
    assert rel(logits[-1:], last) < 1e-2  # bf16: cuBLAS rounds differently at another batch size


@pytest.mark.parametrize(
    "decay, before_fused, shorter",
    [(False, False, 0), (True, False, 0), (True, True, 0), (True, True, 5), ("learned", True, 5)],
)
def test_fused_window_with_a_carried_state_matches_the_chunked_form(decay, before_fused, shorter):
    """A window read after earlier bytes, the state carried: the fused pass (state in pair order)
    against BDH.forward_chunked in float32, for the logits, every gradient and the next state; the
    plain path under bf16 autocast is the yardstick, as above. before_fused: the fused pass reads the
    earlier bytes itself and takes the state they left (its bf16 copy already below a window's rows,
    where backward reads it without copying). shorter: the window is that much shorter than the
    earlier ones (the copy's buffer does not fit it: backward copies S^T into one that does).
    learned: the half-lives' gradient too, from the window and from its read of the state."""
    B, T = SIZES[3], SIZES[4]
    W = T - shorter
    model = make_model("interleaved", seed=2, decay=decay)
    fused = fused_parallel.Fused(model)
    before = torch.randint(0, 256, (B, 2 * T), device=DEVICE)
    idx, targets = (torch.randint(0, 256, (B, W), device=DEVICE) for _ in range(2))
    with torch.no_grad():
        _, _, state = model.forward_chunked(before, chunk_size=T)  # the earlier bytes, float32
    params = list(model.parameters())

    def run(fused_path: bool = False):
        if fused_path:
            given = fused.from_model_order(state)
            if before_fused:
                with torch.no_grad():
                    given = fused.forward_chunked(before, chunk_size=T)[2]
                assert given.buffers[0].shape[2] == T + model.config.n_embd  # S^T below T rows
            logits, loss, after = fused.forward_chunked(idx, targets, W, given)
            after = fused.to_model_order(after)
        else:
            logits, loss, after = model.forward_chunked(idx, targets, W, state.clone())
        return [logits.float(), *torch.autograd.grad(loss, params), *after.layers], after.pos

    ref, pos = run()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        plain, _ = run()
    out, fused_pos = run(fused_path=True)
    assert fused_pos.item() == pos.item() == 2 * T + W
    names = ["logits"] + [n for n, _ in model.named_parameters()] + ["state 0", "state 1"]
    errors = {n: (rel(f, r), rel(p, r)) for n, f, p, r in zip(names, out, plain, ref, strict=True)}
    assert errors["logits"][0] < 1e-2, errors
    for name, (fused_err, plain_err) in errors.items():
        assert fused_err < 3 * plain_err + 5e-3, (name, errors)


def test_a_carried_state_changes_the_fused_window():
    """The state is read: a window after other bytes gives other logits than the same window alone,
    and the gradient reaches Dx through the read (the test above holds its value)."""
    B, T = SIZES[3], SIZES[4]
    model = make_model("half", seed=3)
    fused = fused_parallel.Fused(model)
    idx = torch.randint(0, 256, (B, T), device=DEVICE)
    alone = fused_parallel.fused_forward(model, idx)[0]
    _, _, state = fused.forward_chunked(torch.randint(0, 256, (B, T), device=DEVICE), chunk_size=T)
    after = fused.forward_chunked(idx, chunk_size=T, state=state)[0]
    assert rel(after, alone) > 1e-3


@pytest.mark.parametrize("decay", [False, True])
def test_fused_windows_read_one_after_another_as_one_text(decay):
    """Three windows through the fused kernels, each consuming the state the one before left (updated
    in place, in the kernels' layout), against the plain chunked form in float32: the logits of every
    window and the state after the last."""
    B, T = SIZES[3], SIZES[4]
    model = make_model("half", seed=4, decay=decay)
    fused = fused_parallel.Fused(model)
    idx = torch.randint(0, 256, (B, 3 * T), device=DEVICE)
    with torch.no_grad():
        ref, _, ref_state = model.forward_chunked(idx, chunk_size=T)
        out, _, state = fused.forward_chunked(idx, chunk_size=T)
    assert rel(out.float(), ref) < 1e-2
    for after, before in zip(fused.to_model_order(state).layers, ref_state.layers, strict=True):
        assert rel(after, before) < 2e-2


@pytest.mark.parametrize("decay", [False, True])
def test_the_state_update_adds_the_window_and_writes_its_bf16_copy(decay):
    """update_state against float32 PyTorch: P = gamma^T P + (gamma^(T-1-t) v_t)^T r_t a (head, row),
    with sizes that fill no tile (d, M and T past a tile's edge) and the model's decay factors, and
    the bf16 copy it writes beside P: P rounded."""
    H, B, D, M, T = 2, 3, 48, 80, 37
    P = torch.randn(H, B, D, M, device=DEVICE)
    v = torch.randn(B, T, D, device=DEVICE).to(torch.bfloat16)
    r = torch.randn(H, B, T, M, device=DEVICE).to(torch.bfloat16)
    chunk = chunk_decay(BDHConfig(n_head=H, half_lives=[3.0, 40.0]), T, DEVICE) if decay else None
    faded = v.float().expand(H, -1, -1, -1) * (1.0 if chunk is None else chunk.to_end.unsqueeze(1))
    if CUDA:  # the kernel rounds the faded v to bf16, as cuBLAS's operands were (the interpreter does not)
        faded = faded.to(torch.bfloat16).float()
    expected = (1.0 if chunk is None else chunk.whole.unsqueeze(1)) * P + faded.mT @ r.float()
    copy = fused_parallel.copy_buffer(P.shape, T, DEVICE)[:, :, T:]  # as the next window's backward reads it
    fused_parallel.update_state(P, v, r, copy, chunk)
    assert rel(P, expected) < 1e-5
    if CUDA:
        assert torch.equal(copy, P.to(torch.bfloat16))
    else:  # the interpreter rounds to bf16 towards zero: within one unit of the last place
        assert ((copy.float() - P).abs() <= P.abs() * 2**-7).all()


def test_emptied_rows_of_a_fused_state_read_as_from_nothing():
    """Carried over the fused kernels: after reset_rows, row 0's next window (whose read comes from
    the bf16 copy the update wrote) equals that window read alone, and row 1 goes on as it was."""
    B, T = SIZES[3], SIZES[4]
    model = make_model("half", seed=5, decay=True).eval()
    idx = torch.randint(0, 256, (B, 2 * T), device=DEVICE)
    step, kept = Carried(fused_parallel.Fused(model)), Carried(fused_parallel.Fused(model))
    with torch.no_grad():
        for c in (step, kept):
            c(idx[:, :T])
        assert isinstance(step.state, fused_parallel.FusedState)
        step.reset_rows(torch.arange(B, device=DEVICE) == 0)
        after, going_on = step(idx[:, T:])[0], kept(idx[:, T:])[0]
        alone = fused_parallel.fused_forward(model, idx[:1, T:])[0]
    assert torch.equal(after[1:], going_on[1:])
    assert rel(after[:1], alone) < 1e-2 < rel(going_on[:1], alone)

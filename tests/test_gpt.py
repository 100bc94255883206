"""The GPT baseline (gpt.py): trained, scored, saved, resumed and shared exactly as BDH is."""

import json
import os
import signal

import pytest
import torch

import evaluate
import experiment
from conftest import call_main
from dragon_hatchling import hub as hubpy
from dragon_hatchling.architectures import checked_config
from dragon_hatchling.gpt import GPT, GPTConfig
from dragon_hatchling.loading import load_model
from test_cli import assert_clean_error

TINY_GPT = "--arch gpt --n_layer 2 --n_embd 32 --n_head 2 --block_size 128 --batch_size 4 --seq_len 32"


def gpt_run(data_dir, out_dir, flags: str = "") -> list[str]:
    return ["--device", "cpu", "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--no_progress",
            *TINY_GPT.split(), "--warmup_steps", "3", *flags.split()]  # fmt: skip


def test_the_default_gpt_is_nanogpts_shape_and_causal():
    config = GPTConfig()
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size) == (8, 512, 8, 512)
    assert config.num_params == 25_567_744  # about 25.6M, as the issue asks
    small = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=64, dropout=0.0))
    assert small.num_params() == small.config.num_params
    assert not any(name.endswith("bias") for name, _ in small.named_parameters())
    idx = torch.randint(0, 256, (2, 40))
    later = idx.clone()
    later[:, 25:] = torch.randint(0, 256, (2, 15))
    a, _ = small(idx)
    b, _ = small(later)
    torch.testing.assert_close(a[:, :25], b[:, :25])  # what comes later changes nothing before it
    assert not torch.allclose(a[:, 25:], b[:, 25:])
    with pytest.raises(ValueError, match="block_size"):
        small(torch.zeros(1, 65, dtype=torch.long))


@pytest.fixture(scope="module")
def gpt_trained(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp("gpt") / "run"
    argv = gpt_run(small_data, out, "--max_steps 30 --eval_every 15 --log_every 5 --lr 3e-3")
    assert experiment.main(argv) == 0
    return out


def test_a_tiny_gpt_trains_scores_and_loads_back(gpt_trained, small_data, tmp_path, capsys):
    metrics = json.loads((gpt_trained / "metrics.json").read_text())
    assert metrics["arch"] == "gpt" and metrics["config"]["arch"] == "gpt"
    assert metrics["num_params"] == GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=128).num_params
    assert metrics["activation_nonzero"] is None  # no neurons to count
    log = (gpt_trained / "log.csv").read_text().splitlines()
    first, last = float(log[1].split(",")[3]), float(log[-1].split(",")[3])
    assert last < first - 0.5, (first, last)  # it learns
    model, source = load_model(str(gpt_trained), "best")
    assert isinstance(model, GPT) and source["format"] == "dragon-hatchling"
    ev = tmp_path / "eval"
    argv = ["--model_path", str(gpt_trained), "--data_dir", str(small_data), "--device", "cpu",
            "--out_dir", str(ev), "--prompt", "The ", "--max_new_bytes", "20"]  # fmt: skip
    result = call_main(evaluate.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    scored = json.loads((ev / "metrics.json").read_text())
    assert scored["loss"] == pytest.approx(metrics["best_val_loss"], abs=1e-5)  # the same protocol
    assert (ev / "weights.png").is_file() and len((ev / "sample.txt").read_bytes()) >= 20


def test_a_gpt_run_resumes_as_a_gpt(small_data, tmp_path, capsys, monkeypatch):
    """The checkpoint says which model it holds: --resume without --arch continues the GPT."""
    out = tmp_path / "run"
    real = experiment.lr_at

    def lr_at(s, total, args):
        if s == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(s, total, args)

    monkeypatch.setattr(experiment, "lr_at", lr_at)
    result = call_main(experiment.main, gpt_run(small_data, out, "--max_steps 8 --eval_every 8"), capsys)
    assert result.returncode == 130, result.stderr
    monkeypatch.setattr(experiment, "lr_at", real)
    argv = ["--device", "cpu", "--data_dir", str(small_data), "--out_dir", str(out), "--resume", "auto",
            "--no_progress", "--max_steps", "8", "--eval_every", "8", "--warmup_steps", "3"]  # fmt: skip
    result = call_main(experiment.main, argv, capsys)
    assert result.returncode == 0, result.stderr
    assert "GPT: " in result.stdout and "resuming at step 6" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["arch"] == "gpt"


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--n_neurons 128", "--n_neurons is not a flag of --arch gpt"),
        ("--half_lives 8", "--half_lives is not a flag of --arch gpt"),
        ("--seq_len 256", "--block_size 128"),
    ],
)
def test_gpt_refuses_what_it_cannot_do(flags, says, small_data, tmp_path, capsys):
    result = call_main(experiment.main, gpt_run(small_data, tmp_path / "run", flags), capsys)
    assert_clean_error(result, says)
    assert not (tmp_path / "run").exists()


def test_bdh_refuses_gpt_flags(small_data, tmp_path, capsys):
    argv = [
        "--device",
        "cpu",
        "--data_dir",
        str(small_data),
        "--out_dir",
        str(tmp_path),
        "--block_size",
        "64",
    ]
    assert_clean_error(call_main(experiment.main, argv, capsys), "--block_size is not a flag of --arch bdh")


def test_evaluate_refuses_to_stream_a_gpt(gpt_trained, small_data, tmp_path, capsys):
    base = ["--model_path", str(gpt_trained), "--data_dir", str(small_data), "--device", "cpu"]
    for flags, says in [("--stream", "a GPT without a memory has none"), ("--seq_len 256", "block_size 128"),
                        ("--neuron_graph", "a GPT has none")]:  # fmt: skip
        result = call_main(evaluate.main, [*base, "--out_dir", str(tmp_path / "e"), *flags.split()], capsys)
        assert_clean_error(result, says)


def test_a_gpt_goes_to_the_hub_and_back(hub, gpt_trained, capsys):
    result = call_main(hubpy.main, ["push", str(gpt_trained), "--hf_repo_id", "tester/tiny-gpt"], capsys)
    assert result.returncode == 0, result.stderr
    _, files = hub.state.repos["tester/tiny-gpt"].snapshot("main")
    card = files["README.md"].decode()
    assert (
        "GPT on byte-level Wikitext-2" in card
        and "from dragon_hatchling.gpt import GPT" in card
        and "- gpt" in card
    )
    remote, source = load_model("tester/tiny-gpt")
    local, _ = load_model(str(gpt_trained), "best")
    assert isinstance(remote, GPT) and source["repo_id"] == "tester/tiny-gpt"
    for (name, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_gpt_scores_windows_longer_than_a_chunk(gpt_trained, small_data, tmp_path, capsys):
    """The chunked form is BDH's: a GPT reads windows longer than --chunk_size (within its block) whole."""
    argv = ["--model_path", str(gpt_trained), "--data_dir", str(small_data), "--device", "cpu", "--no_plots",
            "--seq_len", "100", "--chunk_size", "64", "--out_dir", str(tmp_path / "e")]  # fmt: skip
    assert call_main(evaluate.main, argv, capsys).returncode == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["seq_len"] == 100


# ----------------------------------------------------------------------------- GPTXL: ALiBi and a memory


def xl(memory: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, dropout=0.0, memory=memory))
    for p in model.parameters():  # LayerNorm weights off one too, so that every weight counts
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def banded(model: GPT, idx: torch.Tensor, memory: int, chunk: int) -> torch.Tensor:
    """The definition, by hand: each chunk's query i attends to the keys of the window so far that
    lie within its chunk or the `memory` bytes before the chunk, with ALiBi over the distance."""
    B, T = idx.shape
    h, d, L = model.config.n_head, model.config.n_embd, model.config.n_layer
    v = model.wte(idx)
    pos = torch.arange(T)
    start = pos // chunk * chunk  # the first byte of each query's chunk
    seen = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[:, None] - memory)  # T, T
    distance = (pos[:, None] - pos[None, :]).float()
    for block in model.blocks[:L]:
        q, k, u = block.attn.qkv(block.ln_attn(v)).view(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.mT / (d // h) ** 0.5 - model.slopes[:, None, None] * distance  # B, h, T, T
        a = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ u
        v = v + block.attn.proj(a.transpose(1, 2).reshape(B, T, d))
        v = v + block.mlp(block.ln_mlp(v))
    return model.ln_f(v) @ model.wte.weight.T


@pytest.mark.parametrize("memory, chunk", [(64, 16), (16, 16), (10, 16), (24, 7)])
def test_the_memory_is_attention_over_the_concatenated_window(memory, chunk):
    """A text read in chunks through a memory of M bytes gives the logits of attending over the
    chunk and the M bytes before it (the definition above, in one pass); with M at least the text,
    the logits of the whole text in one window. The memory holds the last M bytes' keys."""
    model = xl(memory)
    idx = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        logits, _, state = model.forward_chunked(idx, chunk_size=chunk)
        torch.testing.assert_close(logits, banded(model, idx, memory, chunk), atol=1e-4, rtol=1e-4)
        if memory >= idx.shape[1]:
            torch.testing.assert_close(logits, model(idx)[0], atol=1e-4, rtol=1e-4)
        assert [k.shape[2] for k in state.keys] == [min(memory, 48)] * 2
        again, _, _ = model.forward_chunked(idx[:, chunk:], chunk_size=chunk, state=model.forward_chunked(
            idx[:, :chunk], chunk_size=chunk)[2])  # fmt: skip
        torch.testing.assert_close(again, logits[:, chunk:])  # the state carries between calls


def test_alibi_reads_windows_of_any_length_and_keeps_old_checkpoints_learned():
    """ALiBi has no table of positions: no wpe, no longest window. A config.json saved before the
    memory existed (no memory, no position) is the learned-position GPT it was."""
    model = xl(0)
    assert model.config.position == "learned" and model.config.max_window == 512
    old = {k: v for k, v in model.config.to_dict().items() if k not in ("memory", "position")}
    assert checked_config(old, "old") == model.config
    alibi = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, memory=8))
    assert alibi.config.position == "alibi" and alibi.config.max_window is None and alibi.wpe is None
    assert alibi.num_params() == alibi.config.num_params
    assert alibi(torch.zeros(1, 700, dtype=torch.long))[0].shape == (1, 700, 256)
    with pytest.raises(ValueError, match="alibi"):
        GPTConfig(memory=8, position="learned")
    with pytest.raises(ValueError, match="memory"):
        GPTConfig(memory=-1)
    with pytest.raises(ValueError, match="forward_chunked"):
        model.forward_chunked(torch.zeros(1, 4, dtype=torch.long))


def test_a_gptxl_trains_carried_and_evaluate_reads_the_text_through_its_memory(small_data, tmp_path, capsys):
    """--arch gpt --memory M trains with its memory carried (the default) and scores the whole text
    read as one (--stream) and windows longer than --chunk_size through it."""
    run = tmp_path / "run"
    argv = gpt_run(small_data, run, "--memory 48 --max_steps 6 --eval_every 6 --log_every 3 --block_size 16")
    assert experiment.main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["args"]["carry_state"] and metrics["config"]["position"] == "alibi"
    base = ["--model_path", str(run), "--data_dir", str(small_data), "--device", "cpu", "--no_plots"]
    for flags in ("--stream --chunk_size 64", "--seq_len 256 --chunk_size 64 --max_chunks 4"):
        out = tmp_path / flags.split()[0].strip("-")
        result = call_main(evaluate.main, [*base, "--out_dir", str(out), *flags.split()], capsys)
        assert result.returncode == 0, result.stderr
        scored = json.loads((out / "metrics.json").read_text())
        assert scored["mode"] == ("stream" if "--stream" in flags else "windows") and scored["loss"] < 6
    assert (
        "memory of the last 48 bytes (GPTXL)" in GPTConfig(**metrics["config"]).describe()
    )  # the card's line

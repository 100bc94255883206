"""Merging two models into one of n1 + n2 neurons (dragon_hatchling/merging.py, the paper's section
7.1): two copies give the model back, each part keeps its own RoPE frequencies, and the merged model
saves, loads, scores, samples and goes to the Hub like any other."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import evaluate
import experiment
from conftest import call_main, tiny_run
from dragon_hatchling import fused_parallel
from dragon_hatchling import hub as hubpy
from dragon_hatchling.checkpoints import save_checkpoint
from dragon_hatchling.gpt import GPT, GPTConfig
from dragon_hatchling.loading import load_model
from dragon_hatchling.merging import merge
from model import BDH, BDHConfig, rope_frequencies
from test_cli import assert_clean_error
from test_reliability import train


def interrupt_at_step_for(run) -> None:
    """SIGINT to this process in step 2 of the next run (it saves and stops), once."""
    import os
    import signal

    real = experiment.lr_at

    def lr_at(step, total, args):
        if step == 1 and experiment.lr_at is lr_at:
            experiment.lr_at = real
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, total, args)

    experiment.lr_at = lr_at


def tiny(style: str = "interleaved", n: int = 64, seed: int = 0, decay: bool = False) -> BDH:
    torch.manual_seed(seed)
    config = BDHConfig(n_embd=16, n_head=2, n_neurons=n, n_layer=2, dropout=0.0, rope_style=style,
                       rope_theta=50.0, half_lives=[3.0, 30.0] if decay else None)  # fmt: skip
    model = BDH(config).eval()
    model.reset_parameters(std=0.3)  # activations well above LayerNorm's epsilon, as in a trained model
    return model


def silent(model: BDH, like: BDH) -> BDH:
    """model with neurons that never fire (Dx, Dy and E zero) and like's embedding and readout, so
    that merging it into like changes nothing."""
    quiet = copy.deepcopy(model)
    for w in (quiet.Dx, quiet.Dy, quiet.E):
        torch.nn.init.zeros_(w)
    quiet.embed.load_state_dict(like.embed.state_dict())
    quiet.readout.data.copy_(like.readout)
    return quiet


IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model: BDH) -> torch.Tensor:
    with torch.no_grad():
        return model(IDX)[0]


@pytest.mark.parametrize("style, decay", [("interleaved", False), ("half", False), ("interleaved", True)])
def test_two_copies_merge_into_the_model(style, decay):
    """x, y and the attention appear twice; the layer norms take the factor out. The chunked form
    and the recurrent steps agree too (the state and RoPE of the merged heads)."""
    model = tiny(style, decay=decay)
    both = merge(model, copy.deepcopy(model))
    assert both.config.n_neurons == 128 and both.config.rope_parts == [32, 32]
    torch.testing.assert_close(logits(both), logits(model), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        chunked, _, state = both.forward_chunked(IDX, chunk_size=7)
        torch.testing.assert_close(chunked, logits(model), atol=1e-4, rtol=1e-4)
        _, _, alone = model.forward_chunked(IDX, chunk_size=7)
        byte = torch.tensor([5, 77])
        torch.testing.assert_close(both.step(byte, state), model.step(byte, alone), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_each_part_keeps_its_neurons_and_frequencies(style):
    """A model merged with a silent one, on either side, is that model: its neurons (permuted from
    the half layout), pairs and RoPE frequencies survive the merge. Parts of different sizes keep the
    frequencies of their own size, also merged a second time."""
    model = tiny(style, n=64)
    other = tiny("half", n=32, seed=3)
    for merged in (merge(model, silent(other, model)), merge(silent(other, model), model)):
        torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)
    three = merge(merge(model, other), tiny(n=96, seed=4))
    assert three.config.rope_parts == [32, 16, 48]

    def interleaved(m: BDH) -> torch.Tensor:  # a model's frequencies, pairs side by side
        f = rope_frequencies(m.config)
        return f if m.config.rope_style == "interleaved" else f[: len(f) // 2].repeat_interleave(2)

    expected = torch.cat([interleaved(m) for m in (model, other, tiny(n=96))])
    torch.testing.assert_close(rope_frequencies(three.config), expected, rtol=0, atol=0)


def test_the_fused_kernels_read_a_merged_model():
    """The merged model's frequencies reach the fused training kernels (Triton's interpreter on the CPU)."""
    model = merge(tiny(seed=5), tiny(n=32, seed=6))
    with torch.no_grad():
        fused, _ = fused_parallel.fused_forward(model, IDX)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(IDX)[0].float()
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


def test_merged_models_save_load_score_sample_and_go_to_the_hub(hub, small_data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(tiny(seed=7), a)
    save_checkpoint(tiny("half", n=32, seed=8), b)
    out = tmp_path / "merged"
    result = call_main(hubpy.main, ["merge", str(a), str(b), str(out)], capsys)
    assert result.returncode == 0 and "merged" in result.stdout, result.stderr
    model, _ = load_model(str(out))
    assert model.config.rope_parts == [32, 16] and model.config.n_neurons == 96
    torch.testing.assert_close(logits(model), logits(merge(load_model(str(a))[0], load_model(str(b))[0])))
    scored = tmp_path / "scored"
    argv = ["--model_path", str(out), "--data_dir", str(small_data), "--device", "cpu", "--max_chunks", "4",
            "--out_dir", str(scored), "--no_plots", "--prompt", "The", "--max_new_bytes", "20"]  # fmt: skip
    assert call_main(evaluate.main, argv, capsys).returncode == 0
    assert json.loads((scored / "metrics.json").read_text())["loss"] > 0
    assert (scored / "sample.txt").read_text().startswith("The")
    model.push_to_hub("tester/merged-bdh")
    back, _ = load_model("tester/merged-bdh")
    assert back.config == model.config
    torch.testing.assert_close(logits(back), logits(model))
    from huggingface_hub import hf_hub_download

    for card in (out / "README.md", Path(hf_hub_download("tester/merged-bdh", "README.md"))):
        text = card.read_text()  # the card says what the model is, not the mixin's blanks
        assert "merged, each head of 32 + 16 neurons" in text and "More Information Needed" not in text, text


def test_models_that_cannot_merge_are_one_line(tmp_path, capsys):
    a, wide, gpt, shifted = tmp_path / "a", tmp_path / "wide", tmp_path / "gpt", tmp_path / "shifted"
    save_checkpoint(tiny(), a)
    torch.manual_seed(0)
    save_checkpoint(BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=64, n_layer=2)), wide)
    save_checkpoint(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8)), gpt)
    save_checkpoint(BDH(dataclasses.replace(tiny().config, shifted_heads=1)), shifted)
    for other, says in [(wide, "differ in n_embd (16 and 32)"), (gpt, "has no neurons to merge"),
                        (shifted, "differ in shifted_heads (0 and 1)"),
                        (tmp_path / "nothing", "model_b")]:  # fmt: skip
        result = call_main(hubpy.main, ["merge", str(a), str(other), str(tmp_path / "out")], capsys)
        assert_clean_error(result, says)
        assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert_clean_error(
        call_main(hubpy.main, ["merge", str(a), str(a), str(tmp_path / "full")], capsys), "not empty"
    )
    with pytest.raises(ValueError, match="rope_parts"):
        BDHConfig(n_neurons=64, n_head=2, rope_parts=[16, 14])


# ----------------------------------------------------------------------------- --init_from: tuning a model


def test_a_run_starts_from_another_model_s_weights(tmp_path, small_data, capsys):
    """--init_from: the model flags come from its config, the weights are its own (at a learning rate
    of 1e-12 the tuned run validates as the base model does), and a merged model tunes and resumes
    with its parts."""
    base = tmp_path / "base"
    flags = "--max_steps 4 --eval_every 4 --batch_size 4 --seq_len 32 --warmup_steps 0"
    assert train(tiny_run(small_data, base, flags), capsys).returncode == 0
    tuned = tmp_path / "tuned"
    argv = ["--device", "cpu", "--data_dir", str(small_data), "--out_dir", str(tuned), "--no_progress",
            "--init_from", str(base), *flags.split(), "--lr", "1e-12", "--min_lr", "1e-12"]  # fmt: skip
    assert experiment.main(argv) == 0
    m_base, m_tuned = (json.loads((r / "metrics.json").read_text()) for r in (base, tuned))
    assert m_tuned["config"] == m_base["config"]
    assert m_tuned["final_val_loss"] == pytest.approx(m_base["final_val_loss"], abs=1e-6)
    merged = tmp_path / "merged"
    assert call_main(hubpy.main, ["merge", str(base), str(base), str(merged)], capsys).returncode == 0
    again = tmp_path / "again"
    interrupt_at_step_for(again)
    argv = [a if a != str(tuned) else str(again) for a in argv]
    argv[argv.index(str(base))] = str(merged)
    assert train(["experiment.py", *argv], capsys).returncode == 130
    assert train(["experiment.py", *argv, "--resume", "auto"], capsys).returncode == 0
    assert json.loads((again / "metrics.json").read_text())["config"]["rope_parts"] == [64, 64]


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--n_layer 3", "--n_layer 3 disagrees with --init_from"),
        ("--arch gpt", "holds a BDH-GPU"),
        ("--init_from /nowhere", "error: --init_from /nowhere is no file"),
    ],  # fmt: skip
)
def test_an_init_from_that_does_not_fit_is_one_line(flags, says, tmp_path, small_data, capsys):
    base = tmp_path / "base"
    save_checkpoint(tiny(), base)
    argv = tiny_run(small_data, tmp_path / "run", f"--init_from {base}")
    argv = [
        a
        for a in argv
        if a not in ("--n_embd", "32", "--n_head", "2", "--n_neurons", "128", "--n_layer", "2")
    ]
    assert_clean_error(train([*argv, *flags.split()], capsys), says)
    assert not (tmp_path / "run" / "checkpoints").exists()

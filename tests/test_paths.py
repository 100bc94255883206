"""Which forward a script runs (dragon_hatchling/paths.py): the fastest tested one by default."""

import json

import pytest
import torch

import evaluate
import experiment
from conftest import TINY_MODEL, call_main
from dragon_hatchling import paths
from dragon_hatchling.cli import UsageError
from dragon_hatchling.gpt import GPT
from model import BDH
from test_cli import assert_clean_error

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU is needed to choose


def test_bdh_on_cuda_takes_the_fused_kernels_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(paths, "triton_available", lambda: True)
    assert paths.choose_path(BDH, CUDA, None) == paths.FUSED
    assert paths.choose_path(BDH, CUDA, True) == paths.FUSED
    assert paths.choose_path(BDH, CUDA, False) == paths.COMPILED  # --no_fused: plain, compiled on CUDA
    assert paths.choose_path(BDH, CUDA, False, compile=False) == paths.EAGER
    assert paths.choose_path(GPT, CUDA, None) == paths.COMPILED  # no fused kernels for a GPT
    assert paths.choose_path(BDH, CPU, None) == paths.EAGER  # nothing changes on the CPU
    assert paths.choose_path(BDH, CPU, None, compile=True) == paths.COMPILED
    # what the fused kernels cannot honour takes the plain path, unasked...
    assert paths.choose_path(BDH, CUDA, None, dtype=torch.float32) == paths.COMPILED
    monkeypatch.setattr(paths, "triton_available", lambda: False)
    assert paths.choose_path(BDH, CUDA, None) == paths.COMPILED
    # ...and asked for, is refused
    with pytest.raises(UsageError, match="--fused needs Triton"):
        paths.choose_path(BDH, CUDA, True)


@pytest.mark.parametrize(
    "model, device, fused, compile, dtype, says",
    [
        (BDH, CPU, True, None, torch.bfloat16, "--fused runs Triton kernels on CUDA; the device is cpu"),
        (GPT, CUDA, True, None, torch.bfloat16, "a GPT runs through torch"),
        (BDH, CUDA, True, None, torch.float32, "--fused computes in bfloat16; --dtype float32"),
        (BDH, CUDA, None, True, torch.bfloat16, "add --no_fused for the plain path, compiled"),
        (BDH, CUDA, True, True, torch.bfloat16, "--compile compiles the plain PyTorch path"),
    ],
)
def test_a_path_that_cannot_run_is_refused(model, device, fused, compile, dtype, says, monkeypatch):
    monkeypatch.setattr(paths, "triton_available", lambda: True)
    with pytest.raises(UsageError, match=says):
        paths.choose_path(model, device, fused, compile, dtype)


def test_the_run_and_the_evaluation_record_their_path(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--device", "cpu", "--data_dir", str(small_data), *TINY_MODEL, "--out_dir", str(run),
            "--max_steps", "2", "--batch_size", "2", "--seq_len", "32", "--no_progress"]  # fmt: skip
    assert call_main(experiment.main, argv, capsys).returncode == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["path"], metrics["fused"], metrics["compile"]) == ("eager", False, False)
    out = tmp_path / "eval"
    argv = ["--model_path", str(run), "--data_dir", str(small_data), "--device", "cpu", "--out_dir", str(out),
            "--max_chunks", "2", "--no_plots"]  # fmt: skip
    assert call_main(evaluate.main, argv, capsys).returncode == 0
    assert json.loads((out / "metrics.json").read_text())["path"] == "eager"
    assert_clean_error(call_main(evaluate.main, [*argv, "--fused"], capsys), "--fused", "CUDA", "cpu")


def test_help_says_which_path_runs(capsys):
    for main in (experiment.main, evaluate.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--no_fused" in text and "fused Triton kernels" in text

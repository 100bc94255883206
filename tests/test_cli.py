"""Bad command-line input: one line naming the argument, exit code 2, never a traceback."""

import pytest

from conftest import REPO, TINY_MODEL, require_shared, run_script


def assert_clean_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--batch_size", "0"], ["--batch_size", "positive"]),
        (["--seq_len", "0"], ["--seq_len", "positive"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--device", "cuda:7"], ["--device"]),
        (["--data_dir", "/nonexistent/wikitext"], ["--data_dir", "/nonexistent/wikitext"]),
        (["--epochs", "-1"], ["--epochs"]),
        (["--lr", "0"], ["--lr"]),
        (["--n_neurons", "100", "--n_head", "3"], ["n_neurons", "divisible"]),
        (["--bogus_flag"], ["--bogus_flag"]),
    ],
)
def test_experiment_rejects_bad_values(args, needles, small_data_dir, tmp_path):
    data = [] if "--data_dir" in args else ["--data_dir", str(small_data_dir)]
    result = run_script(
        "experiment.py",
        *data,
        *TINY_MODEL,
        "--max_steps",
        "1",
        "--out_dir",
        str(tmp_path / "run"),
        *args,
        timeout=60,
    )
    assert_clean_error(result, *needles)
    assert not (tmp_path / "run" / "log.csv").exists()


def test_split_shorter_than_one_window(tmp_path, small_data_dir):
    (small_data_dir / "wiki.valid.raw").write_bytes(b"tiny")
    result = run_script(
        "experiment.py",
        "--data_dir",
        str(small_data_dir),
        *TINY_MODEL,
        "--out_dir",
        str(tmp_path / "run"),
        timeout=60,
    )
    assert_clean_error(result, "valid", "shorter than one window")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model_path", "/nonexistent/model"], ["--model_path", "/nonexistent/model"]),
        (["--max_chunks", "0"], ["--max_chunks"]),
        (["--split", "dev"], ["--split"]),
        (["--prompt", "a", "--context", "1"], ["--context", "at least 2"]),
        (["--context", "-3"], ["--context"]),
    ],
)
def test_evaluate_rejects_bad_values(args, needles, small_data_dir):
    base = ["--data_dir", str(small_data_dir), "--device", "cpu"]
    if "--model_path" not in args:
        base += ["--model_path", str(REPO)]
    result = run_script("evaluate.py", *base, *args, timeout=60)
    assert_clean_error(result, *needles)


def test_help_explains_every_flag():
    result = run_script("experiment.py", "--help", timeout=60)
    assert result.returncode == 0
    for flag in (
        "--device",
        "--epochs",
        "--max_steps",
        "--batch_size",
        "--seq_len",
        "--lr",
        "--min_lr",
        "--warmup_steps",
        "--weight_decay",
        "--grad_clip",
        "--dropout",
        "--n_embd",
        "--n_head",
        "--n_neurons",
        "--n_layer",
        "--dtype",
        "--compile",
        "--eval_every",
        "--seed",
        "--data_dir",
        "--out_dir",
        "--train_file",
    ):
        assert flag in result.stdout


def test_missing_shared_folder_fails_with_a_clear_message(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="shared data folder is missing"):
        require_shared(tmp_path / "no-shared")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--parts", "train,speed"], ["--parts", "speed"]),
        (["--shapes", "32by128"], ["--shapes", "32by128"]),
        (["--model_path", "/nonexistent/model"], ["--model_path", "/nonexistent/model"]),
        (["--device", "cpu"], ["--device", "CUDA"]),
    ],
)
def test_benchmark_rejects_bad_values(args, needles):
    assert_clean_error(run_script("benchmark.py", *args, timeout=60), *needles)

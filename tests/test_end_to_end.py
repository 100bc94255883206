import csv
import json

import pytest

from conftest import run_script, tiny_run

EXPECTED_HEADER = [
    "step",
    "epoch",
    "bytes_seen",
    "train_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "bytes_per_s",
    "elapsed_s",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_data):
    """One tiny run for the module's tests, which only read it."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    flags = "--max_steps 24 --eval_every 12 --batch_size 4 --seq_len 32 --warmup_steps 5 --log_every 4"
    extra_val = ["--extra_val_file", str(small_data / "wiki.test.raw")]
    result = run_script(*tiny_run(small_data, out, flags), *extra_val)
    assert result.returncode == 0, result.stderr
    return out, result


def test_training_writes_log_metrics_checkpoints_and_plots(trained_run, small_data):
    out, result = trained_run
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys())
    assert header[: len(EXPECTED_HEADER)] == EXPECTED_HEADER
    assert header[len(EXPECTED_HEADER) :] == [
        "val_loss_wiki_test_raw",
        "val_bpb_wiki_test_raw",
        "x_nonzero",
        "y_nonzero",
    ]
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert [int(r["bytes_seen"]) for r in rows][-1] == 24 * 4 * 32
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [12, 24]
    assert all(0 < float(r["y_nonzero"]) <= float(r["x_nonzero"]) < 1 for r in evals)  # y = relu(.) * x
    assert not any(r["x_nonzero"] for r in rows if not r["val_loss"])
    assert all(float(r["train_loss"]) > 0 for r in rows)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_val_loss"] == pytest.approx(float(evals[-1]["val_loss"]), abs=1e-4)
    assert metrics["final_val_bpb"] == pytest.approx(metrics["final_val_loss"] / 0.6931471805599453)
    assert metrics["bytes_trained"] == 24 * 4 * 32 and metrics["steps"] == 24
    assert metrics["best_val_loss"] <= metrics["final_val_loss"]
    assert metrics["data"]["valid"]["source"].endswith("wiki.valid.raw")
    assert len(metrics["data"]["train"]["sha256"]) == 64
    for key in ("wall_time_s", "device", "torch_version", "command", "date", "git_commit", "config"):
        assert key in metrics
    assert metrics["config"]["n_neurons"] == 128
    for which in ("best", "last"):
        folder = out / "checkpoints" / which
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "training_state.pt").is_file()
    for plot in ("loss.png", "bpb.png", "lr.png", "sparsity.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "done: val loss" in result.stdout


def test_evaluate_reproduces_the_final_validation_loss(trained_run, small_data, tmp_path):
    out, _ = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    ev = tmp_path / "eval"
    result = run_script(
        "evaluate.py",
        "--model_path",
        str(out),
        "--checkpoint",
        "last",
        "--data_dir",
        str(small_data),
        "--seq_len",
        "128",  # the validation protocol (--eval_seq_len), whatever the training windows
        "--device",
        "cpu",
        "--out_dir",
        str(ev),
    )
    assert result.returncode == 0, result.stderr
    got = json.loads((ev / "metrics.json").read_text())
    assert got["loss"] == pytest.approx(metrics["final_val_loss"], abs=1e-5)
    assert got["bpb"] == pytest.approx(got["loss"] / 0.6931471805599453)
    assert got["perplexity"] == pytest.approx(2.718281828459045 ** got["loss"])
    assert got["bytes"] == ((6_000 - 1) // 128) * 128
    assert (got["split"], got["seq_len"], got["max_chunks"]) == ("valid", 128, None)
    stats = json.loads((ev / "weight_stats.json").read_text())
    assert set(stats) == {"E", "Dx", "Dy", "embed.weight", "readout"}
    assert {"mean", "std", "excess_kurtosis", "frac_beyond_3std"} <= set(stats["E"])
    assert (ev / "weights.png").read_bytes()[:4] == b"\x89PNG"

    few = run_script(
        "evaluate.py",
        "--model_path",
        str(out / "checkpoints" / "best"),
        "--data_dir",
        str(small_data),
        "--seq_len",
        "32",
        "--device",
        "cpu",
        "--out_dir",
        str(ev),
        "--max_chunks",
        "3",
        "--split",
        "test",
        "--no_plots",
    )
    assert few.returncode == 0, few.stderr
    got = json.loads((ev / "metrics.json").read_text())
    assert (got["bytes"], got["split"], got["max_chunks"]) == (3 * 32, "test", 3)
    assert got["loss_by_position"] == {"0-31": pytest.approx(got["loss"])}


def test_evaluate_scores_long_windows_by_position_and_samples_in_a_window(trained_run, small_data, tmp_path):
    out, _ = trained_run
    ev = tmp_path / "long"
    args = ["--model_path", str(out), "--data_dir", str(small_data), "--device", "cpu", "--no_plots"]
    args += ["--seq_len", "160", "--max_chunks", "4", "--out_dir", str(ev)]
    prompts = ["--prompt", "The", "--prompt", "A longer prompt"]  # two, sampled side by side
    result = run_script("evaluate.py", *args, *prompts, "--max_new_bytes", "20", "--context", "8")
    assert result.returncode == 0, result.stderr
    got = json.loads((ev / "metrics.json").read_text())
    by_position = got["loss_by_position"]
    assert list(by_position) == ["0-127", "128-159"]
    assert (128 * by_position["0-127"] + 32 * by_position["128-159"]) / 160 == pytest.approx(got["loss"])
    assert "loss by position: 0-127" in result.stdout
    assert got["sample"]["context"] == 8 and got["sample"]["prompts"] == ["The", "A longer prompt"]
    assert (ev / "sample-1.txt").read_bytes().startswith(b"The")
    assert (ev / "sample-2.txt").read_bytes().startswith(b"A longer prompt")
    assert len((ev / "sample-2.txt").read_bytes()) >= len(b"A longer prompt") + 20


def test_a_run_folder_is_never_overwritten_by_accident(trained_run, small_data):
    out, _ = trained_run
    before = (out / "log.csv").read_bytes()
    result = run_script(*tiny_run(small_data, out, "--max_steps 2"))
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--overwrite" in result.stderr
    assert (out / "log.csv").read_bytes() == before

"""Resume exactly, stop cleanly on signals, never lose a checkpoint, clear errors for bad input."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import experiment
from conftest import REPO, call_main, run_script, tiny_run
from dragon_hatchling import plots, scoring
from dragon_hatchling.checkpoints import checkpoint_folder, load_training_state
from dragon_hatchling.run_folder import CSV_FIELDS
from test_cli import assert_clean_error

FAST = "--batch_size 4 --seq_len 32 --warmup_steps 3 --log_every 1"


def train_losses(run) -> list[tuple[int, str]]:
    with open(run / "log.csv", newline="") as f:
        return [(int(r["step"]), r["train_loss"]) for r in csv.DictReader(f)]


def start(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for_rows(run, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "log.csv").is_file() and len(train_losses(run)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not start logging in time")


SIGNAL_FLAGS = f"{FAST} --max_steps 120 --eval_every 50"


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory, small_data):
    """The run the stopped ones are held to, run once: never stopped."""
    whole = tmp_path_factory.mktemp("unstopped") / "whole"
    assert run_script(*tiny_run(small_data, whole, SIGNAL_FLAGS)).returncode == 0
    return whole


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_resume_continues_bit_exact(sig, code, tmp_path, small_data_dir, unstopped):
    flags, whole, parts = SIGNAL_FLAGS, unstopped, tmp_path / "parts"
    proc = start(tiny_run(small_data_dir, parts, flags))
    wait_for_rows(parts, 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "resume with:" in err and "--resume auto" in err
    stopped = load_training_state(checkpoint_folder(parts, "last"))["step"]
    assert 5 <= stopped < 120
    assert json.loads((parts / "metrics.json").read_text())["finished"] is False

    resumed = run_script(*tiny_run(small_data_dir, parts, f"{flags} --resume auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped}" in resumed.stdout
    assert train_losses(parts) == train_losses(whole)  # every step, same loss, rows neither lost nor doubled
    a = load_file(whole / "checkpoints" / "last" / "model.safetensors")
    b = load_file(parts / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((parts / "metrics.json").read_text())["final_val_loss"] == pytest.approx(
        json.loads((whole / "metrics.json").read_text())["final_val_loss"], abs=0
    )


SAVER = """
import sys, torch
from dragon_hatchling.checkpoints import save_checkpoint
from model import BDH, BDHConfig
model = BDH(BDHConfig(n_embd=64, n_head=2, n_neurons=32768, n_layer=1))
for version in range(1, 10_000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(version)
    state = {"step": version, "optimizer": {"state": {}, "param_groups": []}, "best": {"val_loss": 9.0},
             "rng": {"torch": torch.get_rng_state()}, "train_time_s": 0.0, "elapsed_s": 0.0}
    save_checkpoint(model, sys.argv[1] + "/checkpoints/last", state)
    print(version, flush=True)
"""


def test_sigkill_while_saving_leaves_a_readable_checkpoint(tmp_path):
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "1"  # the first save is complete
        time.sleep(0.05 + 0.07 * attempt)  # kill at varying points, mostly in the middle of a save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        folder = checkpoint_folder(run, "last")
        assert folder is not None
        weights = load_file(folder / "model.safetensors")
        version = load_training_state(folder)["step"]
        assert all(torch.all(w == version) for w in weights.values())  # weights and state agree


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, small_data_dir):
    run = tmp_path / "run"
    # The signal must land mid-run and the next validation far away, so that wherever the signal
    # lands the first non-finite loss is a training loss, two steps after the checkpoint.
    flags = f"{FAST} --max_steps 2000 --eval_every 1000"
    proc = start(tiny_run(small_data_dir, run, flags))
    wait_for_rows(run, 9, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    folder = checkpoint_folder(run, "last")
    state = load_training_state(folder)
    for per_param in state["optimizer"]["state"].values():  # poison: a negative second moment
        per_param["exp_avg_sq"].fill_(-1.0)
    torch.save(state, folder / "training_state.pt")
    good = load_file(folder / "model.safetensors")

    result = run_script(*tiny_run(small_data_dir, run, f"{flags} --resume auto"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # the first step after the checkpoint still computes its loss with good weights; its update is NaN
    assert f"training loss became nan by step {state['step'] + 2}" in line
    assert f"last good checkpoint (step {state['step']})" in line
    kept = load_file(checkpoint_folder(run, "last") / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)


# ----------------------------------------------------------------------------- bad input, one test each
# In this process (experiment.main, evaluate.main): what a shell would see, without a start-up a case.


def train(argv: list[str], capsys):
    return call_main(experiment.main, argv[1:], capsys)  # argv from tiny_run, less the script


def test_empty_split(tmp_path, small_data_dir, capsys):
    (small_data_dir / "wiki.valid.raw").write_bytes(b"")
    result = train(tiny_run(small_data_dir, tmp_path / "r", "--max_steps 1"), capsys)
    assert_clean_error(result, "wiki.valid.raw", "empty")


def test_missing_split_file(tmp_path, small_data_dir, capsys):
    (small_data_dir / "wiki.train.raw").unlink()
    result = train(tiny_run(small_data_dir, tmp_path / "r", "--max_steps 1"), capsys)
    assert_clean_error(result, "wiki.train.raw", "does not exist")


def test_max_steps_not_positive(tmp_path, small_data_dir, capsys):
    result = train([*tiny_run(small_data_dir, tmp_path / "r", "--max_steps 1"), "--max_steps", "0"], capsys)
    assert_clean_error(result, "--max_steps")


def test_cuda_asked_for_but_not_available(tmp_path, small_data_dir, capsys):
    if torch.cuda.is_available():
        pytest.fail("this test checks the error on a machine without CUDA (as CI is)")
    result = train([*tiny_run(small_data_dir, tmp_path / "r", "--max_steps 1"), "--device", "cuda"], capsys)
    assert_clean_error(result, "--device cuda", "not available")


def test_odd_neurons_per_head(tmp_path, small_data_dir, capsys):
    argv = [*tiny_run(small_data_dir, tmp_path / "r", "--max_steps 1"), "--n_neurons", "6", "--n_head", "2"]
    assert_clean_error(train(argv, capsys), "neurons per head", "even")


def test_output_folder_cannot_be_written(tmp_path, small_data_dir, capsys):
    (tmp_path / "a-file").write_text("x")
    result = train(tiny_run(small_data_dir, tmp_path / "a-file" / "run", "--max_steps 1"), capsys)
    assert_clean_error(result, "--out_dir", "cannot be written")


def test_evaluate_output_folder_cannot_be_written(tmp_path, small_data_dir, shared, capsys):
    (tmp_path / "a-file").write_text("x")
    seed = shared / "fixtures" / "legacy" / "seed_format.pt"
    argv = ["--model_path", str(seed), "--data_dir", str(small_data_dir), "--max_chunks", "1"]
    result = call_main(evaluate.main, [*argv, "--out_dir", str(tmp_path / "a-file" / "eval")], capsys)
    assert_clean_error(result, "--out_dir", "cannot be written")


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("finished") / "run"
    result = run_script(*tiny_run(small_data, run, f"{FAST} --max_steps 3"))
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def finished_run(tmp_path, finished_once):
    """A copy of one finished tiny run (on `small_data`), for the test to damage."""
    return Path(shutil.copytree(finished_once, tmp_path / "run"))


def test_truncated_checkpoint(finished_run, small_data, capsys):
    weights = finished_run / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = ["--model_path", str(finished_run), "--data_dir", str(small_data), "--max_chunks", "1"]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "could not load the checkpoint")


def test_corrupted_training_state(finished_run, small_data, capsys):
    (finished_run / "checkpoints" / "last" / "training_state.pt").write_bytes(b"garbage")
    before = (finished_run / "log.csv").read_bytes()
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --resume auto"), capsys)
    assert_clean_error(result, "training_state.pt", "corrupted")
    assert (finished_run / "log.csv").read_bytes() == before


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("step", "x", "its step is 'x'"),
        ("step", -5, "its step is -5"),
        ("step", 10**12, "at step 1,000,000,000,000, past this run's 3 steps"),
        ("best", "x", "its best is 'x'"),
        ("rng", None, "its rng is None"),
        ("interval", {"steps": 1}, "its interval is dict"),
        ("elapsed_s", "x", "its elapsed_s is 'x'"),
    ],
)
def test_a_damaged_field_of_the_training_state_is_one_line(
    field, value, says, finished_run, small_data, capsys
):
    """A training_state.pt that unpickles but holds what no run saved: refused before any step, its
    run as it was (it was a traceback, or a crash report after the step it named)."""
    path = finished_run / "checkpoints" / "last" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, field: value}, path)
    before = (finished_run / "log.csv").read_bytes()
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --resume auto"), capsys)
    assert_clean_error(result, says)
    assert (finished_run / "log.csv").read_bytes() == before


def test_a_damaged_log_is_kept_and_named(finished_run, small_data, capsys):
    (finished_run / "log.csv").write_bytes(b"step,train_loss\n1,\xff\n")
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --resume auto"), capsys)
    assert_clean_error(result, "log.csv is not a log this project wrote (UnicodeDecodeError)")
    assert (finished_run / "log.csv").read_bytes() == b"step,train_loss\n1,\xff\n"


def test_resume_with_flags_that_disagree(finished_run, small_data, capsys):
    before = (finished_run / "log.csv").read_bytes()
    result = train(
        tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --n_layer 3 --resume auto"), capsys
    )
    assert_clean_error(result, "disagrees", "--n_layer 3")
    assert (finished_run / "log.csv").read_bytes() == before


def test_evaluate_n_layer_that_disagrees(finished_run, small_data, capsys):
    argv = [
        "--model_path",
        str(finished_run),
        "--data_dir",
        str(small_data),
        "--n_layer",
        "5",
        "--max_chunks",
        "1",
    ]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "--n_layer 5", "disagrees")


def test_resume_without_a_checkpoint(tmp_path, small_data_dir, capsys):
    result = train(
        [*tiny_run(small_data_dir, tmp_path / "empty", "--max_steps 1"), "--resume", "auto"], capsys
    )
    assert_clean_error(result, "--resume auto", "no checkpoint")


def test_an_exception_in_validation_costs_at_most_the_step_it_happened_after(
    tmp_path, small_data, capsys, monkeypatch
):
    """A failure outside the training step (here the second validation) saves what that step
    holds; --resume auto then ends where a run that never failed ends, weight for weight."""
    flags = f"{FAST} --max_steps 9 --eval_every 3"
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(tiny_run(small_data, whole, flags), capsys).returncode == 0
    real, calls = experiment.position_loss_sums, []

    def fails_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the validation broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "position_loss_sums", fails_the_second_time)
    code, err, _ = train(tiny_run(small_data, broken, flags), capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "RuntimeError after step 6: the validation broke" in err and "--resume auto" in err
    assert load_training_state(checkpoint_folder(broken, "last"))["step"] == 6
    assert not json.loads((broken / "metrics.json").read_text())["finished"]
    monkeypatch.setattr(experiment, "position_loss_sums", real)
    assert train(tiny_run(small_data, broken, flags + " --resume auto"), capsys).returncode == 0
    want, got = dict(train_losses(whole)), dict(train_losses(broken))
    assert set(want) - set(got) == {6}  # the row the failed validation was to complete
    assert all(got[s] == want[s] for s in got)
    for name, w in load_file(whole / "checkpoints" / "last" / "model.safetensors").items():
        assert torch.equal(w, load_file(broken / "checkpoints" / "last" / "model.safetensors")[name]), name


def test_an_exception_while_plotting_keeps_the_finished_run(tmp_path, small_data, capsys, monkeypatch):
    def broken_plots(*args, **kwargs):
        raise OSError("no space left for a plot")

    run = tmp_path / "run"
    monkeypatch.setattr(plots, "training_curves", broken_plots)
    code, err, _ = train(tiny_run(small_data, run, f"{FAST} --max_steps 4 --eval_every 2"), capsys)
    assert code == 1 and "OSError after step 4: no space left for a plot" in err, err
    assert load_training_state(checkpoint_folder(run, "last"))["step"] == 4
    monkeypatch.undo()
    code, err, _ = train(
        tiny_run(small_data, run, f"{FAST} --max_steps 4 --eval_every 2 --resume auto"), capsys
    )
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["finished"] and (run / "loss.png").is_file()


def test_a_validation_that_cannot_fit_fails_at_the_start(tmp_path, small_data, capsys, monkeypatch):
    """One validation batch runs before the first step: a window that trains but cannot validate
    is refused at once (one line, exit 2), not after hours of training."""
    import model

    forward = model.BDH.forward

    def out_of_memory_in_eval(self, *args, **kwargs):
        if not self.training:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model.BDH, "forward", out_of_memory_in_eval)
    run = tmp_path / "run"
    code, err, _ = train(tiny_run(small_data, run, f"{FAST} --max_steps 4"), capsys)
    assert code == 2 and "a validation batch of 64 x 128 bytes does not fit" in err, err
    assert "--eval_batch_size" in err and not (run / "log.csv").exists()


def test_long_validation_windows_come_in_batches_no_larger_than_a_training_batch(
    tmp_path, small_data, capsys, monkeypatch
):
    """Every window that trains also validates: validation of long windows splits its batches so
    that none holds more bytes than a training batch (or 8 KB), from the dry run at the start on."""
    seen = []
    real = scoring.window_batches

    def recording(data, seq_len, batch_size, max_chunks=None, shard=(0, 1)):
        for x, y in real(data, seq_len, batch_size, max_chunks, shard):
            seen.append(x.shape)
            yield x, y

    monkeypatch.setattr(scoring, "window_batches", recording)
    monkeypatch.setattr(experiment, "window_batches", recording)
    flags = "--max_steps 2 --batch_size 2 --seq_len 1024 --eval_seq_len 2048 --eval_batch_size 64"
    flags += f" --extra_val_file {small_data / 'wiki.train.raw'}"  # 29 windows of 2,048 bytes
    assert train(tiny_run(small_data, tmp_path / "run", flags), capsys).returncode == 0
    assert len(seen) > 8 and all(T == 2048 and B * T <= 8192 for B, T in seen), seen
    assert max(B for B, _ in seen) == 4  # 4 windows a batch, not 64


# ----------------------------------------------------------------------------- nothing replaced unasked


def interrupt_at_step(monkeypatch, step: int) -> None:
    """SIGINT to this process while step `step` runs (as Ctrl-C would): the run saves and stops."""
    real = experiment.lr_at

    def lr_at(s, total, args):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(s, total, args)

    monkeypatch.setattr(experiment, "lr_at", lr_at)


def test_overwrite_clears_the_old_run_before_writing(finished_run, small_data, capsys, monkeypatch):
    """A run of another size started with --overwrite and stopped before its first validation leaves
    nothing of the old run: no old best checkpoint to score, no old metrics saying finished."""
    interrupt_at_step(monkeypatch, 2)
    flags = f"{FAST} --max_steps 50 --eval_every 40 --n_embd 16 --overwrite"
    result = train(tiny_run(small_data, finished_run, flags), capsys)
    assert result.returncode == 130, result.stderr
    assert checkpoint_folder(finished_run, "best") is None  # the old best is gone, no new one yet
    assert json.loads((checkpoint_folder(finished_run, "last") / "config.json").read_text())["n_embd"] == 16
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["config"]["n_embd"] == 16 and metrics["finished"] is False
    assert [s for s, _ in train_losses(finished_run)] == [1, 2]


def test_a_run_folder_without_its_log_still_holds_a_run(finished_run, small_data, capsys):
    (finished_run / "log.csv").unlink()
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3"), capsys)
    assert_clean_error(result, "already holds a run", "--overwrite")
    assert checkpoint_folder(finished_run, "best") is not None


def test_a_folder_where_no_step_was_taken_blocks_nothing(tmp_path, small_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text(",".join(CSV_FIELDS) + "\n")  # a crash before the first step
    assert train(tiny_run(small_data, run, f"{FAST} --max_steps 2"), capsys).returncode == 0


def test_two_runs_never_share_a_folder(finished_run, small_data, capsys):
    from dragon_hatchling.checkpoints import lock_folder

    held = lock_folder(finished_run)  # a run in progress there
    try:
        flags = f"{FAST} --max_steps 3 --overwrite"
        result = train(tiny_run(small_data, finished_run, flags), capsys)
        assert_clean_error(result, "is in use by another run", f"pid {os.getpid()}")
        assert checkpoint_folder(finished_run, "best") is not None  # nothing replaced
    finally:
        held.close()
    assert (
        train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --overwrite"), capsys).returncode == 0
    )


def test_evaluation_never_replaces_a_run_s_metrics(finished_run, small_data, capsys):
    before = (finished_run / "metrics.json").read_bytes()
    argv = ["--model_path", str(finished_run), "--data_dir", str(small_data), "--out_dir", str(finished_run)]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "holds a training run", "metrics.json")
    assert (finished_run / "metrics.json").read_bytes() == before


def test_extra_validation_files_of_one_name_keep_both_losses(tmp_path, small_data, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        text = (small_data / "wiki.test.raw").read_bytes()
        (tmp_path / folder / "x.raw").write_bytes(text if folder == "a" else text[::-1])
    extra = f"--extra_val_file {tmp_path / 'a' / 'x.raw'} --extra_val_file {tmp_path / 'b' / 'x.raw'}"
    run = tmp_path / "run"
    assert train(tiny_run(small_data, run, f"{FAST} --max_steps 2 {extra}"), capsys).returncode == 0
    final = json.loads((run / "metrics.json").read_text())["final_extra_val"]
    assert set(final) == {"a_x_raw", "b_x_raw"} and final["a_x_raw"]["loss"] != final["b_x_raw"]["loss"]
    twice = f"--extra_val_file {tmp_path / 'a' / 'x.raw'} " * 2
    result = train(tiny_run(small_data, tmp_path / "r2", f"{FAST} --max_steps 2 {twice}"), capsys)
    assert_clean_error(result, "--extra_val_file", "given twice")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, small_data, capsys, monkeypatch):
    real, saves = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) >= 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:659] . unexpected pos; No space left on device"
            )
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    result = train(tiny_run(small_data, run, f"{FAST} --max_steps 6 --eval_every 3"), capsys)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "could not save the checkpoint" in result.stderr and "No space left" in result.stderr
    assert "last good checkpoint (step 3)" in result.stderr
    assert not list((run / "checkpoints").glob("*.tmp")), "the temporary folder was left behind"
    assert load_training_state(checkpoint_folder(run, "last"))["step"] == 3


def test_convert_never_replaces_a_checkpoint_unasked(finished_run, tmp_path, capsys):
    from dragon_hatchling import hub

    target = finished_run / "checkpoints" / "last"
    before = (target / "model.safetensors").read_bytes()
    convert = ["convert", str(finished_run / "checkpoints" / "best")]
    assert_clean_error(call_main(hub.main, [*convert, str(target)], capsys), "not empty", "--overwrite")
    assert (target / "model.safetensors").read_bytes() == before
    assert call_main(hub.main, [*convert, str(target), "--overwrite"], capsys).returncode == 0
    assert "training_state.pt" not in {p.name for p in target.iterdir()}  # no old state beside the new
    (tmp_path / "a-file").write_text("x")
    assert_clean_error(call_main(hub.main, [*convert, str(tmp_path / "a-file")], capsys), "a-file", "folder")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        result = call_main(hub.main, [*convert, str(read_only)], capsys)
    finally:
        read_only.chmod(0o700)
    if os.geteuid() != 0:  # root writes anywhere
        assert_clean_error(result, "read-only", "cannot be written")


# ----------------------------------------------------------------------------- bad files, one line each


def test_a_tensor_of_the_wrong_shape_is_named(finished_run, small_data, capsys):
    """load_state_dict's message starts with a header line; the error names the tensor instead."""
    from safetensors.torch import save_file

    weights_file = finished_run / "checkpoints" / "best" / "model.safetensors"
    weights = load_file(weights_file)
    weights["readout"] = torch.zeros(3, 3)
    save_file(weights, weights_file)
    argv = ["--model_path", str(finished_run), "--data_dir", str(small_data), "--max_chunks", "1"]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "size mismatch for readout")


def test_resuming_with_the_weights_of_another_model(finished_run, small_data, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(tiny_run(small_data, other, f"{FAST} --max_steps 2 --n_embd 16"), capsys).returncode == 0
    last = finished_run / "checkpoints" / "last"
    shutil.copy(other / "checkpoints" / "last" / "model.safetensors", last / "model.safetensors")
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --resume auto"), capsys)
    assert_clean_error(result, "not this model's", "size mismatch for")


def test_a_checkpoint_folder_without_its_weights(finished_run, small_data, capsys):
    best = finished_run / "checkpoints" / "best"
    (best / "model.safetensors").unlink()
    argv = ["--model_path", str(best), "--data_dir", str(small_data), "--max_chunks", "1"]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "config.json but no model.safetensors")


def test_files_that_cannot_be_read(finished_run, small_data, capsys, monkeypatch):
    """Permission denied (simulated: these tests run as root, who reads everything) on a data file,
    the weights and the training state: one line each, naming the file."""
    import numpy as np

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "memmap", denied)
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 5 --overwrite"), capsys)
    assert_clean_error(result, "wiki.train.raw cannot be read (Permission denied)")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "load", denied)
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 5 --resume auto"), capsys)
    assert_clean_error(result, "training_state.pt cannot be read (Permission denied)")
    monkeypatch.undo()
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    result = train(tiny_run(small_data, finished_run, f"{FAST} --max_steps 3 --resume auto"), capsys)
    assert_clean_error(result, "model.safetensors cannot be read (Permission denied)")


# ----------------------------------------------------------------------------- numbers, signals in validation


def strict_json(path) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_metrics_of_a_run_stopped_before_its_first_validation_are_strict_json(
    tmp_path, small_data, capsys, monkeypatch
):
    interrupt_at_step(monkeypatch, 2)
    run = tmp_path / "run"
    assert (
        train(tiny_run(small_data, run, f"{FAST} --max_steps 50 --eval_every 40"), capsys).returncode == 130
    )
    metrics = strict_json(run / "metrics.json")
    assert metrics["final_val_loss"] is None and metrics["best_val_loss"] is None
    assert metrics["final_val_note"] == "no validation had run by step 2"


def test_a_non_finite_number_is_written_as_null_with_the_reason(tmp_path):
    from dragon_hatchling.files import write_json

    write_json(tmp_path / "m.json", {"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 2.5})
    got = strict_json(tmp_path / "m.json")
    assert got == {
        "loss": None,
        "rows": [1.0, None],
        "ok": 2.5,
        "not_finite": {"loss": "nan", "rows[1]": "inf"},
    }


def sigterm_during_validation(monkeypatch, batch: int) -> list[int]:
    """SIGTERM to this process once validation has scored `batch` batches in all; the batches scored."""
    real, scored = scoring.window_batches, []

    def batches(*args, **kwargs):
        for b in real(*args, **kwargs):
            yield b
            scored.append(1)
            if len(scored) == batch:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(scoring, "window_batches", batches)
    return scored


@pytest.mark.parametrize("max_steps", [6, 3])  # a validation in the middle, and the final one
def test_a_signal_during_validation_stops_it_between_batches(
    tmp_path, small_data, capsys, monkeypatch, max_steps
):
    """Validation of 30 batches (60 KB in windows of 32 bytes, 64 a batch) stops one batch after
    SIGTERM; the step is saved without it, and the resumed run ends as one never stopped."""
    extra = f"--eval_seq_len 32 --extra_val_file {small_data / 'wiki.train.raw'}"
    flags = f"{FAST} --max_steps {max_steps} --eval_every 3 {extra}"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_run(small_data, whole, flags), capsys).returncode == 0
    scored = sigterm_during_validation(monkeypatch, 4)  # during the first validation's extra file
    result = train(tiny_run(small_data, parts, flags), capsys)
    assert result.returncode == 143 and "SIGTERM at step 3" in result.stderr, result.stderr
    assert len(scored) == 4  # not the 33 batches of both files
    state = load_training_state(checkpoint_folder(parts, "last"))
    assert state["step"] == 3 and state["eval_step"] is None
    monkeypatch.undo()
    resumed = train(tiny_run(small_data, parts, f"{flags} --resume auto"), capsys)
    assert resumed.returncode == 0 and "step 3: train" in resumed.stdout  # the cut validation, run now
    assert strict_json(parts / "metrics.json")["finished"]
    assert (
        strict_json(parts / "metrics.json")["final_val_loss"]
        == strict_json(whole / "metrics.json")["final_val_loss"]
    )
    assert logged(parts) == logged(whole)  # the validation at step 3 in its row, as in the unstopped run


def logged(run, keys=("train_loss", "val_loss", "val_loss_wiki_train_raw", "x_nonzero")) -> list[tuple]:
    """The log as a run computes it: each row's step and losses (not its times)."""
    with open(run / "log.csv", newline="") as f:
        return [(r["step"], *(r.get(k) for k in keys)) for r in csv.DictReader(f)]


@pytest.mark.parametrize("stop_at", [6, 8, 12])  # inside a log interval, at its end, at a validation
def test_a_stopped_and_resumed_run_logs_what_an_unstopped_one_logs(stop_at, tmp_path, small_data, capsys,
                                                                   monkeypatch):  # fmt: skip
    """SIGINT between log rows: no row at the stop, and the interval in hand is saved with the
    checkpoint, so the first row after resuming averages the same steps: the same log, row for row."""
    flags = "--batch_size 4 --seq_len 32 --warmup_steps 3 --log_every 4 --max_steps 20 --eval_every 12"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_run(small_data, whole, flags), capsys).returncode == 0
    interrupt_at_step(monkeypatch, stop_at)
    result = train(tiny_run(small_data, parts, flags), capsys)
    assert result.returncode == 130 and f"SIGINT at step {stop_at}" in result.stderr, result.stderr
    assert [r[0] for r in logged(parts)] == [str(s) for s in range(4, stop_at + 1, 4)]  # no row at 6
    monkeypatch.undo()
    assert train(tiny_run(small_data, parts, f"{flags} --resume auto"), capsys).returncode == 0
    assert logged(parts) == logged(whole)


# ----------------------------------------------------------------------------- resuming: what the run records


def stopped_run(tmp_path, small_data, capsys, monkeypatch, flags: str, name: str = "run"):
    """A run stopped by SIGINT at step 4 of 8 (a checkpoint, a log, metrics), and its flags."""
    interrupt_at_step(monkeypatch, 4)
    run = tmp_path / name
    assert (
        train(tiny_run(small_data, run, f"{FAST} --max_steps 8 --eval_every 8 {flags}"), capsys).returncode
        == 130
    )
    monkeypatch.undo()
    return run, f"{FAST} --max_steps 8 --eval_every 8 {flags}"


def test_resuming_on_a_changed_train_file_is_refused_unless_accepted(
    tmp_path, small_data, capsys, monkeypatch
):
    text = tmp_path / "train.txt"
    text.write_bytes((small_data / "wiki.train.raw").read_bytes()[:20_000])
    run, flags = stopped_run(tmp_path, small_data, capsys, monkeypatch, f"--train_file {text}")
    before = (run / "log.csv").read_bytes()
    text.write_bytes(text.read_bytes()[::-1])  # the same path, other bytes
    result = train(tiny_run(small_data, run, f"{flags} --resume auto"), capsys)
    assert_clean_error(result, "the train file is not the one the run trained on", "--accept_new_data")
    assert (run / "log.csv").read_bytes() == before
    assert (
        train(tiny_run(small_data, run, f"{flags} --resume auto --accept_new_data"), capsys).returncode == 0
    )
    metrics = strict_json(run / "metrics.json")
    (change,) = metrics["data_changes"]
    assert change["step"] == 4 and change["train"]["sha256"] != metrics["data"]["train"]["sha256"]


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--recipe reference --overwrite", "--overwrite replaces a run and --resume continues one"),
        ("--recipe long-context", "--recipe long-context (checkpoint: reference)"),
        ("--shifted_heads 1", "--shifted_heads 1 (checkpoint: 0)"),  # every config field, listed or not
    ],
)
def test_flags_a_resumed_run_cannot_honour_are_refused(
    flags, says, tmp_path, small_data, capsys, monkeypatch
):
    run, _ = stopped_run(tmp_path, small_data, capsys, monkeypatch, "--recipe reference")
    before = (run / "log.csv").read_bytes()
    result = train(
        tiny_run(small_data, run, f"{FAST} --max_steps 8 --eval_every 8 {flags} --resume auto"), capsys
    )
    assert_clean_error(result, says)
    assert (run / "log.csv").read_bytes() == before


def test_a_flag_left_out_on_resume_is_named_as_left_out(tmp_path, small_data, capsys, monkeypatch):
    """A run of --max_steps 8 resumed without it: the error says "left out", not Python's None."""
    run, _ = stopped_run(tmp_path, small_data, capsys, monkeypatch, "")
    result = train(tiny_run(small_data, run, f"{FAST} --eval_every 8 --resume auto"), capsys)
    assert_clean_error(result, "--max_steps left out (checkpoint: 8)")


def test_resuming_into_another_folder_never_replaces_a_run(tmp_path, small_data, capsys, monkeypatch):
    """--resume A/checkpoints/last --out_dir B: refused if B holds another run (nothing of B replaced);
    into an empty folder, the run continues there with A's log up to the checkpoint, A untouched."""
    a, flags = stopped_run(tmp_path, small_data, capsys, monkeypatch, "", name="a")
    b, _ = stopped_run(tmp_path, small_data, capsys, monkeypatch, "--seed 5", name="b")
    kept = {p: p.read_bytes() for p in b.rglob("*") if p.is_file() and p.name != ".lock"}
    resume = ["--resume", str(a / "checkpoints" / "last")]
    result = train([*tiny_run(small_data, b, flags), *resume], capsys)
    assert_clean_error(result, f"--out_dir {b} holds another run")
    assert {p: p.read_bytes() for p in kept} == kept
    a_log = (a / "log.csv").read_bytes()
    assert train([*tiny_run(small_data, tmp_path / "c", flags), *resume], capsys).returncode == 0
    assert (a / "log.csv").read_bytes() == a_log
    assert logged(tmp_path / "c")[:4] == logged(a) and len(logged(tmp_path / "c")) == 8


def test_resuming_without_an_extra_validation_file_keeps_its_columns(
    tmp_path, small_data, capsys, monkeypatch
):
    extra = f"--extra_val_file {small_data / 'wiki.test.raw'}"
    run, flags = stopped_run(tmp_path, small_data, capsys, monkeypatch, extra)
    assert (
        train(tiny_run(small_data, run, f"{flags} --resume auto".replace(extra, "")), capsys).returncode == 0
    )
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "val_loss_wiki_test_raw" in rows[0] and len(rows) == 8


def test_default_folders_never_collide(tmp_path, small_data, capsys, monkeypatch):
    """experiment.py's results/runs/<date-time> and evaluate.py's results/eval/<...> are made new:
    two runs in one second, the `last` checkpoints of two runs, a --stream after windows, and the
    same evaluation twice each get a folder of their own."""
    monkeypatch.chdir(tmp_path)
    flags = f"{FAST} --max_steps 2 --eval_every 2"
    for _ in range(2):
        argv = tiny_run(small_data, tmp_path / "unused", flags)
        argv = argv[: argv.index("--out_dir")] + argv[argv.index("--out_dir") + 2 :]
        assert train(argv, capsys).returncode == 0
    runs = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "metrics.json").is_file() for r in runs)
    base = ["--data_dir", str(small_data), "--device", "cpu", "--no_plots"]
    windows, stream = ["--max_chunks", "2"], ["--stream"]
    for run, read in [(runs[0], windows), (runs[1], windows), (runs[0], stream), (runs[0], windows)]:
        argv = ["--model_path", str(run / "checkpoints" / "last"), *base, *read]
        assert call_main(evaluate.main, argv, capsys).returncode == 0
    folders = sorted(p.name for p in (tmp_path / "results" / "eval").iterdir())
    assert len(folders) == 4 and all(
        (tmp_path / "results" / "eval" / f / "metrics.json").is_file() for f in folders
    )


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("phase", ["loading the data", "the validation dry run", "evaluating"])
def test_a_signal_at_any_phase_is_one_line(
    sig, code, phase, tmp_path, small_data, capsys, monkeypatch, finished_once
):
    """Before the training loop takes over the signals (reading the data, the first validation) and
    in evaluate.py: one line naming the signal, 130 or 143, no traceback."""
    import dragon_hatchling.run_setup as run_setup

    def signalled(real):
        def call(*args, **kwargs):
            os.kill(os.getpid(), sig)
            return real(*args, **kwargs)

        return call

    if phase == "loading the data":
        monkeypatch.setattr(run_setup, "load_split", signalled(run_setup.load_split))
    elif phase == "the validation dry run":
        monkeypatch.setattr(experiment, "eval_mode", signalled(experiment.eval_mode))
    if phase == "evaluating":
        monkeypatch.setattr(scoring, "window_batches", signalled(scoring.window_batches))
        argv = [
            "--model_path",
            str(finished_once),
            "--data_dir",
            str(small_data),
            "--out_dir",
            str(tmp_path / "e"),
        ]
        result = call_main(evaluate.main, argv, capsys)
    else:
        result = train(tiny_run(small_data, tmp_path / "run", f"{FAST} --max_steps 2"), capsys)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and signal.Signals(sig).name in result.stderr
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- no traceback, anywhere


def test_inputs_that_once_ended_in_a_traceback(tmp_path, small_data, shared, capsys, finished_once):
    """Each of these was a traceback or a wrong exit code: now one line, exit 2, or the work done."""
    seed = torch.load(shared / "fixtures" / "legacy" / "seed_format.pt", weights_only=True)
    torch.save(
        {**seed, "decoder_x": seed["decoder_x"][0]}, tmp_path / "flat.pt"
    )  # a tensor of the wrong rank
    base = ["--data_dir", str(small_data), "--device", "cpu", "--no_plots"]
    result = call_main(evaluate.main, ["--model_path", str(tmp_path / "flat.pt"), *base], capsys)
    assert_clean_error(result, "decoder_x", "3-dimensional")
    (tmp_path / "short.txt").write_bytes(b"too short")
    argv = ["--model_path", str(finished_once), *base, "--data_file", str(tmp_path / "short.txt")]
    assert_clean_error(call_main(evaluate.main, argv, capsys), "--data_file", "--seq_len + 1 = 129")
    for bad in ("-1", str(2**64)):
        assert_clean_error(
            train(tiny_run(small_data, tmp_path / "r", f"--seed {bad}"), capsys), "--seed", bad
        )
        argv = ["--model_path", str(finished_once), *base, "--seed", bad]
        assert_clean_error(call_main(evaluate.main, argv, capsys), "--seed")


def test_a_prompt_that_is_not_utf8_is_sampled_as_its_bytes(tmp_path, small_data, capsys, finished_once):
    prompt = os.fsdecode(b"caf\xe9 ")  # Latin-1, as a shell passes it: not UTF-8
    argv = ["--model_path", str(finished_once), "--data_dir", str(small_data), "--device", "cpu",
            "--no_plots", "--max_chunks", "1", "--prompt", prompt, "--max_new_bytes", "5",
            "--out_dir", str(tmp_path / "e")]  # fmt: skip
    assert call_main(evaluate.main, argv, capsys).returncode == 0
    assert (tmp_path / "e" / "sample.txt").read_text().startswith("caf\ufffd ")  # its bytes, shown as UTF-8

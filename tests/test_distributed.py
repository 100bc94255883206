"""Several processes through torchrun (gloo on the CPU, real processes): the same run as one process."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import experiment
from conftest import REPO, call_main, tiny_run
from dragon_hatchling.checkpoints import load_training_state
from test_cli import assert_clean_error

FLAGS = "--max_steps 12 --eval_every 6 --batch_size 4 --seq_len 32 --warmup_steps 3 --log_every 1 --dropout 0"


@pytest.fixture(scope="module")
def flags(edge_train) -> str:
    """FLAGS on a train file of 3 steps an epoch whose last batch a shift leaves short: 12 steps cross
    three epoch edges, where N processes must still train what one does."""
    return f"{FLAGS} --train_file {edge_train}"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """experiment.py (through tests/torchrun_hooks.py) in 2 processes; argv as for experiment.py."""
    return subprocess.Popen(
        [*TORCHRUN, "tests/torchrun_hooks.py", *argv[1:]],
        cwd=REPO,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def our_lines(err: str) -> list[str]:
    """The lines experiment.py prints on stderr (torchrun adds its own warnings and summaries)."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def rows(run) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(run) -> dict:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def assert_same_run(a, b, tol: float = 1e-5) -> None:
    """The same loss at every step and the same final weights (up to the order of float sums; the
    log rounds to 5 decimals)."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("train_loss", "val_loss"):
            if x[key] or y[key]:
                assert abs(float(x[key]) - float(y[key])) <= tol * 1.0001, (x["step"], key, x[key], y[key])
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= tol, name


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, small_data, flags):
    """The same run in one process and in two."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = base / "one", base / "two"
    assert experiment.main(tiny_run(small_data, one, flags)[1:]) == 0
    code, out, err = finish(torchrun(tiny_run(small_data, two, flags)))
    assert code == 0, err
    return one, two, out


def test_two_processes_train_what_one_process_trains(one_and_two):
    one, two, out = one_and_two
    assert_same_run(one, two)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["final_val_loss"] == pytest.approx(m1["final_val_loss"], abs=1e-5)  # validation split in two
    assert m2["bytes_trained"] == m1["bytes_trained"] == 12 * 4 * 32
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 1: nothing
    assert out.count("done: val loss") == 1 and "2 processes, 2 windows a step each" in out


def test_sigterm_to_torchrun_saves_once_and_the_run_resumes(one_and_two, small_data, tmp_path, flags):
    _, two, _ = one_and_two
    run = tmp_path / "run"
    proc = torchrun(tiny_run(small_data, run, flags), env={"BDH_TEST_SLOW": "0.4"})
    deadline = time.time() + 90
    while not ((run / "log.csv").is_file() and len(rows(run)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to both ranks
    code, _, err = finish(proc, 60)
    assert code != 0
    lines = our_lines(err)
    assert len(lines) == 1 and "SIGTERM at step" in lines[0] and "--resume auto" in lines[0], err
    step = int(lines[0].split("SIGTERM at step ")[1].split(":")[0])
    assert 3 <= step < 12 and load_training_state(run / "checkpoints" / "last")["step"] == step
    assert [int(r["step"]) for r in rows(run)][-1] == step  # both ranks stopped at that step
    # N -> M: the two processes' checkpoint resumes in one process...
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    assert experiment.main(tiny_run(small_data, alone, flags + " --resume auto")[1:]) == 0
    assert_same_run(two, alone)
    # ... and in two, under torchrun
    code, _, err = finish(torchrun(tiny_run(small_data, run, flags + " --resume auto")))
    assert code == 0, err
    assert_same_run(two, run)
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2


def test_a_rank_that_fails_stops_every_rank_with_one_line(small_data, tmp_path, flags):
    run = tmp_path / "run"
    start = time.time()
    code, _, err = finish(torchrun(tiny_run(small_data, run, flags), env={"BDH_TEST_FAIL": "1:7"}), 90)
    assert code == 1 and time.time() - start < 90
    lines = our_lines(err)
    assert len(lines) == 1, err
    assert (
        lines[0].startswith("error: rank 1: RuntimeError") and "a failure put there by the test" in lines[0]
    )
    assert 'experiment.py", line' not in err  # no traceback from our code (torchrun prints its summary)
    # nothing saved is lost: the validation's checkpoint (step 6), or rank 0's rescue of step 7, which
    # both ranks had completed when rank 1 failed before step 8
    assert load_training_state(run / "checkpoints" / "last")["step"] in (6, 7)


def test_a_nan_on_one_rank_stops_every_rank_with_one_line(small_data, tmp_path, flags):
    run = tmp_path / "run"
    code, _, err = finish(torchrun(tiny_run(small_data, run, flags), env={"BDH_TEST_NAN": "1:7"}), 90)
    assert code == 1
    lines = our_lines(err)
    assert len(lines) == 1 and "training loss became nan by step 9" in lines[0], err  # rank 1's loss, step 9
    assert load_training_state(run / "checkpoints" / "last")["step"] == 6  # the last good checkpoint


def test_a_global_batch_that_does_not_divide_is_refused_once(small_data, tmp_path, flags):
    code, _, err = finish(torchrun(tiny_run(small_data, tmp_path / "run", flags + " --batch_size 3")), 90)
    assert code != 0 and our_lines(err) == [
        "error: --batch_size 3 (the global batch) does not divide among 2 processes"
    ], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "env, says",
    [
        ({"WORLD_SIZE": "two"}, "must be integers"),
        (
            {"WORLD_SIZE": "2", "RANK": "2"},
            "RANK 2, WORLD_SIZE 2, LOCAL_RANK 0: expected 0 <= RANK < WORLD_SIZE",
        ),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE 0"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK -1"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "1"}, "WORLD_SIZE 2 without MASTER_ADDR: launch it"),
    ],
)
def test_one_process_refuses_a_torchrun_environment_that_makes_no_sense(
    env, says, small_data, tmp_path, capsys, monkeypatch, flags
):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert_clean_error(
        call_main(experiment.main, tiny_run(small_data, tmp_path / "r", flags)[1:], capsys), says
    )
    assert not (tmp_path / "r").exists()


def test_each_rank_carries_its_own_rows(small_data, tmp_path, flags):
    """--carry_state in two processes: each rank carries the state of its two rows; the checkpoint
    gathers them in the batch's order, and the run is the one-process run, stream validation too."""
    carried = flags + " --carry_state --max_steps 6 --eval_every 3"
    one, two = tmp_path / "one", tmp_path / "two"
    assert experiment.main(tiny_run(small_data, one, carried)[1:]) == 0
    code, _, err = finish(torchrun(tiny_run(small_data, two, carried)))
    assert code == 0, err
    assert_same_run(one, two)
    for x, y in zip(rows(one), rows(two), strict=True):
        assert (x["val_loss_stream"] == "") == (y["val_loss_stream"] == "")
        if x["val_loss_stream"]:
            assert abs(float(x["val_loss_stream"]) - float(y["val_loss_stream"])) <= 1e-5
    s1, s2 = (load_file(r / "checkpoints" / "last" / "carried_state.safetensors") for r in (one, two))
    assert s1.keys() == s2.keys() and s1["layers.0"].shape[0] == 4
    for name in s1:
        assert (s1[name] - s2[name]).abs().max().item() <= 1e-5, name


WORKER = """import atexit, sys
from dragon_hatchling.distributed import exit_with
atexit.register(lambda: print(" teardown", end=""))
def main():
    print("ran", end="")  # unflushed: exit_with must flush it
    if sys.argv[1] == "raise":
        raise SystemExit(2)
    return int(sys.argv[1])
exit_with(main)
"""


@pytest.mark.parametrize(
    "world, arg, code, out",
    [("2", "3", 3, "ran"), ("2", "raise", 2, "ran"), ("1", "3", 3, "ran teardown")],
)
def test_a_torchrun_worker_ends_with_its_code_and_without_the_teardown(tmp_path, world, arg, code, out):
    """exit_with: under torchrun (WORLD_SIZE 2) the process ends with main's code, returned or raised,
    its output flushed and without the interpreter's teardown (where gloo's threads aborted ranks that
    had finished), so an atexit handler does not run; one process exits as sys.exit does."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), arg], env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (code, out), done.stderr

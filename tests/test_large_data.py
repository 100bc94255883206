"""Corpora larger than memory (memory-mapped, never read whole) and any text dataset (--dataset)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import experiment
from conftest import REPO, TINY_MODEL, call_main
from dragon_hatchling import corpora, data
from test_cli import assert_clean_error

STEPS = ["--max_steps", "3", "--eval_every", "3", "--batch_size", "4", "--seq_len", "32", "--no_progress"]


def test_an_epoch_too_large_to_shuffle_is_still_every_window_once(monkeypatch):
    monkeypatch.setattr(data, "SHUFFLE_LIMIT", 100)
    order = data.epoch_offsets(32 * 1000 + 7, 32, epoch=2, seed=5)
    assert isinstance(order, data.AffineOrder)
    offsets = np.concatenate([order[i : i + 64] for i in range(0, len(order), 64)])  # as training slices it
    shift = offsets.min()
    assert sorted((offsets - shift) // 32) == list(range(len(order))) and (offsets - shift).max() % 32 == 0
    assert np.array_equal(offsets, data.epoch_offsets(32 * 1000 + 7, 32, epoch=2, seed=5)[0 : len(order)])
    assert not np.array_equal(offsets, data.epoch_offsets(32 * 1000 + 7, 32, epoch=3, seed=5)[0 : len(order)])
    assert abs(int(offsets[1]) - int(offsets[0])) > 32 * 100  # neighbours in the order are far apart


def test_a_32_gb_corpus_trains_in_little_memory(tmp_path, small_data):
    """A few steps on a 32 GB (sparse) train file: read through a memory map, never whole."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(32 << 30)
    run = tmp_path / "run"
    argv = ["--device", "cpu", "--data_dir", str(small_data), "--train_file", str(big), *TINY_MODEL,
            "--out_dir", str(run), *STEPS]  # fmt: skip
    code = (
        "import resource, sys; sys.path.insert(0, '.'); import experiment; "
        "rc = experiment.main(sys.argv[1:]); "
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; print('peak_rss_kb', peak); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    peak_gb = int(result.stdout.split("peak_rss_kb")[1].split()[0]) / 2**20
    assert peak_gb < 3, f"{peak_gb:.2f} GB resident"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["data"]["train"]["bytes"] == 32 << 30
    assert metrics["data"]["train"]["sha256"] is None  # not hashed: too large


def write_json_dataset(folder, rows: list[dict]) -> None:
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dataset_run(name, cache, out, *flags: str) -> list[str]:
    return ["--device", "cpu", "--dataset", str(name), "--data_cache", str(cache), "--out_dir", str(out),
            *TINY_MODEL, *STEPS, *flags]  # fmt: skip


@pytest.fixture(scope="module")
def text_rows(small_data) -> list[str]:
    text = (small_data / "wiki.train.raw").read_text()
    return [text[i : i + 700] for i in range(0, 42_000, 700)]  # 60 documents, no trailing newlines


def test_a_local_json_dataset_is_converted_once_and_trains(tmp_path, text_rows, capsys):
    folder = tmp_path / "docs"
    write_json_dataset(folder, [{"text": t, "id": i} for i, t in enumerate(text_rows)])
    cache = tmp_path / "cache"
    result = call_main(
        experiment.main, dataset_run(folder, cache, tmp_path / "run", "--val_fraction", "0.1"), capsys
    )
    assert result.returncode == 0, result.stderr
    converted = corpora.dataset_folder(
        cache, str(folder), None, "text", 0.1, 1337, corpora.dataset_source(str(folder))
    )
    meta = json.loads((converted / "meta.json").read_text())
    assert meta["rows"] == {"train": 54, "valid": 6} and meta["valid"] == "0.1 of train"
    together = (converted / "train.bin").read_bytes() + (converted / "valid.bin").read_bytes()
    assert len(together) == sum(len(t.encode()) + 1 for t in text_rows)  # each row and its newline
    assert together.count(b"\n") >= 60
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["train"]["source"] == str(converted / "train.bin")
    assert metrics["data"]["valid"]["sha256"] and metrics["final_val_loss"] > 0
    before = (converted / "meta.json").stat().st_mtime_ns
    result = call_main(
        experiment.main, dataset_run(folder, cache, tmp_path / "again", "--val_fraction", "0.1"), capsys
    )
    assert result.returncode == 0 and (converted / "meta.json").stat().st_mtime_ns == before  # not again


def test_a_saved_dataset_with_its_own_validation_split(tmp_path, text_rows, capsys):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict(
        {
            "train": Dataset.from_dict({"body": text_rows[:50]}),
            "validation": Dataset.from_dict({"body": text_rows[50:]}),
        }
    ).save_to_disk(str(folder))
    cache = tmp_path / "cache"
    result = call_main(
        experiment.main, dataset_run(folder, cache, tmp_path / "run", "--text_column", "body"), capsys
    )
    assert result.returncode == 0, result.stderr
    converted = corpora.dataset_folder(
        cache, str(folder), None, "body", 0.005, 1337, corpora.dataset_source(str(folder))
    )
    assert (converted / "valid.bin").read_bytes() == data.rows_to_bytes(text_rows[50:])


@pytest.mark.parametrize(
    "rows, flags, says",
    [
        ([{"text": "a b c"}] * 3, ["--text_column", "body"], "--text_column body: --dataset"),
        ([{"text": 1}] * 3, [], "--text_column text of --dataset"),
    ],
)
def test_a_dataset_without_usable_text_is_refused(rows, flags, says, tmp_path, capsys):
    folder = tmp_path / "bad"
    write_json_dataset(folder, rows)
    result = call_main(
        experiment.main, dataset_run(folder, tmp_path / "cache", tmp_path / "run", *flags), capsys
    )
    assert_clean_error(result, says)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--n_head", "3"], "divisible by n_head (3)"),
        (["--extra_val_file", "nowhere.raw"], "--extra_val_file nowhere.raw does not exist"),
        (["--init_from", "nowhere"], "--init_from nowhere is no file"),
        (["--val_fraction", "1"], "--val_fraction must be below 1"),
    ],
)
def test_a_bad_flag_beside_a_dataset_fails_before_its_conversion(flags, says, tmp_path, capsys, monkeypatch):
    """Converting a dataset may take hours: every flag is checked first."""
    folder = tmp_path / "docs"
    write_json_dataset(folder, [{"text": "a b c"}] * 3)
    monkeypatch.setattr(corpora, "load_text_dataset", lambda *a: pytest.fail("converted before the checks"))
    result = call_main(
        experiment.main, dataset_run(folder, tmp_path / "cache", tmp_path / "run", *flags), capsys
    )
    assert_clean_error(result, says)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_an_empty_dataset_is_refused(tmp_path, capsys, monkeypatch):
    from datasets import Dataset, DatasetDict, Features, Value

    empty_file = tmp_path / "nothing"
    write_json_dataset(empty_file, [])  # datasets cannot read an empty file (nor save an empty dataset)
    result = call_main(experiment.main, dataset_run(empty_file, tmp_path / "c", tmp_path / "r"), capsys)
    assert_clean_error(result, "--dataset", "could not load it")
    empty = Dataset.from_dict({"text": []}, features=Features({"text": Value("string")}))
    monkeypatch.setattr(corpora, "load_text_dataset", lambda *a: DatasetDict({"train": empty}))  # the Hub's
    monkeypatch.setattr(corpora, "hub_revision", lambda name: "0123abc")
    result = call_main(experiment.main, dataset_run("someone/empty", tmp_path / "c", tmp_path / "r"), capsys)
    assert_clean_error(result, "--dataset someone/empty is empty")


def test_a_dataset_that_does_not_exist_is_one_line(tmp_path, capsys):
    result = call_main(
        experiment.main, dataset_run(tmp_path / "nowhere", tmp_path / "c", tmp_path / "r"), capsys
    )
    assert_clean_error(result, "--dataset")


def test_the_cache_is_keyed_by_what_was_converted(tmp_path, text_rows, capsys, monkeypatch):
    """Two folders of one name (from two working folders), a dataset edited after its conversion, and
    another --seed (another held-out split) are converted anew, never served another's bytes."""
    cache = tmp_path / "cache"
    for where, rows in (("a", text_rows[:30]), ("b", text_rows[30:])):
        (tmp_path / where).mkdir()
        write_json_dataset(tmp_path / where / "mydata", [{"text": t} for t in rows])
    runs = []
    for step, (cwd, flags) in enumerate([("a", []), ("b", []), ("b", ["--seed", "7"]), ("a", [])]):
        if step == 3:  # the dataset of a, edited: one row more
            with open(tmp_path / "a" / "mydata" / "train.jsonl", "a") as f:
                f.write(json.dumps({"text": "an edited row"}) + "\n")
        monkeypatch.chdir(tmp_path / cwd)
        argv = dataset_run("mydata", cache, tmp_path / f"run{step}", "--val_fraction", "0.2", *flags)
        assert call_main(experiment.main, argv, capsys).returncode == 0
        runs.append(json.loads((tmp_path / f"run{step}" / "metrics.json").read_text())["data"])
    assert len({r["train"]["source"] for r in runs}) == 4 and len({r["train"]["sha256"] for r in runs}) == 4
    for run, rows in zip(runs, (text_rows[:30], text_rows[30:], text_rows[30:]), strict=False):
        both = [Path(run[split]["source"]).read_bytes() for split in ("train", "valid")]
        assert sum(len(b) for b in both) == len(data.rows_to_bytes(rows))  # its own rows, all of them
    assert (
        Path(runs[3]["train"]["source"]).read_bytes().count(b"an edited row")
        + Path(runs[3]["valid"]["source"]).read_bytes().count(b"an edited row")
        == 1
    )


def test_a_held_out_split_of_every_row_and_a_full_disk_are_one_line(tmp_path, text_rows, capsys, monkeypatch):
    folder = tmp_path / "docs"
    write_json_dataset(folder, [{"text": t} for t in text_rows[:4]])
    cache = tmp_path / "cache"
    result = call_main(
        experiment.main, dataset_run(folder, cache, tmp_path / "r", "--val_fraction", "0.9"), capsys
    )
    assert_clean_error(result, "--val_fraction 0.9 holds out 4 of", "4 rows")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpora, "rows_to_bytes", full)
    result = call_main(
        experiment.main, dataset_run(folder, cache, tmp_path / "r", "--val_fraction", "0.5"), capsys
    )
    assert_clean_error(result, "--data_cache", "No space left on device")
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("meta.json"))


def test_a_dataset_that_is_not_text_says_why(tmp_path, capsys):
    folder = tmp_path / "latin1"
    folder.mkdir()
    (folder / "train.txt").write_bytes("caf\xe9\n".encode("latin-1") * 10)  # not UTF-8
    result = call_main(experiment.main, dataset_run(folder, tmp_path / "c", tmp_path / "r"), capsys)
    assert_clean_error(result, "--dataset", "UnicodeDecodeError")

import numpy as np
import pytest
import torch

from dragon_hatchling.cli import UsageError
from dragon_hatchling.data import (
    batch_offsets,
    epoch_offsets,
    load_bytes_file,
    load_split,
    num_windows,
    rows_to_bytes,
    window_batches,
)


def hub_rows(raw: bytes) -> list[str]:
    """The rows that the Hub's wikitext builder makes from a raw file: blank lines become ''."""
    return [line if line.strip() else "" for line in raw.decode("utf-8").splitlines(keepends=True)]


@pytest.mark.parametrize("split, lines", [("valid", 3760), ("test", 4358)])
def test_rows_rebuild_raw_file_byte_exact(raw_dir, split, lines):
    raw = (raw_dir / f"wiki.{split}.raw").read_bytes()
    rows = hub_rows(raw)
    assert len(rows) == lines
    assert rows_to_bytes(rows) == raw


def test_rows_rebuild_through_a_real_datasets_dataset(raw_dir):
    from datasets import Dataset

    raw = (raw_dir / "wiki.valid.raw").read_bytes()
    ds = Dataset.from_dict({"text": hub_rows(raw)})
    assert ds[0]["text"] == "" and ds[1]["text"] == " = Homarus gammarus = \n"
    assert rows_to_bytes(ds["text"]) == raw


def test_bytes_are_utf8_not_ord_mod_256():
    rows = ["café – naïve\n", ""]
    data = rows_to_bytes(rows)
    assert data == "café – naïve\n \n".encode()
    assert len(data) > len("café – naïve\n \n")  # multi-byte characters stay multi-byte


def test_local_folder_is_memory_mapped(raw_dir):
    data = load_split("valid", raw_dir)
    assert isinstance(data, np.memmap) and data.dtype == np.uint8
    assert len(data) == 1_146_846 and bytes(data[:24]) == b" \n = Homarus gammarus = "


def test_local_errors_name_the_path(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        load_split("valid", tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"wiki\.valid\.raw does not exist"):
        load_split("valid", tmp_path)
    (tmp_path / "wiki.valid.raw").write_bytes(b"")
    with pytest.raises(UsageError, match=r"wiki\.valid\.raw is empty"):
        load_split("valid", tmp_path)
    with pytest.raises(UsageError, match="split must be one of"):
        load_split("dev", tmp_path)
    with pytest.raises(UsageError, match="is a folder"):
        load_bytes_file(tmp_path)


def test_windows_follow_the_evaluation_protocol():
    data = np.arange(50, dtype=np.uint8)
    assert num_windows(data, 8) == 6  # (50 - 1) // 8
    batches = list(window_batches(data, 8, batch_size=4))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (6, 8)
    assert x[2].tolist() == list(range(16, 24)) and y[2].tolist() == list(range(17, 25))
    assert len(list(window_batches(data, 8, 4, max_chunks=5))) == 2


def test_epoch_offsets_cover_the_data_once_and_repeat_by_seed():
    a = epoch_offsets(10_001, 100, epoch=0, seed=3)
    assert np.array_equal(a, epoch_offsets(10_001, 100, epoch=0, seed=3))
    assert not np.array_equal(a, epoch_offsets(10_001, 100, epoch=1, seed=3))
    starts = np.sort(a)
    assert np.all(np.diff(starts) == 100)  # non-overlapping, consecutive windows
    assert starts[-1] + 101 <= 10_001 and len(a) >= 99


@pytest.mark.parametrize(
    "n_bytes, seq_len, batch",
    [(390, 32, 4), (33, 32, 1), (64 * 9 + 5, 64, 3), (1000, 7, 16), (10_001, 100, 8)],
)
def test_every_step_of_an_epoch_trains_a_whole_batch(n_bytes, seq_len, batch):
    """An epoch's random shift can leave fewer windows than steps x batch (390 bytes in windows of
    32: 12 windows unshifted, 11 after a shift of 6 or more); the last batch then wraps round to the
    epoch's start: every step has exactly `batch` windows, all inside the data, none twice unless the
    epoch has too few."""
    steps = num_windows(np.zeros(n_bytes), seq_len) // batch
    for epoch in range(40):
        order = epoch_offsets(n_bytes, seq_len, epoch, seed=3)
        batches = [batch_offsets(order, pos, batch) for pos in range(steps)]
        assert all(len(b) == batch for b in batches)
        offsets = np.concatenate(batches)
        assert offsets.min() >= 0 and offsets.max() + seq_len + 1 <= n_bytes
        assert len(set(offsets.tolist())) == min(steps * batch, len(order))


def test_the_order_of_a_corpus_too_large_to_shuffle_takes_positions_too(monkeypatch):
    from dragon_hatchling import data

    monkeypatch.setattr(data, "SHUFFLE_LIMIT", 10)
    order = epoch_offsets(32 * 50 + 7, 32, epoch=1, seed=5)
    assert isinstance(order, data.AffineOrder)
    assert np.array_equal(batch_offsets(order, 3, 4), order[12:16])
    last = len(order) // 4  # the batch that runs past the end of the epoch's order and wraps round
    wrapped = [order[i : i + 1][0] for i in (np.arange(4 * last, 4 * last + 4) % len(order))]
    assert len(order) % 4 and np.array_equal(batch_offsets(order, last, 4), wrapped)


def test_default_path_loads_the_hub_dataset_through_datasets(raw_dir, monkeypatch):
    import datasets

    raw = (raw_dir / "wiki.test.raw").read_bytes()
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": hub_rows(raw)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_split("test")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert data.dtype == np.uint8 and data.tobytes() == raw


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="could not load Salesforce/wikitext.*--data_dir"):
        load_split("valid")


def test_a_device_or_a_pipe_is_not_a_data_file():
    with pytest.raises(UsageError, match="/dev/null is not a regular file"):
        load_bytes_file("/dev/null", what="--data_file")

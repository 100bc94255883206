"""The small scripts of results/ (gpu_runs.py, merging/parts.py, synapses/concepts.py,
several-gpus/scaling.py): what they make, and one line with exit 2 for bad flags and files, before
any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import call_main, load_script
from test_cli import assert_clean_error

RESULTS = Path(__file__).resolve().parent.parent / "results"
MEASURED = RESULTS / "several-gpus" / "measured"


def test_parts_cut_the_text_by_article_into_five_files(tmp_path: Path, raw_dir: Path, capsys):
    """Every byte lands in one part; base is the first half of the articles, and each part keeps
    its last tenth apart."""
    parts = load_script(RESULTS / "merging" / "parts.py")
    text = (raw_dir / "wiki.valid.raw").read_bytes()
    ran = call_main(
        parts.main, ["--train_file", str(raw_dir / "wiki.valid.raw"), "--out_dir", str(tmp_path)], capsys
    )
    assert ran.returncode is None, ran.stderr
    names = ["base.txt", "a.txt", "a.heldout.txt", "b.txt", "b.heldout.txt"]
    assert b"".join((tmp_path / n).read_bytes() for n in names) == text
    assert all((tmp_path / n).read_bytes().startswith(b" = ") for n in names[1:])  # an article's heading
    assert len((tmp_path / "base.txt").read_bytes()) > len(text) // 3


def test_scaling_makes_the_committed_table_again(tmp_path: Path, capsys):
    scaling = load_script(RESULTS / "several-gpus" / "scaling.py")
    out = tmp_path / "scaling.json"
    ran = call_main(
        scaling.main, [str(MEASURED / "ddp1.json"), str(MEASURED / "ddp2.json"), "--out", str(out)], capsys
    )
    assert ran.returncode is None, ran.stderr
    assert json.loads(out.read_text()) == json.loads((MEASURED / "scaling.json").read_text())


ONE, TWO = str(MEASURED / "ddp1.json"), str(MEASURED / "ddp2.json")
TAR = ["--out", "{tmp}/x.tar.gz"]
BAD = [  # (script, argv with {tmp} for the test's folder, what the error must say)
    ("merging/parts.py", ["--train_file", "{tmp}/missing", "--out_dir", "{tmp}/p"], "--train_file"),
    ("merging/parts.py", ["--train_file", "{tmp}/empty", "--out_dir", "{tmp}/p"], "--train_file"),
    ("merging/parts.py", ["--train_file", "{tmp}/one-article.txt", "--out_dir", "{tmp}/p"], "8 articles"),
    (
        "merging/parts.py",
        ["--train_file", "{tmp}/eight-articles.txt", "--out_dir", "{tmp}/file"],
        "--out_dir",
    ),
    ("synapses/concepts.py", ["--data_dir", "{tmp}"], "--data_dir"),
    ("several-gpus/scaling.py", ["{tmp}/missing", TWO, "--out", "{tmp}/o.json"], "argument one"),
    ("several-gpus/scaling.py", [ONE, str(MEASURED / "ddp1.log"), "--out", "{tmp}/o.json"], "--parts ddp"),
    ("several-gpus/scaling.py", ["{tmp}/no-rows.json", TWO, "--out", "{tmp}/o.json"], "--parts ddp"),
    ("several-gpus/scaling.py", [TWO, ONE, "--out", "{tmp}/o.json"], "two"),  # 1 GPU: no all-reduce
    ("several-gpus/scaling.py", [ONE, TWO, "--out", "{tmp}/o.json", "--project", "1"], "--project"),
    ("several-gpus/scaling.py", [ONE, TWO, "--out", "{tmp}"], "--out"),
    ("gpu_runs.py", [*TAR, "bad"], "NAME:GPU:FLAGS"),
    ("gpu_runs.py", [*TAR, "..:0:--recipe reference"], "NAME:GPU:FLAGS"),  # never .gpu/runs/..
    ("gpu_runs.py", [*TAR, "a:x:--recipe reference"], "NAME:GPU:FLAGS"),
    ("gpu_runs.py", [*TAR, "a:0:", "a:1:"], "each NAME once"),
    ("gpu_runs.py", [*TAR, "--only", "b=eval-valid-raw-128", "a:0:"], "--only"),
    ("gpu_runs.py", [*TAR, "--only", "a=eval-everything", "a:0:"], "--only"),
    ("gpu_runs.py", [*TAR, "--deadline", "nan", "a:0:"], "--deadline"),
    ("gpu_runs.py", [*TAR, "--deadline", "-5", "a:0:"], "--deadline"),
    ("gpu_runs.py", [*TAR, "--deadline", "100", "a:0:"], "--train_deadline"),
    ("gpu_runs.py", [*TAR, "--device", "tpu", "a:0:"], "--device"),
    ("gpu_runs.py", [*TAR, "--also", "", "a:0:"], "--also"),
]


@pytest.mark.parametrize("script, argv, needle", BAD)
def test_bad_flags_and_files_are_one_line_before_any_work(
    script, argv, needle, tmp_path, capsys, monkeypatch
):
    (tmp_path / "one-article.txt").write_bytes(b" = A = \nhello\n")
    (tmp_path / "eight-articles.txt").write_bytes(b"".join(b" = A%d = \nhello\n" % i for i in range(8)))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    (tmp_path / "no-rows.json").write_text('{"ddp": [], "device": 1, "date": 1, "torch": 1, "command": 1}')
    module = load_script(RESULTS / script)
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs", raising=False)  # gpu_runs.py's folder
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert_clean_error(call_main(module.main, argv, capsys), needle)
    assert not (tmp_path / "p").exists() and not (tmp_path / "runs").exists()  # nothing was made


NO_FLAGS = ["default-path/compare.py", "epoch-edges/compare.py", "fused/compare.py", "long-context/plot.py",
            "merging/plot.py", "report/report.py", "tbptt/plot.py"]  # fmt: skip


@pytest.mark.parametrize("script", NO_FLAGS)
def test_a_script_without_flags_refuses_any_and_helps(script, capsys, monkeypatch):
    """A flag given to a script that takes none is one line and exit 2 (not ignored while it rewrites
    its figures); --help prints its docstring."""
    module = load_script(RESULTS / script)
    monkeypatch.setattr(module, "table", lambda: pytest.fail("it ran"), raising=False)
    assert_clean_error(call_main(module.main, ["--out", "x"], capsys), "unrecognized arguments: --out x")
    helped = call_main(module.main, ["--help"], capsys)
    assert helped.returncode == 0 and module.__doc__.splitlines()[0] in helped.stdout

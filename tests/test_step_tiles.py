"""results/benchmark/step_tiles.py on the CPU: the candidates it sweeps, how it keeps the fastest, and
its refusals. The timing itself needs a CUDA GPU (`ms_per_step` is replaced here by a fake clock).
Also run_gpu.sh's refusals, which come before it looks for a GPU's work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import call_main, load_script
from test_cli import assert_clean_error

SCRIPT = Path(__file__).resolve().parent.parent / "results/benchmark/step_tiles.py"
RUN_GPU = SCRIPT.parent / "run_gpu.sh"


def test_the_candidates_fit_a_tile_and_keep_every_warp_busy():
    tiles = load_script(SCRIPT)
    att = tiles.attention_tiles({"BB": 16, "GROUP": 16})
    assert att and all(
        a["BP"] * a["BD"] <= 8192 and a["num_warps"] * 32 <= a["BP"] * a["BD"] // 16 for a in att
    )
    assert {a["BD"] for a in att} == {32, 64, 128, 256} and all(a["BB"] == 16 for a in att)
    gate = tiles.gate_tiles({"GROUP": 32})
    assert gate and all(g["BN"] * g["BD"] <= 128 * 128 and g["GROUP"] == 32 for g in gate)
    assert {g["BD"] for g in gate} == {64, 128, 256}  # whole rows of d = 256 among them
    assert len(tiles.group_pairs({}, {})) == 9


def test_the_sweep_keeps_the_fastest_tiles_that_give_the_right_logits(tmp_path: Path, monkeypatch):
    """Each stage keeps the fastest of its candidates; a tile that fails, or whose logits are wrong,
    is never kept; every row is in step_tiles.json as soon as it is timed."""
    tiles = load_script(SCRIPT)
    monkeypatch.setattr(tiles, "prepared", lambda path: ("model", "state", "byte", "reference"))
    monkeypatch.setattr(tiles, "FusedStep", lambda model, att, gate: (att, gate))  # the tiles as the step

    def fake_ms(model, state0, byte, step, reference, lazy):
        att, gate = step
        if att["BD"] == 256:
            raise RuntimeError("out of shared memory")  # the GPU cannot take it
        ms = (
            att["BP"] / att["BD"]
            + att["BP"] / 1e4
            + gate["BN"] / 100
            + att.get("GROUP", 0) / 1000
            - gate.get("GROUP", 0) / 1000
        )
        wrong = att["BP"] == 16 and att["BD"] == 128  # the fastest attention tile gives wrong logits
        return ms, 0.5 if wrong else 1e-3

    monkeypatch.setattr(tiles, "ms_per_step", fake_ms)
    monkeypatch.setattr(
        tiles.FusedStep,
        "ATTENTION_TILES",
        {"BB": 16, "BP": 32, "BD": 64, "GROUP": 16, "num_warps": 2},
        raising=False,
    )
    monkeypatch.setattr(
        tiles.FusedStep, "GATE_TILES", {"BN": 128, "BD": 128, "GROUP": 32, "num_warps": 2}, raising=False
    )
    sweep = tiles.Sweep("model", tmp_path)
    att, gate = sweep.fastest()
    assert (att["BP"], att["BD"], att["GROUP"]) == (16, 64, 8)  # not 16 x 128 (wrong), not 256 (failed)
    assert (gate["BN"], gate["GROUP"]) == (64, 32)
    rows = json.loads((tmp_path / "step_tiles.json").read_text())["rows"]
    assert len(rows) == len(sweep.rows) == 1 + len(tiles.attention_tiles({})) + len(tiles.gate_tiles({})) + 9
    assert any(r["ms"] is None for r in rows) and rows[0]["note"] == "default tiles"


def test_bad_flags_are_one_line(tmp_path: Path, capsys):
    tiles = load_script(SCRIPT)
    assert_clean_error(call_main(tiles.main, ["--out", str(tmp_path)], capsys), "--model_path")
    ran = call_main(tiles.main, ["--model_path", "x", "--out", str(tmp_path)], capsys)
    assert_clean_error(ran, "CUDA")  # this machine has none: refused before the model is loaded


@pytest.mark.parametrize(
    "args, env, says",
    [
        ([], {}, "usage: bash results/benchmark/run_gpu.sh tiles|latency|train"),
        (["sweep"], {}, "usage:"),
        (["latency"], {"GPU": "no"}, "no nvidia-smi here"),
        (["latency"], {"OUT": ""}, "OUT is not set"),
        (["tiles"], {"TILES_S": "4m"}, "TILES_S=4m: expected whole seconds"),
        (["latency"], {}, ".gpu/data/wiki.valid.raw is missing or empty: carry .gpu/data"),
    ],
)
def test_the_gpu_script_refuses_bad_input_in_one_line(args, env, says, tmp_path: Path):
    """Each refusal is one line and exit 2, before any work (here: a folder with no .gpu/data)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if env.pop("GPU", "yes") == "yes":  # a stand-in nvidia-smi: found on the PATH, never run here
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    ran = subprocess.run(["bash", str(RUN_GPU), *args], cwd=tmp_path, env={**os.environ, **base, **env},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 2 and ran.stdout == ""
    assert says in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

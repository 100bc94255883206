"""The Hub both ways, against the local server, and every checkpoint format."""

import json
import math
import os
import pickle
import signal
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

import evaluate
from conftest import HF_TOKEN, _free_port, call_main, run_script, tiny_run
from dragon_hatchling import hub, hub_client
from dragon_hatchling.cli import UsageError
from dragon_hatchling.data import load_split
from dragon_hatchling.loading import load_model
from dragon_hatchling.scoring import evaluate_loss
from model import BDH, BDHConfig
from test_cli import assert_clean_error


def fixture_spec(shared):
    return json.loads((shared / "fixtures" / "legacy" / "fixtures.json").read_text())


@pytest.mark.parametrize("name", ["seed_format", "official_format"])
def test_legacy_checkpoints_reproduce_their_original_logits_and_loss(shared, raw_dir, name):
    legacy = shared / "fixtures" / "legacy"
    spec = fixture_spec(shared)[f"{name}.pt"]
    model, info = load_model(str(legacy / f"{name}.pt"), n_layer=spec["n_layer"])
    assert info["format"] == "legacy .pt"
    assert (model.config.n_embd, model.config.n_head, model.config.n_neurons) == (
        spec["n_embd"],
        spec["n_head"],
        spec["n_neurons"],
    )
    expected = load_file(legacy / f"{name}.expected.safetensors")
    logits, _ = model.eval()(expected["idx"])
    assert (logits - expected["logits"]).abs().max().item() < 1e-4
    w = spec["windowed_valid_loss"]
    loss, _ = evaluate_loss(
        model, load_split("valid", raw_dir), w["seq_len"], 4, torch.device("cpu"), max_chunks=w["max_chunks"]
    )
    assert loss == pytest.approx(w["loss"], abs=1e-4)


def test_convert_a_legacy_checkpoint(shared, tmp_path):
    legacy = shared / "fixtures" / "legacy"
    out = tmp_path / "converted"
    result = run_script(
        "-m", "dragon_hatchling.hub", "convert", str(legacy / "seed_format.pt"), str(out), "--n_layer", "2"
    )
    assert result.returncode == 0, result.stderr
    model = BDH.from_pretrained(out)
    assert model.config.rope_style == "half" and model.config.rope_theta == 10000.0
    expected = load_file(legacy / "seed_format.expected.safetensors")
    assert (model.eval()(expected["idx"])[0] - expected["logits"]).abs().max().item() < 1e-4


def test_files_of_no_known_format_are_refused_clearly(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="unrecognised state dict.*expected reference report: decoder_x"):
        load_model(str(tmp_path / "other.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="not a readable PyTorch state dict"):
        load_model(str(tmp_path / "broken.pt"))
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed beside the error's one line
        with pytest.raises(UsageError, match="not a readable PyTorch state dict: corrupted, or more than"):
            load_model(str(tmp_path / "pickled.pt"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="expected a .pt state dict"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UsageError, match="no file, folder or Hub repo id"):
        load_model("./not/here")


class Payload:  # a pickled object: weights_only=True must refuse to run its code
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pt_files_are_loaded_with_weights_only(tmp_path, capsys):
    torch.save({"evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="not a readable PyTorch state dict"):
        load_model(str(tmp_path / "evil.pt"))
    assert "unpickled code ran" not in capsys.readouterr().out


def test_a_run_pushes_and_loads_back_with_the_same_metrics(hub, tmp_path, small_data_dir):
    out = tmp_path / "run"
    train = tmp_path / "train.txt"
    train.write_bytes((small_data_dir / "wiki.train.raw").read_bytes()[:1_000])  # 7 steps an epoch
    flags = "--epochs 2 --eval_every 100 --batch_size 4 --seq_len 32 --warmup_steps 2"
    push = "--push_to_hub --hf_repo_id tester/tiny-bdh --push_every_epoch"
    result = run_script(*tiny_run(small_data_dir, out, f"{flags} {push}"), "--train_file", str(train))
    assert result.returncode == 0, result.stderr
    assert len(hub.state.repos["tester/tiny-bdh"].commits) == 3  # creation, epoch 1, the end
    assert HF_TOKEN not in result.stdout + result.stderr
    assert any(HF_TOKEN in auth for _, _, auth in hub.state.requests)  # the token was used, not shown
    _, files = hub.state.repos["tester/tiny-bdh"].snapshot("main")
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "log.csv",
        "metrics.json",
        "loss.png",
        "bpb.png",
        "lr.png",
    } <= set(files)
    assert "training_state.pt" not in files
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: dragon-hatchling" in card
    assert "Salesforce/wikitext" in card and "model-index" in card and "![loss](loss.png)" in card
    assert "half-lives of 8, 256 bytes (one a head)" in card and "| validation windows | 128 bytes |" in card

    metrics = json.loads((out / "metrics.json").read_text())
    local = BDH.from_pretrained(out / "checkpoints" / "best")
    remote = BDH.from_pretrained("tester/tiny-bdh")
    assert remote.config == local.config
    for (name, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    ev = tmp_path / "eval"
    result = run_script(
        "evaluate.py",
        "--model_path",
        "tester/tiny-bdh",
        "--data_dir",
        str(small_data_dir),
        "--seq_len",
        "128",  # the validation protocol
        "--device",
        "cpu",
        "--out_dir",
        str(ev),
        "--no_plots",
    )
    assert result.returncode == 0, result.stderr
    got = json.loads((ev / "metrics.json").read_text())
    assert got["loss"] == pytest.approx(metrics["best_val_loss"], abs=1e-5)
    assert got["model_source"]["format"] == "dragon-hatchling"


def test_reference_layout_repo_newest_epoch_and_revisions(hub, shared, raw_dir):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/seed-layout", exist_ok=True)
    seed = shared / "fixtures" / "legacy" / "seed_format.pt"
    older = {k: v * 0.5 for k, v in torch.load(seed, weights_only=True).items()}
    buf = __import__("io").BytesIO()
    torch.save(older, buf)
    api.upload_file(
        path_or_fileobj=buf.getvalue(), path_in_repo="model_epoch_1.pt", repo_id="tester/seed-layout"
    )
    first = hub.state.repos["tester/seed-layout"].snapshot("main")[0]
    api.upload_file(path_or_fileobj=str(seed), path_in_repo="model_epoch_2.pt", repo_id="tester/seed-layout")

    valid = load_split("valid", raw_dir)
    spec = fixture_spec(shared)["seed_format.pt"]["windowed_valid_loss"]

    def loss_of(**kw) -> float:
        model, info = load_model("tester/seed-layout", n_layer=2, **kw)
        return evaluate_loss(
            model, valid, spec["seq_len"], 8, torch.device("cpu"), max_chunks=spec["max_chunks"]
        )[0], info

    newest, info = loss_of()
    assert info["file"] == "model_epoch_2.pt" and newest == pytest.approx(spec["loss"], abs=1e-4)
    chosen, info = loss_of(checkpoint="model_epoch_1.pt")
    assert info["file"] == "model_epoch_1.pt" and not math.isclose(chosen, newest, abs_tol=1e-3)
    pinned, info = loss_of(revision=first)  # at that commit only epoch 1 existed
    assert info["file"] == "model_epoch_1.pt" and pinned == pytest.approx(chosen, abs=1e-6)
    with pytest.raises(UsageError, match="--checkpoint model_epoch_9.pt is not in Hub repo"):
        load_model("tester/seed-layout", checkpoint="model_epoch_9.pt")
    with pytest.raises(UsageError, match="no such Hub repo"):
        load_model("tester/does-not-exist")


def test_a_failed_push_keeps_the_run_and_says_how_to_push_later(hub, tmp_path, small_data_dir):
    out = tmp_path / "run"
    dead = f"http://127.0.0.1:{_free_port()}"
    flags = "--max_steps 6 --eval_every 6 --batch_size 4 --seq_len 32 --warmup_steps 2"
    push = "--push_to_hub --hf_repo_id tester/later"
    result = run_script(*tiny_run(small_data_dir, out, f"{flags} {push}"), env={"HF_ENDPOINT": dead})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and HF_TOKEN not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "push to the Hub failed" in lines[0]
    later = f"python -m dragon_hatchling.hub push {out} --hf_repo_id tester/later"
    assert later in lines[0]
    for name in ("log.csv", "metrics.json", "loss.png", "checkpoints/best/model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["finished"] is True

    again = run_script(*later.split()[1:])  # the printed command works once the Hub is back
    assert again.returncode == 0, again.stderr
    assert "model.safetensors" in hub.state.repos["tester/later"].snapshot("main")[1]


def test_push_needs_a_repo_id(small_data_dir, tmp_path):
    result = run_script(
        "experiment.py",
        "--data_dir",
        str(small_data_dir),
        "--push_to_hub",
        "--out_dir",
        str(tmp_path / "r"),
        timeout=60,
    )
    assert result.returncode == 2 and "--hf_repo_id" in result.stderr and "Traceback" not in result.stderr


def test_convert_keeps_the_attention_decay(tmp_path, capsys):
    """Converting a checkpoint of this project keeps every field of its config, the decay too."""
    torch.manual_seed(0)
    cfg = BDHConfig(n_embd=16, n_head=2, n_neurons=32, n_layer=2, half_lives=[4.0, 64.0])
    BDH(cfg).save_pretrained(tmp_path / "ours")
    result = call_main(hub.main, ["convert", str(tmp_path / "ours"), str(tmp_path / "out")], capsys)
    assert result.returncode == 0, result.stderr
    assert BDH.from_pretrained(tmp_path / "out").config == cfg


# A Hub that accepts connections and never answers: every call ends by itself, with one line.
SILENT = {"BDH_HUB_TIMEOUT": "1", "BDH_HUB_DEADLINE": "4"}


def hub_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) <= 2, stderr  # the error, and at most one retry line
    assert all("retrying" in line for line in lines[:-1]), stderr
    return lines


def test_a_push_to_a_hub_that_never_answers_ends_with_one_line(silent_hub, tmp_path, small_data_dir):
    run = tmp_path / "run"
    flags = "--max_steps 4 --eval_every 4 --batch_size 4 --seq_len 32 --warmup_steps 2"
    env = {**SILENT, "HF_ENDPOINT": silent_hub.url}
    push = ["--push_to_hub", "--hf_repo_id", "u/n"]
    pushed = run_script(*tiny_run(small_data_dir, run, flags), *push, env=env, timeout=120)
    assert (
        pushed.returncode == 1
        and "push later with: uv run python -m dragon_hatchling.hub push" in hub_lines(pushed.stderr)[-1]
    )
    assert json.loads((run / "metrics.json").read_text())["finished"]
    before = sorted((p.name, p.stat().st_size) for p in run.rglob("*") if p.is_file())
    started = time.time()
    again = run_script(
        "-m", "dragon_hatchling.hub", "push", str(run), "--hf_repo_id", "u/n", env=env, timeout=120
    )
    line = hub_lines(again.stderr)[-1]
    assert again.returncode == 1 and ("ReadTimeout" in line or "did not answer within 4 s" in line), line
    assert time.time() - started < 60  # a request waits 1 s, the whole push at most 4
    assert sorted((p.name, p.stat().st_size) for p in run.rglob("*") if p.is_file()) == before


def test_loading_from_a_hub_that_never_answers_ends_with_one_line(silent_hub, small_data_dir):
    env = {**SILENT, "HF_ENDPOINT": silent_hub.url}
    args = ["--model_path", "u/n", "--data_dir", str(small_data_dir), "--device", "cpu"]
    result = run_script("evaluate.py", *args, env=env, timeout=120)
    assert result.returncode == 1 and "--model_path u/n" in hub_lines(result.stderr)[-1], result.stderr


def test_ctrl_c_while_pushing_says_how_to_push_later(silent_hub, tmp_path, small_data, capsys):
    import experiment
    from test_reliability import start

    run = tmp_path / "run"
    flags = "--max_steps 2 --eval_every 2 --batch_size 4 --seq_len 32"
    assert call_main(experiment.main, tiny_run(small_data, run, flags)[1:], capsys).returncode == 0
    proc = start(["-m", "dragon_hatchling.hub", "push", str(run), "--hf_repo_id", "u/n"],
                 env={**os.environ, "HF_ENDPOINT": silent_hub.url, "BDH_HUB_DEADLINE": "300"})  # fmt: skip
    deadline = time.time() + 120
    while silent_hub.connections == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # past the imports: the push waits for the Hub
    assert silent_hub.connections > 0, proc.communicate(timeout=5)[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "push to the Hub interrupted" in err and "push later with" in err


def test_offline_a_model_in_the_local_cache_loads(hub, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: a repo already in the cache loads from there, with no call to the Hub."""
    from huggingface_hub import constants

    model = BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=32, n_layer=1, half_lives=[3.0, 30.0]))
    model.push_to_hub("tester/offline-bdh")
    load_model("tester/offline-bdh")  # online: fills the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded, info = load_model("tester/offline-bdh")
    assert loaded.config == model.config and info["from"] == "the local cache (offline)"
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set and the local cache does not hold"):
        load_model("tester/never-downloaded")


def test_retries_print_one_line(capsys):
    """The client logs two lines for each of its retries (a dozen for one failing call): one is shown."""
    import logging

    logger = logging.getLogger("huggingface_hub.utils._http")
    hub_client._OneRetryLine.said = False
    for attempt in range(1, 6):
        logger.warning("HTTP Error 503 thrown while requesting GET http://hub/api/models/u/n")
        logger.warning(f"Retrying in {2**attempt}s [Retry {attempt}/5].")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"the Hub did not answer; retrying for up to {hub_client.HUB_DEADLINE:.0f} s"]


def test_pushing_what_is_not_a_finished_run_is_bad_input(tmp_path, capsys):
    from test_cli import assert_clean_error

    for where in (tmp_path / "nowhere", tmp_path):
        result = call_main(hub.main, ["push", str(where), "--hf_repo_id", "u/n"], capsys)
        assert_clean_error(result, "is not a finished run folder")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_hub_time_limit_that_is_not_seconds_is_refused_before_any_work(value, capsys, monkeypatch):
    """BDH_HUB_TIMEOUT and BDH_HUB_DEADLINE are read when the module is imported: a bad one is kept
    out of the client and refused by every command's parser, one line and exit 2."""
    monkeypatch.setenv("BDH_HUB_DEADLINE", value)
    assert hub_client.env_seconds("BDH_HUB_DEADLINE") is None
    ran = call_main(evaluate.main, ["--model_path", "someone/model", "--device", "cpu"], capsys)
    assert_clean_error(ran, f"BDH_HUB_DEADLINE={value!r}: expected seconds")
    monkeypatch.setenv("BDH_HUB_DEADLINE", "0.5")
    assert hub_client.env_seconds("BDH_HUB_DEADLINE") == 0.5 and hub_client.env_problem() is None

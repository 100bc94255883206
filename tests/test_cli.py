"""Bad command-line input: one line naming the argument, exit code 2, never a traceback."""

import csv
import json

import pytest

import evaluate
import experiment
from conftest import REPO, TINY_MODEL, call_main, require_shared, run_script
from dragon_hatchling import benchmark, run_setup
from dragon_hatchling.cli import UsageError
from model import BDH, BDHConfig


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
        (["--n_head", "1000000000"], ["divisible by n_head (1000000000)"]),  # no half-life a head drawn first
        (["--n_head", "1000000000", "--half_lives", "8"], ["divisible by n_head (1000000000)"]),
        (["--bogus_flag"], ["--bogus_flag"]),
        (["--half_lives", "8,16,32"], ["half_lives", "2 positive numbers"]),
        (["--half_lives", "8,soon"], ["--half_lives", "8,soon"]),
        (["--half_lives", "0"], ["--half_lives", "positive"]),
        (["--learn_decay", "--half_lives", "none"], ["learn_decay", "half_lives"]),
        (["--learn_decay", "yes"], ["yes"]),
        (["--shifted_heads", "3"], ["shifted_heads", "[0, n_head = 2]"]),
        (["--shifted_heads", "1", "--carry_state"], ["--shifted_heads 1", "--carry_state"]),
        (["--recipe", "fast"], ["--recipe", "fast"]),
        (["--recipe", "shifted-copy", "--carry_state"], ["--shifted_heads 2", "--recipe shifted-copy's"]),
        (["--recipe", "shifted-copy", "--n_head", "1"], ["shifted_heads", "[0, n_head = 1]"]),
        (["--recipe", "shifted-copy", "--half_lives", "none"], ["learn_decay needs", "--recipe shifted"]),
        (["--recipe", "shifted-copy", "--min_lr", "0.003"], ["--min_lr 0.003 is above --lr 0.002"]),
        (["--weight_decay", "1e308"], ["--lr 0.001 times --weight_decay 1e+308 must be below 1"]),
        (["--lr", "10"], ["--lr 10.0 times --weight_decay 0.1"]),
        (["--lr", "1e308", "--weight_decay", "0"], ["--lr 1e+308", "float32"]),
        (["--val_fraction", "0.5"], ["--val_fraction applies to --dataset"]),
        (["--hf_private"], ["--hf_private applies to --push_to_hub"]),
        (["--accept_new_data"], ["--accept_new_data applies to --resume"]),
        (["--data_cache", "elsewhere"], ["--data_cache applies to --dataset"]),
        (["--eval_seq_len", "0"], ["--eval_seq_len", "positive"]),
        (["--dist_timeout", "1e300"], ["--dist_timeout", "a week"]),
    ],
)
def test_experiment_rejects_bad_values(args, needles, small_data_dir, tmp_path, capsys):
    data = [] if "--data_dir" in args else ["--data_dir", str(small_data_dir)]
    argv = [*data, *TINY_MODEL, "--max_steps", "1", "--out_dir", str(tmp_path / "run"), *args]
    assert_clean_error(call_main(experiment.main, argv, capsys), *needles)
    assert not (tmp_path / "run" / "log.csv").exists()


def test_split_shorter_than_one_window(tmp_path, small_data_dir, capsys):
    (small_data_dir / "wiki.valid.raw").write_bytes(b"tiny")
    argv = ["--data_dir", str(small_data_dir), *TINY_MODEL, "--out_dir", str(tmp_path / "run")]
    result = call_main(experiment.main, argv, capsys)
    assert_clean_error(result, "valid", "shorter than one window of --eval_seq_len + 1 = 129 bytes")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model_path", "/nonexistent/model"], ["--model_path", "/nonexistent/model"]),
        (["--max_chunks", "0"], ["--max_chunks"]),
        (["--split", "dev"], ["--split"]),
        (["--prompt", "a", "--context", "1"], ["--context", "at least 2"]),
        (["--context", "-3"], ["--context"]),
        (["--stream", "--max_chunks", "3"], ["--max_chunks", "--stream"]),
        (["--stream", "--shifts", "2"], ["--shifts", "--stream"]),
        (["--seq_len", "64", "--shifts", "65"], ["--shifts 65", "at most --seq_len 64"]),
        (["--chunk_size", "0"], ["--chunk_size", "positive"]),
        (["--temperature", "nan", "--prompt", "a"], ["--temperature"]),
        (["--revision", "main"], ["--revision main picks a Hub revision", "is local"]),
        (["--top_k", "257", "--prompt", "a"], ["--top_k 257: expected at most 256"]),
        (["--temperature", "0.5"], ["--temperature applies to --prompt"]),
        (["--max_new_bytes", "9"], ["--max_new_bytes applies to --prompt"]),
        (["--synapse_layer", "1"], ["--synapse_layer applies to --synapse_graph"]),
        (["--init_seed", "3"], ["--init_seed applies to --neuron_graph or --synapse_graph"]),
    ],
)
def test_evaluate_rejects_bad_values(args, needles, small_data_dir, capsys):
    base = ["--data_dir", str(small_data_dir), "--device", "cpu"]
    if "--model_path" not in args:
        base += ["--model_path", str(REPO)]
    assert_clean_error(call_main(evaluate.main, [*base, *args], capsys), *needles)


def test_a_bad_model_path_fails_before_the_hubs_split_is_awaited(tmp_path, capsys, monkeypatch):
    """Without --data_dir the split comes from the Hub (minutes, offline): the model is checked first."""
    monkeypatch.setattr(evaluate, "load_split", lambda *a: pytest.fail("the split was loaded first"))
    for path, says in ((tmp_path, "no checkpoint in this folder"), ("a/b/c", "is no file, folder or Hub")):
        argv = ["--device", "cpu", "--model_path", str(path), "--out_dir", str(tmp_path / "out")]
        assert_clean_error(call_main(evaluate.main, argv, capsys), f"--model_path {path}", says)


def test_checkpoint_is_refused_where_the_model_path_is_one_checkpoint(tmp_path, small_data_dir, capsys):
    folder = tmp_path / "checkpoint"
    BDH(BDHConfig(n_embd=32, n_head=2, n_neurons=128, n_layer=1)).save_pretrained(folder)
    for path in (folder, folder / "model.safetensors"):
        argv = [
            "--data_dir",
            str(small_data_dir),
            "--device",
            "cpu",
            "--model_path",
            str(path),
            "--checkpoint",
            "last",
        ]
        result = call_main(evaluate.main, argv, capsys)
        assert_clean_error(result, "--checkpoint last picks one of a run folder", "is one checkpoint already")


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
        "--recipe",
        "--half_lives",
        "--eval_seq_len",
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
        (["--paths", "fused,magic"], ["--paths", "fused,magic"]),
        (["--half_lives", "8,16"], ["--half_lives", "4 positive numbers"]),
        (["--parts", "train", "--model_path", "m"], ["--model_path applies to generation"]),
        (["--parts", "train,long", "--previous_step", "f.py"], ["--previous_step applies to generation"]),
        (["--parts", "latency", "--previous_step", "f.py"], ["--previous_step applies to generation"]),
        (["--parts", "latency", "--model_path", "/nonexistent/m"], ["--model_path", "/nonexistent/m"]),
    ],
)
def test_benchmark_rejects_bad_values(args, needles, capsys):
    assert_clean_error(call_main(benchmark.main, args, capsys), *needles)


@pytest.mark.parametrize("parts", ["generate", "latency"])
def test_benchmark_refuses_a_model_its_fused_step_cannot_run(parts, tmp_path, capsys):
    """A BDH with shifted heads, before any timing (here: before even looking for CUDA)."""
    cfg = BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=1, half_lives=[4.0, 8.0], shifted_heads=1)
    BDH(cfg).save_pretrained(tmp_path / "m")
    result = call_main(benchmark.main, ["--parts", parts, "--model_path", str(tmp_path / "m")], capsys)
    assert_clean_error(result, f"--model_path {tmp_path / 'm'}", "no shifted heads")


def recipe_of(argv: list[str], saved: dict | None = None) -> tuple:
    args = experiment.build_parser().parse_args([*TINY_MODEL, *argv])  # two heads
    run_setup.apply_recipe(args, saved)
    return args.recipe, args.batch_size, args.seq_len, args.half_lives, args.eval_seq_len


def test_the_default_recipe_is_long_context_and_the_reference_is_one_flag_away():
    assert recipe_of([]) == ("long-context", 8, 512, [8.0, 256.0], 128)  # the 4-head curve at 2 heads
    assert recipe_of(["--recipe", "reference"]) == ("reference", 32, 128, None, 128)
    assert recipe_of(["--recipe", "reference", "--half_lives", "16"]) == (
        "reference",
        32,
        128,
        [16.0] * 2,
        128,
    )
    assert recipe_of(["--half_lives", "none", "--seq_len", "64"]) == ("long-context", 8, 64, None, 128)
    assert run_setup.recipe_half_lives([8.0, 32.0, 128.0, 256.0], 4) == [8.0, 32.0, 128.0, 256.0]


def recipe_flags(argv: list[str], saved: dict | None = None, model: list[str] = TINY_MODEL) -> tuple:
    args = experiment.build_parser().parse_args([*model, *argv])  # two heads
    run_setup.apply_recipe(args, saved)
    names = ("batch_size", "seq_len", "half_lives", "lr", "learn_decay", "shifted_heads", "copy_spans")
    return tuple(getattr(args, name, None) for name in names)


def test_the_shifted_copy_recipe_is_round_12s_winner_and_each_of_its_flags_can_be_undone():
    # results/tbptt round 12: --batch_size 2 --seq_len 2048 --half_lives 8,64,512,4096 --lr 2e-3
    # --learn_decay --copy_spans 1 --shifted_heads 2 (two heads here: the curve's ends)
    assert recipe_flags(["--recipe", "shifted-copy"]) == (2, 2048, [8.0, 4096.0], 2e-3, True, 2, 1.0)
    undone = ["--no-learn_decay", "--shifted_heads", "0", "--lr", "1e-3", "--copy_spans", "0"]
    undone_flags = recipe_flags(["--recipe", "shifted-copy", *undone])
    assert undone_flags == (2, 2048, [8.0, 4096.0], 1e-3, False, 0, 0.0)
    assert recipe_flags([]) == (8, 512, [8.0, 256.0], 1e-3, False, 0, 0.0)  # the default: none of it
    assert recipe_flags(["--learn_decay", "--shifted_heads", "1"])[4:6] == (True, 1)
    # a GPT takes the recipe's windows, learning rate and copies, not BDH's heads
    gpt_model = ["--n_embd", "32", "--n_layer", "2"]
    gpt = recipe_flags(["--recipe", "shifted-copy", "--arch", "gpt"], model=gpt_model)
    assert gpt == (2, 2048, None, 2e-3, None, None, 1.0)
    with pytest.raises(UsageError, match="--learn_decay is not a flag of --arch gpt"):
        recipe_flags(["--recipe", "shifted-copy", "--arch", "gpt", "--learn_decay"], model=[])
    # a run saved before these flags: the paper's model, whatever the recipe now says
    saved = {"recipe": "shifted-copy", "batch_size": 4, "seq_len": 32, "lr": 5e-4, "half_lives": None}
    assert recipe_flags([], saved) == (4, 32, None, 5e-4, False, 0, 0.0)


def test_a_resumed_run_keeps_its_own_recipe():
    saved = {"recipe": "reference", "batch_size": 32, "seq_len": 128, "half_lives": None, "eval_seq_len": 128}
    assert recipe_of([], saved) == ("reference", 32, 128, None, 128)
    # a run from before --recipe, --half_lives and --eval_seq_len: the reference's, validated in its windows
    assert recipe_of([], {"batch_size": 4, "seq_len": 32}) == ("reference", 4, 32, None, 32)


@pytest.mark.parametrize(
    "recipe, lives, shifted, window",
    [("long-context", [8.0, 256.0], 0, 8 * 512), ("shifted-copy", [8.0, 4096.0], 2, 2 * 2048)],
)
def test_a_run_of_a_recipe_records_it_and_resumes_without_flags(
    recipe, lives, shifted, window, small_data, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = [
        "--data_dir",
        str(small_data),
        *TINY_MODEL,
        "--device",
        "cpu",
        "--max_steps",
        "2",
        "--no_progress",
    ]
    given = [] if recipe == "long-context" else ["--recipe", recipe]  # the default
    assert call_main(experiment.main, [*argv, *given, "--out_dir", str(run)], capsys).returncode == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["args"]["recipe"] == recipe and metrics["config"]["shifted_heads"] == shifted
    assert metrics["args"]["half_lives"] == lives and metrics["bytes_trained"] == 2 * window
    resumed = call_main(experiment.main, [*argv, "--out_dir", str(run), "--resume", "auto"], capsys)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--fused"], ["--fused", "CUDA", "cpu"]),
        (["--min_lr", "0.01", "--lr", "0.001"], ["--min_lr 0.01 is above --lr 0.001"]),
        (["--n_neurons", str(2**40)], ["needs at least", "GB", "free"]),
        (["--n_neurons", "4096", "--batch_size", str(2**22), "--seq_len", "1024"], ["needs at least"]),
    ],
)
def test_experiment_refuses_what_cannot_run_before_any_work(args, needles, small_data_dir, tmp_path, capsys):
    argv = [
        "--data_dir",
        str(small_data_dir),
        *TINY_MODEL,
        "--device",
        "cpu",
        "--out_dir",
        str(tmp_path / "r"),
    ]
    assert_clean_error(call_main(experiment.main, [*argv, *args], capsys), *needles)
    assert not (tmp_path / "r" / "log.csv").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--temperature", "inf", "--prompt", "a"], ["--temperature", "finite"]),
        (["--max_new_bytes", str(10**9), "--prompt", "a"], ["--max_new_bytes", "more than"]),
        (["--prompt", "a", "--prompt", ""], ["--prompt", "empty string"]),
    ],
)
def test_evaluate_refuses_sampling_it_cannot_do(args, needles, small_data_dir, capsys):
    argv = ["--data_dir", str(small_data_dir), "--device", "cpu", "--model_path", str(REPO), *args]
    assert_clean_error(call_main(evaluate.main, argv, capsys), *needles)


def test_evaluate_refuses_windows_that_cannot_fit(small_data_dir, tmp_path, capsys, monkeypatch):
    """The memory scoring needs, estimated from the model before any work, against what is free."""
    from dragon_hatchling import devices
    from model import BDH, BDHConfig

    BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=2)).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(devices, "available_memory", lambda device: 1_000_000)  # a small device: 1 MB
    argv = ["--data_dir", str(small_data_dir), "--device", "cpu", "--model_path", str(tmp_path / "m")]
    result = call_main(evaluate.main, [*argv, "--seq_len", "3000", "--out_dir", str(tmp_path / "e")], capsys)
    assert_clean_error(result, "scoring this model needs at least", "0.0 GB free")
    # a state for each of 400 prompts: 400 x L x n x d float32 = 13 MB, more than the 1 MB free
    many = [arg for _ in range(400) for arg in ("--prompt", "a")]
    result = call_main(evaluate.main, [*argv, "--seq_len", "8", *many], capsys)
    assert_clean_error(result, "sampling 400 prompt(s) side by side needs at least")


def test_learned_half_lives_train_without_weight_decay_and_are_logged(small_data_dir, tmp_path, capsys):
    model = BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=64, half_lives=[8.0, 64.0], learn_decay=True))
    groups = run_setup.parameter_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[1]["params"] == [
        model.log2_half_lives
    ]
    run = tmp_path / "run"
    argv = ["--data_dir", str(small_data_dir), *TINY_MODEL, "--device", "cpu", "--max_steps", "3",
            "--eval_every", "3", "--lr", "0.05", "--no_progress", "--learn_decay"]  # fmt: skip
    argv += ["--out_dir", str(run)]
    done = call_main(experiment.main, argv, capsys)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["learn_decay"] is True and ", now " in metrics["shape"]  # the run card's line
    rows = list(csv.DictReader((run / "log.csv").open()))
    lives = [[float(t) for t in row["half_lives"].split()] for row in rows if row["half_lives"]]
    assert len(lives) == 1 and len(lives[0]) == 2 and lives[0] != [8.0, 256.0]  # moved from the recipe's


def test_a_python_file_named_by_a_flag_imports_or_fails_in_one_line(tmp_path):
    """cli.module_from_file (--previous_step, --before, --bdh_py): a dataclass in the file works (the
    module is registered); a missing file, another kind of file, or one that fails to import is a
    UsageError naming the flag and the file, and leaves no half-imported module behind."""
    import sys

    from dragon_hatchling.cli import UsageError, module_from_file

    good = tmp_path / "good.py"
    good.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass C:\n    n: int = 3\n")
    assert module_from_file(good, "good_module", "--flag").C().n == 3
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("x = 1\n")
    for path, needle in [(tmp_path / "absent.py", "expected a copy of it"), (notes, "expected a copy of it"),
                         (broken, "could not be imported (RuntimeError: no GPU here)")]:  # fmt: skip
        with pytest.raises(UsageError) as caught:
            module_from_file(path, "half_module", "--flag", "a copy of it")
        assert str(caught.value).startswith(f"--flag {path}: ") and needle in str(caught.value)
        assert "\n" not in str(caught.value) and "half_module" not in sys.modules

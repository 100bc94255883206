"""Every load is strict: a checkpoint whose config.json lacks a field or has one of the wrong type,
or whose model.safetensors lacks a tensor or has one of another shape or dtype, is refused with one
line naming it (exit 2), never loaded half-initialised. The cases are searched, not listed: every
field of each architecture's config, every tensor of its model."""

import json
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
from conftest import call_main
from dragon_hatchling import hub
from dragon_hatchling.architectures import LATER_FIELDS
from dragon_hatchling.gpt import GPT, GPTConfig
from model import BDH, BDHConfig
from test_cli import assert_clean_error

MODELS = {
    "bdh": lambda: BDH(BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=2, half_lives=[4.0, 16.0])),
    "bdh-learned-decay": lambda: BDH(
        BDHConfig(n_embd=16, n_head=2, n_neurons=64, n_layer=1, half_lives=[4.0, 16.0], learn_decay=True)
    ),
    "gpt": lambda: GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=64)),
}
WRONG = {
    int: ["12x", 1.5, True, None],
    float: ["0.1x", [0.1], None],
    str: [3, None],
    bool: ["yes", 1, None],
    list: ["8,16", [1, "x"]],
}


def wrong_values(hint) -> list:
    """JSON values not of a field's type."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is not None else hint
    if typing.get_origin(base) is list:
        base = list
    values = WRONG[base]
    return [v for v in values if not (v is None and type(None) in typing.get_args(hint))]


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory, raw_dir):
    """A tiny checkpoint of each architecture, the text to score it on, and evaluate.py's arguments."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    model = MODELS[request.param]()
    model.save_pretrained(folder)
    text = folder.parent / "text.raw"
    text.write_bytes((raw_dir / "wiki.valid.raw").read_bytes()[:600])
    return model, folder


def damaged(saved, tmp_path, config=None, tensors=None):
    """A copy of the checkpoint with config.json or the tensors replaced; evaluate.py's arguments."""
    model, folder = saved
    copy = tmp_path / "ckpt"
    copy.mkdir(parents=True)
    cfg = json.loads((folder / "config.json").read_text()) if config is None else config
    (copy / "config.json").write_text(json.dumps(cfg))
    save_file(
        load_file(folder / "model.safetensors") if tensors is None else tensors, copy / "model.safetensors"
    )
    return ["--model_path", str(copy), "--data_file", str(folder.parent / "text.raw"), "--device", "cpu",
            "--out_dir", str(tmp_path / "eval"), "--no_plots", "--seq_len", "32"]  # fmt: skip


def test_the_checkpoint_loads_whole(saved, tmp_path, capsys):
    assert call_main(evaluate.main, damaged(saved, tmp_path), capsys).returncode == 0


def test_every_field_removed_or_mistyped_is_refused(saved, tmp_path, capsys):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    hints = typing.get_type_hints(type(model.config))
    assert set(hints) == set(config)  # every field is tried
    for name, hint in hints.items():
        # without "arch", a GPT's config reads as BDH's, whose fields it does not have
        removed = "lacks the field" if name != "arch" else "that BDHConfig does not"
        cases = [({k: v for k, v in config.items() if k != name}, removed)]
        cases += [({**config, name: v}, f"{name} is") for v in wrong_values(hint)]
        for number, (bad, says) in enumerate(cases):
            if name in LATER_FIELDS and says == "lacks the field":
                continue  # a checkpoint from before the field existed: it loads as what it was
            argv = damaged(saved, tmp_path / f"{name}-{number}", config=bad)
            assert_clean_error(
                call_main(evaluate.main, argv, capsys), says, repr(name) if "lacks" in says else name
            )
    unknown = damaged(saved, tmp_path / "unknown", config={**config, "n_embed": 16})
    assert_clean_error(call_main(evaluate.main, unknown, capsys), "'n_embed'")


def test_every_tensor_removed_reshaped_or_retyped_is_refused(saved, tmp_path, capsys):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    for name, t in tensors.items():
        cases = {
            "removed": ({k: v for k, v in tensors.items() if k != name}, f"no tensor {name}"),
            "reshaped": ({**tensors, name: torch.cat((t, t[:1]))}, f"size mismatch for {name}"),
            "retyped": ({**tensors, name: t.half()}, f"tensor {name} is torch.float16"),
        }
        for what, (bad, says) in cases.items():
            argv = damaged(saved, tmp_path / f"{name}-{what}", tensors=bad)
            assert_clean_error(call_main(evaluate.main, argv, capsys), says)
    extra = damaged(saved, tmp_path / "extra", tensors={**tensors, "spare": torch.zeros(2)})
    assert_clean_error(call_main(evaluate.main, extra, capsys), "tensor spare")


def test_a_config_far_larger_than_its_weights_allocates_nothing(saved, tmp_path, capsys):
    """A config.json that describes a model of petabytes beside small weights is refused before any
    model is made: one line, not the allocator's traceback."""
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    grown = "n_neurons" if "n_neurons" in config else "n_embd"
    config[grown] = 2**50
    ran = call_main(evaluate.main, damaged(saved, tmp_path, config=config), capsys)
    held = sum(t.numel() for t in model.state_dict().values())
    assert_clean_error(ran, "config.json describes", f"parameters, model.safetensors holds {held:,} values")


def test_convert_writes_no_checkpoint_of_a_damaged_one(saved, tmp_path, capsys):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    first = next(iter(tensors))
    argv = damaged(saved, tmp_path / "src", tensors={k: v for k, v in tensors.items() if k != first})
    result = call_main(hub.main, ["convert", argv[1], str(tmp_path / "out")], capsys)
    assert_clean_error(result, f"no tensor {first}")
    assert not (tmp_path / "out" / "model.safetensors").exists()

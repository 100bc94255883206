"""The architectures a run can train: BDH-GPU (model.py, the default) and a GPT of nanoGPT's shape
(gpt.py), to compare. Each model class says what it offers (`display_name`, `reads_streams`,
`has_neurons`, `has_fused_path`, `histogram_weights`) and each config what it needs (`max_window`,
`activation_bytes`); this module maps the names of `--arch` and of config.json onto them, and
derives each architecture's command-line flags from its config's fields."""

from __future__ import annotations

import dataclasses
import types
import typing

from dragon_hatchling.cli import UsageError
from dragon_hatchling.gpt import GPT, GPTConfig
from model import BDH, BDHConfig

ARCHITECTURES = {"bdh": (BDH, BDHConfig), "gpt": (GPT, GPTConfig)}  # --arch: model and config classes
# config fields no flag sets (--arch chooses the architecture itself; merging sets rope_parts)
NOT_FLAGS = ("arch", "vocab_size", "rope_parts")


def arch_of(config) -> str:
    """The architecture a config (a dataclass or config.json's dict) describes: a GPT's says arch
    "gpt"; BDH's configs have no arch."""
    arch = config.get("arch") if isinstance(config, dict) else getattr(config, "arch", None)
    return "gpt" if arch == "gpt" else "bdh"


def model_class(config) -> type[BDH] | type[GPT]:
    """The model class of a config (a dataclass or config.json's dict)."""
    return ARCHITECTURES[arch_of(config)][0]


def model_flags(arch: str) -> dict:
    """The flags that set this architecture's config, with the config's defaults."""
    fields = dataclasses.fields(ARCHITECTURES[arch][1])
    return {f.name: f.default for f in fields if f.name not in NOT_FLAGS}


def foreign_flags(arch: str) -> list[str]:
    """The model flags of the other architectures that this one has no use for (and refuses)."""
    own = model_flags(arch)
    return [name for other in ARCHITECTURES for name in model_flags(other) if name not in own]


def config_of(config: dict):
    """The config dataclass of config.json's dict."""
    return ARCHITECTURES[arch_of(config)][1](**config)


# Fields a config.json may lack: added after checkpoints were first saved, with the value that means
# what those checkpoints computed (no decay: the paper's model).
LATER_FIELDS = {
    "half_lives": None,
    "learn_decay": False,
    "memory": 0,
    "position": "learned",
    "rope_parts": None,
    "shifted_heads": 0,
}
VOCAB = 256  # the scripts read bytes


def checked_config(config: object, where: str):
    """The config dataclass of config.json's contents, every field present (but LATER_FIELDS) and of
    its declared type, no field unknown, the values valid; a UsageError naming the first that is not."""
    if not isinstance(config, dict):
        raise UsageError(f"{where}: config.json holds {type(config).__name__}, expected an object of fields")
    if "arch" in config and config["arch"] not in ARCHITECTURES or config.get("arch") == "bdh":
        raise UsageError(
            f"{where}: config.json's arch is {config['arch']!r}, expected 'gpt' (BDH's has none)"
        )
    cls = ARCHITECTURES[arch_of(config)][1]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(config) - set(hints))
    if unknown:
        raise UsageError(f"{where}: config.json has a field {unknown[0]!r} that {cls.__name__} does not")
    config = {**{k: v for k, v in LATER_FIELDS.items() if k in hints}, **config}
    for name, hint in hints.items():
        if name not in config:
            raise UsageError(f"{where}: config.json lacks the field {name!r}")
        if not of_type(config[name], hint):
            raise UsageError(f"{where}: config.json's {name} is {config[name]!r}, expected {hint_name(hint)}")
    if config["vocab_size"] != VOCAB:
        raise UsageError(
            f"{where}: config.json's vocab_size is {config['vocab_size']}, expected {VOCAB} (bytes)"
        )
    try:
        return cls(**config)
    except ValueError as e:
        raise UsageError(f"{where}: config.json: {e}") from None


def of_type(value: object, hint) -> bool:
    """Whether a JSON value is of a dataclass field's type (int, float, str, list[...], X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(of_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(of_type(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def hint_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")

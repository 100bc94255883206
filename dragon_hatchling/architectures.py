"""The architectures a run can train: BDH-GPU (model.py, the default) and a GPT of nanoGPT's shape
(gpt.py), to compare. Each model class says what it offers (`display_name`, `reads_streams`,
`has_neurons`, `has_fused_path`, `histogram_weights`) and each config what it needs (`max_window`,
`activation_bytes`); this module maps the names of `--arch` and of config.json onto them, and
derives each architecture's command-line flags from its config's fields."""

from __future__ import annotations

import dataclasses

from dragon_hatchling.gpt import GPT, GPTConfig
from model import BDH, BDHConfig

ARCHITECTURES = {"bdh": (BDH, BDHConfig), "gpt": (GPT, GPTConfig)}  # --arch: model and config classes
NOT_FLAGS = ("arch", "vocab_size")  # config fields no flag sets (--arch chooses the architecture itself)


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

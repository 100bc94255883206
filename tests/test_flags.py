"""Every flag of every command, driven from the argparse definitions themselves: values below its
bounds and of the wrong type give one line naming the flag, exit 2, before any work; the values at
its bounds are taken. A flag of a type these tests do not know fails here until it is added."""

import argparse
import math

import pytest

import evaluate
import experiment
from conftest import call_main
from dragon_hatchling import benchmark, cli, hub, monosemantic
from test_cli import assert_clean_error

# per type: values it must refuse, and values at its bounds it must take
CASES = {
    cli.positive_int: (["0", "-1", "1.5", "x", ""], ["1", str(10**30)]),
    cli.nonneg_int: (["-1", "1.5", "x", ""], ["0"]),
    cli.probability: (["-0.1", "1.0001", "nan", "inf", "x", ""], ["0", "1"]),
    cli.positive_float: (["0", "-1", "nan", "inf", "-inf", "x", ""], ["1e-300", "1e300"]),
    cli.nonneg_float: (["-1", "-1e-300", "nan", "inf", "x", ""], ["0", "1e300"]),
    cli.timeout_seconds: (
        ["0", "-1", "nan", "inf", str(7 * 24 * 3600 + 1), "x", ""],
        ["1e-3", str(7 * 24 * 3600)],
    ),
    cli.seed: (["-1", str(2**63), "1.5", "x", ""], ["0", str(2**63 - 1)]),
    cli.half_lives: (["0", "-3", "inf", "nan", "x", "8,x", "8,,16", ""], ["none", "0.5", "8,16"]),
    cli.out_file: (
        ["", "/", f"{cli.__file__}/x.json", f"{cli.__file__}/deeper/x.json"],
        ["x.json", "new/folders/x.json"],
    ),
    int: (["x", "1.5", ""], ["-5", "0"]),
    float: (["x", ""], ["0.5"]),
}
MONOSEMANTIC = ["--model_path", "m", "--concept", "a", "--contrast", "b", "--out_dir", "o"]
COMMANDS = {  # name: (main, parser, the arguments every call needs)
    "experiment": (experiment.main, experiment.build_parser(), []),
    "evaluate": (evaluate.main, evaluate.build_parser(), ["--model_path", "m"]),
    "benchmark": (benchmark.main, benchmark.build_parser(), []),
    "monosemantic": (monosemantic.main, monosemantic.build_parser(), MONOSEMANTIC),
}


def flags(parser: argparse.ArgumentParser, prefix: list[str]):
    """(argv prefix, action) for every optional argument, in subcommands too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                positional = {"push": ["run"], "convert": ["m", "out"], "merge": ["a", "b", "out"]}[name]
                yield from flags(sub, [*prefix, name, *positional])
        elif action.option_strings and action.nargs != 0:
            yield prefix, action


def every_flag():
    for name, (main, parser, needed) in COMMANDS.items():
        for prefix, action in flags(parser, needed):
            yield pytest.param(main, prefix, action, id=f"{name} {action.option_strings[0]}")
    for prefix, action in flags(hub.build_parser(), []):
        yield pytest.param(hub.main, prefix, action, id=f"hub {prefix[0]} {action.option_strings[0]}")


@pytest.mark.parametrize("main, prefix, action", list(every_flag()))
def test_every_flag_refuses_what_it_cannot_take(main, prefix, action, capsys):
    flag = action.option_strings[0]
    if action.choices is not None:
        bad = ["bogus", ""]
    elif action.type in (None, str, cli.nonempty):
        bad = [""]  # free text, a path or a name: each command's own tests try the bad ones
    elif (
        isinstance(getattr(action.type, "__qualname__", None), str)
        and "subset_of" in action.type.__qualname__
    ):
        bad = ["bogus", "", ","]
    elif action.type is benchmark.shape_list:
        bad = ["32", "32x", "0x128", "axb", ""]
    else:
        assert action.type in CASES, f"{flag}: a type these tests do not know ({action.type}): add its cases"
        bad = CASES[action.type][0]
    for value in bad:
        result = call_main(main, [*prefix, f"{flag}={value}"], capsys)
        assert_clean_error(result, flag)


@pytest.mark.parametrize("kind", list(CASES))
def test_the_values_at_each_bound_are_taken(kind):
    refused, taken = CASES[kind]
    for value in taken:
        got = kind(value)
        assert got is not None and (not isinstance(got, float) or math.isfinite(got)), value
    for value in refused:
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            kind(value)


@pytest.mark.parametrize(
    "argv", [["push", "", "--hf_repo_id", "u/n"], ["convert", "", "out"], ["convert", "m", ""]]
)
def test_the_hub_tools_positional_arguments_are_never_empty(argv, capsys):
    assert_clean_error(call_main(hub.main, argv, capsys), "expected a value")

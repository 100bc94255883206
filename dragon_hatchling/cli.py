"""The command line the scripts share: argument types, one-line errors, output folders."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType


class UsageError(Exception):
    """A bad argument or input file: reported as one line and exit code 2."""


def fail(message: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit (never a traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(run, argv: list[str] | None, errors: tuple = (UsageError, ValueError, OSError)) -> None:
    """run(argv), each of `errors` it raises ended as one line and exit 2: a results/ script's main."""
    try:
        run(argv)
    except errors as e:
        fail(str(e))


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def timeout_seconds(text: str) -> float:
    """A timeout: a positive number of seconds, at most a week (datetime.timedelta's range is bounded)."""
    value = positive_float(text)
    if value > 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"expected at most a week (604,800 seconds), got {text}")
    return value


def nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A fraction of cases: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """--seed: an integer from 0 to 2^63 - 1 (what torch and NumPy both take)."""
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2^63 - 1, got {text}")
    return value


def half_lives(text: str) -> list[float]:
    """--half_lives: comma-separated positive numbers of bytes; none: no decay (an empty list)."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers of bytes (or none), got {text!r}"
        ) from None
    if not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers of bytes, got {text!r}")
    return values


def out_file(text: str) -> str:
    """A file to write: not empty, not a folder, below a folder that exists (or can be made) and can be
    written (the nearest existing one is checked; nothing is made here)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file, got the folder {text!r}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"expected a file in a folder that can be written, got {text!r}")
    return text


def in_file(text: str) -> Path:
    """A file to read: one that exists, can be read and holds at least a byte."""
    path = Path(nonempty(text))
    if not path.is_file() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"expected a file that can be read, got {text!r}")
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"expected a file with some bytes, got the empty {text!r}")
    return path


def nonempty(text: str) -> str:
    """Free text (a path, a name, a device): anything but the empty string, which would name the
    current folder or nothing at all."""
    if not text:
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def check_needs(args: argparse.Namespace, needs: dict[str, tuple[tuple[str, ...], object]]) -> None:
    """Flags that mean something only beside another: needs maps each to the flags it serves (one of
    them will do) and its default. One given, and not at its default, without them is refused (it
    would do nothing); one left out (None) gets its default."""
    for name, (serves, default) in needs.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, default)
        elif value != default and not any(getattr(args, flag) for flag in serves):
            wanted = " or ".join(f"--{flag}" for flag in serves)
            raise UsageError(f"--{name} applies to {wanted}: give it, or leave out --{name}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, free-text arguments (no type of their own) never empty, and the
    description (a script's docstring) printed as written."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        fail(message)

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            if action.type is None and action.nargs != 0 and action.choices is None:
                action.type = nonempty
        parsed = super().parse_known_args(args, namespace)
        from dragon_hatchling.hub_client import env_problem  # here: hub_client reads its seconds with ours

        if problem := env_problem():  # the environment's settings are arguments too
            fail(problem)
        return parsed


def add_device_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, work: str) -> None:
    """--device, --dtype and --fused / --no_fused (paths.py), as both scripts take them; `work` says
    what the fused kernels do ("train and validate", "score and sample")."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 autocast on CUDA, float32 elsewhere), float32, bfloat16, float16",
    )
    parser.add_argument(
        "--fused",
        dest="fused",
        action="store_const",
        const=True,
        default=None,
        help=f"{work} through the fused Triton kernels (the default for BDH on CUDA in bfloat16)",
    )
    parser.add_argument(
        "--no_fused",
        dest="fused",
        action="store_const",
        const=False,
        help=f"{work} through plain PyTorch instead of the fused kernels",
    )


def make_out_dir(path: str | Path) -> Path:
    """Create the output folder and check that a file can be written in it, or a UsageError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out_dir {path} is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out_dir {path} cannot be written ({e.strerror or e})") from e
    return path


def unique_folder(base: str | Path) -> Path:
    """A new, empty folder at `base`, or at base-2, base-3, ... if those exist: made here (mkdir is
    atomic), so that two processes choosing the same default never share one."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--out_dir {path} cannot be made ({e.strerror or e})") from e
    raise UsageError(f"--out_dir: {base} and 9,999 more like it exist; choose a folder")


def module_from_file(path: str | Path, name: str, flag: str, expected: str = "a Python file") -> ModuleType:
    """The Python file that `flag` names (an earlier copy of a kernel, the paper authors' bdh.py),
    imported as module `name` and registered in sys.modules (a dataclass in it looks itself up
    there); a file that is not one, or does not import, is a one-line UsageError."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise UsageError(f"{flag} {path}: expected {expected} (a .py file)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # whatever the file does wrong, one line
        del sys.modules[name]
        raise UsageError(f"{flag} {path}: could not be imported ({type(e).__name__}: {e})") from None
    return module

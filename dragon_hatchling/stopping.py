"""How a run stops short of its end: a signal (SIGINT or SIGTERM: the step in hand finishes, the run
saves and says how to resume), an unexpected exception (what the last whole step holds is saved), and
under torchrun the ranks agreeing on either."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from dragon_hatchling.checkpoints import checkpoint_folder, load_training_state
from dragon_hatchling.distributed import Ranks, all_reduce


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved and can be resumed."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.code = 128 + signum


class RunFailed(Exception):
    """An unexpected exception stopped the run; what the last whole step holds was saved."""


class StopSignals:
    """SIGINT and SIGTERM, caught for the life of a `with` block: `signum` is the first one that
    arrived (0: none), which the loop reads at its next log step."""

    def __init__(self) -> None:
        self.signum = 0
        self.handlers: dict = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self.handlers[s] = signal.signal(s, self.catch)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.handlers.items():
            signal.signal(s, handler)

    def catch(self, signum: int, frame) -> None:  # finish the current step, then save and stop
        self.signum = self.signum or signum

    @property
    def caught(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def agree(self, ranks: Ranks) -> None:
        """Under torchrun: every rank takes the signal any rank caught (a collective: every rank calls it)."""
        if ranks.several:
            agreed = int(all_reduce(np.array([self.signum]), "max")[0])
            self.signum = self.signum or agreed


def kept_checkpoint(out_dir: Path) -> str:
    """What a failing run says of its last checkpoint."""
    folder = checkpoint_folder(out_dir, "last")
    if folder is None:
        return "No checkpoint had been saved yet."
    step = load_training_state(folder)["step"]
    return f"The last good checkpoint (step {step}) is kept in {folder}."


def peer_failed(error: Exception) -> bool:
    """An error that says another rank is gone (its collective failed), not what went wrong there."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    )


def shell_command(argv: list[str]) -> str:
    """This script's command line with `argv`, as a user would type it."""
    launcher = "uv run" if "UV" in os.environ else Path(sys.executable).name
    return " ".join([launcher, *(shlex.quote(a) for a in [Path(sys.argv[0]).name, *argv])])


def resume_argv(argv: list[str], out_dir: Path) -> list[str]:
    """The arguments that continue this run: the same, less --overwrite and --resume, into out_dir."""
    kept, skip = [], False
    for a in argv:
        if skip or a == "--overwrite" or a.startswith("--resume="):
            skip = False
        elif a == "--resume":
            skip = True  # and its value
        else:
            kept.append(a)
    if not any(a == "--out_dir" or a.startswith("--out_dir=") for a in kept):
        kept += ["--out_dir", str(out_dir)]
    return [*kept, "--resume", "auto"]


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the work that handles signals itself, raised as Ctrl-C's KeyboardInterrupt is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def interruptible(what: str):
    """A command's main(argv), SIGINT and SIGTERM at any moment it does not handle them itself (the
    training loop saves and stops: StopSignals) ending it with one line and exit code 130 or 143, no
    traceback; `what` says what was kept. Under torchrun the ranks after 0 stop without a word."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            previous = signal.signal(signal.SIGTERM, raise_terminated)
            try:
                return main(argv)
            except KeyboardInterrupt as e:
                signum = getattr(e, "signum", signal.SIGINT)
                if os.environ.get("RANK", "0") == "0":
                    print(f"error: {signal.Signals(signum).name}: stopped; {what}", file=sys.stderr)
                raise SystemExit(128 + signum) from None
            finally:
                signal.signal(signal.SIGTERM, previous)

        return run

    return wrap

"""Several processes, launched by torchrun: the process group, who writes, and how the ranks agree.

    uv run torchrun --standalone --nproc_per_node N experiment.py --device cuda --fused

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process and nothing here
talks to anyone. With them, one process group carries CPU tensors through gloo (the ranks' small
agreements) and CUDA tensors through NCCL (DistributedDataParallel's gradients).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from dragon_hatchling.cli import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes logs, metrics, plots and checkpoints, and pushes."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


class Quiet(Exception):
    """This rank stops without a word: another rank says why (exit code `code`)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def ranks_from_env() -> Ranks:
    """The ranks torchrun describes in the environment (one process when it is not there)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {e}") from None
    if not (0 <= ranks.rank < ranks.world and ranks.local_rank >= 0):
        raise UsageError(
            f"RANK {ranks.rank}, WORLD_SIZE {ranks.world}, LOCAL_RANK {ranks.local_rank}: expected "
            "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (torchrun sets them)"
        )
    return ranks


def start(ranks: Ranks, timeout_s: float) -> None:
    """Join the process group (several ranks only). A collective that waits longer than timeout_s
    fails instead of hanging: a dead or stuck rank stops the others."""
    if ranks.several and not tdist.is_initialized():
        unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if unset:  # the group's rendezvous
            raise UsageError(
                f"WORLD_SIZE {ranks.world} without {' and '.join(unset)}: launch it with torchrun"
            )
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))


def stop(together: bool = False) -> None:
    """Leave the process group. together (a run that ended well on every rank): first wait for the
    others, so that no rank tears the group down while another still uses it (a rank that did so
    aborted at exit, "terminate called without an active exception", about 1 run in 8 on gloo; a
    rarer abort in the interpreter's teardown remained, which exit_with skips)."""
    if tdist.is_initialized():
        if together:
            tdist.barrier()
        tdist.destroy_process_group()


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """sys.exit(main()); but one of several processes that torchrun started then ends at once,
    without the interpreter's teardown (atexit, finalizers, C++ static destructors), its output flushed.
    In that teardown gloo's threads aborted a rank that had finished well now and then ("terminate
    called without an active exception", SIGABRT), even after stop(together=True): torchrun then
    reported a good run as failed. Everything a run writes is closed before main returns."""
    try:
        several = ranks_from_env().several
    except UsageError:  # main says so, in one process's way
        several = False
    if not several:
        sys.exit(main())
    try:
        code = main()
    except SystemExit as e:  # fail() and the other ways our commands stop
        code = e.code
    if isinstance(code, str):  # SystemExit("message"), as sys.exit prints it
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """CUDA: this rank's own GPU (LOCAL_RANK); other devices as they are."""
    if device.type != "cuda" or not ranks.several:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"rank {ranks.rank} wants GPU {ranks.local_rank}, but {torch.cuda.device_count()} are visible; "
            "give torchrun --nproc_per_node at most the number of GPUs"
        )
    device = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(device)
    return device


def agreed(ranks: Ranks, work: Callable[[], T]) -> T:
    """work() on every rank; if it raises a UsageError on any, every rank stops: the lowest such
    rank with its error, the others Quiet (so one line is printed, not one a rank)."""
    error, result = None, None
    try:
        result = work()
    except UsageError as e:
        error = e
    if ranks.several:
        first = int(all_reduce(np.array([ranks.rank if error else ranks.world]), "min")[0])
        if first < ranks.world and first != ranks.rank:
            raise Quiet(2)
    if error is not None:
        raise error
    return result


def all_reduce(values: np.ndarray, op: str = "sum") -> np.ndarray:
    """Element-wise sum, min or max of `values` over the ranks (float64 through gloo); the values
    themselves with one rank."""
    if not tdist.is_initialized():
        return np.asarray(values, dtype=np.float64)
    t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    ops = {"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}
    tdist.all_reduce(t, op=ops[op])
    return t.numpy()


def gather(obj: object) -> list:
    """Every rank's obj, in rank order (a list of one with one rank)."""
    if not tdist.is_initialized():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def share(items: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's contiguous share of items (len divisible by the world size): rank r of N takes
    the r-th of N equal parts."""
    size = len(items) // ranks.world
    return items[ranks.rank * size : (ranks.rank + 1) * size]

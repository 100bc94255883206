"""experiment.py as torchrun runs it, with two hooks for the tests (never in the product):
BDH_TEST_SLOW=S sleeps S seconds a step (time to send a signal); BDH_TEST_FAIL=R:S raises on rank R
in step S; BDH_TEST_NAN=R:S makes rank R's learning rate NaN in step S (its weights, then its loss)."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experiment  # noqa: E402
from dragon_hatchling.distributed import exit_with  # noqa: E402

real = experiment.lr_at


def lr_at(step, total, args):
    time.sleep(float(os.environ.get("BDH_TEST_SLOW", "0")))
    if os.environ.get("BDH_TEST_FAIL"):
        rank, at = map(int, os.environ["BDH_TEST_FAIL"].split(":"))
        if int(os.environ["RANK"]) == rank and step == at:
            raise RuntimeError("a failure put there by the test")
    if os.environ.get("BDH_TEST_NAN"):
        rank, at = map(int, os.environ["BDH_TEST_NAN"].split(":"))
        if int(os.environ["RANK"]) == rank and step == at:
            return float("nan")
    return real(step, total, args)


experiment.lr_at = lr_at
exit_with(lambda: experiment.main(sys.argv[1:]))  # as experiment.py ends

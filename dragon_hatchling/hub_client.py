"""The Hugging Face Hub's client, made to end: every request waits at most HUB_TIMEOUT seconds for an
answer (the client's own default is no limit), a whole push or download at most HUB_DEADLINE
(retries included), its retries show one line, and no message shows the token."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading

from dragon_hatchling.cli import positive_float

# Every Hub call ends: a request waits at most HUB_TIMEOUT seconds for an answer (the client's own
# default is no limit), and a whole push or download at most HUB_DEADLINE (retries included).
SECONDS_FROM_ENV = {"BDH_HUB_TIMEOUT": 30.0, "BDH_HUB_DEADLINE": 150.0}  # variable: default


def env_seconds(name: str) -> float | None:
    """The seconds the environment variable `name` sets (its default if unset); None if it is not a
    finite number above 0 (env_problem says so; the commands refuse it before any work)."""
    text = os.environ.get(name)
    if text is None:
        return SECONDS_FROM_ENV[name]
    try:
        return positive_float(text)
    except (ValueError, argparse.ArgumentTypeError):
        return None


def env_problem() -> str | None:
    """One line for the first BDH_HUB_* variable that is not seconds, else None."""
    for name, default in SECONDS_FROM_ENV.items():
        if env_seconds(name) is None:
            text = os.environ[name]
            return f"{name}={text!r}: expected seconds, a finite number above 0 (unset: {default:g})"
    return None


HUB_TIMEOUT = env_seconds("BDH_HUB_TIMEOUT") or SECONDS_FROM_ENV["BDH_HUB_TIMEOUT"]
HUB_DEADLINE = env_seconds("BDH_HUB_DEADLINE") or SECONDS_FROM_ENV["BDH_HUB_DEADLINE"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # USER/NAME


class HubUnreachable(Exception):
    """The Hub did not answer in time, or could not be reached: not bad input (exit code 1)."""


class _OneRetryLine(logging.Filter):
    """huggingface_hub logs two lines for every retry: let one line through, the first time only."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Retrying in" not in message and "thrown while requesting" not in message:
            return True
        if not _OneRetryLine.said:
            _OneRetryLine.said = True
            print(f"the Hub did not answer; retrying for up to {HUB_DEADLINE:.0f} s", file=sys.stderr)
        return False


def _client_with_timeout():
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.timeout = HUB_TIMEOUT
    return client


def _configure_client() -> None:
    from huggingface_hub import set_client_factory

    set_client_factory(_client_with_timeout)
    logging.getLogger("huggingface_hub.utils._http").addFilter(_OneRetryLine())


def with_deadline(fn, *args, deadline: float | None = None, **kwargs):
    """fn(*args, **kwargs) in a worker thread, given up after `deadline` seconds (HUB_DEADLINE by
    default) with HubUnreachable. The caller's thread waits, so Ctrl-C reaches it at once. Some of
    the client's requests ask for no timeout at all (listing a repo's files): this ends them too."""
    deadline = HUB_DEADLINE if deadline is None else deadline
    result: dict = {}

    def work() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise HubUnreachable(f"the Hub did not answer within {deadline:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


_configure_client()


def hub_error(e: Exception) -> str:
    """A one-line description of a Hub failure that never contains the token."""
    from huggingface_hub import get_token

    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    token = get_token()
    return text.replace(token, "***") if token else text

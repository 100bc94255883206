"""The Hugging Face Hub's client, made to end: every request waits at most HUB_TIMEOUT seconds for an
answer (the client's own default is no limit), a whole push or download at most HUB_DEADLINE
(retries included), its retries show one line, and no message shows the token."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

# Every Hub call ends: a request waits at most HUB_TIMEOUT seconds for an answer (the client's own
# default is no limit), and a whole push or download at most HUB_DEADLINE (retries included).
HUB_TIMEOUT = float(os.environ.get("BDH_HUB_TIMEOUT", "30"))
HUB_DEADLINE = float(os.environ.get("BDH_HUB_DEADLINE", "150"))
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

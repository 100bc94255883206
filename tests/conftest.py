"""Shared test fixtures. Tests that need ../shared fail with a clear message if it is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads these once, at import: set them before anything imports it. Every Hub call
# of the tests (and of the scripts they start) goes to the local server of tests/hub_server.py.
HUB_PORT = _free_port()
HF_TOKEN = "hf_test_secret_token_0123456789"
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_TOKEN=HF_TOKEN,
    HF_HUB_CACHE=tempfile.mkdtemp(prefix="bdh-hf-cache-"),
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_ETAG_TIMEOUT="5",
    HF_HUB_DOWNLOAD_TIMEOUT="10",
)
os.environ.pop("HF_HUB_OFFLINE", None)

# Without a GPU, the Triton kernels run in Triton's CPU interpreter; it reads this at import.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BDH_SHARED", REPO.parent / "shared"))


def require_shared(path: Path = SHARED) -> Path:
    """The shared folder, or a test failure naming what is missing (never a skip)."""
    needed = [
        path / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw",
        path / "data" / "wikitext-2-tokens" / "wiki.train.tokens",
        path / "fixtures" / "legacy" / "fixtures.json",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(
            f"the shared data folder is missing ({', '.join(missing)}): check out ../shared beside "
            "the repository, or point BDH_SHARED at it",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def hub():
    """The local Hub server at HF_ENDPOINT, for the whole session."""
    from hub_server import HubServer

    with HubServer(HUB_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def raw_dir(shared: Path) -> Path:
    return shared / "data" / "wikitext-2-raw-v1"


@pytest.fixture(scope="session")
def tokens_dir(shared: Path) -> Path:
    return shared / "data" / "wikitext-2-tokens"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, raw_dir: Path, tokens_dir: Path) -> Path:
    """A local data folder made from the shared files, cut short so that tests are fast.

    Shared by the whole session: a test that changes the data takes `small_data_dir` instead.
    """
    folder = tmp_path_factory.mktemp("data") / "wikitext"
    folder.mkdir()
    (folder / "wiki.train.raw").write_bytes((tokens_dir / "wiki.train.tokens").read_bytes()[:60_000])
    (folder / "wiki.valid.raw").write_bytes((raw_dir / "wiki.valid.raw").read_bytes()[:6_000])
    (folder / "wiki.test.raw").write_bytes((raw_dir / "wiki.test.raw").read_bytes()[:6_000])
    return folder


@pytest.fixture(scope="session")
def edge_train(tmp_path_factory, small_data: Path) -> Path:
    """A train file of 390 bytes: 12 windows of 32 unshifted, 11 after most of an epoch's random
    shifts, so that the last batch of 4 of each epoch would run short (the sampler wraps it round)."""
    path = tmp_path_factory.mktemp("edges") / "edge.train"
    path.write_bytes((small_data / "wiki.train.raw").read_bytes()[:390])
    return path


@pytest.fixture
def small_data_dir(tmp_path: Path, small_data: Path) -> Path:
    """A copy of `small_data` of the test's own, to change as it likes."""
    return Path(shutil.copytree(small_data, tmp_path / "wikitext"))


TINY_MODEL = ["--n_embd", "32", "--n_head", "2", "--n_neurons", "128", "--n_layer", "2"]


def tiny_run(data_dir: Path, out_dir: Path, flags: str = "") -> list[str]:
    """experiment.py's command line for a tiny model on the CPU, then `flags` (later flags win)."""
    return ["experiment.py", "--device", "cpu", "--data_dir", str(data_dir), *TINY_MODEL,
            "--out_dir", str(out_dir), "--no_progress", *flags.split()]  # fmt: skip


class Ran(NamedTuple):
    """What call_main gives back, as subprocess.run would."""

    returncode: int
    stderr: str
    stdout: str


def call_main(main, argv: list[str], capsys) -> Ran:
    """A script's main(argv) in this process (no interpreter start-up): exit code, stderr, stdout."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return Ran(code, out.err, out.out)


def load_script(path: Path):
    """A script under results/ (no package) imported as a module, for tests of its functions."""
    from dragon_hatchling.cli import module_from_file  # after the Hub's settings above, as every import

    return module_from_file(path, path.stem, "load_script")


def run_script(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 240):
    """Run one of the project's scripts in a fresh Python process; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


class SilentHub:
    """A server on 127.0.0.1 that accepts every connection and never answers; `url` is its
    HF_ENDPOINT, `connections` how many it has taken (a client is then waiting on it)."""

    def __init__(self) -> None:
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return len(self.held)

    def accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.server.close()


@pytest.fixture
def silent_hub():
    """A SilentHub, closed after the test."""
    hub = SilentHub()
    yield hub
    hub.close()

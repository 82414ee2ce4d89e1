"""Suite-wide fixtures: sample data, a fake fold file, a repo-root path, a guard that no
test leaves a child process behind (workers, one-shot trainers, step subprocesses), and
Ctrl-C that works in every test."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from step5.testing.postgres import TemporaryPostgres

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session", autouse=True)
def sigint_is_ctrl_c():
    """SIGINT raises KeyboardInterrupt in the suite and reaches its children, as in a terminal.

    A shell without job control starts a background command (``.ci/run &``, ``nohup ... &``)
    with SIGINT ignored; Python then installs no handler, and every child inherits the
    ignore. The tests that press Ctrl-C (on themselves, on the optimizer, on the WATCHER)
    would see nothing happen. A Python-level handler is reset to the default by ``exec``,
    so children start with SIGINT live again."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """A fold file for the fake worker and fake one-shot trainer, which only check it exists."""
    path = tmp_path / "fold.npz"
    path.write_bytes(b"fake trainers only check that the file exists")
    return path


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Fail any test after which a child process of the test runner is still alive."""
    yield
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + 10.0
    alive = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if alive:
        described = [f"pid {p.pid}: {' '.join(p.cmdline()[:4])}" for p in alive]
        for p in alive:
            p.kill()
        pytest.fail(f"test left child processes running: {described}")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def python() -> str:
    """The interpreter the tests run under; subprocess CLIs are run with it."""
    return sys.executable


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory):
    """Small generated inputs with a planted signal: (survivors_path, history_path)."""
    from step5.data.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    return write_sample(out, n_survivors=600, n_features=24, seed=7)


@pytest.fixture(scope="session")
def degenerate_inputs(tmp_path_factory):
    """Generated inputs whose target is constant: (survivors_path, history_path)."""
    from step5.data.sample import write_sample

    out = tmp_path_factory.mktemp("degenerate")
    return write_sample(out, n_survivors=200, n_features=12, seed=7, degenerate=True)


def _start_postgres() -> TemporaryPostgres:
    """A started throwaway PostgreSQL server (step5.testing.postgres). With CI=true it must
    start (a failure fails the tests that need it); elsewhere a machine without PostgreSQL
    skips them, saying why."""
    from step5.testing.postgres import PostgresUnavailable, TemporaryPostgres

    server = TemporaryPostgres()
    try:
        server.start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and PostgreSQL cannot start: {exc}")
        pytest.skip(f"PostgreSQL cannot start here: {exc}")
    return server


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on loopback for the whole session."""
    server = _start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_postgres_server():
    """A throwaway PostgreSQL server of the test module's own, for tests that restart, stop
    or cut it (the session's server stays undisturbed)."""
    server = _start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database on the session's PostgreSQL server, one per test."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50] + f"_{os.getpid()}"
    return postgres_server.create_database(name)

"""Suite-wide fixtures: sample data, a fake fold file, a repo-root path, a guard that no
test leaves a child process behind (workers, one-shot trainers, step subprocesses), and
Ctrl-C that works in every test.

Tiers. ``bash scripts/test.sh -m "not slow"`` is the fast tier for the edit-test loop; CI
runs everything. A test is ``slow`` when it is marked so, or when a run saw it start a real
Step 5 process (a torch worker or one-shot trainer, the optimizer, pip, a benchmark:
:data:`REAL_PROCESS_MARKERS`) or take :data:`SLOW_SECONDS` or more. What a run sees is
kept in ``tests/slow_tests.txt`` (rewritten only when it changes, by runs that saw tests
run to the end), so the marking follows the tests by itself: a new test that trains for
real joins the slow tier after the first run that ran it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import psutil
import pytest

if TYPE_CHECKING:
    from step5.testing.postgres import TemporaryPostgres

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# ----------------------------------------------------------------------------- tiers

SLOW_LIST = Path(__file__).with_name("slow_tests.txt")
SLOW_SECONDS = 2.0  # a test this long or longer is slow; one under FAST_SECONDS is not any more
FAST_SECONDS = 1.0  # (the gap keeps a test near the line from flapping between tiers)
#: Command-line fragments of processes that import torch or run Step 5 for real.
REAL_PROCESS_MARKERS = (
    "step5.nn.worker", "step5.nn.oneshot", "step5.optimizer", "nn_gpu_worker.py", "train_single_trial.py",
    "meta_prediction_optimizer_anti_overfit.py", "pip", "bench.",
)
_started_real_process = False
_observed: dict[str, str] = {}  # nodeid -> "slow" | "fast", for this run
_marked_in_source: set[str] = set()  # tests whose code says @pytest.mark.slow (the list never unmarks them)


def _read_slow_list() -> set[str]:
    if not SLOW_LIST.is_file():
        return set()
    return {line.strip() for line in SLOW_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")}


def pytest_configure(config):
    """Watch every process a test starts (subprocess.Popen is how Step 5 and the tests start
    them all)."""
    import subprocess

    real_init = subprocess.Popen.__init__
    if getattr(real_init, "_step5_watch", False):
        return

    def watching_init(self, args, *a, **kw):
        global _started_real_process
        text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        if any(marker in text for marker in REAL_PROCESS_MARKERS):
            _started_real_process = True
        real_init(self, args, *a, **kw)

    watching_init._step5_watch = True  # type: ignore[attr-defined]
    subprocess.Popen.__init__ = watching_init  # type: ignore[method-assign]


def pytest_collection_modifyitems(config, items):
    listed = _read_slow_list()
    for item in items:
        if item.get_closest_marker("slow") is not None:
            _marked_in_source.add(item.nodeid)
        elif item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _started_real_process
    _started_real_process = False
    start = time.monotonic()
    outcome = yield
    elapsed = time.monotonic() - start
    if outcome.excinfo is None and not item.config.getoption("--collect-only"):
        if _started_real_process or elapsed >= SLOW_SECONDS:
            _observed[item.nodeid] = "slow"
        elif elapsed < FAST_SECONDS and item.nodeid not in _marked_in_source:
            _observed[item.nodeid] = "fast"


def pytest_testnodedown(node, error):
    """xdist: a worker's observations reach the controller when the worker ends."""
    _observed.update(getattr(node, "workeroutput", {}).get("step5_tiers", {}))


def _still_defined(nodeid: str) -> bool:
    """Whether the test ``nodeid`` names is still defined in its file (any parameters)."""
    path, _, rest = nodeid.partition("::")
    file = REPO_ROOT / path
    return file.is_file() and f"def {rest.split('[')[0].split('::')[-1]}(" in file.read_text()


def pytest_sessionfinish(session, exitstatus):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller writes the file
        workeroutput["step5_tiers"] = dict(_observed)
        return
    if not _observed or exitstatus not in (0, 1):  # interrupted or broken: keep the list as it was
        return
    listed = _read_slow_list()
    updated = (listed | {n for n, tier in _observed.items() if tier == "slow"}) - {
        n for n, tier in _observed.items() if tier == "fast"}
    updated = {n for n in updated if _still_defined(n)}  # a renamed or deleted test leaves the list
    if updated != listed:
        header = "# Written by tests/conftest.py: tests a run saw start a real Step 5 process or take >= 2 s.\n"
        SLOW_LIST.write_text(header + "".join(f"{n}\n" for n in sorted(updated)))


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


@pytest.fixture(autouse=True)
def root_logger_restored():
    """Each test leaves the root logger as it found it.

    A CLI's ``main()`` run in-process sets up logging (the optimizer's with ``force=True``)
    on the ``sys.stderr`` of that moment: a stream pytest captures for this test and closes
    after it. Left on the root logger, that handler makes a later test in the same worker
    print "--- Logging error ---" into whatever stderr it asserts on."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class _FileSizeLimit:
    """A filesystem that refuses a write, without filling a disk: past ``n`` bytes of any one
    file, a write fails with EFBIG ("file too large") as a write to a full disk fails with ENOSPC.
    ``with limit(n):`` applies to this process; ``limit.child(n)`` is a ``preexec_fn``."""

    @staticmethod
    def child(n: int) -> Callable[[], None]:
        def apply() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
            resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return apply

    @contextlib.contextmanager
    def __call__(self, n: int) -> Iterator[None]:
        limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
        self.child(n)()
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def file_size_limit() -> _FileSizeLimit:
    return _FileSizeLimit()


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

"""Process helpers shared by every part of Step 5 that starts processes.

The worker pool, the one-shot runner and the WATCHER's process-group code all need the
same three things, defined once here: SIGKILL a process (and, for a one-shot trainer,
what it started), reap it without blocking forever on one stuck in the kernel, and say
how it ended the way loky does (``SIGKILL(-9)``, ``EXIT(1)``).
"""
from __future__ import annotations

import collections.abc
import logging
import signal
import subprocess
import threading
from typing import Iterator

import psutil

logger = logging.getLogger(__name__)

#: How long to wait for a SIGKILLed process (and its pipes) before giving up on it, logged.
REAP_TIMEOUT_S = 5.0
#: Lines of a process's stderr kept for crash reports.
STDERR_TAIL_LINES = 20


def describe_exit(returncode: int | None) -> str:
    """``SIGKILL(-9)`` for a signal death, ``EXIT(1)`` for an exit code, ``RUNNING`` for none."""
    if returncode is None:
        return "RUNNING"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}({returncode})"
        except ValueError:
            return f"SIGNAL({returncode})"
    return f"EXIT({returncode})"


def tail_lines(text: str, n: int = STDERR_TAIL_LINES) -> str:
    """The last ``n`` lines of a process's stderr, for crash reports."""
    return "\n".join(text.rstrip().splitlines()[-n:])


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it is still running; never waits."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process it started; never waits.

    The descendants are listed first: once ``proc`` is dead they are reparented out of
    reach, and one of them holding its stdout/stderr would keep its pipes open.
    """
    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    sigkill(proc)
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass


def reap_killed(proc: subprocess.Popen[bytes], what: str, timeout_s: float = REAP_TIMEOUT_S) -> bool:
    """Wait for a SIGKILLed process, but not forever (one stuck in a GPU driver); logged.

    Returns whether it was reaped.
    """
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %d) did not die %gs after SIGKILL", what, proc.pid, timeout_s)
        return False


def kill_and_reap(proc: subprocess.Popen[bytes], what: str) -> None:
    """:func:`kill_tree`, then :func:`reap_killed`."""
    kill_tree(proc)
    reap_killed(proc, what)


class LiveProcesses(collections.abc.MutableSet):  # type: ignore[type-arg]
    """The one-shot trainers running now, killable all at once.

    Once :meth:`abort` ran, a process added later (a thread that was between its abort
    check and ``Popen``) is killed on arrival, so no trainer can slip past an abort.
    """

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self.aborted = False

    def __contains__(self, proc: object) -> bool:
        with self._lock:
            return proc in self._procs

    def __iter__(self) -> Iterator[subprocess.Popen[bytes]]:
        with self._lock:
            return iter(list(self._procs))

    def __len__(self) -> int:
        with self._lock:
            return len(self._procs)

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.add(proc)
            if not self.aborted:
                return
        kill_tree(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def abort(self) -> list[subprocess.Popen[bytes]]:
        """Refuse new trainers and SIGKILL the running ones; returns those killed."""
        with self._lock:
            self.aborted = True
            procs = list(self._procs)
        for proc in procs:
            kill_tree(proc)
        return procs

"""Process helpers for every part of Step 5 that starts processes (the pool, the one-shot
trainer, the WATCHER): kill a process and what it started, reap it without blocking forever
on one stuck in the kernel, and say how it ended the way loky does (``SIGKILL(-9)``)."""
from __future__ import annotations

import contextlib
import logging
import signal
import subprocess

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


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it is still running; never waits."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process it started; never waits. The descendants are
    listed first: once ``proc`` is dead they are out of reach, and one holding its
    stdout/stderr would keep its pipes open."""
    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    sigkill(proc)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


def reap_killed(proc: subprocess.Popen[bytes], what: str, timeout_s: float = REAP_TIMEOUT_S) -> bool:
    """Wait for a SIGKILLed process, but not forever (one stuck in a GPU driver; logged);
    whether it was reaped."""
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %d) did not die %gs after SIGKILL", what, proc.pid, timeout_s)
        return False

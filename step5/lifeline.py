"""Make a child process exit when its parent dies (torch-free).

A persistent worker must never outlive the optimizer that started it, even a SIGKILLed one.
Two mechanisms, because each alone has a gap (docs/workers.md): Linux
``prctl(PR_SET_PDEATHSIG)`` (it misses a parent that died before the call, fires when the
parent *thread* that forked us exits, so the pool spawns every worker from one long-lived
thread, and exists on Linux only), and a daemon thread polling ``os.getppid()`` and the pid
the parent wrote into :data:`PARENT_PID_ENV`, so the child watches the process that really
asked for it, not whoever it finds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from step5.errors import EXIT_ORPHANED
from step5.owner import pid_alive

logger = logging.getLogger(__name__)

#: Environment variable holding the pid of the process whose death must end the child.
PARENT_PID_ENV = "STEP5_PARENT_PID"
#: Set by the WATCHER for the step it runs: the step stops (as on SIGTERM) if the WATCHER dies.
SUPERVISOR_PID_ENV = "STEP5_SUPERVISOR_PID"
#: "1" in a helper started over ssh (step5.cluster): it stops (as on SIGTERM) when its stdin
#: closes, which is all the remote end sees of the main process stopping it or dying.
STDIN_LIFELINE_ENV = "STEP5_STDIN_LIFELINE"

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent exits; returns
    whether it could be installed (False off Linux or without libc's ``prctl``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as exc:
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return False
    return True


def expected_parent_pid(environ: dict[str, str] | None = None, name: str = PARENT_PID_ENV) -> int | None:
    """The pid from the variable ``name``, or ``None`` when unset or not a positive int."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return None
    try:
        pid = int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not an integer pid", name, raw)
        return None
    return pid if pid > 0 else None


def install_lifeline(parent_pid: int | None = None, *, poll_s: float = 0.5, on_orphan: Callable[[], None] | None = None,
                     use_prctl: bool = True, death_signal: int = signal.SIGKILL) -> threading.Thread:
    """Arrange for this process to end when its parent dies; returns the watch thread.

    ``parent_pid`` defaults to :data:`PARENT_PID_ENV`, else to the current parent. ``on_orphan``
    (default: ``os._exit(EXIT_ORPHANED)``) runs in the watch thread once the parent is gone
    (tests observe it, and check the polling alone with ``use_prctl=False``). ``death_signal``:
    what the kernel sends (SIGKILL for workers; a process with cleanup to do asks for SIGTERM).
    """
    original_ppid = os.getppid()
    watched = parent_pid if parent_pid is not None else expected_parent_pid()
    if watched is None:
        watched = original_ppid
    if use_prctl:
        set_parent_death_signal(death_signal)
    act = on_orphan or (lambda: os._exit(EXIT_ORPHANED))

    def watch() -> None:
        while os.getppid() == original_ppid and pid_alive(watched):
            time.sleep(poll_s)
        # Read the parent again: a parent reaped between the two checks above was already
        # re-parented away from, and that is the reason to tell.
        ppid = os.getppid()
        if ppid != original_ppid:
            reason = f"re-parented from pid {original_ppid} to {ppid}"
        else:
            reason = f"parent pid {watched} no longer exists"
        logger.warning("parent process is gone (%s); exiting", reason)
        act()

    thread = threading.Thread(target=watch, name="step5-lifeline", daemon=True)
    thread.start()
    return thread


def install_supervisor_lifeline(environ: dict[str, str] | None = None) -> threading.Thread | None:
    """End this process as on SIGTERM when the supervisor in :data:`SUPERVISOR_PID_ENV` dies.

    The WATCHER runs a step in a session of its own (so Ctrl-C reaches only the WATCHER); a
    WATCHER that is SIGKILLed stops nothing, and the step would train on unwatched. With this
    the step takes its normal SIGTERM path. A step run by hand has no supervisor: None.
    """
    supervisor = expected_parent_pid(environ, SUPERVISOR_PID_ENV)
    if supervisor is None:
        return None
    return install_lifeline(
        supervisor, death_signal=signal.SIGTERM, on_orphan=lambda: os.kill(os.getpid(), signal.SIGTERM),
    )


class StdinLifeline:
    """The watch thread of :func:`install_stdin_lifeline`; :meth:`disarm` makes EOF a no-op."""

    def __init__(self, fd: int, act: Callable[[], None]) -> None:
        self._fd = fd
        self._act = act
        self._armed = threading.Event()
        self._armed.set()
        self.thread = threading.Thread(target=self._watch, name="step5-stdin-lifeline", daemon=True)

    def _watch(self) -> None:
        try:
            while os.read(self._fd, 65536):
                pass
        except OSError as exc:
            logger.warning("stdin lifeline: reading stdin failed (%s)", exc)
        if self._armed.is_set():
            logger.warning("stdin closed: the process that started this helper stopped it or is gone; stopping")
            self._act()

    def disarm(self) -> None:
        """The run is over: its end must not be cut short by a stop that comes too late."""
        self._armed.clear()


def install_stdin_lifeline(environ: dict[str, str] | None = None, *, fd: int = 0,
                           on_eof: Callable[[], None] | None = None) -> StdinLifeline | None:
    """End this process as on SIGTERM when ``fd`` (stdin) reaches EOF, if :data:`STDIN_LIFELINE_ENV`
    is ``1``; returns the lifeline (None: not asked for).

    A helper started over ssh has no parent on its host to watch; what reaches it is its stdin,
    the ssh channel, which the main process closes to stop it and which a dead main process or
    a lost connection closes too. What it reads before EOF is discarded. The caller disarms it
    once its run is over (SIGTERM then would find the default handler back and cut its exit short).
    """
    if (os.environ if environ is None else environ).get(STDIN_LIFELINE_ENV) != "1":
        return None
    lifeline = StdinLifeline(fd, on_eof or (lambda: os.kill(os.getpid(), signal.SIGTERM)))
    lifeline.thread.start()
    return lifeline

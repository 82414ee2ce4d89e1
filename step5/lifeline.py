"""Make a child process exit when its parent dies (torch-free). Why two mechanisms for a
worker (``prctl(PR_SET_PDEATHSIG)`` and a thread polling the parent), and the other two
lifelines (the WATCHER's, an ssh helper's stdin): docs/workers.md ("Lifelines")."""
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
#: "1" in a helper started over ssh (step5.cluster): it stops (as on SIGTERM) when its stdin closes.
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


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _start_watch(name: str, wait: Callable[[], str | None], act: Callable[[], None]) -> threading.Thread:
    """A daemon thread that runs ``wait`` and then, unless it returns None, logs what it returned and runs ``act``."""
    def watch() -> None:
        reason = wait()
        if reason is not None:
            logger.warning("%s", reason)
            act()

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    return thread


def install_lifeline(parent_pid: int | None = None, *, poll_s: float = 0.5, on_orphan: Callable[[], None] | None = None,
                     use_prctl: bool = True, death_signal: int = signal.SIGKILL) -> threading.Thread:
    """End this process when its parent dies; returns the watch thread.

    ``parent_pid``: default :data:`PARENT_PID_ENV`, else the current parent. ``on_orphan`` (default
    ``os._exit(EXIT_ORPHANED)``) runs in the watch thread; ``death_signal`` is what the kernel sends.
    """
    original_ppid = os.getppid()
    watched = parent_pid or expected_parent_pid() or original_ppid
    if use_prctl:
        set_parent_death_signal(death_signal)

    def wait() -> str:
        while os.getppid() == original_ppid and pid_alive(watched):
            time.sleep(poll_s)
        # Read the parent again: a parent reaped between the two checks above was already
        # re-parented away from, and that is the reason to tell.
        ppid = os.getppid()
        why = f"re-parented from pid {original_ppid} to {ppid}" if ppid != original_ppid else \
            f"parent pid {watched} no longer exists"
        return f"parent process is gone ({why}); exiting"

    return _start_watch("step5-lifeline", wait, on_orphan or (lambda: os._exit(EXIT_ORPHANED)))


def install_supervisor_lifeline(environ: dict[str, str] | None = None) -> threading.Thread | None:
    """End this process as on SIGTERM when the WATCHER in :data:`SUPERVISOR_PID_ENV` dies (None: no supervisor)."""
    supervisor = expected_parent_pid(environ, SUPERVISOR_PID_ENV)
    if supervisor is None:
        return None
    return install_lifeline(supervisor, death_signal=signal.SIGTERM, on_orphan=_sigterm_self)


class StdinLifeline:
    """The watch of :func:`install_stdin_lifeline`; :meth:`disarm` makes EOF a no-op."""

    def __init__(self, fd: int, act: Callable[[], None]) -> None:
        self._armed = True

        def wait() -> str | None:
            try:
                while os.read(fd, 65536):  # what arrives before EOF is discarded
                    pass
            except OSError as exc:
                logger.warning("stdin lifeline: reading stdin failed (%s)", exc)
            if not self._armed:
                return None
            return "stdin closed: the process that started this helper stopped it or is gone; stopping"

        self.thread = _start_watch("step5-stdin-lifeline", wait, act)

    def disarm(self) -> None:
        """The run is over: its end must not be cut short by a stop that comes too late."""
        self._armed = False


def install_stdin_lifeline(environ: dict[str, str] | None = None, *, fd: int = 0,
                           on_eof: Callable[[], None] | None = None) -> StdinLifeline | None:
    """End this process as on SIGTERM when ``fd`` (stdin, the ssh channel) reaches EOF, if
    :data:`STDIN_LIFELINE_ENV` is ``1`` (None: not asked for). The caller disarms it once its run is over."""
    if (os.environ if environ is None else environ).get(STDIN_LIFELINE_ENV) != "1":
        return None
    return StdinLifeline(fd, on_eof or _sigterm_self)

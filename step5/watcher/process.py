"""Running one step as a subprocess in its own session, with a timeout; on every exit path
(a clean one too) its whole group, and every descendant seen while it ran (one that called
``setsid`` left the group), is stopped: SIGTERM, a grace period, SIGKILL. docs/watcher.md
("Running a step").
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

import psutil

from step5.errors import Step5Error, Terminated
from step5.execution.process import REAP_TIMEOUT_S, describe_exit, reap_killed

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the descendants are re-listed while the step runs
_TAIL_LINES = 40
_TAIL_LINE_CHARS = 500


@dataclass
class StepRun:
    """What happened to one step process."""

    command: list[str]
    pid: int
    returncode: int | None = None
    duration_s: float = 0.0
    timed_out: bool = False
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when the WATCHER was interrupted
    leftovers: int = 0  # processes of the step still alive after it ended (we stopped them)
    output_tail: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> str:
        """``EXIT(1)``, ``SIGKILL(-9)``, ``TIMEOUT`` ... as read from the OS."""
        if self.timed_out:
            return "TIMEOUT"
        if self.interrupted:
            return f"INTERRUPTED({self.interrupted})"
        return "NOT_STARTED" if self.returncode is None else describe_exit(self.returncode)


def _pump(stream: IO[bytes], tail: deque[str], echo: bool) -> None:
    """Copy the step's output to our stderr line by line, keeping the last lines."""
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            tail.append(line.rstrip("\n")[:_TAIL_LINE_CHARS])
            if echo:
                try:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    echo = False  # our stderr went away; keep draining so the step never blocks
    finally:
        stream.close()


def _remember_descendants(pid: int, known: dict[int, psutil.Process]) -> None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            known.setdefault(child.pid, child)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (psutil.Error, OSError):
            continue
    return members


def _remaining(popen: subprocess.Popen[bytes], pgid: int, known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """The group's live members and the remembered descendants still alive, leader included."""
    popen.poll()  # reap the leader, so it does not count as a live zombie
    found = {p.pid: p for p in group_members(pgid)}
    for proc in known.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _signal_all(pgid: int, strays: list[psutil.Process], sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # pragma: no cover - a group we cannot signal is not ours
        logger.warning("cannot signal process group %d: %s", pgid, exc)
    for proc in strays:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def stop_group(
    popen: subprocess.Popen[bytes], known: dict[int, psutil.Process], grace_s: float
) -> tuple[int, str | None]:
    """Stop the step's group and remembered descendants: SIGTERM, ``grace_s``, SIGKILL.
    Returns how many processes (leader included) had to be stopped, and the interrupt that
    arrived during the grace (it skips to SIGKILL and is reported, so the step is not retried)."""
    pgid = popen.pid
    _remember_descendants(popen.pid, known)
    targets = _remaining(popen, pgid, known)
    if not targets and popen.returncode is not None:
        return 0, None
    logger.info("stopping %d process(es) of step group %d (SIGTERM, then SIGKILL after %.1fs)",
                len(targets), pgid, grace_s)
    _signal_all(pgid, [p for p in targets if p.pid != pgid], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    interrupted = None
    try:
        while time.monotonic() < deadline and _remaining(popen, pgid, known):
            time.sleep(0.05)
    except KeyboardInterrupt as exc:
        interrupted = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
        logger.warning("interrupted (%s) while the step group stopped: killing step group %d now",
                       interrupted, pgid)
    left = _remaining(popen, pgid, known)
    if left:
        logger.warning("%d process(es) of step group %d ignored SIGTERM; sending SIGKILL", len(left), pgid)
        strays = [p for p in left if p.pid != pgid]
        _signal_all(pgid, strays, signal.SIGKILL)
        # The leader is reaped by Popen only: psutil reaping it would lose its exit status.
        psutil.wait_procs(strays, timeout=REAP_TIMEOUT_S)
    reap_killed(popen, "step")  # bounded: a process stuck in the kernel even after SIGKILL
    return len(targets), interrupted


def run_in_group(
    command: list[str], *, timeout_s: float, grace_s: float, env: dict[str, str] | None = None,
    cwd: str | None = None, echo: bool = True,
) -> StepRun:
    """Run ``command`` in a new session; stop its whole group on timeout, Ctrl-C (or the
    SIGTERM the CLI turns into one) and after it ends. Never raises for the step's failure:
    the result says what happened and the judge decides. A command that cannot be started
    at all is a :class:`Step5Error`."""
    known: dict[int, psutil.Process] = {}
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    t0 = time.monotonic()
    try:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
    except OSError as exc:
        raise Step5Error(f"cannot start {command[0]!r}: {exc}") from None
    assert popen.stdout is not None
    pump = threading.Thread(target=_pump, args=(popen.stdout, tail, echo), name="step-output", daemon=True)
    pump.start()
    run = StepRun(command=list(command), pid=popen.pid)
    deadline = t0 + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = True
                logger.error("step pid %d timed out after %.1fs; stopping its process group", popen.pid, timeout_s)
                break
            try:
                popen.wait(timeout=min(_POLL_S, remaining))
                break
            except subprocess.TimeoutExpired:
                _remember_descendants(popen.pid, known)
    except KeyboardInterrupt as exc:
        run.interrupted = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
        logger.error("interrupted (%s): stopping step group %d", run.interrupted, popen.pid)
    finally:
        stopped, interrupted_while_stopping = stop_group(popen, known, grace_s)
        pump.join(timeout=REAP_TIMEOUT_S)  # the pipe ends once the stopped group is reaped
    run.interrupted = run.interrupted or interrupted_while_stopping
    run.returncode = popen.returncode
    run.duration_s = round(time.monotonic() - t0, 3)
    run.output_tail = list(tail)
    if not run.timed_out and not run.interrupted and stopped:
        run.leftovers = stopped
        logger.warning("step pid %d exited but left %d process(es) running; they were stopped", popen.pid, stopped)
    return run


def install_termination_as_interrupt() -> None:
    """Make SIGTERM and SIGHUP to the WATCHER behave like Ctrl-C (main thread only): one code path
    stops the step group, and the :class:`Terminated` raised names the signal for the decision log.
    The step runs in its own session, so a closed terminal (SIGHUP) reaches only the WATCHER: left
    to its default action it would end the WATCHER and leave the step running unwatched."""

    def _handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGHUP, _handler)

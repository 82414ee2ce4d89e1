"""Ctrl-C, SIGTERM and SIGHUP for the optimizer's run, in a form CPython cannot lose.

CPython runs a signal handler between two bytecodes of the main thread, whatever they
belong to; when they belong to a finalizer, a GC or ctypes callback, the exception the
handler raises is printed as "Exception ignored in ..." and dropped, and the run goes on (a
dropped SIGTERM is worse: further SIGTERMs are ignored during cleanup). So the handlers
latch the interrupt as well as raising it, and the search loop calls
:func:`raise_if_interrupted` before each batch: a dropped interrupt takes effect there.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any, Iterator

from step5.errors import Terminated

_latched: KeyboardInterrupt | None = None


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _latched
    if signum != signal.SIGINT:
        # Further SIGTERMs and SIGHUPs cannot interrupt the cleanup this one starts; a supervisor
        # that will not wait still has SIGKILL (workers have a parent-death lifeline).
        for ignored in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(ignored, signal.SIG_IGN)
    _latched = _interrupt(signum)
    raise _interrupt(signum)


def raise_if_interrupted() -> None:
    """Raise the interrupt that arrived since :func:`latched_interrupts` was entered, if
    any; again at every call, so a loop that somehow went on stops at its next check."""
    if _latched is not None:
        raise _latched


def delivered(exc: BaseException) -> BaseException:
    """The interrupt that really arrived, for ``exc`` caught on its way out. A library may replace whatever
    a signal handler raised inside it with a plain KeyboardInterrupt of its own (catboost's fit does), which
    would report a SIGTERM as Ctrl-C (exit 130, trials "interrupted by Ctrl-C"); the latch still knows."""
    if type(exc) is KeyboardInterrupt and isinstance(_latched, Terminated):
        return _latched
    return exc


@contextmanager
def latched_interrupts() -> Iterator[bool]:
    """Handle SIGINT, SIGTERM and SIGHUP (a closed terminal: stop as on SIGTERM, cleaning up, rather than
    die where it stands) as above for the duration; yields whether the handlers are installed (False off
    the main thread, where Python cannot install them). A SIGHUP ignored on entry (``nohup``) stays ignored."""
    global _latched
    _latched = None
    previous: dict[int, Any] = {}
    with suppress(ValueError):  # not the main thread
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield bool(previous)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _latched = None

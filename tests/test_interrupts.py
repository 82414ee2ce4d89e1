"""The optimizer's interrupts (step5.interrupts): which signals stop a run cleanly, and what they say."""
from __future__ import annotations

import os
import signal

import pytest

from step5.errors import Terminated, interrupt_reason
from step5.interrupts import delivered, latched_interrupts, raise_if_interrupted


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_a_closed_terminal_stop_the_run_as_terminated(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with latched_interrupts() as handled:
        assert handled
        with pytest.raises(Terminated) as info:
            os.kill(os.getpid(), signum)  # the handler runs before the next bytecode
        name = signal.Signals(signum).name
        assert info.value.exit_code == 128 + signum and interrupt_reason(info.value) == f"interrupted by {name}"
        # A second SIGTERM or hangup cannot interrupt the cleanup the first one started.
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        with pytest.raises(Terminated):  # and a loop that somehow went on stops at its next check
            raise_if_interrupted()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_hangup_ignored_on_entry_stays_ignored_as_nohup_asks():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with latched_interrupts():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
            raise_if_interrupted()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_terminated_keeps_its_signal_through_a_copy_or_a_pickle():
    import copy
    import pickle

    for exc in (Terminated(signal.SIGHUP), copy.copy(Terminated(signal.SIGHUP)),
                pickle.loads(pickle.dumps(Terminated(signal.SIGHUP)))):
        assert (exc.signal_name, exc.exit_code, str(exc)) == ("SIGHUP", 129, "SIGHUP")
    assert Terminated().exit_code == 143


def test_a_plain_keyboard_interrupt_a_library_raised_for_a_sigterm_is_delivered_as_the_sigterm():
    plain = KeyboardInterrupt()  # catboost's fit raises one of its own for whatever a handler raised
    with latched_interrupts():
        assert delivered(plain) is plain  # nothing arrived: a real Ctrl-C of the library's own
        with pytest.raises(Terminated) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(delivered(plain), Terminated) and delivered(plain).exit_code == 128 + signal.SIGTERM
        assert delivered(info.value) is info.value
    with latched_interrupts():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert delivered(plain) is plain  # a Ctrl-C stays a Ctrl-C

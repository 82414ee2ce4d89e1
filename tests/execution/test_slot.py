"""The slot's restart/fallback state machine and a job's retry budget: pure tables, no processes."""
from __future__ import annotations

import pytest

from step5.execution.slot import JobAttempts, JobVerdict, SlotAction, SlotMachine

R, F, X = SlotAction.RESTART, SlotAction.FALLBACK, SlotAction.REPLACE

# Each row: max_restarts, events in order, the actions they produced, (restarts, fallback) at the end.
SLOT_TABLE = [
    pytest.param(1, ["crash"], [R], (1, False), id="first-crash-restarts"),
    pytest.param(1, ["crash", "hang"], [R, F], (1, True), id="second-fault-falls-back"),
    pytest.param(0, ["protocol"], [F], (0, True), id="no-budget-falls-back-at-once"),
    pytest.param(2, ["boot", "crash", "hang"], [R, R, F], (2, True), id="budget-of-two"),
    pytest.param(1, ["timeout"], [X], (0, False), id="timeout-replaces-without-budget"),
    pytest.param(1, ["timeout"] * 5, [X] * 5, (0, False), id="timeouts-never-fall-back"),
    pytest.param(1, ["timeout", "crash", "timeout"], [X, R, X], (1, False), id="timeouts-between-faults"),
    pytest.param(1, ["crash", "timeout", "crash"], [R, X, F], (1, True), id="fault-after-timeout-counts"),
]


@pytest.mark.parametrize("max_restarts, events, actions, end", SLOT_TABLE)
def test_slot_machine_table(max_restarts, events, actions, end):
    machine = SlotMachine(max_restarts)
    got = [machine.on_job_timeout() if e == "timeout" else machine.on_fault(e) for e in events]
    assert got == actions
    assert (machine.restarts, machine.fallback) == end


def test_a_fallen_back_slot_has_no_worker_to_fault_or_replace():
    machine = SlotMachine(0)
    assert machine.on_fault("crash") is F
    with pytest.raises(AssertionError):
        machine.on_fault("crash")
    with pytest.raises(AssertionError):
        machine.on_job_timeout()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="max_restarts"):
        SlotMachine(-1)
    with pytest.raises(ValueError, match="unknown worker fault kind 'timeout'"):
        SlotMachine(1).on_fault("timeout")  # a timeout is not a worker fault


# Each row: max one-shot retries, events, verdicts.
JOB_TABLE = [
    pytest.param(1, ["timeout", "timeout"], ["retry", "give_up"], id="timeout-retried-once"),
    pytest.param(5, ["timeout", "timeout"], ["retry", "give_up"], id="timeout-budget-ignores-crash-budget"),
    pytest.param(1, ["crash", "crash"], ["retry", "give_up"], id="oneshot-crash-retried-max-times"),
    pytest.param(0, ["crash"], ["give_up"], id="no-oneshot-retries"),
    pytest.param(2, ["crash", "timeout", "crash", "timeout"], ["retry", "retry", "retry", "give_up"],
                 id="separate-budgets"),
]


@pytest.mark.parametrize("max_retries, events, verdicts", JOB_TABLE)
def test_job_attempts_table(max_retries, events, verdicts):
    attempts = JobAttempts(max_retries)
    got = [(attempts.on_timeout() if e == "timeout" else attempts.on_oneshot_crash()).value for e in events]
    assert got == verdicts
    assert all(isinstance(JobVerdict(v), JobVerdict) for v in got)

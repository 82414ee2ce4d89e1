"""The slot's restart/fallback state machine and a job's retry budget: pure tables, no processes."""
from __future__ import annotations

import pytest

from step5.execution.slot import FaultBudget, JobAttempts, JobVerdict, SlotAction, SlotMachine

R, F = SlotAction.RESTART, SlotAction.FALLBACK
X = None  # a job timeout replaces the worker and changes nothing in the machine

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


# Re-promotion. Each row: (max_restarts, cooldown_s, max_repromotions), events as
# ("fault", t) or ("job", t) (a job about to start on the slot at time t), what each
# produced (an action for a fault, True/False "re-promoted?" for a job), and
# (restarts, fallback, repromotions) at the end.
PROMOTE_TABLE = [
    pytest.param((0, 10.0, 3), [("fault", 0), ("job", 5), ("job", 10)], [F, False, True], (0, False, 1),
                 id="re-promoted-after-the-cool-down"),
    pytest.param((0, 10.0, 3), [("fault", 0), ("job", 10), ("fault", 12), ("job", 25), ("job", 32)],
                 [F, True, F, False, True], (0, False, 2), id="cool-down-doubles"),
    pytest.param((0, 1.0, 1), [("fault", 0), ("job", 1), ("fault", 1), ("job", 100)], [F, True, F, False],
                 (0, True, 1), id="cap-reached-stays-in-fallback"),
    pytest.param((0, 1.0, 0), [("fault", 0), ("job", 1e9)], [F, False], (0, True, 0), id="zero-never-re-promotes"),
    pytest.param((1, 1.0, 2), [("fault", 0), ("fault", 1), ("job", 2), ("fault", 3)], [R, F, True, F],
                 (1, True, 1), id="re-promoted-worker-gets-no-new-restart"),
    pytest.param((1, 1.0, 2), [("job", 100), ("fault", 0)], [False, R], (1, False, 0), id="a-worker-slot-is-not-promoted"),
]


@pytest.mark.parametrize("config, events, produced, end", PROMOTE_TABLE)
def test_slot_re_promotion_table(config, events, produced, end):
    max_restarts, cooldown_s, max_repromotions = config
    machine = SlotMachine(max_restarts, cooldown_s=cooldown_s, max_repromotions=max_repromotions)
    got = [machine.on_fault("crash", t) if e == "fault" else machine.try_repromote(t) for e, t in events]
    assert got == produced
    assert (machine.restarts, machine.fallback, machine.repromotions) == end


def test_bad_re_promotion_arguments_are_rejected():
    with pytest.raises(ValueError, match="cooldown_s"):
        SlotMachine(1, cooldown_s=0.0)
    with pytest.raises(ValueError, match="max_repromotions"):
        SlotMachine(1, max_repromotions=-1)


# Each row: (max job re-runs, run budget), events ("timeout" / "fault"), verdicts, why the last re-run was refused.
JOB_TABLE = [
    pytest.param((1, 9), ["timeout", "timeout"], ["retry", "give_up"], "", id="timeout-retried-once"),
    pytest.param((5, 9), ["timeout", "timeout"], ["retry", "give_up"], "", id="timeout-ignores-fault-budget"),
    pytest.param((1, 9), ["fault", "fault"], ["retry", "give_up"], "max_job_reruns", id="job-limit"),
    pytest.param((0, 9), ["fault"], ["give_up"], "max_job_reruns", id="no-job-reruns"),
    pytest.param((9, 2), ["fault", "fault", "fault"], ["retry", "retry", "give_up"], "max_fault_reruns",
                 id="run-budget-spent"),
    pytest.param((2, 9), ["fault", "timeout", "fault", "timeout"], ["retry", "retry", "retry", "give_up"], "",
                 id="separate-budgets"),
]


@pytest.mark.parametrize("limits, events, verdicts, refused", JOB_TABLE)
def test_job_attempts_table(limits, events, verdicts, refused):
    max_reruns, budget = limits
    attempts = JobAttempts(max_reruns, FaultBudget(budget))
    got = [(attempts.on_timeout() if e == "timeout" else attempts.on_fault()).value for e in events]
    assert got == verdicts
    assert all(isinstance(JobVerdict(v), JobVerdict) for v in got)
    assert (refused in attempts.refused) if refused else attempts.refused == ""


def test_the_fault_budget_is_shared_by_every_job_of_the_run():
    budget = FaultBudget(2)
    first, second, third = (JobAttempts(5, budget) for _ in range(3))
    assert first.on_fault() is JobVerdict.RETRY and second.on_fault() is JobVerdict.RETRY
    assert third.on_fault() is JobVerdict.GIVE_UP and "fault budget of 2" in third.refused
    assert (budget.reruns, budget.refused) == (2, 1)
    JobAttempts(0, budget).on_fault()  # the job's own limit refuses too
    assert (budget.reruns, budget.refused) == (2, 2)


def test_a_retired_slot_is_never_re_promoted():
    machine = SlotMachine(0, cooldown_s=1.0, max_repromotions=3)
    assert machine.on_fault("boot", 0.0) is F
    machine.retire()
    assert machine.retired and machine.fallback
    assert machine.try_repromote(1e9) is False
    assert machine.repromotions == 0

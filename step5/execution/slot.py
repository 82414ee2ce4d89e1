"""What happens to a device slot after a fault or a timeout: pure logic, no processes.

::

                 fault, restarts < max                fault, restarts == max
      ┌────────────── restart ──────────────┐     ┌──────── fall back ────────┐
      ▼                                     │     │                           ▼
    WORKER ──job timeout──▶ replace the worker (restarts unchanged)      FALLBACK (one-shot
      ▲  ▲                      │                                        subprocesses)
      │  └──────────────────────┘                                            │
      └──── re-promote: one fresh worker, after the cool-down ───────────────┘
            (cool-down x2 each time; at most `max_repromotions` times, then for good)
                                                                             │
                                      a one-shot trainer cannot set up torch │
                                                                             ▼
                                                      RETIRED (no more jobs, for good; also a
                                                      slot the host's memory holds no worker for)

A *fault* is the worker's and counts against the slot's restart budget; a *job timeout*
is the job's (its worker kept answering probes): the worker is replaced, the slot keeps its
budget. A slot whose one-shot trainer cannot even set up torch or its device is *retired*:
its jobs go to the other slots. docs/workers.md, "Fault handling", has the rules and why.
Only the thread that holds the slot calls these objects (:mod:`step5.execution.pool`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum

#: Kinds of worker fault (each one counts against the slot's restart budget).
WORKER_FAULTS = ("crash", "hang", "protocol", "boot")


class SlotAction(str, Enum):
    RESTART = "restart"  # start a new worker, retry the job on it
    FALLBACK = "fallback"  # no more workers on this slot: one-shot subprocesses from now on


class JobVerdict(str, Enum):
    RETRY = "retry"  # run the job again
    GIVE_UP = "give_up"  # the job fails (a JobError with error_type "timeout" or "train_error")


@dataclass
class SlotMachine:
    """A slot's restart budget and mode."""
    max_restarts: int
    cooldown_s: float = float("inf")  # first fallback -> re-promotion wait; doubles each time
    max_repromotions: int = 0
    restarts: int = 0
    fallback: bool = False
    repromotions: int = 0
    fell_back_at: float | None = None  # the clock's reading at the last fallback
    retired: bool = False  # no process can train here: the slot takes no more jobs

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"`max_restarts` must be >= 0, got {self.max_restarts!r}")
        if self.max_repromotions < 0:
            raise ValueError(f"`max_repromotions` must be >= 0, got {self.max_repromotions!r}")
        if not self.cooldown_s > 0:
            raise ValueError(f"`cooldown_s` must be > 0, got {self.cooldown_s!r}")

    def try_repromote(self, now: float) -> bool:
        """Before a fallen-back slot's next job: try a fresh worker again? (``now``: the
        same clock :meth:`on_fault` was given.)"""
        if not self.fallback or self.retired or self.repromotions >= self.max_repromotions:
            return False
        assert self.fell_back_at is not None
        if now - self.fell_back_at < self.cooldown_s * 2 ** self.repromotions:
            return False
        self.fallback = False
        self.repromotions += 1
        return True

    def on_fault(self, kind: str, now: float = 0.0) -> SlotAction:
        """The worker faulted (its process is already gone) at ``now`` (a monotonic clock)."""
        if kind not in WORKER_FAULTS:
            raise ValueError(f"unknown worker fault kind {kind!r}; expected one of {WORKER_FAULTS}")
        if self.fallback:
            raise AssertionError("a fallen-back slot has no worker to fault")
        if self.restarts < self.max_restarts:
            self.restarts += 1
            return SlotAction.RESTART
        self.fallback = True
        self.fell_back_at = now
        return SlotAction.FALLBACK

    def retire(self) -> None:
        """The slot takes no more jobs, for good: no trainer can set up torch or its device there
        (a fresh worker could not either, so it is never re-promoted), or the host's memory holds
        no worker for it."""
        self.retired = True

    def on_job_timeout(self) -> None:
        """A job ran past its timeout while its worker answered liveness probes: the worker
        is replaced without using the restart budget (nothing here changes)."""
        if self.fallback:
            raise AssertionError("a fallen-back slot has no worker to replace")


class FaultBudget:
    """The run's re-runs after infrastructure faults, shared by every slot (thread-safe)."""

    def __init__(self, max_reruns: int) -> None:
        if max_reruns < 0:
            raise ValueError(f"`max_reruns` must be >= 0, got {max_reruns!r}")
        self.max_reruns = max_reruns
        self.reruns = 0  # re-runs granted
        self.refused = 0  # re-runs refused (the budget was spent, or the job's own limit reached)
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One re-run, if the budget has one left."""
        with self._lock:
            if self.reruns < self.max_reruns:
                self.reruns += 1
                return True
            self.refused += 1
            return False

    def refuse(self) -> None:
        """Count a re-run refused by the job's own limit (the budget itself had one left)."""
        with self._lock:
            self.refused += 1


@dataclass
class JobAttempts:
    """One job's retries: an infrastructure fault re-runs it up to ``max_reruns`` times while
    the run's :class:`FaultBudget` lasts; a timeout retries it once."""
    max_reruns: int
    budget: FaultBudget
    timeouts: int = 0
    faults: int = 0
    refused: str = ""  # why the last re-run was refused ("" while none was): for the job's failure message

    def on_timeout(self) -> JobVerdict:
        self.timeouts += 1
        return JobVerdict.RETRY if self.timeouts < 2 else JobVerdict.GIVE_UP

    def on_fault(self) -> JobVerdict:
        """The job's process died under it (not the job's doing)."""
        self.faults += 1
        if self.faults > self.max_reruns:
            self.refused = f"its own limit of {self.max_reruns} re-run(s) is reached (training.max_job_reruns)"
            self.budget.refuse()
            return JobVerdict.GIVE_UP
        if not self.budget.take():
            self.refused = (f"the run's fault budget of {self.budget.max_reruns} re-run(s) is spent "
                            "(training.max_fault_reruns)")
            return JobVerdict.GIVE_UP
        return JobVerdict.RETRY

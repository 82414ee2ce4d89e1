"""What happens to a device slot after a fault or a timeout: pure logic, no processes.

::

                 fault, restarts < max                fault, restarts == max
      ┌────────────── restart ──────────────┐     ┌──────── fall back ────────┐
      ▼                                     │     │                           ▼
    WORKER ──job timeout──▶ replace the worker (restarts unchanged)      FALLBACK (for good:
      ▲                         │                                        one-shot subprocesses)
      └─────────────────────────┘

A *fault* is the worker's: it crashed (EOF, broken pipe, exit), hung (stopped answering
heartbeats), broke the protocol, or failed to boot. A *job timeout* is the job's: the
worker kept answering heartbeats but the job ran past its timeout. The worker is replaced
(the only way to stop a job in a single-threaded trainer) but the slot keeps its restart
budget and never falls back for it. The job itself is retried once; its second timeout is
its verdict (:data:`JobVerdict`), so a job that can never finish costs about twice its
timeout, not four timeouts and a demoted slot.

The pool asks these objects what to do and acts; only the thread that holds the slot
calls them (the ownership rule in :mod:`step5.execution.pool`).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

#: Kinds of worker fault (each one counts against the slot's restart budget).
WORKER_FAULTS = ("crash", "hang", "protocol", "boot")


class SlotAction(str, Enum):
    RESTART = "restart"  # start a new worker, retry the job on it
    REPLACE = "replace"  # start a new worker without using the restart budget (job timeout)
    FALLBACK = "fallback"  # no more workers on this slot: one-shot subprocesses from now on


class JobVerdict(str, Enum):
    RETRY = "retry"  # run the job again
    GIVE_UP = "give_up"  # the job fails (a JobError with error_type "timeout" or "train_error")


@dataclass
class SlotMachine:
    """A slot's restart budget and mode."""

    max_restarts: int
    restarts: int = 0
    fallback: bool = False

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"`max_restarts` must be >= 0, got {self.max_restarts!r}")

    def on_fault(self, kind: str) -> SlotAction:
        """The worker faulted (its process is already gone)."""
        if kind not in WORKER_FAULTS:
            raise ValueError(f"unknown worker fault kind {kind!r}; expected one of {WORKER_FAULTS}")
        if self.fallback:
            raise AssertionError("a fallen-back slot has no worker to fault")
        if self.restarts < self.max_restarts:
            self.restarts += 1
            return SlotAction.RESTART
        self.fallback = True
        return SlotAction.FALLBACK

    def on_job_timeout(self) -> SlotAction:
        """A job ran past its timeout while its worker answered heartbeats."""
        if self.fallback:
            raise AssertionError("a fallen-back slot has no worker to replace")
        return SlotAction.REPLACE


@dataclass
class JobAttempts:
    """One job's retries: worker faults retry it (the slot's budget bounds them), a timeout
    retries it once, and one-shot crashes retry it ``max_oneshot_retries`` times."""

    max_oneshot_retries: int
    timeouts: int = 0
    oneshot_crashes: int = 0

    def on_timeout(self) -> JobVerdict:
        self.timeouts += 1
        return JobVerdict.RETRY if self.timeouts < 2 else JobVerdict.GIVE_UP

    def on_oneshot_crash(self) -> JobVerdict:
        self.oneshot_crashes += 1
        return JobVerdict.RETRY if self.oneshot_crashes <= self.max_oneshot_retries else JobVerdict.GIVE_UP

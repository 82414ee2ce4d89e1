"""Every exception Step 5 defines: one flat hierarchy under :class:`Step5Error`.

Each class carries the process exit code the CLIs use when it escapes to the top (SPEC:
0 ok, 1 error, 2 degenerate, 64 usage; an interrupt 130 or 143): the one place exit codes
are defined. Job-level failures also carry an ``error_type`` that travels over the worker
protocol (:data:`JOB_ERROR_TYPES`).

==========================  ====  =========================================================
class                       exit  raised when
==========================  ====  =========================================================
``Step5Error``              1     any failure Step 5 reports to the user (the base)
``UsageError``              64    command-line arguments are inconsistent
``DataError``               1     an input file (survivors, history, NPZ, sidecar) is
                                  missing or malformed
``SchemaError``             1     a JSON document (sidecar, policy, summary) does not fit
                                  its schema (a ``DataError``)
``MissingDependency``       1     a tree model type is used without ``step5[trees]``
``PolicyError``             1     ``watcher_policies.json`` is unreadable or invalid
``DegenerateSignalError``   2     the target has no usable signal (degenerate sidecar)
``PredictionNotAllowed``    2     Step 6 loads a sidecar whose run found no signal
``StudyMismatchError``      1     a shared study was recorded for other data or setup
``TooManyFailedTrials``     1     so many trials failed in a row that the search stops
``StorageError``            1     the study's database stayed unreachable past
                                  ``training.storage_outage_s``, or failed in a way
                                  waiting cannot fix (credentials, a missing table)
``JobError``                1     a training job failed deterministically (bad data, bad
                                  params, OOM): not retried, it would fail the same way
``BadRequest``              1     a protocol request is malformed (a ``JobError``)
``WorkerCrashed``           1     a training process died, hung or broke the protocol
``WorkerFault``             1     the pool's worker did so, or failed to boot (a
                                  ``WorkerCrashed`` + ``kind``; already dead)
``JobTimedOut``             1     a job ran past its timeout in a healthy process (not a
                                  worker fault; retried once, then ``error_type`` timeout)
``RunnerClosed``            1     a job meets a closed fold runner (pool or one-shot)
``FrameTooLarge``           --    a protocol line exceeds the reader's bound (handled by
                                  the reader's owner, never reaches a CLI)
``Terminated``              143   SIGTERM arrived; a ``KeyboardInterrupt``, not a
                                  ``Step5Error``, so every ``finally`` runs as on Ctrl-C
==========================  ====  =========================================================

Not here, on purpose: exceptions private to one module that never leave it, and
``step5.testing.postgres.PostgresUnavailable`` (test tooling: no Step 5 code path raises it).
"""
from __future__ import annotations

import signal
from typing import Any

#: A run that ended well. Every failure's exit code is its exception class's ``exit_code``.
EXIT_OK = 0
#: Interrupted by Ctrl-C (SIGINT), as shells report it; SIGTERM: :attr:`Terminated.exit_code`.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: The WATCHER's own final decisions (step5.watcher.judge); PROCEED exits 0, DEGENERATE 2.
EXIT_SKIP_MODEL = 3
EXIT_ESCALATE = 4
#: A worker or one-shot trainer that found itself orphaned (step5.lifeline); nobody is left to
#: read it, it only makes the cause visible when a human runs the worker by hand.
EXIT_ORPHANED = 3

#: ``error_type`` values a training job may fail with (SPEC section 6). ``timeout`` is the
#: parent's verdict on a job that ran past its timeout twice; no trainer sends it.
JOB_ERROR_TYPES = ("bad_request", "data_error", "train_error", "out_of_memory", "timeout")


#: How libraries word a failed allocation they report as a generic exception: torch's
#: ``RuntimeError`` from the CPU allocator, a tree library's own error class.
_OUT_OF_MEMORY_WORDING = ("out of memory", "can't allocate memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException, oom_types: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``exc`` is a failed allocation (a job's ``out_of_memory``): a ``MemoryError``, one of
    ``oom_types`` (the torch side passes torch's; this module stays torch-free), or one whose message says so."""
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    text = str(exc).lower()
    return any(wording in text for wording in _OUT_OF_MEMORY_WORDING)


class Terminated(KeyboardInterrupt):
    exit_code = 128 + signal.SIGTERM


def interrupt_reason(exc: BaseException) -> str:
    """The ``fail_reason`` of a trial an interrupt stopped."""
    return "interrupted by SIGTERM" if isinstance(exc, Terminated) else "interrupted by Ctrl-C (SIGINT)"


class Step5Error(Exception):
    exit_code = 1


class UsageError(Step5Error):
    exit_code = 64


class DataError(Step5Error):
    """An input file (survivors, history, NPZ, sidecar) is missing or malformed."""


class SchemaError(DataError, ValueError):
    """A JSON document does not fit its schema (:func:`step5.schema.convert`: one line saying where
    and what); a reader that knows the document may re-raise it as its own (a policy's: :class:`PolicyError`)."""


class MissingDependency(Step5Error):
    """An optional part is used without its extra installed (a tree model type without ``step5[trees]``)."""


class PolicyError(Step5Error):
    """``watcher_policies.json`` cannot be read or fails validation."""


class DegenerateSignalError(Step5Error):
    exit_code = 2


class PredictionNotAllowed(Step5Error):
    exit_code = 2


class StudyMismatchError(Step5Error):
    """A process's data or setup differs from what the shared study recorded."""


class TooManyFailedTrials(Step5Error):
    """So many trials failed in a row that replacing them looks endless."""


class StorageError(Step5Error):
    """The study's database stayed unreachable past ``training.storage_outage_s``, or failed in a
    way waiting cannot fix; the message names it, password redacted (:mod:`step5.optimizer.storage`)."""


class JobError(Step5Error):
    def __init__(self, message: str, error_type: str = "train_error", *, trial_number: int | None = None,
                 fold_idx: int | None = None, job_id: Any = None, traceback: str | None = None) -> None:
        if error_type not in JOB_ERROR_TYPES:
            raise ValueError(f"`error_type` must be one of {JOB_ERROR_TYPES}, got {error_type!r}")
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.trial_number = trial_number
        self.fold_idx = fold_idx
        self.job_id = job_id
        self.traceback = traceback

    def to_dict(self) -> dict[str, Any]:
        """The protocol's error response for this failure."""
        out: dict[str, Any] = {"status": "error", "error": self.message, "error_type": self.error_type,
                               "trial_number": self.trial_number, "fold_idx": self.fold_idx, "job_id": self.job_id}
        if self.traceback:
            out["traceback"] = self.traceback
        return out

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "JobError":
        """Rebuild the error from a worker's ``{"status": "error", ...}`` response."""
        error_type = payload.get("error_type")
        if error_type not in JOB_ERROR_TYPES:
            error_type = "train_error"
        return cls(str(payload.get("error", "unknown error")), error_type, trial_number=payload.get("trial_number"),
                   fold_idx=payload.get("fold_idx"), job_id=payload.get("job_id"), traceback=payload.get("traceback"))


class BadRequest(JobError):
    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, "bad_request", **kwargs)


class WorkerCrashed(Step5Error):
    def __init__(self, message: str, *, exit_status: str | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class JobTimedOut(Step5Error):
    def __init__(self, message: str, *, timeout_s: float, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        self.exit_status = "TIMEOUT"
        self.stderr_tail = stderr_tail


class WorkerFault(WorkerCrashed):
    def __init__(self, message: str, *, kind: str, exit_status: str | None, stderr_tail: str) -> None:
        super().__init__(message, exit_status=exit_status, stderr_tail=stderr_tail)
        self.kind = kind


class RunnerClosed(Step5Error):
    """A job meets a fold runner (the pool or the one-shot runner) closed by ``close()`` or an abort."""


class FrameTooLarge(Step5Error):
    def __init__(self, limit: int, seen: int, *, at_eof: bool) -> None:
        super().__init__(f"line of at least {seen} bytes exceeds the {limit}-byte frame limit")
        self.limit = limit
        self.seen = seen  # bytes consumed from the stream for this line
        self.at_eof = at_eof  # the oversize line ran into end of stream (no newline)

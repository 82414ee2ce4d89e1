"""Every exception Step 5 defines, one flat hierarchy under :class:`Step5Error`, and every exit code
(each class's ``exit_code``): docs/errors.md has the table."""
from __future__ import annotations

import signal
from typing import Any

EXIT_OK = 0
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C, as shells report it; SIGTERM, SIGHUP: Terminated.exit_code
EXIT_SKIP_MODEL = 3  # the WATCHER's own final decisions (step5.watcher.judge)
EXIT_ESCALATE = 4
EXIT_ORPHANED = 3  # a worker or one-shot trainer whose parent is gone (step5.lifeline)

#: ``error_type`` values a training job may fail with (SPEC section 6; ``timeout`` and ``startup_error``, a
#: one-shot trainer that could not set up torch or its device, so no job can run there: docs/errors.md).
JOB_ERROR_TYPES = ("bad_request", "data_error", "train_error", "out_of_memory", "timeout", "startup_error")


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
    """Raised when SIGTERM arrives, or SIGHUP (the terminal closed); not a Step5Error, so every ``finally``
    runs as on Ctrl-C. ``exit_code``: 128 + the signal, as shells report it."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(self.signal_name)

    def __reduce__(self) -> tuple[type[Terminated], tuple[int]]:  # a copy or a pickle keeps its signal
        return Terminated, (self.exit_code - 128,)


def interrupt_reason(exc: BaseException) -> str:
    """The ``fail_reason`` of a trial an interrupt stopped."""
    return f"interrupted by {exc.signal_name}" if isinstance(exc, Terminated) else "interrupted by Ctrl-C (SIGINT)"


class Step5Error(Exception):
    """Raised for any failure Step 5 reports to the user (the base)."""

    exit_code = 1


class UsageError(Step5Error):
    """Raised when command-line arguments are inconsistent."""

    exit_code = 64


class DataError(Step5Error):
    """An input file (survivors, history, NPZ, sidecar) is missing or malformed."""


class SchemaError(DataError, ValueError):
    """A JSON document does not fit its schema (:func:`step5.schema.convert`: one line saying where and what)."""


class MissingDependency(Step5Error):
    """An optional part is used without its extra installed (a tree model type without ``step5[trees]``)."""


class PolicyError(Step5Error):
    """``watcher_policies.json`` cannot be read or fails validation."""


class DegenerateSignalError(Step5Error):
    """Raised when the target has no usable signal (a degenerate sidecar is written)."""

    exit_code = 2


class PredictionNotAllowed(Step5Error):
    """Raised when Step 6 loads a sidecar whose run found no signal."""

    exit_code = 2


class StudyMismatchError(Step5Error):
    """A process's data or setup differs from what the shared study recorded."""


class TooManyFailedTrials(Step5Error):
    """So many trials failed in a row that replacing them looks endless."""


class StorageError(Step5Error):
    """The study's database stayed unreachable past ``training.storage_outage_s``, or failed in a way waiting cannot fix."""


class JobError(Step5Error):
    """Raised when a training job failed deterministically (bad data, bad params, OOM): not retried."""

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
        """Rebuild the error from a worker's ``{"status": "error", ...}`` response. An ``error_type`` outside
        :data:`JOB_ERROR_TYPES` is a ValueError, not a ``train_error``: such a reply is a protocol fault, never a
        trial's verdict (the parent checks replies first: ``step5.execution.process.reply_problem``)."""
        return cls(str(payload.get("error", "unknown error")), payload.get("error_type"),
                   trial_number=payload.get("trial_number"), fold_idx=payload.get("fold_idx"),
                   job_id=payload.get("job_id"), traceback=payload.get("traceback"))


class BadRequest(JobError):
    """Raised when a protocol request is malformed."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, "bad_request", **kwargs)


class TrainerCannotStart(Step5Error):
    """Raised when no training process can start on the last slot left (its worker failed to boot, or it had
    none, and a one-shot trainer cannot set up torch or the device): every job would fail the same way, so the
    run stops. The pool raises it inside itself for any slot, and retires that slot while others remain."""


class WorkerCrashed(Step5Error):
    """Raised when a training process died, hung or broke the protocol."""

    def __init__(self, message: str, *, exit_status: str | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class JobTimedOut(Step5Error):
    """Raised when a job ran past its timeout in a healthy process (retried once, then ``timeout``)."""

    def __init__(self, message: str, *, timeout_s: float, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        self.exit_status = "TIMEOUT"
        self.stderr_tail = stderr_tail


class WorkerFault(WorkerCrashed):
    """Raised when the pool's worker crashed or failed to boot (``kind`` says how; it is already dead)."""

    def __init__(self, message: str, *, kind: str, exit_status: str | None, stderr_tail: str) -> None:
        super().__init__(message, exit_status=exit_status, stderr_tail=stderr_tail)
        self.kind = kind


class RunnerClosed(Step5Error):
    """A job meets a fold runner (the pool or the one-shot runner) closed by ``close()`` or an abort."""


class FrameTooLarge(Step5Error):
    """Raised when a protocol line exceeds the reader's bound (its owner handles it; never reaches a CLI)."""

    def __init__(self, limit: int, seen: int, *, at_eof: bool) -> None:
        super().__init__(f"line of at least {seen} bytes exceeds the {limit}-byte frame limit")
        self.limit = limit
        self.seen = seen  # bytes consumed from the stream for this line
        self.at_eof = at_eof  # the oversize line ran into end of stream (no newline)

"""One job, one fresh ``train_single_trial.py`` process: the one retrying one-shot path.

The one-shot trainer is a worker serving one job: it is started with ``--request -``, reads
the same JSON request a persistent worker reads, answers with the same reply and exits
(:mod:`step5.nn.oneshot`). So :func:`run_oneshot_job` talks to it through the pool's own
endpoint (:class:`~step5.execution.worker_process.WorkerProcess`): the same pipes, the
same crash reading. :class:`OneshotTrainer` retries: a crashed trainer (no reply, a
signal, garbage, an exit that does not match its reply: an infrastructure fault) is re-run
with the same request and seed while the job's and the run's fault budgets last, a
timed-out one once (:class:`~step5.execution.slot.JobAttempts`); a job error is never
retried. Every slot of a one-shot pool (S96A) and every fallen-back slot of a persistent
pool (S96B) runs its jobs here.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from step5.devices import DeviceSlot
from step5.errors import JobError, JobTimedOut, WorkerCrashed, WorkerFault
from step5.execution.process import LiveProcesses, describe_exit
from step5.execution.slot import FaultBudget, JobAttempts, JobVerdict
from step5.execution.summary import FaultRecord
from step5.execution.worker_process import WorkerProcess, popen_worker
from step5.launch import ONESHOT_MODULE, module_command
from step5.protocol import Job

logger = logging.getLogger(__name__)


def oneshot_command(python: str = sys.executable, *, script: str | Path | None = None) -> list[str]:
    """The one-shot trainer's command line, reading its request from stdin: the package's
    module behind ``train_single_trial.py`` (``script`` replaces it: tests pass the fake worker)."""
    program = module_command(ONESHOT_MODULE, python) if script is None else [python, str(script)]
    return [*program, "--request", "-"]


def run_oneshot_job(
    request: Job,
    slot: DeviceSlot,
    *,
    timeout_s: float,
    python: str = sys.executable,
    script: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    live: LiveProcesses | None = None,
) -> dict[str, Any]:
    """Run one job in a fresh trainer process pinned to ``slot``: one attempt.

    Returns the reply (``job_id`` attached). Raises :class:`JobError` when the trainer
    reports a job failure, :class:`JobTimedOut` past ``timeout_s`` (the trainer and what it
    started are killed), :class:`WorkerCrashed` when it dies, writes anything but its one
    reply, or exits with a code that does not match it. ``env`` replaces
    ``slot.environment()``; while the process runs it is a member of ``live``, so an owner
    shutting down can kill it.
    """
    deadline = time.monotonic() + timeout_s
    proc = popen_worker(oneshot_command(python, script=script), slot.environment() if env is None else dict(env))
    live = live if live is not None else LiveProcesses()
    live.add(proc)
    trainer = WorkerProcess(f"{slot.label} one-shot", proc)
    doing = f"running job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx})"
    try:
        trainer.send(request, doing)
        trainer.close_stdin()
        reply = trainer.receive(deadline - time.monotonic(), doing)
        code = trainer.expect_exit(deadline - time.monotonic(), doing)
    except WorkerFault as fault:
        if fault.kind != "hang":
            raise
        raise JobTimedOut(f"one-shot trainer on {slot.label} exceeded the {timeout_s:g}s job timeout",
                          timeout_s=timeout_s, stderr_tail=fault.stderr_tail) from None
    except BaseException:  # Ctrl-C while waiting: do not leave the trainer behind
        trainer.kill()
        raise
    finally:
        live.discard(proc)
    status = reply.get("status")
    if code == 0 and status == "complete":
        return {**reply, "job_id": request.job_id}
    if code == JobError.exit_code and status == "error":
        raise JobError.from_dict({**reply, "job_id": request.job_id})
    raise WorkerCrashed(
        f"one-shot trainer on {slot.label} ended with {describe_exit(code)} after a {status!r} reply",
        exit_status=describe_exit(code), stderr_tail=trainer.stderr_tail(),
    )


@dataclass
class OneshotTrainer:
    """Runs a job in one-shot trainers until it has a verdict (the retrying path).

    ``check_open`` raises the owner's "closed" error (the pool's RunnerClosed) before each
    attempt and after a failed one: a trainer killed by its owner is neither a crash nor a
    timeout. ``record`` receives every fault, for the summary.
    """

    timeout_s: float
    budget: FaultBudget  # the run's, shared with the pool's workers
    max_job_reruns: int
    check_open: Callable[[], None]
    record: Callable[[FaultRecord], None]
    python: str = sys.executable
    script: str | Path | None = None
    live: LiveProcesses = field(default_factory=LiveProcesses)

    def run(self, request: Job, slot: DeviceSlot, attempts: JobAttempts | None = None) -> dict[str, Any]:
        """The job's result; a :class:`JobError` for its verdict. ``attempts`` carries the
        faults a job already met on a persistent worker before its slot fell back."""
        if attempts is None:
            attempts = JobAttempts(self.max_job_reruns, self.budget)
        while True:
            self.check_open()
            try:
                return run_oneshot_job(request, slot, timeout_s=self.timeout_s, python=self.python,
                                       script=self.script, live=self.live)
            except JobTimedOut as exc:
                self.check_open()
                verdict = attempts.on_timeout()
                self.record(FaultRecord(slot.label, "timeout", exc.exit_status, str(exc)))
                logger.warning("%s (timeout %d of at most 2); stderr tail:\n%s", exc, attempts.timeouts,
                               exc.stderr_tail or "(none)")
                if verdict is JobVerdict.GIVE_UP:
                    raise timeout_error(request, self.timeout_s, attempts.timeouts) from exc
            except WorkerCrashed as exc:
                self.check_open()
                verdict = attempts.on_fault()
                self.record(FaultRecord(slot.label, "oneshot", exc.exit_status, str(exc)))
                logger.warning("%s (fault %d of this job; %s); stderr tail:\n%s", exc, attempts.faults,
                               "re-running it with the same request and seed" if verdict is JobVerdict.RETRY
                               else "not re-run", exc.stderr_tail or "(none)")
                if verdict is JobVerdict.GIVE_UP:
                    raise fault_error(request, exc, attempts) from exc


def timeout_error(request: Job, timeout_s: float, attempts: int) -> JobError:
    """The verdict on a job that ran past its timeout on every attempt."""
    return JobError(
        f"job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx}) ran past its "
        f"{timeout_s:g}s timeout {attempts} time(s); raise training.worker_job_timeout_s or lower the epochs",
        "timeout", trial_number=request.trial_number, fold_idx=request.fold_idx, job_id=request.job_id,
    )


def fault_error(request: Job, fault: BaseException, attempts: JobAttempts) -> JobError:
    """The verdict on a job whose processes kept dying until no re-run was left."""
    return JobError(
        f"job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx}) was hit by "
        f"{attempts.faults} infrastructure fault(s), the last: {fault}; not re-run again: {attempts.refused}",
        "train_error", trial_number=request.trial_number, fold_idx=request.fold_idx, job_id=request.job_id,
    )

"""One job, one fresh ``train_single_trial.py`` process: one attempt of a one-shot job.

The one-shot trainer is a worker serving one job: it is started with ``--request -``, reads
the same JSON request a persistent worker reads, answers with the same reply and exits
(:mod:`step5.nn.oneshot`). So :func:`run_oneshot_job` talks to it through the pool's own
endpoint (:class:`~step5.execution.worker_process.WorkerProcess`): the same pipes, the
same crash reading. The pool (``WorkerPool._run_oneshot``) retries: a crashed trainer (no
reply, a signal, garbage, an exit that does not match its reply: an infrastructure fault)
is re-run with the same request and seed while the job's and the run's fault budgets last,
a timed-out one once (:class:`~step5.execution.slot.JobAttempts`); a job error is never
retried. Every slot of a one-shot pool (S96A) and every fallen-back slot of a persistent
pool (S96B) runs its jobs this way. :func:`timeout_error` and :func:`fault_error` are a
job's verdicts when its attempts run out, on a worker or here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

from step5.devices import DeviceSlot
from step5.errors import JobError, JobTimedOut, WorkerCrashed, WorkerFault
from step5.execution.process import LiveProcesses, describe_exit
from step5.execution.slot import JobAttempts
from step5.execution.worker_process import WorkerProcess, popen_worker
from step5.launch import ONESHOT_MODULE, module_command
from step5.protocol import Job


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

"""One job, one fresh ``train_single_trial.py`` process: the one retrying one-shot path.

Used by :class:`~step5.execution.runner.SubprocessRunner` (S96A) for every job and by the
worker pool for a slot that fell back. :func:`oneshot_command` is the one place the
trainer's command line is built; :func:`run_oneshot_job` runs one attempt;
:class:`OneshotTrainer` retries: a crashed trainer (no result line, a signal, an exit
other than 0/1/64: an infrastructure fault) is re-run with the same request and seed while
the job's and the run's fault budgets last, a timed-out one once
(:class:`~step5.execution.slot.JobAttempts`); a job error is never retried.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, MutableSet

from step5.devices import DeviceSlot
from step5.errors import JobError, JobTimedOut, WorkerCrashed
from step5.execution.process import (
    REAP_TIMEOUT_S, LiveProcesses, describe_exit, kill_tree, reap_killed, tail_lines,
)
from step5.execution.slot import FaultBudget, JobAttempts, JobVerdict
from step5.execution.summary import FaultRecord
from step5.jsonio import dumps, loads
from step5.launch import ONESHOT_MODULE, module_command
from step5.protocol import TrainRequest

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "best_model.pth"


def oneshot_command(
    request: TrainRequest, python: str = sys.executable, *, script: str | Path | None = None,
) -> list[str]:
    """The one-shot trainer's command line (``python -m step5.nn.oneshot``, the module behind
    ``train_single_trial.py``) equivalent to a ``train`` request.

    ``script`` replaces the trainer (tests pass the fake worker, which accepts the same flags).
    """
    program = module_command(ONESHOT_MODULE, python) if script is None else [python, str(script)]
    cmd = [
        *program,
        "--model-type", "neural_net",
        "--data-path", request.data_path,
        "--params", dumps(request.params.to_dict()).decode(),
        "--batch-mode", request.batch_mode,
        "--seed", str(request.seed),
    ]
    if request.trial_number is not None:
        cmd += ["--trial-number", str(request.trial_number)]
    if request.fold_idx is not None:
        cmd += ["--fold-idx", str(request.fold_idx)]
    if request.normalize_features:
        cmd.append("--normalize-features")
    if request.use_leaky_relu:
        cmd.append("--use-leaky-relu")
    if request.save_model_path is not None:
        target = Path(request.save_model_path)
        if target.name != CHECKPOINT_NAME:
            raise ValueError(f"the one-shot trainer saves only {CHECKPOINT_NAME}, got {target}")
        cmd += ["--save-model", "--model-output-dir", str(target.parent)]
    return cmd


def run_oneshot_job(
    request: TrainRequest,
    slot: DeviceSlot,
    *,
    timeout_s: float,
    python: str = sys.executable,
    script: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    live: MutableSet[subprocess.Popen[bytes]] | None = None,
) -> dict[str, Any]:
    """Train one fold in a fresh trainer process pinned to ``slot``: one attempt.

    Returns the result dict (``job_id`` attached). Raises :class:`JobError` when the
    trainer reports a job failure, :class:`JobTimedOut` past ``timeout_s`` (the trainer and
    what it started are killed), :class:`WorkerCrashed` when it dies or prints something
    that is not its one JSON line. ``env`` replaces ``slot.environment()``; while the
    process runs it is a member of ``live``, so an owner shutting down can kill it.
    """
    cmd = oneshot_command(request, python, script=script)
    proc = subprocess.Popen(
        cmd, env=slot.environment() if env is None else dict(env),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    if live is not None:
        live.add(proc)
    try:
        try:
            stdout, stderr_b = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            stderr_b = _stderr_after_kill(proc)
            raise JobTimedOut(
                f"one-shot trainer on {slot.label} exceeded the {timeout_s:g}s job timeout",
                timeout_s=timeout_s, stderr_tail=tail_lines(stderr_b.decode(errors="replace")),
            ) from None
        except BaseException:  # Ctrl-C while waiting: do not leave the trainer behind
            kill_tree(proc)
            reap_killed(proc, "one-shot trainer")
            raise
    finally:
        if live is not None:
            live.discard(proc)
    stderr = stderr_b.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.strip()]
    payload: Any = None
    if len(lines) == 1:
        try:
            payload = loads(lines[0])
        except ValueError:
            payload = None
    status = payload.get("status") if isinstance(payload, dict) else None
    if proc.returncode == 0 and status == "complete":
        payload["job_id"] = request.job_id
        return payload
    # The trainer exits 1 for a failed job and 64 (EX_USAGE) for a request it rejects; both
    # print their error object, and neither would go differently on a retry.
    if proc.returncode in (1, 64) and status == "error":
        payload["job_id"] = request.job_id
        raise JobError.from_dict(payload)
    raise WorkerCrashed(
        f"one-shot trainer on {slot.label} ended with {describe_exit(proc.returncode)} "
        f"and {len(lines)} stdout line(s) instead of one result",
        exit_status=describe_exit(proc.returncode), stderr_tail=tail_lines(stderr),
    )


def _stderr_after_kill(proc: subprocess.Popen[bytes]) -> bytes:
    """What a killed trainer left on stderr; gives up (closing the pipes) after a bound."""
    try:
        _, stderr_b = proc.communicate(timeout=REAP_TIMEOUT_S)
        return stderr_b or b""
    except subprocess.TimeoutExpired:
        logger.error("one-shot trainer %d: pipes still open %gs after SIGKILL; giving up on its output",
                     proc.pid, REAP_TIMEOUT_S)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        return b""


@dataclass
class OneshotTrainer:
    """Runs a job in one-shot trainers until it has a verdict (the retrying path).

    ``check_open`` raises the owner's "closed" error (the pool's RunnerClosed, the runner's
    abort) before each attempt and after a failed one: a trainer killed by its owner is
    neither a crash nor a timeout. ``record`` receives every fault, for the summary.
    """

    timeout_s: float
    budget: FaultBudget  # the run's, shared with the pool's workers
    max_job_reruns: int
    check_open: Callable[[], None]
    record: Callable[[FaultRecord], None]
    python: str = sys.executable
    script: str | Path | None = None
    live: LiveProcesses = field(default_factory=LiveProcesses)

    def run(
        self, request: TrainRequest, slot: DeviceSlot, env: Mapping[str, str] | None = None,
        attempts: JobAttempts | None = None,
    ) -> dict[str, Any]:
        """The job's result; a :class:`JobError` for its verdict. ``attempts`` carries the
        faults a job already met on a persistent worker before its slot fell back."""
        if attempts is None:
            attempts = JobAttempts(self.max_job_reruns, self.budget)
        while True:
            self.check_open()
            try:
                return run_oneshot_job(request, slot, timeout_s=self.timeout_s, python=self.python,
                                       script=self.script, env=env, live=self.live)
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


def timeout_error(request: TrainRequest, timeout_s: float, attempts: int) -> JobError:
    """The verdict on a job that ran past its timeout on every attempt."""
    return JobError(
        f"job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx}) ran past its "
        f"{timeout_s:g}s timeout {attempts} time(s); raise training.worker_job_timeout_s or lower the epochs",
        "timeout", trial_number=request.trial_number, fold_idx=request.fold_idx, job_id=request.job_id,
    )


def fault_error(request: TrainRequest, fault: BaseException, attempts: JobAttempts) -> JobError:
    """The verdict on a job whose processes kept dying until no re-run was left."""
    return JobError(
        f"job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx}) was hit by "
        f"{attempts.faults} infrastructure fault(s), the last: {fault}; not re-run again: {attempts.refused}",
        "train_error", trial_number=request.trial_number, fold_idx=request.fold_idx, job_id=request.job_id,
    )

"""The fold-runner interface and its one-shot implementation (the "S96A" path).

::

    optimizer ──run_jobs([req, req, ...])──▶ SubprocessRunner
                                               │  one thread per device slot
                                               ├─▶ python -m step5.nn.oneshot ... (slot CPU-0)
                                               └─▶ python -m step5.nn.oneshot ... (slot CPU-1)
                                                      │ one JSON line on stdout, exit 0 / 1
    optimizer ◀──results, in request order─────────────┘

A runner takes the K fold requests of a trial, trains them concurrently across its device
slots, and returns one result per request in order. A deterministic job failure (bad
data) raises :class:`~step5.errors.JobError` once every job of the batch has finished, so
no process is still busy when the trial is reported failed. A crashed process is not the
job's fault: the job is retried. Anything else that reaches ``run_jobs`` (Ctrl-C, SIGTERM
turned into ``KeyboardInterrupt``, a bug) kills every running trainer, reaps it and
propagates at once; the runner is closed after that.

``run_fused(groups)`` is the fused-training entry point the optimizer calls when folds (or
same-shape trials) should share one batched pass. A one-shot process trains one fold, so
this runner is the null object there: same interface, every group trained fold by fold,
the same outcomes (a fused pass equals its unfused runs: bit for bit on a CPU, up to
cuBLAS rounding on a GPU), and one log line saying so.
"""
from __future__ import annotations

import collections.abc
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableSet, Protocol, Sequence

import psutil

from step5.devices import DeviceSlot
from step5.errors import JobError, WorkerCrashed
from step5.jsonio import loads
from step5.launch import ONESHOT_MODULE, module_command
from step5.protocol import TrainRequest

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "best_model.pth"
STDERR_TAIL_LINES = 20
#: How long to wait for a SIGKILLed process (and its pipes) before giving up on it, logged.
REAP_TIMEOUT_S = 5.0


#: What one job of a batch came to: its result, or the JobError it failed with.
JobOutcome = dict[str, Any] | JobError


def raise_first_job_error(outcomes: Sequence[JobOutcome]) -> list[dict[str, Any]]:
    """The results of a batch whose outcomes hold no error; else raise the first JobError."""
    for outcome in outcomes:
        if isinstance(outcome, JobError):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


class FoldRunner(Protocol):
    """What the optimizer needs from whatever trains its neural-net folds."""

    mode: str  # "persistent_workers" | "subprocess" | "inline", recorded in the sidecar

    def run_jobs(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        """Train every request (concurrently where slots allow); results in request order."""
        ...

    def run_fused(self, groups: Sequence[Sequence[TrainRequest]]) -> list[list[JobOutcome]]:
        """Train each group in one fused pass where the runner can (else fold by fold).

        One outcome list per group, in request order: each job's result, or the
        :class:`JobError` it failed with, returned in its place rather than raised, so a
        batch of trials learns every trial's fate from one call. Requests of a group agree
        on :data:`step5.protocol.FUSE_KEYS`. Other errors are raised."""
        ...

    def summary(self) -> dict[str, Any]:
        """The sidecar's ``execution`` block: mode, workers, devices, fallbacks, timings."""
        ...

    def close(self) -> None:
        """Release every process; idempotent."""
        ...


def describe_exit(returncode: int | None) -> str:
    """``SIGKILL(-9)`` for a signal death, ``EXIT(1)`` for an exit code, as loky reports them."""
    if returncode is None:
        return "RUNNING"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}({returncode})"
        except ValueError:
            return f"SIGNAL({returncode})"
    return f"EXIT({returncode})"


def tail_lines(text: str, n: int = STDERR_TAIL_LINES) -> str:
    """The last ``n`` lines of a process's stderr, for crash reports."""
    return "\n".join(text.rstrip().splitlines()[-n:])


def oneshot_command(
    request: TrainRequest, python: str = sys.executable, *, script: str | Path | None = None,
) -> list[str]:
    """The one-shot trainer's command line (``python -m step5.nn.oneshot``, the module behind
    ``train_single_trial.py``) equivalent to a ``train`` request.

    ``script`` replaces the trainer (tests pass the fake worker, which accepts the same flags).
    """
    from step5.jsonio import dumps

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
    """Train one fold in a fresh ``train_single_trial.py`` process pinned to ``slot``.

    Returns the result dict (``job_id`` attached). Raises :class:`JobError` when the
    trainer reports a job failure, :class:`WorkerCrashed` when the process dies, times
    out or prints something that is not its one JSON line.

    ``env`` replaces ``slot.environment()``; while the process runs it is a member of
    ``live``, so an owner shutting down (the worker pool on Ctrl-C) can kill it.
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
            _kill(proc)
            stderr_b = _stderr_after_kill(proc)
            raise WorkerCrashed(
                f"one-shot trainer on {slot.label} exceeded the {timeout_s:g}s job timeout",
                exit_status="TIMEOUT", stderr_tail=tail_lines(stderr_b.decode(errors="replace")),
            ) from None
        except BaseException:  # Ctrl-C while waiting: do not leave the trainer behind
            _kill(proc)
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


class LiveProcesses(collections.abc.MutableSet):  # type: ignore[type-arg]
    """The one-shot trainers running now, killable all at once.

    Handed to :func:`run_oneshot_job` as its ``live`` set. Once :meth:`abort` ran, a
    process added later (a thread that was between its abort check and ``Popen``) is
    killed on arrival, so no trainer can slip past an abort.
    """

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self.aborted = False

    def __contains__(self, proc: object) -> bool:
        with self._lock:
            return proc in self._procs

    def __iter__(self) -> Iterator[subprocess.Popen[bytes]]:
        with self._lock:
            return iter(list(self._procs))

    def __len__(self) -> int:
        with self._lock:
            return len(self._procs)

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.add(proc)
            if not self.aborted:
                return
        _kill(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def abort(self) -> list[subprocess.Popen[bytes]]:
        """Refuse new trainers and SIGKILL the running ones; returns those killed."""
        with self._lock:
            self.aborted = True
            procs = list(self._procs)
        for proc in procs:
            _kill(proc)
        return procs


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it is still running; never waits."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def reap_killed(proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait for a SIGKILLed process, but not forever (one stuck in a GPU driver); logged."""
    try:
        proc.wait(timeout=REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %d) did not die %gs after SIGKILL", what, proc.pid, REAP_TIMEOUT_S)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a trainer and every process it started.

    The descendants are listed first: once the trainer is dead they are reparented out of
    reach, and one of them holding the trainer's stdout/stderr would keep its pipes open.
    """
    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    sigkill(proc)
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass


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


class _Aborted(Exception):
    """Raised inside a runner thread whose batch was aborted (never reaches a caller)."""


class SubprocessRunner:
    """S96A: every fold in a fresh ``train_single_trial.py`` process, one per free slot.

    Also the "null object" the pool degrades to: a slot whose worker died for good hands
    its jobs to :func:`run_oneshot_job`, the same function this runner uses.
    """

    mode = "subprocess"

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        *,
        job_timeout_s: float = 600.0,
        max_retries: int = 1,
        python: str = sys.executable,
        script: str | Path | None = None,
    ) -> None:
        """``script`` replaces ``train_single_trial.py`` (tests pass a fake trainer)."""
        if not slots:
            raise ValueError("SubprocessRunner needs at least one device slot")
        self.slots = list(slots)
        self.job_timeout_s = job_timeout_s
        self.max_retries = max_retries
        self.python = python
        self.script = script
        self._free: queue.Queue[DeviceSlot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self._executor = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="oneshot")
        self._live = LiveProcesses()
        self._lock = threading.Lock()
        self._jobs = 0
        self._crashes: list[dict[str, Any]] = []
        self._compute_s = 0.0
        self._job_wall_s = 0.0
        self._wall_s = 0.0
        self._fused_groups = 0
        self._fused_jobs = 0
        self._warned_no_fusion = False
        self._closed = False

    def __enter__(self) -> "SubprocessRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_one(self, request: TrainRequest) -> dict[str, Any]:
        slot = self._free.get()
        try:
            for attempt in range(self.max_retries + 1):
                if self._live.aborted:
                    raise _Aborted()
                start = time.perf_counter()
                try:
                    result = run_oneshot_job(
                        request, slot, timeout_s=self.job_timeout_s, python=self.python, script=self.script,
                        live=self._live,
                    )
                except WorkerCrashed as exc:
                    if self._live.aborted:  # we killed it: not a crash, and not to be retried
                        raise _Aborted() from None
                    with self._lock:
                        self._crashes.append({"slot": slot.label, "status": exc.exit_status, "error": str(exc)})
                    logger.warning("%s (attempt %d); stderr tail:\n%s", exc, attempt + 1, exc.stderr_tail)
                    if attempt == self.max_retries:
                        raise JobError(
                            f"{exc} — gave up after {attempt + 1} attempts",
                            "train_error", trial_number=request.trial_number,
                            fold_idx=request.fold_idx, job_id=request.job_id,
                        ) from exc
                    continue
                finally:
                    elapsed = time.perf_counter() - start
                    with self._lock:
                        self._job_wall_s += elapsed
                with self._lock:
                    self._jobs += 1
                    self._compute_s += float(result.get("duration", 0.0))
                return result
            raise AssertionError("unreachable: the retry loop returns or raises")
        finally:
            self._free.put(slot)

    def run_jobs(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        """Train every request across the slots; results in request order.

        A :class:`JobError` is raised once every job of the batch has finished. Anything
        else -- Ctrl-C while waiting, a bug in a runner thread -- aborts the batch: every
        running trainer is killed and reaped, queued jobs are dropped, the runner is closed,
        and the exception propagates without waiting for the other folds.
        """
        return raise_first_job_error(self._run_batch(requests))

    def _run_batch(self, requests: Sequence[TrainRequest]) -> list[JobOutcome]:
        """Every request's result or JobError, in order (see :meth:`run_jobs`)."""
        if self._closed:
            raise RuntimeError("run_jobs() on a closed SubprocessRunner")
        start = time.perf_counter()
        try:
            futures = [self._executor.submit(self._run_one, r) for r in requests]
            # Wait for every job before raising a JobError, so nothing is left running; but
            # any other exception from a job is raised (and the batch aborted) as it happens.
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None and not isinstance(exc, JobError):
                        raise exc
        except BaseException:
            self._abort()
            raise
        finally:
            self._wall_s += time.perf_counter() - start
        # Every future is done and any error left is a JobError: keep it in its place.
        return [f.result() if f.exception() is None else f.exception() for f in futures]

    def run_fused(self, groups: Sequence[Sequence[TrainRequest]]) -> list[list[JobOutcome]]:
        """The null object of fused training: every group's folds run one by one.

        A one-shot process trains a single fold, so there is no pass to share. The folds of
        all groups run together (concurrently across the slots); the outcomes equal a fused
        run's within float rounding, so the caller need not know.
        """
        groups = [list(g) for g in groups]
        if any(not g for g in groups):
            raise ValueError("run_fused() got an empty group")
        if not self._warned_no_fusion:
            self._warned_no_fusion = True
            logger.warning(
                "fused training asked for, but one-shot subprocesses (S96A) train one fold per process and "
                "cannot fuse: every fused group runs fold by fold (same results; use persistent workers to fuse)"
            )
        with self._lock:
            self._fused_groups += len(groups)
            self._fused_jobs += sum(len(g) for g in groups)
        flat = iter(self._run_batch([r for g in groups for r in g]))
        return [[next(flat) for _ in g] for g in groups]

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "mode": self.mode,
                "workers": [],
                "devices": [s.label for s in self.slots],
                "fallbacks": [],
                "crashes": list(self._crashes),
                # Groups handed to run_fused; none of them could share a pass here.
                "fused": {"groups": self._fused_groups, "jobs": self._fused_jobs, "fused_groups": 0,
                          "unfused_groups": self._fused_groups, "rerun_jobs": 0},
                "timings": {
                    "jobs": self._jobs,
                    "wall_s": round(self._wall_s, 4),
                    "compute_s": round(self._compute_s, 4),
                    # Everything a job cost beyond training in its process: boot, imports,
                    # CUDA init, spawn/wait — the overhead S96B removes.
                    "overhead_s": round(max(0.0, self._job_wall_s - self._compute_s), 4),
                    "spawn_s": 0.0,
                },
            }

    def _abort(self) -> None:
        """Kill and reap every running trainer, drop queued jobs, close the runner."""
        self._closed = True
        killed = self._live.abort()
        if killed:
            logger.warning("interrupted: killed %d running one-shot trainer(s)", len(killed))
        for proc in killed:
            reap_killed(proc, "one-shot trainer")
        # The threads see their trainer die (or the abort flag) and end at once; waiting for
        # them means no thread can start a process after we return.
        self._executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)

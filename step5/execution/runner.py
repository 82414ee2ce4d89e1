"""The fold-runner interface and its one-shot implementation (the "S96A" path).

::

    optimizer ──run_jobs([req, req, ...])──▶ SubprocessRunner
                                               │  one thread per device slot
                                               ├─▶ python train_single_trial.py ... (slot CPU-0)
                                               └─▶ python train_single_trial.py ... (slot CPU-1)
                                                      │ one JSON line on stdout, exit 0 / 1
    optimizer ◀──results, in request order─────────────┘

A runner takes the K fold requests of a trial, trains them concurrently across its device
slots, and returns one result per request in order. A deterministic job failure (bad
data) raises :class:`~step5.errors.JobError` once every job of the batch has finished, so
no process is still busy when the trial is reported failed. A crashed process is not the
job's fault: the job is retried.
"""
from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, MutableSet, Protocol, Sequence

from step5.devices import DeviceSlot
from step5.errors import JobError, WorkerCrashed
from step5.jsonio import loads
from step5.protocol import TrainRequest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ONESHOT_SCRIPT = REPO_ROOT / "train_single_trial.py"
CHECKPOINT_NAME = "best_model.pth"
STDERR_TAIL_LINES = 20


class FoldRunner(Protocol):
    """What the optimizer needs from whatever trains its neural-net folds."""

    mode: str  # "persistent_workers" | "subprocess" | "inline", recorded in the sidecar

    def run_jobs(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        """Train every request (concurrently where slots allow); results in request order."""
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
    request: TrainRequest, python: str = sys.executable, *, script: str | Path = ONESHOT_SCRIPT,
) -> list[str]:
    """The ``train_single_trial.py`` command line equivalent to a ``train`` request.

    ``script`` replaces the trainer (tests pass the fake worker, which accepts the same flags).
    """
    from step5.jsonio import dumps

    cmd = [
        python, str(script),
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
    script: str | Path = ONESHOT_SCRIPT,
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
            proc.kill()
            _, stderr_b = proc.communicate()
            raise WorkerCrashed(
                f"one-shot trainer on {slot.label} exceeded the {timeout_s:g}s job timeout",
                exit_status="TIMEOUT", stderr_tail=tail_lines(stderr_b.decode(errors="replace")),
            ) from None
        except BaseException:  # Ctrl-C while waiting: do not leave the trainer behind
            proc.kill()
            proc.wait()
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
    ) -> None:
        if not slots:
            raise ValueError("SubprocessRunner needs at least one device slot")
        self.slots = list(slots)
        self.job_timeout_s = job_timeout_s
        self.max_retries = max_retries
        self.python = python
        self._free: queue.Queue[DeviceSlot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self._executor = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="oneshot")
        self._lock = threading.Lock()
        self._jobs = 0
        self._crashes: list[dict[str, Any]] = []
        self._compute_s = 0.0
        self._job_wall_s = 0.0
        self._wall_s = 0.0
        self._closed = False

    def __enter__(self) -> "SubprocessRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_one(self, request: TrainRequest) -> dict[str, Any]:
        slot = self._free.get()
        try:
            for attempt in range(self.max_retries + 1):
                start = time.perf_counter()
                try:
                    result = run_oneshot_job(request, slot, timeout_s=self.job_timeout_s, python=self.python)
                except WorkerCrashed as exc:
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
        if self._closed:
            raise RuntimeError("run_jobs() on a closed SubprocessRunner")
        start = time.perf_counter()
        futures = [self._executor.submit(self._run_one, r) for r in requests]
        results: list[dict[str, Any]] = []
        first_error: BaseException | None = None
        for fut in futures:  # wait for all before raising, so nothing is left running
            try:
                results.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first_error = first_error or exc
        self._wall_s += time.perf_counter() - start
        if first_error is not None:
            raise first_error
        return results

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "mode": self.mode,
                "workers": [],
                "devices": [s.label for s in self.slots],
                "fallbacks": [],
                "crashes": list(self._crashes),
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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)

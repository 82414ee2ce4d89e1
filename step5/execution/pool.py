"""Persistent worker pool (the "S96B" path): one long-lived training process per device.

::

    optimizer thread          WorkerPool (parent process, never imports torch)       workers
    ────────────────          ─────────────────────────────────────────────────      ───────
    run_jobs([r0..r4]) ─▶ dispatch threads (one per slot) take a free slot
                              │
                              ├─ slot GPU-0: _WorkerProcess ── stdin  {"command":"train",..}\\n ─▶ nn_gpu_worker.py
                              │      ▲ responses queue ◀── stdout reader thread ◀── stdout ──────┘  CUDA_VISIBLE_DEVICES=0
                              │      └ stderr tail ◀────── stderr drain thread ◀── stderr (logs)
                              ├─ slot GPU-1: (same, CUDA_VISIBLE_DEVICES=1)
                              └─ slot GPU-2: fell back ─▶ run_oneshot_job ─▶ train_single_trial.py (S96A)
    results, in order ◀───────┘

* ``_WorkerProcess`` — one worker process and the two threads that keep its pipes moving:
  a stdout reader feeding a queue (so the parent waits on "a line, EOF or a timeout" in
  one place, like loky) and a stderr drain into a bounded deque (forwarded to logging at
  DEBUG) so a chatty worker can never fill its pipe and block.
* ``_SlotState`` — what the pool knows of one device across worker restarts: the live
  worker, restarts used, whether it fell back to one-shot subprocesses for good.
* ``_Spawner`` — a single long-lived daemon thread that performs every ``Popen``: Linux's
  parent-death signal (set by the worker, :mod:`step5.lifeline`) fires when the *thread*
  that forked the worker exits, so workers must not be forked from short-lived threads
  (nor from executor threads, which interpreter shutdown joins before atexit runs).
* ``WorkerPool`` — spawns the workers (concurrently, waiting for every ``ready``), runs
  batches of jobs across free slots, handles faults, summarises, shuts down.

Fault handling (SPEC section 7). A worker that dies (EOF, broken pipe, exit), hangs past
the job timeout, or breaks the protocol (non-JSON, an unexpected message, a result for
another job) is killed and restarted, up to ``max_restarts`` times per slot; the next
fault makes that slot fall back to one-shot subprocesses for the rest of the run, logging
``[S96B] Worker GPU-{N} died, falling back to subprocess mode``. The job that was running
is retried (on the restarted worker or through the fallback), and only a returned result
is counted. A deterministic job error (the worker's ``{"status": "error"}`` answer) is not
retried: it raises :class:`~step5.errors.JobError` with the worker's message, once every
other job of the batch has finished.

Lifecycle: workers are spawned in the constructor and stopped by :meth:`WorkerPool.close`
(``shutdown`` request, a short grace, then terminate/kill; always reaped). ``close`` also
runs at interpreter exit, and a ``KeyboardInterrupt`` (or any error) reaching
:meth:`run_jobs` kills every worker before propagating. If the parent is SIGKILLed the
workers notice and exit on their own (:mod:`step5.lifeline`).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from step5.devices import DeviceSlot
from step5.errors import JOB_ERROR_TYPES, JobError, Step5Error, WorkerCrashed
from step5.execution.runner import (
    JobOutcome,
    LiveProcesses,
    STDERR_TAIL_LINES,
    describe_exit,
    raise_first_job_error,
    reap_killed,
    run_oneshot_job,
    sigkill,
)
from step5.framing import FrameTooLarge, LineReader, LineWriter
from step5.jsonio import loads
from step5.launch import WORKER_MODULE, module_command
from step5.lifeline import PARENT_PID_ENV
from step5.protocol import PROTOCOL_VERSION, TrainRequest

logger = logging.getLogger(__name__)

#: Responses are small; a longer line from a worker is garbage, not a result.
MAX_RESPONSE_BYTES = 16 << 20
#: How long an exited worker's stderr drain may take to deliver the last lines.
_STDERR_SETTLE_S = 1.0
#: After EOF on stdout, how long to wait for the process itself to exit before killing it.
_EXIT_AFTER_EOF_S = 2.0

FALLBACK_LOG = "[S96B] Worker %s died, falling back to subprocess mode"


class PoolClosed(Step5Error):
    """Raised when a job is submitted to, or was running in, a pool that has been closed."""


class _WorkerFault(WorkerCrashed):
    """A worker fault with its kind: ``crash`` | ``hang`` | ``protocol`` | ``boot``."""

    def __init__(self, message: str, *, kind: str, exit_status: str | None, stderr_tail: str) -> None:
        super().__init__(message, exit_status=exit_status, stderr_tail=stderr_tail)
        self.kind = kind


# --------------------------------------------------------------------------------------
# One worker process
# --------------------------------------------------------------------------------------


class _WorkerProcess:
    """A running worker: its process, a queue of stdout lines, a tail of its stderr."""

    def __init__(self, label: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.label = label
        self.proc = proc
        self.pid = proc.pid
        self.ready: dict[str, Any] = {}
        self.jobs = 0
        self._writer = LineWriter(proc.stdin)
        self._lines: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._reader = threading.Thread(target=self._read_stdout, name=f"step5-{label}-stdout", daemon=True)
        self._drain = threading.Thread(target=self._drain_stderr, name=f"step5-{label}-stderr", daemon=True)
        self._reader.start()
        self._drain.start()

    def __repr__(self) -> str:
        return f"<worker {self.label} pid {self.pid}>"

    # -- pipe threads -------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        reader = LineReader(self.proc.stdout, MAX_RESPONSE_BYTES)
        try:
            while True:
                try:
                    line = reader.read_line()
                except FrameTooLarge as exc:
                    self._lines.put(("oversize", exc.seen))
                    continue
                if line is None:
                    break
                if line.strip():
                    self._lines.put(("line", line))
        except (OSError, ValueError):
            pass  # the pipe was closed under us (kill / close): same as EOF
        finally:
            self._lines.put(("eof", None))

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            while True:
                raw = self.proc.stderr.readline(1 << 16)
                if not raw:
                    return
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._stderr.append(text)
                logger.debug("[%s pid %d] %s", self.label, self.pid, text)
        except (OSError, ValueError):
            return

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    # -- talking to it ------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict[str, Any], doing: str) -> None:
        """Write one request; a dead reader is a crash."""
        try:
            self._writer.write_message(message)
        except (BrokenPipeError, ConnectionResetError, OSError, ValueError):
            raise self._fault("crash", f"broken pipe while {doing}") from None

    def receive(self, timeout_s: float, doing: str, *, hang_kind: str = "hang") -> dict[str, Any]:
        """The next message from the worker.

        Raises :class:`_WorkerFault` (the worker is then already dead or killed) on EOF or
        exit, on no line within ``timeout_s``, and on a line that is not a JSON object.
        """
        try:
            kind, payload = self._lines.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            raise self._fault(hang_kind, f"hung: nothing within the {timeout_s:g}s timeout while {doing}") from None
        if kind == "eof":
            self._lines.put(("eof", None))  # keep EOF sticky for any later reader
            return self._raise_died(doing)
        if kind == "oversize":
            raise self._fault("protocol", f"broke the protocol: sent a {payload}-byte line while {doing}")
        try:
            message = loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            preview = payload[:120].decode("utf-8", errors="replace")
            raise self._fault("protocol", f"broke the protocol: sent {preview!r} while {doing}")
        return message

    def _raise_died(self, doing: str) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=_EXIT_AFTER_EOF_S)
        except subprocess.TimeoutExpired:
            raise self._fault("crash", f"closed its stdout but kept running while {doing}") from None
        raise self._fault("crash", f"died with {describe_exit(self.proc.returncode)} while {doing}")

    def violation(self, message: dict[str, Any], doing: str) -> _WorkerFault:
        """A protocol fault for a well-formed but unexpected ``message``; kills the worker."""
        shown = {k: message.get(k) for k in ("status", "job_id", "error") if k in message}
        return self._fault("protocol", f"broke the protocol: unexpected answer {shown!r} while {doing}")

    def _fault(self, kind: str, what: str) -> _WorkerFault:
        """Kill the worker (if still running), reap it, and describe what happened."""
        self.kill()  # also lets the stderr drain deliver the last lines
        status = describe_exit(self.proc.returncode)
        message = f"worker {self.label} (pid {self.pid}) {what}"
        if kind != "crash":
            message += f"; killed ({status})"
        return _WorkerFault(message, kind=kind, exit_status=status, stderr_tail=self.stderr_tail())

    # -- ending it ----------------------------------------------------------------------

    def signal_kill(self) -> None:
        """SIGKILL without waiting (the first half of :meth:`kill`)."""
        sigkill(self.proc)

    def kill(self) -> None:
        """SIGKILL and reap; idempotent."""
        self.signal_kill()
        self._reap()
        self._close_pipes()

    def _reap(self) -> None:
        # Bounded: a process stuck in the kernel (a wedged GPU driver) may not die at once,
        # and nobody should block forever on it -- not Ctrl-C, not close(), not a fault.
        reap_killed(self.proc, f"worker {self.label}")

    def request_shutdown(self) -> None:
        """Say goodbye: ``shutdown``, then close stdin (EOF ends the worker too)."""
        try:
            self._writer.write_message({"command": "shutdown"})
        except (OSError, ValueError):
            pass
        try:
            self._writer.close()
        except (OSError, ValueError):
            pass

    def finish_shutdown(self, deadline: float) -> None:
        """Wait for the worker to exit by ``deadline``; then terminate, then kill. Reaps."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker %s (pid %d) ignored shutdown; terminating it", self.label, self.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.signal_kill()
                self._reap()
        goodbye = self._saw_goodbye()
        if self.proc.returncode != 0 or not goodbye:
            logger.warning(
                "worker %s (pid %d) ended with %s%s", self.label, self.pid, describe_exit(self.proc.returncode),
                "" if goodbye else " without a shutdown reply",
            )
        self._close_pipes()

    def _saw_goodbye(self) -> bool:
        """Whether the worker's last words included the ``shutdown`` reply (drains the queue).

        EOF goes back in the queue: a dispatch thread may be waiting in :meth:`receive` on
        this worker, and must see the EOF rather than wait out its whole job timeout.
        """
        self._reader.join(timeout=_STDERR_SETTLE_S)
        goodbye = False
        while True:
            try:
                kind, payload = self._lines.get_nowait()
            except queue.Empty:
                return goodbye
            if kind == "eof":
                self._lines.put(("eof", None))
                return goodbye
            if kind == "line":
                try:
                    goodbye = goodbye or loads(payload).get("status") == "shutdown"
                except (ValueError, AttributeError):
                    pass

    def _close_pipes(self) -> None:
        """Close our pipe ends once the process is gone (reaped)."""
        _close_quietly(self.proc.stdin)
        # The reader threads hit EOF as soon as the process is gone; closing a stream that
        # another thread is still reading can block, so only close the ones they released.
        self._reader.join(timeout=_STDERR_SETTLE_S)
        self._drain.join(timeout=_STDERR_SETTLE_S)
        if not self._reader.is_alive():
            _close_quietly(self.proc.stdout)
        if not self._drain.is_alive():
            _close_quietly(self.proc.stderr)


class _Spawner:
    """One long-lived daemon thread that performs every ``Popen`` of a pool.

    Linux's parent-death signal (armed by each worker, :mod:`step5.lifeline`) fires when
    the *thread* that forked the worker exits. A ``ThreadPoolExecutor`` thread is joined at
    interpreter shutdown *before* atexit handlers run, which would SIGKILL the workers of a
    pool left open before its atexit close could say goodbye; a daemon thread lives until
    :meth:`shutdown` (the pool's close) or the end of the process.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue[tuple[Any, Future[Any]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the spawner thread; raises RuntimeError once shut down."""
        future: Future[Any] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the spawner is shut down")
            self._calls.put((lambda: fn(*args), future))
        return future

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Run what was already submitted, then end the thread (and wait for it); idempotent."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


# --------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SlotState:
    """One device slot across the life of the pool."""

    slot: DeviceSlot
    worker: _WorkerProcess | None = None
    device: str | None = None  # as the worker reported it in `ready`
    pid: int | None = None  # current (or last) worker pid
    jobs: int = 0  # jobs answered by workers on this slot (results and job errors)
    oneshot_jobs: int = 0  # jobs run through the fallback
    restarts: int = 0
    fallback: bool = False
    boot_s: float | None = None

    @property
    def label(self) -> str:
        return self.slot.label


_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("closing a worker pool at exit failed")


atexit.register(_close_live_pools)


class WorkerPool:
    """Persistent workers, one per device slot, behind the :class:`FoldRunner` interface."""

    mode = "persistent_workers"

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        *,
        job_timeout_s: float,
        ready_timeout_s: float,
        max_restarts: int,
        python: str = sys.executable,
        worker_command: Sequence[str] | None = None,
        oneshot_script: str | Path | None = None,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        """Spawn one worker per slot and wait until each says ``ready`` (or has fallen back).

        ``worker_command`` replaces ``python -m step5.nn.worker`` and ``oneshot_script`` the
        fallback's one-shot trainer (tests pass the fake worker for both).
        """
        if not slots:
            raise ValueError("WorkerPool needs at least one device slot")
        labels = [s.label for s in slots]
        if len(set(labels)) != len(labels):
            raise ValueError(f"device slot labels must be unique, got {labels}")
        for name, value in (("job_timeout_s", job_timeout_s), ("ready_timeout_s", ready_timeout_s),
                            ("shutdown_timeout_s", shutdown_timeout_s)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")
        if max_restarts < 0:
            raise ValueError(f"`max_restarts` must be >= 0, got {max_restarts!r}")
        self.job_timeout_s = float(job_timeout_s)
        self.ready_timeout_s = float(ready_timeout_s)
        self.max_restarts = int(max_restarts)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.python = python
        self.worker_command = (
            list(worker_command) if worker_command is not None else module_command(WORKER_MODULE, python)
        )
        self.oneshot_script = oneshot_script
        self._states = [_SlotState(slot) for slot in slots]
        self._free: queue.Queue[_SlotState] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._procs: set[subprocess.Popen[bytes]] = set()  # every worker ever spawned and not reaped
        self._oneshots = LiveProcesses()  # fallback trainers running now; close() aborts them
        self._job_ids = itertools.count()
        self._fallbacks: list[dict[str, Any]] = []
        self._crashes: list[dict[str, Any]] = []
        self._spawn_s = 0.0
        self._started = False
        self._compute_s = 0.0
        self._job_wall_s = 0.0
        self._wall_s = 0.0
        self._completed = 0
        # run_fused's groups: passes that ran, passes that could not, failed jobs re-run alone.
        self._fused = {"groups": 0, "jobs": 0, "fused_groups": 0, "unfused_groups": 0, "rerun_jobs": 0}
        self._spawner = _Spawner("step5-spawner")
        self._dispatch = ThreadPoolExecutor(max_workers=len(self._states), thread_name_prefix="step5-dispatch")
        _LIVE_POOLS.add(self)
        start = time.perf_counter()
        try:
            booting = [self._dispatch.submit(self._ensure_worker, st) for st in self._states]
            for fut in booting:
                fut.result()
        except BaseException:
            self._close(grace_s=0.0)
            raise
        with self._lock:
            self._spawn_s += time.perf_counter() - start
            self._started = True
        for st in self._states:
            self._free.put(st)
        logger.info(
            "worker pool ready in %.2fs: %s", self._spawn_s,
            ", ".join(f"{st.label}={'fallback' if st.fallback else st.device}" for st in self._states),
        )

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- spawning -----------------------------------------------------------------------

    def _popen(self, st: _SlotState) -> subprocess.Popen[bytes]:
        """Runs on the spawner thread (see the module docstring for why)."""
        env = st.slot.environment()
        env[PARENT_PID_ENV] = str(os.getpid())
        with self._lock:
            if self._closed:
                raise PoolClosed("the worker pool is closed")
            proc = subprocess.Popen(
                self.worker_command, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            self._procs.add(proc)
            return proc

    def _spawn(self, st: _SlotState) -> _WorkerProcess:
        """Start a worker for ``st`` and wait for its ``ready``; raises :class:`_WorkerFault`."""
        start = time.perf_counter()
        try:
            proc = self._spawner.submit(self._popen, st).result()
        except RuntimeError:  # the spawner was shut down: the pool is closing
            raise PoolClosed("the worker pool is closed") from None
        except OSError as exc:
            raise _WorkerFault(f"worker {st.label} could not be started: {exc}", kind="boot",
                               exit_status=None, stderr_tail="") from None
        worker = _WorkerProcess(st.label, proc)
        doing = f"booting (waiting for `ready`, {self.ready_timeout_s:g}s allowed)"
        try:
            message = worker.receive(self.ready_timeout_s, doing, hang_kind="boot")
            if message.get("status") != "ready" or message.get("protocol") != PROTOCOL_VERSION:
                raise worker.violation(message, doing)
        except _WorkerFault:
            with self._lock:
                self._procs.discard(proc)  # killed and reaped by the fault
            raise
        worker.ready = message
        elapsed = time.perf_counter() - start
        with self._lock:
            if self._started:  # restarts; the constructor times its concurrent boot as a whole
                self._spawn_s += elapsed
            st.worker, st.pid, st.device = worker, worker.pid, str(message.get("device", "?"))
            st.boot_s = message.get("boot_s")
        logger.info("worker %s (pid %d) ready on %s in %.2fs", st.label, worker.pid, st.device, elapsed)
        if st.slot.kind == "cuda" and not st.device.startswith("cuda"):
            logger.warning("worker %s was given GPU %s but trains on %s (CUDA unavailable in the worker)",
                           st.label, st.slot.cuda_visible_devices, st.device)
        return worker

    def _ensure_worker(self, st: _SlotState) -> _WorkerProcess | None:
        """The slot's live worker, (re)started if needed; ``None`` once the slot fell back."""
        while not st.fallback:
            self._check_open()
            worker = st.worker  # one read: close() may clear it concurrently
            if worker is not None:
                return worker
            try:
                return self._spawn(st)
            except _WorkerFault as fault:
                self._on_fault(st, fault, job=None)
        return None

    # -- faults -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the worker pool is closed")

    def _on_fault(self, st: _SlotState, fault: _WorkerFault, job: TrainRequest | None) -> None:
        """Record a fault of ``st``'s worker (already killed); restart it or fall back."""
        # close() may clear st.worker from another thread at any moment: work on one reference.
        worker = st.worker
        if worker is not None:
            worker.kill()
            with self._lock:
                self._procs.discard(worker.proc)
                if st.worker is worker:
                    st.worker = None
        self._check_open()  # a fault caused by close() itself is not the worker's
        where = "" if job is None or job.job_id is None else f" [job {job.job_id!r}]"
        tail = fault.stderr_tail or "(no stderr output)"
        with self._lock:
            self._crashes.append({
                "slot": st.label, "status": fault.exit_status, "kind": fault.kind, "error": str(fault),
            })
            restart = st.restarts < self.max_restarts
            if restart:
                st.restarts += 1
            else:
                st.fallback = True
                self._fallbacks.append({
                    "label": st.label, "reason": str(fault), "kind": fault.kind,
                    "exit_status": fault.exit_status, "stderr_tail": fault.stderr_tail,
                    "after_jobs": st.jobs, "restarts": st.restarts,
                })
        logger.warning("%s%s; last stderr lines:\n%s", fault, where, tail)
        if restart:
            logger.warning("restarting worker %s (restart %d of %d)", st.label, st.restarts, self.max_restarts)
        else:
            logger.warning(FALLBACK_LOG, st.label)

    # -- running jobs -------------------------------------------------------------------

    def _run_on_worker(self, st: _SlotState, worker: _WorkerProcess, request: TrainRequest) -> dict[str, Any]:
        wire_id = f"{st.label}#{next(self._job_ids)}"
        doing = f"running job {wire_id} (trial {request.trial_number}, fold {request.fold_idx})"
        start = time.perf_counter()
        worker.send(dataclasses.replace(request, job_id=wire_id).to_dict(), doing)
        message = worker.receive(self.job_timeout_s, doing)
        elapsed = time.perf_counter() - start
        status = message.get("status")
        if message.get("job_id") != wire_id or status not in ("complete", "error"):
            raise worker.violation(message, doing)
        message["job_id"] = request.job_id
        with self._lock:
            st.jobs += 1
            worker.jobs += 1
            self._job_wall_s += elapsed
        if status == "error":
            if message.get("error_type") not in JOB_ERROR_TYPES:
                raise worker.violation(message, doing)
            raise JobError.from_dict(message)
        with self._lock:
            self._compute_s += _duration(message)
        return message

    def _run_oneshot(self, st: _SlotState, request: TrainRequest) -> dict[str, Any]:
        env = st.slot.environment()
        env[PARENT_PID_ENV] = str(os.getpid())
        failures = 0
        while True:
            self._check_open()
            start = time.perf_counter()
            try:
                result = run_oneshot_job(
                    request, st.slot, timeout_s=self.job_timeout_s, python=self.python,
                    script=self.oneshot_script, env=env, live=self._oneshots,
                )
            except WorkerCrashed as exc:
                self._check_open()
                failures += 1
                with self._lock:
                    self._crashes.append({"slot": st.label, "status": exc.exit_status, "kind": "oneshot",
                                          "error": str(exc)})
                logger.warning("%s (attempt %d); stderr tail:\n%s", exc, failures, exc.stderr_tail)
                if failures > self.max_restarts:
                    raise JobError(
                        f"{exc} (gave up after {failures} one-shot attempts)", "train_error",
                        trial_number=request.trial_number, fold_idx=request.fold_idx, job_id=request.job_id,
                    ) from exc
                continue
            finally:
                with self._lock:
                    self._job_wall_s += time.perf_counter() - start
            with self._lock:
                st.oneshot_jobs += 1
                self._compute_s += _duration(result)
            return result

    def _run_one(self, request: TrainRequest) -> dict[str, Any]:
        """Run ``request`` on the next free slot, retrying it across worker faults."""
        st = self._free.get()
        try:
            while True:
                worker = self._ensure_worker(st)
                if worker is None:
                    result = self._run_oneshot(st, request)
                    break
                try:
                    result = self._run_on_worker(st, worker, request)
                    break
                except _WorkerFault as fault:
                    self._on_fault(st, fault, request)  # then retry the same job
            with self._lock:
                self._completed += 1
            return result
        finally:
            self._free.put(st)

    def run_jobs(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        """Train every request across free slots; results in request order.

        Raises the first :class:`JobError` only after every job of the batch has finished.
        Any other exception escaping here (Ctrl-C included) kills every worker first.
        """
        self._check_open()
        return raise_first_job_error(self._dispatch_all(self._run_one, requests))

    def _dispatch_all(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        """Run ``fn(item)`` for every item on the dispatch threads; outcomes in order.

        Waits for every item, so no job is still running when a trial is reported failed.
        A :class:`JobError` stays in its item's place; any other error is raised once all
        finished, and anything escaping the wait itself (Ctrl-C) stops every worker first.
        """
        start = time.perf_counter()
        try:
            try:
                futures = [self._dispatch.submit(fn, item) for item in items]
            except RuntimeError as exc:  # the executor is shut down: close() ran since _check_open()
                raise PoolClosed("the worker pool is closed") from exc
            outcomes = _gather(futures)
        except PoolClosed:
            raise
        except BaseException:
            logger.warning("interrupted: stopping every worker")
            self._close(grace_s=0.0)
            raise
        finally:
            self._wall_s += time.perf_counter() - start
        for outcome in outcomes:
            if isinstance(outcome, Exception) and not isinstance(outcome, JobError):
                if self._closed and not isinstance(outcome, PoolClosed):
                    # e.g. a queued job cancelled by close(): the pool's closing, not a bug.
                    raise PoolClosed("the worker pool was closed while jobs were running") from outcome
                raise outcome
        return outcomes

    # -- fused folds ----------------------------------------------------------------------

    def _run_group_fused(self, group: Sequence[TrainRequest]) -> list[JobOutcome] | None:
        """One ``train_folds`` request on one worker: each job's result or its JobError.

        ``None`` when the pass could not run at all (the worker faulted, the slot fell back).
        """
        st = self._free.get()
        try:
            worker = self._ensure_worker(st)
            if worker is None:
                return None  # fallen back: the unfused path runs one-shot trainers
            wire_ids = [f"{st.label}#{next(self._job_ids)}" for _ in group]
            doing = f"running {len(group)} fused jobs {wire_ids[0]}..{wire_ids[-1]}"
            start = time.perf_counter()
            deadline = time.monotonic() + self.job_timeout_s * len(group)
            try:
                worker.send({
                    "command": "train_folds",
                    "jobs": [dataclasses.replace(r, job_id=w).to_dict() for r, w in zip(group, wire_ids)],
                }, doing)
                answers = [worker.receive(deadline - time.monotonic(), doing) for _ in group]
                for message, wire_id in zip(answers, wire_ids):
                    status = message.get("status")
                    if message.get("job_id") != wire_id or status not in ("complete", "error") or (
                        status == "error" and message.get("error_type") not in JOB_ERROR_TYPES
                    ):
                        raise worker.violation(message, doing)
            except _WorkerFault as fault:
                self._on_fault(st, fault, group[0])
                return None
            elapsed = time.perf_counter() - start
            with self._lock:
                st.jobs += len(group)
                worker.jobs += len(group)
                self._job_wall_s += elapsed
            for message, request in zip(answers, group):
                message["job_id"] = request.job_id
            done = [m for m in answers if m.get("status") == "complete"]
            with self._lock:
                # Each fused result's duration carries 1/M of the shared pass (its train_s is
                # the pass time divided by M), so the sum is the pass's real compute time.
                self._compute_s += sum(_duration(m) for m in done)
                self._completed += len(done)
            return [m if m.get("status") == "complete" else JobError.from_dict(m) for m in answers]
        finally:
            self._free.put(st)

    def run_fused(self, groups: Sequence[Sequence[TrainRequest]]) -> list[list[JobOutcome]]:
        """Train each group of folds in one ``train_folds`` pass on one worker.

        Groups run concurrently across workers. Per group, in request order, each job's
        result or the :class:`JobError` it failed with (returned in place, not raised, so
        one failing fold costs no other fold's result). Once every group finished, what
        did not come out of a pass is re-run unfused, as :meth:`run_jobs` would run it:
        every job of a group whose pass could not run (a worker fault, a slot that fell
        back), and every job that failed inside a pass -- its unfused run is its verdict
        (a pass that broke as a whole gets each fold's own outcome; a model that diverged
        in a batch on a GPU, where fused kernels round differently, gets its lone run).
        """
        self._check_open()
        groups = [list(g) for g in groups]
        if any(not g for g in groups):
            raise ValueError("run_fused() got an empty group")
        fused = self._dispatch_all(self._run_group_fused, groups)
        outcomes = [list(r) if r is not None else [None] * len(g) for r, g in zip(fused, groups)]
        redo = [(i, j) for i, group_outcomes in enumerate(outcomes)
                for j, outcome in enumerate(group_outcomes) if outcome is None or isinstance(outcome, JobError)]
        failed_in_pass = sum(1 for i, j in redo if fused[i] is not None)
        with self._lock:
            self._fused["groups"] += len(groups)
            self._fused["jobs"] += sum(len(g) for g in groups)
            self._fused["fused_groups"] += sum(r is not None for r in fused)
            self._fused["unfused_groups"] += sum(r is None for r in fused)
            self._fused["rerun_jobs"] += failed_in_pass
        if failed_in_pass:
            first = next(outcomes[i][j] for i, j in redo if fused[i] is not None)
            logger.warning("%d fused job(s) failed (first: %s); re-running them alone for their unfused verdict",
                           failed_in_pass, first)
        if redo:
            # Here, on the caller's thread: a dispatch thread waiting on the executor it
            # occupies could deadlock.
            self._check_open()
            redone = self._dispatch_all(self._run_one, [groups[i][j] for i, j in redo])
            for (i, j), outcome in zip(redo, redone):
                outcomes[i][j] = outcome
        return outcomes

    # -- reporting ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The sidecar's ``execution`` block."""
        with self._lock:
            return {
                "mode": self.mode,
                "workers": [
                    {
                        "label": st.label, "device": st.device, "pid": st.pid, "jobs": st.jobs,
                        "oneshot_jobs": st.oneshot_jobs, "restarts": st.restarts, "fallback": st.fallback,
                        "boot_s": st.boot_s, "cuda_visible_devices": st.slot.cuda_visible_devices,
                    }
                    for st in self._states
                ],
                "devices": [st.label for st in self._states],
                "fallbacks": [dict(f) for f in self._fallbacks],
                "crashes": [dict(c) for c in self._crashes],
                # Groups handed to run_fused: trained in one pass, or re-run fold by fold.
                "fused": dict(self._fused),
                "timings": {
                    "jobs": self._completed,
                    "spawn_s": round(self._spawn_s, 4),
                    "wall_s": round(self._wall_s, 4),
                    "compute_s": round(self._compute_s, 4),
                    # Time jobs spent outside training: IPC, NPZ hand-off, one-shot boots.
                    "overhead_s": round(max(0.0, self._job_wall_s - self._compute_s), 4),
                },
            }

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Pids of the workers running now (for tests and diagnostics)."""
        with self._lock:
            return [st.worker.pid for st in self._states if st.worker is not None and st.worker.alive()]

    # -- shutting down ----------------------------------------------------------------------

    def close(self) -> None:
        """Shut every worker down (``shutdown``, grace, terminate, kill) and reap it; idempotent."""
        self._close(grace_s=self.shutdown_timeout_s)

    def _close(self, grace_s: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = [st.worker for st in self._states if st.worker is not None]
            strays = [p for p in self._procs if all(p is not w.proc for w in workers)]
        _LIVE_POOLS.discard(self)
        try:
            # Fallback trainers and half-booted workers have nothing to say goodbye with.
            # abort() also kills a fallback trainer started after this point, so none slips past.
            for proc in strays + self._oneshots.abort():
                _kill_and_reap(proc)
            if grace_s > 0:
                for w in workers:
                    w.request_shutdown()
                deadline = time.monotonic() + grace_s
                for w in workers:
                    w.finish_shutdown(deadline)
            else:
                for w in workers:  # every worker gets its signal before any is waited for
                    w.signal_kill()
                for w in workers:
                    w.kill()
        except BaseException:
            # Interrupted while waiting (Ctrl-C during close): the pool is already marked
            # closed, so no later close() would come back for these. SIGKILL them now.
            for proc in [w.proc for w in workers] + strays:
                sigkill(proc)
            raise
        with self._lock:
            for st in self._states:
                st.worker = None
            self._procs.clear()
        self._spawner.shutdown()
        # Dispatch threads still busy see dead pipes or PoolClosed and end on their own; an
        # abort (grace 0, e.g. Ctrl-C) does not wait for them, and no thread waits on itself.
        in_dispatch = threading.current_thread().name.startswith("step5-dispatch")
        self._dispatch.shutdown(wait=grace_s > 0 and not in_dispatch, cancel_futures=True)
        logger.info("worker pool closed")


def _close_quietly(stream: Any) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except (OSError, ValueError):
        pass


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    sigkill(proc)
    reap_killed(proc, "process")


def _duration(result: dict[str, Any]) -> float:
    value = result.get("duration", 0.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _gather(futures: Sequence[Future[Any]]) -> list[Any]:
    """Every future's result or ``Exception``, in order, once all finished.

    Only ``Exception`` is collected: a ``KeyboardInterrupt`` raised while waiting
    propagates at once so the caller can stop the workers.
    """
    outcomes: list[Any] = []
    for fut in futures:
        try:
            outcomes.append(fut.result())
        except Exception as exc:  # noqa: BLE001 - sorted out by the caller after all finished
            outcomes.append(exc)
    return outcomes

"""The fold runner: persistent workers, one per device (the "S96B" path), or one-shot
trainers on the same slots (the "S96A" path, ``persistent=False``).

::

    optimizer             WorkerPool.run(groups)  (parent process, never imports torch)       workers
    ─────────             ─────────────────────────────────────────────────────────────       ───────
    run([[f0],[f1],..]) ─▶ one dispatch thread per group takes a free slot and HOLDS it:
                            │
                            ├─ slot GPU-0 ─ WorkerProcess ── stdin: train / train_folds / heartbeat ─▶ step5.nn.worker
                            │     ▲ answers ◀── stdout reader thread ◀── stdout ───────────────────┘ CUDA_VISIBLE_DEVICES=0
                            │     └ stderr tail ◀── stderr drain thread ◀── stderr (logs)
                            ├─ slot GPU-1 ─ (same, CUDA_VISIBLE_DEVICES=1)
                            └─ slot GPU-2 ─ fell back ─▶ one-shot trainers ─▶ step5.nn.oneshot (S96A)
    outcomes per group ◀────┘   (a result or a JobError per job, in place)

Without persistent workers (S96A) every slot starts, and stays, where a fallen-back slot
is: its jobs run in one-shot trainers, one fold per process, with the same fault rules.
That pool is the null object of fusion: a group of several jobs runs job by job across the
slots (the outcomes equal a fused pass's: bit for bit on a CPU, up to cuBLAS rounding on a
GPU), and it says so once.

* :mod:`step5.execution.worker_process` — one worker process (the protocol's endpoint), its
  pipe threads, liveness probes, and the spawner thread that forks every worker.
* :mod:`step5.execution.slot` — what a fault or a job timeout does to a slot (pure logic).
* :mod:`step5.execution.oneshot` — one attempt of a one-shot job (a fresh trainer process).
* this module — dispatch: groups to slots, the slot's reaction to faults, statistics, close;
  :func:`make_fold_runner` builds the pool a run's policy asks for.

**One ownership rule.** A :class:`_Slot` (its worker, its state machine, its counters) is
changed only by the dispatch thread that took it from the free queue, until it puts it
back. :meth:`WorkerPool.close` changes no slot: it sets the closed flag and kills every
process; a holder then sees a dead pipe, finds the pool closed, and ends with
:class:`RunnerClosed`. Only the pool-wide statistics and the registry of live processes are
shared, each behind ``_lock``.

**Faults and timeouts** (SPEC section 7, issue 10). A worker that crashes (EOF, broken
pipe, exit), hangs (stops answering liveness probes), breaks the protocol or fails to boot is
killed and restarted, up to ``max_restarts`` times per slot; the next fault makes the slot
fall back to one-shot subprocesses, logging ``[S96B] Worker GPU-{N} died, falling back to
subprocess mode``, until its cool-down has passed and it tries a fresh worker again
(re-promotion, :class:`~step5.execution.slot.SlotMachine`). The group that was running is
re-run with the same requests and seeds while the job's and the run's fault budgets last
(:class:`~step5.execution.slot.FaultBudget`), else its jobs fail with a reason that says so;
only returned results count. A job (a group of M jobs: M timeouts' worth) that outlives
its timeout on a worker that still answers probes is not a fault: the worker is replaced without
using the restart budget, the group is retried once, and a second timeout is each job's
verdict (a ``timeout`` JobError). A job error (the worker's ``{"status": "error"}``) is
returned in the job's place; a job that failed inside a fused pass is re-run alone, on the
same slot, for its unfused verdict.

Lifecycle: workers are spawned in the constructor and stopped by :meth:`WorkerPool.close`
(``shutdown`` request, a short grace, then terminate/kill; always reaped). ``close`` also
runs at interpreter exit, and a ``KeyboardInterrupt`` (or any error) reaching :meth:`run`
kills every worker and one-shot trainer before propagating (the pool is closed then), as
does a bug in any group, without waiting for the others. If the parent is SIGKILLed the workers notice and
exit on their own (:mod:`step5.lifeline`).
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import queue
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from step5.devices import DeviceSlot
from step5.errors import JOB_ERROR_TYPES, JobError, JobTimedOut, RunnerClosed, WorkerCrashed, WorkerFault
from step5.execution.oneshot import fault_error, run_oneshot_job, timeout_error
from step5.execution.process import LiveProcesses, kill_and_reap, sigkill
from step5.execution.runner import JobOutcome, check_groups
from step5.execution.slot import FaultBudget, JobAttempts, JobVerdict, SlotAction, SlotMachine
from step5.execution.summary import (
    FallbackRecord, FaultRecord, FusionRecord, RunnerStats, Timings, WorkerRecord, recovery_record,
)
from step5.execution.worker_process import Spawner, WorkerProcess, popen_worker
from step5.launch import WORKER_MODULE, module_command
from step5.policy import TrainingPolicy
from step5.protocol import PROTOCOL_VERSION, Job, TrainFolds
from step5.values import is_number

logger = logging.getLogger(__name__)


FALLBACK_LOG = "[S96B] Worker %s died, falling back to subprocess mode"
REPROMOTE_LOG = "[S96B] Worker %s: trying a fresh persistent worker again after %.0fs in subprocess mode (%d of %d)"


def default_worker_command(python: str = sys.executable) -> list[str]:
    """The persistent worker's command line (the one place it is built): the package's
    worker module, so an installed step5 runs from any directory (step5.launch)."""
    return module_command(WORKER_MODULE, python)


@dataclasses.dataclass
class _Slot:
    """One device slot across the life of the pool; owned by the thread holding it."""

    slot: DeviceSlot
    machine: SlotMachine
    worker: WorkerProcess | None = None
    device: str | None = None  # as the worker reported it in `ready`
    backend: str | None = None  # "cuda" | "rocm" | "cpu", as the worker's torch build reported it
    pid: int | None = None  # current (or last) worker pid
    jobs: int = 0  # jobs answered by workers on this slot (results and job errors)
    oneshot_jobs: int = 0  # jobs run through the fallback
    boot_s: float | None = None

    @property
    def label(self) -> str:
        return self.slot.label

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            label=self.label, device=self.device, pid=self.pid, jobs=self.jobs, oneshot_jobs=self.oneshot_jobs,
            restarts=self.machine.restarts, fallback=self.machine.fallback,
            repromotions=self.machine.repromotions, boot_s=self.boot_s, backend=self.backend,
            cuda_visible_devices=self.slot.cuda_visible_devices, hip_visible_devices=self.slot.hip_visible_devices,
        )


_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("closing a worker pool at exit failed")


atexit.register(_close_live_pools)


class WorkerPool:
    """Device slots behind the :class:`FoldRunner` interface: persistent workers, or one-shot trainers."""

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        *,
        persistent: bool = True,
        job_timeout_s: float = TrainingPolicy.worker_job_timeout_s,
        ready_timeout_s: float = TrainingPolicy.worker_ready_timeout_s,
        max_restarts: int = TrainingPolicy.max_worker_restarts,
        max_job_reruns: int = TrainingPolicy.max_job_reruns,
        max_fault_reruns: int = TrainingPolicy.max_fault_reruns,
        repromote_after_s: float = TrainingPolicy.worker_repromote_after_s,
        max_repromotions: int = TrainingPolicy.max_worker_repromotions,
        python: str = sys.executable,
        worker_command: Sequence[str] | None = None,
        oneshot_script: str | Path | None = None,
        shutdown_timeout_s: float = 5.0,
        probe_interval_s: float | None = None,
        probe_grace_s: float | None = None,
        spawn_stagger_s: float = 0.0,
    ) -> None:
        """Spawn one worker per slot and wait until each says ``ready`` (or has fallen back);
        with ``persistent=False`` spawn nothing: every job runs in a one-shot trainer.

        ``worker_command`` replaces :func:`default_worker_command` and ``oneshot_script`` the
        one-shot ``train_single_trial.py`` (tests pass the fake worker for both). A liveness
        probe goes out after ``probe_interval_s`` of silence during a job
        [min(5, timeout/4)]; no answer within ``probe_grace_s`` [min(30, timeout/2)]
        is a hang. A job hit by a fault is re-run up to ``max_job_reruns`` times,
        ``max_fault_reruns`` in all; a fallen-back slot tries a fresh worker after
        ``repromote_after_s`` (doubling), at most ``max_repromotions`` times. Worker starts
        (first starts, restarts, re-promotions) are ``spawn_stagger_s`` apart (:class:`Spawner`).
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
        self.persistent = persistent
        self.mode = "persistent_workers" if persistent else "subprocess"
        self.job_timeout_s = float(job_timeout_s)
        self.ready_timeout_s = float(ready_timeout_s)
        self.max_restarts = int(max_restarts)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.probe_interval_s = probe_interval_s or min(5.0, self.job_timeout_s / 4)
        self.probe_grace_s = probe_grace_s or min(30.0, self.job_timeout_s / 2)
        self.worker_command = list(worker_command) if worker_command is not None else default_worker_command(python)
        # A one-shot pool's slots start in the fallback and never leave it (no re-promotion).
        self._slots = [
            _Slot(slot, SlotMachine(self.max_restarts, cooldown_s=repromote_after_s,
                                    max_repromotions=max_repromotions if persistent else 0, fallback=not persistent))
            for slot in slots
        ]
        self.max_job_reruns = int(max_job_reruns)
        self._budget = FaultBudget(max_fault_reruns)
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # guards the statistics and _workers/_procs below
        self._workers: set[WorkerProcess] = set()  # live workers (close() says goodbye to them)
        self._procs: set[subprocess.Popen[bytes]] = set()  # every worker process not yet reaped
        self.python, self.oneshot_script = python, oneshot_script
        self._oneshot_live = LiveProcesses()  # one-shot trainers running now (close() kills them)
        self._job_ids = itertools.count()
        self._fallbacks: list[FallbackRecord] = []
        self._faults: list[FaultRecord] = []
        self._fusion = FusionRecord()
        self._timings = Timings()
        self._job_wall_s = 0.0
        self._warned_no_fusion = False
        self._started = False
        self._spawner = Spawner("step5-spawner", spawn_stagger_s)
        if spawn_stagger_s > 0:
            logger.info("workers start %gs apart (training.worker_spawn_stagger_s), restarts included",
                        spawn_stagger_s)
        self._dispatch = ThreadPoolExecutor(max_workers=len(self._slots), thread_name_prefix="step5-dispatch")
        _LIVE_POOLS.add(self)
        for st in self._slots:
            self._free.put(st)
        if not persistent:
            self._started = True
            logger.info("one-shot trainers (S96A) on %s", ", ".join(st.label for st in self._slots))
            return
        start = time.perf_counter()
        try:
            booting = [self._dispatch.submit(self._ensure_worker, st) for st in self._slots]
            for fut in booting:
                fut.result()
        except BaseException:
            self._close(grace_s=0.0)
            raise
        self._timings.spawn_s += time.perf_counter() - start
        self._started = True
        logger.info(
            "worker pool ready in %.2fs: %s", self._timings.spawn_s,
            ", ".join(f"{st.label}={'fallback' if st.machine.fallback else st.device}" for st in self._slots),
        )

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capacity(self) -> int:
        """Groups that can train at the same time (one per slot)."""
        return len(self._slots)

    # -- spawning -----------------------------------------------------------------------

    def _popen(self, st: _Slot) -> subprocess.Popen[bytes]:
        """Runs on the spawner thread (see :class:`Spawner` for why)."""
        env = st.slot.environment()  # pins the device and names this process the parent (step5.lifeline)
        with self._lock:
            if self._closed:
                raise RunnerClosed("the worker pool is closed")
            proc = popen_worker(self.worker_command, env)
            self._procs.add(proc)
            return proc

    def _spawn(self, st: _Slot) -> WorkerProcess:
        """Start a worker for ``st`` and wait for its ``ready``; raises :class:`WorkerFault`."""
        start = time.perf_counter()
        try:
            proc = self._spawner.submit(self._popen, st).result()
        except RuntimeError:  # the spawner was shut down: the pool is closing
            raise RunnerClosed("the worker pool is closed") from None
        except OSError as exc:
            raise WorkerFault(f"worker {st.label} could not be started: {exc}", kind="boot",
                              exit_status=None, stderr_tail="") from None
        worker = WorkerProcess(st.label, proc)
        with self._lock:
            self._workers.add(worker)
        doing = f"booting (waiting for `ready`, {self.ready_timeout_s:g}s allowed)"
        try:
            message = worker.receive(self.ready_timeout_s, doing, hang_kind="boot")
            if message.get("status") != "ready" or message.get("protocol") != PROTOCOL_VERSION:
                raise worker.violation(message, doing)
        except WorkerFault:
            self._forget(worker)
            raise
        worker.ready = message
        elapsed = time.perf_counter() - start
        if self._started:  # restarts; the constructor times its concurrent boot as a whole
            with self._lock:
                self._timings.spawn_s += elapsed
        st.worker, st.pid, st.device = worker, worker.pid, str(message.get("device", "?"))
        st.boot_s = message.get("boot_s")
        st.backend = reported_backend(message)
        logger.info("worker %s (pid %d) ready on %s (%s) in %.2fs", st.label, worker.pid, st.device, st.backend,
                    elapsed)
        if st.slot.kind != "cpu" and st.backend != st.slot.kind:
            logger.warning("worker %s was given %s but trains on %s (backend %s: its torch cannot drive that GPU)",
                           st.label, st.slot.describe(), st.device, st.backend)
        return worker

    def _ensure_worker(self, st: _Slot) -> WorkerProcess | None:
        """The slot's live worker, (re)started if needed; ``None`` while the slot is in the
        fallback (a fallen-back slot past its cool-down is re-promoted here first)."""
        if st.machine.fallback:
            waited = time.monotonic() - (st.machine.fell_back_at or 0.0)
            if st.machine.try_repromote(time.monotonic()):
                logger.warning(REPROMOTE_LOG, st.label, waited, st.machine.repromotions, st.machine.max_repromotions)
        while not st.machine.fallback:
            self._check_open()
            if st.worker is not None:
                return st.worker
            try:
                return self._spawn(st)
            except WorkerFault as fault:
                self._on_fault(st, fault, None)
        return None

    def _forget(self, worker: WorkerProcess) -> None:
        """A worker that is dead and reaped leaves the registries."""
        with self._lock:
            self._workers.discard(worker)
            self._procs.discard(worker.proc)

    # -- faults and timeouts ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RunnerClosed("the worker pool is closed")

    def _record_fault(self, record: FaultRecord) -> None:
        with self._lock:
            self._faults.append(record)

    def _drop_worker(self, st: _Slot) -> None:
        """The holder lets go of a dead worker (killed by the fault or timeout that ended it)."""
        if st.worker is not None:
            st.worker.kill()  # already dead: reaps, closes pipes
            self._forget(st.worker)
            st.worker = None

    def _on_fault(self, st: _Slot, fault: WorkerFault, group: Sequence[Job] | None) -> None:
        """Record a worker fault of ``st`` and restart its worker or fall back."""
        self._drop_worker(st)
        self._check_open()  # a fault caused by close() itself is not the worker's
        where = "" if not group else f" [job {group[0].job_id!r}" + (f" +{len(group) - 1}]" if len(group) > 1 else "]")
        self._record_fault(FaultRecord(st.label, fault.kind, fault.exit_status, str(fault)))
        action = st.machine.on_fault(fault.kind, time.monotonic())
        logger.warning("%s%s; last stderr lines:\n%s", fault, where, fault.stderr_tail or "(no stderr output)")
        if action is SlotAction.RESTART:
            logger.warning("restarting worker %s (restart %d of %d)", st.label, st.machine.restarts, self.max_restarts)
            return
        with self._lock:
            self._fallbacks.append(FallbackRecord(
                label=st.label, reason=str(fault), kind=fault.kind, exit_status=fault.exit_status,
                stderr_tail=fault.stderr_tail, after_jobs=st.jobs, restarts=st.machine.restarts,
            ))
        logger.warning(FALLBACK_LOG, st.label)

    def _on_timeout(self, st: _Slot, exc: JobTimedOut, attempts: JobAttempts) -> JobVerdict:
        """A job outlived its timeout: replace the worker (no restart used), retry once."""
        self._drop_worker(st)
        self._check_open()
        self._record_fault(FaultRecord(st.label, "timeout", exc.exit_status, str(exc)))
        st.machine.on_job_timeout()
        verdict = attempts.on_timeout()
        logger.warning("%s; %s", exc, "retrying it once on a new worker" if verdict is JobVerdict.RETRY
                       else "it fails (a job timeout is the job's, not the worker's)")
        return verdict

    # -- running groups -------------------------------------------------------------------

    def _train_on(self, st: _Slot, worker: WorkerProcess, group: Sequence[Job]) -> list[JobOutcome]:
        """One job (a group of one: ``train`` or ``merge``) or one ``train_folds``; each job's outcome."""
        wire_ids = [f"{st.label}#{next(self._job_ids)}" for _ in group]
        wire = [dataclasses.replace(r, job_id=w) for r, w in zip(group, wire_ids)]
        first = group[0]
        if len(group) == 1:
            doing = f"running job {wire_ids[0]} (trial {first.trial_number}, fold {first.fold_idx})"
            start = time.perf_counter()
            worker.send(wire[0], doing)
        else:
            doing = f"running {len(group)} fused jobs {wire_ids[0]}..{wire_ids[-1]}"
            start = time.perf_counter()
            worker.send(TrainFolds(tuple(wire)), doing)  # type: ignore[arg-type] - only train jobs are grouped
        answers = worker.await_answers(
            len(group), timeout_s=self.job_timeout_s * len(group), probe_interval_s=self.probe_interval_s,
            probe_grace_s=self.probe_grace_s, doing=doing,
        )
        for answer, wire_id in zip(answers, wire_ids):
            status = answer.get("status")
            if answer.get("job_id") != wire_id or status not in ("complete", "error") or (
                status == "error" and answer.get("error_type") not in JOB_ERROR_TYPES
            ):
                raise worker.violation(answer, doing)
        st.jobs += len(group)
        outcomes: list[JobOutcome] = []
        for answer, request in zip(answers, group):
            answer["job_id"] = request.job_id
            outcomes.append(answer if answer.get("status") == "complete" else JobError.from_dict(answer))
        done = [a for a in answers if a.get("status") == "complete"]
        with self._lock:
            self._job_wall_s += time.perf_counter() - start
            # A fused result's duration carries 1/M of the shared pass, so the sum is the pass.
            self._timings.compute_s += sum(_duration(a) for a in done)
            self._timings.jobs += len(done)
            if len(group) > 1:
                self._fusion.fused_groups += 1
        return outcomes

    def _run_oneshot(self, st: _Slot, request: Job, attempts: JobAttempts) -> JobOutcome:
        """One job in one-shot trainers until it has a verdict: a crashed trainer is re-run
        with the same request while the job's and the run's budgets last, a timed-out one
        once; a job error is the verdict. ``attempts`` carries the faults the job met on a
        persistent worker before its slot fell back. The pool's closing (``_check_open``,
        before each attempt and after a failed one) is neither a crash nor a timeout."""
        start = time.perf_counter()
        try:
            while True:
                self._check_open()
                try:
                    result = run_oneshot_job(request, st.slot, timeout_s=self.job_timeout_s, python=self.python,
                                             script=self.oneshot_script, live=self._oneshot_live)
                    break
                except JobError as exc:
                    return exc
                except JobTimedOut as exc:
                    self._check_open()
                    verdict = attempts.on_timeout()
                    self._record_fault(FaultRecord(st.label, "timeout", exc.exit_status, str(exc)))
                    logger.warning("%s (timeout %d of at most 2); stderr tail:\n%s", exc, attempts.timeouts,
                                   exc.stderr_tail or "(none)")
                    if verdict is JobVerdict.GIVE_UP:
                        return timeout_error(request, self.job_timeout_s, attempts.timeouts)
                except WorkerCrashed as exc:
                    self._check_open()
                    verdict = attempts.on_fault()
                    self._record_fault(FaultRecord(st.label, "oneshot", exc.exit_status, str(exc)))
                    logger.warning("%s (fault %d of this job; %s); stderr tail:\n%s", exc, attempts.faults,
                                   "re-running it with the same request and seed" if verdict is JobVerdict.RETRY
                                   else "not re-run", exc.stderr_tail or "(none)")
                    if verdict is JobVerdict.GIVE_UP:
                        return fault_error(request, exc, attempts)
        finally:
            with self._lock:
                self._job_wall_s += time.perf_counter() - start
        st.oneshot_jobs += 1
        with self._lock:
            self._timings.compute_s += _duration(result)
            self._timings.jobs += 1
        return result

    def _run_on_slot(self, st: _Slot, group: Sequence[Job]) -> list[JobOutcome]:
        """Train ``group`` on the held slot until every job has its verdict."""
        attempts = JobAttempts(self.max_job_reruns, self._budget)
        while True:
            worker = self._ensure_worker(st)
            if worker is None:
                if len(group) > 1:
                    with self._lock:
                        self._fusion.unfused_groups += 1
                # Each job carries the faults the group met so far into its own attempts.
                return [self._run_oneshot(st, r, dataclasses.replace(attempts)) for r in group]
            try:
                return self._train_on(st, worker, group)
            except WorkerFault as fault:
                self._on_fault(st, fault, group)
                if attempts.on_fault() is JobVerdict.GIVE_UP:
                    logger.warning("not re-running %d job(s) hit by %s: %s", len(group), fault, attempts.refused)
                    return [fault_error(r, fault, attempts) for r in group]
                # else re-run the same group (same requests and seeds) on the new worker or the fallback
            except JobTimedOut as exc:
                if self._on_timeout(st, exc, attempts) is JobVerdict.GIVE_UP:
                    return [timeout_error(r, self.job_timeout_s * len(group), attempts.timeouts) for r in group]

    def _run_group(self, group: Sequence[Job]) -> list[JobOutcome]:
        """Take a free slot, train ``group`` on it, re-run alone what failed in a pass."""
        st = self._free.get()
        try:
            self._check_open()
            outcomes = self._run_on_slot(st, group)
            # On a worker (not in the fallback, whose one-shot jobs each had their own run),
            # every job that failed in or with a pass gets its unfused verdict: a job whose
            # process kept dying must not fail its group-mates with it.
            if len(group) > 1 and not st.machine.fallback:
                failed = [i for i, o in enumerate(outcomes) if isinstance(o, JobError) and o.error_type != "timeout"]
                if failed:
                    logger.warning("%d fused job(s) failed (first: %s); re-running them alone for their unfused "
                                   "verdict", len(failed), outcomes[failed[0]])
                    with self._lock:
                        self._fusion.rerun_jobs += len(failed)
                    for i in failed:
                        (outcomes[i],) = self._run_on_slot(st, [group[i]])
            return outcomes
        finally:
            self._free.put(st)

    def run(self, groups: Sequence[Sequence[Job]]) -> list[list[JobOutcome]]:
        """Train every group (concurrently across slots); per group, each job's outcome.

        A group of one is an unfused job (``train`` or ``merge``); a larger group shares
        one fused pass (its requests agree on :data:`step5.protocol.FUSE_KEYS`), or, in a
        one-shot pool, runs job by job across the slots. Job errors come back in place.
        Anything else escaping (Ctrl-C, a bug in one group) kills every process at once and
        closes the pool; :class:`RunnerClosed` when the pool was closed meanwhile.
        """
        self._check_open()
        groups = check_groups(groups)
        fused = sum(1 for g in groups if len(g) > 1)
        with self._lock:
            self._fusion.groups += len(groups)
            self._fusion.jobs += sum(len(g) for g in groups)
            self._fusion.largest_group = max([self._fusion.largest_group, *(len(g) for g in groups)])
            if not self.persistent:
                self._fusion.unfused_groups += fused
        if fused and not self.persistent and not self._warned_no_fusion:
            self._warned_no_fusion = True
            logger.warning(
                "fused training asked for, but one-shot subprocesses (S96A) train one fold per process and "
                "cannot fuse: every fused group runs fold by fold (same results; use persistent workers to fuse)"
            )
        # A one-shot pool spreads a group's jobs over its slots, one process each.
        dispatched = groups if self.persistent else [[job] for g in groups for job in g]
        start = time.perf_counter()
        try:
            try:
                futures = [self._dispatch.submit(self._run_group, g) for g in dispatched]
            except RuntimeError as exc:  # the executor is shut down: close() ran since _check_open()
                raise RunnerClosed("the worker pool is closed") from exc
            failure = _first_failure(futures)
            if failure is not None:
                if isinstance(failure, CancelledError) or (self._closed and not isinstance(failure, RunnerClosed)):
                    # e.g. a queued group cancelled by close(): the pool's closing, not a bug.
                    raise RunnerClosed("the worker pool was closed while jobs were running") from failure
                raise failure
        except RunnerClosed:
            raise
        except BaseException:
            logger.warning("interrupted: stopping every worker and trainer")
            self._close(grace_s=0.0)
            raise
        finally:
            with self._lock:
                self._timings.wall_s += time.perf_counter() - start
        outcomes = iter([f.result() for f in futures])
        return [list(next(outcomes)) for _ in groups] if self.persistent else [
            [next(outcomes)[0] for _ in g] for g in groups]

    # -- reporting ------------------------------------------------------------------------

    def summary(self) -> RunnerStats:
        with self._lock:
            timings = dataclasses.replace(self._timings)
            timings.overhead_s = max(0.0, self._job_wall_s - timings.compute_s)
            return RunnerStats(
                mode=self.mode, devices=[st.label for st in self._slots],
                workers=[st.record() for st in self._slots] if self.persistent else [],
                fallbacks=list(self._fallbacks),
                faults=list(self._faults), fusion=dataclasses.replace(self._fusion), timings=timings,
                recovery=recovery_record(self._faults, self._budget,
                                         sum(st.machine.repromotions for st in self._slots)),
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Pids of the workers running now (for tests and diagnostics)."""
        with self._lock:
            return sorted(w.pid for w in self._workers if w.alive())

    # -- shutting down ----------------------------------------------------------------------

    def close(self) -> None:
        """Shut every worker down (``shutdown``, grace, terminate, kill) and reap it; idempotent."""
        self._close(grace_s=self.shutdown_timeout_s)

    def _close(self, grace_s: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = [w for w in self._workers if w.ready]
            strays = [p for p in self._procs if all(p is not w.proc for w in workers)]
        _LIVE_POOLS.discard(self)
        try:
            # Fallback trainers and half-booted workers have nothing to say goodbye with.
            # abort() also kills a fallback trainer started after this point, so none slips past.
            for proc in strays + self._oneshot_live.abort():
                kill_and_reap(proc, "process")
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
            self._workers.clear()
            self._procs.clear()
        self._spawner.shutdown()
        # Holders still busy see dead pipes or RunnerClosed and end on their own; an abort
        # (grace 0, e.g. Ctrl-C) does not wait for them, and no thread waits on itself.
        in_dispatch = threading.current_thread().name.startswith("step5-dispatch")
        self._dispatch.shutdown(wait=grace_s > 0 and not in_dispatch, cancel_futures=True)
        logger.info("worker pool closed")


def reported_backend(ready: dict[str, Any]) -> str:
    """``cuda`` / ``rocm`` / ``cpu`` from a ``ready`` line (a worker that does not say is read
    from its device: torch calls a ROCm GPU ``cuda`` too, so only ``backend`` tells them apart)."""
    backend = ready.get("backend")
    if backend in ("cuda", "rocm", "cpu"):
        return str(backend)
    return "cuda" if str(ready.get("device", "")).startswith("cuda") else "cpu"


def _duration(result: dict[str, Any]) -> float:
    value = result.get("duration", 0.0)
    return float(value) if is_number(value) else 0.0


def _first_failure(futures: Sequence[Future[Any]]) -> BaseException | None:
    """Wait until every future is done or one has failed; the first failure in order
    (a future that close() cancelled: a CancelledError), or None.

    Done callbacks, not ``concurrent.futures.wait``: a future cancelled by an executor's
    shutdown never wakes ``wait``'s waiters. A ``KeyboardInterrupt`` raised while waiting
    propagates at once, so the caller can stop every process.
    """
    settled = threading.Semaphore(0)
    for future in futures:
        future.add_done_callback(lambda _: settled.release())
    for _ in futures:
        settled.acquire()
        for future in futures:
            if future.done() and (future.cancelled() or future.exception() is not None):
                return CancelledError() if future.cancelled() else future.exception()
    return None


def resolve_persistent_workers(cli_choice: bool | None, policy: TrainingPolicy) -> bool:
    """``--persistent-workers`` / ``--no-persistent-workers`` win; otherwise the policy's
    kill switch (whose absence already means False, see :mod:`step5.policy`)."""
    return policy.use_persistent_workers if cli_choice is None else cli_choice


def make_fold_runner(
    slots: Sequence[DeviceSlot], policy: TrainingPolicy, *, persistent: bool, python: str = sys.executable,
) -> WorkerPool:
    """A started pool over ``slots`` (persistent workers, S96B, or one-shot trainers, S96A);
    the caller closes it (it is a context manager)."""
    return WorkerPool(
        slots,
        persistent=persistent,
        job_timeout_s=policy.worker_job_timeout_s,
        ready_timeout_s=policy.worker_ready_timeout_s,
        max_restarts=policy.max_worker_restarts,
        max_job_reruns=policy.max_job_reruns,
        max_fault_reruns=policy.max_fault_reruns,
        repromote_after_s=policy.worker_repromote_after_s,
        max_repromotions=policy.max_worker_repromotions,
        spawn_stagger_s=policy.worker_spawn_stagger_s,
        python=python,
    )

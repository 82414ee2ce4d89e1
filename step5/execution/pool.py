"""The fold runner interface, ``run(groups) -> outcomes``, and its one implementation:
persistent workers, one per device slot (S96B), or one-shot trainers on the same slots (S96A,
``persistent=False``). docs/workers.md has its picture, lifecycle, fault table and ownership
rule: a :class:`_Slot` is changed only by the dispatch thread holding it; only the statistics
and the registry of live processes are shared, behind ``_lock``.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import logging
import queue
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import psutil

from step5.devices import DeviceSlot
from step5.errors import JobError, JobTimedOut, RunnerClosed, TrainerCannotStart, WorkerCrashed, WorkerFault
from step5.execution.process import Spawner, WorkerProcess, kill_tree, oneshot_command, popen_worker, reap_killed, \
    run_oneshot_job, sigkill
from step5.execution.slot import FaultBudget, JobAttempts, JobVerdict, SlotAction, SlotMachine
from step5.execution.summary import FallbackRecord, FaultRecord, RecoveryRecord, RunnerStats, WorkerRecord
from step5.launch import WORKER_MODULE, module_command
from step5.policy import TrainingPolicy
from step5.protocol import Job, TrainFolds, echo, ready_problem
from step5.values import is_number

logger = logging.getLogger(__name__)

#: What one worker is taken to hold in host memory before one is measured. It decides only
#: whether the pool measures its first worker before starting the others: a GPU build of torch
#: reaches about 2 GB resident once its CUDA or HIP context is up (pytorch issues 12873 and
#: 113326 measure it), and the pipeline's rigs have 8 GPUs to 7.7 GB.
ASSUMED_WORKER_BYTES = 2 << 30

FALLBACK_LOG = "[S96B] Worker %s died, falling back to subprocess mode"
REPROMOTE_LOG = "[S96B] Worker %s: trying a fresh persistent worker again after %.0fs in subprocess mode (%d of %d)"

#: A job's outcome: its result dict, or the JobError it failed with, in its place.
JobOutcome = dict[str, Any] | JobError


class FoldRunner(Protocol):
    """What the optimizer needs from whatever trains its neural-net folds (a group of one is
    an unfused job; tests use :class:`step5.testing.fake_runner.FakeFoldRunner`)."""
    mode: str  # "persistent_workers" | "subprocess", recorded in the sidecar

    @property
    def capacity(self) -> int: ...  # groups that can train at the same time (device slots)

    def wait_ready(self) -> None: ...  # until it can take jobs (workers booted); run() waits too

    def run(self, groups: Sequence[Sequence[Job]]) -> list[list[JobOutcome]]: ...

    def summary(self) -> RunnerStats: ...

    def close(self) -> None: ...  # release every process; idempotent


def check_groups(groups: Sequence[Sequence[Job]]) -> list[list[Job]]:
    """``groups`` as lists; an empty group is a caller's bug."""
    out = [list(g) for g in groups]
    if any(not g for g in out):
        raise ValueError("run() got an empty group; a lone job is a group of one")
    return out


def raise_first_job_error(outcomes: Sequence[JobOutcome]) -> list[dict[str, Any]]:
    """The results, when no outcome is an error; else raise the first JobError."""
    for outcome in outcomes:
        if isinstance(outcome, JobError):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


def _unique_bytes(pid: int) -> int:
    """The memory only process ``pid`` holds (its USS), what another like it would add; 0 unknown."""
    try:
        return int(psutil.Process(pid).memory_full_info().uss)
    except (psutil.Error, OSError, AttributeError):
        return 0


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """How the pool reads this host's memory (tests pass their own)."""
    available: Callable[[], int] = lambda: int(psutil.virtual_memory().available)
    footprint: Callable[[int], int] = _unique_bytes  # pid -> bytes


@dataclasses.dataclass
class _Slot:
    """One device slot across the life of the pool; owned by the thread holding it."""
    slot: DeviceSlot
    machine: SlotMachine
    record: WorkerRecord  # its summary line, but for the counts ``machine`` keeps
    worker: WorkerProcess | None = None

    @property
    def label(self) -> str:
        return self.slot.label


_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("closing a worker pool at exit failed")


class WorkerPool:
    """Device slots behind the :class:`FoldRunner` interface."""

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        policy: TrainingPolicy,
        *,
        persistent: bool = True,
        python: str = sys.executable,
        worker_command: Sequence[str] | None = None,
        oneshot_script: str | Path | None = None,
        shutdown_timeout_s: float = 5.0,
        probe_interval_s: float | None = None,
        probe_grace_s: float | None = None,
        wait: bool = True,
        memory: HostMemory = HostMemory(),
    ) -> None:
        """Spawn one worker per slot and wait until each says ``ready`` (or has fallen back);
        with ``wait=False`` return while they boot (:meth:`wait_ready`, which ``run`` calls, waits).
        With ``persistent=False`` spawn nothing: every job runs in a one-shot trainer. ``policy``
        gives the timeouts, budgets and spawn stagger; ``worker_command`` and ``oneshot_script``
        replace the package's trainers (tests pass the fake worker); the probe settings default
        as docs/workers.md ("Lifecycle") says. Where the slots' workers may not fit in ``memory``,
        the first boots alone and only as many others start as the host holds beside it."""
        if not slots:
            raise ValueError("WorkerPool needs at least one device slot")
        labels = [s.label for s in slots]
        if len(set(labels)) != len(labels):
            raise ValueError(f"device slot labels must be unique, got {labels}")
        for name, value in (("worker_job_timeout_s", policy.worker_job_timeout_s),
                            ("worker_ready_timeout_s", policy.worker_ready_timeout_s),
                            ("shutdown_timeout_s", shutdown_timeout_s)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")
        self.persistent = persistent
        self.mode = "persistent_workers" if persistent else "subprocess"
        self.job_timeout_s = float(policy.worker_job_timeout_s)
        self.ready_timeout_s = float(policy.worker_ready_timeout_s)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.probe_interval_s = probe_interval_s or min(5.0, self.job_timeout_s / 4)
        self.probe_grace_s = probe_grace_s or min(30.0, self.job_timeout_s / 2)
        self.worker_command = list(worker_command or module_command(WORKER_MODULE, python))
        self.oneshot_command = oneshot_command(python, script=oneshot_script)
        # A one-shot pool's slots start in the fallback and never leave it (no re-promotion).
        machines = [SlotMachine(policy.max_worker_restarts, cooldown_s=policy.worker_repromote_after_s,
                                fallback=not persistent, max_repromotions=policy.max_worker_repromotions if persistent else 0)
                    for _ in slots]
        self._slots = [_Slot(slot, machine, WorkerRecord(label=slot.label, cuda_visible_devices=slot.cuda_visible_devices,
                                                         hip_visible_devices=slot.hip_visible_devices))
                       for slot, machine in zip(slots, machines)]
        self.max_job_reruns = int(policy.max_job_reruns)
        self._budget = FaultBudget(policy.max_fault_reruns)
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._no_slot_left: str | None = None  # why, once every slot is retired (TrainerCannotStart)
        self._closed = False
        self._lock = threading.Lock()  # guards the statistics and _procs below
        # Every process started, until reaped: its worker from its `ready` until the holder drops it.
        self._procs: dict[subprocess.Popen[bytes], WorkerProcess | None] = {}
        self._job_ids = itertools.count()
        # What summary() reports, but workers and recovery, which it reads off the slots and the budget.
        self._stats = RunnerStats(mode=self.mode, devices=[st.label for st in self._slots])
        self._job_wall_s = 0.0
        self._warned_no_fusion = False
        self._booted = not persistent  # every slot's first worker has said `ready` or the slot fell back
        self._spawner = Spawner("step5-spawner", policy.worker_spawn_stagger_s)
        if policy.worker_spawn_stagger_s > 0:
            logger.info("workers start %gs apart (training.worker_spawn_stagger_s), restarts included",
                        policy.worker_spawn_stagger_s)
        self._dispatch = ThreadPoolExecutor(max_workers=len(self._slots), thread_name_prefix="step5-dispatch")
        _LIVE_POOLS.add(self)
        self._booting: list[Future[Any]] = []
        if not persistent:
            for st in self._slots:
                self._free.put(st)
            logger.info("one-shot trainers (S96A) on %s", ", ".join(st.label for st in self._slots))
            return
        self._memory, self._headroom = memory, float(policy.host_memory_headroom)
        self._admitted = threading.Event()  # the others may boot: the pilot was measured (or none is)
        self._pilot = self._slots[0] if len(self._slots) > 1 and \
            len(self._slots) * ASSUMED_WORKER_BYTES > memory.available() * (1 - self._headroom) else None
        if self._pilot is None:
            self._admitted.set()
        else:
            logger.info("%d workers may not fit in this host's available memory: worker %s boots first and is "
                        "measured", len(self._slots), self._pilot.label)
        self._boot_began = time.perf_counter()
        self._boots_left = len(self._slots)
        self._booting = [self._dispatch.submit(self._first_boot, st) for st in self._slots]
        if wait:
            self._wait_booted(every=True)

    def _first_boot(self, st: _Slot) -> None:
        """Boot the slot's first worker (restarts, fallback included), then give the slot to the
        groups: a slot whose GPU takes its time does not hold the others back."""
        try:
            if st is not self._pilot:
                self._admitted.wait()
            if not st.machine.retired:
                self._ensure_worker(st)
                if st is self._pilot:
                    self._admit_beside(st)
        finally:
            if st is self._pilot:
                self._admitted.set()  # its boot is over, however it ended: the others may go on
            if not st.machine.retired:
                self._free.put(st)
            with self._lock:
                self._boots_left -= 1
                if self._boots_left == 0:
                    self._stats.timings.spawn_s += time.perf_counter() - self._boot_began
                    self._booted = True
                    if not self._closed:
                        logger.info("worker pool ready in %.2fs: %s", self._stats.timings.spawn_s, ", ".join(
                            f"{o.label}={'idle' if o.machine.retired else 'fallback' if o.machine.fallback else o.record.device}"
                            for o in self._slots))

    def _admit_beside(self, pilot: _Slot) -> None:
        """Leave idle (retired) the slots whose workers the host's memory would not hold beside
        the ``pilot``'s, measured now that it is ready."""
        footprint = self._memory.footprint(pilot.worker.pid) if pilot.worker is not None else 0
        if footprint <= 0:  # fell back, or not measurable: nothing to go by
            return
        available = self._memory.available()
        others = [o for o in self._slots if o is not pilot]
        fit = max(0, int(available * (1 - self._headroom) // footprint))
        mb = 1 << 20
        if fit >= len(others):
            logger.info("worker %s holds %.0f MB of host memory; %.0f MB available hold every other worker",
                        pilot.label, footprint / mb, available / mb)
            return
        idle = others[fit:]
        why = (f"worker {pilot.label} holds {footprint / mb:.0f} MB of host memory and {available / mb:.0f} MB are "
               f"available, of which {self._headroom * 100:g}% stay free (training.host_memory_headroom): room for "
               f"{fit} more worker(s)")
        with self._lock:
            for st in idle:
                st.machine.retire()
                self._stats.faults.append(FaultRecord(st.label, "memory", None, f"{st.label} left idle: {why}"))
        logger.warning("%s; %s left idle (free memory, lower the headroom, or name fewer GPUs with --gpus)", why,
                       ", ".join(st.label for st in idle))

    def wait_ready(self) -> None:
        """Wait until the pool can take a job: one slot's first worker said ``ready`` or the slot
        fell back (the other slots take jobs as they get there)."""
        self._wait_booted(every=False)

    def _wait_booted(self, *, every: bool) -> None:
        if self._booted:
            return
        try:
            done, _ = futures_wait(self._booting, return_when=ALL_COMPLETED if every else FIRST_COMPLETED)
            for booted in done:
                booted.result()  # what ended a boot other than `ready` or the fallback: the pool closed, a bug
        except BaseException:
            self._close(grace_s=0.0)
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capacity(self) -> int:
        """Groups that can train at the same time (one per slot that is not retired)."""
        return max(1, sum(1 for st in self._slots if not st.machine.retired))

    def _start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a process, registered until it is reaped; none once the pool is closed, so
        none slips past close()."""
        with self._lock:
            self._check_open()
            self._procs = {p: w for p, w in self._procs.items() if w is not None or p.returncode is None}
            proc = popen_worker(command, env)
            self._procs[proc] = None
            return proc

    def _spawn(self, st: _Slot) -> WorkerProcess:
        """Start a worker for ``st`` and wait for its ``ready``; raises :class:`WorkerFault`."""
        start = time.perf_counter()
        try:
            # st.slot.environment() pins the device and names this process the parent (step5.lifeline).
            proc = self._spawner.submit(self._start, self.worker_command, st.slot.environment()).result()
        except RuntimeError:  # the spawner was shut down: the pool is closing
            raise RunnerClosed("the worker pool is closed") from None
        except OSError as exc:
            raise WorkerFault(f"worker {st.label} could not be started: {exc}", kind="boot",
                              exit_status=None, stderr_tail="") from None
        worker = WorkerProcess(st.label, proc)
        doing = f"booting (waiting for `ready`, {self.ready_timeout_s:g}s allowed)"
        message = worker.receive(self.ready_timeout_s, doing, hang_kind="boot")
        why = ready_problem(message)
        if why is not None:
            raise worker.violation(message, doing, why)
        elapsed = time.perf_counter() - start
        with self._lock:  # close() says goodbye to these; it kills the others (booting, one-shot)
            self._procs[proc] = worker
            if self._booted:  # restarts; the first boots are timed as a whole
                self._stats.timings.spawn_s += elapsed
        st.worker, rec = worker, st.record
        # `boot_s` is the worker's own word, kept only as the sidecar can hold it (a string there failed the run at its end).
        boot_s = message.get("boot_s")
        rec.pid, rec.device = worker.pid, str(message.get("device", "?"))
        rec.boot_s = float(boot_s) if is_number(boot_s) and boot_s >= 0 else None
        # Torch calls a ROCm GPU "cuda" too: only `backend` tells them apart (read from the device if absent).
        backend = message.get("backend")
        rec.backend = str(backend) if backend in ("cuda", "rocm", "cpu") else (
            "cuda" if rec.device.startswith("cuda") else "cpu")
        logger.info("worker %s (pid %d) ready on %s (%s) in %.2fs", st.label, worker.pid, rec.device, rec.backend,
                    elapsed)
        if st.slot.kind != "cpu" and rec.backend != st.slot.kind:
            logger.warning("worker %s was given %s but trains on %s (backend %s: its torch cannot drive that GPU)",
                           st.label, st.slot.describe(), rec.device, rec.backend)
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

    def _check_open(self) -> None:
        if self._closed:
            raise RunnerClosed("the worker pool is closed")

    def _record_fault(self, st: _Slot, kind: str, exc: WorkerCrashed | JobTimedOut) -> None:
        with self._lock:
            self._stats.faults.append(FaultRecord(st.label, kind, exc.exit_status, str(exc)))

    def _drop_worker(self, st: _Slot) -> None:
        """The holder lets go of a dead worker (killed by the fault or timeout that ended it)."""
        if st.worker is not None:
            st.worker.kill()  # already dead: reaps, closes pipes
            with self._lock:
                self._procs.pop(st.worker.proc, None)
            st.worker = None

    def _on_fault(self, st: _Slot, fault: WorkerFault, group: Sequence[Job] | None) -> None:
        """Record a worker fault of ``st`` and restart its worker or fall back."""
        self._drop_worker(st)
        self._check_open()  # a fault caused by close() itself is not the worker's
        where = "" if not group else f" [job {group[0].job_id!r}" + (f" +{len(group) - 1}]" if len(group) > 1 else "]")
        self._record_fault(st, fault.kind, fault)
        action = st.machine.on_fault(fault.kind, time.monotonic())
        logger.warning("%s%s; last stderr lines:\n%s", fault, where, fault.stderr_tail or "(no stderr output)")
        if action is SlotAction.RESTART:
            logger.warning("restarting worker %s (restart %d of %d)", st.label, st.machine.restarts,
                           st.machine.max_restarts)
            return
        with self._lock:
            self._stats.fallbacks.append(FallbackRecord(
                label=st.label, reason=str(fault), kind=fault.kind, exit_status=fault.exit_status,
                stderr_tail=fault.stderr_tail, after_jobs=st.record.jobs, restarts=st.machine.restarts,
            ))
        logger.warning(FALLBACK_LOG, st.label)

    def _train_on(self, st: _Slot, worker: WorkerProcess, group: Sequence[Job]) -> list[JobOutcome]:
        """One job (a group of one: ``train`` or ``merge``) or one ``train_folds``; each job's outcome.
        Every job gets a fresh wire ``job_id`` and only the matching answer is accepted."""
        wire_ids = [f"{st.label}#{next(self._job_ids)}" for _ in group]
        wire = [dataclasses.replace(r, job_id=w) for r, w in zip(group, wire_ids)]
        if len(group) == 1:
            doing = f"running job {wire_ids[0]} (trial {group[0].trial_number}, fold {group[0].fold_idx})"
        else:
            doing = f"running {len(group)} fused jobs {wire_ids[0]}..{wire_ids[-1]}"
        start = time.perf_counter()
        worker.send(wire[0] if len(group) == 1 else TrainFolds(tuple(wire)), doing)  # type: ignore[arg-type]
        answers = worker.await_answers(
            len(group), timeout_s=self.job_timeout_s * len(group), probe_interval_s=self.probe_interval_s,
            probe_grace_s=self.probe_grace_s, doing=doing,
        )
        outcomes: list[JobOutcome] = []
        for answer, wire_id, request in zip(answers, wire_ids, group):
            worker.check_reply(answer, wire_id, request, doing)
            answer["job_id"] = request.job_id
            outcomes.append(answer if answer["status"] == "complete" else JobError.from_dict(answer))
        st.record.jobs += len(group)
        done = [a for a in answers if a.get("status") == "complete"]
        with self._lock:
            self._job_wall_s += time.perf_counter() - start
            # A fused result's duration carries 1/M of the shared pass, so the sum is the pass.
            self._stats.timings.compute_s += sum(_duration(a) for a in done)
            self._stats.timings.jobs += len(done)
            if len(group) > 1:
                self._stats.fusion.fused_groups += 1
        return outcomes

    def _run_oneshot(self, st: _Slot, request: Job, attempts: JobAttempts) -> JobOutcome:
        """One job in one-shot trainers until it has a verdict (docs/workers.md, "Faults never
        cost a trial"); ``attempts`` carries the faults it met on a worker before the slot fell
        back. The pool's closing (``_check_open``) is neither a crash nor a timeout."""
        start = time.perf_counter()
        try:
            while True:
                self._check_open()
                try:
                    result = run_oneshot_job(request, st.slot, timeout_s=self.job_timeout_s,
                                             ready_timeout_s=self.ready_timeout_s, command=self.oneshot_command,
                                             start=self._start)
                    break
                except JobError as exc:
                    if exc.error_type == "startup_error":  # any job here would fail so, trial after trial
                        raise TrainerCannotStart(
                            f"no training process can start on {st.label} ({st.slot.describe()}): {exc.message}. "
                            "Check that this Python's torch imports and sees that device") from None
                    return exc
                except (JobTimedOut, WorkerCrashed) as exc:
                    self._check_open()
                    timed_out = isinstance(exc, JobTimedOut)
                    self._record_fault(st, "timeout" if timed_out else "oneshot", exc)
                    if timed_out:
                        verdict = attempts.on_timeout()
                        note = f"timeout {attempts.timeouts} of at most 2"
                    else:
                        verdict = attempts.on_fault()
                        note = f"fault {attempts.faults} of this job; " + (
                            "re-running it with the same request and seed" if verdict is JobVerdict.RETRY else "not re-run")
                    logger.warning("%s (%s); stderr tail:\n%s", exc, note, exc.stderr_tail or "(none)")
                    if verdict is JobVerdict.GIVE_UP:
                        return _gave_up(request, exc, attempts)
        finally:
            with self._lock:
                self._job_wall_s += time.perf_counter() - start
        st.record.oneshot_jobs += 1
        with self._lock:
            self._stats.timings.compute_s += _duration(result)
            self._stats.timings.jobs += 1
        return result

    def _run_on_slot(self, st: _Slot, group: Sequence[Job]) -> list[JobOutcome]:
        """Train ``group`` on the held slot until every job has its verdict."""
        attempts = JobAttempts(self.max_job_reruns, self._budget)
        while True:
            worker = self._ensure_worker(st)
            if worker is None:
                if len(group) > 1:
                    with self._lock:
                        self._stats.fusion.unfused_groups += 1
                # Each job carries the faults the group met so far into its own attempts.
                return [self._run_oneshot(st, r, dataclasses.replace(attempts)) for r in group]
            try:
                return self._train_on(st, worker, group)
            except WorkerFault as fault:
                self._on_fault(st, fault, group)
                if attempts.on_fault() is JobVerdict.GIVE_UP:
                    logger.warning("not re-running %d job(s) hit by %s: %s", len(group), fault, attempts.refused)
                    return [_gave_up(r, fault, attempts) for r in group]
                # else re-run the same group (same requests and seeds) on the new worker or the fallback
            except JobTimedOut as exc:  # the job's, not the worker's: a new worker, no restart used, one retry
                self._drop_worker(st)
                self._check_open()
                self._record_fault(st, "timeout", exc)
                st.machine.on_job_timeout()
                verdict = attempts.on_timeout()
                logger.warning("%s; %s", exc, "retrying it once on a new worker" if verdict is JobVerdict.RETRY
                               else "it fails (a job timeout is the job's, not the worker's)")
                if verdict is JobVerdict.GIVE_UP:
                    return [_gave_up(r, exc, attempts) for r in group]

    def _run_group(self, group: Sequence[Job]) -> list[JobOutcome]:
        """Take a free slot and train ``group`` on it; where no trainer can start, retire the
        slot and take another (:class:`TrainerCannotStart` once none is left)."""
        while True:
            st = self._free.get()
            if self._no_slot_left is not None:
                self._free.put(st)  # the next holder waiting finds out too
                raise TrainerCannotStart(self._no_slot_left)
            try:
                return self._train_group_on(st, group)
            except TrainerCannotStart as exc:
                self._retire(st, exc)
            finally:
                if not st.machine.retired:
                    self._free.put(st)

    def _retire(self, st: _Slot, exc: TrainerCannotStart) -> None:
        """Take ``st`` out of the run for good, its group going to another slot; raise
        :class:`TrainerCannotStart` instead when it is the last slot."""
        with self._lock:
            others = [o.label for o in self._slots if o is not st and not o.machine.retired]
            if not others:
                gone = [o.label for o in self._slots if o.machine.retired]
                self._no_slot_left = str(exc) + (f" (every other slot was retired before: {', '.join(gone)})"
                                                  if gone else "")
            else:
                st.machine.retire()
                self._stats.faults.append(FaultRecord(st.label, "startup", None, str(exc)))
        if not others:
            raise TrainerCannotStart(self._no_slot_left) from None
        logger.warning("%s; slot %s is retired: its jobs go to %s", exc, st.label, ", ".join(others))

    def _train_group_on(self, st: _Slot, group: Sequence[Job]) -> list[JobOutcome]:
        """Train ``group`` on the held slot, re-run alone what failed in a pass."""
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
                    self._stats.fusion.rerun_jobs += len(failed)
                for i in failed:
                    (outcomes[i],) = self._run_on_slot(st, [group[i]])
        return outcomes

    def run(self, groups: Sequence[Sequence[Job]]) -> list[list[JobOutcome]]:
        """Train every group (concurrently across slots); per group, each job's outcome. A
        larger group shares one fused pass, or in a one-shot pool runs job by job across the
        slots (docs/workers.md, "Fused groups"). Anything but a job error escaping (Ctrl-C, a
        bug) kills every process and closes the pool; :class:`RunnerClosed` if it was closed."""
        self._check_open()
        groups = check_groups(groups)
        self.wait_ready()
        fused = sum(1 for g in groups if len(g) > 1)
        with self._lock:
            self._stats.fusion.groups += len(groups)
            self._stats.fusion.jobs += sum(len(g) for g in groups)
            self._stats.fusion.largest_group = max([self._stats.fusion.largest_group, *(len(g) for g in groups)])
            if not self.persistent:
                self._stats.fusion.unfused_groups += fused
        if fused and not self.persistent and not self._warned_no_fusion:
            self._warned_no_fusion = True
            logger.warning(
                "fused training asked for, but one-shot subprocesses (S96A) train one fold per process and "
                "cannot fuse: every fused group runs fold by fold (same results; use persistent workers to fuse)"
            )
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
        except BaseException as exc:
            logger.warning("stopping every worker and trainer: %s",
                           exc if isinstance(exc, TrainerCannotStart) else "interrupted")
            self._close(grace_s=0.0)
            raise
        finally:
            with self._lock:
                self._stats.timings.wall_s += time.perf_counter() - start
        outcomes = iter([outcome for f in futures for outcome in f.result()])  # job by job, as dispatched
        return [[next(outcomes) for _ in g] for g in groups]

    def summary(self) -> RunnerStats:
        with self._lock:
            stats = copy.deepcopy(self._stats)
            stats.timings.overhead_s = max(0.0, self._job_wall_s - stats.timings.compute_s)
            if not self._booted:  # a slot still booting (a slow or wedged GPU): the boot so far
                stats.timings.spawn_s += time.perf_counter() - self._boot_began
        stats.workers = [dataclasses.replace(st.record, restarts=st.machine.restarts, fallback=st.machine.fallback,
                                             repromotions=st.machine.repromotions)
                         for st in self._slots] if self.persistent else []
        stats.recovery = RecoveryRecord(
            faults=sum(1 for f in stats.faults if f.kind not in ("timeout", "memory")), reruns=self._budget.reruns,
            max_fault_reruns=self._budget.max_reruns, refused_reruns=self._budget.refused,
            repromotions=sum(st.machine.repromotions for st in self._slots),
        )
        return stats

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Pids of the workers running now (for tests and diagnostics)."""
        with self._lock:
            return sorted(w.pid for w in self._procs.values() if w is not None and w.proc.poll() is None)

    def close(self) -> None:
        """Shut every worker down (``shutdown``, grace, terminate, kill) and reap it; idempotent."""
        self._close(grace_s=self.shutdown_timeout_s)

    def _close(self, grace_s: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = [w for w in self._procs.values() if w is not None]
            strays = [p for p, w in self._procs.items() if w is None]
        _LIVE_POOLS.discard(self)
        try:
            # One-shot trainers and half-booted workers have nothing to say goodbye with.
            for proc in strays:
                kill_tree(proc)
                reap_killed(proc, "process")
            if grace_s > 0:
                for w in workers:
                    w.request_shutdown()
                deadline = time.monotonic() + grace_s
                for w in workers:
                    w.finish_shutdown(deadline)
            else:
                for w in workers:  # every worker gets its signal before any is waited for
                    kill_tree(w.proc)
                for w in workers:
                    w.kill()
        except BaseException:
            # Interrupted while waiting (Ctrl-C during close): the pool is already marked
            # closed, so no later close() would come back for these. SIGKILL them now.
            for proc in [w.proc for w in workers] + strays:
                sigkill(proc)
            raise
        with self._lock:
            self._procs.clear()
        self._spawner.shutdown()
        # Holders still busy see dead pipes or RunnerClosed and end on their own; an abort
        # (grace 0, e.g. Ctrl-C) does not wait for them, and no thread waits on itself.
        in_dispatch = threading.current_thread().name.startswith("step5-dispatch")
        self._dispatch.shutdown(wait=grace_s > 0 and not in_dispatch, cancel_futures=True)
        logger.info("worker pool closed")


def _duration(result: dict[str, Any]) -> float:
    value = result.get("duration", 0.0)
    return float(value) if is_number(value) else 0.0


def _gave_up(request: Job, last: WorkerCrashed | JobTimedOut, attempts: JobAttempts) -> JobError:
    """A job's verdict when its attempts ran out: ``timeout`` after ``last`` timed it out, else ``train_error``."""
    where = f"job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx})"
    if isinstance(last, JobTimedOut):
        return JobError(f"{where} ran past its {last.timeout_s:g}s timeout {attempts.timeouts} time(s); raise "
                        "training.worker_job_timeout_s or lower the epochs", "timeout", **echo(request))
    return JobError(f"{where} was hit by {attempts.faults} infrastructure fault(s), the last: {last}; not re-run "
                    f"again: {attempts.refused}", "train_error", **echo(request))


def _first_failure(futures: Sequence[Future[Any]]) -> BaseException | None:
    """Wait until every future is done or one has failed; the first failure in order (one
    cancelled by close(): a CancelledError), or None. Done callbacks, not ``wait``: a future
    cancelled by an executor's shutdown never wakes ``wait``'s waiters."""
    settled = threading.Semaphore(0)
    for future in futures:
        future.add_done_callback(lambda _: settled.release())
    for _ in futures:
        settled.acquire()
        for future in futures:
            if future.done() and (future.cancelled() or future.exception() is not None):
                return CancelledError() if future.cancelled() else future.exception()
    return None


"""The sidecar's ``execution`` block (docs/workers.md, "``execution`` block"): typed records,
the same shape whatever trained the run. A runner reports :class:`RunnerStats`;
:func:`build_execution_summary` adds the loop's part; :data:`EXECUTION_SCHEMA` is derived.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping

from msgspec import Meta

from step5.schema import one_of, record_schema

ExecutionMode = one_of(("persistent_workers", "subprocess", "inline"))


@dataclass(kw_only=True)
class WorkerRecord:
    """One persistent-worker slot across the life of the pool."""
    label: str  # "GPU-0" / "CPU-1"
    device: str | None = None  # as the worker reported it in `ready`
    pid: int | None = None  # current (or last) worker pid
    jobs: int = 0  # jobs answered by workers on this slot (results and job errors)
    oneshot_jobs: int = 0  # jobs run through the one-shot fallback
    restarts: int = 0  # restarts after worker faults (not after job timeouts)
    fallback: bool = False  # in the fallback (one-shot subprocesses) when the run ended
    repromotions: int = 0  # times the slot left the fallback for a fresh worker
    boot_s: float | None = None  # interpreter start -> ready, as the last worker measured it
    backend: str | None = None  # "cuda" | "rocm" | "cpu": what the last worker's torch trained on (None: none got ready)
    cuda_visible_devices: str  # what the slot's processes were given
    hip_visible_devices: str  # likewise for AMD GPUs ("-1": none)


@dataclass
class FallbackRecord:
    """Why a slot fell back to one-shot subprocesses."""
    label: str
    reason: str
    kind: str  # the last fault's kind
    exit_status: str | None
    stderr_tail: str
    after_jobs: int
    restarts: int


@dataclass
class FaultRecord:
    """A worker fault (crash, hang, protocol, boot), a one-shot crash, a job timeout, or a slot
    retired because no trainer can start there (startup) or the host's memory holds no worker
    for it (memory)."""
    slot: str
    kind: str  # crash | hang | protocol | boot | oneshot | timeout | startup | memory
    status: str | None  # SIGKILL(-9), EXIT(1), TIMEOUT, ...
    error: str


@dataclass
class FusionRecord:
    """Groups handed to ``run()``; a group of one is an unfused job."""
    groups: int = 0  # groups of any size
    jobs: int = 0  # jobs in them
    fused_groups: int = 0  # groups of 2+ jobs trained in one pass
    unfused_groups: int = 0  # groups of 2+ jobs whose pass could not run (trained job by job)
    rerun_jobs: int = 0  # jobs that failed inside a pass and were re-run alone for their verdict
    largest_group: int = 0


@dataclass
class RecoveryRecord:
    """What infrastructure faults cost the run (a job timeout is not one)."""
    faults: int = 0  # worker and one-shot trainer faults (crash, hang, protocol, boot, oneshot, startup)
    reruns: int = 0  # re-runs of jobs those faults hit (same request, same seed)
    max_fault_reruns: int = 0  # the run's budget for them (training.max_fault_reruns)
    refused_reruns: int = 0  # re-runs refused (budget or the job's own limit): each failed its job
    repromotions: int = 0  # fallen-back slots that tried a fresh persistent worker again


@dataclass
class SearchRecord:
    """How the optimizer's ask/tell loop ran its trials."""
    trials_in_flight: int = 0  # trials asked and run together (B); 0 when no search ran
    fuse_folds: bool = False  # a trial's K folds share one pass
    fuse_trials: bool = False  # same-shape trials of a batch share one pass
    batches: int = 0  # ask/run/tell rounds
    trials: int = 0  # trials told (any end state)
    failed_trials: int = 0  # trials told FAIL
    replaced_trials: int = 0  # failed trials the loop asked a replacement for (--trials counts complete ones)


@dataclass
class Timings:
    """Seconds. The runner's fields first; the run phases are 0.0 where they did not happen."""
    jobs: int = 0  # jobs with a result (a retried job counts once)
    spawn_s: float = 0.0  # starting persistent workers (restarts included)
    wall_s: float = 0.0  # inside run() calls
    compute_s: float = 0.0  # the jobs' own time in their processes
    overhead_s: float = 0.0  # job time outside training: IPC, NPZ hand-off, one-shot boots
    load_s: float = 0.0
    split_s: float = 0.0
    runner_start_s: float = 0.0
    search_s: float = 0.0
    rescore_s: float = 0.0
    final_s: float = 0.0
    total_s: float = 0.0


@dataclass
class RunnerStats:
    """What a runner knows about itself; ``summary()`` of every runner returns one."""
    mode: ExecutionMode | None
    devices: list[str]
    workers: list[WorkerRecord] = field(default_factory=list)
    fallbacks: list[FallbackRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    fusion: FusionRecord = field(default_factory=FusionRecord)
    recovery: RecoveryRecord = field(default_factory=RecoveryRecord)
    timings: Timings = field(default_factory=Timings)


@dataclass
class ExecutionSummary(RunnerStats):
    """The whole ``execution`` block: the runner's part and the loop's."""
    search: SearchRecord = field(default_factory=SearchRecord)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["timings"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out["timings"].items()}
        return out


def build_execution_summary(
    stats: RunnerStats | None, *, search: SearchRecord | None = None, phases: Mapping[str, float] | None = None,
) -> ExecutionSummary:
    """The execution block of a run: the runner's stats (None: nothing trained, e.g. a
    degenerate target), the loop's settings, and the run's phase timings (``*_s`` fields of
    :class:`Timings`)."""
    run = copy.deepcopy(stats) if stats is not None else RunnerStats(mode=None, devices=[])
    run.timings = dataclasses.replace(run.timings, **{name: float(s) for name, s in (phases or {}).items()})
    return ExecutionSummary(**vars(run), search=search or SearchRecord())


#: Every count in the block is an int >= 0 and every time a finite number of seconds >= 0.
Count = Annotated[int, Meta(ge=0, description="an int >= 0")]
Seconds = Annotated[float, Meta(ge=0, le=sys.float_info.max, description="a finite number >= 0")]
#: The ``execution`` block as a sidecar holds it: every key required, no other key allowed.
EXECUTION_SCHEMA = record_schema(ExecutionSummary, replace=((int, Count), (float, Seconds)))

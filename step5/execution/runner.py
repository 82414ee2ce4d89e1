"""The fold runner interface, ``run(groups) -> outcomes`` (docs/workers.md, "One path").

A group of one is an unfused job (``train``, or the final model's ``merge``); a larger
group asks for one fused pass. Each job's outcome is its result dict or the
:class:`~step5.errors.JobError` it failed with, in its place, so one failing fold costs no
other fold anything. Implemented by :class:`step5.execution.pool.WorkerPool` and, in
tests, :class:`step5.testing.fake_runner.FakeFoldRunner`.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from step5.errors import JobError
from step5.execution.summary import RunnerStats
from step5.protocol import Job

JobOutcome = dict[str, Any] | JobError


class FoldRunner(Protocol):
    """What the optimizer needs from whatever trains its neural-net folds."""
    mode: str  # "persistent_workers" | "subprocess", recorded in the sidecar

    @property
    def capacity(self) -> int: ...  # groups that can train at the same time (device slots)

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

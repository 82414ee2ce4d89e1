"""Pick the fold runner: persistent workers (S96B) or one-shot subprocesses (S96A)."""
from __future__ import annotations

import sys
from typing import Sequence

from step5.devices import DeviceSlot
from step5.execution.runner import FoldRunner, SubprocessRunner
from step5.policy import TrainingPolicy


def resolve_persistent_workers(cli_choice: bool | None, policy: TrainingPolicy) -> bool:
    """``--persistent-workers`` / ``--no-persistent-workers`` win; otherwise the policy's
    kill switch (whose absence already means False, see :mod:`step5.policy`)."""
    return policy.use_persistent_workers if cli_choice is None else cli_choice


def make_fold_runner(
    slots: Sequence[DeviceSlot],
    policy: TrainingPolicy,
    *,
    persistent: bool,
    python: str = sys.executable,
) -> FoldRunner:
    """A started runner over ``slots``; the caller closes it (it is a context manager)."""
    if persistent:
        # Imported here so that the S96A path does not even load the pool module.
        from step5.execution.pool import WorkerPool

        return WorkerPool(
            slots,
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
    return SubprocessRunner(
        slots, job_timeout_s=policy.worker_job_timeout_s, max_job_reruns=policy.max_job_reruns,
        max_fault_reruns=policy.max_fault_reruns, python=python,
    )

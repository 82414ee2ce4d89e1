"""Test helpers that ship with the package (like ``optuna.testing``).

:mod:`step5.testing.fake_worker` is a torch-free stand-in for ``nn_gpu_worker.py`` and
``train_single_trial.py`` that can answer, hang, print garbage, exit with a code or kill
itself, so the pool's fault handling can be tested as a table of cases;
:mod:`step5.testing.processes` checks what tests that start real processes need (is it
gone, who is left in a process group, signal a CLI once its log says it is busy).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

FAKE_WORKER = Path(__file__).resolve().with_name("fake_worker.py")


def fake_worker_command(*options: str, python: str = sys.executable) -> list[str]:
    """The command line that starts a fake worker with ``options`` (see its ``--help``)."""
    return [python, str(FAKE_WORKER), *options]



def run_each(runner: Any, requests: Sequence[Any]) -> list[dict[str, Any]]:
    """Run every request as a group of one (unfused) through ``runner.run``; the results in
    order, or the first :class:`~step5.errors.JobError` raised once every job finished."""
    from step5.execution.runner import raise_first_job_error

    return raise_first_job_error([outcome for (outcome,) in runner.run([[r] for r in requests])])


def summary_of(runner: Any) -> dict[str, Any]:
    """A runner's :class:`~step5.execution.summary.RunnerStats` as plain dicts."""
    import dataclasses

    return dataclasses.asdict(runner.summary())

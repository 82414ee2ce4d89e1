"""Test helpers that ship with the package (like ``optuna.testing``; docs/workers.md "The
fakes"): fake pools, CPU slots, a wire request, running requests one by one, a study's trials."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

FAKE_WORKER = Path(__file__).resolve().with_name("fake_worker.py")


def fake_worker_command(*options: str, python: str = sys.executable) -> list[str]:
    """The command line that starts a fake worker with ``options`` (see its ``--help``)."""
    return [python, str(FAKE_WORKER), *options]


def cpu_slots(n: int) -> list[Any]:
    """``n`` single-threaded CPU slots, as ``--gpus none`` plans them."""
    from step5.devices import DeviceSlot

    return [DeviceSlot(f"CPU-{i}", "cpu", "", 1) for i in range(n)]


def fake_pool(slots: int | Sequence[Any], *options: str, state_dir: Path | None = None, **kwargs: Any) -> Any:
    """A :class:`~step5.execution.pool.WorkerPool` of fake workers started with ``options``
    on ``slots`` (a count of CPU slots, or the slots themselves), with timeouts short enough
    for tests and room for a loaded machine (a job 5 s, a boot 10 s, a shutdown 3 s) and one
    restart per slot; ``kwargs`` override any of them (``training`` policy keys go into the
    pool's policy, the rest are the pool's own arguments). ``state_dir`` is the fake's
    ``--state-dir`` (what ``--faulty-starts`` counts in)."""
    from step5.execution.pool import WorkerPool
    from step5.policy import TrainingPolicy

    opts = [*options, *(["--state-dir", str(state_dir)] if state_dir is not None else [])]
    keys = {f.name for f in dataclasses.fields(TrainingPolicy)}
    policy = TrainingPolicy(**{"worker_job_timeout_s": 5.0, "worker_ready_timeout_s": 10.0, "max_worker_restarts": 1,
                               **{k: v for k, v in kwargs.items() if k in keys}})
    kwargs = {"shutdown_timeout_s": 3.0, "oneshot_script": FAKE_WORKER, **{k: v for k, v in kwargs.items() if k not in keys}}
    return WorkerPool(cpu_slots(slots) if isinstance(slots, int) else list(slots), policy,
                      worker_command=fake_worker_command(*opts), **kwargs)


def train_line(**overrides: Any) -> dict[str, Any]:
    """A valid ``train`` request in wire form (trial 3, fold 1, job ``"t3-f1"``, a tiny net on
    ``ok.npz``), with ``overrides`` applied; an override of None deletes the key."""
    from step5.protocol import NNParams, TrainRequest

    raw = TrainRequest("ok.npz", NNParams(hidden_layers=(4,), epochs=2), trial_number=3, fold_idx=1,
                       job_id="t3-f1").to_dict()
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def run_each(runner: Any, requests: Sequence[Any]) -> list[dict[str, Any]]:
    """Run every request as a group of one (unfused) through ``runner.run``; the results in
    order, or the first :class:`~step5.errors.JobError` raised once every job finished."""
    from step5.execution.pool import raise_first_job_error

    return raise_first_job_error([outcome for (outcome,) in runner.run([[r] for r in requests])])


def summary_of(runner: Any) -> dict[str, Any]:
    """A runner's :class:`~step5.execution.summary.RunnerStats` as plain dicts."""
    return dataclasses.asdict(runner.summary())


def stored_trials(url: str, study_name: str | None = None) -> list[Any]:
    """The trials of ``study_name`` (the only study at ``url`` when None), read from outside the run that
    writes them, on connections closed before it returns: a test or benchmark polling a study holds none
    (``optuna.load_study(storage=url)`` leaves its engine's to the garbage collector). A ``KeyError`` or
    ``ValueError`` while the study is not there yet."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    try:
        if study_name is None:
            (summary,) = optuna.get_all_study_summaries(storage)
            study_name = summary.study_name
        return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()

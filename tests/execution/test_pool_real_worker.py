"""The pool with the real worker and one-shot trainer (`python -m step5.nn.worker` / `.oneshot`).

One slot, real training on the CPU: an undisturbed run, then the same jobs while the
worker is SIGKILLed mid-run (restart), then again (fallback to one-shot trainers). Every
run must give exactly the undisturbed numbers: no job lost, none counted twice, and the
three execution paths share one training core.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import psutil
import pytest

from step5.data.splits import write_fold_npz
from step5.devices import DeviceSlot
from step5.errors import JobError, TrainerCannotStart
from step5.execution.pool import WorkerPool
from step5.execution.process import WorkerProcess
from step5.launch import PACKAGE_ROOT
from step5.policy import TrainingPolicy
from step5.testing import run_each, summary_of
from step5.protocol import NNParams, TrainRequest

METRICS = ("r2", "val_mse", "train_mse", "epochs_run", "trial_number", "fold_idx", "job_id")


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> list[TrainRequest]:
    out = tmp_path_factory.mktemp("pool_real")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = X[:, 0] - 0.5 * X[:, 2] + 0.1 * rng.normal(size=400)
    paths = [
        write_fold_npz(out / "f0.npz", X[:300], y[:300], X[300:], y[300:]),
        write_fold_npz(out / "f1.npz", X[100:], y[100:], X[:100], y[:100]),
    ]
    # No early stop: every path must run the same 150 epochs.
    params = NNParams(hidden_layers=(32, 16), learning_rate=0.01, epochs=150, early_stopping_patience=0)
    return [TrainRequest(str(p), params, trial_number=0, fold_idx=i, batch_mode="full", seed=3, job_id=f"f{i}")
            for i, p in enumerate(paths)]


@pytest.fixture
def kill_during_second_job(monkeypatch):
    """SIGKILL the worker right after it was sent the 2nd job of a batch (armed per batch).

    Hooking the send makes the kill land inside a job on any machine, fast or slow; the
    kill itself comes from outside the pool, as an OOM killer's would.
    """
    sends = {"n": 0, "armed": False}
    original = WorkerProcess.send

    def send(self, message, doing):  # message: a typed request (step5.protocol)
        original(self, message, doing)
        if sends["armed"] and message.command == "train":
            sends["n"] += 1
            if sends["n"] == 2:
                sends["armed"] = False
                psutil.Process(self.pid).kill()

    monkeypatch.setattr(WorkerProcess, "send", send)

    def arm() -> None:
        sends.update(n=0, armed=True)

    return arm


def test_worker_killed_mid_run_restarts_then_falls_back_with_identical_results(
    requests, caplog, kill_during_second_job,
):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    policy = TrainingPolicy(use_persistent_workers=True, worker_job_timeout_s=120, worker_ready_timeout_s=120,
                            max_worker_restarts=1)
    with WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], policy, persistent=True) as pool:
        assert isinstance(pool, WorkerPool) and pool.mode == "persistent_workers"
        undisturbed = [{k: r[k] for k in METRICS} for r in run_each(pool, requests)]

        # Phase 2: the same folds fused into one pass on the worker match the unfused runs.
        (fused,) = pool.run([requests])
        for f, u in zip(fused, undisturbed):
            assert (f["job_id"], f["epochs_run"]) == (u["job_id"], u["epochs_run"])
            for key in ("r2", "val_mse", "train_mse"):
                assert f[key] == pytest.approx(u[key], rel=1e-4, abs=1e-6)

        # A fold whose data is gone fails alone, in its place; its group-mate still trains.
        gone = dataclasses.replace(requests[1], data_path=requests[1].data_path + ".gone", job_id="gone")
        (mixed,) = pool.run([[requests[0], gone]])
        assert isinstance(mixed[1], JobError) and mixed[1].error_type == "data_error"
        assert mixed[1].job_id == "gone" and ".gone" in mixed[1].message
        assert {k: mixed[0][k] for k in METRICS} == undisturbed[0]
        assert summary_of(pool)["faults"] == []

        kill_during_second_job()
        restarted = run_each(pool, requests)
        assert [{k: r[k] for k in METRICS} for r in restarted] == undisturbed
        assert summary_of(pool)["workers"][0]["restarts"] == 1

        kill_during_second_job()
        fallen_back = run_each(pool, requests)
        assert [{k: r[k] for k in METRICS} for r in fallen_back] == undisturbed
        summary = summary_of(pool)

    assert "[S96B] Worker CPU-0 died, falling back to subprocess mode" in caplog.messages
    (worker,) = summary["workers"]
    assert worker["fallback"] is True and worker["device"] == "cpu"
    assert [c["status"] for c in summary["faults"]] == ["SIGKILL(-9)", "SIGKILL(-9)"]
    assert summary["fallbacks"][0]["exit_status"] == "SIGKILL(-9)"
    # Each of the 4 full batches counted each job once, whatever path finally ran it, and
    # the mixed batch its one healthy fold.
    assert summary["timings"]["jobs"] == 4 * len(requests) + 1
    assert worker["oneshot_jobs"] >= 1


def broken_torch(tmp_path) -> str:
    """A folder whose `torch` fails to import as a rig's wrong build would; on a child's
    PYTHONPATH it comes behind step5's own entry, ahead of the real torch."""
    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libcudart.so.12: cannot open shared object file")\n')
    return str(broken.parent)


@pytest.mark.parametrize("persistent", [True, False])
def test_a_torch_that_cannot_start_stops_the_run_at_once_instead_of_failing_trial_after_trial(
    requests, tmp_path, monkeypatch, caplog, persistent,
):
    """A rig whose torch is broken (a wrong build, a missing libcudart): the worker dies booting and
    the one-shot trainer cannot set torch up either. Every job there would fail the same way, so
    the pool stops with one error naming the slot and the cause, not a train_error per fold."""
    monkeypatch.setenv("PYTHONPATH", broken_torch(tmp_path))
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    policy = TrainingPolicy(use_persistent_workers=persistent, worker_job_timeout_s=60, worker_ready_timeout_s=60,
                            max_worker_restarts=1)
    with WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], policy, persistent=persistent) as pool:
        with pytest.raises(TrainerCannotStart) as caught:
            pool.run([[requests[0]]])
    assert str(caught.value) == (
        "no training process can start on CPU-0 (the CPU): cannot set up torch here: ImportError: libcudart.so.12: "
        "cannot open shared object file. Check that this Python's torch imports and sees that device")
    if persistent:
        assert "[S96B] Worker CPU-0 died, falling back to subprocess mode" in caplog.messages


@pytest.mark.parametrize("persistent", [True, False])
def test_a_slot_where_no_trainer_can_start_is_retired_and_the_run_goes_on_with_the_others(
    requests, tmp_path, caplog, persistent,
):
    """One GPU of a rig that fails to initialise must not stop a run its other GPUs can carry:
    its slot is retired, its jobs train on the others with the same numbers, the sidecar's
    faults say which slot and why, and the last slot left stops the run as a lone one does."""
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    policy = TrainingPolicy(use_persistent_workers=persistent, worker_job_timeout_s=60, worker_ready_timeout_s=60,
                            max_worker_restarts=0)
    healthy = DeviceSlot("CPU-0", "cpu", "", 1)
    sick = DeviceSlot("CPU-1", "cpu", "", 1, device_env=(
        ("PYTHONPATH", os.pathsep.join([str(PACKAGE_ROOT), broken_torch(tmp_path)])),))
    with WorkerPool([healthy], policy, persistent=persistent) as pool:
        undisturbed = [{k: r[k] for k in METRICS} for r in run_each(pool, requests)]
    with WorkerPool([sick, healthy], policy, persistent=persistent) as pool:
        outcomes = pool.run([[r] for r in requests] * 2)
        assert pool.capacity == 1
        summary = summary_of(pool)
    assert [{k: r[k] for k in METRICS} for (r,) in outcomes] == undisturbed * 2
    (startup,) = [f for f in summary["faults"] if f["kind"] == "startup"]
    assert startup["slot"] == "CPU-1" and "cannot set up torch here: ImportError: libcudart.so.12" in startup["error"]
    assert any(m.endswith("Check that this Python's torch imports and sees that device; slot CPU-1 is retired: "
                          "its jobs go to CPU-0") for m in caplog.messages)

    with WorkerPool([sick, dataclasses.replace(sick, label="CPU-2")], policy, persistent=persistent) as pool:
        with pytest.raises(TrainerCannotStart) as caught:
            pool.run([[r] for r in requests])
    assert str(caught.value).startswith("no training process can start on CPU-")
    assert str(caught.value).endswith("sees that device (every other slot was retired before: CPU-1)") or \
        str(caught.value).endswith("sees that device (every other slot was retired before: CPU-2)")

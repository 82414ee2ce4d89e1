"""Workers on AMD GPU slots and the spawn stagger, with the fake worker (no GPU, no torch):
what each process is started with, what the pool reports, and how far apart workers start
-- first starts, restarts and re-promotions alike."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from step5.devices import AmdGpus, DeviceSlot, plan_slots
from step5.execution import pool as pool_module
from step5.execution.pool import WorkerPool
from step5.execution.process import Spawner
from step5.policy import TrainingPolicy
from step5.protocol import NNParams, TrainRequest
from step5.testing import FAKE_WORKER, fake_pool, run_each, summary_of
from step5.testing.fake_worker import ECHO_ENV

RIG_ENV = {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0"}


def requests_for(data_file, n: int) -> list[TrainRequest]:
    return [TrainRequest(str(data_file), NNParams(epochs=2), trial_number=0, fold_idx=i, seed=5, job_id=i)
            for i in range(n)]


def rig_slots(n: int) -> list[DeviceSlot]:
    """What a ROCm rig with ``n`` AMD GPUs plans under the rig's policy (torch build unknown)."""
    return plan_slots([f"rocm:{i}" for i in range(n)], None, cpu_count=2 * n, device_env=RIG_ENV,
                      torch_build=lambda: None, detect_amd=lambda: AmdGpus(tuple(map(str, range(n))), "rocm-smi"))


@pytest.fixture
def echo_rig_env(monkeypatch):
    monkeypatch.setenv(ECHO_ENV, ",".join(RIG_ENV))


# --- AMD slots ---------------------------------------------------------------------------------


def test_one_pinned_worker_per_amd_gpu_with_the_policys_device_environment(data_file, echo_rig_env):
    with fake_pool(rig_slots(2), "--backend", "rocm", "--job-s", "0.3") as pool:
        results = run_each(pool, requests_for(data_file, 4))
        summary = summary_of(pool)
    seen = {(r["hip_visible_devices"], r["cuda_visible_devices"]) for r in results}
    assert seen == {("0", ""), ("1", "")}  # each worker sees its AMD GPU and no NVIDIA GPU
    assert all(r["environment"] == RIG_ENV for r in results)
    workers = summary["workers"]
    assert [(w["label"], w["backend"], w["hip_visible_devices"], w["cuda_visible_devices"]) for w in workers] == [
        ("ROCm-0", "rocm", "0", ""), ("ROCm-1", "rocm", "1", "")]


def test_a_worker_whose_torch_cannot_drive_its_amd_gpu_is_named(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    with fake_pool(rig_slots(1)) as pool:  # the fake reports device "cpu": a CPU build of torch
        run_each(pool, requests_for(data_file, 1))
        (worker,) = summary_of(pool)["workers"]
    assert worker["backend"] == "cpu"
    assert "worker ROCm-0 was given AMD GPU 0 (HIP_VISIBLE_DEVICES=0) but trains on cpu (backend cpu" in caplog.text


def test_one_shot_trainers_get_the_device_environment_too(data_file, echo_rig_env):
    with WorkerPool(rig_slots(1), TrainingPolicy(worker_job_timeout_s=10.0), persistent=False,
                    oneshot_script=FAKE_WORKER) as runner:
        (result,) = run_each(runner, requests_for(data_file, 1))
    assert result["environment"] == RIG_ENV and result["hip_visible_devices"] == "0"


def test_a_fallen_back_amd_slots_one_shot_jobs_keep_the_pin_and_the_environment(data_file, echo_rig_env):
    with fake_pool(rig_slots(1), "--boot", "exit", max_worker_restarts=0, worker_repromote_after_s=600) as pool:
        results = run_each(pool, requests_for(data_file, 2))
        (worker,) = summary_of(pool)["workers"]
    assert worker["fallback"] is True and worker["oneshot_jobs"] == 2
    assert all(r["environment"] == RIG_ENV and r["hip_visible_devices"] == "0" for r in results)


# --- the spawn stagger -------------------------------------------------------------------------


@pytest.fixture
def start_times(monkeypatch):
    """Wall-clock times at which the pool started worker processes."""
    times: list[float] = []
    real = pool_module.popen_worker

    def recording(command, env):
        if "--request" not in command:  # a worker, not a one-shot trainer
            times.append(time.monotonic())
        return real(command, env)

    monkeypatch.setattr(pool_module, "popen_worker", recording)
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_first_starts_are_staggered(data_file, start_times, caplog):
    caplog.set_level(logging.INFO, logger="step5.execution.pool")
    with fake_pool([DeviceSlot.cpu(i, 1) for i in range(3)], worker_spawn_stagger_s=0.4) as pool:
        run_each(pool, requests_for(data_file, 3))
    assert len(start_times) == 3 and min(gaps(start_times)) >= 0.39
    assert "workers start 0.4s apart (training.worker_spawn_stagger_s)" in caplog.text


def test_without_a_stagger_workers_start_together(data_file, start_times):
    with fake_pool([DeviceSlot.cpu(i, 1) for i in range(3)]) as pool:
        run_each(pool, requests_for(data_file, 1))
    assert max(gaps(start_times)) < 0.4


@pytest.mark.parametrize("how", ["restart", "re-promotion"])
def test_restarts_and_re_promotions_wait_out_the_stagger(data_file, start_times, how):
    # The first launch SIGKILLs itself on its first job, well within a second of its start;
    # the next start must still come 1.5 s after it.
    options = ["--fault", "sigkill", "--faulty-starts", "1", "--state-dir", str(data_file.parent)]
    kwargs = {"max_worker_restarts": 1} if how == "restart" else {"max_worker_restarts": 0, "worker_repromote_after_s": 0.01}
    with fake_pool([DeviceSlot.cpu(0, 1)], *options, worker_spawn_stagger_s=1.5, **kwargs) as pool:
        run_each(pool, requests_for(data_file, 3))
        (worker,) = summary_of(pool)["workers"]
    assert (worker["restarts"], worker["repromotions"]) == ((1, 0) if how == "restart" else (0, 1))
    assert len(start_times) == 2 and gaps(start_times)[0] >= 1.49


def test_shutting_the_spawner_down_cuts_a_stagger_wait_short():
    spawner = Spawner("test-spawner", stagger_s=30.0)
    ran: list[float] = []
    first = spawner.submit(lambda: ran.append(time.monotonic()))
    first.result(timeout=5)
    second = spawner.submit(lambda: ran.append(time.monotonic()))  # would wait 30 s
    threading.Timer(0.3, spawner.shutdown).start()
    start = time.monotonic()
    second.result(timeout=10)
    assert time.monotonic() - start < 5 and len(ran) == 2


def test_a_negative_stagger_is_refused():
    with pytest.raises(ValueError, match="`stagger_s` must be >= 0"):
        Spawner("test-spawner", stagger_s=-1.0)

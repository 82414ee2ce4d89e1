"""A job timeout is not a worker fault (issue 10).

A job that outlives its timeout on a worker that still answers liveness probes is retried once
on a fresh worker; its second timeout is its verdict (a ``timeout`` JobError), reached
within about twice the timeout, and the slot never leaves worker mode for it. A worker that
stops answering them is hung: that is a fault, restart then fallback, as before.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from step5.devices import DeviceSlot
from step5.errors import JobError, TrainerCannotStart
from step5.execution.pool import WorkerPool
from step5.policy import TrainingPolicy
from step5.protocol import NNParams, TrainRequest
from step5.testing import FAKE_WORKER, fake_worker_command, run_each, summary_of

TIMEOUT_S = 1.5


def request(data_file: Path, fold: int = 0) -> TrainRequest:
    return TrainRequest(str(data_file), NNParams(epochs=2), trial_number=0, fold_idx=fold, job_id=f"t0-f{fold}")


def slow_pool(job_s: float, **kwargs) -> WorkerPool:
    """A pool whose fake workers take ``job_s`` per job and answer heartbeats meanwhile."""
    kwargs.setdefault("max_worker_restarts", 1)
    policy = TrainingPolicy(worker_job_timeout_s=TIMEOUT_S, worker_ready_timeout_s=10.0, **kwargs)
    return WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], policy, worker_command=fake_worker_command("--job-s", str(job_s)),
                      oneshot_script=FAKE_WORKER, shutdown_timeout_s=2.0, probe_interval_s=0.2, probe_grace_s=1.0)


def test_a_job_that_never_finishes_fails_within_twice_its_timeout_and_keeps_the_slot(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    with slow_pool(job_s=60.0) as pool:
        start = time.monotonic()
        ((outcome,),) = pool.run([[request(data_file)]])
        elapsed = time.monotonic() - start
        summary = summary_of(pool)
        # The slot kept its worker mode and its whole restart budget.
        (worker,) = summary["workers"]
        assert (worker["restarts"], worker["fallback"]) == (0, False)
        assert summary["fallbacks"] == []
    assert isinstance(outcome, JobError) and outcome.error_type == "timeout"
    assert outcome.job_id == "t0-f0" and "1.5s timeout 2 time(s)" in outcome.message
    # Two timeouts plus a worker boot or two, not four timeouts and a fallback.
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + 5.0
    assert [f["kind"] for f in summary["faults"]] == ["timeout", "timeout"]
    assert "[S96B] Worker CPU-0 died, falling back to subprocess mode" not in caplog.messages


def test_a_timed_out_job_is_retried_once_and_a_timeout_does_not_use_the_restart_budget(data_file, tmp_path):
    # A timed-out group is retried on a new worker: with a zero restart budget a fault would
    # have sent the slot to one-shot mode, a timeout does not.
    with slow_pool(job_s=60.0, max_worker_restarts=0) as pool:
        ((first,),) = pool.run([[request(data_file)]])
        assert isinstance(first, JobError) and first.error_type == "timeout"
        assert summary_of(pool)["workers"][0]["fallback"] is False


def test_a_slow_job_within_its_timeout_is_not_a_hang(data_file):
    # Heartbeats every 0.2 s with a 1 s grace, a 1.2 s job: the worker answers them while
    # it trains, so the job finishes normally.
    with slow_pool(job_s=1.2) as pool:
        (result,) = run_each(pool, [request(data_file)])
        summary = summary_of(pool)
    assert result["status"] == "complete"
    assert summary["faults"] == [] and summary["workers"][0]["restarts"] == 0


def test_a_worker_that_stops_answering_heartbeats_is_a_hang_fault(data_file, tmp_path):
    policy = TrainingPolicy(worker_job_timeout_s=30.0, worker_ready_timeout_s=10.0, max_worker_restarts=1)
    pool = WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], policy, worker_command=fake_worker_command("--fault", "hang", "--faulty-starts", "1",
                                                         "--state-dir", str(tmp_path)), oneshot_script=FAKE_WORKER, probe_interval_s=0.2, probe_grace_s=0.8)
    with pool:
        start = time.monotonic()
        (result,) = run_each(pool, [request(data_file)])
        elapsed = time.monotonic() - start
        summary = summary_of(pool)
    assert result["status"] == "complete"  # on the restarted worker
    assert elapsed < 10.0  # found by its silence, long before the 30 s job timeout
    assert [f["kind"] for f in summary["faults"]] == ["hang"]
    assert summary["workers"][0]["restarts"] == 1


def test_a_one_shot_trainer_that_times_out_is_retried_once(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_ONESHOT", "hang")
    with WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], TrainingPolicy(worker_job_timeout_s=1.0, max_job_reruns=3),
                    persistent=False, oneshot_script=FAKE_WORKER) as runner:
        start = time.monotonic()
        ((outcome,),) = runner.run([[request(data_file)]])
        elapsed = time.monotonic() - start
        summary = summary_of(runner)
    assert isinstance(outcome, JobError) and outcome.error_type == "timeout"
    assert elapsed < 2 * 1.0 + 5.0  # two attempts, not max_retries + 1
    assert [f["kind"] for f in summary["faults"]] == ["timeout", "timeout"]


def test_the_fallback_times_out_like_the_workers(data_file, monkeypatch):
    # A slot that fell back (its worker never boots) runs one-shot trainers; one that hangs
    # gets the same verdict through the one retrying path.
    monkeypatch.setenv("STEP5_FAKE_ONESHOT", "hang")
    policy = TrainingPolicy(worker_job_timeout_s=1.0, worker_ready_timeout_s=10.0, max_worker_restarts=0)
    with WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], policy, worker_command=fake_worker_command("--boot", "exit"),
                    oneshot_script=FAKE_WORKER) as pool:
        assert summary_of(pool)["workers"][0]["fallback"] is True
        ((outcome,),) = pool.run([[request(data_file)]])
        kinds = [f["kind"] for f in summary_of(pool)["faults"]]
    assert isinstance(outcome, JobError) and outcome.error_type == "timeout"
    assert kinds == ["crash", "timeout", "timeout"]


def test_a_one_shot_trainer_that_never_sets_torch_up_retires_its_slot_not_every_job_sent_there(data_file):
    """A wedged GPU whose initialisation never returns: the trainer says no `ready` within the
    ready timeout, so its slot is retired at once (not two job timeouts for every job sent
    there, trial after trial); the other slot trains everything; alone, the slot stops the run."""
    wedged = DeviceSlot("CPU-1", "cpu", "", 1, device_env=(("STEP5_FAKE_ONESHOT", "hang_at_setup"),))
    # A healthy fake trainer says `ready` in about 0.4 s on a loaded 2-core machine: 3 s leaves it room.
    policy = TrainingPolicy(worker_job_timeout_s=60.0, worker_ready_timeout_s=3.0)
    with WorkerPool([wedged, DeviceSlot("CPU-0", "cpu", "", 1)], policy, persistent=False,
                    oneshot_script=FAKE_WORKER) as pool:
        start = time.monotonic()
        outcomes = pool.run([[request(data_file, fold)] for fold in range(4)])
        elapsed = time.monotonic() - start
        summary = summary_of(pool)
    assert [o["status"] for (o,) in outcomes] == ["complete"] * 4
    assert elapsed < 30.0  # one ready timeout, far from the 60 s job timeout
    (fault,) = summary["faults"]
    assert (fault["slot"], fault["kind"]) == ("CPU-1", "startup")
    assert "did not set up torch and the CPU within 3s (training.worker_ready_timeout_s)" in fault["error"]

    # Alone, no healthy trainer shares the ready timeout: 1 s ends the wedged one's wait as well as 3 s.
    alone = TrainingPolicy(worker_job_timeout_s=60.0, worker_ready_timeout_s=1.0)
    with WorkerPool([wedged], alone, persistent=False, oneshot_script=FAKE_WORKER) as pool:
        with pytest.raises(TrainerCannotStart, match=r"^no training process can start on CPU-1 \(the CPU\): its "
                                                     r"one-shot trainer did not set up torch"):
            pool.run([[request(data_file)]])


# A one-shot trainer that replies `complete` REPLY_AT seconds after it started, then takes
# EXIT_AFTER seconds to go away (its pipes close only once the kernel tore it down).
LATE_EXIT = """\
import json, sys, time
start = time.monotonic()
request = json.loads(sys.stdin.buffer.read())
print(json.dumps({{"status": "ready", "device": "cpu", "pid": 0, "protocol": 1}}), flush=True)
time.sleep(max(0.0, start + {reply_at} - time.monotonic()))
print(json.dumps({{"status": "complete", "r2": 0.5, "val_mse": 1.0, "train_mse": 1.0, "train_r2": 0.6,
                  "trial_number": request["trial_number"], "fold_idx": request["fold_idx"],
                  "job_id": request["job_id"]}}), flush=True)
time.sleep({exit_after})
"""


def test_a_one_shot_reply_just_before_the_deadline_counts_though_the_exit_comes_after_it(data_file, tmp_path):
    # The reply comes 0.5 s before the 3 s deadline, the exit 1 s later: the exit used to be
    # held to what was left of the job's timeout, so a result that came in time was thrown
    # away as a timeout, twice, and the job failed with "ran past its 3s timeout".
    script = tmp_path / "late_exit.py"
    script.write_text(LATE_EXIT.format(reply_at=2.5, exit_after=1.0))
    with WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1)], TrainingPolicy(worker_job_timeout_s=3.0),
                    persistent=False, oneshot_script=script) as runner:
        ((outcome,),) = runner.run([[request(data_file)]])
        summary = summary_of(runner)
    assert not isinstance(outcome, JobError), outcome
    assert (outcome["status"], outcome["r2"], outcome["job_id"]) == ("complete", 0.5, "t0-f0")
    assert summary["faults"] == []

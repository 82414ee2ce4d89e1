"""WorkerPool fault handling against the fake worker: every crash case is one table row.

SPEC section 7: a worker that dies, hangs or breaks the protocol is killed and restarted
once; if it fails again the slot falls back to one-shot subprocesses for good, logging
`[S96B] Worker CPU-0 died, falling back to subprocess mode`. The job that was running is
retried, so every job's result is the undisturbed one and none is counted twice.
"""
from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import psutil
import pytest

from step5.devices import DeviceSlot
from step5.errors import JobError
from step5.execution import pool as pool_module
from step5.execution import process
from step5.execution.pool import WorkerPool
from step5.protocol import NNParams, TrainRequest
from step5.testing import fake_pool, run_each, summary_of
from step5.testing.fake_worker import fake_metrics

JOB_TIMEOUT_S = 5.0  # one-shot fallbacks boot a Python each: room for a loaded machine
READY_TIMEOUT_S = 10.0  # the fake boots in well under a second; generous for a busy CI box
METRICS = ("r2", "val_mse", "train_mse", "trial_number", "fold_idx", "job_id")


def make_requests(data_file: Path, n: int = 4, trial: int = 0) -> list[TrainRequest]:
    return [
        TrainRequest(str(data_file), NNParams(hidden_layers=(8,), epochs=3 + i), trial_number=trial, fold_idx=i,
                     seed=11, job_id=f"t{trial}-f{i}")
        for i in range(n)
    ]


def expected(requests: list[TrainRequest]) -> list[dict]:
    return [{k: fake_metrics(r)[k] for k in METRICS} for r in requests]


def metrics(results: list[dict]) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in results]


def make_pool(*options: str, slots: int = 1, tmp_path: Path | None = None, **kwargs) -> WorkerPool:
    kwargs.setdefault("worker_job_timeout_s", JOB_TIMEOUT_S)
    kwargs.setdefault("worker_ready_timeout_s", READY_TIMEOUT_S)
    return fake_pool(slots, *options, state_dir=tmp_path, **kwargs)


# Each row: fake-worker options, then what the pool must report.
#   restarts / fallback: the slot's state afterwards; kind / status: the first crash record.
FAULTS = [
    pytest.param(["--fault", "sigkill", "--after", "1", "--faulty-starts", "1"], 1, False, "crash", "SIGKILL(-9)",
                 id="sigkill-once-restarts"),
    pytest.param(["--fault", "exit", "--exit-code", "42", "--after", "1", "--faulty-starts", "1"], 1, False,
                 "crash", "EXIT(42)", id="exit42-once-restarts"),
    pytest.param(["--fault", "hang", "--after", "1", "--faulty-starts", "1"], 1, False, "hang", "SIGKILL(-9)",
                 id="hang-once-killed-restarts"),
    pytest.param(["--fault", "garbage", "--after", "1", "--faulty-starts", "1"], 1, False, "protocol",
                 "SIGKILL(-9)", id="garbage-once-restarts"),
    pytest.param(["--fault", "wrong_job_id", "--faulty-starts", "1"], 1, False, "protocol", "SIGKILL(-9)",
                 id="wrong-job-id-restarts"),
    pytest.param(["--fault", "oversize", "--oversize-bytes", str(17 << 20), "--faulty-starts", "1"], 1, False,
                 "protocol", "SIGKILL(-9)", id="oversize-answer-restarts"),
    pytest.param(["--fault", "close_stdout", "--faulty-starts", "1"], 1, False, "crash", "SIGKILL(-9)",
                 id="eof-while-alive-restarts"),
    pytest.param(["--fault", "sigkill", "--after", "1"], 1, True, "crash", "SIGKILL(-9)",
                 id="sigkill-twice-falls-back"),
    pytest.param(["--fault", "exit", "--exit-code", "3"], 1, True, "crash", "EXIT(3)",
                 id="exit-every-time-falls-back"),
    pytest.param(["--boot", "exit", "--faulty-starts", "1"], 1, False, "crash", "EXIT(1)",
                 id="boot-crash-once-restarts"),
    pytest.param(["--boot", "garbage"], 1, True, "protocol", "SIGKILL(-9)", id="boot-garbage-falls-back"),
]


@pytest.mark.parametrize("options, restarts, fallback, kind, status", FAULTS)
def test_fault_is_recovered_and_every_job_gets_its_undisturbed_result(
    options, restarts, fallback, kind, status, data_file, tmp_path, caplog, monkeypatch,
):
    if "close_stdout" in options:  # the worker lives on after EOF: no need to wait out the full grace
        monkeypatch.setattr(process, "_EXIT_AFTER_EOF_S", 1.0)
    requests = make_requests(data_file)
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    with make_pool(*options, tmp_path=tmp_path) as pool:
        results = run_each(pool, requests)
        summary = summary_of(pool)
    assert metrics(results) == expected(requests)
    (worker,) = summary["workers"]
    assert (worker["restarts"], worker["fallback"]) == (restarts, fallback)
    assert summary["timings"]["jobs"] == len(requests)  # the retried job counted once
    assert worker["jobs"] + worker["oneshot_jobs"] == len(requests)
    first = summary["faults"][0]
    assert (first["kind"], first["status"]) == (kind, status)
    fallback_line = "[S96B] Worker CPU-0 died, falling back to subprocess mode"
    assert (fallback_line in caplog.messages) == fallback
    if fallback:
        (record,) = summary["fallbacks"]
        assert record["label"] == "CPU-0" and record["exit_status"]
        assert any(r["device"] == "fake-oneshot" for r in results)
    else:
        assert summary["fallbacks"] == []


def test_hang_at_boot_times_out_then_falls_back(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    requests = make_requests(data_file, n=2)
    # The one-shot trainers of the fallback get the same time to start Python and answer `ready`,
    # which a loaded machine has taken over a second for: 3 s, not the 1 s a hang alone would need.
    with make_pool("--boot", "hang", worker_ready_timeout_s=3.0) as pool:
        summary = summary_of(pool)
        assert [c["kind"] for c in summary["faults"]] == ["boot", "boot"]
        assert summary["workers"][0]["fallback"] is True
        assert metrics(run_each(pool, requests)) == expected(requests)
    assert "[S96B] Worker CPU-0 died, falling back to subprocess mode" in caplog.messages


def test_crash_report_names_exit_status_and_last_stderr_lines(data_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    with make_pool("--fault", "exit", "--exit-code", "42", "--faulty-starts", "1", "--stderr-lines", "3",
                   tmp_path=tmp_path) as pool:
        run_each(pool, make_requests(data_file, n=1))
        crash = summary_of(pool)["faults"][0]
    assert "EXIT(42)" in crash["error"]
    report = "\n".join(caplog.messages)
    assert "EXIT(42)" in report and "fault 'exit'" in report and "chatter for job" in report


def test_chatty_worker_does_not_block_on_a_full_stderr_pipe(data_file):
    # ~200 KB of stderr per job, several times a pipe's buffer: the drain thread must keep up.
    requests = make_requests(data_file, n=3)
    with make_pool("--stderr-lines", "1000") as pool:
        assert metrics(run_each(pool, requests)) == expected(requests)
        assert summary_of(pool)["faults"] == []


def test_job_error_fails_only_that_job_without_retry_or_restart(data_file, tmp_path):
    good = make_requests(data_file, n=3)
    bad = TrainRequest(str(tmp_path / "missing.npz"), trial_number=0, fold_idx=9, job_id="bad")
    with make_pool(slots=2) as pool:
        pids = sorted(pool.worker_pids())
        with pytest.raises(JobError) as info:
            run_each(pool, [good[0], bad, good[1], good[2]])
        assert info.value.error_type == "data_error"
        assert "missing.npz" in info.value.message and info.value.job_id == "bad"
        summary = summary_of(pool)
        # Not the worker's fault: no restart, same processes, and the others all ran.
        assert sorted(pool.worker_pids()) == pids
        assert summary["faults"] == [] and all(w["restarts"] == 0 for w in summary["workers"])
        assert summary["timings"]["jobs"] == 3
        # The pool keeps serving.
        assert metrics(run_each(pool, good)) == expected(good)


def test_fallback_trainer_crashing_too_fails_the_job_after_bounded_retries(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_ONESHOT", "crash")
    with make_pool("--fault", "sigkill", max_job_reruns=3) as pool:
        with pytest.raises(JobError, match=r"hit by 4 infrastructure fault.*EXIT\(7\).*max_job_reruns"):
            run_each(pool, make_requests(data_file, n=1))
        summary = summary_of(pool)
    assert summary["workers"][0]["fallback"] is True
    assert [c["kind"] for c in summary["faults"]] == ["crash", "crash", "oneshot", "oneshot"]


@pytest.mark.parametrize("reply", [
    pytest.param('{"status": "error", "error": "the GPU melted", "error_type": "gpu_melted"}', id="unknown-error-type"),
    pytest.param('{"r2": "0.5"}', id="string-metric"),
    pytest.param('{"train_r2": null}', id="missing-metric"),
])
def test_a_reply_that_is_no_answer_is_a_fault_from_a_worker_and_a_one_shot_trainer_alike(reply, data_file, monkeypatch):
    # A one-shot trainer's `error` reply with an unknown `error_type` became a `train_error`, failing
    # the trial as if the model could not train, where a worker's was a protocol fault, re-run; a
    # `complete` reply without finite scores was taken from either, to fail later in the objective.
    monkeypatch.setenv("STEP5_FAKE_REPLY", reply)
    with make_pool(max_job_reruns=3) as pool:
        with pytest.raises(JobError, match=r"hit by 4 infrastructure fault.*broke the protocol.*max_job_reruns"):
            run_each(pool, make_requests(data_file, n=1))
        summary = summary_of(pool)
    assert summary["workers"][0]["fallback"] is True
    assert [c["kind"] for c in summary["faults"]] == ["protocol", "protocol", "oneshot", "oneshot"]
    assert all("broke the protocol" in c["error"] for c in summary["faults"])


def test_a_one_shot_trainers_reply_for_another_job_is_a_fault_as_a_workers_is(data_file, monkeypatch):
    # The one-shot path put the request's job_id over whatever the trainer answered (the worker
    # path's `wrong_job_id` row above is a protocol fault).
    monkeypatch.setenv("STEP5_FAKE_REPLY", '{"job_id": "not-yours"}')
    with make_pool(persistent=False, max_job_reruns=1) as pool:
        with pytest.raises(JobError, match=r"hit by 2 infrastructure fault.*answers job_id 'not-yours', not 't0-f0'"):
            run_each(pool, make_requests(data_file, n=1))
        assert [c["kind"] for c in summary_of(pool)["faults"]] == ["oneshot", "oneshot"]


def test_an_extra_field_in_a_reply_is_accepted_from_a_worker_and_a_one_shot_trainer_alike(data_file, monkeypatch):
    # A reply may carry more than the parent reads (docs/workers.md, "Protocol": `...`).
    monkeypatch.setenv("STEP5_FAKE_REPLY", '{"gpu_temperature": 71}')
    requests = make_requests(data_file, n=2)
    for persistent in (True, False):
        with make_pool(persistent=persistent) as pool:
            results = run_each(pool, requests)
            assert summary_of(pool)["faults"] == []
        assert metrics(results) == expected(requests) and all(r["gpu_temperature"] == 71 for r in results)


def test_a_one_shot_trainer_that_cannot_be_started_is_a_fault_and_its_job_is_re_run(data_file, monkeypatch):
    # fork() failing (no memory, the process limit) for one trainer, on a slot whose workers keep
    # crashing (what an OOM killer makes of a rig): the OSError escaped run(), so the user saw a
    # traceback and the run ended, instead of the job being re-run like one whose trainer died.
    real, starts = pool_module.popen_worker, []

    def no_memory_once(command, env):
        if "--request" in command:
            starts.append(command)
            if len(starts) == 1:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(command, env)

    monkeypatch.setattr(pool_module, "popen_worker", no_memory_once)
    requests = make_requests(data_file, n=2)
    with make_pool("--fault", "sigkill", max_worker_restarts=0) as pool:
        assert metrics(run_each(pool, requests)) == expected(requests)
        summary = summary_of(pool)
    oneshot = [f for f in summary["faults"] if f["kind"] == "oneshot"]
    assert len(oneshot) == 1 and "could not be started: [Errno 12] Cannot allocate memory" in oneshot[0]["error"]
    assert summary["recovery"]["reruns"] == 2  # the job the worker's crash hit, then its unstarted trainer


def test_zero_restarts_falls_back_on_first_fault(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    requests = make_requests(data_file, n=2)
    with make_pool("--fault", "sigkill", max_worker_restarts=0) as pool:
        assert metrics(run_each(pool, requests)) == expected(requests)
        assert summary_of(pool)["workers"][0]["restarts"] == 0
    assert "[S96B] Worker CPU-0 died, falling back to subprocess mode" in caplog.messages


def test_other_slot_keeps_its_worker_when_one_falls_back(data_file, tmp_path):
    # Two slots share the fake's launch counter: the first two launches misbehave at once.
    requests = make_requests(data_file, n=6)
    with make_pool("--fault", "sigkill", "--faulty-starts", "3", "--job-s", "0.05", slots=2,
                   tmp_path=tmp_path) as pool:
        results = run_each(pool, requests)
        summary = summary_of(pool)
    assert metrics(results) == expected(requests)
    states = sorted((w["fallback"], w["restarts"]) for w in summary["workers"])
    assert states == [(False, 1), (True, 1)]
    assert summary["timings"]["jobs"] == 6


def test_a_wedged_gpu_holds_back_neither_the_first_job_nor_the_others(data_file):
    """One slot's device never finishes initialising, in its workers and in its one-shot
    trainers alike: the pool takes jobs as soon as the healthy slot is ready, the healthy slot
    trains every job meanwhile, and the wedged slot is retired after its ready timeouts."""

    wedged = DeviceSlot("CPU-1", "cpu", "", 1, device_env=(("STEP5_FAKE_BOOT", "hang"),
                                                           ("STEP5_FAKE_ONESHOT", "hang_at_setup")))
    requests = make_requests(data_file, n=6)
    began = time.monotonic()
    # A healthy fake worker is ready in well under a second even on a loaded machine: 4 s leaves it room.
    with make_pool("--job-s", "0.05", slots=[DeviceSlot("CPU-0", "cpu", "", 1), wedged], wait=False,
                   worker_ready_timeout_s=4.0, max_worker_restarts=1) as pool:
        pool.wait_ready()
        ready_after = time.monotonic() - began
        first = run_each(pool, requests)
        assert summary_of(pool)["faults"] == []  # done before the wedged slot's first ready timeout
        # Only the first boots needed the 4 s (the healthy slot's share them); the wedged slot's
        # restart and one-shot trainer never answer, so a shorter wait ends them just the same.
        pool.ready_timeout_s = 1.0
        while not pool._booted:  # noqa: SLF001 - the wedged slot's two boots time out, then it falls back
            assert time.monotonic() - began < 60, "the wedged slot's boots never timed out"
            time.sleep(0.1)
        again = run_each(pool, requests)  # one of them meets the wedged slot's one-shot trainer first
        summary = summary_of(pool)
    assert ready_after < 4.0, f"waited {ready_after:.1f}s: for the wedged slot's boot"
    assert metrics(first) == metrics(again) == expected(requests)
    assert [(f["slot"], f["kind"]) for f in summary["faults"]] == [("CPU-1", "boot"), ("CPU-1", "boot"),
                                                                    ("CPU-1", "startup")]
    assert pool.capacity == 1
    healthy = next(w for w in summary["workers"] if w["label"] == "CPU-0")
    assert healthy["jobs"] == 12 and healthy["restarts"] == 0


def test_slots_whose_workers_the_hosts_memory_cannot_hold_stay_idle(data_file, caplog):
    """A rig of many GPUs and little RAM (the pipeline's: 8 GPUs, 7.7 GB): the first worker
    boots alone and is measured, only as many others start as the memory left holds, and the
    run trains on those; the slots left idle are named, in the log and the sidecar's faults."""
    from step5.execution.pool import HostMemory

    gib = 1 << 30
    measured: list[int] = []

    def footprint(pid: int) -> int:
        measured.append(pid)
        return 4 * gib

    caplog.set_level(logging.INFO, logger="step5.execution.pool")
    tight = HostMemory(available=lambda: 8 * gib, footprint=footprint)  # 80% of 8 GiB: one more 4 GiB worker
    requests = make_requests(data_file, n=6)
    with make_pool(slots=4, memory=tight) as pool:
        results = run_each(pool, requests)
        assert pool.capacity == 2
        deadline = time.monotonic() + 10  # the admitted slot boots after the pilot, on its own time
        while not any(m.startswith("worker pool ready") for m in caplog.messages):
            assert time.monotonic() < deadline, "the admitted slot's worker never got ready"
            time.sleep(0.02)
        summary = summary_of(pool)
        pids = pool.worker_pids()
    assert metrics(results) == expected(requests)
    assert len(measured) == 1 and len(pids) == 2
    idle = [f for f in summary["faults"] if f["kind"] == "memory"]
    assert [f["slot"] for f in idle] == ["CPU-2", "CPU-3"]
    assert idle[0]["error"] == (
        "CPU-2 left idle: worker CPU-0 holds 4096 MB of host memory and 8192 MB are available, of which 20% stay "
        "free (training.host_memory_headroom): room for 1 more worker(s)")
    assert summary["recovery"]["faults"] == 0  # nothing failed
    assert sum(w["jobs"] for w in summary["workers"]) == 6
    assert "4 workers may not fit in this host's available memory: worker CPU-0 boots first and is measured" \
        in caplog.messages
    assert any(m.startswith("worker pool ready") and m.endswith(": CPU-0=cpu, CPU-1=cpu, CPU-2=idle, CPU-3=idle")
               for m in caplog.messages)

    roomy = HostMemory(available=lambda: 1 << 40, footprint=footprint)
    with make_pool(slots=4, memory=roomy) as pool:
        assert len(pool.worker_pids()) == 4
    assert len(measured) == 1  # enough memory for any worker: all boot at once, none is measured


def test_the_memory_check_measures_real_workers(data_file):
    """With the host's own figures: a headroom that leaves room for no second worker."""
    with make_pool(slots=2, host_memory_headroom=0.9999) as pool:
        assert len(run_each(pool, make_requests(data_file, n=2))) == 2
        summary = summary_of(pool)
    (idle,) = summary["faults"]
    assert (idle["slot"], idle["kind"]) == ("CPU-1", "memory") and "room for 0 more worker(s)" in idle["error"]
    assert "of which 99.99% stay free" in idle["error"]


def test_killing_a_worker_from_outside_mid_batch_loses_no_job(data_file):
    requests = make_requests(data_file, n=6)
    with make_pool("--job-s", "0.4", slots=2) as pool:
        victim = pool.worker_pids()[0]
        import threading

        killer = threading.Timer(0.5, lambda: psutil.Process(victim).kill())
        killer.start()
        try:
            results = run_each(pool, requests)
        finally:
            killer.cancel()
        summary = summary_of(pool)
    assert metrics(results) == expected(requests)
    assert summary["timings"]["jobs"] == 6
    assert [c["status"] for c in summary["faults"]] == ["SIGKILL(-9)"]
    assert sum(w["restarts"] for w in summary["workers"]) == 1


def test_a_job_that_kills_its_process_every_time_fails_alone_once_its_reruns_are_spent(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_POISON_TRIAL", "7")
    good = make_requests(data_file, n=2, trial=0)
    (poison,) = make_requests(data_file, n=1, trial=7)
    with make_pool(max_worker_restarts=1, max_job_reruns=2, worker_repromote_after_s=600) as pool:
        outcomes = pool.run([[good[0]], [poison], [good[1]]])
        summary = summary_of(pool)
        # The run goes on: the slot (in the fallback now) still trains.
        assert metrics(run_each(pool, good)) == expected(good)
    (bad,) = outcomes[1]
    assert isinstance(bad, JobError) and bad.error_type == "train_error" and bad.trial_number == 7
    assert "hit by 3 infrastructure fault(s)" in bad.message and "SIGKILL(-9)" in bad.message
    assert "its own limit of 2 re-run(s) is reached (training.max_job_reruns)" in bad.message
    assert metrics([outcomes[0][0], outcomes[2][0]]) == expected(good)
    # crash (restart), crash (fall back), then the one-shot trainer: 2 re-runs, the third refused.
    assert [f["kind"] for f in summary["faults"]] == ["crash", "crash", "oneshot"]
    assert summary["recovery"] == {"faults": 3, "reruns": 2, "max_fault_reruns": 50, "refused_reruns": 1,
                                   "repromotions": 0}


def test_the_runs_fault_budget_bounds_reruns_across_jobs(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_POISON_TRIAL", "7")
    (poison,) = make_requests(data_file, n=1, trial=7)
    with make_pool(max_worker_restarts=5, max_job_reruns=9, max_fault_reruns=1) as pool:
        ((bad,),) = pool.run([[poison]])
        summary = summary_of(pool)
    assert isinstance(bad, JobError)
    assert "the run's fault budget of 1 re-run(s) is spent (training.max_fault_reruns)" in bad.message
    assert summary["recovery"]["reruns"] == 1 and summary["recovery"]["refused_reruns"] == 1


def test_a_fallen_back_slot_is_re_promoted_after_its_cool_down(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    requests = make_requests(data_file, n=3)
    # The first launch SIGKILLs itself on its first job; with no restarts the slot falls
    # back, runs that job one-shot, and re-promotes a fresh (healthy) worker afterwards.
    with make_pool("--fault", "sigkill", "--faulty-starts", "1", tmp_path=data_file.parent,
                   max_worker_restarts=0, worker_repromote_after_s=0.01) as pool:
        assert metrics(run_each(pool, requests)) == expected(requests)
        summary = summary_of(pool)
    (worker,) = summary["workers"]
    assert worker["repromotions"] == 1 and worker["fallback"] is False
    assert worker["oneshot_jobs"] == 1 and worker["jobs"] == 2
    assert summary["recovery"]["repromotions"] == 1
    assert "trying a fresh persistent worker again" in caplog.text


def test_a_poisoned_job_in_a_fused_group_does_not_fail_its_group_mates(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_POISON_TRIAL", "7")
    good = make_requests(data_file, n=2, trial=0)
    (poison,) = make_requests(data_file, n=1, trial=7)
    with make_pool(max_worker_restarts=9, max_job_reruns=1) as pool:
        ((a, bad, b),) = pool.run([[good[0], poison, good[1]]])
    assert metrics([a, b]) == expected(good)  # their unfused verdicts, run alone
    assert isinstance(bad, JobError) and "training.max_job_reruns" in bad.message

"""WorkerPool lifecycle: spawn, concurrent dispatch, shutdown, Ctrl-C, and no orphans.

The fake worker stands in for nn_gpu_worker.py so each test takes about a second; the
autouse fixture in conftest.py fails any test that leaves a child process running.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from step5.devices import DeviceSlot, plan_slots
from step5.errors import JobError, RunnerClosed, WorkerFault
from step5.execution.pool import WorkerPool
from step5.policy import TrainingPolicy
from step5.protocol import NNParams, TrainRequest
from step5.testing import cpu_slots, fake_pool, run_each, summary_of
from step5.testing.processes import wait_gone

REPO_ROOT = Path(__file__).resolve().parents[2]


def requests_for(data_file: Path, n: int) -> list[TrainRequest]:
    return [TrainRequest(str(data_file), NNParams(epochs=2), trial_number=0, fold_idx=i, job_id=i) for i in range(n)]


def run_in_background(pool: WorkerPool, requests: list[TrainRequest]) -> tuple[threading.Thread, list]:
    """Start ``run_each(pool, requests)`` on a thread; the list collects what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_each(pool, requests)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    return runner, errors


def test_two_gpu_slots_pin_different_cuda_visible_devices_and_split_threads(data_file):
    slots = plan_slots(["0", "1"], None, cpu_count=4, detect_nvidia=lambda: ["0", "1"])  # --gpus 0,1, no GPU needed
    with fake_pool(slots, "--job-s", "0.3") as pool:
        results = run_each(pool, requests_for(data_file, 4))
        summary = summary_of(pool)
    by_slot = {(r["cuda_visible_devices"], r["torch_threads"]) for r in results}
    assert by_slot == {("0", "2"), ("1", "2")}
    assert [w["label"] for w in summary["workers"]] == ["GPU-0", "GPU-1"]
    assert [w["cuda_visible_devices"] for w in summary["workers"]] == ["0", "1"]


def test_folds_run_concurrently_across_workers(data_file):
    with fake_pool(cpu_slots(2), "--job-s", "0.4") as pool:
        results = run_each(pool, requests_for(data_file, 4))
    assert [r["job_id"] for r in results] == [0, 1, 2, 3]  # request order kept
    assert len({r["worker_pid"] for r in results}) == 2  # both workers took jobs


def test_summary_is_the_execution_block(data_file):
    with fake_pool(cpu_slots(2)) as pool:
        run_each(pool, requests_for(data_file, 3))
        summary = summary_of(pool)
    assert summary["mode"] == "persistent_workers" == pool.mode
    assert summary["devices"] == ["CPU-0", "CPU-1"]
    assert summary["fallbacks"] == []
    for w in summary["workers"]:
        assert {"label", "device", "pid", "jobs", "restarts", "fallback"} <= set(w)
        assert w["device"] == "cpu" and w["restarts"] == 0 and w["fallback"] is False
    assert sum(w["jobs"] for w in summary["workers"]) == 3
    timings = summary["timings"]
    assert set(timings) >= {"spawn_s", "compute_s", "wall_s", "overhead_s", "jobs"}
    assert timings["jobs"] == 3 and timings["spawn_s"] > 0 and timings["compute_s"] > 0


def test_a_pool_that_does_not_wait_returns_while_its_workers_boot_and_run_waits_for_them(data_file):
    """The optimizer splits the rows and opens the study while the workers boot: the
    constructor returns at once, the first run() waits for `ready`, and the boot is timed."""
    began = time.perf_counter()
    with fake_pool(cpu_slots(2), "--boot-s", "1.0", wait=False) as pool:
        returned_after = time.perf_counter() - began
        assert returned_after < 0.9, f"the constructor waited {returned_after:.2f}s for a 1s boot"
        assert len(run_each(pool, requests_for(data_file, 2))) == 2
        assert time.perf_counter() - began >= 1.0  # run() waited for a worker
        summary = summary_of(pool)  # the second slot may still be booting: the boot so far
        assert summary["timings"]["spawn_s"] >= 1.0
        deadline = time.monotonic() + 10
        while [w["device"] for w in summary_of(pool)["workers"]] != ["cpu", "cpu"]:  # it joins on its own
            assert time.monotonic() < deadline, "the second worker never got ready"
            time.sleep(0.02)


def test_closing_a_pool_whose_workers_still_boot_kills_them(data_file):
    """A run that fails while its workers boot (rows too few for the folds, a study that
    refuses the run) leaves no process behind and says nothing of the boots it cut short."""
    pool = fake_pool(cpu_slots(2), "--boot-s", "30", wait=False)
    deadline = time.monotonic() + 10
    while len(pool._procs) < 2:  # noqa: SLF001 - the processes started so far
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.02)
    procs = list(pool._procs)  # noqa: SLF001 - the booting processes
    began = time.monotonic()
    pool.close()
    assert time.monotonic() - began < 5, "close() waited out the boot"
    assert all(p.poll() is not None for p in procs)
    assert summary_of(pool)["faults"] == []
    with pytest.raises(RunnerClosed):
        run_each(pool, requests_for(data_file, 1))


def test_close_says_shutdown_and_reaps_every_worker(data_file, caplog):
    caplog.set_level(logging.WARNING, logger="step5.execution.pool")
    pool = fake_pool(cpu_slots(2))
    run_each(pool, requests_for(data_file, 2))
    pids = pool.worker_pids()
    procs = [st.worker.proc for st in pool._slots]  # noqa: SLF001 - checking exit codes
    pool.close()
    assert [p.returncode for p in procs] == [0, 0]  # a planned exit, after the goodbye
    assert not any("without a shutdown reply" in m for m in caplog.messages)
    assert wait_gone(pids, 0.1) == []
    pool.close()  # idempotent
    with pytest.raises(RunnerClosed):
        run_each(pool, requests_for(data_file, 1))


def test_close_while_a_job_hangs_terminates_the_worker(data_file):
    pool = fake_pool(cpu_slots(1), "--fault", "hang", worker_job_timeout_s=60.0, shutdown_timeout_s=0.5)
    runner, errors = run_in_background(pool, requests_for(data_file, 1))
    time.sleep(0.5)
    pids = pool.worker_pids()
    start = time.monotonic()
    pool.close()
    runner.join(timeout=10)
    assert time.monotonic() - start < 5
    assert not runner.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RunnerClosed)
    assert wait_gone(pids, 0.1) == []


def test_close_racing_a_fault_still_reports_pool_closed(data_file, monkeypatch):
    """close() may clear a slot's worker while a dispatch thread is handling that worker's fault.

    CI once hit this interleaving (close() ran between the fault's kill and its bookkeeping)
    and got an AttributeError instead of RunnerClosed; force it here deterministically.
    """
    pool = fake_pool(cpu_slots(1), "--fault", "hang", worker_job_timeout_s=60.0, shutdown_timeout_s=0.5)
    st = pool._slots[0]
    worker = st.worker
    real_kill = type(worker).kill

    dispatch_kills = []

    def kill_then_close(self) -> None:
        real_kill(self)
        if threading.current_thread().name.startswith("step5-dispatch"):
            dispatch_kills.append(self)
            # The first kill comes from describing the fault, the second from the pool's
            # fault handling: close() lands between that kill and the pool's bookkeeping.
            if len(dispatch_kills) == 2:
                pool.close()

    monkeypatch.setattr(type(worker), "kill", kill_then_close)
    runner, errors = run_in_background(pool, requests_for(data_file, 1))
    time.sleep(0.5)
    os.kill(worker.pid, signal.SIGKILL)  # the fault: the worker dies mid-job
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert len(dispatch_kills) >= 2
    assert len(errors) == 1 and isinstance(errors[0], RunnerClosed), errors
    assert pool.closed and pool.worker_pids() == []


def test_close_while_a_fallback_trainer_hangs_kills_it(data_file, monkeypatch):
    monkeypatch.setenv("STEP5_FAKE_ONESHOT", "hang")
    pool = fake_pool(cpu_slots(1), "--fault", "sigkill", max_worker_restarts=0, worker_job_timeout_s=60.0)
    runner, errors = run_in_background(pool, requests_for(data_file, 1))
    me = psutil.Process()

    def oneshot_running() -> bool:
        for child in me.children():
            try:
                if "--request" in child.cmdline():  # the one-shot trainer reads its job from a file
                    return True
            except psutil.Error:  # the killed worker, a zombie until reaped
                pass
        return False

    deadline = time.monotonic() + 10
    while not oneshot_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert oneshot_running(), "the fallback one-shot trainer never started"
    assert summary_of(pool)["workers"][0]["fallback"] is True
    start = time.monotonic()
    pool.close()
    runner.join(timeout=10)
    assert time.monotonic() - start < 5
    assert not runner.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RunnerClosed), errors
    assert me.children() == []


def test_shutdown_leaves_eof_for_a_thread_still_waiting_on_the_worker():
    """close() drains a worker's messages looking for its goodbye while a dispatch thread may
    be waiting on the same queue for a result: the EOF must stay for that thread, or it
    waits out its whole job timeout (CI saw close() take 60 s under load)."""
    from step5.execution.process import WorkerProcess

    # A worker hung on a job: it ignores the shutdown and is terminated, without a goodbye.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    worker = WorkerProcess("CPU-0", proc)
    worker.finish_shutdown(time.monotonic() + 0.2)
    assert proc.returncode == -signal.SIGTERM
    start = time.monotonic()
    with pytest.raises(WorkerFault) as info:
        worker.receive(30.0, "running a job")
    assert info.value.kind == "crash" and time.monotonic() - start < 5


def test_jobs_cancelled_by_a_racing_close_report_pool_closed(data_file, monkeypatch):
    """close() cancels the jobs still queued behind a busy slot; the caller must get
    RunnerClosed, not concurrent.futures' CancelledError."""
    pool = fake_pool(cpu_slots(1))
    real = WorkerPool._run_group

    def run_group_then_close(self, group):
        result = real(self, group)
        if group[0].job_id == 0:
            self.close()  # lands while jobs 1 and 2 wait for the slot
        return result

    monkeypatch.setattr(WorkerPool, "_run_group", run_group_then_close)
    with pytest.raises(RunnerClosed):
        run_each(pool, requests_for(data_file, 3))
    with pytest.raises(RunnerClosed):
        run_each(pool, requests_for(data_file, 1))


def test_ctrl_c_during_close_still_kills_every_worker(data_file, monkeypatch):
    """A KeyboardInterrupt while close() waits for a worker must not leave the workers
    running: the pool is already marked closed, so no later close() would come back."""
    from step5.execution.process import WorkerProcess

    pool = fake_pool(cpu_slots(2), "--fault", "hang", worker_job_timeout_s=60.0)
    runner, errors = run_in_background(pool, requests_for(data_file, 2))
    time.sleep(0.5)
    pids = pool.worker_pids()
    assert len(pids) == 2

    def interrupted(self, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkerProcess, "finish_shutdown", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.close()
    assert wait_gone(pids, 5.0) == []
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RunnerClosed), errors


def test_ctrl_c_in_run_kills_every_worker_before_propagating(data_file):
    pool = fake_pool(cpu_slots(2), "--fault", "hang", worker_job_timeout_s=60.0)
    pids = pool.worker_pids()
    assert len(pids) == 2
    timer = threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_each(pool, requests_for(data_file, 2))
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert pool.closed
    assert wait_gone(pids, 0.5) == []


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        WorkerPool([], TrainingPolicy(worker_job_timeout_s=1, worker_ready_timeout_s=1, max_worker_restarts=1))
    with pytest.raises(ValueError, match="unique"):
        WorkerPool([DeviceSlot("CPU-0", "cpu", ""), DeviceSlot("CPU-0", "cpu", "")],
                   TrainingPolicy(worker_job_timeout_s=1, worker_ready_timeout_s=1, max_worker_restarts=1))
    with pytest.raises(ValueError, match="job_timeout_s"):
        WorkerPool(cpu_slots(1), TrainingPolicy(worker_job_timeout_s=0, worker_ready_timeout_s=1, max_worker_restarts=1))
    with pytest.raises(ValueError, match="max_restarts"):
        WorkerPool(cpu_slots(1), TrainingPolicy(worker_job_timeout_s=1, worker_ready_timeout_s=1, max_worker_restarts=-1))


# A parent process holding a pool of two fake workers: prints their pids, then either
# sleeps (to be SIGKILLed by the test) or returns without close() (atexit must clean up).
PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from step5.devices import DeviceSlot
    from step5.execution.pool import WorkerPool
    from step5.policy import TrainingPolicy
    from step5.testing import FAKE_WORKER, fake_worker_command
    pool = WorkerPool([DeviceSlot("CPU-0", "cpu", "", 1), DeviceSlot("CPU-1", "cpu", "", 1)],
                      TrainingPolicy(worker_job_timeout_s=5, worker_ready_timeout_s=20, max_worker_restarts=1),
                      worker_command=fake_worker_command(), oneshot_script=FAKE_WORKER)
    print(" ".join(map(str, pool.worker_pids())), flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(60)
""").format(repo=str(REPO_ROOT))


def start_parent(mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2, f"parent printed {line!r}"
    return parent, pids


def test_no_worker_outlives_a_sigkilled_parent():
    parent, pids = start_parent("sleep")
    for pid in pids:
        assert psutil.Process(pid).ppid() == parent.pid
    parent.kill()  # SIGKILL: no atexit, no finally, no close()
    parent.communicate()
    assert wait_gone(pids, 5.0) == [], "workers survived their SIGKILLed parent"


def test_pool_left_open_is_shut_down_gracefully_at_interpreter_exit():
    parent, pids = start_parent("exit")
    _, stderr = parent.communicate(timeout=20)
    assert parent.returncode == 0, stderr
    assert wait_gone(pids, 1.0) == []
    # The atexit close said goodbye: the workers were not SIGKILLed first (as they were when
    # the thread that forked them was joined before atexit handlers ran).
    assert "without a shutdown reply" not in stderr and "SIGKILL" not in stderr, stderr


def test_answers_already_in_when_the_deadline_passes_are_taken_not_timed_out():
    """A fused pass's answers can arrive together just before its deadline while the parent is
    still busy with the first: the ones already read off the pipe came in time, and timing the
    group out for them (killing the worker, re-running every job) would throw them away."""
    from step5.execution.process import WorkerProcess

    answers = "".join('{"status": "complete", "job_id": "j%d"}\n' % i for i in range(3))
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.stdout.write({answers!r}); sys.stdout.flush(); time.sleep(60)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    worker = WorkerProcess("CPU-0", proc)
    try:
        deadline = time.monotonic() + 30
        while worker._lines.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # timeout 0: the deadline has passed by the time the parent reads what is already there
        got = worker.await_answers(3, timeout_s=0.0, probe_interval_s=1.0, probe_grace_s=1.0, doing="a fused pass")
        assert [a["job_id"] for a in got] == ["j0", "j1", "j2"]
    finally:
        worker.kill()


def test_a_worker_that_only_says_alive_still_times_out():
    """The deadline is judged on an empty queue; a worker that floods ``alive`` lines never
    empties it, and must still be timed out."""
    from step5.errors import JobTimedOut
    from step5.execution.process import WorkerProcess

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys\nwhile True:\n    sys.stdout.write('{\"status\": \"alive\"}\\n')"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    worker = WorkerProcess("CPU-0", proc)
    start = time.monotonic()
    try:
        with pytest.raises(JobTimedOut):
            worker.await_answers(1, timeout_s=0.5, probe_interval_s=1.0, probe_grace_s=1.0, doing="a job")
        assert time.monotonic() - start < 10
    finally:
        worker.kill()


@pytest.mark.parametrize("error_type", ["timeout", "startup_error"])
def test_a_worker_answering_with_a_verdict_only_the_parent_gives_broke_the_protocol(error_type, data_file,
                                                                                   monkeypatch):
    # A worker's `timeout` (the parent's verdict on a deadline it alone measures) or `startup_error` (after its
    # `ready`) was taken as the job's verdict: the trial failed instead of the job being re-run elsewhere.
    monkeypatch.setenv("STEP5_FAKE_REPLY", f'{{"status": "error", "error": "x", "error_type": "{error_type}"}}')
    with fake_pool(1, max_job_reruns=0) as pool:
        after_ready = " after `ready`" if error_type == "startup_error" else ""
        with pytest.raises(JobError, match=f"hit by 1 infrastructure fault.*broke the protocol.*{error_type!r} is "
                                           f"not a trainer's to give{after_ready}") as info:
            run_each(pool, requests_for(data_file, 1))
        assert info.value.error_type == "train_error"
        assert [f["kind"] for f in summary_of(pool)["faults"]] == ["protocol"]


def worker_ready_says(monkeypatch, **changes) -> None:
    """Every persistent worker's `ready` line, as the pool reads it, says ``changes`` instead."""
    from step5.execution.process import WorkerProcess

    receive = WorkerProcess.receive

    def ready_saying(self, *args, **kwargs):
        message = receive(self, *args, **kwargs)
        persistent = not self.label.endswith("one-shot")
        return {**message, **changes} if persistent and message.get("status") == "ready" else message

    monkeypatch.setattr(WorkerProcess, "receive", ready_saying)


@pytest.mark.parametrize("boot_s", ["slow", -1, None])
def test_a_boot_time_the_sidecar_cannot_hold_is_not_kept(boot_s, data_file, monkeypatch):
    # A worker's `boot_s` went into the execution block as sent: a string (or a negative number) made the
    # sidecar fail its schema at the end of the run, after the whole search.
    from step5.execution.summary import EXECUTION_SCHEMA, build_execution_summary
    from step5.schema import convert

    worker_ready_says(monkeypatch, boot_s=boot_s)
    with fake_pool(1) as pool:
        run_each(pool, requests_for(data_file, 1))
        stats = pool.summary()
    assert stats.workers[0].boot_s is None and stats.faults == []
    convert(build_execution_summary(stats).to_dict(), EXECUTION_SCHEMA)


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_ready_line_whose_protocol_is_not_the_integer_version_is_a_protocol_fault(version, data_file, monkeypatch):
    # `"protocol": true` passed the version check (True == 1 in Python): a worker that does not speak
    # protocol 1 was trusted with jobs.
    worker_ready_says(monkeypatch, protocol=version)  # the one-shot `ready`: test_runner.py
    with fake_pool(1, max_worker_restarts=0) as pool:
        results = run_each(pool, requests_for(data_file, 1))  # the one-shot fallback trains it
        faults = summary_of(pool)["faults"]
    assert [(f["kind"], f"(`protocol` {version!r} is not version 1)" in f["error"]) for f in faults] == [
        ("protocol", True)]
    assert [r["status"] for r in results] == ["complete"]

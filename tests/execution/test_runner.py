"""The one-shot pool (S96A, ``WorkerPool(persistent=False)``, what the optimizer holds when
persistent workers are off): Ctrl-C and bugs abort a batch at once with no trainer left
behind; job errors still wait for the batch; a group of several jobs is the null object of
fused training.

The trainers are fakes: ``step5/testing/fake_worker.py`` in its one-shot mode, and a tiny
script that hangs, written per test.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from step5.errors import JobError, RunnerClosed
from step5.execution.pool import WorkerPool
from step5.policy import TrainingPolicy
from step5.protocol import NNParams, TrainRequest
from step5.testing import FAKE_WORKER, cpu_slots, run_each, summary_of
from step5.testing.fake_worker import fake_metrics

HANG_SCRIPT = """\
import os, sys, time
open(os.path.join({folder!r}, f"started-{{os.getpid()}}"), "w").close()
time.sleep(120)
"""


def _request(path: Path | str, trial: int, fold: int, **kw) -> TrainRequest:
    return TrainRequest(str(path), NNParams(epochs=3), trial_number=trial, fold_idx=fold, seed=trial * 10 + fold,
                        job_id=f"t{trial}-f{fold}", **kw)


@pytest.fixture
def hang_script(tmp_path: Path) -> tuple[Path, Path]:
    started = tmp_path / "started"
    started.mkdir()
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT.format(folder=str(started)))
    return script, started


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_kills_running_trainers_and_propagates_at_once(hang_script, data_file):
    script, started = hang_script
    runner = WorkerPool(cpu_slots(2), TrainingPolicy(worker_job_timeout_s=300, max_job_reruns=1),
                        persistent=False, oneshot_script=script)
    main = threading.main_thread().ident
    pids: list[int] = []

    def press_ctrl_c() -> None:
        _wait_for(lambda: len(list(started.iterdir())) == 2)  # both trainers are running
        pids.extend(p.pid for p in _children())
        signal.pthread_kill(main, signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_each(runner, [_request(data_file, 0, f) for f in range(3)])  # the third never starts
    elapsed = time.monotonic() - start
    presser.join(timeout=5)
    assert elapsed < 20, f"Ctrl-C took {elapsed:.1f}s to come through"
    assert len(pids) == 2
    assert _children() == []  # killed and reaped before the interrupt propagated
    assert len(list(started.iterdir())) == 2  # nothing was started (or retried) after Ctrl-C
    assert summary_of(runner)["faults"] == []  # our kill is not a trainer crash
    with pytest.raises(RunnerClosed):  # the pool's error: the optimizer handles both runners alike
        run_each(runner, [_request(data_file, 0, 0)])
    runner.close()


def test_a_closed_runner_refuses_work_with_the_pools_error(data_file):
    runner = WorkerPool(cpu_slots(1), TrainingPolicy(worker_job_timeout_s=60), persistent=False,
                        oneshot_script=FAKE_WORKER)
    runner.close()
    runner.close()  # idempotent
    with pytest.raises(RunnerClosed, match="closed"):
        run_each(runner, [_request(data_file, 0, 0)])
    assert _children() == []


def test_a_bug_in_one_job_aborts_the_batch_without_waiting_for_the_others(hang_script, data_file):
    script, started = hang_script
    bad = dataclasses.replace(_request(data_file, 1, 1), params={"epochs": 3})  # a bug: a dict for NNParams
    with WorkerPool(cpu_slots(2), TrainingPolicy(worker_job_timeout_s=300),
                        persistent=False, oneshot_script=script) as runner:
        start = time.monotonic()
        with pytest.raises(AttributeError, match="to_dict"):
            # The second request cannot be sent to its trainer; the first hangs.
            run_each(runner, [_request(data_file, 1, 0), bad])
        assert time.monotonic() - start < 20
        assert _children() == []


def test_job_error_waits_for_the_batch_and_keeps_the_runner(data_file, tmp_path):
    good = [_request(data_file, 2, f) for f in range(3)]
    missing = _request(tmp_path / "gone.npz", 2, 3)
    with WorkerPool(cpu_slots(2), TrainingPolicy(worker_job_timeout_s=60), persistent=False,
                    oneshot_script=FAKE_WORKER) as runner:
        with pytest.raises(JobError) as info:
            run_each(runner, [*good, missing])
        assert info.value.error_type == "data_error" and info.value.fold_idx == 3
        assert summary_of(runner)["timings"]["jobs"] == 3  # every healthy fold ran to the end
        results = run_each(runner, good)  # still usable
    assert [r["r2"] for r in results] == [fake_metrics(r)["r2"] for r in good]


# A trainer that reads its request and ends as {ending} says, its `reply` echoing the request's job_id.
SCRIPTED_TRAINER = """\
import json, sys
request = json.loads(sys.stdin.read())
reply = {{"status": "complete", "r2": 0.5, "val_mse": 1.0, "train_mse": 1.0, "train_r2": 0.6, "job_id": request["job_id"]}}
{ending}
"""


@pytest.mark.parametrize("ending, fault", [
    ("print(json.dumps(reply)); print(json.dumps(reply))", r"wrote '\{.*' after its one reply"),
    ("print(json.dumps(reply)); sys.exit(1)", r"ended with EXIT\(1\) after a 'complete' reply"),
    ("print(json.dumps({**reply, 'status': 'error', 'error': 'x', 'error_type': 'data_error'}))",
     r"ended with EXIT\(0\) after a 'error' reply"),
    ("print(json.dumps({**reply, 'r2': float('nan')}))", r"broke the protocol: sent '\{.*NaN"),
    ("print('{' + ' ' * (17 << 20) + '}')", r"broke the protocol: sent a \d+-byte line"),
    # `timeout` is the parent's verdict, `startup_error` a trainer's answer in place of `ready`: a trainer
    # claiming either got its handling (a timeout's verdict; the slot retired, here the run stopped).
    ("print(json.dumps({**reply, 'status': 'error', 'error': 'x', 'error_type': 'timeout'})); sys.exit(1)",
     r"broke the protocol.*'timeout' is not a trainer's to give"),
    ("print(json.dumps({'status': 'ready', 'protocol': 1})); "
     "print(json.dumps({**reply, 'status': 'error', 'error': 'x', 'error_type': 'startup_error'})); sys.exit(1)",
     r"broke the protocol.*'startup_error' is not a trainer's to give after `ready`"),
    # `"protocol": true` passed as version 1 (True == 1): the worker's and the one-shot `ready` share one rule
    ("print(json.dumps({'status': 'ready', 'protocol': True})); print(json.dumps(reply))",
     r"broke the protocol.*\(`protocol` True is not version 1\)"),
], ids=["two-replies", "complete-then-exit-1", "error-then-exit-0", "nan-metric", "huge-line", "says-timeout",
        "startup-error-after-ready", "ready-of-another-protocol"])
def test_a_one_shot_trainer_that_breaks_the_protocol_is_a_fault_not_the_trials_verdict(ending, fault, data_file,
                                                                                        tmp_path):
    script = tmp_path / "scripted.py"
    script.write_text(SCRIPTED_TRAINER.format(ending=ending))
    with WorkerPool(cpu_slots(1), TrainingPolicy(worker_job_timeout_s=60, max_job_reruns=0), persistent=False,
                    oneshot_script=script) as runner:
        with pytest.raises(JobError, match=f"hit by 1 infrastructure fault.*{fault}"):
            run_each(runner, [_request(data_file, 0, 0)])
        assert [f["kind"] for f in summary_of(runner)["faults"]] == ["oneshot"]


def test_a_group_is_the_null_object_of_fusion_same_results_fold_by_fold_and_one_warning(data_file, caplog):
    groups = [[_request(data_file, 3, f) for f in range(3)], [_request(data_file, 4, f) for f in range(2)]]
    with WorkerPool(cpu_slots(2), TrainingPolicy(worker_job_timeout_s=60), persistent=False,
                    oneshot_script=FAKE_WORKER) as runner:
        with caplog.at_level(logging.WARNING, logger="step5.execution.pool"):
            fused = runner.run(groups)
            again = runner.run(groups[:1])
        unfused = run_each(runner, [r for g in groups for r in g])
        summary = summary_of(runner)
    assert [[r["job_id"] for r in g] for g in fused] == [[r.job_id for r in g] for g in groups]
    flat = [r for g in fused for r in g]
    for a, b in zip(flat, unfused):
        assert {k: a[k] for k in ("r2", "val_mse", "train_mse")} == {k: b[k] for k in ("r2", "val_mse", "train_mse")}
    assert again[0][0]["r2"] == fused[0][0]["r2"]
    assert caplog.text.count("cannot fuse") == 1  # said once per runner, not per trial
    # Three groups of several jobs (none could share a pass), then five groups of one.
    assert summary["fusion"] == {"groups": 8, "jobs": 13, "fused_groups": 0, "unfused_groups": 3, "rerun_jobs": 0,
                                 "largest_group": 3}
    with WorkerPool(cpu_slots(1), TrainingPolicy(), persistent=False, oneshot_script=FAKE_WORKER) as runner:
        with pytest.raises(ValueError, match="empty group"):
            runner.run([[]])


def test_the_hang_script_is_a_real_hang(hang_script):
    """Guard for the tests above: the fake really does hang (so a quick return means an abort)."""
    import subprocess

    script, _ = hang_script
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    finally:
        proc.kill()
        proc.wait()


# A trainer that starts a helper process sharing its stdout/stderr, then hangs.
SPAWNING_HANG_SCRIPT = """\
import os, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(os.path.join({folder!r}, "helper.pid"), "w") as f:
    f.write(str(helper.pid))
time.sleep(120)
"""


def test_a_timed_out_trainer_is_killed_with_the_processes_it_started(tmp_path, data_file):
    """A grandchild holding the trainer's pipes must neither outlive the job nor make the
    runner wait on those pipes past the timeout."""
    from step5.errors import JobTimedOut
    from step5.execution.process import oneshot_command, run_oneshot_job

    script = tmp_path / "spawning_hang.py"
    script.write_text(SPAWNING_HANG_SCRIPT.format(folder=str(tmp_path)))
    start = time.monotonic()
    with pytest.raises(JobTimedOut, match="exceeded the 2s job timeout") as info:
        run_oneshot_job(_request(data_file, 0, 0), cpu_slots(1)[0], timeout_s=2.0,
                        command=oneshot_command(script=script))
    assert info.value.exit_status == "TIMEOUT"
    assert time.monotonic() - start < 10  # not the helper's 120 s
    helper = int((tmp_path / "helper.pid").read_text())

    def helper_gone() -> bool:
        try:
            return psutil.Process(helper).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    _wait_for(helper_gone, timeout_s=5.0)


@pytest.mark.parametrize("variable, args", [("STEP5_FAKE_BOOT", []), ("STEP5_FAKE_ONESHOT", ["--request", "-"])])
def test_a_misspelt_fake_fault_stops_the_fake_instead_of_injecting_nothing(variable, args):
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(FAKE_WORKER), *args], input=b"", capture_output=True, timeout=60,
                          env={**os.environ, variable: "hnag"})
    assert done.returncode == 1
    assert f"{variable}='hnag' is not one of" in done.stderr.decode()

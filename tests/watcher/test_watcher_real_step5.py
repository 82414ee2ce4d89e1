"""The WATCHER running the real Step 5 (``meta_prediction_optimizer_anti_overfit.py``) on
tiny generated data, as a user would: in a scratch working directory, through the CLI."""
from __future__ import annotations

import json
import subprocess

import pytest

from step5.launch import WORKER_MODULE
from step5.testing.processes import result_line, watcher_decisions
from step5.watcher.registry import load_skip_registry


@pytest.fixture
def work(work, write_policy):
    """The shared scratch directory, under the shipped policy with room for real training."""
    write_policy(work, "shipped", step_timeout_s=200, kill_grace_s=5)
    return work


@pytest.mark.slow
def test_real_step5_end_to_end(work, sample_inputs, watcher, write_policy):
    write_policy(work, "shipped", max_retries=0, critical_retries=0, step_timeout_s=200, kill_grace_s=5)
    survivors, history = sample_inputs
    proc = watcher.run(work, None, timeout=240, params={
        "survivors": str(survivors), "lottery_data": str(history), "trials": 2, "k_folds": 2, "cpu_workers": 1,
        "output_dir": "models"})
    out = result_line(proc)
    # Two trials on tiny data may or may not pass the acceptance rules; either way the
    # WATCHER judged a valid sidecar written by this run (never ESCALATE).
    assert out["decision"] in ("PROCEED", "SKIP_MODEL"), proc.stderr[-3000:]
    [record] = watcher_decisions(work)
    assert record["model_type"] == "neural_net" and record["outcome"] == "SUCCESS"
    assert record["execution_mode"] == "persistent_workers"  # the policy's switch reached step 5
    assert (work / "models" / "best_model.pth").is_file()
    sidecar = json.loads((work / "models" / "best_model.meta.json").read_text())
    assert sidecar["provenance"]["parent_run_id"] == out["run_id"]
    assert "neural_net" in load_skip_registry()


def test_real_step5_degenerate_input(work, degenerate_inputs, watcher):
    survivors, history = degenerate_inputs
    proc = watcher.run(work, None, timeout=240, params={
        "survivors": str(survivors), "lottery_data": str(history), "trials": 2, "cpu_workers": 1,
        "output_dir": "models"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert result_line(proc)["decision"] == "DEGENERATE"
    assert [r["decision"] for r in watcher_decisions(work)] == ["DEGENERATE"]


def test_real_step5_bad_input_escalates_with_its_message(work, watcher, write_policy):
    (work / "bad.json").write_text('[{"seed": 1, "features": {"a": "x"}, "holdout_quality": 0.1}]')
    (work / "history.json").write_text("[1, 2, 3]")
    write_policy(work, "shipped", max_retries=0, critical_retries=0, step_timeout_s=200, kill_grace_s=5)
    proc = watcher.run(work, None, timeout=240, params={"survivors": "bad.json", "lottery_data": "history.json",
                                                        "trials": 2})
    assert proc.returncode == 4, proc.stderr[-3000:]
    [record] = watcher_decisions(work)
    assert record["decision"] == "ESCALATE" and record["exit_status"] == "EXIT(1)"
    assert "bad.json" in " ".join(record["reasons"] + record.get("output_tail", []))


@pytest.mark.slow
def test_a_sigkilled_watcher_takes_the_step_and_its_workers_with_it(work, sample_inputs, watcher):
    """The step runs in its own session, so nothing but the WATCHER stops it; a WATCHER that
    is SIGKILLed (or OOM-killed) cannot. The step's supervisor lifeline must end it, through
    its SIGTERM path, and its workers with it."""
    import time

    import psutil

    survivors, history = sample_inputs
    cmd = watcher.cmd(fake=False, params={"survivors": str(survivors), "lottery_data": str(history), "trials": 5000,
                                          "k_folds": 2, "cpu_workers": 1, "output_dir": "models"})
    running = subprocess.Popen(cmd, cwd=work, env=watcher.env(work, None), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the step's persistent worker is up
            family = psutil.Process(running.pid).children(recursive=True)
            if any(WORKER_MODULE in p.cmdline() for p in family if p.is_running()):
                break
            assert running.poll() is None, "the WATCHER ended before the step's worker started"
            time.sleep(0.2)
        else:
            pytest.fail("the step's worker never started")
        running.kill()
        running.wait()
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
        for p in family:  # whatever a failure left behind
            try:
                p.kill()
            except psutil.Error:
                pass

"""A step runs in its own process group; on timeout, interrupt or exit nothing of it survives."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from step5.errors import Step5Error
from step5.owner import pid_alive as is_running
from step5.watcher.cli import step_env
from step5.watcher.process import group_members, run_in_group

FAKE = str(Path(__file__).resolve().parents[2] / "step5" / "testing" / "fake_step5.py")


def fake_env(tmp_path: Path, mode: str) -> dict[str, str]:
    env = step_env()
    env.update(FAKE_STEP5_MODE=mode, FAKE_STEP5_PIDS=str(tmp_path / "pids.json"))
    return env


def fake_cmd() -> list[str]:
    return [sys.executable, FAKE, "--survivors", "s.json", "--lottery-data", "h.json"]


def test_clean_exit_reports_code_and_output(tmp_path):
    run = run_in_group([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"],
                       timeout_s=30, grace_s=1, echo=False)
    assert run.returncode == 3 and run.exit_status == "EXIT(3)"
    assert run.output_tail == ["hello"]
    assert not run.timed_out and run.leftovers == 0


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(Step5Error, match="cannot start"):
        run_in_group([str(tmp_path / "no-such-python")], timeout_s=5, grace_s=1, echo=False)


def test_death_by_signal_is_read_from_the_os():
    run = run_in_group([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                       timeout_s=30, grace_s=1, echo=False)
    assert run.returncode == -9 and run.exit_status == "SIGKILL(-9)"


def test_timeout_stops_the_whole_group_and_escaped_children(tmp_path):
    t0 = time.monotonic()
    # 5 s: room for the fake step to start and write its pids on a loaded machine
    run = run_in_group(fake_cmd(), timeout_s=5.0, grace_s=1.0, env=fake_env(tmp_path, "hang"), cwd=str(tmp_path),
                       echo=False)
    elapsed = time.monotonic() - t0
    info = json.loads((tmp_path / "pids.json").read_text())
    assert run.timed_out and run.exit_status == "TIMEOUT"
    assert info["pgid"] == info["pid"] == run.pid  # the step leads its own group
    assert info["pgid"] != os.getpgid(0)
    assert group_members(info["pgid"]) == []
    for pid in [info["pid"], *info["children"]]:  # one ignored SIGTERM, one left the group
        assert not is_running(pid), pid
    assert elapsed < 5.0 + 1.0 + 5.0
    assert any("hanging" in line for line in run.output_tail)


def test_processes_left_after_a_clean_exit_are_stopped(tmp_path):
    run = run_in_group(fake_cmd(), timeout_s=30, grace_s=1.0, env=fake_env(tmp_path, "leak"), cwd=str(tmp_path),
                       echo=False)
    info = json.loads((tmp_path / "pids.json").read_text())
    assert run.returncode == 0 and run.leftovers == 1
    assert not is_running(info["children"][0])


def test_interrupt_stops_the_group(tmp_path):
    """Ctrl-C in the WATCHER (here: SIGINT to ourselves while waiting) stops the step."""
    pids = tmp_path / "pids.json"

    def interrupt_when_started() -> None:
        deadline = time.monotonic() + 20
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=interrupt_when_started)
    helper.start()
    try:
        run = run_in_group(fake_cmd(), timeout_s=60, grace_s=1.0, env=fake_env(tmp_path, "hang"),
                           cwd=str(tmp_path), echo=False)
    finally:
        helper.join()
    info = json.loads(pids.read_text())
    assert run.interrupted == "SIGINT" and not run.timed_out
    assert group_members(info["pgid"]) == []
    assert not any(is_running(pid) for pid in [info["pid"], *info["children"]])


@pytest.mark.parametrize("exit_code", [0, 1])
def test_output_is_echoed_to_stderr(capfd, exit_code):
    run_in_group([sys.executable, "-c", f"import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit({exit_code})"],
                 timeout_s=30, grace_s=1)
    out, err = capfd.readouterr()
    assert out == ""  # the WATCHER's stdout stays its own
    assert "to stdout" in err and "to stderr" in err


def test_an_interrupt_during_the_grace_period_is_reported_not_lost(tmp_path, monkeypatch):
    """The step timed out; while its group gets its grace period the user presses Ctrl-C.
    That skips to SIGKILL, and the run says it was interrupted, so nobody retries it."""
    from step5.watcher import process as process_module

    real = process_module._remaining
    calls = {"n": 0}

    def remaining_then_interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the first check inside the grace loop
            raise KeyboardInterrupt  # Ctrl-C: SIGINT
        return real(*args)

    monkeypatch.setattr(process_module, "_remaining", remaining_then_interrupt)
    t0 = time.monotonic()
    run = run_in_group(fake_cmd(), timeout_s=5.0, grace_s=30.0, env=fake_env(tmp_path, "hang"),
                       cwd=str(tmp_path), echo=False)
    info = json.loads((tmp_path / "pids.json").read_text())
    assert run.timed_out and run.interrupted == "SIGINT"
    assert time.monotonic() - t0 < 15  # not the 30 s grace: the interrupt went straight to SIGKILL
    assert group_members(info["pgid"]) == []
    assert not any(is_running(pid) for pid in [info["pid"], *info["children"]])


def test_the_step_is_told_who_supervises_it_and_a_step_run_by_hand_has_no_supervisor():
    from step5.lifeline import SUPERVISOR_PID_ENV, install_supervisor_lifeline

    assert step_env()[SUPERVISOR_PID_ENV] == str(os.getpid())
    assert install_supervisor_lifeline({}) is None
    assert install_supervisor_lifeline({SUPERVISOR_PID_ENV: "not-a-pid"}) is None

"""The lifeline (step5.lifeline): a child ends when the process it serves dies, with real
processes whose parent the tests kill, by each mechanism on its own; and the reading of
the pid variables."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from step5.launch import child_environment
from step5.lifeline import (
    EXIT_ORPHANED,
    PARENT_PID_ENV,
    STDIN_LIFELINE_ENV,
    SUPERVISOR_PID_ENV,
    expected_parent_pid,
    install_lifeline,
    install_stdin_lifeline,
    install_supervisor_lifeline,
)
from step5.testing.processes import wait_gone

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")

# A child that arms one mechanism, says so, and sleeps; with "prctl-term" it asks for SIGTERM
# and answers it by writing the file named in argv[2] (so the test sees which signal came).
CHILD = textwrap.dedent("""
    import pathlib, signal, sys, time
    from step5.lifeline import install_lifeline, set_parent_death_signal
    mechanism = sys.argv[1]
    if mechanism == "prctl":
        assert set_parent_death_signal()
    elif mechanism == "prctl-term":
        def on_term(signum, frame):
            pathlib.Path(sys.argv[2]).write_text(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        assert set_parent_death_signal(signal.SIGTERM)
    elif mechanism == "install":  # both, but the poll would come far too late: prctl must act
        install_lifeline(poll_s=3600)
    else:
        install_lifeline(use_prctl=False, poll_s=0.1)
    print("armed", flush=True)
    time.sleep(60)
""")

# The child's parent: starts it, passes its pid up, and waits to be killed.
MIDDLE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "armed"
    print(child.pid, flush=True)
    time.sleep(60)
""")


def own_environment() -> dict[str, str]:
    """step5 importable, and no recorded parent: a lifeline watches the real parent."""
    env = child_environment()
    env.pop(PARENT_PID_ENV, None)
    env.pop(SUPERVISOR_PID_ENV, None)
    return env


def start_middle(*child_args: str) -> tuple[subprocess.Popen[str], int]:
    env = own_environment()
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD, *child_args], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert middle.stdout is not None
    child_pid = int(middle.stdout.readline())
    return middle, child_pid


#: How long a child may take to end once its parent is gone: it is at once on an idle machine;
#: a full suite on 2 cores once saw the SIGTERM path take longer than 5 s.
ENDS_WITHIN_S = 15.0


def kill_and_reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.parametrize("mechanism", [pytest.param("prctl", marks=LINUX_ONLY), "poll",
                                       pytest.param("install", marks=LINUX_ONLY)])
def test_lifeline_ends_the_child_when_its_parent_is_killed(mechanism):
    middle, child_pid = start_middle(mechanism)
    kill_and_reap(middle)
    assert wait_gone([child_pid], ENDS_WITHIN_S) == []


@LINUX_ONLY
def test_the_kernel_sends_the_signal_asked_for(tmp_path):
    said = tmp_path / "signal"
    middle, child_pid = start_middle("prctl-term", str(said))
    kill_and_reap(middle)
    assert wait_gone([child_pid], ENDS_WITHIN_S) == []
    assert said.read_text() == "SIGTERM"  # the child's handler ran: cleanup is possible


# A subreaper adopts its orphaned descendants, so it can read the orphan's exit status; the
# orphan's parent pid changes to the subreaper's rather than to 1.
SUBREAPER = textwrap.dedent("""
    import ctypes, os, subprocess, sys
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    middle = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "poll"], stdout=subprocess.PIPE)
    child = int(middle.stdout.readline())
    middle.kill()
    middle.wait()
    pid, status = os.waitpid(child, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
""")


@LINUX_ONLY
def test_an_orphan_re_parented_to_a_subreaper_exits_with_the_orphaned_status():
    proc = subprocess.run([sys.executable, "-c", SUBREAPER, MIDDLE, CHILD], capture_output=True, text=True,
                          timeout=30, env=own_environment())
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == EXIT_ORPHANED
    assert "re-parented from pid" in proc.stderr  # the child said why it left


def test_lifeline_notices_a_parent_pid_that_is_gone():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fired = threading.Event()
    install_lifeline(dead.pid, poll_s=0.05, on_orphan=fired.set, use_prctl=False)
    assert fired.wait(2.0)


def test_lifeline_watches_the_pid_its_parent_wrote_into_the_environment(monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv(PARENT_PID_ENV, str(dead.pid))
    fired = threading.Event()
    install_lifeline(poll_s=0.05, on_orphan=fired.set, use_prctl=False)
    assert fired.wait(2.0)


def test_lifeline_stays_quiet_while_the_parent_lives(monkeypatch):
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    fired = threading.Event()
    thread = install_lifeline(poll_s=0.05, on_orphan=fired.set, use_prctl=False)  # watches os.getppid()
    explicit = install_lifeline(os.getppid(), poll_s=0.05, on_orphan=fired.set, use_prctl=False)
    assert not fired.wait(0.3)
    assert thread.daemon and thread.is_alive() and explicit.is_alive()


# --- the supervisor (the WATCHER) ------------------------------------------------------------

STEP = textwrap.dedent("""
    import signal, sys, time
    from step5.lifeline import install_supervisor_lifeline
    def on_term(signum, frame):
        print("SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("armed" if install_supervisor_lifeline() is not None else "none", flush=True)
    time.sleep(float(sys.argv[1]))
    print("slept", flush=True)
""")


def test_a_step_whose_supervisor_dies_takes_its_sigterm_path():
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    env = {**own_environment(), SUPERVISOR_PID_ENV: str(supervisor.pid)}
    step = subprocess.Popen([sys.executable, "-c", STEP, "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert step.stdout.readline().strip() == "armed"
        supervisor.kill()
        supervisor.wait()
        out, _ = step.communicate(timeout=10)
    finally:
        for proc in (supervisor, step):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (out.strip(), step.returncode) == ("SIGTERM", 0)


def test_a_step_without_a_supervisor_gets_no_lifeline():
    proc = subprocess.run([sys.executable, "-c", STEP, "0"], env=own_environment(), capture_output=True, text=True, timeout=30)
    assert proc.stdout.split() == ["none", "slept"], proc.stderr
    assert install_supervisor_lifeline({}) is None


# --- a helper started over ssh: its stdin is its lifeline ------------------------------------

HELPER = textwrap.dedent("""
    import signal, sys, time
    from step5.lifeline import install_stdin_lifeline
    signal.signal(signal.SIGTERM, lambda *a: (print("SIGTERM", flush=True), sys.exit(0)))
    print("armed" if install_stdin_lifeline() else "none", flush=True)
    time.sleep(60)
""")


def test_a_helper_stops_as_on_sigterm_when_its_stdin_closes():
    env = {**own_environment(), STDIN_LIFELINE_ENV: "1"}
    with subprocess.Popen([sys.executable, "-c", HELPER], env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as helper:  # its pipes are closed on leaving
        try:
            assert helper.stdout.readline().strip() == "armed"
            helper.stdin.write("anything the channel carries is ignored\n")
            helper.stdin.flush()
            helper.stdin.close()  # the main process stops it, dies, or the connection drops
            helper.wait(timeout=10)
            out = helper.stdout.read()
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    assert (out.strip(), helper.returncode) == ("SIGTERM", 0)


def test_without_the_variable_stdin_is_left_alone():
    assert install_stdin_lifeline({}) is None
    assert install_stdin_lifeline({STDIN_LIFELINE_ENV: "0"}) is None


def test_the_stdin_lifeline_acts_once_at_eof():
    read_end, write_end = os.pipe()
    ended = threading.Event()
    lifeline = install_stdin_lifeline({STDIN_LIFELINE_ENV: "1"}, fd=read_end, on_eof=ended.set)
    os.write(write_end, b"x" * 100)
    assert not ended.wait(0.2)
    os.close(write_end)
    assert ended.wait(5) and lifeline is not None
    lifeline.thread.join(5)
    os.close(read_end)


def test_a_disarmed_stdin_lifeline_lets_a_finished_run_exit_in_peace():
    read_end, write_end = os.pipe()
    acted = threading.Event()
    lifeline = install_stdin_lifeline({STDIN_LIFELINE_ENV: "1"}, fd=read_end, on_eof=acted.set)
    lifeline.disarm()  # the run is over; the main process's stop comes too late
    os.close(write_end)
    lifeline.thread.join(5)
    assert not lifeline.thread.is_alive() and not acted.is_set()
    os.close(read_end)


# --- reading the pid variables ---------------------------------------------------------------


@pytest.mark.parametrize("raw, pid", [
    (None, None), ("", None), ("  ", None), ("abc", None), ("12.5", None), ("0", None), ("-4", None),
    ("4242", 4242), (" 17 ", 17),
])
def test_expected_parent_pid_is_a_positive_int_or_nothing(raw, pid):
    environ = {} if raw is None else {PARENT_PID_ENV: raw}
    assert expected_parent_pid(environ) == pid


def test_expected_parent_pid_reads_the_variable_it_is_asked_for(monkeypatch):
    assert expected_parent_pid({SUPERVISOR_PID_ENV: "5", PARENT_PID_ENV: "6"}, SUPERVISOR_PID_ENV) == 5
    monkeypatch.setenv(PARENT_PID_ENV, "77")
    assert expected_parent_pid() == 77


def test_a_garbled_pid_is_ignored_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="step5.lifeline"):
        assert expected_parent_pid({PARENT_PID_ENV: "pid-12"}) is None
    assert "ignoring STEP5_PARENT_PID='pid-12': not an integer pid" in caplog.text

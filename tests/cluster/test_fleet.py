"""The helper fleet with real processes: a stand-in ``ssh`` on PATH runs each "remote"
command on this machine, and each host's ``python_env`` is a stand-in script. Unreachable
hosts are skipped by name, failing ones quarantined, killed ones restarted, logs carry the
host's name, stopping closes the helpers' stdin, and no value of the config runs as code."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from step5.cluster import ENTRY_SCRIPT, ClusterNode, HelperFleet
from step5.errors import Step5Error
from step5.testing.standins import write_fake_ssh, write_host_python

#: A stand-in helper: says hello, then behaves as $STEP5_TEST_MODE (per host, see `hosts`).
HELPER = r"""
import os, signal, sys, time
from step5.lifeline import install_stdin_lifeline
host = os.environ["STEP5_FAKE_SSH_HOST"]
mode = os.environ.get("MODE_" + host.replace("-", "_"), "exit0")
state = os.path.join(os.environ["STATE_DIR"], host)
with open(state, "a") as fh:
    fh.write(f"{os.getpid()} {' '.join(sys.argv[1:])}\n")
runs = len(open(state).read().splitlines())
print(f"helper on {host} run {runs} in {os.getcwd()}", file=sys.stderr, flush=True)
def stopped(signum, frame):
    open(state + ".stopped", "w").write("SIGTERM")
    print("2026-12-07 15:18:24,000 ERROR   step5.optimizer: terminated by SIGTERM", file=sys.stderr, flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stopped)
if mode == "exit0":
    sys.exit(0)
if mode == "fail":
    sys.exit(1)
if mode == "usage":
    sys.exit(64)
if mode == "logs":  # as the optimizer's log and its last line look on stderr
    print("2026-12-07 15:18:23,101 INFO    step5.optimizer.optimizer: loaded 200 survivors", file=sys.stderr)
    print("2026-12-07 15:18:23,102 WARNING step5.data.survivors: filled 1 value(s) with 0.0", file=sys.stderr)
    print("error: survivors file s.json: not found", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "fail-once" and runs == 1:
    sys.exit(1)
if mode == "fail-once":
    sys.exit(0)
if mode == "serve":
    install_stdin_lifeline()
if mode in ("serve", "deaf"):
    while True:
        time.sleep(0.1)
"""


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A stand-in ssh on PATH (host ``rig-dead`` unreachable), the stand-in helper as every
    host's python_env, and a function that makes nodes."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "ssh.log"
    write_fake_ssh(bin_dir, unreachable=["rig-dead"], log=log, require=["BatchMode=yes", "ConnectTimeout=10"])
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIR", str(state))
    python = write_host_python(tmp_path / "python_env", module_args=["-c", HELPER])

    def nodes(*hosts: str, script_path: Path | None = None) -> list[ClusterNode]:
        folder = script_path or tmp_path / "checkout"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ENTRY_SCRIPT).touch()  # what a node's checkout holds (the stand-in helper does not read it)
        return [ClusterNode(h, "michael", 8, "RX 6600", str(folder), str(python)) for h in hosts]

    return nodes, state, log


def modes(monkeypatch, **by_host: str) -> None:
    for host, mode in by_host.items():
        monkeypatch.setenv("MODE_" + host.replace("-", "_"), mode)


def run_fleet(nodes, *, wait_for=None, timeout_s=30.0, **options) -> HelperFleet:
    """Start a fleet over the stand-in ssh, wait until ``wait_for(fleet)`` (default: every
    host has its verdict), stop it."""
    options.setdefault("restart_delay_s", 0.05)
    fleet = HelperFleet(nodes, ["--search-only"], **options)
    fleet.start()
    done = wait_for or (lambda f: all(r.state not in ("pending", "running", "waiting") for r in f.records))
    deadline = time.monotonic() + timeout_s
    while not done(fleet) and time.monotonic() < deadline:
        time.sleep(0.05)
    fleet.stop()
    return fleet


def states(fleet: HelperFleet) -> dict[str, str]:
    return {r.host: r.state for r in fleet.records}


def test_helpers_run_with_their_logs_prefixed_and_an_unreachable_host_is_named_and_skipped(cluster, caplog):
    nodes, state, log = cluster
    caplog.set_level(logging.INFO, logger="step5.cluster")
    start = time.monotonic()
    fleet = run_fleet(nodes("rig-1", "rig-2", "rig-dead"))
    assert time.monotonic() - start < 20
    assert states(fleet) == {"rig-1": "done", "rig-2": "done", "rig-dead": "unreachable"}
    assert "[rig-1] helper on rig-1 run 1 in " in caplog.text and "[rig-2] helper on rig-2 run 1" in caplog.text
    assert "[rig-dead] unreachable: ssh ended with EXIT(255) before the host answered; skipped" in caplog.text
    assert "[rig-dead] ssh: connect to host rig-dead port 22: Connection timed out" in caplog.text
    assert (state / "rig-1").read_text().split(" ", 1)[1].strip() == "--search-only"


def test_a_host_whose_helper_keeps_failing_is_quarantined_and_the_others_go_on(cluster, monkeypatch, caplog):
    nodes, state, _ = cluster
    modes(monkeypatch, **{"rig-1": "fail", "rig-2": "fail-once", "rig-3": "usage"})
    caplog.set_level(logging.WARNING, logger="step5.cluster")
    fleet = run_fleet(nodes("rig-1", "rig-2", "rig-3"), max_failures=3)
    assert states(fleet) == {"rig-1": "quarantined", "rig-2": "done", "rig-3": "quarantined"}
    by_host = {r.host: r for r in fleet.records}
    assert by_host["rig-1"].history == ["EXIT(1)"] * 3 and by_host["rig-1"].starts == 3
    assert by_host["rig-2"].history == ["EXIT(1)", "EXIT(0)"]
    assert by_host["rig-3"].starts == 1  # a usage error is not retried
    assert "[rig-1] quarantined: its helper failed 3 time(s) (last: EXIT(1))" in caplog.text
    assert "[rig-1] helper ended with EXIT(1) (failure 1 of 3); restarting it" in caplog.text


def test_a_helpers_lines_keep_their_level_and_its_errors_show_at_warning(cluster, monkeypatch, caplog):
    """A main process run with --log-level WARNING still says why a helper failed: its one-line
    error and the shell's (a python_env that is not there), not only "ended with EXIT(127)"."""
    nodes, state, _ = cluster
    modes(monkeypatch, **{"rig-1": "logs"})
    caplog.set_level(logging.INFO, logger="step5.cluster")
    missing_python = ClusterNode("rig-2", None, 8, "RX 6600", nodes("rig-2")[0].script_path, "/nonexistent/python")
    run_fleet([*nodes("rig-1"), missing_python], max_failures=1)
    levels = {r.getMessage(): r.levelname for r in caplog.records if r.getMessage().startswith("[rig-")}
    assert levels["[rig-1] 2026-12-07 15:18:23,101 INFO    step5.optimizer.optimizer: loaded 200 survivors"] == "INFO"
    assert levels["[rig-1] 2026-12-07 15:18:23,102 WARNING step5.data.survivors: filled 1 value(s) with 0.0"] == \
        "WARNING"
    assert levels["[rig-1] error: survivors file s.json: not found"] == "WARNING"
    (env_line,) = [m for m in levels if m.startswith("[rig-2] ") and "/nonexistent/python" in m]
    assert levels[env_line] == "WARNING" and "No such file or directory" in env_line


def test_a_python_env_that_is_not_there_or_not_executable_is_quarantined_at_once(cluster, tmp_path, caplog):
    """exit 127/126 from the remote shell: it was retried max_failures times, failing the same way each time."""
    nodes, _, _ = cluster
    caplog.set_level(logging.WARNING, logger="step5.cluster")
    folder = nodes("rig-1")[0].script_path
    fleet = run_fleet([ClusterNode("rig-1", None, 8, "RX 6600", folder, "/nonexistent/python"),
                       ClusterNode("rig-2", None, 8, "RX 6600", folder, str(tmp_path))], max_failures=3)
    assert states(fleet) == {"rig-1": "quarantined", "rig-2": "quarantined"}
    assert [r.history for r in fleet.records] == [["EXIT(127)"], ["EXIT(126)"]]
    for host, what in [("rig-1", "was not found"), ("rig-2", "is not executable")]:
        assert (f"[{host}] quarantined: its command {what} on the host (check the node's python_env and script_path)"
                in caplog.text)


def test_a_script_path_that_is_not_there_or_holds_no_entry_script_is_quarantined_at_once(cluster, tmp_path, caplog):
    """`cd` failed with exit 2 (or python with 2 on a missing script, DataError's code): the helper was
    retried max_failures times, failing the same way each time."""
    nodes, _, _ = cluster
    caplog.set_level(logging.WARNING, logger="step5.cluster")
    python = nodes("rig-1")[0].python_env
    (tmp_path / "empty").mkdir()
    fleet = run_fleet([ClusterNode("rig-1", None, 8, "RX 6600", str(tmp_path / "nowhere"), python),
                       ClusterNode("rig-2", None, 8, "RX 6600", str(tmp_path / "empty"), python)], max_failures=3)
    assert states(fleet) == {"rig-1": "quarantined", "rig-2": "quarantined"}
    assert [r.history for r in fleet.records] == [["EXIT(127)"], ["EXIT(127)"]]
    for host in ("rig-1", "rig-2"):
        assert (f"[{host}] quarantined: its command was not found on the host (check the node's python_env and "
                "script_path)" in caplog.text)


def test_a_killed_helper_is_restarted(cluster, monkeypatch):
    nodes, state, _ = cluster
    modes(monkeypatch, **{"rig-1": "deaf"})
    launched = []  # every ssh started (None: not started, the fleet was stopping)
    launch = HelperFleet._launch

    def launch_and_record(self, h):
        launched.append(launch(self, h))
        return launched[-1]

    monkeypatch.setattr(HelperFleet, "_launch", launch_and_record)
    fleet = HelperFleet(nodes("rig-1"), [], restart_delay_s=0.05, stop_grace_s=0.5)  # deaf: stops at the grace's end
    fleet.start()
    deadline = time.monotonic() + 20
    while not (state / "rig-1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = int((state / "rig-1").read_text().split()[0])
    os.kill(first, signal.SIGKILL)  # the "remote" helper dies, not the ssh client
    while len((state / "rig-1").read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    fleet.stop()
    (record,) = fleet.records
    # ssh reports a command killed by a signal as 255, or as the shell around it saw it (128 + 9)
    assert record.history[0] in ("EXIT(255)", "EXIT(137)") and record.starts == 2
    assert record.state == "stopped"
    # the ended ssh's pipes are closed, not left to the garbage collector at each restart
    started = [p for p in launched if p is not None]
    assert len(started) == 2 and all(p.stdin.closed and p.stdout.closed and p.stderr.closed for p in started)


def test_stopping_closes_each_helpers_stdin_so_it_stops_as_on_sigterm(cluster, monkeypatch, caplog):
    nodes, state, _ = cluster
    caplog.set_level(logging.INFO, logger="step5.cluster")
    modes(monkeypatch, **{"rig-1": "serve", "rig-2": "serve"})
    fleet = HelperFleet(nodes("rig-1", "rig-2"), [], stop_grace_s=20.0)
    fleet.start()
    deadline = time.monotonic() + 20
    while not all((state / h).exists() for h in ("rig-1", "rig-2")) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int((state / h).read_text().split()[0]) for h in ("rig-1", "rig-2")]
    start = time.monotonic()
    fleet.stop("test")
    assert time.monotonic() - start < 10  # stdin closed: no need to wait out the grace
    assert [(state / f"{h}.stopped").read_text() for h in ("rig-1", "rig-2")] == ["SIGTERM", "SIGTERM"]
    assert states(fleet) == {"rig-1": "stopped", "rig-2": "stopped"}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    # the end the main process asked for is no error in its log
    ends = [r for r in caplog.records if r.getMessage().endswith("ERROR   step5.optimizer: terminated by SIGTERM")]
    assert len(ends) == 2 and {r.levelname for r in ends} == {"INFO"}


def test_a_helper_that_ignores_its_stdin_is_ended_after_the_grace(cluster, monkeypatch, caplog):
    nodes, state, _ = cluster
    modes(monkeypatch, **{"rig-1": "deaf"})
    caplog.set_level(logging.WARNING, logger="step5.cluster")
    fleet = HelperFleet(nodes("rig-1"), [], stop_grace_s=0.5)
    fleet.start()
    deadline = time.monotonic() + 20
    while not (state / "rig-1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    fleet.stop()
    assert "[rig-1] helper did not stop in time; ending its ssh connection" in caplog.text
    assert states(fleet) == {"rig-1": "stopped"}


def test_no_value_of_the_config_runs_as_code(cluster, tmp_path):
    nodes, state, log = cluster
    pwned = tmp_path / "pwned"
    checkout = tmp_path / f"it's a checkout; $(touch {pwned}) `touch {pwned}`"
    node = nodes("rig-1", script_path=checkout)[0]
    fleet = HelperFleet([node], ["--study-name", f"x'; touch {pwned}; '", "--survivors", "$(id).json"],
                         restart_delay_s=0.05)
    fleet.start()
    deadline = time.monotonic() + 20
    while fleet.records[0].state in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    fleet.stop()
    assert fleet.records[0].state == "done" and not pwned.exists()
    pid, argv = (state / "rig-1").read_text().split(" ", 1)
    assert argv.strip() == f"--study-name x'; touch {pwned}; ' --survivors $(id).json"


def test_without_an_ssh_client_the_fleet_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Step5Error, match="no ssh client on PATH"):
        HelperFleet([ClusterNode("rig-1", None, 8, "RX 6600", "/tmp", "/usr/bin/python3")], [])


def test_a_fleet_stopped_before_it_started_starts_nothing(cluster):
    nodes, state, _ = cluster
    node = nodes("rig-1")[0]
    fleet = HelperFleet([node], [])
    fleet.stop()
    fleet.start()
    for h in fleet._helpers:  # noqa: SLF001 - waiting for the supervisor thread
        h.thread.join(timeout=5)
    assert fleet.records[0].starts == 0 and not (state / "rig-1").exists()

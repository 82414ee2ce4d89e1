"""Helpers on the other hosts of the pipeline's cluster, started and stopped by the main process.

::

    main process (this host)                                       helper hosts
    ────────────────────────                                       ────────────
    HelperFleet.start()  one supervisor thread per host:
      ├─ host A: ssh ... "sh -c 'echo connected && cd .. && exec python ... --search-only'" ─▶ optimizer
      │     stdout ─▶ "connected" marker, then lines logged as "[A] ..."  ◀──────────────────┘
      │     stderr ─▶ every line logged as "[A] ..." (the helper's own log)
      │     exit ─▶ HelperRecord.on_exit(): done | restart after a pause | unreachable | quarantined
      └─ host B: (same)
    HelperFleet.stop()   close every ssh's stdin (the helper stops as on SIGTERM: its running
                         trials are failed and re-run), wait, then terminate / kill the ssh client

* :mod:`step5.cluster.nodes` — the hosts, from ``distributed_config.json``;
* :mod:`step5.cluster.remote` — the ssh command, quoted; what a helper is given;
* :mod:`step5.cluster.supervision` — what an ended helper's host comes to (pure logic).

The fleet never stops the study: an unreachable host is named and skipped, a failing one
is quarantined, and the main process searches on with whoever is left (alone, if need
be). Each host's record is changed only by its supervisor thread; :meth:`stop` sets a flag
and closes pipes, and the threads see their helpers end.

A main process that dies without stopping the fleet (SIGKILL) closes every ssh's stdin as
it goes, so each helper stops too; an ssh connection that dies ends its helper the same way.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence

from step5.cluster.nodes import ClusterNode
from step5.cluster.remote import CONNECTED_MARKER, remote_command, ssh_command
from step5.errors import Step5Error
from step5.cluster.supervision import HelperAction, HelperRecord
from step5.execution.process import describe_exit

logger = logging.getLogger("step5.cluster")

#: How long a stopped helper gets to fail its running trials and close its workers.
STOP_GRACE_S = 30.0


@dataclass
class _Helper:
    node: ClusterNode
    record: HelperRecord
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None  # the ssh client running now, if any
    connected: bool = False


class HelperFleet:
    """``--search-only`` helpers on ``nodes``, each through ``command_for(node)`` (its local
    argv: ssh and the remote command); a context manager that stops them on exit."""

    def __init__(
        self,
        nodes: Sequence[ClusterNode],
        command_for: Callable[[ClusterNode], list[str]],
        *,
        max_failures: int = 3,
        restart_delay_s: float = 5.0,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self._command_for = command_for
        self.stop_grace_s = float(stop_grace_s)
        self._helpers = [_Helper(n, HelperRecord(n.hostname, max_failures, restart_delay_s)) for n in nodes]
        self._lock = threading.Lock()  # guards _stopping against a supervisor about to start ssh
        self._stopping = threading.Event()
        self._stopped = False

    def __enter__(self) -> "HelperFleet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("the main process is done" if exc[0] is None else "the main process stopped")

    @property
    def records(self) -> list[HelperRecord]:
        return [h.record for h in self._helpers]

    def start(self) -> None:
        """Start one supervisor thread per host (each starts its host's helper at once)."""
        for h in self._helpers:
            h.thread = threading.Thread(target=self._supervise, args=(h,), name=f"step5-helper-{h.node.hostname}",
                                        daemon=True)
            h.thread.start()

    # -- one host -----------------------------------------------------------------------

    def _launch(self, h: _Helper) -> subprocess.Popen[bytes] | None:
        """Start the host's ssh (None once the fleet is stopping)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            h.connected = False
            h.record.on_start()
            try:
                # A session of its own: Ctrl-C in the terminal reaches the main process, which
                # then stops the helpers in order instead of every ssh dying at once.
                h.proc = subprocess.Popen(self._command_for(h.node), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                logger.error("[%s] cannot start ssh: %s", h.node.hostname, exc)
                h.proc = None
                return None
            return h.proc

    def _supervise(self, h: _Helper) -> None:
        host = h.node.hostname
        while True:
            proc = self._launch(h)
            if proc is None:
                if h.record.state in ("pending", "running"):
                    h.record.state, h.record.reason = "stopped", "not started: the fleet was stopping"
                return
            logger.info("[%s] helper starting (start %d; %d x %s listed; ssh pid %d)", host, h.record.starts,
                        h.node.gpu_count, h.node.gpu_type or "?", proc.pid)
            readers = [threading.Thread(target=self._read_stdout, args=(h, proc.stdout), daemon=True),
                       threading.Thread(target=self._read_stderr, args=(host, proc.stderr), daemon=True)]
            for r in readers:
                r.start()
            returncode = proc.wait()
            for r in readers:
                r.join(timeout=5.0)
            for stream, reader in zip((proc.stdout, proc.stderr), readers):
                if stream is not None and not reader.is_alive():
                    stream.close()
            action, delay = h.record.on_exit(returncode, connected=h.connected, stopping=self._stopping.is_set())
            self._report(h, action, delay)
            if action is not HelperAction.RESTART:
                return
            if self._stopping.wait(delay):
                h.record.state, h.record.reason = "stopped", "stopped while waiting to restart"
                return

    def _report(self, h: _Helper, action: HelperAction, delay: float) -> None:
        host, record = h.node.hostname, h.record
        if action is HelperAction.RESTART:
            logger.warning("[%s] helper ended with %s (%s); restarting it in %.0fs", host, record.last_exit,
                           record.reason, delay)
        elif action is HelperAction.UNREACHABLE:
            logger.warning("[%s] unreachable: ssh ended with %s before the host answered; skipped for this run "
                           "(the study goes on without it)", host, record.last_exit)
        elif action is HelperAction.QUARANTINED:
            logger.warning("[%s] quarantined: %s (last: %s); the study goes on without it", host, record.reason,
                           record.last_exit)
        else:
            logger.info("[%s] helper finished with %s: %s", host, record.last_exit, record.reason)

    def _read_stdout(self, h: _Helper, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not h.connected and line == CONNECTED_MARKER:
                h.connected = True
                continue
            if line:
                logger.info("[%s] %s", h.node.hostname, line)

    @staticmethod
    def _read_stderr(host: str, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                logger.info("[%s] %s", host, line)

    # -- stopping -----------------------------------------------------------------------

    def stop(self, why: str = "the main process is done") -> None:
        """Stop every helper still running and wait for the supervisors; idempotent.

        Each helper's stdin is closed (it stops as on SIGTERM); after ``stop_grace_s`` its
        ssh client is terminated, then killed.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            running = [h for h in self._helpers if h.proc is not None and h.proc.poll() is None]
        if running:
            logger.info("stopping %d helper(s) (%s): %s", len(running), why,
                        ", ".join(h.node.hostname for h in running))
        for h in running:
            assert h.proc is not None and h.proc.stdin is not None
            try:
                h.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.stop_grace_s
        for h in running:
            assert h.proc is not None
            _end(h.proc, deadline, h.node.hostname)
        for h in self._helpers:
            if h.thread is not None:
                h.thread.join(timeout=10.0)
        logger.info("helpers: %s", "; ".join(f"{r.host} {r.state} ({r.reason}, {r.starts} start(s))"
                                            for r in self.records) or "none")

    def summary(self) -> list[dict[str, Any]]:
        """Each host's record, for logs and tests."""
        return [{"host": r.host, "state": r.state, "reason": r.reason, "starts": r.starts, "failures": r.failures,
                 "exits": list(r.history)} for r in self.records]


def _end(proc: subprocess.Popen[bytes], deadline: float, host: str) -> None:
    """Wait for an ssh client until ``deadline``, then terminate it, then kill it; reaps."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return
    except subprocess.TimeoutExpired:
        logger.warning("[%s] helper did not stop in time; ending its ssh connection", host)
    proc.terminate()
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.error("[%s] ssh client (pid %d) did not die (%s)", host, proc.pid, describe_exit(proc.returncode))


class NoFleet:
    """The null fleet of a run without ``--cluster-config``: nothing to start or stop."""

    records: list[HelperRecord] = []

    def __enter__(self) -> "NoFleet":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def stop(self, why: str = "") -> None:
        return None

    def summary(self) -> list[dict[str, Any]]:
        return []


def helper_fleet(nodes: Sequence[ClusterNode], arguments: Sequence[str], **options: Any) -> HelperFleet:
    """A fleet that runs the optimizer with ``arguments`` on every node, through the ``ssh``
    found on PATH (a :class:`Step5Error` when there is none)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise Step5Error("--cluster-config starts helpers over ssh, but there is no ssh client on PATH")
    return HelperFleet(nodes, lambda node: ssh_command(node, remote_command(node, arguments), ssh=ssh), **options)

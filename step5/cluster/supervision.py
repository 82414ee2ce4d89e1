"""What happens to a helper host after its helper (its ssh command) ends: pure logic, no processes.

::

                      exit 0 (the study is full) ──────────────────────────▶ DONE
                      stopped by the main process ─────────────────────────▶ STOPPED
    start ─▶ RUNNING ─ ssh failed before the host answered, first start ──▶ UNREACHABLE (skipped)
       ▲              ─ exit 64 (usage error: would repeat) ───────────────▶ QUARANTINED
       │              ─ any other end, failures < max ─┐
       └──── after restart_delay_s (x2 each time) ◀────┘
                      ─ any other end, failures == max ────────────────────▶ QUARANTINED

A host that cannot be reached is named and skipped for the run, never waited on (ssh
itself gives up after its ConnectTimeout). A host whose helper keeps failing (crashes,
a killed process, a lost connection, data that does not match the study) is quarantined
after ``max_failures`` ends, with a doubling pause between restarts, so one bad rig costs
the run a few log lines and the other hosts go on. Exit 0 is a helper's normal end: the
study holds ``--trials`` complete trials.

:class:`~step5.cluster.fleet.HelperFleet` asks :meth:`HelperRecord.on_exit` what to do and acts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from step5.errors import UsageError
from step5.execution.process import describe_exit

#: ssh's own exit status for its errors (connection refused or timed out, authentication,
#: host key); also what it returns when the remote command was killed by a signal.
SSH_ERROR = 255


class HelperAction(str, Enum):
    RESTART = "restart"  # start the helper again after `delay_s`
    DONE = "done"  # the helper finished its work (the study is full)
    STOPPED = "stopped"  # the main process stopped it
    UNREACHABLE = "unreachable"  # the host never answered: skipped for this run
    QUARANTINED = "quarantined"  # it kept failing: left alone for this run


@dataclass
class HelperRecord:
    """One helper host across the run; changed only by the thread that supervises it."""

    host: str
    max_failures: int = 3
    restart_delay_s: float = 5.0
    starts: int = 0
    failures: int = 0
    state: str = "pending"  # pending | running | waiting | done | stopped | unreachable | quarantined
    last_exit: str | None = None  # "EXIT(1)", "SIGKILL(-9)", ...
    reason: str = ""  # why it ended the way it did, for the log and the summary
    history: list[str] = field(default_factory=list)  # every end, in order

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"`max_failures` must be >= 1, got {self.max_failures!r}")
        if not self.restart_delay_s >= 0:
            raise ValueError(f"`restart_delay_s` must be >= 0, got {self.restart_delay_s!r}")

    def on_start(self) -> None:
        self.starts += 1
        self.state = "running"

    def on_exit(self, returncode: int | None, *, connected: bool, stopping: bool) -> tuple[HelperAction, float]:
        """The helper's ssh ended with ``returncode``; ``connected``: the remote shell ran;
        ``stopping``: the main process asked it to stop. Returns the action and, for a
        restart, how long to wait first."""
        self.last_exit = describe_exit(returncode)
        self.history.append(self.last_exit)
        if stopping:
            return self._end(HelperAction.STOPPED, "stopped by the main process")
        if returncode == 0:
            return self._end(HelperAction.DONE, "the study is full")
        if returncode == SSH_ERROR and not connected and self.starts == 1:
            return self._end(HelperAction.UNREACHABLE, "ssh could not reach it")
        if returncode == UsageError.exit_code:  # the same command would fail the same way
            return self._end(HelperAction.QUARANTINED, "its helper refused the command line (usage error)")
        self.failures += 1
        if self.failures >= self.max_failures:
            return self._end(HelperAction.QUARANTINED, f"its helper failed {self.failures} time(s)")
        self.state = "waiting"
        self.reason = f"failure {self.failures} of {self.max_failures}"
        return HelperAction.RESTART, self.restart_delay_s * 2 ** (self.failures - 1)

    def _end(self, action: HelperAction, reason: str) -> tuple[HelperAction, float]:
        self.state = action.value
        self.reason = reason
        return action, 0.0

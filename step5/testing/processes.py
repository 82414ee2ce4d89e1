"""Checks for tests that start real processes: is it gone, "signal a CLI once its log says
it is busy", and what a finished command printed or logged."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from step5.owner import pid_alive
from step5.watcher.registry import DEFAULT_DECISION_LOG


def wait_gone(pids: Iterable[int], timeout_s: float = 5.0) -> list[int]:
    """The pids still running after waiting up to ``timeout_s`` for all of them to end."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def signal_after_line(proc: subprocess.Popen[str], marker: str, send: Callable[[], None], *,
                      wait_s: float = 120.0, exit_timeout_s: float = 60.0) -> tuple[str, str, int]:
    """Read ``proc``'s stderr (text mode) until a line holds ``marker`` or ``wait_s`` passes,
    call ``send`` (which signals the process), then read the rest and wait for the exit.

    Returns (stderr up to the marker, stderr after it, exit code). A process still running
    when this returns or raises is killed and reaped, so no test leaves it behind.
    """
    assert proc.stderr is not None, "start the process with stderr=subprocess.PIPE, text=True"
    seen: list[str] = []
    try:
        deadline = time.monotonic() + wait_s
        for line in proc.stderr:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        send()
        rest = proc.stderr.read()
        return "".join(seen), rest, proc.wait(timeout=exit_timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def result_line(proc: Any) -> dict[str, Any]:
    """The one JSON line a finished command (a ``subprocess.CompletedProcess`` with text
    output) printed on stdout, as the WATCHER prints its result; asserts there is exactly one."""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    return json.loads(lines[0])


def watcher_decisions(work: Any) -> list[dict[str, Any]]:
    """Every record of the WATCHER's decision log under ``work`` (its working directory),
    each line parsed strictly (a damaged line fails the test)."""
    path = Path(work) / DEFAULT_DECISION_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

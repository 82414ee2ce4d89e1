"""The decision log: one JSON object per line, appended, never rewritten.

Each judged run of a step adds one line (a RETRY and the re-run's decision are two lines).
Concurrent WATCHERs may share the file: every record is written with a single ``write`` on
an ``O_APPEND`` descriptor while holding an exclusive ``flock`` on it, so lines never
interleave and an earlier line is never touched.
"""
from __future__ import annotations

import fcntl
import os
from collections import deque
from pathlib import Path
from typing import Any

from step5.artifacts import DIAGNOSTICS_DIRNAME
from step5.jsonio import dumps_line, loads

DEFAULT_DECISION_LOG = f"{DIAGNOSTICS_DIRNAME}/watcher_decisions.jsonl"


def append_decision(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = dumps_line(record)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:  # a regular file takes it in one write; loop only for safety
                view = view[os.write(fd, view):]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_decisions(path: str | os.PathLike[str], last: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The last ``last`` records (all when None) and how many lines could not be parsed.

    A damaged line (a disk filled mid-write, a hand edit) is counted, not fatal: ``--status``
    must still show the rest.
    """
    p = Path(path)
    if not p.exists():
        return [], 0
    records: deque[dict[str, Any]] = deque(maxlen=last)
    bad = 0
    with p.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = loads(raw)
            except ValueError:
                bad += 1
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad += 1
    return list(records), bad

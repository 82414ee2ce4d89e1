"""The decision log: one JSON object per judged run of a step, appended, never rewritten
(docs/watcher.md "Decision log"), and the lock both WATCHER files are written under."""
from __future__ import annotations

import fcntl
import os
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from step5.artifacts import DIAGNOSTICS_DIRNAME
from step5.jsonio import dumps_line, loads

DEFAULT_DECISION_LOG = f"{DIAGNOSTICS_DIRNAME}/watcher_decisions.jsonl"


@contextmanager
def flocked(path: Path, flags: int) -> Iterator[int]:
    """``path`` opened (created with its folder if need be) and held under an exclusive ``flock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, flags | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def append_decision(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line: one ``write`` on an ``O_APPEND`` descriptor under the
    lock, so concurrent WATCHERs never interleave lines."""
    with flocked(Path(path), os.O_WRONLY | os.O_APPEND) as fd:
        view = memoryview(dumps_line(record))
        while view:  # a regular file takes it in one write; loop only for safety
            view = view[os.write(fd, view):]


def read_decisions(path: str | os.PathLike[str], last: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The last ``last`` records (all when None) and how many lines could not be parsed: a
    damaged line (a disk filled mid-write, a hand edit) is counted, so ``--status`` still shows the rest."""
    p = Path(path)
    if not p.exists():
        return [], 0
    records: deque[dict[str, Any]] = deque(maxlen=last)
    bad = 0
    with p.open("rb") as fh:
        for raw in filter(bytes.strip, fh):
            try:
                obj = loads(raw)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad += 1
    return list(records), bad

"""The WATCHER's two files under ``diagnostics_outputs/``, both written under ``flock``.

``model_skip_registry.json``: consecutive critical results per model type, in the existing
pipeline's shape (its optimizer reads it, its health check writes it; docs/watcher.md "Skip
registry"). Writers hold a lock on a sibling ``.lock`` file for the whole
read-modify-write and replace the file atomically, so readers need no lock. The optimizer
imports this module: it stays light and torch-free.

``watcher_decisions.jsonl``: one JSON object per judged run of a step, appended, never
rewritten (docs/watcher.md "Decision log").
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections import deque
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from step5.artifacts import DIAGNOSTICS_DIRNAME, REGISTRY_NAME
from step5.errors import DataError
from step5.fsutil import os_error_reason, write_all
from step5.jsonio import dumps_line, loads, read_json_file, write_json_atomic
from step5.policy import DiagnosticsPolicy
from step5.values import is_int, utc_timestamp

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY_PATH = f"{DIAGNOSTICS_DIRNAME}/{REGISTRY_NAME}"
DEFAULT_DECISION_LOG = f"{DIAGNOSTICS_DIRNAME}/watcher_decisions.jsonl"
_COUNT_KEYS = ("consecutive_critical", "total_runs", "total_critical")


@contextmanager
def flocked(path: Path, flags: int, what: str, file: Path | None = None) -> Iterator[int]:
    """``path`` opened (created with its folder if need be) and held under an exclusive ``flock``; a
    filesystem error, opening it or in the block, is a :class:`DataError` naming ``what`` and ``file``
    (the file the user knows: ``path`` unless that is a lock beside it)."""
    shown = path if file is None else file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataError(f"cannot open the {what} {shown}: {os_error_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    except OSError as exc:
        raise DataError(f"cannot write the {what} {shown}: {os_error_reason(exc)}") from None
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def check_writable(decision_log: str | os.PathLike[str], registry: str | os.PathLike[str]) -> None:
    """Open the decision log for appending and take the registry's lock, as the first judged run will: a path
    that cannot be written is an error before a step runs, not after it (its decision would be lost)."""
    with flocked(Path(decision_log), os.O_RDWR | os.O_APPEND, "decision log"):  # as append_decision opens it
        pass
    with flocked(_lock_of(Path(registry)), os.O_RDWR, "skip registry", Path(registry)):
        pass


def _lock_of(registry: Path) -> Path:
    # The lock is on a sibling file: the data file itself is replaced, so it cannot carry it.
    return registry.with_name(registry.name + ".lock")


def _parse_time(text: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def load_skip_registry(path: str | os.PathLike[str] = DEFAULT_REGISTRY_PATH) -> dict[str, Any]:
    """Read the registry; a missing file is an empty registry, a malformed one a
    :class:`DataError` naming the file and the key."""
    p = Path(path)
    if not p.exists():
        return {}
    obj = read_json_file(p, "skip registry")
    where = f"skip registry {p}"
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a JSON object, got {type(obj).__name__}")
    for model_type, entry in obj.items():
        if not isinstance(entry, dict):
            raise DataError(f"{where}: `{model_type}` must be an object, got {type(entry).__name__}")
        for key in _COUNT_KEYS:
            value = entry.get(key, 0)
            if not is_int(value) or value < 0:
                raise DataError(f"{where}: {model_type}.{key} must be a non-negative int, got {value!r}")
        last = entry.get("last_critical")
        if last is not None and _parse_time(last) is None:
            raise DataError(f"{where}: {model_type}.last_critical must be an ISO 8601 time or null, got {last!r}")
    return obj


def skip_until(entry: dict[str, Any], rules: DiagnosticsPolicy) -> datetime | None:
    """When a model type's skip ends, or None when it is not skipped at all. An entry over
    the limit without a ``last_critical`` time is skipped with no end (datetime.max), as is one
    whose end would fall past the year 9999 (a skip_duration_hours meant as "for ever")."""
    if int(entry.get("consecutive_critical", 0)) < rules.max_consecutive_critical:
        return None
    last = _parse_time(entry.get("last_critical"))
    if last is None:
        return datetime.max.replace(tzinfo=timezone.utc)
    try:
        return last + timedelta(hours=rules.skip_duration_hours)
    except OverflowError:  # past what a datetime holds: it would never end anyway
        return datetime.max.replace(tzinfo=timezone.utc)


def skipped_model_types(
    registry: dict[str, Any], rules: DiagnosticsPolicy, now: datetime | None = None
) -> dict[str, str]:
    """Model types skipped now, each with the reason (for logs and the compare summary)."""
    now = now or datetime.now(timezone.utc)
    out: dict[str, str] = {}
    for model_type, entry in registry.items():
        until = skip_until(entry, rules) if isinstance(entry, dict) else None
        if until is not None and now < until:
            ends = f"until {until.isoformat(timespec='seconds')}" if until.year < datetime.max.year else \
                "with no end" + (" (no last_critical time)" if _parse_time(entry.get("last_critical")) is None else "")
            out[model_type] = (
                f"{entry.get('consecutive_critical')} consecutive critical results (max_consecutive_critical "
                f"{rules.max_consecutive_critical}); skipped {ends}; last: {entry.get('last_reason', 'n/a')}"
            )
    return out


def record_result(
    path: str | os.PathLike[str], model_type: str, critical: bool, reason: str, rules: DiagnosticsPolicy,
) -> dict[str, Any]:
    """Record one judged result for ``model_type`` (a critical one extends its run of
    consecutive critical results, any other resets it) and return its updated entry, with
    ``skipped`` (whether compare runs now leave it out) added. Safe under concurrent writers."""
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"`model_type` must be a non-empty string, got {model_type!r}")
    if not isinstance(critical, bool):
        raise ValueError(f"`critical` must be a bool, got {critical!r}")
    p = Path(path)
    with flocked(_lock_of(p), os.O_RDWR, "skip registry", p):
        registry = load_skip_registry(p)
        now = datetime.now(timezone.utc)
        entry = {**dict.fromkeys(_COUNT_KEYS, 0), "last_critical": None, **registry.get(model_type, {})}
        entry["total_runs"] += 1
        if critical:
            entry["consecutive_critical"] += 1
            entry["total_critical"] += 1
            entry["last_critical"] = now.isoformat(timespec="seconds")
        else:
            entry["consecutive_critical"] = 0
        entry["last_result"] = "critical" if critical else "ok"
        entry["last_reason"] = str(reason)
        entry["last_updated"] = utc_timestamp()
        registry[model_type] = entry
        write_json_atomic(p, registry)
    skipped = model_type in skipped_model_types({model_type: entry}, rules, now)
    if skipped:
        logger.warning(
            "model type %s has %d consecutive critical results (max_consecutive_critical %d): compare runs "
            "skip it for %g hours", model_type, entry["consecutive_critical"], rules.max_consecutive_critical,
            rules.skip_duration_hours,
        )
    return {**entry, "skipped": skipped}


def append_decision(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line: one ``write`` on an ``O_APPEND`` descriptor under the
    lock, so concurrent WATCHERs never interleave lines."""
    with flocked(Path(path), os.O_RDWR | os.O_APPEND, "decision log") as fd:
        end = os.fstat(fd).st_size
        line = dumps_line(record)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            # The log ends mid-line (an older writer cut off, a hand edit): the record would be glued to that
            # fragment and both lost to --status. It starts on a line of its own; the fragment stays one bad line.
            line = b"\n" + line
        try:
            write_all(fd, line)  # a regular file takes it in one write, but for a disk filling mid-line
        except OSError:
            # Half a line would swallow the next record appended after it, once the disk has room again.
            with suppress(OSError):
                os.ftruncate(fd, end)
            raise


def read_decisions(path: str | os.PathLike[str], last: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The last ``last`` records (all when None) and how many lines could not be parsed: a
    damaged line (a disk filled mid-write, a hand edit) is counted, so ``--status`` still shows the rest."""
    # a deque holds at most sys.maxsize: a larger --last (OverflowError, a traceback) means them all too
    records: deque[dict[str, Any]] = deque(maxlen=None if last is None or last > sys.maxsize else last)
    bad = 0
    try:
        with open(path, "rb") as fh:
            for raw in filter(bytes.strip, fh):
                try:
                    obj = loads(raw)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    records.append(obj)
                else:
                    bad += 1
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise DataError(f"cannot read the decision log {Path(path)}: {os_error_reason(exc)}") from None
    return list(records), bad

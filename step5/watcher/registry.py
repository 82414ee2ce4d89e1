"""``diagnostics_outputs/model_skip_registry.json``: consecutive critical results per model type.

The file is shared with the existing pipeline, whose optimizer reads it and whose training
health check writes it, so it has that pipeline's shape: one entry per model type, keyed
by the model type itself::

    {"catboost": {"consecutive_critical": 3, "last_critical": "2026-02-18T16:02:58+00:00",
                  "total_runs": 5, "total_critical": 4, "last_result": "critical",
                  "last_reason": "catboost: cv_r2 -0.12 < min_cv_r2 0", "last_updated": "..."},
     "neural_net": {"consecutive_critical": 0, "last_critical": null}}

``consecutive_critical`` and ``last_critical`` are the pipeline's keys; the others are
Step 5's own record (an entry the health check wrote lacks them, which reads as zero).

The rules are the policy's ``training_diagnostics.model_skip_rules``: a model type with
``max_consecutive_critical`` or more critical results in a row is skipped by compare runs
for ``skip_duration_hours`` after its last one; then it is tried again. A non-critical
result resets the count, so running a skipped model on its own (``--model-type X``) and
passing brings it back at once.

Concurrency: several WATCHERs (or a WATCHER and a compare run) may touch the file at once.
Writers hold an exclusive ``fcntl.flock`` on a sibling ``.lock`` file for the whole
read-modify-write, and replace the file atomically (temp file + ``os.replace``), so readers
need no lock and never see half a file.

Standard library plus :mod:`step5.jsonio` / :mod:`step5.errors` only: the optimizer imports
this module and must stay light and torch-free.
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from step5.artifacts import DIAGNOSTICS_DIRNAME, REGISTRY_NAME
from step5.errors import DataError
from step5.jsonio import read_json_file, write_json_atomic
from step5.policy import DiagnosticsPolicy
from step5.values import is_int, utc_timestamp

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY_PATH = f"{DIAGNOSTICS_DIRNAME}/{REGISTRY_NAME}"

_COUNT_KEYS = ("consecutive_critical", "total_runs", "total_critical")


def validate_registry(obj: Any, source: str = "<registry>") -> dict[str, Any]:
    """Check the registry's shape; raises :class:`DataError` naming the file and the key."""
    if not isinstance(obj, dict):
        raise DataError(f"skip registry {source} must be a JSON object, got {type(obj).__name__}")
    for model_type, entry in obj.items():
        if not isinstance(entry, dict):
            raise DataError(
                f"skip registry {source}: `{model_type}` must be an object, got {type(entry).__name__}"
            )
        for key in _COUNT_KEYS:
            value = entry.get(key, 0)
            if not is_int(value) or value < 0:
                raise DataError(
                    f"skip registry {source}: {model_type}.{key} must be a non-negative int, got {value!r}"
                )
        last = entry.get("last_critical")
        if last is not None and _parse_time(last) is None:
            raise DataError(
                f"skip registry {source}: {model_type}.last_critical must be an ISO 8601 time or null, got {last!r}"
            )
    return obj


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def load_skip_registry(path: str | os.PathLike[str] = DEFAULT_REGISTRY_PATH) -> dict[str, Any]:
    """Read the registry; a missing file is an empty registry, a malformed one a :class:`DataError`.

    No lock is taken: writers replace the file atomically, so a reader sees either the old
    or the new content.
    """
    p = Path(path)
    if not p.exists():
        return {}
    return validate_registry(read_json_file(p, "skip registry"), str(p))


def skip_until(entry: dict[str, Any], rules: DiagnosticsPolicy) -> datetime | None:
    """When a model type's skip ends, or None when it is not skipped at all. An entry over
    the limit without a ``last_critical`` time is skipped with no end (datetime.max)."""
    if int(entry.get("consecutive_critical", 0)) < rules.max_consecutive_critical:
        return None
    last = _parse_time(entry.get("last_critical"))
    if last is None:
        return datetime.max.replace(tzinfo=timezone.utc)
    return last + timedelta(hours=rules.skip_duration_hours)


def skipped_model_types(
    registry: dict[str, Any], rules: DiagnosticsPolicy, now: datetime | None = None
) -> dict[str, str]:
    """Model types skipped now, each with the reason (for logs and the compare summary)."""
    now = now or datetime.now(timezone.utc)
    out: dict[str, str] = {}
    for model_type, entry in registry.items():
        if not isinstance(entry, dict):
            continue
        until = skip_until(entry, rules)
        if until is not None and now < until:
            ends = "with no end (no last_critical time)" if until.year == datetime.max.year else \
                f"until {until.isoformat(timespec='seconds')}"
            out[model_type] = (
                f"{entry.get('consecutive_critical')} consecutive critical results (max_consecutive_critical "
                f"{rules.max_consecutive_critical}); skipped {ends}; last: {entry.get('last_reason', 'n/a')}"
            )
    return out


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (the data file itself is replaced, so it
    cannot carry the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def record_result(
    path: str | os.PathLike[str],
    model_type: str,
    critical: bool,
    reason: str,
    rules: DiagnosticsPolicy,
) -> dict[str, Any]:
    """Record one judged result for ``model_type`` and return its updated entry, with
    ``skipped`` (whether compare runs now leave it out) added.

    A critical result extends the model's run of consecutive critical results; any other
    result resets it to zero. Safe under concurrent writers (see the module docstring).
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"`model_type` must be a non-empty string, got {model_type!r}")
    if not isinstance(critical, bool):
        raise ValueError(f"`critical` must be a bool, got {critical!r}")
    p = Path(path)
    with _locked(p):
        registry = load_skip_registry(p)
        now = datetime.now(timezone.utc)
        entry = dict(registry.get(model_type, {}))
        for key in _COUNT_KEYS:
            entry.setdefault(key, 0)
        entry.setdefault("last_critical", None)
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

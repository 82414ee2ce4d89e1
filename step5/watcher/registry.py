"""``diagnostics_outputs/model_skip_registry.json``: consecutive critical results per model type.

The WATCHER records one result per model type per judged step run; Step 5's compare runs
read the registry and leave out every model type whose run of consecutive critical results
is over the policy's ``watcher.max_consecutive_critical``. A non-critical result resets
the count, so running a skipped model on its own (``--model-type X``) and passing brings it
back.

File shape::

    {"schema_version": 1, "updated_at": "2026-02-18T16:02:58Z",
     "models": {"catboost": {"consecutive_critical": 4, "total_runs": 5, "total_critical": 4,
                             "last_result": "critical", "last_reason": "cv_r2 -0.12 < min 0.0",
                             "last_updated": "2026-02-18T16:02:58Z", "skipped": true}}}

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
from pathlib import Path
from typing import Any, Iterator

from step5.errors import DataError
from step5.jsonio import read_json_file, write_json_atomic
from step5.values import is_int, utc_timestamp

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY_PATH = "diagnostics_outputs/model_skip_registry.json"
REGISTRY_SCHEMA_VERSION = 1

_COUNT_KEYS = ("consecutive_critical", "total_runs", "total_critical")


def empty_registry() -> dict[str, Any]:
    """The registry of a project that has never recorded a result."""
    return {"schema_version": REGISTRY_SCHEMA_VERSION, "updated_at": None, "models": {}}


def _check_max(max_consecutive_critical: int) -> None:
    if not is_int(max_consecutive_critical) or max_consecutive_critical < 0:
        raise ValueError(
            f"`max_consecutive_critical` must be a non-negative int, got {max_consecutive_critical!r}"
        )


def validate_registry(obj: Any, source: str = "<registry>") -> dict[str, Any]:
    """Check the registry's shape; raises :class:`DataError` naming the file and the key."""
    if not isinstance(obj, dict):
        raise DataError(f"skip registry {source} must be a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if version != REGISTRY_SCHEMA_VERSION:
        raise DataError(
            f"skip registry {source}: `schema_version` must be {REGISTRY_SCHEMA_VERSION}, got {version!r}"
        )
    models = obj.get("models")
    if not isinstance(models, dict):
        raise DataError(f"skip registry {source}: `models` must be an object, got {type(models).__name__}")
    for model_type, entry in models.items():
        if not isinstance(entry, dict):
            raise DataError(
                f"skip registry {source}: models.{model_type} must be an object, got {type(entry).__name__}"
            )
        for key in _COUNT_KEYS:
            value = entry.get(key, 0)
            if not is_int(value) or value < 0:
                raise DataError(
                    f"skip registry {source}: models.{model_type}.{key} must be a non-negative int, "
                    f"got {value!r}"
                )
    return obj


def load_skip_registry(path: str | os.PathLike[str] = DEFAULT_REGISTRY_PATH) -> dict[str, Any]:
    """Read the registry; a missing file is an empty registry, a malformed one a :class:`DataError`.

    No lock is taken: writers replace the file atomically, so a reader sees either the old
    or the new content.
    """
    p = Path(path)
    if not p.exists():
        return empty_registry()
    return validate_registry(read_json_file(p, "skip registry"), str(p))


def skipped_model_types(registry: dict[str, Any], max_consecutive_critical: int) -> set[str]:
    """Model types whose run of consecutive critical results is over the limit.

    "Over" as SPEC section 9 says: with the default limit 3, the fourth critical result in a
    row gets a model type skipped; with 0, the first one does.
    """
    _check_max(max_consecutive_critical)
    models = registry.get("models", {}) if isinstance(registry, dict) else {}
    return {
        model_type
        for model_type, entry in models.items()
        if isinstance(entry, dict) and int(entry.get("consecutive_critical", 0)) > max_consecutive_critical
    }


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
    max_consecutive_critical: int,
) -> dict[str, Any]:
    """Record one judged result for ``model_type`` and return its updated entry.

    A critical result extends the model's run of consecutive critical results; any other
    result resets it to zero. Safe under concurrent writers (see the module docstring).
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"`model_type` must be a non-empty string, got {model_type!r}")
    if not isinstance(critical, bool):
        raise ValueError(f"`critical` must be a bool, got {critical!r}")
    _check_max(max_consecutive_critical)
    p = Path(path)
    with _locked(p):
        registry = load_skip_registry(p)
        now = utc_timestamp()
        entry = dict(registry["models"].get(model_type, {}))
        for key in _COUNT_KEYS:
            entry.setdefault(key, 0)
        entry["total_runs"] += 1
        if critical:
            entry["consecutive_critical"] += 1
            entry["total_critical"] += 1
        else:
            entry["consecutive_critical"] = 0
        entry["last_result"] = "critical" if critical else "ok"
        entry["last_reason"] = str(reason)
        entry["last_updated"] = now
        entry["skipped"] = entry["consecutive_critical"] > max_consecutive_critical
        registry["models"][model_type] = entry
        registry["updated_at"] = now
        write_json_atomic(p, registry)
    if entry["skipped"]:
        logger.warning(
            "model type %s has %d consecutive critical results (limit %d): compare runs will skip it",
            model_type, entry["consecutive_critical"], max_consecutive_critical,
        )
    return entry

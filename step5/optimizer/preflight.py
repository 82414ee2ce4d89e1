"""Before any data is loaded: can this run write its outputs? (docs/optimizer-internals.md#preflight)"""
from __future__ import annotations

import os
from pathlib import Path

from step5.errors import Step5Error
from step5.fsutil import DIR_MODE, create_temp_file, os_error_reason


def _file_in_the_way(folder: Path) -> Path | None:
    for p in [*reversed(folder.parents), folder]:
        if p.exists() and not p.is_dir():
            return p
        if not p.exists():
            return None
    return None


def check_writable_dir(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it; ``what`` names it in the error."""
    path = Path(folder)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "it is a file, not a folder" if blocker == path else f"{blocker} is a file, not a folder"
        raise Step5Error(f"{what}: {where}")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise Step5Error(f"{what}: cannot create the folder: {os_error_reason(exc)}") from None
    try:
        create_temp_file(path, ".step5-preflight-", "").unlink()
    except OSError as exc:
        raise Step5Error(f"{what}: cannot write files in {path}: {os_error_reason(exc)}") from None
    return path


def sqlite_path(storage_url: str) -> Path | None:
    if not storage_url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # Optuna's own dependency; parses every URL form

    try:
        database = make_url(storage_url).database
    except Exception:  # noqa: BLE001 - a malformed URL is Optuna's to report when it opens it
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def check_sqlite_storage(storage_url: str, what: str) -> None:
    db = sqlite_path(storage_url)
    if db is None:
        return
    folder = db.parent
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise Step5Error(f"{what}: {blocker} is a file, not a folder")
    if not folder.is_dir():
        raise Step5Error(f"{what}: the folder {folder} does not exist")
    if db.exists() and not db.is_file():
        raise Step5Error(f"{what}: {db} is not a file")
    try:
        create_temp_file(folder, ".step5-preflight-", "").unlink()  # SQLite writes its journal here
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as exc:
        raise Step5Error(f"{what}: cannot write the study database {db}: {os_error_reason(exc)}") from None


def preflight(output_dir: Path, storage: str | None, *, output_dir_given: bool) -> None:
    what = f"--output-dir {output_dir}" if output_dir_given else (
        f"the default output dir {output_dir} (choose another with --output-dir)"
    )
    check_writable_dir(output_dir, what)
    if storage is not None:
        check_sqlite_storage(storage, f"--storage {storage}")

"""JSON in and out: orjson for speed (a 200k-record survivors file parses in seconds),
atomic writes so a reader never sees half a file."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from step5.errors import DataError
from step5.fsutil import atomic_output, os_error_reason

#: The largest integer Step 5 writes as JSON (orjson keeps integers to 64 bits): the bound of every integer
#: setting that the study, the sidecar, the decision log or a worker's request carries.
MAX_INT = 2**63 - 1
#: Parse JSON text; raises ``orjson.JSONDecodeError`` (a ``ValueError``) when malformed.
loads = orjson.loads


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, *, indent: bool = False) -> bytes:
    """UTF-8 JSON bytes (numpy scalars/arrays and paths allowed)."""
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(obj, default=_default, option=option)


def dumps_line(obj: Any) -> bytes:
    """One NDJSON frame: compact JSON plus a newline (orjson never emits raw newlines)."""
    return dumps(obj) + b"\n"


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file, turning every failure into a :class:`DataError` naming ``what``."""
    return parse_json_bytes(read_file_bytes(path, what), path, what)


def read_file_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    """A file's bytes; a :class:`DataError` naming ``what`` when it is missing or unreadable."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {p}") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} file {p}: {os_error_reason(exc)}") from None


def parse_json_bytes(raw: bytes, path: str | os.PathLike[str], what: str) -> Any:
    """Parse a file's bytes already read; a :class:`DataError` naming ``what`` and ``path`` when malformed."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{what} file {Path(path)} is not valid JSON: {exc}") from None


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: bool = True) -> Path:
    """Write JSON to ``path`` via a temp file in the same folder and ``os.replace``; a device or pipe
    (``/dev/null``, ``/dev/stdout``, a FIFO) is written into instead: renaming a file over it made
    ``--output /dev/null``, run as root, a regular file for the whole machine."""
    p = Path(path)
    data = dumps(obj, indent=indent) + b"\n"
    try:
        mode = os.stat(p).st_mode
    except OSError:  # not there yet (or unreadable: the atomic write says why)
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        with open(p, "wb") as fh:
            fh.write(data)
        return p
    with atomic_output(p) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return p

"""Atomic file output: a reader sees the old file or the complete new one, never half.

Files get the umask's mode, as with ``open(path, "w")`` (``tempfile.mkstemp`` would give every
output ``0600``): a model directory shared with the group that runs Step 6 must be readable by it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

#: Modes new files and folders are created with before the umask applies (what ``open()`` and ``mkdir`` use).
FILE_MODE, DIR_MODE = 0o666, 0o777
_REASONS = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    errno.EROFS: "the filesystem is read-only",
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "no space left on the device",
    errno.EFBIG: "file too large (a file size limit)",
}


def os_error_reason(exc: OSError) -> str:
    """Why a filesystem call failed, in words a user acts on."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc)


def file_in_the_way(folder: Path) -> Path | None:
    """``folder`` or the first of its ancestors that exists but is not a folder (making the folders
    would say only "File exists" or "Not a directory")."""
    return next((p for p in [*reversed(folder.parents), folder] if p.exists() and not p.is_dir()), None)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``: a write a filling disk cuts short is followed by one that raises
    the OSError saying why, not taken for the whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file with a random name in ``folder``, with the umask's mode."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"could not create a temporary file in {folder}")  # pragma: no cover


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename / link / unlink inside ``folder`` durable (best effort where unsupported)."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` (``os.replace``), on any
    exception it is removed and ``path`` is left as it was. ``keep_suffix`` ends the temp name
    with ``path``'s suffix, for writers (xgboost) that pick their format from the file extension."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + (target.suffix if keep_suffix else "")
    tmp = create_temp_file(target.parent, f".{target.name}.", suffix)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

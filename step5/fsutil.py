"""Atomic file output: a reader sees the old file or the complete new one, never half."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` (``os.replace``),
    on any exception it is removed and ``path`` is left as it was.

    ``keep_suffix`` ends the temp name with ``path``'s suffix, for writers (xgboost) that
    pick their format from the file extension.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + (target.suffix if keep_suffix else "")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

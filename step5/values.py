"""Value helpers every side (parent, worker, WATCHER) shares: type checks for decoded JSON
(``true`` is never a count or a number, though ``bool`` is an ``int`` in Python) and the UTC
timestamps Step 5 writes into its files."""
from __future__ import annotations

import math
import sys
from datetime import datetime, timezone
from typing import Any


def is_int(v: Any) -> bool:
    """Whether ``v`` is a JSON integer (an ``int``, not a ``bool``)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """Whether ``v`` is a finite JSON number that fits a float64 (``int`` or ``float``, not a ``bool``,
    not NaN/inf; an int beyond float64, which JSON allows, is no number anything here can use)."""
    if isinstance(v, float):
        return math.isfinite(v)
    return is_int(v) and abs(v) <= sys.float_info.max


def finite_or_none(v: Any) -> float | None:
    """``v`` as a float when it is a finite number, else None (absent, null, NaN, text)."""
    return float(v) if is_number(v) else None


def utc_timestamp(*, milliseconds: bool = False) -> str:
    """Now in UTC as ISO 8601 with a ``Z``: ``2026-01-31T12:00:00Z`` (or ``...:00.123Z``)."""
    now = datetime.now(timezone.utc)
    if milliseconds:
        return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")

"""Load ``train_history.json`` (the ``--lottery-data`` file) as a list of draws.

Step 5 uses the history only for the data fingerprint (how long the training window was),
so the loader's job is to accept the two shapes the pipeline writes and to reject
anything else loudly:

* a JSON array of integers: ``[978, 123, 456]``;
* a JSON array of objects with an integer ``draw``:
  ``[{"date": "2025-09-07", "session": "midday", "draw": 978}, ...]`` (other keys ignored).

The first element decides the shape; a file mixing the two is an error naming the first
element that does not match. Bools and floats (even ``978.0``) are not draws. Any int is
accepted: the valid range depends on the game (``mod``), which this file does not carry.
"""
from __future__ import annotations

import os
from typing import Any

from step5.errors import DataError
from step5.jsonio import read_json_file


def _describe(v: Any) -> str:
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(v).__name__})"


def draws_from_data(data: Any, *, source: str = "<history>") -> list[int]:
    """Validate already-parsed history data and return its draws in file order."""
    if not isinstance(data, list):
        raise DataError(f"history file {source}: expected a JSON array of draws, got {type(data).__name__}")
    if not data:
        raise DataError(f"history file {source}: the array is empty, there are no draws")
    objects = isinstance(data[0], dict)
    draws: list[int] = []
    for i, item in enumerate(data):
        if objects:
            if not isinstance(item, dict):
                raise DataError(
                    f"history file {source}: element {i} must be an object with a `draw` key like element 0, "
                    f"got {_describe(item)}"
                )
            if "draw" not in item:
                raise DataError(f"history file {source}: element {i} has no `draw` key")
            value = item["draw"]
            where = f"element {i}: `draw`"
        else:
            value = item
            where = f"element {i}"
        if type(value) is not int:
            expected = "an integer" if objects else "an integer (or, in every element, an object with a `draw` key)"
            raise DataError(f"history file {source}: {where} must be {expected}, got {_describe(value)}")
        draws.append(value)
    return draws


def load_history(path: str | os.PathLike[str]) -> list[int]:
    """Read the draw history; raises :class:`DataError` naming the file and element index."""
    data = read_json_file(path, "history")
    return draws_from_data(data, source=os.fspath(path))

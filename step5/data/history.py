"""Load ``train_history.json`` (``--lottery-data``) as a list of draws: ``[978, 123]`` or
``[{"draw": 978, ...}, ...]``, the first element deciding the shape; anything else is a
:class:`DataError` naming the element (docs/data.md)."""
from __future__ import annotations

import os
from typing import Any

from step5.data.survivors import describe_value
from step5.errors import DataError
from step5.jsonio import read_json_file


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def draws_from_data(data: Any, *, source: str = "<history>") -> list[int]:
    """Validate already-parsed history data and return its draws in file order."""
    if not isinstance(data, list):
        raise DataError(f"history file {source}: expected a JSON array of draws, got {type(data).__name__}")
    if not data:
        raise DataError(f"history file {source}: the array is empty, there are no draws")
    objects = isinstance(data[0], dict)
    draws: list[int] = []
    for i, item in enumerate(data):
        value, where = item, f"element {i}"
        if objects:
            if not isinstance(item, dict):
                raise DataError(
                    f"history file {source}: element {i} must be an object with a `draw` key like element 0, "
                    f"got {describe_value(item)}"
                )
            if "draw" not in item:
                raise DataError(f"history file {source}: element {i} has no `draw` key")
            value, where = item["draw"], f"element {i}: `draw`"
        if type(value) is not int:
            expected = "an integer" if objects else "an integer (or, in every element, an object with a `draw` key)"
            raise DataError(f"history file {source}: {where} must be {expected}, got {describe_value(value)}")
        if not _INT64_MIN <= value <= _INT64_MAX:  # the data fingerprint hashes the draws as int64
            raise DataError(f"history file {source}: {where} must be an integer that fits in 64 bits (signed), "
                            f"got {describe_value(value)}")
        draws.append(value)
    return draws


def load_history(path: str | os.PathLike[str]) -> list[int]:
    """Read the draw history; raises :class:`DataError` naming the file and element index."""
    return draws_from_data(read_json_file(path, "history"), source=os.fspath(path))

"""Load ``train_history.json`` (``--lottery-data``) as a list of draws: ``[978, 123]`` or
``[{"draw": 978, ...}, ...]``, the first element deciding the shape; anything else is a
:class:`DataError` naming the element (docs/data.md)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from step5.data.survivors import describe_value
from step5.errors import DataError
from step5.jsonio import read_file_bytes


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


def _read_json(path: str | os.PathLike[str]) -> Any:
    """The history file parsed by the standard library, not orjson: orjson reads an integer beyond
    64 bits as a float (`2**64` was "must be an integer, got 1.8446744073709552e+19 (float)") and
    refuses the `NaN` tokens that Python's json.dump writes in keys this reader ignores. The file
    is small (a few thousand draws), so speed does not matter here."""
    p = Path(path)
    raw = read_file_bytes(p, "history")
    try:
        text = raw.decode("utf-8")  # a byte-order mark stays, and json refuses it, as for survivors
    except UnicodeDecodeError as exc:
        raise DataError(f"history file {p} is not valid JSON: invalid UTF-8 byte 0x{raw[exc.start]:02x} "
                        f"(byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"history file {p} is not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"history file {p} is not valid JSON: nested too deeply") from None
    except ValueError:  # an int of more digits than Python converts
        raise DataError(f"history file {p} is not valid JSON: it holds an integer of more than "
                        f"{sys.get_int_max_str_digits()} digits, which Python's json does not read") from None


def load_history(path: str | os.PathLike[str]) -> list[int]:
    """Read the draw history; raises :class:`DataError` naming the file and element index."""
    return draws_from_data(_read_json(path), source=os.fspath(path))

"""History loader: both accepted shapes, and every malformed file names its element."""
from __future__ import annotations

import orjson
import pytest

from step5.data.history import draws_from_data, load_history
from step5.errors import DataError


def write(tmp_path, payload):
    p = tmp_path / "train_history.json"
    p.write_bytes(payload if isinstance(payload, bytes) else orjson.dumps(payload))
    return p


def test_array_of_ints(tmp_path):
    assert load_history(write(tmp_path, [978, 123, 456, 0])) == [978, 123, 456, 0]


def test_array_of_objects_keeps_order_and_ignores_other_keys(tmp_path):
    data = [
        {"date": "2025-09-07", "session": "midday", "draw": 978},
        {"date": "2025-09-07", "session": "evening", "draw": 12, "extra": [1]},
    ]
    assert load_history(write(tmp_path, data)) == [978, 12]


BAD = [
    ("not_json", b"[1, 2", ["not valid JSON"]),
    ("not_array", {"draw": 1}, ["expected a JSON array", "dict"]),
    ("empty", [], ["empty"]),
    ("bool", [1, True], ["element 1", "bool"]),
    ("float", [1, 2, 978.0], ["element 2", "float"]),
    ("string", ["978"], ["element 0", "str"]),
    ("null", [1, None], ["element 1", "None"]),
    ("missing_draw", [{"draw": 1}, {"date": "2025-01-01"}], ["element 1", "no `draw` key"]),
    ("float_draw", [{"draw": 1}, {"draw": 2.5}], ["element 1", "`draw`", "float"]),
    ("bool_draw", [{"draw": False}], ["element 0", "`draw`", "bool"]),
    ("mixed_object_then_int", [{"draw": 1}, 5], ["element 1", "object with a `draw` key"]),
    # orjson reads ints up to 2**64 - 1; the fingerprint's int64 could not hold them (was an OverflowError traceback)
    ("beyond_int64", b"[1, 18446744073709551615]", ["element 1", "fits in 64 bits", "18446744073709551615"]),
    ("beyond_int64_draw", b'[{"draw": 9223372036854775808}]', ["element 0: `draw`", "fits in 64 bits"]),
    ("mixed_int_then_object", [5, {"draw": 1}], ["element 1", "dict"]),
    # orjson read ints beyond 2**64 as floats: "must be an integer, got 1.8446744073709552e+19 (float)"
    ("beyond_uint64", b"[1, 18446744073709551616]", ["element 1", "fits in 64 bits", "18446744073709551616 (int)"]),
    ("below_int64", b"[1, -9223372036854775809]", ["element 1", "fits in 64 bits", "-9223372036854775809 (int)"]),
    ("nan_draw", b'[{"draw": 1}, {"draw": NaN}]', ["element 1: `draw`", "nan (float)"]),
    # Python's json refuses such an int with a bare ValueError
    ("int_of_5000_digits", b"[1, 1" + b"0" * 5000 + b"]", ["not valid JSON", "more than 4300 digits"]),
    ("bom", b"\xef\xbb\xbf[1, 2]", ["not valid JSON", "BOM"]),
    ("not_utf8", b'[{"draw": 1, "note": "\xe9"}]', ["not valid JSON", "invalid UTF-8 byte 0xe9"]),
    ("too_deep", b"[1, " + b"[" * 100000 + b"]" * 100000 + b"]", ["not valid JSON", "nested too deeply"]),
]


@pytest.mark.parametrize("payload,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_history_names_file_and_index(tmp_path, payload, expected):
    path = write(tmp_path, payload)
    with pytest.raises(DataError) as info:
        load_history(path)
    msg = str(info.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_tokens_python_json_writes_are_read_in_keys_that_are_ignored(tmp_path):
    """The pipeline writes its files with Python's json.dump, which writes NaN for a missing float and
    `\\ud800` for a lone surrogate; orjson refused the whole file as "not valid JSON" for them."""
    payload = b'[{"draw": 978, "jackpot": NaN, "note": "\\ud800"}, {"draw": 12, "jackpot": -Infinity}]'
    assert load_history(write(tmp_path, payload)) == [978, 12]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="history file not found"):
        load_history(tmp_path / "absent.json")


def test_a_folder_given_as_the_file_is_named_in_words(tmp_path):
    with pytest.raises(DataError) as info:
        load_history(tmp_path)
    assert str(info.value) == f"cannot read history file {tmp_path}: Is a directory"


def test_parsed_data_uses_source_name():
    with pytest.raises(DataError, match=r"history file <h>: element 0"):
        draws_from_data([1.5], source="<h>")


def test_int64_bounds_are_accepted_and_fingerprinted(tmp_path):
    from step5.artifacts import data_fingerprint
    import numpy as np

    draws = load_history(write(tmp_path, b"[-9223372036854775808, 9223372036854775807, 0]"))
    assert draws == [-(2**63), 2**63 - 1, 0]
    data_fingerprint(np.zeros((1, 1)), np.zeros(1), ["f"], draws, target="t")


def test_generated_history_loads(sample_inputs):
    _, history_path = sample_inputs
    draws = load_history(history_path)
    assert len(draws) == 500
    assert all(0 <= d < 1000 for d in draws)

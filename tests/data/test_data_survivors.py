"""Survivors loader: shapes it accepts, every malformed input it must name, fills, leakage."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from step5.data import survivors
from step5.data.survivors import LEAKAGE_COLUMNS, features_from_records, load_features, load_survivors
from step5.errors import DataError


def table_from_records(records, target: str = survivors.DEFAULT_TARGET, *, source: str = "<records>"):
    """The exact path on records already parsed: what load_survivors does with a piece that
    does not decode (the oracle the piece-by-piece reading is compared with)."""
    builder = survivors._TableBuilder(target, source)
    builder.add_records(survivors.records_list(records, source), 0)
    return builder.finish()


def rec(features: dict, **top) -> dict:
    out = {"seed": 1, "score": 0.5, "features": features, "metadata": {"prng_type": "java_lcg", "mod": 1000}}
    out.update(top)
    return out


def good(i: int = 0, **extra) -> dict:
    feats = {"score": 0.5, "confidence": 0.1, "b_feat": 1.0 + i, "a_feat": 2.0 * i}
    feats.update(extra)
    return rec(feats, holdout_hits=0.001, holdout_quality=0.1 * i)


def write(tmp_path: Path, payload, name: str = "survivors.json") -> Path:
    p = tmp_path / name
    p.write_bytes(payload if isinstance(payload, bytes) else orjson.dumps(payload))
    return p


def test_loads_matrix_target_and_schema(tmp_path):
    path = write(tmp_path, [good(0), good(1), good(2)])
    t = load_survivors(path)
    assert t.feature_names == ["a_feat", "b_feat"]  # sorted, leakage removed
    assert t.excluded_features == ["confidence", "score"]  # only leakage keys actually present
    assert t.X.dtype == np.float32 and t.X.shape == (3, 2)
    assert t.y.dtype == np.float64
    np.testing.assert_allclose(t.X, [[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]])
    np.testing.assert_allclose(t.y, [0.0, 0.1, 0.2])
    assert t.n_records == 3 and t.n_features == 2
    assert t.missing_fills == 0
    assert t.source_file == str(path)
    assert t.target == "holdout_quality"
    assert (t.prng_type, t.mod) == ("java_lcg", 1000)


def test_leakage_never_becomes_a_feature(tmp_path):
    feats = {k: 0.3 for k in LEAKAGE_COLUMNS} | {"x": 1.0}
    path = write(tmp_path, [rec(feats), rec(dict(feats, x=2.0))])
    t = load_survivors(path)
    assert t.feature_names == ["x"]
    assert t.excluded_features == sorted(LEAKAGE_COLUMNS)


def test_key_order_does_not_matter_and_ints_are_numbers(tmp_path):
    r0 = rec({"b": 1, "a": 2.5}, holdout_quality=0.1)
    r1 = rec({"a": 7, "b": -3.25}, holdout_quality=1)
    t = load_survivors(write(tmp_path, [r0, r1]))
    np.testing.assert_allclose(t.X, [[2.5, 1.0], [7.0, -3.25]])
    np.testing.assert_allclose(t.y, [0.1, 1.0])


def test_missing_keys_filled_with_zero_and_counted(tmp_path, caplog):
    r0 = rec({"a": 1.0, "b": 2.0, "c": 3.0}, holdout_quality=0.1)
    r1 = rec({"a": 4.0}, holdout_quality=0.2)  # lacks b and c
    r2 = rec({"c": 5.0, "d": 6.0}, holdout_quality=0.3)  # lacks a and b; d only here
    with caplog.at_level(logging.WARNING, logger="step5.data.survivors"):
        t = load_survivors(write(tmp_path, [r0, r1, r2]))
    assert t.feature_names == ["a", "b", "c", "d"]  # union of keys over all records
    np.testing.assert_array_equal(t.X, [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 5, 6]])
    assert t.missing_fills == 1 + 3 + 2
    assert any("filled 6 value(s) with 0.0" in r.getMessage() for r in caplog.records)


def test_target_from_features_wins_over_top_level(tmp_path):
    r0 = rec({"x": 1.0, "holdout_quality": 0.9}, holdout_quality=0.1)
    r1 = rec({"x": 2.0}, holdout_quality=0.2)  # only top level
    t = load_survivors(write(tmp_path, [r0, r1]))
    np.testing.assert_allclose(t.y, [0.9, 0.2])


def test_custom_target_is_excluded_from_features(tmp_path):
    r0 = rec({"x": 1.0, "lane": 0.4}, holdout_quality=0.1)
    r1 = rec({"x": 2.0, "lane": 0.6}, holdout_quality=0.2)
    t = load_survivors(write(tmp_path, [r0, r1]), target="lane")
    np.testing.assert_allclose(t.y, [0.4, 0.6])
    assert t.feature_names == ["x"]
    assert "lane" in t.excluded_features
    assert t.target == "lane"


def test_custom_top_level_target(tmp_path):
    t = load_survivors(write(tmp_path, [good(1), good(2)]), target="holdout_hits")
    np.testing.assert_allclose(t.y, [0.001, 0.001])


def test_metadata_most_common_and_absent(tmp_path):
    recs = [good(i) for i in range(3)]
    recs[0]["metadata"] = {"prng_type": "xorshift32", "mod": 100}
    del recs[2]["metadata"]
    t = load_survivors(write(tmp_path, recs))
    assert t.prng_type_counts == {"xorshift32": 1, "java_lcg": 1}
    assert t.prng_type == "java_lcg"  # tie broken by the smallest value, independent of order
    assert t.mod == 100
    bare = [{"features": {"x": 1.0}, "holdout_quality": 0.5}]
    t2 = load_survivors(write(tmp_path, bare, "bare.json"))
    assert (t2.prng_type, t2.mod) == (None, None)


def test_single_feature_column(tmp_path):
    t = load_survivors(write(tmp_path, [rec({"only": 3.0}, holdout_quality=0.5)]))
    assert t.X.shape == (1, 1) and t.X[0, 0] == 3.0


BAD_INPUTS = [
    # (id, payload, substrings the message must contain)
    ("not_json", b"[{", ["not valid JSON"]),
    ("not_array", {"features": {}}, ["expected a JSON array", "dict"]),
    ("empty_array", [], ["empty"]),
    ("record_not_object", [good(0), 5], ["record 1", "must be a JSON object", "int"]),
    ("no_features", [good(0), {"holdout_quality": 0.1}], ["record 1", "`features`"]),
    ("features_not_object", [good(0), rec([1, 2], holdout_quality=0.1)], ["record 1", "`features`", "list"]),
    ("string_value", [good(0), good(1, a_feat="1.5")], ["record 1", "'a_feat'", "'1.5'", "str"]),
    ("bool_value", [good(0), good(1, b_feat=True)], ["record 1", "'b_feat'", "bool"]),
    ("null_value", [good(0), good(1), good(2, a_feat=None)], ["record 2", "'a_feat'", "None"]),
    ("list_value", [good(0, b_feat=[1.0])], ["record 0", "'b_feat'", "list"]),
    ("object_value", [good(0), good(1, b_feat={"v": 1})], ["record 1", "'b_feat'", "dict"]),
    # 1e999 reads as infinity (as Python's json reads it): a non-finite value, named like any bad value
    ("infinite_value", b'[{"features": {"x": 1e999}, "holdout_quality": 0.1}]', ["record 0", "'x'", "inf (float)"]),
    ("float32_overflow", [good(0), good(1, a_feat=1e300)], ["record 1", "'a_feat'", "float32"]),
    ("missing_target", [good(0), rec({"x": 1.0})], ["record 1", "'holdout_quality'", "no target"]),
    ("string_target", [good(0), rec({"x": 1.0}, holdout_quality="high")], ["record 1", "'holdout_quality'", "str"]),
    ("null_target", [rec({"x": 1.0}, holdout_quality=None)], ["record 0", "'holdout_quality'", "None"]),
    ("bool_target", [rec({"x": 1.0}, holdout_quality=False)], ["record 0", "'holdout_quality'", "bool"]),
    ("nan_literal", b'[{"seed": 7, "features": {"x": NaN}, "holdout_quality": 0.1}]', ["record 0", "'x'", "nan", "seed 7"]),
    ("syntax_error", b'[{"features": {"x": 1.0}, "holdout_quality": 0.1},\n {"features": {"x": 2.0}} x]',
     ["not valid JSON", "line 2 column 27"]),
    ("only_leakage", [rec({"score": 0.1, "confidence": 0.2}, holdout_quality=0.1)], ["no feature columns"]),
]


@pytest.mark.parametrize("payload,expected", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_record_and_key(tmp_path, payload, expected):
    path = write(tmp_path, payload)
    with pytest.raises(DataError) as info:
        load_survivors(path)
    msg = str(info.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_a_pipe_that_holds_no_array_is_read_once(tmp_path):
    """A top-level value that is not an array was parsed for its message by opening the path again:
    from a pipe (`--survivors <(...)`, /dev/stdin) that gave "not valid JSON: Input is a zero-length,
    empty document", and from a FIFO whose writer had gone it blocked forever."""
    import os
    import threading

    fifo = tmp_path / "survivors.json"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as fh:
            fh.write(b'  {"x": 1}')

    errors = []

    def read():
        try:
            load_survivors(fifo)
        except DataError as exc:
            errors.append(str(exc))

    threading.Thread(target=write, daemon=True).start()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # it opened the FIFO again and waits for a writer: give it one, so it ends
        with open(fifo, "wb"):
            pass
        reader.join(5)
    assert errors == [f"survivors file {fifo}: expected a JSON array of records, got dict"]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_survivors(tmp_path / "nope.json")


def test_a_folder_given_as_the_file_is_named_in_words(tmp_path):
    # was "cannot read survivors file X: [Errno 21] Is a directory: 'X'"
    with pytest.raises(DataError) as info:
        load_survivors(tmp_path)
    assert str(info.value) == f"cannot read survivors file {tmp_path}: Is a directory"


def test_first_bad_value_in_file_order_is_reported(tmp_path):
    recs = [good(i) for i in range(50)]
    recs[17]["features"]["b_feat"] = "x"
    recs[40]["features"]["a_feat"] = None
    with pytest.raises(DataError, match=r"record 17: feature 'b_feat'"):
        load_survivors(write(tmp_path, recs))


@pytest.mark.parametrize("block_size", [64, 1 << 20])  # a record a piece; the whole file one batch
def test_first_bad_record_in_file_order_whatever_the_kind_of_problem(tmp_path, monkeypatch, block_size):
    """A batch checked shapes and targets before values: a later record's missing target was
    reported before an earlier record's bad feature, and which one depended on the piece size."""
    from step5.data import arrayreader

    monkeypatch.setattr(arrayreader, "DEFAULT_BLOCK_SIZE", block_size)
    recs = [good(i) for i in range(50)]
    recs[5]["features"]["b_feat"] = "x"
    del recs[10]["holdout_quality"]
    recs[12]["holdout_quality"] = None
    recs[20]["features"] = None
    path = write(tmp_path, recs)
    with pytest.raises(DataError, match=r"record 5: feature 'b_feat'"):
        load_survivors(path)
    with pytest.raises(DataError, match=r"record 5: feature 'b_feat'"):
        load_features(path, ["a_feat", "b_feat"])
    recs[5]["features"]["b_feat"] = 1.0
    recs[7]["features"] = {"a_feat": "y", "b_feat": None, "score": 0.5}  # first seen: b_feat, then a_feat
    path = write(tmp_path, recs)
    with pytest.raises(DataError, match=r"record 7: feature 'a_feat'"):
        load_survivors(path)
    recs[7] = good(7)
    path = write(tmp_path, recs)
    with pytest.raises(DataError, match=r"record 10 has no target"):
        load_survivors(path)
    with pytest.raises(DataError, match=r"record 20: `features` must be a JSON object"):
        load_features(path, ["a_feat", "b_feat"])


def test_bad_value_in_a_filled_record_is_still_found(tmp_path):
    recs = [good(0), rec({"a_feat": "bad"}, holdout_quality=0.1)]  # lacks b_feat and is bad
    with pytest.raises(DataError, match=r"record 1: feature 'a_feat'"):
        load_survivors(write(tmp_path, recs))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_parsed_records(bad):
    """Records built in memory (not parsed by orjson) can carry NaN/inf: both are named."""
    with pytest.raises(DataError, match=r"record 1: feature 'x' must be a finite number"):
        table_from_records([{"features": {"x": 1.0}, "t": 0.0}, {"features": {"x": bad}, "t": 0.0}], "t")
    with pytest.raises(DataError, match=r"record 0: target 't' must be a finite number"):
        table_from_records([{"features": {"x": 1.0}, "t": bad}], "t")
    with pytest.raises(DataError, match=r"record 0: feature 'x'"):
        _ = features_from_records([{"features": {"x": bad}}], ["x"]).X


def test_int_beyond_float64_is_named():
    with pytest.raises(DataError, match=r"record 0: feature 'x' must be a finite number"):
        table_from_records([{"features": {"x": 10**400}, "t": 0.0}], "t")
    with pytest.raises(DataError, match=r"record 0: target 't' must be a finite number"):
        table_from_records([{"features": {"x": 1}, "t": -(10**400)}], "t")


def test_in_memory_records_use_the_given_source_name():
    with pytest.raises(DataError, match=r"survivors file <mine>: record 0"):
        table_from_records([{"features": {"x": "s"}, "holdout_quality": 1.0}], source="<mine>")
    with pytest.raises(ValueError, match="`target`"):
        table_from_records([good(0)], target="")


def test_feature_matrix_for_prediction(tmp_path, caplog):
    recs = [
        {"features": {"b": 1.0, "a": 2.0, "unknown": 9.0}},  # no target needed, unknown ignored
        {"features": {"a": 3}},  # b missing -> 0.0
    ]
    path = write(tmp_path, recs)
    with caplog.at_level(logging.WARNING, logger="step5.data.survivors"):
        X = load_features(path, ["b", "a"]).X  # caller's order, not sorted
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X, [[1.0, 2.0], [0.0, 3.0]])
    assert any("filled 1 value(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "records,expected",
    [
        ([{"features": {"a": "x"}}], ["record 0", "'a'", "str"]),
        ([{"features": {"a": 1.0}}, {"nofeatures": 1}], ["record 1", "`features`"]),
        ({"a": 1}, ["expected a JSON array"]),
        ([], ["empty"]),
    ],
    ids=["bad_value", "no_features", "not_array", "empty"],
)
def test_feature_matrix_bad_input(tmp_path, records, expected):
    path = write(tmp_path, records)
    with pytest.raises(DataError) as info:
        _ = load_features(path, ["a"]).X
    assert str(path) in str(info.value)
    for part in expected:
        assert part in str(info.value)


@pytest.mark.parametrize("names", [[], ["a", "a"], ["a", 3]])
def test_feature_matrix_rejects_bad_schema(names):
    with pytest.raises(ValueError, match="`feature_names`"):
        _ = features_from_records([{"features": {"a": 1.0}}], names).X


def test_loads_generated_sample_with_its_fills(sample_inputs):
    survivors_path, _ = sample_inputs
    t = load_survivors(survivors_path)
    assert t.n_records == 600 and t.n_features == 24
    assert t.missing_fills == 3  # the generator drops one key in 1 record of 200
    assert t.excluded_features == ["confidence", "score"]
    assert not set(t.feature_names) & set(LEAKAGE_COLUMNS)
    assert t.feature_names == sorted(t.feature_names)
    X = load_features(survivors_path, t.feature_names).X
    np.testing.assert_array_equal(X, t.X)


# -- reading the file piece by piece --------------------------------------------------------


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of ~2 KB, so a few hundred records span many pieces."""
    from step5.data import arrayreader

    monkeypatch.setattr(arrayreader, "DEFAULT_BLOCK_SIZE", 2048)


def test_a_first_record_of_leakage_keys_only_is_a_data_error_read_in_pieces(tmp_path, small_pieces):
    recs = [rec({"score": 0.1 * i}, holdout_quality=0.1) for i in range(100)]  # the decoder reads no column
    with pytest.raises(DataError, match="no feature columns"):
        load_survivors(write(tmp_path, recs))


def write_json(tmp_path: Path, records, *, indent=2, name: str = "survivors.json") -> Path:
    """Written as the upstream pipeline does: Python's json.dump (NaN/Infinity tokens allowed)."""
    import json

    p = tmp_path / name
    with open(p, "w") as fh:
        json.dump(records, fh, indent=indent)
    return p


def varied_records(n: int = 400) -> list[dict]:
    """Records that exercise every path: key order varies, keys go missing, a key first
    appears late, ints, metadata of odd shapes, a NaN in an unused (leakage) key."""
    recs = []
    for i in range(n):
        feats = {"score": 0.1 * i, "confidence": 0.5, "b_feat": 1.0 + i, "a_feat": 2 * i, "c_feat": -0.25 * i}
        if i % 7 == 3:
            feats = dict(reversed(list(feats.items())))
        if i % 11 == 5:
            del feats["c_feat"]
        if i >= 300:
            feats["late_feat"] = float(i)  # a column no earlier record has
        recs.append(rec(feats, seed=1000 + i, holdout_hits=0.001, holdout_quality=0.01 * (i % 50)))
    recs[123]["metadata"] = ["not", "an", "object"]  # ignored
    recs[124]["metadata"] = {"prng_type": 5, "mod": 1000.0}  # not a str / not an int: ignored
    del recs[125]["metadata"]
    recs[200]["features"]["score"] = float("nan")  # leakage: never read, so no error
    recs[201]["holdout_hits"] = float("inf")  # not the target: ignored
    return recs


def assert_same_table(a, b):
    for name in ("feature_names", "excluded_features", "missing_fills", "n_records", "target", "prng_type", "mod",
                 "prng_type_counts", "mod_counts", "missing_by_feature"):
        assert getattr(a, name) == getattr(b, name), name
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.X.dtype == np.float32 and a.y.dtype == np.float64


@pytest.mark.parametrize("indent", [2, None])
def test_file_read_in_pieces_equals_records_read_whole(tmp_path, small_pieces, indent):
    recs = varied_records()
    path = write_json(tmp_path, recs, indent=indent)
    t = load_survivors(path)
    assert_same_table(t, table_from_records(recs, source=str(path)))
    assert t.feature_names == ["a_feat", "b_feat", "c_feat", "late_feat"]
    assert t.missing_by_feature == {"c_feat": 36, "late_feat": 300}
    assert t.mod_counts == {1000: 397}


def test_predictor_reader_in_pieces_equals_records_read_whole(tmp_path, small_pieces, caplog):
    recs = varied_records()
    path = write_json(tmp_path, recs)
    names = ["late_feat", "a_feat", "absent_feat"]  # the model's order; one key no record has
    with caplog.at_level(logging.WARNING, logger="step5.data.survivors"):
        got = load_features(path, names)
    np.testing.assert_array_equal(got.X, features_from_records(recs, names).X)
    assert got.seeds == [r["seed"] for r in recs]
    assert got.feature_names == names and got.n_records == len(recs)
    assert got.missing_by_feature == {"late_feat": 300, "absent_feat": 400}
    assert got.missing_fills == 700
    assert any("filled 700 value(s)" in r.getMessage() for r in caplog.records)


def test_clean_file_is_decoded_in_pieces_not_record_by_record(tmp_path, small_pieces, monkeypatch):
    """Only the first record (it fixes the columns) takes the exact, per-record path."""
    from step5.data.arrayreader import ArrayReader

    calls = []
    real = ArrayReader.parse_elements
    monkeypatch.setattr(ArrayReader, "parse_elements", lambda self: calls.append(self.index) or real(self))
    recs = [good(i, c_feat=float(i)) for i in range(300)]
    t = load_survivors(write_json(tmp_path, recs))
    assert t.n_records == 300 and calls == [0]


@pytest.mark.parametrize(
    "value,shown", [(float("nan"), "nan (float)"), (float("inf"), "inf (float)"), (-float("inf"), "-inf (float)")]
)
def test_non_finite_tokens_from_python_json_are_named(tmp_path, small_pieces, value, shown):
    """json.dump writes NaN / Infinity / -Infinity: read, then refused by record, seed and key."""
    recs = [rec({"a_feat": 1.0, "b_feat": 2.0}, seed=5000 + i, holdout_quality=0.1) for i in range(200)]
    recs[150]["features"]["b_feat"] = value
    path = write_json(tmp_path, recs)
    with pytest.raises(DataError) as info:
        load_survivors(path)
    msg = str(info.value)
    assert f"survivors file {path}: record 150: feature 'b_feat' must be a finite number, got {shown}" in msg
    assert "seed 5150" in msg
    assert "not valid JSON" not in msg
    with pytest.raises(DataError, match=r"record 150: feature 'b_feat'.*seed 5150"):
        load_features(path, ["b_feat"])


def test_non_finite_target_token_is_named(tmp_path, small_pieces):
    recs = [rec({"a_feat": 1.0}, seed=i, holdout_quality=0.1) for i in range(100)]
    recs[42]["holdout_quality"] = float("nan")
    with pytest.raises(DataError, match=r"record 42: target 'holdout_quality' must be a finite number, got nan.*seed 42"):
        load_survivors(write_json(tmp_path, recs))


def test_errors_in_a_late_piece_carry_the_file_index_and_seed(tmp_path, small_pieces):
    recs = [good(i) for i in range(300)]
    for i, r in enumerate(recs):
        r["seed"] = 9000 + i
    recs[271]["features"]["a_feat"] = "oops"
    with pytest.raises(DataError, match=r"record 271: feature 'a_feat' must be a finite number, got 'oops' \(str\) \[seed 9271\]"):
        load_survivors(write_json(tmp_path, recs))
    recs[271]["features"]["a_feat"] = 1e300
    with pytest.raises(DataError, match=r"record 271: feature 'a_feat' = 1e\+300 does not fit in float32.*seed 9271"):
        load_survivors(write_json(tmp_path, recs))
    recs[271]["features"]["a_feat"] = 1.0
    del recs[288]["holdout_quality"]
    with pytest.raises(DataError, match=r"record 288 has no target 'holdout_quality'.*seed 9288"):
        load_survivors(write_json(tmp_path, recs))
    recs[288]["holdout_quality"] = 0.5
    recs[299] = 7
    with pytest.raises(DataError, match=r"record 299 must be a JSON object, got int"):
        load_survivors(write_json(tmp_path, recs))


def test_syntax_error_deep_in_the_file_names_its_line(tmp_path, small_pieces):
    text = write_json(tmp_path, [good(i) for i in range(200)]).read_text()
    lines = text.split("\n")
    lines[1500] = lines[1500].replace(":", "", 1)  # a key without its colon
    path = tmp_path / "broken.json"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"broken.json is not valid JSON: Expecting ':' delimiter: line 1501 column"):
        load_survivors(path)


@pytest.mark.parametrize("where", [0, 150])  # the first record (always exact) and a decoded piece
def test_bytes_that_are_not_utf8_are_a_syntax_error_at_their_byte(tmp_path, small_pieces, where):
    """Was a bare UnicodeDecodeError traceback (from msgspec, then from json.loads)."""
    recs = [rec({"a_feat": float(i)}, seed=i, holdout_quality=0.1) for i in range(200)]
    recs[where]["seed"] = "seed-MARK"  # a string both readers read (one nobody reads may be skipped unchecked)
    raw = orjson.dumps(recs, option=orjson.OPT_INDENT_2)
    at = raw.index(b"MARK")
    path = write(tmp_path, raw.replace(b"MARK", b"\xe9\xff\xff\xff"))  # a Latin-1 é, then junk
    line = raw.count(b"\n", 0, at) + 1
    column = at - raw.rfind(b"\n", 0, at)
    expected = f"is not valid JSON: invalid UTF-8 byte 0xe9: line {line} column {column} (byte {at})"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_survivors(path)
    with pytest.raises(DataError, match=re.escape(expected)):
        load_features(path, ["a_feat"])


def test_a_target_named_like_a_record_field_is_still_read(tmp_path, small_pieces):
    """`seed` cannot be a decoded column; such a target makes every piece take the exact path."""
    recs = [rec({"a_feat": float(i)}, seed=i) for i in range(100)]
    t = load_survivors(write_json(tmp_path, recs), target="seed")
    np.testing.assert_array_equal(t.y, np.arange(100, dtype=np.float64))


@pytest.mark.parametrize("key", ['ratio "a/b"', "back\\slash", "tab\there"])
def test_a_key_msgspec_cannot_name_is_read_the_exact_way(tmp_path, small_pieces, key):
    """msgspec refuses such a name for a decoder field: it was a ValueError traceback from
    building the decoder, for training and for prediction (even as a key the model ignores)."""
    recs = varied_records(300)
    for i, r in enumerate(recs):
        r["features"][key] = 0.5 * i
    path = write_json(tmp_path, recs)
    assert_same_table(load_survivors(path), table_from_records(recs, source=str(path)))
    for names in (["a_feat", "b_feat"], ["a_feat", key]):  # the key ignored, then read
        np.testing.assert_array_equal(load_features(path, names).X, features_from_records(recs, names).X)
    t = load_survivors(path, target=key)
    np.testing.assert_array_equal(t.y, 0.5 * np.arange(300))
    assert key not in t.feature_names


@pytest.mark.parametrize("first", [0, 150])  # in the first record (read exactly), in a later piece
def test_a_key_with_a_lone_surrogate_is_named_not_a_traceback(tmp_path, small_pieces, first):
    """json.dump writes such a key as `"\\ud800x"` and json reads it back, but no UTF-8 text holds it:
    building the decoder raised a bare UnicodeEncodeError (training, and prediction when the first
    record had it); read the exact way, it failed later hashing the feature names. Training names it;
    prediction, which never reads it, skips it."""
    recs = varied_records(300)
    for r in recs[first:]:
        r["features"]["\ud800x"] = 1.0
    path = write_json(tmp_path, recs)
    seed = recs[first]["seed"]
    with pytest.raises(DataError, match=re.escape(
            f"record {first}: feature key '\\ud800x' is not valid Unicode (it holds a lone surrogate escape), "
            f"so it cannot name a column [seed {seed}]")):
        load_survivors(path)
    names = ["a_feat", "b_feat"]
    np.testing.assert_array_equal(load_features(path, names).X, features_from_records(recs, names).X)


def test_a_prng_type_with_a_lone_surrogate_is_ignored(tmp_path, small_pieces):
    """Odd metadata is ignored, never an error: such a prng_type was counted and the fingerprint
    (and sidecar) could not write it, a TypeError traceback after loading."""
    recs = varied_records(300)
    for r in recs:
        r["metadata"] = {"prng_type": "\udcffjava", "mod": 1000}
    t = load_survivors(write_json(tmp_path, recs))
    assert t.prng_type_counts == {} and t.prng_type is None and t.mod == 1000


def test_nan_tokens_where_nothing_is_read_keep_the_fast_path(tmp_path, small_pieces, monkeypatch):
    """json.dump writes NaN for a missing float; in a leakage key, metadata or an unknown
    key it is ignored, and the pieces still decode (only the first record goes exact)."""
    from step5.data.arrayreader import ArrayReader

    calls = []
    real = ArrayReader.parse_elements
    monkeypatch.setattr(ArrayReader, "parse_elements", lambda self: calls.append(self.index) or real(self))
    recs = [good(i, c_feat=float(i)) for i in range(300)]
    for r in recs[1:]:
        r["features"]["score"] = float("nan")
        r["holdout_hits"] = -float("inf")
        r["metadata"] = {"prng_type": "NaN-lcg Infinity", "mod": 1000, "extra": float("inf")}
    path = write_json(tmp_path, recs)
    t = load_survivors(path)
    assert calls == [0]
    assert_same_table(t, table_from_records(recs, source=str(path)))
    assert t.prng_type_counts == {"java_lcg": 1, "NaN-lcg Infinity": 299}  # strings untouched
    calls.clear()
    got = load_features(path, ["c_feat", "a_feat"])
    assert calls == [0]
    np.testing.assert_array_equal(got.X, features_from_records(recs, ["c_feat", "a_feat"]).X)


def test_a_non_finite_seed_reads_as_the_exact_way_reads_it(tmp_path, small_pieces):
    """Nulling a piece's NaN tokens (for the NaN in `score`) nulled a NaN / -Infinity seed too:
    the predictor's reader gave None for it where the exact way gives the float (so its messages
    read `[seed None]` or `[seed nan]` depending on where the pieces fell). Absent seeds stay None."""
    recs = [good(i) for i in range(300)]
    for i, r in enumerate(recs):
        r["features"]["score"] = float("nan")
        if i % 50 == 7:
            r["seed"] = float("nan") if i % 100 == 7 else -float("inf")
        elif i % 50 == 9:
            del r["seed"]
        elif i % 50 == 11:
            r["seed"] = None
    path = write_json(tmp_path, recs)
    got = load_features(path, ["a_feat", "b_feat"])
    want = features_from_records(recs, ["a_feat", "b_feat"])
    assert list(map(repr, got.seeds)) == list(map(repr, want.seeds))
    assert repr(got.seeds[7]) == "nan" and got.seeds[57] == -float("inf") and got.seeds[9] is None
    np.testing.assert_array_equal(got.X, want.X)


@pytest.mark.parametrize("where", [0, 150])  # the first record, a later piece (the number crosses blocks)
@pytest.mark.parametrize("key", ["a_feat", "unknown"])
def test_an_int_of_more_digits_than_python_reads_is_named_not_a_traceback(tmp_path, small_pieces, where, key):
    """json refuses an int of more than 4300 digits with a bare ValueError: it was a traceback from
    the exact path (training and prediction, also in a key nobody reads)."""
    recs = [good(i) for i in range(300)]
    text = orjson.dumps(recs[:where]).decode()[:-1] if where else "["
    big = orjson.dumps(recs[where]).decode().replace('"b_feat":', f'"{key}":1{"0" * 5000},"b_feat":')
    rest = orjson.dumps(recs[where + 1:]).decode()[1:]
    path = write(tmp_path, (text + ("," if where else "") + big + "," + rest).encode())
    line = f"line 1 column {len(text) + (2 if where else 1)}"
    reads = [lambda: load_survivors(path), lambda: load_features(path, ["a_feat", "b_feat"])]
    if key == "unknown" and where:  # a value the predictor's decoder skips, like a string nobody reads
        reads.pop()
    for read in reads:
        with pytest.raises(DataError, match=re.escape(
                f"is not valid JSON: element {where} holds an integer of more than 4300 digits, which Python's "
                f"json does not read: {line}")):
            read()


def test_null_non_finite_tokens_touches_only_tokens_outside_strings():
    from step5.data.survivors import null_non_finite_tokens

    got = null_non_finite_tokens(b'[{"NaN": NaN, "s": "a NaN, -Infinity", "x": -Infinity, "y": Infinity}]')
    assert got == b'[{"NaN": null, "s": "a NaN, -Infinity", "x": null, "y": null}]'
    assert null_non_finite_tokens(b'[{"x": 1.0}]') is None  # nothing to do
    assert null_non_finite_tokens(b'[{"s": "\\" NaN", "x": NaN}]') is None  # escapes: not safe to count quotes

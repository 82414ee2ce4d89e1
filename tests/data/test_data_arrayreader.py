"""ArrayReader: pieces of a JSON array, cut by byte search and verified by decoding, with an
exact fallback; tested with io.BytesIO against the standard library's json."""
from __future__ import annotations

import io
import json
import random

import msgspec
import pytest

from step5.data.arrayreader import ArrayReader
from step5.errors import DataError

TRICKY_STRINGS = ["plain", "}, {", '}",{"', "é}\\\",{ü", "[", "]", "\\", "", "}\n  },\n  {"]


def read_all(data: bytes, block_size: int, *, strict: bool = True) -> tuple[list, int]:
    """Every element, decoding pieces with msgspec when ``strict`` (exact path on failure),
    always with the exact path otherwise; also returns how many pieces decoded."""
    reader = ArrayReader(io.BytesIO(data), "f.json", "survivors", block_size=block_size)
    assert reader.open_array()
    out: list = []
    decoded = 0
    while (piece := reader.next_piece()) is not None:
        try:
            if not strict:
                raise msgspec.DecodeError("exact path only")
            items = msgspec.json.decode(piece)
        except msgspec.DecodeError:
            out += reader.parse_elements()
        else:
            reader.accept(len(items))
            out += items
            decoded += 1
        assert reader.index == len(out)
    return out, decoded


def random_records(rng: random.Random) -> list:
    recs = []
    for _ in range(rng.randint(1, 40)):
        rec = {"seed": rng.randrange(10**12), "s": rng.choice(TRICKY_STRINGS), "x": rng.random(),
               "nested": [{"a": 1}, {"b": [2, {}]}], "m": {"k": rng.choice([1, "v", None])}}
        if rng.random() < 0.2:
            rec["x"] = rng.choice([float("nan"), float("inf"), -float("inf")])
        recs.append(rec)
    return recs


@pytest.mark.parametrize("seed", range(60))
def test_pieces_and_exact_path_give_the_elements_json_gives(seed):
    rng = random.Random(seed)
    recs = random_records(rng)
    text = json.dumps(recs, indent=rng.choice([None, 0, 2]), ensure_ascii=rng.random() < 0.5).encode()
    expected = json.dumps(json.loads(text))  # via dumps: NaN == NaN as text
    for block_size in (1, 13, 256, 1 << 20):
        for strict in (True, False):
            got, _ = read_all(text, block_size, strict=strict)
            assert json.dumps(got) == expected, (seed, block_size, strict)


def test_clean_records_are_decoded_in_pieces_not_one_by_one():
    recs = [{"seed": i, "features": {"a": i * 0.5, "b": -i}} for i in range(2000)]
    text = json.dumps(recs, indent=2).encode()
    got, decoded = read_all(text, 4096)
    assert got == recs
    assert decoded > 20  # many pieces, each decoded whole


@pytest.mark.parametrize(
    "doc",
    [
        b"[",
        b"[{",
        b'[{"a": 1},]',
        b'[{"a": 1}] x',
        b'[{"a": 1} {"b": 2}]',
        b'[1, 2',
        b'[\n  {"a":\n    NaN}, {"a": x}]',
        b'[\n  {"a": "unterminated}\n]',
        b'[\n  {"a": 1},\n  {"a": 2,}\n]',
        b"  ",
        b"",
    ],
)
@pytest.mark.parametrize("block_size", [1, 7, 1 << 20])
def test_syntax_errors_name_line_and_column_like_json(doc, block_size):
    try:
        json.loads(doc)
    except json.JSONDecodeError as exc:
        expected = f"{exc.msg}: line {exc.lineno} column {exc.colno}"
    else:  # pragma: no cover - every doc above is malformed
        raise AssertionError("doc should be malformed")
    with pytest.raises(DataError) as info:
        read_all(doc, block_size)
    assert "survivors file f.json is not valid JSON" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("doc", [b'{"a": [1]}', b"5", b'"[1]"', b"\xef\xbb\xbf[1]"])
def test_something_else_than_an_array_is_left_to_the_caller(doc):
    assert ArrayReader(io.BytesIO(doc), "f", "survivors").open_array() is False


@pytest.mark.parametrize("doc", [b"[]", b" [ \n ] \n"])
def test_empty_array(doc):
    reader = ArrayReader(io.BytesIO(doc), "f", "survivors")
    assert reader.open_array() and reader.ended
    assert reader.next_piece() is None and reader.parse_elements() == []


def test_one_element_longer_than_a_block():
    recs = [{"s": "x" * 5000}, {"s": "y"}, {"s": "z" * 3000}]
    got, decoded = read_all(json.dumps(recs).encode(), 64)
    assert got == recs and decoded >= 1


def test_exact_path_reads_one_element_when_no_piece_is_pending():
    reader = ArrayReader(io.BytesIO(b'[{"a": 1}, {"a": NaN}, {"a": 3}]'), "f", "survivors", block_size=2)
    assert reader.open_array()
    assert reader.parse_elements() == [{"a": 1}]
    assert reader.index == 1
    rest = reader.parse_elements() + reader.parse_elements()
    assert rest[1] == {"a": 3} and rest[0]["a"] != rest[0]["a"]  # NaN
    assert reader.ended and reader.next_piece() is None

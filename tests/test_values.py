"""The shared value helpers of step5.values."""
from __future__ import annotations

import math
import re

import pytest

from step5.values import finite_or_none, is_int, is_number, utc_timestamp


@pytest.mark.parametrize(
    ("value", "int_", "number"),
    [
        (3, True, True),
        (-1, True, True),
        (2.5, False, True),
        (True, False, False),
        (False, False, False),
        (math.nan, False, False),
        (math.inf, False, False),
        ("3", False, False),
        (None, False, False),
        pytest.param(10**400, True, False, id="beyond-float64"),  # a number nothing downstream can use
        pytest.param(-(10**400), True, False, id="below-float64"),
    ],
)
def test_is_int_and_is_number_refuse_bools_and_non_finite(value, int_, number):
    assert is_int(value) is int_
    assert is_number(value) is number


def test_finite_or_none():
    assert finite_or_none(2) == 2.0 and isinstance(finite_or_none(2), float)
    assert [finite_or_none(v) for v in (math.nan, True, None, "1")] == [None] * 4


def test_utc_timestamp_formats():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_timestamp())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp(milliseconds=True))

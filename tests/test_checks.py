"""The one check of numbers given in recipes: a bool is not a number, and the message names the setting."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lightning_kd.checks import check_number, is_number


@pytest.mark.parametrize(
    ("value", "integer", "expected"),
    [
        (1, False, True),
        (1.5, False, True),
        (1, True, True),
        (1.0, True, False),
        (True, False, False),
        (False, True, False),
        ("1", False, False),
        (None, False, False),
    ],
)
def test_is_number_refuses_bools_and_strings(value: Any, integer: bool, expected: bool) -> None:
    assert is_number(value, integer=integer) is expected


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (0, {"low": 1, "integer": True}, "size must be a whole number >= 1, got 0."),
        (True, {"low": 1, "integer": True}, "size must be a whole number >= 1, got True."),
        ("128", {"low": 1, "integer": True}, "size must be a whole number >= 1, got '128'."),
        (2.0, {"low": 1, "integer": True}, "size must be a whole number >= 1, got 2.0."),
        (0, {"low": 0, "low_open": True, "finite": True}, "size must be a finite number > 0, got 0."),
        (
            math.inf,
            {"low": 0, "low_open": True, "finite": True},
            "size must be a finite number > 0, got inf.",
        ),
        (math.nan, {"low": 0}, "size must be a number >= 0, got nan."),
        (1.0, {"low": 0, "high": 1, "high_open": True}, "size must be a number in [0, 1), got 1.0."),
        (1.5, {"high": 1}, "size must be a number <= 1, got 1.5."),
        ("x", {"what": "a number in (0, 1)"}, "size must be a number in (0, 1), got 'x'."),
        ("2", {"hint": " (str); no quotes"}, "size must be a number, got '2' (str); no quotes."),
    ],
)
def test_check_number_names_the_setting_and_the_value(
    value: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        check_number("size", value, **options)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("value", "options"),
    [
        (1, {"low": 1, "integer": True}),
        (0.5, {"low": 0, "high": 1, "low_open": True, "high_open": True}),
        (1, {"high": 1}),
        (math.inf, {}),
        (3, {"finite": True}),
    ],
)
def test_check_number_accepts_numbers_in_range(value: Any, options: dict[str, Any]) -> None:
    check_number("size", value, **options)

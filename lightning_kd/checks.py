"""Checks of numbers given in recipes and on the command line, with errors that name the setting.

YAML and ``--key value`` both turn ``true`` into a bool and ``'1e-3'`` into a string; Python counts a bool
as an int, so ``isinstance(value, int)`` alone lets ``batch_size: true`` through as 1.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any, integer: bool = False) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (only an ``int`` with ``integer``), and not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    finite: bool = False,
    what: str | None = None,
    hint: str = "",
) -> None:
    """Raise ``ValueError("<name> must be <what>, got <value!r><hint>.")`` unless ``value`` is a number in range.

    Args:
        low, high: bounds, included unless ``low_open`` / ``high_open``.
        integer: only whole numbers (``int``); ``finite``: no ``inf`` or ``nan``.
        what: what the value must be, in words; default: built from the other arguments, e.g.
            ``"a whole number >= 1"``.
        hint: text after the value, e.g. how to write it.
    """
    fits = is_number(value, integer)
    if fits and (finite or low is not None or high is not None) and math.isnan(value):
        fits = False
    if fits and finite and not math.isfinite(value):
        fits = False
    if fits and low is not None and (value < low or (low_open and value == low)):
        fits = False
    if fits and high is not None and (value > high or (high_open and value == high)):
        fits = False
    if fits:
        return
    if what is None:
        what = "a whole number" if integer else "a finite number" if finite else "a number"
        if low is not None and high is not None:
            what += f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            what += f" {'<' if high_open else '<='} {high}"
    raise ValueError(f"{name} must be {what}, got {value!r}{hint}.")

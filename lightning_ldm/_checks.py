"""Argument checks shared by the package: each error names the argument, echoes the value, says what is accepted."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Raises:
        ValueError: ``value`` is not in ``choices``.
    """
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, options))}")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as ``int`` after checking it is an integer within ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an integer (bools are refused too).
        ValueError: ``value`` lies outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value} is out of range; expected {bound}")
    if maximum is not None and value > maximum:
        bound = f"an integer <= {maximum}" if minimum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value} is out of range; expected {bound}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as ``float`` after checking it is a finite real number within the bounds.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    lo = "-inf" if minimum is None else f"{minimum:g}"
    hi = "inf" if maximum is None else f"{maximum:g}"
    interval = f"{'[' if min_inclusive else '('}{lo}, {hi}{']' if max_inclusive else ')'}"
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value} must be finite; expected a number in {interval}")
    too_low = minimum is not None and (value < minimum or (not min_inclusive and value == minimum))
    too_high = maximum is not None and (value > maximum or (not max_inclusive and value == maximum))
    if too_low or too_high:
        raise ValueError(f"{name}={value:g} is out of range; expected a number in {interval}")
    return value

"""Value checks shared by the configuration readers: each returns the typed
value or raises ``ValueError`` saying what was expected."""

from __future__ import annotations

from typing import Any

from idemproxy.config.units import parse_duration


def kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {value!r}")
    return seconds


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {kind(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {kind(value)}")
    return value


def statuses(value: Any) -> frozenset[int]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of HTTP status codes, got {kind(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ValueError(f"expected status codes from 100 to 599, got {kind(item)}")
    return frozenset(value)

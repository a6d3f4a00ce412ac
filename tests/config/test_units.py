"""``idemproxy.config.units``: human-written durations and sizes."""

from __future__ import annotations

import pytest

from idemproxy.config.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("1ms", 0.001, id="one-millisecond"),
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("24h", 86400.0, id="hours"),
        pytest.param("7d", 604800.0, id="days"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param("0.25h", 900.0, id="fractional-hours"),
        pytest.param("10", 10.0, id="string-without-unit-is-seconds"),
        pytest.param(" 10 s ", 10.0, id="surrounding-and-inner-whitespace"),
        pytest.param("0s", 0.0, id="zero-string"),
        pytest.param(0, 0.0, id="zero-int"),
        pytest.param(45, 45.0, id="int-is-seconds"),
        pytest.param(2.5, 2.5, id="float-is-seconds"),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(True, id="bool-true"),
        pytest.param(False, id="bool-false"),
        pytest.param(-1, id="negative-int"),
        pytest.param(-0.5, id="negative-float"),
        pytest.param("-1s", id="negative-string"),
        pytest.param("1w", id="unknown-unit-week"),
        pytest.param("1 hour", id="spelled-out-unit"),
        pytest.param("10S", id="uppercase-unit"),
        pytest.param("1e3", id="exponent"),
        pytest.param("", id="empty-string"),
        pytest.param("ms", id="unit-without-number"),
        pytest.param("1.s", id="dangling-decimal-point"),
        pytest.param("1h30m", id="compound"),
        pytest.param(None, id="none"),
        pytest.param([1], id="list"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="infinity"),
        pytest.param("9" * 400, id="digits-beyond-a-float"),
        pytest.param("\u0661\u0662s", id="arabic-indic-digits"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_duration_error_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"got '1w'"):
        parse_duration("1w")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        pytest.param("1MiB", 1024**2, id="mebibyte"),
        pytest.param("1MB", 1000**2, id="megabyte"),
        pytest.param("64KiB", 64 * 1024, id="kibibytes"),
        pytest.param("64KB", 64_000, id="kilobytes"),
        pytest.param("2GiB", 2 * 1024**3, id="gibibytes"),
        pytest.param("2GB", 2 * 1000**3, id="gigabytes"),
        pytest.param("10B", 10, id="bytes-unit"),
        pytest.param("64kib", 64 * 1024, id="unit-case-insensitive"),
        pytest.param(" 1 MiB ", 1024**2, id="whitespace"),
        pytest.param("65536", 65536, id="string-without-unit-is-bytes"),
        pytest.param(100, 100, id="int-is-bytes"),
        pytest.param(0, 0, id="zero"),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    result = parse_size(value)
    assert isinstance(result, int)
    assert result == size


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(True, id="bool"),
        pytest.param(-1, id="negative-int"),
        pytest.param("-1KiB", id="negative-string"),
        pytest.param("1.5MiB", id="fractional"),
        pytest.param(1.5, id="float"),
        pytest.param(float("inf"), id="infinity"),
        pytest.param("1TB", id="unknown-unit"),
        pytest.param("1 megabyte", id="spelled-out-unit"),
        pytest.param("", id="empty-string"),
        pytest.param("MiB", id="unit-without-number"),
        pytest.param(None, id="none"),
        pytest.param(["1MiB"], id="list"),
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)

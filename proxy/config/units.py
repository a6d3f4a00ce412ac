"""Parsing of human-written durations ("500ms", "24h") and sizes ("1MiB")."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")  # [0-9]: \d also matches other scripts' digits
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as ``"250ms"``, ``"30s"``, ``"24h"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a non-negative duration, got {value!r}")
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_FACTORS[match.group(2)]
        if not math.isfinite(seconds):  # hundreds of digits overflow to infinity
            raise ValueError(f"expected a finite duration, got {value[:40]!r}...")
        return seconds
    raise ValueError(f"expected a duration such as '30s', '500ms' or '24h', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``"64KiB"`` or ``"1MB"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '1MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "b").lower()
        return int(match.group(1)) * _SIZE_FACTORS[unit]
    raise ValueError(f"expected a size such as '1MiB' or '65536', got {value!r}")

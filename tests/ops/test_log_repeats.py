"""An outage must not flood the log: a repeated warning is written once per interval, and the
next line says how many were held back; errors always pass."""

from __future__ import annotations

import logging

from idemproxy.logs import RepeatFilter


def record(level: int, msg: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("idemproxy.ledger.leases", level, __file__, 1, msg, (), None)
    made.__dict__.update(extra)
    return made


def test_a_repeated_warning_passes_once_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    repeats = RepeatFilter(interval_s=10.0, clock=lambda: now[0])

    passed = [repeats.filter(record(logging.WARNING, "cannot renew leases; retrying")) for _ in range(30)]
    now[0] += 10.0
    later = record(logging.WARNING, "cannot renew leases; retrying")

    assert passed == [True] + [False] * 29
    assert repeats.filter(later)
    assert later.suppressed == 29  # type: ignore[attr-defined]


def test_different_warnings_and_every_error_pass() -> None:
    repeats = RepeatFilter(interval_s=10.0, clock=lambda: 0.0)

    assert repeats.filter(record(logging.WARNING, "cannot renew leases; retrying"))
    assert repeats.filter(record(logging.WARNING, "reconciler cannot reach the store"))
    assert all(repeats.filter(record(logging.ERROR, "could not record the outcome")) for _ in range(5))

"""Bounds on the store's clock (``idemproxy.store.clock``): they hold the store's true time
whatever this instance's wall clock does, cover every clock a store has, and the SQLite
store's clock is one per host, shared by every process that opens the file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from idemproxy.store.clock import StoreClock
from idemproxy.store.sqlite import SqliteStore

OFFSET_MS = 8_000  # the store's clock is 8 s ahead of this instance's


def reading(clock: StoreClock, store_offset_ms: float, round_trip_s: float = 0.002) -> None:
    """A call sent now, that the store answered halfway through, with its clock
    ``store_offset_ms`` ahead of the wall clock here."""
    sent = time.monotonic()
    store_ms = int(time.time() * 1000 + store_offset_ms + round_trip_s * 500)
    clock.observe(store_ms, sent, sent + round_trip_s)


def store_time_ms(store_offset_ms: float, at: float) -> float:
    return time.time() * 1000 + store_offset_ms + (at - time.monotonic()) * 1000


def test_the_bounds_hold_the_stores_time_now_and_later() -> None:
    clock = StoreClock()
    reading(clock, OFFSET_MS)
    for later_s in (0.0, 1.0, 30.0, 600.0):
        at = time.monotonic() + later_s
        truth = store_time_ms(OFFSET_MS, at)
        assert clock.earliest_ms(at) <= truth <= clock.latest_ms(at)
    assert clock.latest_ms() - clock.earliest_ms() < 200  # tight enough to be of use


def test_a_jump_of_this_instances_wall_clock_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = StoreClock()
    reading(clock, OFFSET_MS)
    before = (clock.earliest_ms(), clock.latest_ms())
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    after = (clock.earliest_ms(), clock.latest_ms())

    assert abs(after[0] - before[0]) < 1_000
    assert abs(after[1] - before[1]) < 1_000


def test_the_bounds_cover_every_clock_the_store_has() -> None:
    """A Redis Cluster: each master its own clock, here one 8 s ahead and one 2 s behind."""
    clock = StoreClock()
    reading(clock, OFFSET_MS)
    reading(clock, -2_000)

    assert clock.earliest_ms() <= store_time_ms(-2_000, time.monotonic())
    assert clock.latest_ms() >= store_time_ms(OFFSET_MS, time.monotonic())


def test_before_any_reading_the_bounds_are_this_instances_wall_clock() -> None:
    clock = StoreClock()
    wall_ms = time.time() * 1000

    assert not clock.observed
    assert abs(clock.now_ms() - wall_ms) < 1_000
    assert abs(clock.earliest_ms() - wall_ms) < 1_000


async def test_every_process_opening_one_sqlite_file_shares_its_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second opener's wall clock is 8 s off; it still reads the first one's clock, and
    neither moves when a wall clock jumps afterwards."""
    path = tmp_path / "ledger.sqlite3"
    first = SqliteStore(path)
    await first.start()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + OFFSET_MS / 1000)
    second = SqliteStore(path)
    await second.start()
    try:
        assert abs(second.clock.now_ms() - first.clock.now_ms()) < 1_000
        assert abs(first.clock.now_ms() - real_time() * 1000) < 1_000
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
        assert abs(second.clock.now_ms() - real_time() * 1000) < 1_000
    finally:
        await second.close()
        await first.close()

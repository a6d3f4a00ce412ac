"""An owner's own lease is judged by the monotonic clock, against the store's clock (the trust
issue, item 14): a wall clock that jumps, backward or forward, neither stretches an expired
lease into one the owner still sends under, nor cuts a live one short; and a lease written
by an instance whose clock is behind the store's is only as long as the store will hold it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from idemproxy.config.settings import StoreConfig
from idemproxy.ledger.leases import LeaseKeeper
from idemproxy.lifecycle.records import OperationRecord
from idemproxy.store import open_store
from tests.support.records import make_record, new_op_id


@pytest.fixture
def keeper(tmp_path: Path) -> LeaseKeeper:
    return LeaseKeeper(open_store(StoreConfig(url=f"sqlite:///{tmp_path / 'ledger.db'}")))


def granted(keeper: LeaseKeeper, lease_s: float, requested_at: float) -> OperationRecord:
    """A record whose lease the store granted for ``lease_s`` from ``requested_at``."""
    until_ms = keeper.store.clock.latest_ms(requested_at) + round(lease_s * 1000)
    return make_record(new_op_id()).evolve(lease_until_ms=until_ms)


def test_a_wall_clock_jumping_back_does_not_revive_an_expired_lease(
    keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested_at = time.monotonic() - 10.0
    record = granted(keeper, 5.0, requested_at)
    keeper.hold(record, lease_s=5.0, requested_at=requested_at)  # granted 10 s ago: over
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # NTP steps the clock back an hour

    assert not keeper.still_held(record.op_id)


def test_a_wall_clock_jumping_forward_does_not_cut_a_live_lease_short(
    keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested_at = time.monotonic()
    record = granted(keeper, 30.0, requested_at)
    keeper.hold(record, lease_s=30.0, requested_at=requested_at)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    assert keeper.still_held(record.op_id)


def test_the_margin_is_kept_before_the_end(keeper: LeaseKeeper) -> None:
    requested_at = time.monotonic() - 1.85
    record = granted(keeper, 2.0, requested_at)
    keeper.hold(record, lease_s=2.0, requested_at=requested_at)  # 0.15 s left, margin 0.2 s

    assert not keeper.still_held(record.op_id)


def test_a_lease_written_by_a_clock_behind_the_stores_is_as_short_as_the_store_holds_it(
    keeper: LeaseKeeper,
) -> None:
    """An instance 8 s behind the store writes a 5 s lease that the store sees end 3 s ago:
    its owner must not send under it, whatever its own clock says."""
    requested_at = time.monotonic()
    behind_ms = int(time.time() * 1000) - 8_000
    record = make_record(new_op_id()).evolve(lease_until_ms=behind_ms + 5_000)
    keeper.store.clock.observe(int(time.time() * 1000), requested_at, time.monotonic())  # the store's reading

    keeper.hold(record, lease_s=5.0, requested_at=requested_at)

    assert not keeper.still_held(record.op_id)

"""An owner's own lease is judged by the monotonic clock (the trust issue, item 14, in part):
a wall clock that jumps, backward or forward, neither stretches an expired lease into one
the owner still sends under, nor cuts a live one short."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from idemproxy.config.settings import StoreConfig
from idemproxy.ledger.leases import LeaseKeeper
from idemproxy.store import open_store
from tests.support.records import make_record, new_op_id


@pytest.fixture
def keeper(tmp_path: Path) -> LeaseKeeper:
    return LeaseKeeper(open_store(StoreConfig(url=f"sqlite:///{tmp_path / 'ledger.db'}")))


def test_a_wall_clock_jumping_back_does_not_revive_an_expired_lease(
    keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_record(new_op_id())
    keeper.hold(record, lease_s=5.0, requested_at=time.monotonic() - 10.0)  # granted 10 s ago: over
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # NTP steps the clock back an hour

    assert not keeper.still_held(record.op_id)


def test_a_wall_clock_jumping_forward_does_not_cut_a_live_lease_short(
    keeper: LeaseKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_record(new_op_id())
    keeper.hold(record, lease_s=30.0, requested_at=time.monotonic())
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    assert keeper.still_held(record.op_id)


def test_the_margin_is_kept_before_the_end(keeper: LeaseKeeper) -> None:
    record = make_record(new_op_id())
    keeper.hold(record, lease_s=2.0, requested_at=time.monotonic() - 1.85)  # 0.15 s left, margin 0.2 s

    assert not keeper.still_held(record.op_id)

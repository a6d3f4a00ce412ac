"""The store contract, on SQLite and on Redis (over TCP and over its Unix socket; see this
folder's ``conftest.py``): budget counters and withdrawn reservations.

``charge`` counts attempts in a sliding window up to a limit; ``unreserve`` withdraws a
reservation that was never forwarded (and wakes its watchers); a store refuses a URL of
another kind.
"""

from __future__ import annotations

import asyncio

import pytest

from idemproxy.lifecycle.records import State
from idemproxy.store import Store
from idemproxy.store.base import Counter, Full
from idemproxy.store.sqlite import SqliteStore
from tests.support.records import (
    WAKE_TIMEOUT_S,
    make_record,
    make_response,
    move,
    new_op_id,
    now_ms,
    outcome,
    reserve_new,
    reserved,
    wait_for_subscribers,
    writer_and_watcher,
)

# -- budget counters (charge) -----------------------------------------------------------------------

WINDOW_MS = 60_000


def budget(name: str = "identity:agent-1", limit: int = 3, window_ms: int = WINDOW_MS) -> Counter:
    return Counter(name, limit, window_ms)


async def test_charge_fills_a_counter_then_says_when_its_oldest_charge_slides_out(store: Store) -> None:
    counter = budget(limit=3)
    t0 = now_ms()
    for n in range(3):
        assert await store.charge([counter], f"charge-{n}", t0 + n * 1000) == []
    assert await store.charge([counter], "charge-3", t0 + 3000) == [Full(counter, WINDOW_MS - 3000)]
    assert await store.charge([counter], "charge-3", t0 + WINDOW_MS - 1) == [Full(counter, 1)]
    # The first charge slides out exactly one window after it was made.
    assert await store.charge([counter], "charge-3", t0 + WINDOW_MS) == []
    assert await store.charge([counter], "charge-4", t0 + WINDOW_MS) == [Full(counter, 1000)]


async def test_charge_is_all_or_none_across_counters(store: Store) -> None:
    identity = budget("identity:agent-1", limit=1)
    task = budget("task:t-1", limit=3)
    t0 = now_ms()
    assert await store.charge([identity, task], "first", t0) == []
    assert await store.charge([identity, task], "second", t0 + 1) == [Full(identity, WINDOW_MS - 1)]
    # The refused charge left the task counter untouched: it still has room for two.
    assert await store.charge([task], "third", t0 + 2) == []
    assert await store.charge([task], "fourth", t0 + 3) == []
    assert await store.charge([task], "fifth", t0 + 4) == [Full(task, WINDOW_MS - 4)]


async def test_charge_reports_every_full_counter(store: Store) -> None:
    identity = budget("identity:agent-1", limit=1, window_ms=10_000)
    task = budget("task:t-1", limit=1)
    t0 = now_ms()
    assert await store.charge([identity, task], "first", t0) == []
    assert await store.charge([identity, task], "second", t0 + 500) == [
        Full(identity, 9_500),
        Full(task, WINDOW_MS - 500),
    ]


async def test_counters_with_different_names_are_separate(store: Store) -> None:
    t0 = now_ms()
    assert await store.charge([budget("identity:a", limit=1)], "a-1", t0) == []
    assert await store.charge([budget("identity:b", limit=1)], "b-1", t0) == []
    assert await store.charge([budget("task:a", limit=1)], "t-1", t0) == []  # a task named like an identity
    assert await store.charge([budget("identity:a", limit=1)], "a-2", t0) != []


async def test_a_retried_charge_is_counted_once(store: Store) -> None:
    counter = budget(limit=2)
    t0 = now_ms()
    assert await store.charge([counter], "attempt-1", t0) == []
    assert await store.charge([counter], "attempt-1", t0 + 1) == []  # the reply was lost; redis-py retried
    assert await store.charge([counter], "attempt-2", t0 + 2) == []
    assert await store.charge([counter], "attempt-1", t0 + 3) == []  # still charged, even with the counter full
    assert await store.charge([counter], "attempt-3", t0 + 4) == [Full(counter, WINDOW_MS - 4)]


async def test_a_lowered_limit_waits_until_enough_charges_slid_out(store: Store) -> None:
    t0 = now_ms()
    for n in range(3):
        assert await store.charge([budget(limit=3)], f"charge-{n}", t0 + n * 10_000) == []
    lowered = budget(limit=1)
    # Room for one more only once the two newest of three are gone too: the newest decides.
    assert await store.charge([lowered], "next", t0 + 25_000) == [Full(lowered, 20_000 + WINDOW_MS - 25_000)]


async def test_concurrent_charges_never_exceed_the_limit(store: Store) -> None:
    identity = budget("identity:agent-1", limit=5)
    task = budget("task:t-1", limit=50)
    t0 = now_ms()
    results = await asyncio.gather(*(store.charge([identity, task], f"charge-{n}", t0) for n in range(30)))
    assert sum(result == [] for result in results) == 5
    assert await store.charge([task], "after", t0) == []  # only the 5 admitted charges reached the task


async def test_charge_of_no_counters_charges_nothing(store: Store) -> None:
    assert await store.charge([], "nothing", now_ms()) == []


# -- withdrawn reservations (unreserve) -------------------------------------------------------------


async def test_unreserve_deletes_a_fresh_reservation_and_leaves_no_trace(store: Store) -> None:
    first = await reserve_new(store)
    assert await store.unreserve(first.op_id, first.owner, 1)
    assert await store.get(first.op_id) is None
    assert (await store.count_unresolved())[State.PENDING] == 0
    assert first.op_id not in await store.due(first.lease_until_ms + 1, 100)
    # The key is free: the next reservation creates the record afresh.
    again = make_record(first.op_id, "instance-b:1")
    assert await store.reserve(again, reserved(again)) is None
    assert await store.unreserve(first.op_id, first.owner, 1) is False  # a retried call: no longer ours


async def test_unreserve_only_deletes_the_owners_pending_reservation(store: Store) -> None:
    first = await reserve_new(store)
    assert await store.unreserve(first.op_id, "instance-b:1", 1) is False
    assert await store.unreserve(first.op_id, first.owner, 2) is False
    assert await store.unreserve(new_op_id(), first.owner, 1) is False
    done = outcome(first, State.COMPLETED, response=make_response(b"done"))
    assert await store.transition(move(done, fence=1)) is None
    assert await store.unreserve(first.op_id, first.owner, 1) is False
    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED


async def test_unreserve_wakes_watchers(store: Store) -> None:
    first = await reserve_new(store)
    async with store.watch(first.op_id) as changed:
        assert await store.unreserve(first.op_id, first.owner, 1)
        await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
    assert await store.get(first.op_id) is None


async def test_unreserve_wakes_watchers_through_another_redis_store(redis_url: str) -> None:
    async with writer_and_watcher(redis_url) as (writer, watcher, observer):
        first = await reserve_new(writer)
        async with watcher.watch(first.op_id) as changed:
            # SUBSCRIBE is not acknowledged to the caller: wait until the server has it.
            await wait_for_subscribers(observer, watcher.keys.channel(first.op_id), 1)
            assert await writer.unreserve(first.op_id, first.owner, 1)
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        assert await watcher.get(first.op_id) is None


def test_the_sqlite_store_refuses_a_url_of_another_kind() -> None:
    """A URL meant for Redis must never become a SQLite file named after it."""
    with pytest.raises(ValueError, match="expected sqlite:///PATH"):
        SqliteStore.from_url("unix:///run/redis.sock")

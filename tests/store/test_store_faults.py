"""Store faults with private processes: Redis restarts, crashes, outages and
hangs, lost script caches, and SQLite files shared and reopened."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import State
from idemproxy.store import Store, StoreUnavailable, Transition, open_store
from idemproxy.store.redis import RedisStore
from idemproxy.store.redis_schema import RESERVE, TRANSITION
from tests.support.records import (
    WAKE_TIMEOUT_S,
    complete,
    make_record,
    make_response,
    move,
    new_op_id,
    outcome,
    reserve_new,
    reserved,
    wait_for_subscribers,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow

SOCKET_TIMEOUT_S = 0.5
#: A store call against a dead or hung server must fail well within this.
HANG_LIMIT_S = 10.0
#: ... and, with a 0.5 s socket timeout and two retries, it should take no longer than this.
FAIL_FAST_S = 5.0


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        server.kill()


async def open_started(url: str) -> Store:
    store = open_store(StoreConfig(url=url, socket_timeout_s=SOCKET_TIMEOUT_S))
    await store.start()
    return store


@pytest.fixture
async def redis_store(private_redis: RedisServer) -> AsyncIterator[Store]:
    store = await open_started(private_redis.url)
    yield store
    await store.close()


@pytest.fixture
async def raw_redis(private_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


async def unavailable(call: Awaitable[object]) -> float:
    """Assert ``call`` raises StoreUnavailable (not hangs); how long it took."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(call, HANG_LIMIT_S)
    return time.monotonic() - started


# -- Redis: restarts and crashes ----------------------------------------------------------------


async def test_redis_restart_keeps_records_and_the_store_reconnects(
    private_redis: RedisServer, redis_store: Store
) -> None:
    first = await reserve_new(redis_store)
    done = await complete(redis_store, first, bytes(range(256)))

    private_redis.restart()

    assert await asyncio.wait_for(redis_store.get(first.op_id), HANG_LIMIT_S) == done
    rival = make_record(first.op_id, "instance-b:1")
    assert await asyncio.wait_for(redis_store.reserve(rival, reserved(rival)), HANG_LIMIT_S) == done.evolve(evidence=())
    # New work goes through the same store object.
    second = await reserve_new(redis_store)
    assert await redis_store.get(second.op_id) == second


async def test_redis_sigkill_keeps_acknowledged_writes(private_redis: RedisServer, redis_store: Store) -> None:
    first = await reserve_new(redis_store)
    done = await complete(redis_store, first, b'{"ticket": 1}')
    pending = await reserve_new(redis_store)  # acknowledged, then the crash

    private_redis.kill()
    private_redis.start()

    assert await asyncio.wait_for(redis_store.get(first.op_id), HANG_LIMIT_S) == done
    assert await redis_store.get(pending.op_id) == pending
    rival = make_record(first.op_id, "instance-b:1")
    assert await redis_store.reserve(rival, reserved(rival)) == done.evolve(evidence=())


async def test_redis_watch_is_woken_across_stores_after_a_restart(
    private_redis: RedisServer, redis_store: Store, raw_redis: aioredis.Redis
) -> None:
    """The pub/sub listener reconnects and resubscribes by itself after a restart."""
    watcher = await open_started(private_redis.url)
    try:
        assert isinstance(watcher, RedisStore)
        keepalive = watcher.keys.keepalive_channel()
        await wait_for_subscribers(raw_redis, keepalive, 2)

        private_redis.restart()

        # Both listeners are back (their reconnection woke no watcher: there was none).
        async with aioredis.Redis.from_url(private_redis.url) as observer:
            await wait_for_subscribers(observer, keepalive, 2)
        first = await asyncio.wait_for(reserve_new(redis_store), HANG_LIMIT_S)
        async with watcher.watch(first.op_id) as changed:
            assert not changed.is_set()
            done = outcome(first, State.COMPLETED, response=make_response(b"after the restart"))
            assert await redis_store.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        stored = await watcher.get(first.op_id)
        assert stored is not None
        assert stored.state is State.COMPLETED
    finally:
        await watcher.close()


# -- Redis: outages ---------------------------------------------------------------------------


async def test_redis_down_raises_store_unavailable_then_recovers(
    private_redis: RedisServer, redis_store: Store
) -> None:
    owned = await reserve_new(redis_store)
    finish = move(outcome(owned, State.COMPLETED, response=make_response(b"done")), fence=1)
    fresh = make_record(new_op_id(), "instance-a:2")

    private_redis.kill()

    took = [
        await unavailable(redis_store.reserve(fresh, reserved(fresh))),
        await unavailable(redis_store.transition(finish)),
        await unavailable(redis_store.get(owned.op_id)),
        await unavailable(redis_store.ping()),
    ]
    assert max(took) < FAIL_FAST_S, took

    private_redis.start()

    await asyncio.wait_for(redis_store.ping(), HANG_LIMIT_S)
    assert await redis_store.get(owned.op_id) == owned  # nothing was applied while down
    assert await redis_store.transition(finish) is None
    assert await redis_store.reserve(fresh, reserved(fresh)) is None
    stored = await redis_store.get(owned.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED
    assert await redis_store.get(fresh.op_id) is not None


async def test_redis_hung_raises_store_unavailable_and_a_lost_reply_is_applied_once(
    private_redis: RedisServer, redis_store: Store
) -> None:
    """SIGSTOP: the server accepts connections but never answers (the socket
    timeout path). Commands sent meanwhile may still run when it resumes: a
    retry of the same transition must then not apply twice."""
    owned = await reserve_new(redis_store)
    finish = move(outcome(owned, State.COMPLETED, response=make_response(b"once")), fence=1)
    process = private_redis.process
    assert process is not None

    process.send_signal(signal.SIGSTOP)
    try:
        took = await unavailable(redis_store.transition(finish))
        took_get = await unavailable(redis_store.get(owned.op_id))
    finally:
        process.send_signal(signal.SIGCONT)
    assert max(took, took_get) < FAIL_FAST_S, (took, took_get)

    # The caller retries after the outage, whatever happened to the first try.
    assert await asyncio.wait_for(redis_store.transition(finish), HANG_LIMIT_S) is None
    stored = await redis_store.get(owned.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED
    assert stored.response is not None
    assert stored.response.body == b"once"
    assert [entry.kind for entry in stored.evidence] == ["reserved", "completed"]


async def test_redis_script_flush_reloads_the_scripts(redis_store: Store, raw_redis: aioredis.Redis) -> None:
    """After SCRIPT FLUSH (a failover to a replica, a restart without AOF of the
    script cache) the store gets NOSCRIPT and must load its scripts again."""
    reserve_sha, transition_sha = (hashlib.sha1(script.encode()).hexdigest() for script in (RESERVE, TRANSITION))
    first = await reserve_new(redis_store)
    await complete(redis_store, first, b"before the flush")
    assert await raw_redis.script_exists(reserve_sha, transition_sha) == [True, True]

    await raw_redis.script_flush()
    assert await raw_redis.script_exists(reserve_sha, transition_sha) == [False, False]
    second = await reserve_new(redis_store)
    rival = make_record(second.op_id, "instance-b:1")
    assert await redis_store.reserve(rival, reserved(rival)) == second.evolve(evidence=())
    assert await raw_redis.script_exists(reserve_sha) == [True]

    await raw_redis.script_flush()
    done = await complete(redis_store, second, b"after the flush")
    assert done.response is not None
    assert done.response.body == b"after the flush"
    assert await raw_redis.script_exists(transition_sha) == [True]


# -- SQLite: durability and sharing ---------------------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared' / 'ledger.db'}"


async def test_sqlite_records_survive_reopening_the_file(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    writer = await open_started(url)
    try:
        first = await reserve_new(writer)
        done = await complete(writer, first, bytes(range(256)))
        pending = await reserve_new(writer)
    finally:
        await writer.close()

    reader = await open_started(url)
    try:
        assert await reader.get(first.op_id) == done
        assert await reader.get(pending.op_id) == pending
        rival = make_record(first.op_id, "instance-b:1")
        assert await reader.reserve(rival, reserved(rival)) == done.evolve(evidence=())
    finally:
        await reader.close()


@pytest.fixture
async def two_sqlite_stores(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one file, as two proxy processes on one volume."""
    url = sqlite_url(tmp_path)
    one = await open_started(url)
    two = await open_started(url)
    yield one, two
    await two.close()
    await one.close()


async def test_sqlite_stores_sharing_a_file_see_each_others_writes(
    two_sqlite_stores: tuple[Store, Store],
) -> None:
    one, two = two_sqlite_stores
    first = await reserve_new(one)
    assert await two.get(first.op_id) == first

    done = outcome(first, State.COMPLETED, response=make_response(b"from two"))
    transition = move(done, fence=1, ttl_s=3600)
    assert await two.transition(transition) is None
    assert await one.get(first.op_id) == done.evolve(evidence=(*first.evidence, transition.evidence))
    # The guard holds across the two: a stale write through ``one`` is refused.
    stale = Transition(
        new=outcome(first, State.RELEASED),
        expect_fence=1,
        expect_states=frozenset({State.PENDING}),
        evidence=transition.evidence,
    )
    current = await two.get(first.op_id)
    assert current is not None
    assert await one.transition(stale) == current.evolve(evidence=())


async def test_sqlite_concurrent_reserves_from_two_stores_create_one_record(
    two_sqlite_stores: tuple[Store, Store],
) -> None:
    one, two = two_sqlite_stores
    for _ in range(5):
        op_id = new_op_id()
        records = [make_record(op_id, f"instance-{n}:1") for n in range(40)]
        stores = [one, two] * 20
        results = await asyncio.gather(
            *(store.reserve(record, reserved(record)) for store, record in zip(stores, records, strict=True))
        )

        winners = [record for record, result in zip(records, results, strict=True) if result is None]
        assert len(winners) == 1
        stored = await one.get(op_id)
        assert stored is not None
        assert stored.owner == winners[0].owner
        assert len(stored.evidence) == 1
        assert await two.get(op_id) == stored
        assert all(result == stored.evolve(evidence=()) for result in results if result is not None)

"""The store contract, on SQLite and on Redis (over TCP and over its Unix socket; see this
folder's ``conftest.py``): notifications and the store's own life.

A watch is woken by a transition on the same store and, through Redis pub/sub, on
another store standing for another proxy process; ``ping`` and ``close``.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import State
from idemproxy.store import Store, open_store
from idemproxy.store.redis import RedisStore
from tests.support.records import (
    WAKE_TIMEOUT_S,
    make_response,
    move,
    new_op_id,
    open_started,
    outcome,
    reserve_new,
    wait_for_subscribers,
    writer_and_watcher,
)

# -- notifications ------------------------------------------------------------------------------


async def test_watch_is_woken_by_a_transition_on_the_same_store(store: Store) -> None:
    first = await reserve_new(store)
    async with store.watch(first.op_id) as changed:
        assert not changed.is_set()
        done = outcome(first, State.COMPLETED, response=make_response(b"done"))
        assert await store.transition(move(done, fence=1)) is None
        await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED


async def test_watchers_of_one_op_id_are_all_woken(store: Store) -> None:
    first = await reserve_new(store)
    other = await reserve_new(store)
    async with (
        store.watch(first.op_id) as one,
        store.watch(first.op_id) as two,
        store.watch(other.op_id) as unrelated,
    ):
        done = outcome(first, State.COMPLETED, response=make_response(b"done"))
        assert await store.transition(move(done, fence=1)) is None
        await asyncio.wait_for(asyncio.gather(one.wait(), two.wait()), WAKE_TIMEOUT_S)
        assert not unrelated.is_set()


async def test_watch_is_woken_by_a_transition_through_another_redis_store(redis_url: str) -> None:
    """Two RedisStore instances stand for two proxy processes: pub/sub carries the change."""
    async with writer_and_watcher(redis_url) as (writer, watcher, _):
        first = await reserve_new(writer)
        async with watcher.watch(first.op_id) as changed:
            assert not changed.is_set()
            done = outcome(first, State.COMPLETED, response=make_response(b"done"))
            assert await writer.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
            stored = await watcher.get(first.op_id)
            assert stored is not None
            assert stored.state is State.COMPLETED


async def pubsub_connections(client: aioredis.Redis) -> int:
    """How many connections to the server are in pub/sub mode."""
    return sum(1 for connection in await client.client_list() if int(connection["sub"]) > 0)


async def test_redis_watch_right_after_start_subscribes_on_the_listened_connection(redis_url: str) -> None:
    """A watch entered before the pub/sub listener has connected must not open a
    second pub/sub connection: the listener reads one connection only, so a
    subscription made on another one never wakes anybody (cross-process
    notifications for that op id are lost; waiters fall back to polling)."""
    observer = aioredis.Redis.from_url(redis_url)
    store = open_store(StoreConfig(url=redis_url))
    try:
        assert isinstance(store, RedisStore)
        before = await pubsub_connections(observer)
        await store.start()
        op_id = new_op_id()
        async with store.watch(op_id):
            await wait_for_subscribers(observer, store.keys.keepalive_channel(), 1)
            await wait_for_subscribers(observer, store.keys.channel(op_id), 1)
            opened = await pubsub_connections(observer) - before
            assert opened == 1, f"one store opened {opened} pub/sub connections"
    finally:
        await store.close()
        await observer.aclose()


# -- liveness and lifecycle -----------------------------------------------------------------------


async def test_ping_succeeds(store: Store) -> None:
    await store.ping()  # raises StoreUnavailable unless the store answers


async def test_close_twice_is_harmless(store_url: str) -> None:
    store = await open_started(store_url)
    await store.ping()  # raises StoreUnavailable unless the store answers
    await store.close()
    await store.close()

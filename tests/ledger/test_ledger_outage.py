"""Store outages and restarts seen through the proxy, on a private redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import State
from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config
from tests.support.records import op_id_for
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream

KEY = {"Idempotency-Key": "op-1"}
Client = TestClient[Any, Any]


@pytest.fixture
def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server  # type: ignore[misc]
    server.kill()


@pytest.fixture
async def redis_store(private_redis: RedisServer) -> AsyncIterator[Store]:
    store = open_store(StoreConfig(url=private_redis.url, socket_timeout_s=0.5))
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def client_for(
    aiohttp_client: Callable[..., Awaitable[Client]], redis_store: Store, upstream: Upstream
) -> Callable[..., Awaitable[Client]]:
    async def factory(**route: Any) -> Client:
        return await aiohttp_client(build_proxy_app(proxy_config(upstream.url, **route), redis_store))

    return factory


async def test_store_down_fails_closed_with_503_and_forwards_nothing(
    client_for: Callable[..., Awaitable[Client]],
    upstream: Upstream,
    private_redis: RedisServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
    redis_store: Store,
) -> None:
    client = await client_for()
    admin = await aiohttp_client(build_admin_app(redis_store, proxy_config(upstream.url)))
    private_redis.kill()

    response = await client.post("/items", json={}, headers=KEY)
    ready = await admin.get("/readyz")
    health = await admin.get("/healthz")

    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"] == "urn:idemproxy:problem:ledger-unavailable"
    assert ready.status == 503
    assert health.status == 200
    assert upstream.count() == 0

    private_redis.start()  # the same store object reconnects by itself
    assert (await client.post("/items", json={}, headers=KEY)).status == 201
    assert (await admin.get("/readyz")).status == 200
    assert upstream.count() == 1


async def test_store_down_with_fail_open_forwards_unrecorded(
    client_for: Callable[..., Awaitable[Client]], upstream: Upstream, private_redis: RedisServer
) -> None:
    client = await client_for(on_store_error="fail_open")
    private_redis.kill()
    response = await client.post("/items", json={}, headers=KEY)
    assert response.status == 201
    assert upstream.count() == 1


async def test_records_survive_a_redis_restart(
    client_for: Callable[..., Awaitable[Client]], upstream: Upstream, private_redis: RedisServer
) -> None:
    client = await client_for()
    first = await client.post("/items", json={"n": 1}, headers=KEY)
    private_redis.restart()
    replay = await client.post("/items", json={"n": 1}, headers=KEY)

    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == await first.read()
    assert upstream.count() == 1


async def test_records_survive_a_redis_crash(
    client_for: Callable[..., Awaitable[Client]], upstream: Upstream, private_redis: RedisServer
) -> None:
    client = await client_for()
    first = await client.post("/items", json={"n": 1}, headers=KEY)
    private_redis.kill()  # SIGKILL: only what AOF fsynced survives (appendfsync always)
    private_redis.start()
    replay = await client.post("/items", json={"n": 1}, headers=KEY)

    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == await first.read()
    assert upstream.count() == 1


async def test_store_lost_between_forward_and_record_never_forwards_twice(
    client_for: Callable[..., Awaitable[Client]],
    upstream: Upstream,
    private_redis: RedisServer,
    redis_store: Store,
) -> None:
    client = await client_for(wait="200ms")
    first = asyncio.create_task(client.post("/gate", json={}, headers=KEY))
    await upstream.arrived.wait()
    private_redis.kill()
    upstream.release.set()
    first_response = await first  # the outcome could not be recorded; the caller still gets the truth

    private_redis.start()
    duplicate = await client.post("/gate", json={}, headers=KEY)
    record = await redis_store.get(op_id_for("op-1"))

    assert first_response.status == 201
    assert duplicate.status == 409  # still PENDING under a live lease: never forwarded again
    assert record is not None
    assert record.state is State.PENDING  # kept, not forgotten: its lease expiry makes it UNKNOWN
    assert upstream.count() == 1


async def test_duplicates_already_answered_once_are_answered_from_memory_while_the_store_is_down(
    client_for: Callable[..., Awaitable[Client]], upstream: Upstream, private_redis: RedisServer
) -> None:
    """A completed operation cannot change: once an instance has answered a duplicate of
    it from the store, the next ones get their answer from its memory, the store down or
    not. What it does not know stays fail-closed."""
    client = await client_for()
    first = await client.post("/items", json={"n": 1}, headers=KEY)
    other = await client_for()  # another instance of the deployment
    from_store = await other.post("/items", json={"n": 1}, headers=KEY)
    private_redis.kill()

    from_memory = await other.post("/items", json={"n": 1}, headers=KEY)
    reused = await other.post("/items", json={"n": 2}, headers=KEY)
    never_repeated = await client.post("/items", json={"n": 1}, headers=KEY)  # only answered once, first-hand
    unknown = await other.post("/items", json={"n": 1}, headers={"Idempotency-Key": "op-2"})

    assert first.status == 201
    assert from_store.headers["Idempotent-Replayed"] == "true"
    assert from_memory.status == 201
    assert from_memory.headers["Idempotent-Replayed"] == "true"
    assert await from_memory.read() == await first.read()
    assert reused.status == 422  # the same key for another request: refused from memory too
    refusal = await reused.json(content_type=PROBLEM_CONTENT_TYPE)
    assert refusal["type"] == "urn:idemproxy:problem:fingerprint-mismatch"
    assert never_repeated.status == 503  # its first duplicate needs the store
    assert unknown.status == 503
    assert upstream.count() == 1

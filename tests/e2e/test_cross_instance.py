"""Two proxy instances sharing one Redis: duplicates are answered, and budgets spent, across instances."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import StoreConfig, parse_config
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config
from tests.support.answers import snapshot, watching
from tests.support.clock import Clock
from tests.support.upstream import Upstream

KEY = {"Idempotency-Key": "op-1"}
Client = TestClient[Any, Any]


@pytest.fixture
async def two_stores(redis_url: str) -> AsyncIterator[tuple[Store, Store]]:
    stores = (open_store(StoreConfig(url=redis_url)), open_store(StoreConfig(url=redis_url)))
    for store in stores:
        await store.start()
    yield stores
    for store in stores:
        await store.close()


async def test_duplicate_on_another_instance_is_woken_by_pubsub_not_polling(
    aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream, two_stores: tuple[Store, Store]
) -> None:
    store_a, store_b = two_stores
    # Instance B would poll only once a day, and the lease outlives the wait bound:
    # the duplicate can only get the answer if the pub/sub notification reaches it.
    store_b.poll_interval_s = 86400
    config = proxy_config(upstream.url, wait="300s", lease="600s")
    proxy_a = await aiohttp_client(build_proxy_app(config, store_a))
    proxy_b = await aiohttp_client(build_proxy_app(config, store_b))

    first = asyncio.create_task(proxy_a.post("/gate", json={}, headers=KEY))
    await upstream.arrived.wait()
    async with watching(store_b) as waiting:
        duplicate = asyncio.create_task(proxy_b.post("/gate", json={}, headers=KEY))
        await waiting.wait()
        upstream.release.set()
        # Without the notification the duplicate would sit out its 300 s wait bound.
        first_response, duplicate_response = await asyncio.wait_for(asyncio.gather(first, duplicate), 20)

    assert first_response.status == 201
    assert duplicate_response.headers["Idempotent-Replayed"] == "true"
    assert await snapshot(first_response) == await snapshot(duplicate_response)
    assert upstream.count() == 1


async def test_concurrent_duplicates_spread_over_two_instances_cause_one_effect(
    aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream, two_stores: tuple[Store, Store]
) -> None:
    config = proxy_config(upstream.url, wait="30s")
    proxies = [await aiohttp_client(build_proxy_app(config, store)) for store in two_stores]
    requests = [asyncio.create_task(proxies[n % 2].post("/gate", json={"n": 1}, headers=KEY)) for n in range(40)]
    await upstream.arrived.wait()
    upstream.release.set()
    responses = await asyncio.gather(*requests)

    snapshots = [await snapshot(response) for response in responses]
    assert upstream.count() == 1
    assert [item for item in snapshots if item != snapshots[0]] == []
    assert snapshots[0][0] == 201


async def test_two_instances_spend_one_budget_together(
    aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream, two_stores: tuple[Store, Store]
) -> None:
    """The counters live in the store: two agents on one task, each through its own proxy
    instance, share the task's budget; neither instance can hand out more than it allows."""
    clock = Clock()
    config = parse_config(
        {
            "budgets": {"task": {"calls": "5/1m"}},
            "routes": [{"prefix": "/", "name": "tools", "upstream": upstream.url}],
        }
    )
    proxies = [await aiohttp_client(build_proxy_app(config, store, budget_clock=clock)) for store in two_stores]

    def send(n: int) -> Awaitable[Any]:
        headers = {"Idempotency-Key": f"op-{n}", "X-Idem-Caller": f"agent-{n % 2}", "X-Agent-Task": "refine"}
        return proxies[n % 2].post("/items", json={"n": n}, headers=headers)

    responses = await asyncio.gather(*(send(n) for n in range(20)))
    assert sorted(response.status for response in responses) == [201] * 5 + [429] * 15
    assert upstream.count() == 5
    refusals = [await response.json(content_type=None) for response in responses if response.status == 429]
    assert {(body["budget"], body["retry_after"]) for body in refusals} == {("task-calls", 60)}

    clock.advance(60)
    assert (await send(20)).status == 201
    assert (await send(21)).status == 201  # the other instance
    assert upstream.count() == 7

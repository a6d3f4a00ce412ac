"""Fixtures for the adapter tests: a real proxy (Redis ledger) in front of the counting upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from idemproxy.adapters import AgentRun, ProxyClient
from idemproxy.app import build_admin_app
from idemproxy.store import Store
from tests.conftest import ProxyFactory, proxy_config
from tests.support.upstream import Upstream


@pytest.fixture
def store_url(redis_url: str) -> str:
    """The adapters do not depend on the store; the store contract suite covers both."""
    return redis_url


@pytest.fixture
async def proxy_url(make_proxy: ProxyFactory) -> str:
    """The base URL of a real idemproxy (key mode ``require``) in front of ``upstream``."""
    client = await make_proxy()
    return str(client.make_url("/")).rstrip("/")


@pytest.fixture
async def proxy_client(proxy_url: str) -> AsyncIterator[ProxyClient]:
    async with ProxyClient(proxy_url) as client:
        yield client


@pytest.fixture
def run() -> AgentRun:
    return AgentRun(run_id="task-42")


@pytest.fixture
async def admin_url(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], store: Store, upstream: Upstream
) -> str:
    """The real admin listener over the same ledger as the ``make_proxy`` proxies."""
    client = await aiohttp_client(build_admin_app(store, proxy_config(upstream.url)))
    return str(client.make_url("/")).rstrip("/")

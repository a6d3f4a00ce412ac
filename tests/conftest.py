"""Shared fixtures: a real redis-server, both stores, a counting upstream, the proxy, and the
proxy listener's own HTTP server on a loopback port (``serve``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from idemproxy.app import ProxyApp, build_proxy_app
from idemproxy.config.settings import ProxyConfig, StoreConfig, parse_config
from idemproxy.store import Store, open_store
from tests.support.proxy_server import ProxyTestServer
from tests.support.redis_server import RedisServer
from tests.support.topologies import RedisNode, wait_in_sync
from tests.support.upstream import Upstream
from tests.support.wire import Serve, serving

pytest_plugins = ["tests.support.hangs", "pytester"]

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def aiohttp_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """pytest-aiohttp's ``aiohttp_client``, which also takes the proxy listener's ``ProxyApp``."""

    async def client(served: Any, **kwargs: Any) -> TestClient[Any, Any]:
        if isinstance(served, ProxyApp):
            served = ProxyTestServer(served)
        return await aiohttp_client(served, **kwargs)

    return client


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'ledger.db'}"


@pytest.fixture
def redis_unix_url(redis_server: RedisServer) -> str:
    """The session's Redis by its Unix socket (``unix://``), flushed."""
    redis_server.flush()
    return redis_server.unix_url


def store_url_for(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of the store ``request.param`` names: sqlite, redis or redis-unix."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    if request.param == "redis-unix":
        return str(request.getfixturevalue("redis_unix_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url_for(request, tmp_path)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = open_store(StoreConfig(url=store_url))
    await opened.start()
    yield opened
    await opened.close()


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    tool = Upstream()
    server = await aiohttp_server(tool.app())
    tool.url = str(server.make_url("")).rstrip("/")
    return tool


def proxy_config(upstream_url: str, store_url: str = "sqlite:///unused.db", **route: Any) -> ProxyConfig:
    return parse_config({"store": store_url, "routes": [{"prefix": "/", "upstream": upstream_url, **route}]})


@pytest.fixture
def make_proxy(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    store: Store,
    upstream: Upstream,
) -> ProxyFactory:
    """``await make_proxy(**route_policy)``: a client for a proxy in front of ``upstream``."""

    async def factory(config: ProxyConfig | None = None, **route: Any) -> TestClient[Any, Any]:
        app = build_proxy_app(config or proxy_config(upstream.url, **route), store)
        return await aiohttp_client(app)

    return factory


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisNode, RedisNode]]:
    """A real primary with one real replica, in sync."""
    master = RedisNode(tmp_path / "master")
    replica = RedisNode(tmp_path / "replica")
    try:
        master.start()
        replica.replicate(master.port)
        wait_in_sync(master, replica)
        yield master, replica
    finally:
        replica.kill()
        master.kill()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler, header_timeout_s=..., max_body=...)``: a started ``HttpServer``
    (``tests.support.wire.Served``), shut down after the test with its callers closed."""
    async with serving() as start:
        yield start

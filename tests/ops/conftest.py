"""Fixtures for the operator's side: ``ops``, two routes and the admin API driven through them;
``make_env``, a proxy and its admin app for the metrics tests; ``setup`` for the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config, sqlite_url
from tests.support.admin_ops import ClientFactory, Ops, two_routes
from tests.support.metrics import Client, Env, EnvFactory, config_for
from tests.support.ops_cli import Setup
from tests.support.upstream import Upstream


@pytest.fixture
async def ops(aiohttp_client: ClientFactory, store: Store, upstream: Upstream) -> Ops:
    config = two_routes(upstream.url)
    proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
    admin = await aiohttp_client(build_admin_app(store, config))
    return Ops(proxy, admin, store, upstream)


@pytest.fixture
def make_env(aiohttp_client: Callable[..., Awaitable[Client]], store: Store, upstream: Upstream) -> EnvFactory:
    """``await make_env(route_name, **policy)``: a proxy and its admin app on ``store``.

    Background reconciliation is off so that which request reconciles an
    operation (and so its decision) is deterministic; on-demand reconciliation runs."""

    async def factory(route: str, *, log_keys: bool = False, **policy: Any) -> Env:
        config = config_for(upstream, route, log_keys, **policy)
        proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
        admin = await aiohttp_client(build_admin_app(store, config))
        return Env(proxy, admin, upstream, store, route)

    return factory


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    # The CLI only speaks HTTP to the admin API; test_admin.py covers both stores.
    opened = open_store(StoreConfig(url=sqlite_url(tmp_path)))
    await opened.start()
    yield opened
    await opened.close()


@pytest.fixture
async def setup(aiohttp_client: Callable[..., Awaitable[Client]], sqlite_store: Store, upstream: Upstream) -> Setup:
    config = proxy_config(upstream.url)
    proxy = await aiohttp_client(build_proxy_app(config, sqlite_store, run_reconciler=False))
    admin = await aiohttp_client(build_admin_app(sqlite_store, config))
    return Setup(proxy, str(admin.make_url("")).rstrip("/"), sqlite_store, upstream)

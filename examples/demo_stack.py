"""What the framework examples share: serving an aiohttp app (or idemproxy's proxy
listener) on a free loopback port, and the ticket tool with idemproxy (and its
admin listener) in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import ticket_tool  # the example tool next to this file
from aiohttp import web

from idemproxy.app import ProxyApp, build_admin_app, build_proxy_app, serving_proxy
from idemproxy.config.settings import parse_config
from idemproxy.store import open_store


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_idemproxy(app: ProxyApp) -> AsyncIterator[str]:
    """idemproxy's proxy listener on a free loopback port; yields its base URL."""
    async with serving_proxy(app, "127.0.0.1", 0, grace_s=5.0) as listening:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"


@asynccontextmanager
async def tool_behind_idemproxy(ledger_dir: str) -> AsyncIterator[tuple[str, str, str]]:
    """The ticket tool, idemproxy in front of it, and idemproxy's admin listener."""
    async with serving(ticket_tool.build_app()) as tool_url:
        config = parse_config(
            {"store": f"sqlite:///{ledger_dir}/ledger.db", "routes": [{"prefix": "/", "upstream": tool_url}]}
        )
        store = open_store(config.store)
        await store.start()
        try:
            async with (
                serving_idemproxy(build_proxy_app(config, store)) as proxy_url,
                serving(build_admin_app(store, config)) as admin_url,
            ):
                yield tool_url, proxy_url, admin_url
        finally:
            await store.close()

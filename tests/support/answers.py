"""What callers got, compared across duplicates, and when a duplicate started waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import ClientResponse

from idemproxy.store import Store


async def snapshot(response: ClientResponse) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers (lower-case names) of an answer, without those a replay may change."""
    ignored = {"date", "server", "content-length", "idempotent-replayed"}
    headers = {name.lower(): value for name, value in response.headers.items() if name.lower() not in ignored}
    return response.status, await response.read(), headers


@asynccontextmanager
async def watching(store: Store) -> AsyncIterator[asyncio.Event]:
    """An event set when some request starts waiting on a record (instrumentation, not a mock)."""
    started = asyncio.Event()
    original = store.watch

    @asynccontextmanager
    async def watch(op_id: str) -> AsyncIterator[asyncio.Event]:
        async with original(op_id) as changed:
            started.set()
            yield changed

    store.watch = watch  # type: ignore[method-assign]
    try:
        yield started
    finally:
        store.watch = original  # type: ignore[method-assign]

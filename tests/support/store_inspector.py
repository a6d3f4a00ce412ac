"""What lies under a store, read (and for expiry written) around it: for the store contract
suite (``tests/store/contract``), where the contract is about expiry and the due index."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any

import redis.asyncio as aioredis

from idemproxy.store import Store
from idemproxy.store.redis import RedisStore
from idemproxy.store.sqlite import SqliteStore
from tests.support.records import WAKE_TIMEOUT_S, now_ms


class Inspector:
    """Reads (and, for expiry, writes) what lies under a store, bypassing it."""

    def __init__(self, store: Store, url: str) -> None:
        self.redis_store = store if isinstance(store, RedisStore) else None
        self.sqlite_store = store if isinstance(store, SqliteStore) else None
        assert self.redis_store is not None or self.sqlite_store is not None, type(store)
        self.redis: aioredis.Redis | None = aioredis.Redis.from_url(url) if self.redis_store else None

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def expires_in_ms(self, op_id: str) -> int | None:
        """Milliseconds until the record expires; ``None``: kept until resolved."""
        if self.redis is not None:
            assert self.redis_store is not None
            pttl = await self.redis.pttl(self.redis_store.keys.record(op_id))
            assert pttl != -2, "no record key"
            return None if pttl == -1 else int(pttl)
        expires_ms = self._sqlite_column(op_id, "expires_ms")
        return None if expires_ms is None else int(expires_ms) - now_ms()

    async def due_ms(self, op_id: str) -> int | None:
        """The op id's score in the reconciler's due index; ``None``: not in it."""
        if self.redis is not None:
            assert self.redis_store is not None
            score = await self.redis.zscore(self.redis_store.keys.due(op_id), op_id)
            return None if score is None else int(score)
        due_ms = self._sqlite_column(op_id, "due_ms")
        return None if due_ms is None else int(due_ms)

    async def expire(self, op_id: str) -> None:
        """Make the record's retention run out now."""
        if self.redis is not None:
            assert self.redis_store is not None
            key = self.redis_store.keys.record(op_id)
            assert await self.redis.pexpire(key, 1)
            deadline = time.monotonic() + WAKE_TIMEOUT_S
            while await self.redis.exists(key):
                assert time.monotonic() < deadline, "the record key did not expire"
                await asyncio.sleep(0.005)
            return
        assert self.sqlite_store is not None
        with contextlib.closing(sqlite3.connect(self.sqlite_store.path, timeout=5)) as db:
            cursor = db.execute("UPDATE operations SET expires_ms = ? WHERE op_id = ?", (now_ms() - 1000, op_id))
            db.commit()
            assert cursor.rowcount == 1

    def _sqlite_column(self, op_id: str, column: str) -> Any:
        assert self.sqlite_store is not None
        with contextlib.closing(sqlite3.connect(self.sqlite_store.path, timeout=5)) as db:
            row = db.execute(f"SELECT {column} FROM operations WHERE op_id = ?", (op_id,)).fetchone()
        assert row is not None, "no row for the op id"
        return row[0]

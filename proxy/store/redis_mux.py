"""One multiplexed Redis connection for the hot path.

redis-py gives each command a pooled connection of its own and waits for its
reply before the connection serves anyone else (auto-pipelining is an open
request: redis/redis-py#3767). Under load that costs more CPU than the
commands themselves. Here every concurrent request shares one connection:
commands issued in the same event-loop turn go out in one write, and replies,
which Redis sends in order, are matched to their callers first in, first out.
Encoding and parsing stay in C (``hiredis``).

Failure handling mirrors redis-py's: a reply overdue by ``timeout_s`` or a
lost connection fails every command in flight on it, and each is retried on
a fresh connection (at most ``retries`` times, with a short backoff). That is
safe because every script idemproxy runs recognises a repeated call by its
owner and applies nothing twice. ``WAIT`` must not use this connection: it
would block every other caller's commands behind it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from idemproxy.store.redis_errors import RedisConnectionError, RedisReplyError

Arg = str | bytes | int | float
_BACKOFF_S = (0.02, 0.05, 0.1)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str = "localhost"
    port: int = 6379
    unix_path: str | None = None


@dataclass(frozen=True, slots=True)
class Login:
    username: str | None = None
    password: str | None = None
    db: int = 0


Locate = Callable[[], Awaitable[Endpoint]]


class _Connection(asyncio.Protocol):
    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while (reply := reader.gets()) is not False:
            if not pending:
                self._fail(RedisConnectionError("redis sent a reply nobody asked for"))
                return
            future, _ = pending.popleft()
            if future.done():
                continue  # its caller gave up; the reply still had to be consumed in order
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection lost: {exc}" if exc else "connection closed by the server"))

    # -- sending -----------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.lost is None and self._transport is not None

    def send(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if self.lost is not None:
            future.set_exception(RedisConnectionError(str(self.lost)))
            return future
        self._outgoing.append(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]  # the stub types a 1-tuple
        self._pending.append((future, self._loop.time()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_s / 2, self._check_overdue)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and self._transport is not None and self.lost is None:
            self._transport.writelines(self._outgoing)
        self._outgoing = []

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self._pending or self.lost is not None:
            return
        _, sent_at = self._pending[0]
        if self._loop.time() - sent_at > self._timeout_s:
            self._fail(RedisConnectionError(f"no reply within {self._timeout_s:g}s"))
            return
        self._watchdog = self._loop.call_later(self._timeout_s / 2, self._check_overdue)

    def _fail(self, exc: RedisConnectionError) -> None:
        if self.lost is None:
            self.lost = exc
        if self._transport is not None:
            self._transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError(str(exc)))

    def close(self) -> None:
        self._fail(RedisConnectionError("closed by idemproxy"))


class RedisMux:
    """Commands from every caller over one connection, reconnecting on demand."""

    def __init__(self, locate: Locate, login: Login, *, timeout_s: float, retries: int = 2) -> None:
        self._locate = locate
        self._login = login
        self._timeout_s = timeout_s
        self._retries = retries
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def call(self, *args: Arg) -> Any:
        """One command's reply; ``RedisReplyError`` for an error reply,
        ``RedisConnectionError`` once the retries are spent."""
        for attempt in range(self._retries + 1):
            try:
                connection = self._connection
                if connection is None or not connection.usable:
                    connection = await self._connect()
                return await connection.send(args)
            except RedisReplyError as error_reply:  # named apart: see handler.forward_owned
                if not str(error_reply).startswith("READONLY") or attempt == self._retries:
                    raise
                self.reconnect()  # a demoted master (Sentinel failover): find the new one
            except (OSError, TimeoutError) as exc:
                if attempt == self._retries or self._closed:
                    raise RedisConnectionError(str(exc) or type(exc).__name__) from exc
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

    async def evalsha(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run a script by its SHA, loading it first when the server lost it."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", source)
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    def reconnect(self) -> None:
        """Drop the connection: commands in flight fail (and are retried), the next one reconnects."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self._closed = True
        self.reconnect()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the Redis store is closed")
        if self._connecting is None:
            # One connect at a time; everyone who needs a connection meanwhile waits for it.
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, connecting: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._connection = connecting.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s):
            try:
                endpoint = await self._locate()
            except (OSError, TimeoutError):
                raise
            except Exception as exc:  # e.g. no sentinel knows a master right now
                raise RedisConnectionError(f"cannot locate the server: {exc}") from exc
            connection = _Connection(self._timeout_s)
            if endpoint.unix_path is not None:
                await loop.create_unix_connection(lambda: connection, endpoint.unix_path)
            else:
                await loop.create_connection(lambda: connection, endpoint.host, endpoint.port)
            try:
                await self._handshake(connection)
            except BaseException:
                connection.close()
                raise
        return connection

    async def _handshake(self, connection: _Connection) -> None:
        login = self._login
        replies: list[asyncio.Future[Any]] = []
        if login.password is not None:
            credentials = (login.username, login.password) if login.username else (login.password,)
            replies.append(connection.send(("AUTH", *credentials)))
        if login.db:
            replies.append(connection.send(("SELECT", login.db)))
        for reply in replies:
            await reply


def locate_fixed(endpoint: Endpoint) -> Locate:
    async def locate() -> Endpoint:
        return endpoint

    return locate

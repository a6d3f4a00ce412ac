"""Requests and responses as the proxy listener's handlers see them (``http_server`` serves them).

The subset of aiohttp's request and response API idemproxy uses, with none of
what it does not: a request's head is parsed once into a ``CIMultiDictProxy``,
its body is read from a bounded buffer, and a whole ``Response`` goes out in
one write with its head.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, overload

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.protocol.errors import BodyTooLarge, ProblemError

#: Body bytes buffered before reading pauses, and below which it resumes.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024

T = TypeVar("T")
Handler = Callable[["Request"], Awaitable["StreamResponse"]]


class Step(Protocol):
    """One step of a request pipeline: it calls ``handler`` to go on, or answers itself."""

    def __call__(self, request: Request, handler: Handler) -> Awaitable[StreamResponse]: ...


class Wire(Protocol):
    """What requests and responses need from the connection they arrived on."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    keep_alive: bool

    @property
    def max_body(self) -> int: ...

    def body_wanted(self) -> None: ...

    def send_continue(self) -> None: ...

    def response_head(self, request: Request, status: int, reason: str | None, headers: CIMultiDict[str]) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


NO_BODY_STATUSES = frozenset({204, 304})


class RequestBody:
    """A request body as it arrives: buffered up to a high-water mark, read once.

    A body whose caller holds it back until invited (``expects_continue``: ``Expect:
    100-continue``) is asked for when a reader first waits for it, and not before: a request
    answered without reading its body (a 401, say) never invites it. Nor is a caller that
    started sending anyway (RFC 9110 §10.1.1)."""

    __slots__ = ("_buffer", "_connection", "_continue", "_eof", "_exception", "_size", "_waiter")

    def __init__(self, connection: Wire | None, *, expects_continue: bool = False) -> None:
        self._connection = connection
        self._buffer: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = connection is None
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expects_continue

    # -- the reader's side ----------------------------------------------------------------

    def is_eof(self) -> bool:
        """True once the whole body has arrived (some of it may still be unread)."""
        return self._eof

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._size

    def exception(self) -> BaseException | None:
        return self._exception

    def set_exception(self, exc: BaseException) -> None:
        """Fail the reader (a timeout, or the connection lost); what is buffered is dropped."""
        self._exception = exc
        self._buffer.clear()
        self._size = 0
        self._wake()

    def read_nowait(self) -> bytes:
        """Everything buffered now."""
        if self._exception is not None:
            raise self._exception
        buffer = self._buffer
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._drained()
        return data

    def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        """The body in pieces of at most ``size`` bytes, as they arrive."""
        return _Pieces(self, size)

    async def next_piece(self, size: int) -> bytes | None:
        """The next at most ``size`` bytes as they arrive; ``None`` at the end."""
        while not self._buffer:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return None
            await self._wait()
        if self._exception is not None:
            raise self._exception
        chunk = self._buffer.popleft()
        if len(chunk) > size:
            self._buffer.appendleft(chunk[size:])
            chunk = chunk[:size]
        self._drained(len(chunk))
        return chunk

    async def read(self) -> bytes:
        """The rest of the body."""
        parts: list[bytes] = []
        while True:
            if self._buffer or self._exception is not None:
                parts.append(self.read_nowait())  # drains the buffer (reading resumes), or raises
            if self._eof:
                return b"".join(parts)
            await self._wait()

    async def _wait(self) -> None:
        assert self._waiter is None, "one reader at a time"
        connection = self._connection
        assert connection is not None
        if self._continue:
            self._continue = False
            connection.send_continue()
        self._waiter = connection.loop.create_future()
        connection.body_wanted()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _drained(self, taken: int | None = None) -> None:
        self._size = 0 if taken is None else self._size - taken
        if self._connection is not None and self._size < BODY_LOW_WATER:
            self._connection.body_wanted()

    # -- the connection's side --------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        self._continue = False  # the caller is sending without waiting to be invited
        if self._exception is None:
            self._buffer.append(data)
            self._size += len(data)
            self._wake()
        return self._size

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Pieces:
    """``RequestBody.iter_chunked``: a class, not an async generator, which mypyc cannot compile."""

    def __init__(self, body: RequestBody, size: int) -> None:
        self._body = body
        self._size = size

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        piece = await self._body.next_piece(self._size)
        if piece is None:
            raise StopAsyncIteration
        return piece


class Request:
    """One request as the handler sees it (the subset of aiohttp's request idemproxy uses)."""

    __slots__ = (
        "_connection",
        "_state",
        "body_exists",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "transport",
        "version",
    )
    scheme = "http"

    def __init__(
        self,
        method: str,
        raw_path: str,
        version: str,
        headers: CIMultiDictProxy[str],
        content: RequestBody,
        *,
        keep_alive: bool,
        connection: Wire | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content = content
        self.keep_alive = keep_alive
        self._connection = connection
        self.transport = connection.transport if connection is not None else None
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self.body_exists = bool(self.content_length) or "Transfer-Encoding" in headers
        self._state: dict[Any, Any] = {}

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def host(self) -> str:
        return self.headers.get("Host") or "localhost"

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; ``BodyTooLarge`` past ``limit`` bytes (the listener's largest body by default)."""
        if limit is None:
            limit = self._connection.max_body if self._connection is not None else 0
        if self.content_length is not None and self.content_length > limit:
            raise _too_large(limit)
        content = self.content
        if content.is_eof():  # commonly all of it has arrived with the head: no iteration
            whole = content.read_nowait()
            if len(whole) > limit:
                raise _too_large(limit)
            return whole
        body = bytearray()
        async for chunk in content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        return bytes(body)

    # -- per-request state, keyed like aiohttp's (``web.RequestKey``) ----------------------------

    @overload
    def __getitem__(self, key: web.RequestKey[T]) -> T: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: web.RequestKey[T] | str, value: T) -> None:
        self._state[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._state

    @overload
    def get(self, key: web.RequestKey[T], default: None = None) -> T | None: ...
    @overload
    def get(self, key: web.RequestKey[T], default: T) -> T: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body exceeds the largest max_body ({limit} bytes).", max_body=limit)


class StreamResponse:
    """A response written as it is produced: ``prepare``, ``write``..., ``write_eof``."""

    __slots__ = ("_chunked", "_connection", "_finished", "_no_body", "headers", "reason", "status")

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = CIMultiDict(headers) if headers is not None else CIMultiDict()
        self._connection: Wire | None = None
        self._chunked = False
        self._no_body = False
        self._finished = False

    @property
    def prepared(self) -> bool:
        return self._connection is not None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").partition(";")[0].strip()

    async def prepare(self, request: Request) -> None:
        """Send the head. Without a Content-Length the body is chunked (HTTP/1.1) or ends with the connection."""
        connection = request._connection
        if connection is None or self._connection is not None:
            return
        self._connection = connection
        self._no_body = request.method == "HEAD" or self.status in NO_BODY_STATUSES or self.status < 200
        if not self._no_body and "Content-Length" not in self.headers:
            if request.version == "1.1":
                self._chunked = True
                self.headers["Transfer-Encoding"] = "chunked"
            else:
                connection.keep_alive = False
        connection.write(connection.response_head(request, self.status, self.reason, self.headers))
        await connection.drain()

    async def write(self, data: bytes) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self._no_body or not data:
            return
        connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await connection.drain()

    async def write_eof(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._chunked and self._connection is not None:
            self._connection.write(b"0\r\n\r\n")
            await self._connection.drain()


class Response(StreamResponse):
    """A whole response, written in one piece once the handler returns it."""

    __slots__ = ("body",)

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self.body = body
        if content_type is not None:
            self.headers["Content-Type"] = content_type

    async def send(self, request: Request) -> None:
        """Write the response (once: later calls do nothing). ``ValueError`` for an invalid
        head, before anything is written; ``ConnectionResetError`` if the caller left."""
        connection = request._connection
        if connection is None or self._connection is not None:
            return
        headers = self.headers
        status = self.status
        with_body = status not in NO_BODY_STATUSES and status >= 200
        if with_body:
            headers["Content-Length"] = str(len(self.body))
        head = connection.response_head(request, status, self.reason, headers)
        self._connection = connection
        self._finished = True
        connection.write(head + self.body if with_body and request.method != "HEAD" else head)
        await connection.drain()


def problem_reply(exc: ProblemError) -> Response:
    return Response(status=exc.status, body=exc.to_json(), headers=exc.headers, content_type=PROBLEM_CONTENT_TYPE)

"""A lean HTTP/1.1 keep-alive client for upstream tools, on llhttp (httptools).

aiohttp's client spent about 100 µs of CPU per forwarded request here, more
than the ledger; this one does what a reverse proxy needs and nothing else: one
request per connection at a time, pooled per origin, no redirects, no cookies,
no decompression, no automatic resend. Every failure is classified where it
happens (``UpstreamFailed.kind``): nothing was sent (``CONNECT``), the answer
did not come in time (``TIMEOUT``), or the connection broke after the request
was written (``CONNECTION_LOST``).
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL


class FailureKind(StrEnum):
    """How forwarding failed, as far as the proxy can tell."""

    CONNECT = "connect"  # the connection was never established: nothing was sent
    TIMEOUT = "timeout"  # sent, no (complete) answer in time
    CONNECTION_LOST = "connection-lost"  # sent, then reset or closed before a full answer


#: Methods after which a request without a body carries no ``Content-Length: 0`` (as aiohttp).
_BODILESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Buffered response bytes above which the socket stops being read until the consumer catches up.
_HIGH_WATER: Final = 256 * 1024
#: A connection is retired this long before the idle timeout its tool announces
#: (``Keep-Alive: timeout=N``): a request written as the tool closes it would be lost.
KEEPALIVE_MARGIN_S: Final = 1.0
_ANNOUNCED_TIMEOUT: Final = re.compile(r"(?:^|[,;\s])timeout\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
#: RFC 9112 §4, ``reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )``, without obs-text.
_VISIBLE_REASON: Final = re.compile(rb"[\t\x20-\x7e]*")


class UpstreamFailed(Exception):
    """Forwarding did not produce a complete response."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class NotSent(Exception):
    """A send guard refused: the request was never written to the tool."""


SendGuard = Callable[[], bool]
Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True, slots=True, init=False)
class Destination:
    """Where requests go and how long each step may take: the origin (scheme, host and
    port) and the connect and read timeouts (a route's ``upstream`` and its timeouts)."""

    origin: URL
    connect_s: float
    read_s: float

    def __init__(self, origin: URL, connect_s: float, read_s: float) -> None:  # compiled by mypyc
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "connect_s", connect_s)
        object.__setattr__(self, "read_s", read_s)


@dataclass(frozen=True, slots=True, init=False)
class UpstreamRequest:
    """One request as it is written to a tool: ``target`` is the request target
    (``/path?query``). A streamed ``body`` (an async iterable) is sent with ``length``
    as its ``Content-Length``, or chunked when ``length`` is ``None``; ``bytes`` carry
    their own length."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: Body = None
    length: int | None = None

    def __init__(  # compiled by mypyc, unlike a generated one
        self, method: str, target: str, headers: CIMultiDict[str], body: Body = None, length: int | None = None
    ) -> None:
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "length", length)


class UpstreamResponse:
    """One response being read from a pooled connection; ``release`` when done."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_done",
        "_error",
        "_waiter",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None

    async def read(self) -> bytes:
        """The whole body."""
        if self._done and self._error is None:  # commonly all in already: no iteration needed
            chunks = self._chunks
            body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            return body
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (whatever is buffered at each step, joined)."""
        return _Chunks(self)

    async def next_chunk(self) -> bytes | None:
        """What arrived since the last call, joined, once there is something; ``None`` at the end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._connection.consumed()
                return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """Back to the pool when read to the end and reusable; closed otherwise."""
        self._connection.release(self)

    # -- fed by the connection ----------------------------------------------------------

    def _feed(self, chunk: bytes) -> bool:
        """Buffer ``chunk``; ``True`` when the consumer is far enough behind to pause reading."""
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        return self._buffered > _HIGH_WATER

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamFailed) -> None:
        if not self._done and self._error is None:  # the first failure is the cause; a close it forces is not
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())


class _Chunks:
    """``UpstreamResponse.chunks``: a class, not an async generator, which mypyc cannot compile."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses responses with llhttp, one at a time."""

    def __init__(self, pool: UpstreamClient, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_until = 0.0  # while pooled: not taken after this (time.monotonic)
        self.announced_idle_s: float | None = None  # the tool's idle timeout, less the margin
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._headers_ready: asyncio.Future[None] | None = None
        self._raw_headers: list[tuple[str, str]] = []
        self._reason = b""
        self._head_request = False
        self._reusable = False
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # loop time it is due at

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or response._done:  # nothing asked: a server talking out of turn is not reused
            self.close()
            return
        self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(FailureKind.CONNECTION_LOST, f"invalid response from the upstream: {exc}")
            self.close()
        except httptools.HttpParserUpgrade:  # not an HttpParserError: a 101 would escape as a fatal protocol error
            self._fail(FailureKind.CONNECTION_LOST, "the upstream switched protocols")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()  # armed still when the connection was idle in the pool
        self._wake_writer()
        response = self._response
        if response is None or response._done:
            return
        if exc is None and response.status and self._ends_at_close(response):
            response._finish()  # a body delimited by the end of the connection (HTTP/1.0 style)
            self._done_reading()
            return
        reason = f": {exc}" if exc else ""
        self._fail(FailureKind.CONNECTION_LOST, f"the upstream closed the connection before the response ended{reason}")

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self._last_read = self.loop.time()  # the upstream is reading the request: not silent
        self._wake_writer()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        if response is None or response._done:
            # A message after the answer, in the same read: it must not overwrite the answer.
            raise ValueError("the upstream sent more than one response")

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational: the real answer follows
            self._raw_headers = []
            self._reason = b""
            return
        response = self._response
        if response is None:
            return
        response.status = status
        response.reason = reason_phrase(status, self._reason)
        response.headers = headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        self._reusable = self._parser.should_keep_alive()
        announced = headers.get("Keep-Alive")
        if announced is not None and (timeout := _ANNOUNCED_TIMEOUT.search(announced)) is not None:
            self.announced_idle_s = float(timeout.group(1)) - KEEPALIVE_MARGIN_S
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_result(None)
        if self._head_request:  # no body follows, whatever the headers say
            self._reusable = False
            response._finish()
            self._done_reading()

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and response._feed(body) and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or not response.status or response._done:
            return  # the end of an informational response, or of a HEAD answer already finished
        response._finish()
        self._done_reading()

    # -- one exchange ----------------------------------------------------------------------

    async def exchange(
        self, head: bytes, body: Body, *, head_request: bool, read_timeout: float, chunked: bool
    ) -> UpstreamResponse:
        """Write the request, return once the response's headers are in."""
        assert self.transport is not None
        response = self._response = UpstreamResponse(self)
        self._headers_ready = self.loop.create_future()
        self._raw_headers = []
        self._reason = b""
        self._head_request = head_request
        self._reusable = False
        self._read_timeout = read_timeout
        self._last_read = self.loop.time()
        # One timer serves the connection's exchanges one after another: it is only moved when it
        # would fire too late, and when it fires early it waits for the rest (a new timer per
        # exchange, and cancelling it after, cost about 1% of a request's CPU).
        due = self._last_read + read_timeout
        if self._timer is None or self._timer_at > due:
            self._stop_timer()
            self._timer = self.loop.call_at(due, self._check_read_timeout)
            self._timer_at = due  # not TimerHandle.when(): uvloop gives a plain Handle when due at once
        if isinstance(body, bytes):
            self.transport.write(head + body if len(body) < 16 * 1024 else head)
            if len(body) >= 16 * 1024:
                self.transport.write(body)
        else:
            self.transport.write(head)
            if body is not None:
                await self._write_stream(body, chunked=chunked)
        try:
            await self._headers_ready
        except asyncio.CancelledError:
            self.close()
            raise
        if response._error is not None and not response.status:
            raise response._error
        return response

    async def _write_stream(self, body: AsyncIterable[bytes], *, chunked: bool) -> None:
        assert self.transport is not None
        async for chunk in body:
            if self.closed:
                return  # the failure reaches the caller through the response
            if self._answered():
                # The tool answered before the body ended (a 413, say) and may read no more of
                # it: stop sending. Its framing is broken, so the connection is not reused.
                self._reusable = False
                return
            if chunked:
                if chunk:
                    self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                self.transport.write(chunk)
            if self._writable is not None:
                await self._writable  # also woken when the answer is complete or failed
            self._last_read = self.loop.time()  # read_s bounds silence after the request, not the upload
        if chunked and not self.closed:
            self.transport.write(b"0\r\n\r\n")

    def _answered(self) -> bool:
        response = self._response
        return response is not None and (response._done or response._error is not None)

    def _check_read_timeout(self) -> None:
        self._timer = None
        response = self._response
        if response is None or response._done:
            return
        due = self._last_read + self._read_timeout
        if self._paused or due > self.loop.time():  # a slow reader, or data came in meanwhile
            self._timer_at = max(due, self.loop.time() + 0.05)
            self._timer = self.loop.call_at(self._timer_at, self._check_read_timeout)
            return
        self._fail(FailureKind.TIMEOUT, f"no data from the upstream for {self._read_timeout:g} s")
        self.close()

    def consumed(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_read = self.loop.time()
            self.transport.resume_reading()

    def release(self, response: UpstreamResponse) -> None:
        if response is not self._response:
            return
        self._response = None  # the read timer stays for the next exchange: it finds nothing due
        if response._done and self._reusable and not self.closed:
            self.pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # a peer that stopped reading would keep it open forever
            else:
                self.transport.close()
        self.closed = True
        self._stop_timer()
        self._wake_writer()  # a request body blocked on a full buffer stops

    # -- internals ---------------------------------------------------------------------------

    def _ends_at_close(self, response: UpstreamResponse) -> bool:
        """No length and not chunked: the body ends with the connection (RFC 9112 §6.3)."""
        coding = response.headers.get("Transfer-Encoding", "")
        return response.content_length is None and "chunked" not in coding.lower()

    def _fail(self, kind: FailureKind, detail: str) -> None:
        error = UpstreamFailed(kind, detail)
        response = self._response
        if response is not None:
            response._fail(error)
        ready = self._headers_ready
        if ready is not None and not ready.done():
            ready.set_result(None)  # the exchange sees the response's error
        self._stop_timer()
        self._wake_writer()

    def _done_reading(self) -> None:
        self._wake_writer()
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake_writer(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)


class UpstreamClient:
    """Keep-alive connections per origin (scheme, host, port), most recently used first."""

    def __init__(self, *, keepalive_s: float = 30.0) -> None:
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(
        self, destination: Destination, request: UpstreamRequest, guard: SendGuard | None = None
    ) -> UpstreamResponse:
        """Send ``request`` to ``destination``; return once the response's headers are in.

        ``guard`` is asked once a connection is in hand, right before anything is
        written: ``False`` raises ``NotSent``. Failures raise ``UpstreamFailed``."""
        if self._closed:
            raise RuntimeError("the upstream client is closed")
        origin = destination.origin
        head = _request_head(request, _host_header(origin))  # ValueError first
        key = (origin.scheme, origin.raw_host or "", origin.port or 0)
        connection = self._take(key)
        if connection is None:
            connection = await self._connect(key, destination.connect_s)
        try:
            refused = guard is not None and not guard()
        except BaseException:
            connection.close()
            raise
        if refused:
            self._put(connection)  # nothing was written on it
            raise NotSent("the send guard refused")
        body = request.body
        try:
            return await connection.exchange(
                head,
                body,
                head_request=request.method == "HEAD",
                read_timeout=destination.read_s,
                chunked=request.length is None and body is not None and not isinstance(body, bytes),
            )
        except BaseException:
            connection.close()
            raise

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    # -- the pool ------------------------------------------------------------------------------

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_until > now:
                return connection
            connection.close()
        return None

    def _put(self, connection: _Connection) -> None:
        if self._closed or connection.closed:
            connection.close()
            return
        idle_s = self.keepalive_s
        if connection.announced_idle_s is not None:
            idle_s = min(idle_s, connection.announced_idle_s)
        if idle_s <= 0:
            connection.close()
            return
        connection.idle_until = time.monotonic() + idle_s
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweeper is None:
            self._sweeper = connection.loop.call_later(self.keepalive_s, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than ``keepalive_s`` (or than their tool keeps them)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            fresh = [conn for conn in idle if not conn.closed and conn.idle_until > now]
            for connection in idle:
                if connection not in fresh:
                    connection.close()
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(self.keepalive_s / 2, self._sweep)

    async def _connect(self, key: tuple[str, str, int], connect_s: float) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        connection = _Connection(self, key)
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_s):
                await loop.create_connection(lambda: connection, host, port, ssl=tls)
        except TimeoutError as timed_out:  # named apart: see handler.forward_owned
            connection.close()
            raise UpstreamFailed(FailureKind.CONNECT, f"connecting to {host}:{port} timed out") from timed_out
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, unresolvable, TLS handshake
            connection.close()
            raise UpstreamFailed(FailureKind.CONNECT, f"cannot connect to {host}:{port}: {exc}") from exc
        return connection

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


def reason_phrase(status: int, sent: bytes) -> str:
    """The tool's reason phrase if it is visible ASCII (with spaces and tabs), else the standard
    one for ``status`` ("" for a code without one). It is relayed to callers' status lines: a
    control character, an escape sequence or bytes beyond ASCII would reach their terminals
    and logs. Stricter than RFC 9112 §4, which allows obs-text (bytes 0x80-0xFF)."""
    reason = sent.decode("latin-1")
    if reason.isascii() and (reason.isprintable() or _VISIBLE_REASON.fullmatch(sent) is not None):
        return reason  # isprintable() is the common case's shortcut: visible ASCII and spaces, no tabs
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _host_header(origin: URL) -> str:
    host = origin.raw_host or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return host if origin.is_default_port() else f"{host}:{origin.port}"


def _request_head(request: UpstreamRequest, host: str) -> bytes:
    method, body = request.method, request.body
    lines = [f"{method} {request.target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in request.headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif body is not None:
        length = request.length
        lines.append("Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n")
    elif method not in _BODILESS_METHODS:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")

"""The lean upstream client against real servers: pooling, request framing, response
parsing, failure classification, the send guard and the client's lifecycle.

Well-behaved answers come from the aiohttp tool server (``tests.support.upstream``);
misbehaving ones from raw ``asyncio`` servers written here, which send exact bytes
and record what arrived on which connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from idemproxy.decisions import FailureKind
from idemproxy.upstream_client import (
    KEEPALIVE_MARGIN_S,
    Body,
    NotSent,
    UpstreamClient,
    UpstreamFailed,
    UpstreamResponse,
    _host_header,
)
from tests.support.upstream import Upstream

CONNECT_S = 2.0
READ_S = 2.0
#: How long a raw server's state may take to reach an awaited condition before the test fails.
UNTIL_S = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# -- raw servers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    """One request as it arrived on the wire, body de-chunked."""

    connection: int
    line: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]

    def framing(self) -> dict[str, list[str]]:
        """The body-framing headers sent, each with all its values."""
        return {
            name: self.headers.getall(name) for name in ("Content-Length", "Transfer-Encoding") if name in self.headers
        }


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return b"".join(parts)


async def read_request(reader: asyncio.StreamReader, connection: int) -> RawRequest | None:
    """The next request on ``reader`` (Content-Length or chunked body); ``None`` at its end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise AssertionError(f"a request head was cut short: {exc.partial!r}") from exc
        return None
    line, *fields = head[:-4].decode("latin-1").split("\r\n")
    headers = CIMultiDict((name, value.strip()) for name, _, value in (item.partition(":") for item in fields))
    if headers.get("Transfer-Encoding") == "chunked":
        body = await read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return RawRequest(connection, line, headers, body)


@dataclass
class Peer:
    """One accepted connection, as a raw server's handler sees it."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer

    async def request(self) -> RawRequest | None:
        request = await read_request(self.reader, self.number)
        if request is not None:
            self.server.requests.append(request)
            self.server.changed()
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_client_closes(self) -> None:
        """Read and drop whatever comes until the client closes its end."""
        while await self.reader.read(64 * 1024):
            pass

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback server running ``handler`` per connection; records requests and ends."""

    handler: Handler
    connections: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    #: Connections whose handler returned (for most handlers: the client closed its end).
    finished: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> URL:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return URL.build(scheme="http", host=host, port=port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert not self.errors, f"a raw server handler failed: {self.errors!r}"

    def changed(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds for this server's state."""
        async with asyncio.timeout(UNTIL_S):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def served(self) -> list[tuple[int, str]]:
        """(connection, target) of each request received, in order."""
        return [(request.connection, request.target) for request in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        peer = Peer(self.connections, reader, writer, self)
        self.changed()
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request: what some tests do on purpose
        except asyncio.CancelledError:
            pass  # stopped by close(); ending quietly, as Python 3.11's streams log a cancelled handler
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()
            self.finished.append(peer.number)
            self.changed()
            self._tasks.discard(task)


def answering(*responses: bytes) -> Handler:
    """Keep-alive: the n-th request to the server gets ``responses[n]`` (the last one repeats)."""

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(responses[min(len(peer.server.requests), len(responses)) - 1])

    return handler


Serve = Callable[[Handler], Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler)``: a started raw server, closed after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    opened = UpstreamClient()
    yield opened
    await opened.close()


# -- sending ------------------------------------------------------------------------------------


async def send(
    client: UpstreamClient,
    origin: URL | str,
    method: str = "GET",
    target: str = "/",
    *,
    headers: dict[str, str] | None = None,
    body: Body = None,
    length: int | None = None,
    connect_s: float = CONNECT_S,
    read_s: float = READ_S,
    guard: Callable[[], bool] | None = None,
) -> UpstreamResponse:
    return await client.send(
        URL(origin),
        method,
        target,
        CIMultiDict(headers or {}),
        body,
        length=length,
        connect_s=connect_s,
        read_s=read_s,
        guard=guard,
    )


async def fetch(
    client: UpstreamClient, origin: URL | str, method: str = "GET", target: str = "/", **options: Any
) -> tuple[UpstreamResponse, bytes]:
    """Send, read the whole body, release."""
    response = await send(client, origin, method, target, **options)
    try:
        return response, await response.read()
    finally:
        response.release()


async def endless_upload() -> AsyncIterator[bytes]:
    piece = b"x" * 65536
    while True:
        yield piece


async def stream(*chunks: bytes, every_s: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if every_s:
            await asyncio.sleep(every_s)
        yield chunk


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- keep-alive and the pool ------------------------------------------------------------


async def test_sequential_requests_share_one_connection(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(OK))
    for target in ("/first", "/second"):
        response, body = await fetch(client, server.url, target=target)
        assert (response.status, body) == (200, b"ok")
    assert server.connections == 1
    assert server.served() == [(1, "/first"), (1, "/second")]


async def test_an_aiohttp_tool_gets_only_the_headers_given(client: UpstreamClient, upstream: Upstream) -> None:
    for number in (1, 2, 3):
        response, body = await fetch(
            client, upstream.url, "POST", "/items", headers={"X-Call": str(number)}, body=b"{}"
        )
        assert (response.status, orjson.loads(body)["effect"]) == (201, number)
    host = URL(upstream.url).raw_authority
    assert [effect.headers for effect in upstream.effects] == [
        {"Host": host, "X-Call": str(number), "Content-Length": "2"} for number in (1, 2, 3)
    ]  # nothing of the client's own: no User-Agent, Accept or Accept-Encoding


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        pytest.param(OK, True, id="http-1.1"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False, id="connection-close"
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, id="http-1.0"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True, id="http-1.0-keep-alive"
        ),
    ],
)
async def test_a_response_that_ends_the_connection_is_not_reused(
    client: UpstreamClient, serve: Serve, answer: bytes, reused: bool
) -> None:
    server = await serve(answering(answer))  # the server itself would keep reading: only the client decides
    for target in ("/first", "/second"):
        response, body = await fetch(client, server.url, target=target)
        assert (response.status, body) == (200, b"ok")
    if reused:
        assert server.served() == [(1, "/first"), (1, "/second")]
    else:
        assert server.served() == [(1, "/first"), (2, "/second")]
        await server.until(lambda: 1 in server.finished)  # and the client closed it


@pytest.mark.parametrize(
    "farewell",
    [
        pytest.param(None, id="fin"),
        pytest.param(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n", id="unasked-408"),
    ],
)
async def test_a_pooled_connection_the_server_gave_up_on_is_discarded(
    client: UpstreamClient, serve: Serve, farewell: bytes | None
) -> None:
    pooled = asyncio.Event()

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(OK)
            if peer.number == 1:
                await pooled.wait()  # then the server's idle keep-alive timeout strikes
                if farewell is None:
                    peer.writer.write_eof()
                else:
                    await peer.send(farewell)  # as some servers do, without closing
                await peer.until_client_closes()
                return

    server = await serve(handler)
    await fetch(client, server.url, target="/first")
    pooled.set()
    await server.until(lambda: 1 in server.finished)  # the client noticed and closed its end

    response, body = await fetch(client, server.url, "POST", "/second", body=b"{}")

    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]  # sent once, on a new connection


async def test_an_idle_connection_is_closed_after_keepalive(serve: Serve) -> None:
    client = UpstreamClient(keepalive_s=0.05)
    try:
        server = await serve(answering(OK))
        await fetch(client, server.url, target="/first")
        await server.until(lambda: server.finished == [1])  # swept: the client closed it
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]


def announcing(timeout: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nKeep-Alive: %s\r\nContent-Length: 2\r\n\r\nok" % timeout.encode()


@pytest.mark.parametrize(
    ("announced", "reused"),
    [
        pytest.param("timeout=5, max=100", True, id="five-seconds"),
        pytest.param("max=100, Timeout = 30", True, id="any-order-and-case"),
        pytest.param("timeout=1", False, id="within-the-margin"),
        pytest.param("timeout=0", False, id="none"),
        pytest.param("max=100", True, id="no-timeout"),
    ],
)
async def test_a_connection_is_pooled_only_while_its_tool_announces_it_keeps_it(
    serve: Serve, announced: str, reused: bool
) -> None:
    client = UpstreamClient()
    try:
        server = await serve(answering(announcing(announced)))
        await fetch(client, server.url, target="/first")
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (1 if reused else 2, "/second")]


@pytest.mark.parametrize(
    ("keepalive_s", "answer"),
    [
        pytest.param(0.02, OK, id="our-keepalive"),
        pytest.param(30.0, announcing(f"timeout={KEEPALIVE_MARGIN_S + 0.02}"), id="announced-by-the-tool"),
    ],
)
async def test_a_connection_idle_past_keepalive_is_not_taken_from_the_pool(
    serve: Serve, keepalive_s: float, answer: bytes
) -> None:
    client = UpstreamClient(keepalive_s=keepalive_s)
    try:
        server = await serve(answering(answer))
        await fetch(client, server.url, target="/first")
        # Blocks the loop on purpose: time passes, but the sweeper cannot run before the next send.
        time.sleep(0.03)  # noqa: ASYNC251
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]
    await server.until(lambda: 1 in server.finished)


# -- request framing --------------------------------------------------------------------------

BodyFactory = Callable[[], Body]


@pytest.mark.parametrize(
    ("method", "make_body", "length", "framing", "arrived"),
    [
        pytest.param("POST", lambda: b'{"a": 1}', None, {"Content-Length": ["8"]}, b'{"a": 1}', id="bytes"),
        pytest.param(
            "PUT", lambda: b"x" * 100_000, None, {"Content-Length": ["100000"]}, b"x" * 100_000, id="large-bytes"
        ),
        pytest.param("POST", lambda: b"", None, {"Content-Length": ["0"]}, b"", id="empty-bytes"),
        pytest.param("POST", lambda: None, None, {"Content-Length": ["0"]}, b"", id="post-no-body"),
        pytest.param("DELETE", lambda: None, None, {"Content-Length": ["0"]}, b"", id="delete-no-body"),
        pytest.param("GET", lambda: None, None, {}, b"", id="get-no-body"),
        pytest.param(
            "POST", lambda: stream(b"ab", b"cd", b"e"), 5, {"Content-Length": ["5"]}, b"abcde", id="stream-with-length"
        ),
        pytest.param(
            "POST",
            lambda: stream(b"ab", b"", b"c" * 70_000, b"d"),
            None,
            {"Transfer-Encoding": ["chunked"]},
            b"ab" + b"c" * 70_000 + b"d",
            id="stream-chunked",
        ),
        pytest.param(
            "POST", lambda: stream(b""), None, {"Transfer-Encoding": ["chunked"]}, b"", id="empty-stream-chunked"
        ),
    ],
)
async def test_request_framing(
    client: UpstreamClient,
    serve: Serve,
    method: str,
    make_body: BodyFactory,
    length: int | None,
    framing: dict[str, list[str]],
    arrived: bytes,
) -> None:
    server = await serve(answering(OK))
    response, body = await fetch(client, server.url, method, "/framed?q=1", body=make_body(), length=length)
    assert (response.status, body) == (200, b"ok")
    [request] = server.requests
    assert request.line == f"{method} /framed?q=1 HTTP/1.1"
    assert request.framing() == framing
    assert request.body == arrived
    await fetch(client, server.url, target="/next")  # the framing left the connection in step
    assert server.served() == [(1, "/framed?q=1"), (1, "/next")]


async def test_a_chunked_stream_reaches_an_aiohttp_tool_intact(client: UpstreamClient, upstream: Upstream) -> None:
    pieces = [b'{"n": ', b"", b"1" * 50_000, b"}"]
    response, body = await fetch(client, upstream.url, "POST", "/items", body=stream(*pieces))
    assert response.status == 201
    assert orjson.loads(body)["body"] == b"".join(pieces).decode()
    assert upstream.effects[0].body == b"".join(pieces)


async def test_headers_are_sent_as_given_with_the_host_and_port(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(OK))
    await fetch(client, server.url, headers={"X-One": "1", "Authorization": "Bearer t", "X-Utf8": "caf\u00e9"})
    [request] = server.requests
    assert request.headers.getall("Host") == [f"127.0.0.1:{server.url.port}"]
    assert request.headers["X-One"] == "1"
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["X-Utf8"].encode("latin-1").decode() == "caf\u00e9"


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://tool.internal", "tool.internal"),
        ("http://tool.internal:80", "tool.internal"),
        ("https://tool.internal:443", "tool.internal"),
        ("https://tool.internal:8443", "tool.internal:8443"),
        ("http://tool.internal:443", "tool.internal:443"),
        ("http://[::1]:8080", "[::1]:8080"),
        ("http://[::1]", "[::1]"),
    ],
)
async def test_the_host_header_has_the_port_only_when_not_the_default(origin: str, host: str) -> None:
    assert _host_header(URL(origin)) == host


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Evil": "a\r\nX-Injected: b"}, id="crlf-in-value"),
        pytest.param({"X-Evil": "a\nb"}, id="lf-in-value"),
        pytest.param({"X-Evil": "a\rb"}, id="cr-in-value"),
        pytest.param({"X-Evil\r\nX-Injected": "b"}, id="crlf-in-name"),
    ],
)
async def test_a_line_break_in_a_header_raises_before_anything_is_sent(
    client: UpstreamClient, serve: Serve, headers: dict[str, str]
) -> None:
    server = await serve(answering(OK))
    asked: list[bool] = []

    def guard() -> bool:
        asked.append(True)
        return True

    with pytest.raises(ValueError, match="line break"):
        await send(client, server.url, "POST", "/evil", headers=headers, body=b"{}", guard=guard)

    assert asked == []  # refused before the guard was asked: nothing was about to be written
    await fetch(client, server.url, target="/after")
    assert server.served() == [(1, "/after")]  # nothing sent, no connection spoiled or left open


# -- response parsing ---------------------------------------------------------------------------


async def test_a_content_length_response(client: UpstreamClient, upstream: Upstream) -> None:
    response, body = await fetch(client, upstream.url, "POST", "/items", body=b'{"x": 1}')
    assert (response.status, response.reason) == (201, "Created")
    assert response.headers["X-Tool"] == "items"
    assert response.content_length == len(body)
    assert orjson.loads(body) == {"effect": 1, "method": "POST", "body": '{"x": 1}'}


async def test_response_headers_keep_repeats_and_the_reason(client: UpstreamClient, serve: Serve) -> None:
    answer = b"HTTP/1.1 201 Made It\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
    server = await serve(answering(answer))
    response, body = await fetch(client, server.url)
    assert (response.status, response.reason, body) == (201, "Made It", b"")
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["X-Empty"] == ""
    assert response.content_length == 0


async def test_a_chunked_response_with_trailers(client: UpstreamClient, serve: Serve) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    server = await serve(answering(answer, OK))
    response, body = await fetch(client, server.url, target="/chunked")
    assert (response.status, body) == (200, b"hello world")
    assert response.content_length is None
    assert "X-Checksum" not in response.headers  # trailers arrive after the headers were handed out
    response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/chunked"), (1, "/next")]  # the trailers were consumed in full


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\n", id="http-1.0"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", id="http-1.1-connection-close"),
        # A coding other than chunked last: the body ends with the connection (RFC 9112 §6.3).
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", id="non-chunked-coding"),
    ],
)
async def test_a_body_delimited_by_the_end_of_the_connection(client: UpstreamClient, serve: Serve, head: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head)
        await peer.send(b"hello ")
        await peer.send(b"world")  # then the connection closes (a FIN)

    server = await serve(handler)
    response, body = await fetch(client, server.url)
    assert (response.status, response.content_length, body) == (200, None, b"hello world")


async def test_a_reset_does_not_end_a_close_delimited_body(client: UpstreamClient, serve: Serve) -> None:
    headers_in = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.0 200 OK\r\n\r\npartial")
        await headers_in.wait()
        peer.reset()

    server = await serve(handler)
    response = await send(client, server.url)
    try:
        headers_in.set()
        with pytest.raises(UpstreamFailed) as failed:
            await response.read()
    finally:
        response.release()
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", 204, id="204"),
        pytest.param(b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\nContent-Length: 5\r\n\r\n', 304, id="304-with-length"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", 304, id="304-chunked"),
    ],
)
async def test_bodiless_statuses_complete_without_a_body(
    client: UpstreamClient, serve: Serve, answer: bytes, status: int
) -> None:
    server = await serve(answering(answer, OK))
    response, body = await fetch(client, server.url, target="/empty")
    assert (response.status, body) == (status, b"")
    response, body = await fetch(client, server.url, target="/next")
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/empty"), (1, "/next")]


FINAL = b"HTTP/1.1 200 OK\r\nX-Real: yes\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    "writes",
    [
        pytest.param([b"HTTP/1.1 100 Continue\r\n\r\n" + FINAL], id="100-same-write"),
        pytest.param([b"HTTP/1.1 100 Continue\r\n\r\n", FINAL], id="100-own-write"),
        pytest.param(
            [
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n",
                FINAL,
            ],
            id="103-then-100",
        ),
    ],
)
async def test_informational_responses_are_skipped(client: UpstreamClient, serve: Serve, writes: list[bytes]) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            for data in writes if len(peer.server.requests) == 1 else [OK]:
                await peer.send(data)

    server = await serve(handler)
    response, body = await fetch(client, server.url, "POST", "/hinted", body=b"{}")
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    assert response.headers["X-Real"] == "yes"
    assert "Link" not in response.headers  # the hint's headers are not the answer's
    await fetch(client, server.url, target="/next")
    assert server.served() == [(1, "/hinted"), (1, "/next")]


async def test_a_head_response_has_no_body_whatever_its_length(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", OK))
    response, body = await fetch(client, server.url, "HEAD", "/head")
    assert (response.status, response.content_length, body) == (200, 1000, b"")
    response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/head"), (2, "/next")]  # not reused after a HEAD


async def test_a_head_request_to_an_aiohttp_tool(client: UpstreamClient, upstream: Upstream) -> None:
    response, body = await fetch(client, upstream.url, "HEAD", "/big/4096")
    assert (response.status, response.content_length, body) == (200, 4096, b"")
    response, body = await fetch(client, upstream.url, "GET", "/big/10")
    assert (response.status, body) == (200, b"x" * 10)


async def test_a_response_head_split_into_single_bytes(client: UpstreamClient, serve: Serve) -> None:
    answer = b"HTTP/1.1 202 Accepted\r\nX-A: one\r\nX-B: two words\r\nContent-Length: 5\r\n\r\nhello"

    async def handler(peer: Peer) -> None:
        await peer.request()
        for index in range(len(answer)):
            await peer.send(answer[index : index + 1])
        await peer.until_client_closes()

    server = await serve(handler)
    response, body = await fetch(client, server.url)
    assert (response.status, response.reason, body) == (202, "Accepted", b"hello")
    assert (response.headers["X-A"], response.headers["X-B"]) == ("one", "two words")


async def test_a_large_body_streams_with_flow_control(client: UpstreamClient, upstream: Upstream) -> None:
    size = 5 * 1024 * 1024
    response = await send(client, upstream.url, target=f"/big/{size}", read_s=0.25)
    try:
        assert response.content_length == size
        received: list[bytes] = []
        async for chunk in response.chunks():
            received.append(chunk)
            if len(received) == 1:
                # A slow consumer, for longer than read_s: the reading pauses, and that is no timeout.
                await asyncio.sleep(0.5)
    finally:
        response.release()
    assert b"".join(received) == b"x" * size
    assert len(received) > 1
    assert max(len(chunk) for chunk in received) < 1024 * 1024  # not all buffered while the consumer slept


async def test_a_steady_trickle_is_not_a_timeout(client: UpstreamClient, upstream: Upstream) -> None:
    upstream.trickle_chunks = 6
    upstream.trickle_every_s = 0.05
    # Every piece comes well within read_s, though the whole body takes longer than read_s.
    response, body = await fetch(client, upstream.url, "POST", "/trickle", body=b"{}", read_s=0.25)
    assert response.status == 201
    assert body == b"".join(f"chunk {n}\n".encode() for n in range(6))


# -- failures -------------------------------------------------------------------------------------


async def test_a_refused_connection_is_connect(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, f"http://127.0.0.1:{free_port()}", "POST", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECT


async def test_a_connect_timeout_is_connect(client: UpstreamClient) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs until connect_s.
    # (Unlike a non-routable address, this needs no network: sandboxes may intercept outbound TCP.)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            with pytest.raises(UpstreamFailed) as failed:
                await send(client, f"http://127.0.0.1:{port}", "POST", body=b"{}", connect_s=0.05, read_s=0.05)
        finally:
            for filler in fillers:
                filler.close()
    assert failed.value.kind is FailureKind.CONNECT
    assert "timed out" in failed.value.detail


async def test_an_unresolvable_host_is_connect(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, "http://no-such-host.invalid:81", connect_s=2.0)
    assert failed.value.kind is FailureKind.CONNECT


async def test_no_answer_within_read_s_is_timeout(client: UpstreamClient, serve: Serve) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_client_closes()  # never answers

    server = await serve(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "POST", "/silent", body=b"{}", read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert server.served() == [(1, "/silent")]
    await server.until(lambda: server.finished == [1])  # the timed-out connection was closed


async def test_an_aiohttp_tool_that_does_not_answer_in_time_is_timeout(
    client: UpstreamClient, upstream: Upstream
) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, upstream.url, "POST", "/gate", body=b"{}", read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert upstream.count("/gate") == 1
    upstream.release.set()


async def test_a_body_that_stalls_is_timeout(client: UpstreamClient, serve: Serve) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await peer.until_client_closes()

    server = await serve(handler)
    response = await send(client, server.url, read_s=0.1)
    try:
        with pytest.raises(UpstreamFailed) as failed:
            await response.read()
    finally:
        response.release()
    assert failed.value.kind is FailureKind.TIMEOUT
    await server.until(lambda: server.finished == [1])


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_close_after_the_request_is_connection_lost(client: UpstreamClient, serve: Serve, how: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if how == "rst":
            peer.reset()

    server = await serve(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "POST", "/dropped", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert server.served() == [(1, "/dropped")]


async def test_an_aiohttp_tool_dropping_the_connection_is_connection_lost(
    client: UpstreamClient, upstream: Upstream
) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, upstream.url, "POST", "/reset", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert upstream.count("/reset") == 1


@pytest.mark.parametrize("reader", ["read", "chunks"])
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..", id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nhalf", id="mid-chunk"),
    ],
)
async def test_a_close_mid_body_is_connection_lost(
    client: UpstreamClient, serve: Serve, answer: bytes, reader: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)  # then closes: less than was promised

    server = await serve(handler)
    received: list[bytes] = []

    async def read_all(response: UpstreamResponse) -> None:
        if reader == "read":
            received.append(await response.read())
        else:
            received.extend([chunk async for chunk in response.chunks()])

    response = await send(client, server.url)
    try:
        assert response.status == 200
        with pytest.raises(UpstreamFailed) as failed:
            await read_all(response)
    finally:
        response.release()
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert len(b"".join(received)) < 100  # what came before the break, never passed off as all of it


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 2000 Nope\r\n\r\n", id="bad-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="bad-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk"),
    ],
)
async def test_garbage_instead_of_a_response_is_connection_lost(
    client: UpstreamClient, serve: Serve, answer: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_client_closes()  # the client must give up by itself

    server = await serve(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await fetch(client, server.url)
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    await server.until(lambda: server.finished == [1])


async def test_a_protocol_switch_is_connection_lost(
    client: UpstreamClient, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00"

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_client_closes()

    server = await serve(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    await server.until(lambda: server.finished == [1])
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []


@pytest.mark.parametrize("extra_write", [False, True], ids=["same-write", "own-write"])
async def test_bytes_after_a_complete_response_spoil_the_connection(
    client: UpstreamClient, serve: Serve, extra_write: bool
) -> None:
    stray = b"HTTP/1.1 500 Stray\r\nContent-Length: 5\r\n\r\nstray"

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            if peer.number == 1 and extra_write:
                await peer.send(OK)
                await peer.send(stray)
            elif peer.number == 1:
                await peer.send(OK + stray)
            else:
                await peer.send(OK)

    server = await serve(handler)
    response, body = await fetch(client, server.url, target="/first")
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    await server.until(lambda: 1 in server.finished)  # the client closed the talkative connection
    response, body = await fetch(client, server.url, target="/second")
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]


# -- the send guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True], ids=["new-connection", "pooled-connection"])
async def test_a_refusing_guard_writes_nothing_and_keeps_the_connection(
    client: UpstreamClient, serve: Serve, pooled: bool
) -> None:
    server = await serve(answering(OK))
    if pooled:
        await fetch(client, server.url, target="/before")
    asked: list[bool] = []

    def refuse() -> bool:
        asked.append(True)
        return False

    with pytest.raises(NotSent):
        await send(client, server.url, "POST", "/refused", body=b"{}", guard=refuse)

    assert asked == [True]
    response, body = await fetch(client, server.url, "POST", "/after", body=b"{}", guard=lambda: True)
    assert (response.status, body) == (200, b"ok")
    # The next request went out cleanly on the very same connection: nothing of the refused one was written.
    assert server.served() == ([(1, "/before")] if pooled else []) + [(1, "/after")]
    assert server.connections == 1


async def test_a_guard_that_raises_closes_the_connection_it_was_asked_about(
    client: UpstreamClient, serve: Serve
) -> None:
    server = await serve(answering(OK, OK))
    await fetch(client, server.url, target="/before")

    def broken() -> bool:
        raise LookupError("the lease table is gone")

    with pytest.raises(LookupError):
        await send(client, server.url, "POST", "/refused", body=b"{}", guard=broken)

    response, body = await fetch(client, server.url, target="/after")
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/before"), (2, "/after")]  # the first connection was closed, not pooled
    assert server.connections == 2


# -- releasing, cancelling, closing -------------------------------------------------------------


async def test_releasing_an_unread_response_closes_the_connection(client: UpstreamClient, serve: Serve) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000

    server = await serve(answering(big, OK))
    response = await send(client, server.url, target="/big")
    assert response.status == 200
    response.release()
    response.release()  # twice is harmless
    await server.until(lambda: 1 in server.finished)
    response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/big"), (2, "/next")]


async def test_releasing_a_response_read_to_the_end_keeps_the_connection(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", OK))
    response = await send(client, server.url, target="/first")
    assert [chunk async for chunk in response.chunks()] == [b"abc"]
    response.release()
    await fetch(client, server.url, target="/second")
    assert server.served() == [(1, "/first"), (1, "/second")]


async def test_cancelling_send_while_waiting_for_the_head_closes_the_connection(
    client: UpstreamClient, serve: Serve
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            if peer.number == 1:
                await peer.until_client_closes()  # never answers the first connection
                return
            await peer.send(OK)

    server = await serve(handler)
    sending = asyncio.create_task(send(client, server.url, "POST", "/hung", body=b"{}"))
    await server.until(lambda: len(server.requests) == 1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await server.until(lambda: 1 in server.finished)  # closed, not pooled with an answer pending
    _response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/hung"), (2, "/next")]


async def test_close_closes_idle_connections_and_refuses_new_sends(serve: Serve) -> None:
    client = UpstreamClient()
    server = await serve(answering(OK))
    await fetch(client, server.url)
    await client.close()
    await server.until(lambda: server.finished == [1])
    with pytest.raises(RuntimeError, match="closed"):
        await send(client, server.url)
    await client.close()  # twice is harmless
    assert server.connections == 1


async def test_a_response_in_flight_at_close_is_not_pooled_after(serve: Serve) -> None:
    client = UpstreamClient()
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"))
    response = await send(client, server.url)
    await client.close()
    assert await response.read() == b"abc"
    response.release()
    await server.until(lambda: server.finished == [1])


# -- streamed request bodies against a slow or stuck tool -----------------------------------------


async def test_a_slow_steady_upload_is_not_a_timeout(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(OK))
    pieces = [b"piece %d;" % n for n in range(8)]
    # Each piece goes out well within read_s, though the upload takes longer than read_s.
    response, body = await fetch(client, server.url, "PUT", "/upload", body=stream(*pieces, every_s=0.05), read_s=0.25)
    assert (response.status, body) == (200, b"ok")
    assert server.requests[0].body == b"".join(pieces)


async def test_an_upload_that_stalls_past_read_s_is_timeout(client: UpstreamClient, serve: Serve) -> None:
    server = await serve(answering(OK))
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "PUT", "/upload", body=stream(b"a", b"b", every_s=0.3), read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT  # not the connection loss the timeout itself caused
    assert "no data" in failed.value.detail
    await server.until(lambda: server.finished == [1])
    assert server.requests == []  # the body never completed


async def test_an_answer_before_the_upload_ends_stops_the_upload(client: UpstreamClient, serve: Serve) -> None:
    """A tool may refuse a body early (413) and stop reading it: the answer is returned,
    the rest of the body is not sent, and the connection is not reused."""
    refused = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"

    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")  # the head only
        await peer.send(refused)
        await asyncio.Event().wait()  # and no more reading: the socket buffers fill up

    server = await serve(handler)
    async with asyncio.timeout(5):  # a hang fails here, not at the suite's timeout
        response, body = await fetch(client, server.url, "PUT", "/upload", body=endless_upload(), read_s=30)
    assert (response.status, body) == (413, b"too big!")
    assert (await fetch(client, server.url))[0].status == 413  # on a new connection: the server's second
    assert server.connections == 2


async def test_a_tool_that_stops_reading_the_body_is_timeout(client: UpstreamClient, serve: Serve) -> None:
    async def handler(peer: Peer) -> None:
        await asyncio.Event().wait()  # reads nothing, answers nothing: the socket buffers fill up

    server = await serve(handler)
    async with asyncio.timeout(5):  # a hang fails here, not at the suite's timeout
        with pytest.raises(UpstreamFailed) as failed:
            await send(client, server.url, "PUT", "/upload", body=endless_upload(), read_s=0.2)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert "no data" in failed.value.detail
    assert server.connections == 1

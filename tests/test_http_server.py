"""The proxy listener's HTTP/1.1 server (``idemproxy.http_server``) against raw callers.

The real ``HttpServer`` runs on a loopback port; tests talk to it with raw ``asyncio``
streams sending exact bytes (and read exact bytes back), plus a few through
``aiohttp.ClientSession`` for ordinary use. Handlers signal with ``asyncio.Event``s when
they run or finish; timeouts are tiny and awaited as closed connections, never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from idemproxy import http_server
from idemproxy.errors import BodyTooLarge, IncompleteBody, ProblemError
from idemproxy.http_messages import (
    BODY_HIGH_WATER,
    BODY_LOW_WATER,
    Request,
    Response,
    StreamResponse,
    problem_reply,
)
from idemproxy.http_server import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    HttpServer,
)

#: How long any awaited condition (a reply, a close, an event) may take before the test fails.
UNTIL_S = 5.0
#: How long a loopback answer that should come at once may take before the server counts as stuck.
STUCK_S = 1.0
PROBLEM = "application/problem+json"

Handler = Callable[[Request], Awaitable[StreamResponse]]

# -- the caller's side: raw connections and replies ----------------------------------------------


@dataclass
class Reply:
    """One response as it arrived on the wire, body de-chunked."""

    version: str
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes
    head: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("Content-Type") == PROBLEM, self
        document: dict[str, Any] = json.loads(self.body)
        assert document["status"] == self.status
        return document

    def slug(self) -> str:
        problem_type: str = self.problem()["type"]
        assert problem_type.startswith("urn:idemproxy:problem:")
        return problem_type.rpartition(":")[2]


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readuntil(b"\r\n") == b"\r\n"  # the server sends no trailers
    return b"".join(parts)


async def read_reply(reader: asyncio.StreamReader, *, method: str = "GET", within_s: float = UNTIL_S) -> Reply:
    """The next response on ``reader``: Content-Length, chunked, or close-delimited."""
    async with asyncio.timeout(within_s):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(f"the connection ended instead of a response: {exc.partial!r}") from exc
        line, *fields = head[:-4].decode("utf-8", "surrogateescape").split("\r\n")
        version, status, reason = line.split(" ", 2)
        headers: CIMultiDict[str] = CIMultiDict()
        for item in fields:
            name, colon, value = item.partition(":")
            assert colon, f"a response field without a colon: {item!r}"
            assert name == name.strip(), f"a response field name with spaces: {item!r}"
            headers.add(name, value.strip())
        code = int(status)
        if method == "HEAD" or code in (204, 304) or code < 200:
            body = b""
        elif headers.get("Transfer-Encoding") == "chunked":
            body = await read_chunked(reader)
        elif "Content-Length" in headers:
            try:
                body = await reader.readexactly(int(headers["Content-Length"]))
            except asyncio.IncompleteReadError as exc:
                raise AssertionError(
                    f"the body was cut short: {len(exc.partial)} of {headers['Content-Length']} bytes"
                ) from exc
        else:
            body = await reader.read()
    return Reply(version.removeprefix("HTTP/"), code, reason, headers, body, head)


@dataclass
class Caller:
    """One raw connection to the server under test."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, method: str = "GET", within_s: float = UNTIL_S) -> Reply:
        return await read_reply(self.reader, method=method, within_s=within_s)

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        parts: list[bytes] = []
        async with asyncio.timeout(UNTIL_S):
            with contextlib.suppress(ConnectionResetError):
                while data := await self.reader.read(65536):
                    parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Served:
    """A started ``HttpServer`` and the callers connected to it."""

    http: HttpServer
    server: asyncio.Server
    callers: list[Caller] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connect(self, *, rcvbuf: int | None = None) -> Caller:
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
        caller = Caller(reader, writer)
        self.callers.append(caller)
        return caller

    async def exchange(self, data: bytes, *, method: str = "GET") -> Reply:
        """Send ``data`` on a new connection and read one response."""
        caller = await self.connect()
        await caller.send(data)
        return await caller.reply(method=method)

    async def leave_mid_request(self, started: asyncio.Event) -> None:
        """A caller asks for ``/left`` and hangs up once its handler ``started``; returns when
        the server has seen it go."""
        caller = await self.connect()
        await caller.send(get("/left"))
        await wait(started)
        caller.close()
        await until(lambda: not self.http.connections)


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler, header_timeout_s=..., max_body=...)``: a started server, shut down after the test."""
    started: list[Served] = []

    async def start(handler: Handler, *, header_timeout_s: float = UNTIL_S, max_body: int = 1 << 20) -> Served:
        http = HttpServer(handler, header_timeout_s=header_timeout_s, max_body=max_body)
        server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
        served = Served(http, server)
        started.append(served)
        return served

    yield start
    for served in started:
        for caller in served.callers:
            caller.close()
        served.server.close()
        await served.http.shutdown(0)
        await served.server.wait_closed()
        for caller in served.callers:
            with contextlib.suppress(ConnectionError):
                await caller.writer.wait_closed()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate`` holds (state the server exposes no event for)."""
    async with asyncio.timeout(UNTIL_S):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)


async def wait(event: asyncio.Event) -> None:
    async with asyncio.timeout(UNTIL_S):
        await event.wait()


def get(target: str = "/", *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    """A request head without a body (``headers`` as ``"Name: value"``)."""
    lines = [f"{method} {target} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(target: str, body: bytes, *headers: str) -> bytes:
    return get(target, f"Content-Length: {len(body)}", *headers, method="POST") + body


# -- handlers -----------------------------------------------------------------------------------


@dataclass
class Seen:
    """What a handler saw of one request."""

    method: str
    raw_path: str
    version: str
    headers: CIMultiDict[str]
    body: bytes | None = None
    error: BaseException | None = None


@dataclass
class Recorder:
    """A handler that records each request, reads its body and answers with it."""

    seen: list[Seen] = field(default_factory=list)
    read_body: bool = True

    async def __call__(self, request: Request) -> StreamResponse:
        seen = Seen(request.method, request.raw_path, request.version, CIMultiDict(request.headers))
        self.seen.append(seen)
        if self.read_body:
            try:
                seen.body = await request.read()
            except ProblemError as exc:
                seen.error = exc
                return problem_reply(exc)
        return Response(body=seen.body or b"", headers={"X-Path": request.raw_path})

    @property
    def paths(self) -> list[str]:
        return [seen.raw_path for seen in self.seen]


@dataclass
class Held(Recorder):
    """A ``Recorder`` that signals when a request reaches it and answers only once released."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> StreamResponse:
        self.started.set()
        await self.release.wait()
        return await super().__call__(request)


async def answer_ok(request: Request) -> StreamResponse:
    return Response(body=b"ok", content_type="text/plain")


# -- one request, keep-alive and the request's attributes ---------------------------------------------


async def test_a_request_reaches_the_handler_with_its_attributes(serve: Serve) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> StreamResponse:
        seen.update(
            method=request.method,
            raw_path=request.raw_path,
            path=request.path,
            version=request.version,
            multi=request.headers.getall("x-multi"),
            content_length=request.content_length,
            body_exists=request.body_exists,
            keep_alive=request.keep_alive,
            host=request.host,
            scheme=request.scheme,
            peer=request.transport.get_extra_info("peername") if request.transport is not None else None,
            body=await request.read(),
        )
        return Response(status=201, body=b"made", content_type="text/plain")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(
        b"POST /items/1?x=1&y=2 HTTP/1.1\r\nHost: example.test:8080\r\nX-Multi: a\r\n"
        b"x-multi: b\r\nContent-Length: 5\r\n\r\nhello"
    )
    reply = await caller.reply()

    assert (reply.version, reply.status, reply.reason, reply.body) == ("1.1", 201, "Created", b"made")
    assert reply.headers["Content-Length"] == "4"
    assert reply.headers["Content-Type"] == "text/plain"
    assert "Connection" not in reply.headers  # HTTP/1.1 keep-alive is the default
    assert seen == {
        "method": "POST",
        "raw_path": "/items/1?x=1&y=2",
        "path": "/items/1",
        "version": "1.1",
        "multi": ["a", "b"],
        "content_length": 5,
        "body_exists": True,
        "keep_alive": True,
        "host": "example.test:8080",
        "scheme": "http",
        "peer": caller.writer.get_extra_info("sockname"),
        "body": b"hello",
    }


async def test_a_request_without_a_body_has_an_empty_finished_body(serve: Serve) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> StreamResponse:
        seen.update(
            content_length=request.content_length,
            body_exists=request.body_exists,
            is_eof=request.content.is_eof(),
            at_eof=request.content.at_eof(),
            host=request.host,
            body=await request.read(),
        )
        return Response()

    served = await serve(handler)
    reply = await served.exchange(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.1 must send Host

    assert (reply.status, reply.body, reply.headers["Content-Length"]) == (200, b"", "0")
    assert seen == {
        "content_length": None,
        "body_exists": False,
        "is_eof": True,
        "at_eof": True,
        "host": "localhost",  # no Host field
        "body": b"",
    }


async def test_a_zero_content_length_is_not_a_body(serve: Serve) -> None:
    seen: list[tuple[int | None, bool]] = []

    async def handler(request: Request) -> StreamResponse:
        seen.append((request.content_length, request.body_exists))
        return Response()

    served = await serve(handler)
    await served.exchange(post("/", b""))
    await served.exchange(get("/", "Transfer-Encoding: chunked", method="POST") + b"0\r\n\r\n")

    assert seen == [(0, False), (None, True)]


async def test_keep_alive_serves_several_requests_on_one_connection(serve: Serve) -> None:
    peers: list[Any] = []

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        body = await request.read()
        return Response(body=request.raw_path.encode() + b":" + body)

    served = await serve(handler)
    caller = await served.connect()
    replies: list[Reply] = []
    for number in range(3):
        await caller.send(post(f"/{number}", b"x" * number))
        replies.append(await caller.reply())

    assert [reply.body for reply in replies] == [b"/0:", b"/1:x", b"/2:xx"]
    assert all("Connection" not in reply.headers for reply in replies)
    assert peers == [caller.writer.get_extra_info("sockname")] * 3


async def test_the_request_carries_state_for_the_pipeline(serve: Serve) -> None:
    typed: web.RequestKey[int] = web.RequestKey("typed", int)
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> StreamResponse:
        untyped = request.get("name")  # type: ignore[call-overload]  # get() declares RequestKey overloads only
        seen["before"] = ("name" in request, typed in request, untyped, request.get(typed, 7))
        request["name"] = "value"
        request[typed] = 42
        seen["after"] = ("name" in request, request["name"], request[typed], request.get(typed, 7))
        with pytest.raises(KeyError):
            _ = request["missing"]
        return Response()

    served = await serve(handler)
    reply = await served.exchange(get())

    assert reply.status == 200
    assert seen == {"before": (False, False, None, 7), "after": (True, "value", 42, 42)}


async def test_non_utf8_header_bytes_arrive_as_surrogateescape_and_go_back_unchanged(serve: Serve) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        seen.append(request.headers["X-Raw"])
        return Response(headers={"X-Echo": request.headers["X-Raw"]})

    served = await serve(handler)
    reply = await served.exchange(b"GET / HTTP/1.1\r\nHost: test\r\nX-Raw: caf\xe9 \xff\xfe\r\n\r\n")

    assert seen == ["caf\udce9 \udcff\udcfe"]
    assert b"\r\nX-Echo: caf\xe9 \xff\xfe\r\n" in reply.head


async def test_the_date_header_is_added_unless_the_handler_set_one(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        if request.path == "/own":
            return Response(headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT"})
        return Response()

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/added"))
    added = await caller.reply()
    await caller.send(get("/own"))
    own = await caller.reply()

    assert added.headers["Date"].endswith(" GMT")
    assert len(added.headers.getall("Date")) == 1
    assert own.headers.getall("Date") == ["Thu, 01 Jan 1970 00:00:00 GMT"]


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        pytest.param(200, None, b"HTTP/1.1 200 OK\r\n", id="default"),
        pytest.param(404, None, b"HTTP/1.1 404 Not Found\r\n", id="default-404"),
        pytest.param(299, None, b"HTTP/1.1 299 \r\n", id="unknown-status"),
        pytest.param(200, "Fine Thanks", b"HTTP/1.1 200 Fine Thanks\r\n", id="custom"),
    ],
)
async def test_the_status_line(serve: Serve, status: int, reason: str | None, line: bytes) -> None:
    async def handler(request: Request) -> StreamResponse:
        return Response(status=status, reason=reason)

    served = await serve(handler)
    reply = await served.exchange(get())

    assert reply.head.startswith(line)


# -- through aiohttp's client --------------------------------------------------------------------


async def test_aiohttp_client_posts_and_reuses_its_connection(serve: Serve) -> None:
    peers: list[Any] = []

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        document = json.loads(await request.read())
        return Response(body=json.dumps({"got": document}).encode(), content_type="application/json")

    served = await serve(handler)
    async with aiohttp.ClientSession() as session:
        for number in range(3):
            async with session.post(f"{served.url}/items", json={"n": number}) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                assert await response.json() == {"got": {"n": number}}

    assert len(peers) == 3
    assert len(set(peers)) == 1  # one pooled connection served all three


async def test_aiohttp_client_reads_a_streamed_response(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for piece in (b"one ", b"two ", b"three"):
            await response.write(piece)
        await response.write_eof()
        return response

    served = await serve(handler)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"{served.url}/stream") as response:
                assert response.status == 200
                assert response.headers["Transfer-Encoding"] == "chunked"
                assert await response.read() == b"one two three"


async def test_aiohttp_client_streams_a_chunked_upload(serve: Serve) -> None:
    recorder = Recorder()

    async def upload() -> AsyncIterator[bytes]:
        for piece in (b"a" * 1000, b"b" * 70_000, b"c"):
            yield piece

    served = await serve(recorder)
    async with aiohttp.ClientSession() as session, session.post(f"{served.url}/up", data=upload()) as response:
        assert response.status == 200
        assert await response.read() == b"a" * 1000 + b"b" * 70_000 + b"c"

    assert recorder.seen[0].headers["Transfer-Encoding"] == "chunked"


async def test_aiohttp_client_with_expect_100_continue(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{served.url}/put", data=b"payload", expect100=True) as response,
    ):
        assert response.status == 200
        assert await response.read() == b"payload"

    assert recorder.seen[0].headers["Expect"] == "100-continue"


async def test_aiohttp_client_gets_the_answer_to_a_head_request(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        return Response(body=b"twelve bytes", content_type="text/plain")

    served = await serve(handler)
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{served.url}/") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "12"
            assert await response.read() == b""
        async with session.get(f"{served.url}/") as response:
            assert await response.read() == b"twelve bytes"


# -- request bodies ------------------------------------------------------------------------------


async def test_a_body_arriving_in_pieces_reaches_the_handler_whole(serve: Serve) -> None:
    got_piece = asyncio.Event()
    pieces: list[bytes] = []

    async def handler(request: Request) -> StreamResponse:
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 20):
            pieces.append(chunk)
            body += chunk
            got_piece.set()
        return Response(body=bytes(body))

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 15", method="POST"))
    for piece in (b"first", b"-sec", b"ond-th"):
        got_piece.clear()
        await caller.send(piece)
        await wait(got_piece)  # the handler saw this piece before the next one was sent
    reply = await caller.reply()

    assert reply.body == b"first-second-th"
    assert pieces == [b"first", b"-sec", b"ond-th"]


async def test_a_chunked_body_is_dechunked(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n1;ext=1\r\n \r\n")
    await caller.send(b"a\r\n0123456789\r\n0\r\n\r\n")
    reply = await caller.reply()

    assert reply.body == b"hello 0123456789"
    assert recorder.seen[0].body == b"hello 0123456789"


async def test_read_nowait_gets_a_body_that_arrived_with_the_head(serve: Serve) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> StreamResponse:
        seen["is_eof"] = request.content.is_eof()
        seen["body"] = request.content.read_nowait()
        seen["at_eof"] = request.content.at_eof()
        seen["again"] = request.content.read_nowait()
        return Response()

    served = await serve(handler)
    await served.exchange(post("/", b"x" * 1000))

    assert seen == {"is_eof": True, "body": b"x" * 1000, "at_eof": True, "again": b""}


async def test_iter_chunked_never_yields_more_than_asked(serve: Serve) -> None:
    sizes: list[int] = []
    body = bytes(range(256)) * 40  # 10240 bytes in one piece

    async def handler(request: Request) -> StreamResponse:
        received = bytearray()
        async for chunk in request.content.iter_chunked(1000):
            sizes.append(len(chunk))
            received += chunk
        return Response(body=bytes(received))

    served = await serve(handler)
    reply = await served.exchange(post("/", body))

    assert reply.body == body
    assert max(sizes) == 1000
    assert sum(sizes) == len(body)


async def test_read_takes_what_is_left_after_iter_chunked(serve: Serve) -> None:
    seen: list[bytes] = []

    async def handler(request: Request) -> StreamResponse:
        chunks = request.content.iter_chunked(4)
        seen.append(await anext(chunks))
        seen.append(await request.content.read())
        return Response()

    served = await serve(handler)
    await served.exchange(post("/", b"0123456789"))

    assert seen == [b"0123", b"456789"]


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        pytest.param("length", b"x" * 11, id="content-length"),
        pytest.param("chunked", b"x" * 11, id="chunked"),
    ],
)
async def test_read_past_its_limit_raises_body_too_large(serve: Serve, framing: str, body: bytes) -> None:
    results: list[bytes | BaseException] = []

    async def handler(request: Request) -> StreamResponse:
        try:
            results.append(await request.read(limit=10))
        except BodyTooLarge as exc:
            results.append(exc)
            return problem_reply(exc)
        return Response()

    served = await serve(handler)
    if framing == "length":
        data = post("/", body)
    else:
        data = get("/", "Transfer-Encoding: chunked", method="POST") + b"6\r\nxxxxxx\r\n5\r\nxxxxx\r\n0\r\n\r\n"
    reply = await served.exchange(data)

    assert (reply.status, reply.slug()) == (413, "body-too-large")
    assert isinstance(results[0], BodyTooLarge)
    assert reply.problem()["max_body"] == 10


async def test_read_refuses_a_declared_length_over_its_limit_before_the_body_arrives(serve: Serve) -> None:
    outcome: list[BaseException] = []

    async def handler(request: Request) -> StreamResponse:
        try:
            await request.read(limit=10)
        except BodyTooLarge as exc:
            outcome.append(exc)
            return problem_reply(exc)
        return Response()

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 1000", method="POST"))  # and not a byte of the body
    reply = await caller.reply()

    assert (reply.status, reply.slug()) == (413, "body-too-large")
    assert reply.headers["Connection"] == "close"  # the unread body cannot be told from a next request
    assert len(outcome) == 1
    assert await caller.rest() == b""


async def test_read_up_to_its_limit_and_the_listener_default(serve: Serve) -> None:
    results: list[bytes | str] = []

    async def handler(request: Request) -> StreamResponse:
        limit = None if request.path == "/default" else 10
        try:
            results.append(await request.read(limit=limit))
        except BodyTooLarge as exc:
            results.append(f"too large: {exc.extensions['max_body']}")
        return Response()

    served = await serve(handler, max_body=20)
    await served.exchange(post("/exact", b"y" * 10))
    await served.exchange(post("/default", b"z" * 20))
    await served.exchange(post("/default", b"z" * 21))

    assert results == [b"y" * 10, b"z" * 20, "too large: 20"]


async def test_trailers_of_a_chunked_body_are_dropped(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(
        get("/first", "Transfer-Encoding: chunked", method="POST")
        + b"3\r\nabc\r\n0\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n"
    )
    first = await caller.reply()
    await caller.send(get("/second"))
    second = await caller.reply()

    assert (first.body, second.status) == (b"abc", 200)
    for seen in recorder.seen:
        assert "X-Trailer" not in seen.headers
        assert "X-Other" not in seen.headers
    assert recorder.paths == ["/first", "/second"]


async def test_reading_pauses_above_high_water_and_resumes_below_low_water(serve: Serve) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    seen: dict[str, Any] = {}

    async def handler(request: Request) -> StreamResponse:
        transport = request.transport
        assert transport is not None
        await until(lambda: not transport.is_reading())  # the handler has not read: the buffer filled up
        taken: list[bytes] = []
        async for chunk in request.content.iter_chunked(16 * 1024):
            taken.append(chunk)  # no await suspends while the buffer holds data: nothing new arrives
            if transport.is_reading():
                break
        rest = request.content.read_nowait()  # what was still buffered when reading resumed
        seen.update(taken=sum(map(len, taken)), last=len(taken[-1]), rest=len(rest))
        remainder = [chunk async for chunk in request.content.iter_chunked(1 << 20)]
        whole = b"".join(taken) + rest + b"".join(remainder)
        return Response(body=b"whole" if whole == body else b"damaged")

    served = await serve(handler, max_body=len(body))
    caller = await served.connect()
    caller.writer.write(post("/", body))  # not drained: the server stops reading long before the end
    reply = await caller.reply()

    assert reply.body == b"whole"
    buffered = seen["taken"] + seen["rest"]
    assert BODY_HIGH_WATER < buffered <= BODY_HIGH_WATER + 256 * 1024  # paused within one read of high water
    assert seen["rest"] < BODY_LOW_WATER <= seen["rest"] + seen["last"]  # resumed only once below low water


@pytest.mark.parametrize("size", [BODY_LOW_WATER, 4 * BODY_HIGH_WATER])
async def test_body_read_returns_a_body_of_any_size(serve: Serve, size: int) -> None:
    body = bytes(range(256)) * (size // 256)

    async def handler(request: Request) -> StreamResponse:
        whole = await request.content.read()
        return Response(body=b"whole" if whole == body else b"damaged")

    served = await serve(handler, max_body=size)
    caller = await served.connect()
    caller.writer.write(post("/", body))
    reply = await caller.reply(within_s=STUCK_S)

    assert reply.body == b"whole"


async def test_a_body_not_read_before_the_answer_closes_the_connection(serve: Serve) -> None:
    recorder = Recorder(read_body=False)
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 100", method="POST") + b"only ten..")
    reply = await caller.reply()

    assert reply.status == 200
    assert reply.headers["Connection"] == "close"
    await caller.send(b"x" * 90)
    assert await caller.rest() == b""
    assert recorder.paths == ["/"]


async def test_a_body_fully_received_but_unread_keeps_the_connection(serve: Serve) -> None:
    recorder = Recorder(read_body=False)
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(post("/first", b"never read"))
    first = await caller.reply()
    await caller.send(get("/second"))
    second = await caller.reply()

    assert "Connection" not in first.headers
    assert second.status == 200
    assert recorder.paths == ["/first", "/second"]


async def test_a_framing_error_mid_body_fails_the_reader_with_incomplete_body(serve: Serve) -> None:
    recorder = Recorder()
    first_piece = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        received = bytearray()
        try:
            async for chunk in request.content.iter_chunked(1024):
                received += chunk
                first_piece.set()
        except IncompleteBody as exc:
            recorder.seen.append(Seen(request.method, request.raw_path, request.version, CIMultiDict(), error=exc))
            return problem_reply(exc)
        return Response(body=bytes(received))

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n")
    await wait(first_piece)
    await caller.send(b"zz\r\nnot a chunk\r\n0\r\n\r\n" + get("/smuggled"))
    reply = await caller.reply()

    assert (reply.status, reply.slug()) == (400, "incomplete-body")
    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""
    assert isinstance(recorder.seen[0].error, IncompleteBody)
    assert recorder.paths == ["/"]


async def test_a_connection_lost_mid_body_fails_the_reader_with_connection_reset(serve: Serve) -> None:
    first_piece = asyncio.Event()
    finished = asyncio.Event()
    outcome: list[BaseException | bytes] = []

    async def handler(request: Request) -> StreamResponse:
        try:
            async for _ in request.content.iter_chunked(1024):
                first_piece.set()
        except ConnectionResetError as exc:
            outcome.append(exc)
            outcome.append(request.content.exception() or b"no exception")
        finally:
            finished.set()
        return Response()

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 100", method="POST") + b"part")
    await wait(first_piece)
    caller.close()
    await wait(finished)

    assert len(outcome) == 2
    assert isinstance(outcome[0], ConnectionResetError)
    assert outcome[1] is outcome[0]


async def test_set_exception_fails_a_waiting_reader(serve: Serve) -> None:
    outcome: list[BaseException] = []

    async def handler(request: Request) -> StreamResponse:
        reader = asyncio.create_task(request.content.read())
        await asyncio.sleep(0)  # let the reader start waiting for the body
        request.content.set_exception(TimeoutError("body too slow"))
        try:
            await reader
        except TimeoutError as exc:
            outcome.append(exc)
        with pytest.raises(TimeoutError):
            request.content.read_nowait()
        return Response(status=408)

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 10", method="POST") + b"12345")
    reply = await caller.reply()

    assert reply.status == 408
    assert [str(exc) for exc in outcome] == ["body too slow"]


# -- refusals ----------------------------------------------------------------------------------


async def assert_refused(served: Served, data: bytes, status: int, slug: str) -> Reply:
    """``data`` gets a problem ``status``/``slug`` and then the connection closes, nothing more answered."""
    caller = await served.connect()
    caller.writer.write(data)
    reply = await caller.reply()
    assert (reply.status, reply.slug()) == (status, slug), reply
    assert reply.problem()["type"] == f"urn:idemproxy:problem:{slug}"
    assert await caller.rest() == b""
    return reply


MALFORMED_HEADS = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="content-length-and-chunked",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", id="two-lengths"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", id="bad-length"),
    pytest.param(b"GET / HTTP/1.1\nHost: t\n\n", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n  b\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nBad@Name: x\r\n\r\n", id="non-token-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(b"G@T / HTTP/1.1\r\n\r\n", id="bad-method"),
    pytest.param(b"GET / HTTP/1.x\r\n\r\n", id="bad-version"),  # HTTP/9.9 is a 505
    pytest.param(b"GET /a b HTTP/1.1\r\n\r\n", id="space-in-target"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-hello"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", id="chunked-not-last"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nContent-Type: a/b\r\ncontent-type: c/d\r\n\r\n", id="two-content-types"),
    pytest.param(b"GET / HTTP/1.1\r\nUser-Agent: a\r\nUser-Agent: a\r\n\r\n", id="two-user-agents"),
]


@pytest.mark.parametrize("data", MALFORMED_HEADS)
async def test_a_malformed_head_is_refused_and_nothing_after_it_is_read(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, data + get("/after"), 400, "malformed-request")

    assert recorder.seen == []


async def test_a_malformed_request_after_a_good_one_on_the_same_connection(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/good"))
    good = await caller.reply()
    await caller.send(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n" + get("/after"))
    refused = await caller.reply()

    assert good.status == 200
    assert (refused.status, refused.slug()) == (400, "malformed-request")
    assert await caller.rest() == b""
    assert recorder.paths == ["/good"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n", id="chunk-too-long"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", id="bare-lf-in-chunks"
        ),
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc", id="coding-not-chunked"),
    ],
)
async def test_broken_chunked_framing_fails_the_body(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, data + get("/after"), 400, "incomplete-body")

    assert recorder.paths == ["/"]
    assert isinstance(recorder.seen[0].error, IncompleteBody)


async def test_refusals_tell_the_caller_the_connection_closes(serve: Serve) -> None:
    served = await serve(answer_ok)

    reply = await assert_refused(served, b"GET / HTTP/1.1\nHost: t\n\n", 400, "malformed-request")

    assert reply.headers.get("Connection") == "close"  # as every other response the server closes after
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert "Date" in reply.headers


async def test_a_target_up_to_max_line_is_served_and_one_byte_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    longest = "/" + "a" * (MAX_LINE - 1)

    reply = await served.exchange(get(longest))
    await assert_refused(served, get(longest + "a"), 414, "target-too-long")

    assert reply.status == 200
    assert recorder.paths == [longest]


async def test_a_target_split_across_reads_is_measured_whole(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/sync") + b"GET /" + b"a" * 5000)
    await caller.reply()  # the server has read the first part of the second target
    await caller.send(b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    reply = await caller.reply()

    assert (reply.status, reply.slug()) == (414, "target-too-long")
    assert recorder.paths == ["/sync"]


async def test_a_field_up_to_max_line_is_served_and_one_byte_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    longest = "X-Long: " + "v" * (MAX_LINE - len("X-Long"))  # name and value: MAX_LINE bytes

    reply = await served.exchange(get("/", longest))
    await assert_refused(served, get("/", longest + "v"), 431, "header-fields-too-large")

    assert reply.status == 200
    assert len(recorder.seen[0].headers["X-Long"]) == MAX_LINE - len("X-Long")


async def test_a_long_header_name_is_refused(serve: Serve) -> None:
    served = await serve(answer_ok)

    await assert_refused(served, get("/", "X" * (MAX_LINE + 1) + ": v"), 431, "header-fields-too-large")


async def test_max_headers_fields_are_served_and_one_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    fields = [f"X-{number}: {number}" for number in range(MAX_HEADERS - 1)]  # plus Host

    reply = await served.exchange(get("/", *fields))
    await assert_refused(served, get("/", *fields, "X-One-More: 1"), 431, "header-fields-too-large")

    assert reply.status == 200
    assert len(recorder.seen[0].headers) == MAX_HEADERS


def big_head_fields() -> list[str]:
    """Fields each well under MAX_LINE and fewer than MAX_HEADERS, together over MAX_HEAD."""
    fields = [f"X-Big-{number}: " + "b" * 4000 for number in range(MAX_HEAD // 4000 + 2)]
    assert len(fields) < MAX_HEADERS
    assert sum(map(len, fields)) > MAX_HEAD
    return fields


async def test_a_head_over_max_head_in_one_write_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, get("/", *big_head_fields()), 431, "header-fields-too-large")

    assert recorder.seen == []


async def test_a_head_over_max_head_trickled_in_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    fields = "".join(f"X-Big-{number}: " + "b" * 3990 + "\r\n" for number in range(MAX_HEAD // 4000 + 1)).encode()
    fields = fields[: MAX_HEAD + 100]  # over MAX_HEAD by the last piece only, and never complete
    caller = await served.connect()
    await caller.send(get("/sync") + b"GET /big HTTP/1.1\r\n")
    await caller.reply()  # the server has read the start of the big head
    for start in range(0, len(fields), 4096):
        await caller.send(fields[start : start + 4096])
    refused = await caller.reply()

    assert (refused.status, refused.slug()) == (431, "header-fields-too-large")
    assert await caller.rest() == b""
    assert recorder.paths == ["/sync"]


async def test_a_split_head_followed_by_a_large_body_is_not_taken_for_a_large_head(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    body = b"p" * 200_000
    caller = await served.connect()
    await caller.send(get("/sync") + b"POST /upload HTTP/1.1\r\n")
    await caller.reply()  # the server has read the head's first line
    await caller.send(f"Host: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # one read: head + body
    reply = await caller.reply()

    assert reply.status == 200, reply
    assert reply.body == body
    assert recorder.paths == ["/sync", "/upload"]


async def test_an_unsupported_expectation_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    reply = await assert_refused(
        served, post("/", b"body", "Expect: something-else") + get("/after"), 417, "expectation-failed"
    )

    assert "something-else" in reply.problem()["detail"]
    assert recorder.seen == []


async def test_100_continue_is_sent_before_the_body_is_read(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 7", "Expect: 100-Continue", method="PUT"))
    interim = await caller.reply()
    await caller.send(b"payload")
    final = await caller.reply()

    assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (final.status, final.body) == (200, b"payload")
    assert recorder.seen[0].body == b"payload"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(post("/", b"payload", "Expect: 100-continue"), id="body-with-the-head"),
        pytest.param(get("/", "Expect: 100-continue"), id="no-body"),
        pytest.param(post("/", b"", "Expect: 100-continue"), id="empty-body"),
        pytest.param(
            get("/", "Content-Length: 7", "Expect: 100-continue", method="PUT", version="1.0") + b"payload",
            id="http-1.0",
        ),
    ],
)
async def test_no_100_continue_when_the_body_has_already_arrived(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(data)
    reply = await caller.reply()

    assert reply.status == 200, reply.head  # the final answer directly, no interim 100
    assert recorder.paths == ["/"]


async def test_100_continue_for_a_pipelined_request_comes_after_the_answer_before_it(serve: Serve) -> None:
    release = asyncio.Event()
    recorder = Recorder()

    async def handler(request: Request) -> StreamResponse:
        if request.path == "/first":
            await release.wait()
        return await recorder(request)

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/first") + get("/second", "Content-Length: 4", "Expect: 100-continue", method="PUT"))
    release.set()
    first = await caller.reply()
    interim = await caller.reply()
    await caller.send(b"data")
    second = await caller.reply()

    assert (first.status, interim.status, second.status, second.body) == (200, 100, 200, b"data")


async def test_a_refusal_behind_a_request_in_progress_comes_after_its_answer(serve: Serve) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        started.set()
        await release.wait()
        return Response(body=b"first answer")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/first") + b"GET /second HTTP/1.1\nHost: t\n\n")
    await wait(started)
    release.set()
    first = await caller.reply()
    refused = await caller.reply()

    assert (first.status, first.body) == (200, b"first answer")
    assert first.headers["Connection"] == "close"  # the server knows no more will be answered
    assert (refused.status, refused.slug()) == (400, "malformed-request")
    assert await caller.rest() == b""


async def test_a_refusal_behind_a_pipelined_request_drops_it_and_follows_the_answer(serve: Serve) -> None:
    recorder = Held()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/first") + get("/second") + get("/" + "t" * (MAX_LINE + 10)))
    await wait(recorder.started)
    recorder.release.set()
    first = await caller.reply()
    refused = await caller.reply()

    assert first.status == 200
    assert (refused.status, refused.slug()) == (414, "target-too-long")
    assert await caller.rest() == b""
    assert recorder.paths == ["/first"]


# -- responses -------------------------------------------------------------------------------------


async def test_a_stream_response_without_length_is_chunked_on_http_1_1(serve: Serve) -> None:
    states: list[tuple[bool, str]] = []

    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse(status=202, headers={"X-Kind": "stream", "Content-Type": "text/csv; charset=utf-8"})
        states.append((response.prepared, response.content_type))
        await response.prepare(request)
        states.append((response.prepared, response.content_type))
        await response.write(b"abc")
        await response.write(b"")  # nothing: an empty chunk would end the body
        await response.write(b"d" * 300)
        await response.write_eof()
        await response.write_eof()  # twice is harmless
        return response

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/"))
    head = await caller.reader.readuntil(b"\r\n\r\n")
    raw = await caller.reader.readuntil(b"0\r\n\r\n")
    await caller.send(get("/again"))
    again = await caller.reply()

    assert head.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert b"Content-Length" not in head
    assert raw == b"3\r\nabc\r\n12c\r\n" + b"d" * 300 + b"\r\n0\r\n\r\n"
    assert again.body == b"abc" + b"d" * 300  # and the connection stays usable
    assert states[:2] == [(False, "text/csv"), (True, "text/csv")]


async def test_a_stream_response_with_a_length_is_not_chunked(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse(headers={"Content-Length": "6"})
        await response.prepare(request)
        await response.write(b"abc")
        await response.write(b"def")
        return response  # the server finishes it

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/") + get("/again"))
    first = await caller.reply()
    again = await caller.reply()

    assert "Transfer-Encoding" not in first.headers
    assert (first.body, again.body) == (b"abcdef", b"abcdef")


async def test_a_stream_response_the_handler_did_not_prepare_is_sent_by_the_server(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(status=201, headers={"X-Untouched": "1"})

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/") + get("/again"))
    first = await caller.reply()
    again = await caller.reply()

    assert (first.status, first.headers["X-Untouched"], first.body) == (201, "1", b"")
    assert again.status == 201


async def test_a_stream_response_on_http_1_0_ends_with_the_connection(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        await response.write(b"until ")
        await response.write(b"close")
        return response

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Connection: keep-alive", version="1.0"))
    reply = await caller.reply()

    assert reply.head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert reply.headers["Connection"] == "close"
    assert "Transfer-Encoding" not in reply.headers
    assert "Content-Length" not in reply.headers
    assert reply.body == b"until close"


async def test_http_1_0_without_keep_alive_is_closed_after_the_answer(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/first", version="1.0") + get("/second", version="1.0"))
    reply = await caller.reply()

    assert reply.head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""
    assert recorder.paths == ["/first"]
    assert recorder.seen[0].version == "1.0"


async def test_http_1_0_with_keep_alive_keeps_the_connection(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    replies: list[Reply] = []
    for target in ("/first", "/second"):
        await caller.send(get(target, "Connection: keep-alive", version="1.0"))
        replies.append(await caller.reply())

    assert [reply.headers["Connection"] for reply in replies] == ["keep-alive", "keep-alive"]
    assert recorder.paths == ["/first", "/second"]


@pytest.mark.parametrize("kind", ["response", "stream"])
async def test_a_head_request_gets_the_head_and_no_body(serve: Serve, kind: str) -> None:
    async def handler(request: Request) -> StreamResponse:
        if kind == "response":
            return Response(body=b"0123456789", content_type="text/plain")
        response = StreamResponse()
        await response.prepare(request)
        await response.write(b"never sent")
        return response

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", method="HEAD") + get("/", method="HEAD"))
    first = await caller.reply(method="HEAD")
    second = await caller.reply(method="HEAD")  # would fail to parse if a body had been sent

    assert (first.status, second.status) == (200, 200)
    if kind == "response":
        assert first.headers["Content-Length"] == "10"
    else:
        assert "Transfer-Encoding" not in first.headers
    await caller.send(get("/tail", method="HEAD"))
    assert (await caller.reply(method="HEAD")).status == 200


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("kind", ["response", "stream"])
async def test_no_body_for_204_and_304(serve: Serve, status: int, kind: str) -> None:
    async def handler(request: Request) -> StreamResponse:
        if request.path == "/next":
            return Response(body=b"next")
        if kind == "response":
            return Response(status=status, body=b"ignored")
        response = StreamResponse(status=status)
        await response.prepare(request)
        await response.write(b"ignored")
        return response

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/") + get("/next"))
    head = await caller.reader.readuntil(b"\r\n\r\n")
    following = await caller.reply()

    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length" not in head
    assert (following.status, following.body) == (200, b"next")  # nothing stood between the two heads


async def test_a_handler_that_raises_gets_a_500_problem(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        if request.path == "/boom":
            raise RuntimeError("the handler broke")
        return Response(body=b"fine")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/boom"))
    reply = await caller.reply()
    await caller.send(get("/next"))
    following = await caller.reply()

    assert (reply.status, reply.slug()) == (500, "internal-error")
    assert "the handler broke" not in reply.body.decode()
    assert following.body == b"fine"  # the connection survived


async def test_a_handler_that_raises_after_preparing_does_not_send_a_second_head(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        raise RuntimeError("the handler broke mid-stream")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/"))
    head = await caller.reader.readuntil(b"\r\n\r\n")
    rest = b""
    async with asyncio.timeout(UNTIL_S):
        while (data := await caller.reader.read(65536)) and b"HTTP/1.1" not in rest + data:
            rest += data
        rest += data

    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.startswith(b"7\r\npartial\r\n")
    assert b"HTTP/1.1" not in rest  # no second response inside the first one's body
    assert not rest.endswith(b"0\r\n\r\n")  # and the body is not passed off as complete


async def test_a_line_break_in_a_header_value_raises_in_prepare(serve: Serve) -> None:
    errors: list[BaseException] = []

    async def handler(request: Request) -> StreamResponse:
        try:
            await StreamResponse(headers={"X-Bad": "a\r\nX-Injected: yes"}).prepare(request)
        except ValueError as exc:
            errors.append(exc)
        return Response(body=b"after")

    served = await serve(handler)
    reply = await served.exchange(get("/"))

    assert len(errors) == 1
    assert reply.body == b"after"
    assert b"Injected" not in reply.head


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(lambda: Response(headers={"X-Bad": "a\r\nX-Injected: yes"}), id="value-crlf"),
        pytest.param(lambda: Response(headers={"X-Bad": "a\nX-Injected: yes"}), id="value-lf"),
        pytest.param(lambda: Response(headers={"X-Injected: yes\r\nX-Bad": "a"}), id="name-crlf"),
        pytest.param(lambda: Response(reason="OK\r\nX-Injected: yes"), id="reason-crlf"),
        pytest.param(lambda: StreamResponse(headers={"X-Bad": "a\r\nX-Injected: yes"}), id="stream-value-crlf"),
    ],
)
async def test_a_line_break_in_a_returned_head_is_never_written(
    serve: Serve, response: Callable[[], StreamResponse]
) -> None:
    async def handler(request: Request) -> StreamResponse:
        return response()

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/"))
    reply = await caller.reply(within_s=STUCK_S)  # an answer, not a connection left hanging

    assert b"X-Injected" not in reply.head
    assert (reply.status, reply.slug()) == (500, "internal-error")


async def test_write_waits_for_a_caller_that_does_not_read(serve: Serve) -> None:
    piece = b"w" * 65536
    total = 64 * len(piece)  # 4 MiB: far more than the shrunken socket buffers hold
    backed_up = asyncio.Event()
    buffered: list[int] = []

    async def handler(request: Request) -> StreamResponse:
        transport = request.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        response = StreamResponse(headers={"Content-Length": str(total)})
        await response.prepare(request)
        for _ in range(total // len(piece)):
            await response.write(piece)
            buffered.append(transport.get_write_buffer_size())
            if buffered[-1]:
                backed_up.set()  # the kernel is full: further writes must wait for the caller
        return response

    served = await serve(handler)
    caller = await served.connect(rcvbuf=65536)
    await caller.send(get("/"))
    await wait(backed_up)  # only then does the caller start reading
    reply = await caller.reply()

    assert len(reply.body) == total
    assert max(buffered) <= 2 * 65536  # the writer waited instead of buffering the whole body


# -- pipelining and the connection's end ---------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(serve: Serve) -> None:
    active = 0
    most_active = 0
    order: list[str] = []
    reading_while_answering: list[bool] = []

    async def handler(request: Request) -> StreamResponse:
        nonlocal active, most_active
        active += 1
        most_active = max(most_active, active)
        assert request.transport is not None
        reading_while_answering.append(request.transport.is_reading())
        order.append(request.raw_path)
        body = await request.read()
        for _ in range(5):
            await asyncio.sleep(0)  # a chance for another request's handler to start, were it allowed
        active -= 1
        return Response(body=request.raw_path.encode() + body)

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(post("/1", b"a") + get("/2") + post("/3", b"ccc") + get("/4"))
    replies = [await caller.reply() for _ in range(4)]

    assert [reply.body for reply in replies] == [b"/1a", b"/2", b"/3ccc", b"/4"]
    assert order == ["/1", "/2", "/3", "/4"]
    assert most_active == 1
    assert reading_while_answering[0] is False  # reading paused while requests were waiting
    assert reading_while_answering[-1] is True  # and resumed once none was


async def test_a_request_after_connection_close_is_not_read(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/first", "Connection: close") + get("/second"))
    reply = await caller.reply()

    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""
    assert recorder.paths == ["/first"]


async def test_a_request_sent_after_the_close_answer_is_not_read(serve: Serve) -> None:
    recorder = Held()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/first", "Connection: close"))
    await wait(recorder.started)
    await caller.send(get("/second"))  # while the first is still being answered
    recorder.release.set()
    reply = await caller.reply()

    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""
    assert recorder.paths == ["/first"]


async def test_data_after_an_upgrade_request_is_not_parsed(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/ws", "Connection: Upgrade", "Upgrade: websocket") + get("/smuggled"))
    reply = await caller.reply()

    assert reply.status == 200
    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""
    assert recorder.paths == ["/ws"]


async def test_an_upgrade_offer_on_a_request_with_a_body_never_loses_the_body(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    # An h2c upgrade offer on an ordinary POST: the server does not upgrade, so the body is this request's.
    offer = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA")
    await caller.send(post("/items", b"payload", *offer))
    reply = await caller.reply()

    if recorder.seen:  # served: with the body it declared
        assert recorder.seen[0].body == b"payload"
        assert reply.body == b"payload"
    else:  # or refused outright
        assert reply.status >= 400
        reply.problem()


async def test_a_silent_connection_is_closed_after_the_head_timeout(serve: Serve) -> None:
    served = await serve(answer_ok, header_timeout_s=0.05)
    caller = await served.connect()

    assert await caller.rest() == b""  # closed, without an answer


async def test_a_partial_head_is_closed_after_the_head_timeout(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder, header_timeout_s=0.05)
    caller = await served.connect()
    await caller.send(b"GET /slow HTTP/1.1\r\nHost: te")

    assert await caller.rest() == b""
    assert recorder.seen == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_head_timeout(serve: Serve) -> None:
    served = await serve(answer_ok, header_timeout_s=0.05)
    caller = await served.connect()
    await caller.send(get("/"))
    reply = await caller.reply()

    assert reply.status == 200
    assert "Connection" not in reply.headers
    assert await caller.rest() == b""


async def test_the_head_timeout_does_not_cut_a_slow_body_or_a_slow_handler(serve: Serve) -> None:
    timeout_s = 0.05
    started = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        started.set()
        body = await request.read()
        await asyncio.sleep(3 * timeout_s)  # the handler outlasts the head timeout
        return Response(body=body)

    served = await serve(handler, header_timeout_s=timeout_s)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 4", method="POST"))
    await wait(started)
    await asyncio.sleep(3 * timeout_s)  # time passes mid-body: the head timer must not be running
    await caller.send(b"late")
    reply = await caller.reply()

    assert reply.body == b"late"


async def test_a_handler_whose_caller_left_runs_to_its_end(serve: Serve) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()
    outcome: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        if request.path == "/after":
            return Response(body=b"still serving")
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        response = StreamResponse()
        try:
            await response.prepare(request)
            await response.write(b"nobody reads this")
        except ConnectionResetError:
            outcome.append("write failed")
        finished.set()
        return response

    served = await serve(handler)
    await served.leave_mid_request(started)
    release.set()
    await wait(finished)

    assert outcome == ["write failed"]
    assert (await served.exchange(get("/after"))).body == b"still serving"


async def test_a_connection_error_of_the_handler_own_is_a_500_for_a_caller_still_there(serve: Serve) -> None:
    async def handler(request: Request) -> StreamResponse:
        raise ConnectionRefusedError("the handler's own upstream refused")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/"))
    reply = await caller.reply()

    assert (reply.status, reply.slug()) == (500, "internal-error")


async def _prepare_for_the_gone_caller(request: Request) -> StreamResponse:
    response = StreamResponse()
    await response.prepare(request)  # the caller is gone: ConnectionResetError, not caught here
    return response


async def _return_a_large_answer(request: Request) -> StreamResponse:
    return Response(body=b"x" * 100_000)


@pytest.mark.parametrize(
    "answer",
    [_prepare_for_the_gone_caller, _return_a_large_answer],
    ids=["write-error-let-through", "response-returned"],
)
async def test_a_handler_answering_after_its_caller_left_is_not_logged_as_a_failure(
    serve: Serve, caplog: pytest.LogCaptureFixture, answer: Handler
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        if request.path == "/after":
            return Response(body=b"ok")
        started.set()
        await release.wait()
        try:
            return await answer(request)
        finally:
            finished.set()

    served = await serve(handler)
    await served.leave_mid_request(started)
    with caplog.at_level("INFO", logger="idemproxy.http_server"):
        release.set()
        await wait(finished)
        after = await served.exchange(get("/after"))

    assert after.body == b"ok"
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []


# -- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_closes_idle_connections_at_once(serve: Serve) -> None:
    served = await serve(answer_ok)
    idle = await served.connect()
    await idle.send(get("/"))
    await idle.reply()
    never_asked = await served.connect()

    served.server.close()
    async with asyncio.timeout(UNTIL_S):  # far less than the grace: nothing was in progress
        await served.http.shutdown(60)

    assert await idle.rest() == b""
    assert await never_asked.rest() == b""
    assert not served.http.connections


async def test_shutdown_lets_a_request_in_progress_finish_within_grace(serve: Serve) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    outcome: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        if request.path == "/slow":
            started.set()
            await release.wait()
            outcome.append("finished")
        return Response(body=b"answered")

    served = await serve(handler)
    idle = await served.connect()
    await idle.send(get("/quick"))
    await idle.reply()
    busy = await served.connect()
    await busy.send(get("/slow") + get("/queued"))
    await wait(started)

    served.server.close()
    shutting = asyncio.create_task(served.http.shutdown(UNTIL_S * 2))
    assert await idle.rest() == b""  # closed while the slow request still runs
    release.set()
    reply = await busy.reply()
    async with asyncio.timeout(UNTIL_S):
        await shutting

    assert (reply.status, reply.body) == (200, b"answered")
    assert reply.headers["Connection"] == "close"
    assert await busy.rest() == b""  # the queued request is not started
    assert outcome == ["finished"]


async def test_shutdown_cancels_a_request_past_grace_and_aborts_its_connection(serve: Serve) -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return Response()

    served = await serve(handler)
    busy = await served.connect()
    await busy.send(get("/stuck"))
    await wait(started)

    served.server.close()
    async with asyncio.timeout(UNTIL_S):
        await served.http.shutdown(0.05)

    assert outcome == ["cancelled"]
    assert await busy.rest() == b""  # no answer at all
    await until(lambda: not served.http.connections)


async def test_shutdown_does_not_cut_an_answer_finished_within_grace(serve: Serve) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    body = b"r" * 48_000  # more than the shrunken socket buffers hold, less than the write high-water mark

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        started.set()
        await release.wait()
        return Response(body=body)

    served = await serve(handler)
    busy = await served.connect(rcvbuf=4096)
    await busy.send(get("/"))
    await wait(started)

    served.server.close()
    shutting = asyncio.create_task(served.http.shutdown(UNTIL_S * 2))
    release.set()
    reply = await busy.reply()  # read as it comes, while the server shuts down
    async with asyncio.timeout(UNTIL_S):
        await shutting

    assert reply.status == 200
    assert len(reply.body) == len(body)


async def test_shutdown_starts_no_request_queued_behind_a_stream_in_progress(serve: Serve) -> None:
    streaming = asyncio.Event()
    release = asyncio.Event()
    recorder = Recorder()

    async def handler(request: Request) -> StreamResponse:
        if request.path != "/stream":
            return await recorder(request)
        response = StreamResponse()
        await response.prepare(request)  # the head leaves before the shutdown begins
        await response.write(b"before")
        streaming.set()
        await release.wait()
        await response.write(b" after")
        return response

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/stream") + get("/queued"))
    await wait(streaming)

    served.server.close()
    shutting = asyncio.create_task(served.http.shutdown(UNTIL_S * 2))
    release.set()
    streamed = await caller.reply()
    async with asyncio.timeout(UNTIL_S):
        await shutting
    rest = await caller.rest()

    assert streamed.body == b"before after"
    assert recorder.paths == []  # the queued request was never handed to a handler
    assert rest == b""


async def test_an_early_answer_reaches_a_caller_still_sending_its_body(serve: Serve) -> None:
    """A 413 before the body: the caller may only read it once its upload is done. The
    server keeps reading (and dropping) what still comes, so closing does not reset the
    connection under the answer."""
    answered = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        answered.set()
        return Response(status=413, body=b"too large")

    served = await serve(handler)
    caller = await served.connect()
    size = 8 * 1024 * 1024
    await caller.send(get("/", f"Content-Length: {size}", method="POST"))
    await wait(answered)
    chunk = b"x" * 65536
    for _ in range(size // len(chunk)):  # the whole body, sent after the answer went out
        await caller.send(chunk)
    reply = await caller.reply()

    assert (reply.status, reply.body) == (413, b"too large")
    assert reply.headers["Connection"] == "close"
    assert await caller.rest() == b""


async def test_lingering_ends_after_its_bound_for_a_caller_that_never_finishes(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "LINGER_S", 0.05)

    async def handler(request: Request) -> StreamResponse:
        return Response(status=413, body=b"too large")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 1000000", method="POST") + b"x" * 1000)
    reply = await caller.reply()
    assert reply.status == 413
    assert await caller.rest() == b""  # the end of the stream follows the answer at once
    await until(lambda: not served.http.connections)  # and the connection is closed, not kept

"""Raw HTTP/1.1 over asyncio streams: bytes reach the server exactly as written, and answers
are read back by hand, exactly as they arrived.

HTTP client libraries refuse to send (or quietly repair) most of what the wire tests are
about, so requests are assembled by hand (``request``, ``get``, ``post``) and answers
parsed here (``Reply``). Every read is bounded: a server that neither answers nor closes
fails the test instead of hanging it. ``Served`` is a started ``HttpServer`` (the
proxy listener's server) on a loopback port with the callers connected to it; the
``serve`` fixture (``tests/conftest.py``) starts them and shuts them down.

Used by the wire tests (``tests/wire``), the hostile suite (``tests/hostile``) and the
tests that need exact bytes through a whole proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from idemproxy.wire.http_messages import Request, StreamResponse
from idemproxy.wire.http_server import HttpServer

#: How long any single exchange (a reply, a close, an awaited condition) may take before the
#: server counts as hung.
BOUND_S = 15.0
#: The stream reader's limit unless a caller says otherwise: answer heads up to this size parse.
READ_LIMIT = 1 << 20
#: asyncio's own limit: a caller that stops reading holds at most twice this in its reader.
ASYNCIO_LIMIT = 1 << 16

Handler = Callable[[Request], Awaitable[StreamResponse]]


# -- answers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer as it arrived on the wire, body de-chunked; or ``status == 0`` when the
    server closed the connection without one (``Connection.read_reply`` only)."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    #: The connection ends after this answer: it said so, it is HTTP/1.0, or there was no answer.
    closed: bool = False
    #: The status line and the fields exactly as they arrived, with the blank line that ends them.
    head: bytes = b""

    @property
    def status_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def version(self) -> str:
        return self.status_line.split(b" ", 1)[0].decode("latin-1").removeprefix("HTTP/")

    @property
    def reason(self) -> str:
        return self.status_line.split(b" ", 2)[2].decode("utf-8", "surrogateescape")

    @property
    def closes(self) -> bool:
        """The answer says the connection closes (``Connection: close``)."""
        return self.headers.get("Connection", "").lower() == "close"

    @property
    def content_type(self) -> str:
        """The media type, without parameters."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip()

    @property
    def problem(self) -> str | None:
        """The problem type after ``urn:idemproxy:problem:``, if this is problem+json (whose
        ``status`` member must then be the answer's status); ``None`` for any other answer."""
        if self.content_type != PROBLEM_CONTENT_TYPE:
            return None
        document = orjson.loads(self.body)
        assert document["status"] == self.status, document
        return str(document["type"]).removeprefix(PROBLEM_TYPE_PREFIX)

    def problem_document(self) -> dict[str, Any]:
        """The problem+json document; fails unless this is one, exactly, for its status."""
        assert self.headers.get("Content-Type") == PROBLEM_CONTENT_TYPE, self
        document: dict[str, Any] = orjson.loads(self.body)
        assert document["status"] == self.status, document
        return document

    def slug(self) -> str:
        """The problem type after ``urn:idemproxy:problem:``; fails unless this is problem+json."""
        problem_type: str = self.problem_document()["type"]
        assert problem_type.startswith(PROBLEM_TYPE_PREFIX), problem_type
        return problem_type.removeprefix(PROBLEM_TYPE_PREFIX)

    def json(self) -> Any:
        return orjson.loads(self.body)


# -- requests -------------------------------------------------------------------------------------


def request(
    method: str,
    target: str | bytes,
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    *,
    length: bool = True,
    close: bool = True,
) -> bytes:
    """One HTTP/1.1 request as bytes; ``Host`` is added unless given, ``Content-Length`` when
    ``length``, ``Connection: close`` when ``close``."""
    lines = [b" ".join((_bytes(method), _bytes(target), b"HTTP/1.1"))]
    given = [(_bytes(name), _bytes(value)) for name, value in headers]
    if not any(name.lower() == b"host" for name, _ in given):
        lines.append(b"Host: idemproxy.test")
    lines += [name + b": " + value for name, value in given]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def get(target: str = "/", *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    """A request head without a body (``headers`` as ``"Name: value"``), ``Host: test``."""
    lines = [f"{method} {target} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(target: str, body: bytes, *headers: str) -> bytes:
    """``get`` for a POST with ``body`` (and its ``Content-Length``)."""
    return get(target, f"Content-Length: {len(body)}", *headers, method="POST") + body


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


# -- the caller's side ----------------------------------------------------------------------------


class Connection:
    """One raw client connection: write bytes, read answers, see whether the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, *, host: str = "127.0.0.1", rcvbuf: int | None = None, limit: int = READ_LIMIT
    ) -> Connection:
        """Connect to ``host:port``; ``rcvbuf``: shrink the socket's receive buffer first."""
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection(host, port, limit=limit)
            return cls(reader, writer)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False when the server already closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def reply(self, *, method: str = "GET", within_s: float = BOUND_S) -> Reply:
        """The next answer (``method``: of the request it answers, HEAD has no body); fails
        when the connection ends instead."""
        async with asyncio.timeout(within_s):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise AssertionError(f"the connection ended instead of a response: {exc.partial!r}") from exc
            return await self._rest_of_reply(head, method, strict=True)

    async def read_reply(self, within_s: float = BOUND_S, *, method: str = "GET") -> Reply:
        """The next answer, or ``Reply(status=0, closed=True)`` when the server closed (or
        reset) the connection instead of answering."""
        async with asyncio.timeout(within_s):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return Reply(status=0, closed=True)
            return await self._rest_of_reply(head, method, strict=False)

    async def _rest_of_reply(self, head: bytes, method: str, *, strict: bool) -> Reply:
        status_line, *fields = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        assert len(parts) == 3, f"a malformed status line: {status_line!r}"
        status = int(parts[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for item in fields:
            name, colon, value = item.decode("utf-8", "surrogateescape").partition(":")
            assert colon, f"a response field without a colon: {item!r}"
            assert name == name.strip(), f"a response field name with spaces: {item!r}"
            headers.add(name, value.strip())
        if method == "HEAD" or status < 200 or status in (204, 304):
            body = b""
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        elif "Content-Length" in headers:
            size = headers["Content-Length"]
            try:
                body = await self.reader.readexactly(int(size))
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise AssertionError(f"the body was cut short ({size} bytes announced): {exc}") from exc
        elif strict:
            body = await self.reader.read()
        else:
            try:
                body = await self.reader.read()
            except ConnectionError:
                body = b""
        closed = headers.get("Connection", "").lower() == "close" or status_line.startswith(b"HTTP/1.0")
        return Reply(status, headers, body, closed, head)

    async def _read_chunked(self) -> bytes:
        """A chunked body: no chunk extensions, every chunk ended by CRLF, no trailers."""
        parts: list[bytes] = []
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
            parts.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"
        assert await self.reader.readuntil(b"\r\n") == b"\r\n"  # the server sends no trailers
        return b"".join(parts)

    async def rest(self, within_s: float = BOUND_S) -> bytes:
        """Everything the server still sends until it closes the connection."""
        parts: list[bytes] = []
        async with asyncio.timeout(within_s):
            with contextlib.suppress(ConnectionError):
                while data := await self.reader.read(65536):
                    parts.append(data)
        return b"".join(parts)

    async def closed_by_server(self, within_s: float = BOUND_S) -> bool:
        """Wait (bounded) until the server closes; whatever it sends meanwhile is discarded."""

        async def drain() -> None:
            with contextlib.suppress(ConnectionError):
                while await self.reader.read(65536):
                    pass

        try:
            await asyncio.wait_for(drain(), within_s)
        except TimeoutError:
            return False
        return True

    def hang_up(self) -> None:
        """Close this side without waiting for the server to see it."""
        self.writer.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connected(port: int, **options: Any) -> AsyncIterator[Connection]:
    """A ``Connection.open(port, **options)``, closed when the block ends."""
    connection = await Connection.open(port, **options)
    try:
        yield connection
    finally:
        await connection.close()


async def exchange(port: int, data: bytes, within_s: float = BOUND_S) -> Reply:
    """Send ``data`` on a new connection and read one answer (status 0 if there was none)."""
    async with connected(port) as connection:
        await connection.send(data)
        return await connection.read_reply(within_s, method="HEAD" if data.startswith(b"HEAD ") else "GET")


async def until(predicate: Callable[[], bool], within_s: float = BOUND_S) -> None:
    """Wait until ``predicate`` holds (state the server exposes no event for)."""
    async with asyncio.timeout(within_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)


async def wait(event: asyncio.Event, within_s: float = BOUND_S) -> None:
    async with asyncio.timeout(within_s):
        await event.wait()


# -- the server's side ----------------------------------------------------------------------------


@dataclass
class Served:
    """A started ``HttpServer`` on a loopback port, and the callers connected to it."""

    http: HttpServer
    server: asyncio.Server
    callers: list[Connection] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queued(self) -> int:
        """Requests parsed ahead of the one being answered, on every connection."""
        return sum(connection.queued for connection in self.http.connections)

    async def connect(self, *, rcvbuf: int | None = None) -> Connection:
        """A caller with asyncio's own reader limit, closed when the test ends."""
        caller = await Connection.open(self.port, rcvbuf=rcvbuf, limit=ASYNCIO_LIMIT)
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
        caller.hang_up()
        await until(lambda: not self.http.connections)


Serve = Callable[..., Awaitable[Served]]


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Serve]:
    """``await serve(handler, header_timeout_s=..., max_body=...)`` within the block: started
    servers, all shut down (and their callers closed) when it ends."""
    started: list[Served] = []

    async def start(handler: Handler, *, header_timeout_s: float = BOUND_S, max_body: int = 1 << 20) -> Served:
        http = HttpServer(handler, header_timeout_s=header_timeout_s, max_body=max_body)
        server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
        served = Served(http, server)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            for caller in served.callers:
                caller.hang_up()
            served.server.close()
            await served.http.shutdown(0)
            await served.server.wait_closed()
            for caller in served.callers:
                with contextlib.suppress(ConnectionError):
                    await caller.writer.wait_closed()

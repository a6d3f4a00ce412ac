"""Raw tools for the upstream client tests (``tests/wire/test_upstream_client_*.py``): loopback
``asyncio`` servers that send exact bytes and record what arrived on which connection, and
the calls that send through an ``UpstreamClient``.

Well-behaved answers come from the aiohttp tool server (``tests.support.upstream``);
misbehaving ones from these.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from idemproxy.wire.upstream_client import Body, Destination, UpstreamClient, UpstreamRequest, UpstreamResponse

CONNECT_S = 2.0
READ_S = 2.0
#: How long a raw server's state may take to reach an awaited condition before the test fails.
UNTIL_S = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# -- raw servers: the tool's side ----------------------------------------------------------------------


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


#: ``await raw_server(handler)``: a started raw server (the ``raw_server`` fixture, ``tests/wire/conftest.py``).
ServeRaw = Callable[[Handler], Awaitable[RawServer]]


# -- sending through the client under test ---------------------------------------------------------


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
        Destination(URL(origin), connect_s, read_s),
        UpstreamRequest(method, target, CIMultiDict(headers or {}), body, length),
        guard,
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


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[ServeRaw]:
    """``await start(handler)`` within the block: started raw servers, all closed when it ends."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()

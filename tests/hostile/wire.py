"""Raw HTTP/1.1 over asyncio streams: bytes reach the server exactly as written.

HTTP client libraries refuse to send (or quietly repair) most of what these
tests are about, so requests are assembled by hand and answers read by hand.
Every read is bounded: a server that neither answers nor closes fails the
test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

PROBLEM = "application/problem+json"
PROBLEM_PREFIX = "urn:idemproxy:problem:"
#: How long any single exchange may take before the server counts as hung.
BOUND_S = 15.0


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, or ``status == 0`` when the server closed without one."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; last value wins
    body: bytes = b""
    closed: bool = False  # the server closed the connection after (or instead of) answering

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip()

    @property
    def problem(self) -> str | None:
        """The problem+json type after ``urn:idemproxy:problem:``, if this is one."""
        if self.content_type != PROBLEM:
            return None
        body = orjson.loads(self.body)
        assert body["status"] == self.status, body
        return str(body["type"]).removeprefix(PROBLEM_PREFIX)

    def json(self) -> object:
        return orjson.loads(self.body)


def request(
    method: str,
    target: str | bytes,
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    *,
    length: bool = True,
    close: bool = True,
) -> bytes:
    """One HTTP/1.1 request as bytes; ``Host`` is added unless given, ``Content-Length`` when ``length``."""
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


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class Connection:
    """One client connection: write bytes, read one answer, see whether the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False when the server already closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def read_reply(self, bound_s: float = BOUND_S, *, head: bool = False) -> Reply:
        """The next answer; ``head``: it answers a HEAD request, so it has no body."""
        return await asyncio.wait_for(self._read_reply(head), bound_s)

    async def _read_reply(self, head: bool) -> Reply:
        try:
            lines = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return Reply(status=0, closed=True)
        status_line, *header_lines = lines[:-4].split(b"\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        status = int(status_line.split(b" ", 2)[1])
        if head or status < 200 or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = await self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._read_to_close()
        closed = headers.get("connection", "").lower() == "close" or status_line.startswith(b"HTTP/1.0")
        return Reply(status, headers, body, closed)

    async def _read_exactly(self, size: int) -> bytes:
        try:
            return await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise AssertionError(f"the server closed mid-body ({exc})") from exc

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def _read_to_close(self) -> bytes:
        try:
            return await self.reader.read()
        except ConnectionError:
            return b""

    async def closed_by_server(self, bound_s: float = BOUND_S) -> bool:
        """Wait (bounded) until the server closes; whatever it sends meanwhile is discarded."""

        async def drain() -> None:
            with contextlib.suppress(ConnectionError):
                while await self.reader.read(65536):
                    pass

        try:
            await asyncio.wait_for(drain(), bound_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def exchange(port: int, data: bytes, bound_s: float = BOUND_S) -> Reply:
    """Send ``data`` on a new connection and read one answer."""
    connection = await Connection.open(port)
    try:
        await connection.send(data)
        return await connection.read_reply(bound_s, head=data.startswith(b"HEAD "))
    finally:
        await connection.close()

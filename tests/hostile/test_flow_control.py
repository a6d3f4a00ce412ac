"""Flow control on the proxy listener (issue 22, item 6): pipelining callers and connection floods.

A caller may pipeline requests without reading the answers; the listener must neither grow
with it nor keep it forever:

- at most ``MAX_PIPELINED`` requests are parsed ahead of the one being answered; the rest of
  what arrived stays raw bytes, and reading pauses until answers make room;
- while a caller does not read its answers (the write buffer above its high-water mark), no
  further request is read either;
- a caller that reads none of its answers for ``client_header_timeout`` is disconnected;
- a pipelined stream longer than one read is still served whole, in order, and so is one
  whose reads end anywhere (mid-head, mid-CRLF CRLF, in bodies full of CRLF CRLFs);
- past ``max_connections`` open connections, a new one is closed at once and counted.

The listener runs on a loopback socket; callers write raw bytes and, where they are meant not
to read, shrink their receive buffer and read nothing. Only where a test chooses where reads
end does it drive the protocol directly, on a transport of its own. Nothing is measured in
time: tests await events and conditions, each with a bound; memory is never the assertion, the
listener's own count of queued requests is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from idemproxy.app import build_proxy_app, serving_proxy
from idemproxy.config.settings import ConfigError, ProxyConfig, parse_config
from idemproxy.store import open_store
from idemproxy.wire.http_messages import Request, Response, StreamResponse
from idemproxy.wire.http_server import MAX_PIPELINED, HttpServer
from tests.hostile.conftest import fuzz
from tests.hostile.strategies import chunked_bodies
from tests.support.wire import BOUND_S, Connection, Serve, Served, connected, request, until

#: Requests a pipelining caller sends in one write.
REQUESTS = 1000
#: The size of each answer: a few dozen fill the shrunken socket buffers and the write buffer.
ANSWER_SIZE = 8 * 1024
#: The socket buffers of a caller that does not read (and of the listener's side of it).
SMALL_BUFFER = 8 * 1024
#: ``client_header_timeout`` where a test waits for it to pass.
SHORT_TIMEOUT_S = 0.2


# -- the listener's callers -----------------------------------------------------------------------------


def reluctant_caller(port: int) -> contextlib.AbstractAsyncContextManager[Connection]:
    """A connection whose caller reads nothing until told: a small receive buffer, and a stream
    reader that stops taking bytes from the socket after 2 x 8 KiB."""
    return connected(port, rcvbuf=SMALL_BUFFER, limit=SMALL_BUFFER)


def pipelined(count: int, *headers: tuple[str, str]) -> bytes:
    return b"".join(request("GET", f"/{number}", headers, close=False, length=False) for number in range(count))


@dataclass
class Answers:
    """A handler that answers each request with ``size`` bytes, its path in ``X-Path``.

    It records the paths it saw and, at each call, how many requests the listener had parsed
    ahead; it shrinks the listener's send buffer, so a caller that does not read backs it up soon."""

    size: int = ANSWER_SIZE
    listener: Served | None = None
    seen: list[str] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    transport: asyncio.Transport | None = None
    #: Set when a write fails because the listener closed the connection.
    cut_off: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> StreamResponse:
        assert self.listener is not None
        assert request.transport is not None
        if self.transport is None:
            self.transport = request.transport
            request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        self.seen.append(request.raw_path)
        self.queued.append(self.listener.queued())
        response = StreamResponse(headers={"Content-Length": str(self.size), "X-Path": request.raw_path})
        try:
            await response.prepare(request)
            await response.write(b"a" * self.size)
        except ConnectionResetError:
            self.cut_off.set()
            raise
        return response

    def backed_up(self) -> bool:
        """The listener's write buffer is over its high-water mark: its writer waits for the caller."""
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]


async def answering(
    serve: Serve, *, size: int = ANSWER_SIZE, header_timeout_s: float = BOUND_S
) -> tuple[Served, Answers]:
    answers = Answers(size)
    answers.listener = await serve(answers, header_timeout_s=header_timeout_s)
    return answers.listener, answers


# -- pipelining ----------------------------------------------------------------------------------------


async def test_a_caller_pipelining_without_reading_is_read_no_further_than_the_bound(serve: Serve) -> None:
    listener, answers = await answering(serve)
    async with reluctant_caller(listener.port) as pipelining:
        await pipelining.send(pipelined(REQUESTS))
        await until(answers.backed_up)
        # The caller reads nothing: the listener is stuck on an answer, and reads nothing more.
        assert answers.transport is not None
        assert not answers.transport.is_reading()
        assert len(answers.seen) < REQUESTS
        assert listener.queued() <= MAX_PIPELINED
        replies = [await pipelining.read_reply() for _ in range(REQUESTS)]

    paths = [f"/{number}" for number in range(REQUESTS)]
    assert [reply.headers["x-path"] for reply in replies] == paths  # every answer once, in order
    assert all(reply.status == 200 and len(reply.body) == ANSWER_SIZE for reply in replies)
    assert answers.seen == paths
    assert max(answers.queued) == MAX_PIPELINED  # read ahead up to the bound, never past it


async def test_a_caller_that_does_not_read_its_answer_is_not_read_either(serve: Serve) -> None:
    """Without pipelining too: while an answer waits for its caller, the next request is not read."""
    listener, answers = await answering(serve, size=1024 * 1024)  # more than the buffers hold
    async with reluctant_caller(listener.port) as reluctant:
        await reluctant.send(pipelined(1))
        await until(answers.backed_up)
        assert answers.transport is not None
        reading_while_backed_up = answers.transport.is_reading()
        await reluctant.send(request("GET", "/1", close=False, length=False))
        replies = [await reluctant.read_reply() for _ in range(2)]

    assert reading_while_backed_up is False
    assert [(reply.headers["x-path"], len(reply.body)) for reply in replies] == [("/0", 1 << 20), ("/1", 1 << 20)]
    assert answers.seen == ["/0", "/1"]


async def test_a_pipelining_caller_that_never_reads_is_disconnected(serve: Serve) -> None:
    listener, answers = await answering(serve, header_timeout_s=SHORT_TIMEOUT_S)
    async with reluctant_caller(listener.port) as never_reading:
        await never_reading.send(pipelined(REQUESTS))
        # The listener gives up on it one client_header_timeout after its writer stalled.
        async with asyncio.timeout(SHORT_TIMEOUT_S + BOUND_S):
            await answers.cut_off.wait()
        await until(lambda: not listener.http.connections)
        assert await never_reading.closed_by_server()

    assert len(answers.seen) < REQUESTS


async def test_a_pipelined_stream_longer_than_one_read_is_served_whole_in_order(serve: Serve) -> None:
    """A caller that pipelines and reads as it goes: the reads end anywhere, mid-head too."""
    count = 3000
    seen: list[str] = []

    async def echo(request: Request) -> StreamResponse:
        seen.append(request.raw_path)
        return Response(body=request.raw_path.encode())

    listener = await serve(echo)
    padding = ("X-Padding", "p" * 150)  # 3000 heads of about 200 bytes: several reads
    async with connected(listener.port) as pipelining:
        sending = asyncio.create_task(pipelining.send(pipelined(count, padding)))
        replies = [await pipelining.read_reply() for _ in range(count)]
        assert await sending

    paths = [f"/{number}" for number in range(count)]
    assert [(reply.status, reply.body.decode()) for reply in replies] == [(200, path) for path in paths]
    assert seen == paths


class Reads(asyncio.Transport):
    """A transport whose reads end where a test says: the listener's side of a socket, without one.
    It records what is written and whether the listener reads."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.resumed = asyncio.Event()
        self.resumed.set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_reading(self) -> bool:
        return self.resumed.is_set()

    def pause_reading(self) -> None:
        self.resumed.clear()

    def resume_reading(self) -> None:
        self.resumed.set()

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the listener closed a connection that only sent well-formed requests")

    def abort(self) -> None:
        self.close()


@st.composite
def requests_with_bodies(draw: st.DrawFn, number: int) -> tuple[bytes, bytes]:
    """``(request, body)``: a GET, or a request whose body holds CRLF CRLFs and request heads of its own."""
    path = f"/{number}"
    kind = draw(st.sampled_from(["get", "length", "chunked", "http/1.0"]))
    if kind == "get":
        return draw(st.sampled_from([b"", b"\r\n"])) + request("GET", path, close=False, length=False), b""
    if kind == "chunked":
        encoded, body = draw(chunked_bodies())
        return request("POST", path, [("Transfer-Encoding", "chunked")], encoded, length=False, close=False), body
    body = b"".join(draw(st.lists(st.sampled_from([b"\r\n\r\n", b"GET /no HTTP/1.1\r\n\r\n", b"x" * 300]))))
    if kind == "length":
        return request("POST", path, body=body, close=False), body
    head = f"PUT {path} HTTP/1.0\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    return head.encode() + body, body


#: Where reads end: a byte at a time (inside a CRLF CRLF), a few heads at once, many at once.
read_sizes = st.sampled_from([1, 2, 3, 5, 64, 300, 1024, 65536]) | st.integers(min_value=1, max_value=4096)


@st.composite
def pipelines(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    count = draw(st.integers(min_value=1, max_value=60))
    return [draw(requests_with_bodies(number)) for number in range(count)]


@fuzz(80)
@given(pipeline=pipelines(), reads=st.lists(read_sizes, min_size=1, max_size=30))
async def test_wherever_reads_end_pipelined_requests_are_served_in_order_within_the_bound(
    pipeline: list[tuple[bytes, bytes]], reads: list[int]
) -> None:
    """Reads end mid-head, mid-CRLF CRLF, mid-body; bodies hold CRLF CRLFs: each request still
    reaches the handler once, in order, with its body, and no more than ``MAX_PIPELINED`` are
    ever parsed ahead (directly on the protocol: a socket does not say where reads end)."""
    seen: list[tuple[str, bytes]] = []
    queued: list[int] = []
    all_seen = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        seen.append((request.raw_path, await request.read()))
        queued.append(connection.queued)
        if len(seen) == len(pipeline):
            all_seen.set()
        return Response(body=b"ok")

    http = HttpServer(handler, header_timeout_s=BOUND_S, max_body=1 << 20)
    connection, transport = http(), Reads()
    connection.connection_made(transport)
    stream = b"".join(data for data, _ in pipeline)
    at = 0
    async with asyncio.timeout(BOUND_S):
        for size in itertools.islice(itertools.cycle(reads), len(stream)):
            if at >= len(stream):
                break
            await transport.resumed.wait()  # a paused listener is sent nothing, as by a socket
            connection.data_received(stream[at : at + size])
            at += size
            queued.append(connection.queued)
        await all_seen.wait()
    connection.connection_lost(None)

    assert seen == [(f"/{number}", body) for number, (_, body) in enumerate(pipeline)]
    assert max(queued) <= MAX_PIPELINED
    assert transport.written.count(b"HTTP/1.") == len(pipeline)


# -- the connection limit ------------------------------------------------------------------------------


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def limited_config(tmp_path: Path, **top: Any) -> ProxyConfig:
    return parse_config(
        {
            "store": f"sqlite:///{tmp_path / 'ledger.db'}",
            **top,
            "routes": [{"name": "tools", "prefix": "/tools", "upstream": "http://127.0.0.1:9"}],
        }
    )


async def answered(connection: Connection) -> bool:
    """A request on ``connection`` got an answer (``/elsewhere``: the proxy answers 404 itself)."""
    await connection.send(request("GET", "/elsewhere", close=False))
    return (await connection.read_reply()).status == 404


async def test_a_connection_past_max_connections_is_closed_at_once_and_counted(tmp_path: Path) -> None:
    config = limited_config(tmp_path, max_connections=2)
    store = open_store(config.store)
    await store.start()
    try:
        app = build_proxy_app(config, store, run_reconciler=False)
        async with serving_proxy(app, "127.0.0.1", 0, grace_s=1.0) as listening:
            port = listening.sockets[0].getsockname()[1]
            refused_before = sample("idemproxy_refused_connections_total")
            open_before = sample("idemproxy_open_connections")
            first, second = await Connection.open(port), await Connection.open(port)
            assert await answered(first)
            assert await answered(second)
            third = await Connection.open(port)
            third_reply = await third.read_reply()
            refused = sample("idemproxy_refused_connections_total") - refused_before
            open_at_limit = sample("idemproxy_open_connections") - open_before

            await first.close()
            await until(lambda: len(app.http_server.connections) == 1)
            fourth = await Connection.open(port)
            fourth_answered = await answered(fourth)
            for connection in (second, third, fourth):
                await connection.close()
    finally:
        await store.close()

    assert (third_reply.status, third_reply.closed) == (0, True)  # closed without a word
    assert (refused, open_at_limit) == (1, 2)
    assert fourth_answered  # a place freed is taken again


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 512), (1, 1), (10_000, 10_000)],
    ids=["default", "one", "many"],
)
def test_max_connections_is_read_from_the_configuration(tmp_path: Path, value: int | None, expected: int) -> None:
    config = limited_config(tmp_path) if value is None else limited_config(tmp_path, max_connections=value)
    assert config.max_connections == expected


@pytest.mark.parametrize(
    ("value", "described"),
    [(0, "int 0"), (-1, "int -1"), ("many", "str 'many'"), (True, "bool True"), (1.5, "float 1.5")],
    ids=["zero", "negative", "text", "bool", "fraction"],
)
def test_max_connections_must_be_a_positive_whole_number(tmp_path: Path, value: object, described: str) -> None:
    with pytest.raises(ConfigError) as refused:
        limited_config(tmp_path, max_connections=value)
    assert refused.value.problems == [f"max_connections: expected a whole number of at least 1, got {described}"]

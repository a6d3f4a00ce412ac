"""The lean upstream client (``idemproxy.wire.upstream_client``) against real servers: the
messages on the wire.

How requests are framed (``Host``, Content-Length or chunked, bodies of every kind) and
how responses are parsed (status lines, fields, every body framing, informational
answers, a large body under flow control, a slow trickle). Raw servers from
``tests.support.raw_tool`` send exact bytes and record what arrived; well-behaved answers
come from the aiohttp tool server (``tests.support.upstream``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from yarl import URL

from idemproxy.wire.upstream_client import (
    Body,
    FailureKind,
    UpstreamClient,
    UpstreamFailed,
    _host_header,
)
from tests.support.raw_tool import (
    OK,
    Peer,
    ServeRaw,
    answering,
    fetch,
    send,
    stream,
)
from tests.support.upstream import Upstream

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
    raw_server: ServeRaw,
    method: str,
    make_body: BodyFactory,
    length: int | None,
    framing: dict[str, list[str]],
    arrived: bytes,
) -> None:
    server = await raw_server(answering(OK))
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


async def test_headers_are_sent_as_given_with_the_host_and_port(client: UpstreamClient, raw_server: ServeRaw) -> None:
    server = await raw_server(answering(OK))
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
    client: UpstreamClient, raw_server: ServeRaw, headers: dict[str, str]
) -> None:
    server = await raw_server(answering(OK))
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


async def test_response_headers_keep_repeats_and_the_reason(client: UpstreamClient, raw_server: ServeRaw) -> None:
    answer = b"HTTP/1.1 201 Made It\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
    server = await raw_server(answering(answer))
    response, body = await fetch(client, server.url)
    assert (response.status, response.reason, body) == (201, "Made It", b"")
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["X-Empty"] == ""
    assert response.content_length == 0


async def test_a_chunked_response_with_trailers(client: UpstreamClient, raw_server: ServeRaw) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    server = await raw_server(answering(answer, OK))
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
async def test_a_body_delimited_by_the_end_of_the_connection(
    client: UpstreamClient, raw_server: ServeRaw, head: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head)
        await peer.send(b"hello ")
        await peer.send(b"world")  # then the connection closes (a FIN)

    server = await raw_server(handler)
    response, body = await fetch(client, server.url)
    assert (response.status, response.content_length, body) == (200, None, b"hello world")


async def test_a_reset_does_not_end_a_close_delimited_body(client: UpstreamClient, raw_server: ServeRaw) -> None:
    headers_in = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.0 200 OK\r\n\r\npartial")
        await headers_in.wait()
        peer.reset()

    server = await raw_server(handler)
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
    client: UpstreamClient, raw_server: ServeRaw, answer: bytes, status: int
) -> None:
    server = await raw_server(answering(answer, OK))
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
async def test_informational_responses_are_skipped(
    client: UpstreamClient, raw_server: ServeRaw, writes: list[bytes]
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            for data in writes if len(peer.server.requests) == 1 else [OK]:
                await peer.send(data)

    server = await raw_server(handler)
    response, body = await fetch(client, server.url, "POST", "/hinted", body=b"{}")
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    assert response.headers["X-Real"] == "yes"
    assert "Link" not in response.headers  # the hint's headers are not the answer's
    await fetch(client, server.url, target="/next")
    assert server.served() == [(1, "/hinted"), (1, "/next")]


async def test_a_head_response_has_no_body_whatever_its_length(client: UpstreamClient, raw_server: ServeRaw) -> None:
    server = await raw_server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", OK))
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


async def test_a_response_head_split_into_single_bytes(client: UpstreamClient, raw_server: ServeRaw) -> None:
    answer = b"HTTP/1.1 202 Accepted\r\nX-A: one\r\nX-B: two words\r\nContent-Length: 5\r\n\r\nhello"

    async def handler(peer: Peer) -> None:
        await peer.request()
        for index in range(len(answer)):
            await peer.send(answer[index : index + 1])
        await peer.until_client_closes()

    server = await raw_server(handler)
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

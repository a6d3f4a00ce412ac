"""The proxy listener's HTTP/1.1 server (``idemproxy.wire.http_server``): one request and keep-alive.

What a handler sees of a request (its attributes, headers as sent, state for the
pipeline), the status line and ``Date``, and ordinary use through ``aiohttp.ClientSession``.
The real ``HttpServer`` runs on a loopback port (the ``serve`` fixture); raw callers come
from ``tests.support.wire``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from idemproxy.wire.http_messages import (
    Request,
    Response,
    StreamResponse,
)
from tests.support.http_handlers import Recorder
from tests.support.wire import Reply, Serve, get, post

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

"""The proxy listener's HTTP/1.1 server (``idemproxy.wire.http_server``): responses.

How answers are framed and written: Content-Length and chunked streams, HTTP/1.0 with and
without keep-alive, HEAD and bodiless statuses, handlers that raise, line breaks in header
values, and writes that wait for a caller that does not read. Raw callers from
``tests.support.wire`` against the real ``HttpServer`` on a loopback port.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from idemproxy.wire.http_messages import (
    Request,
    Response,
    StreamResponse,
)
from tests.support.http_handlers import STUCK_S, UNTIL_S, Recorder
from tests.support.wire import Reply, Serve, get, wait

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

"""The proxy listener's HTTP/1.1 server (``idemproxy.wire.http_server``): request bodies.

Content-Length and chunked bodies as the handler reads them (``read``, ``read_nowait``,
``iter_chunked``), the body limit, trailers, reading paused above the high-water mark, a
body left unread, and a framing error or a lost connection mid-body. The real
``HttpServer`` runs on a loopback port (the ``serve`` fixture); tests send exact bytes
with ``tests.support.wire`` and read exact bytes back. Handlers signal with
``asyncio.Event``s; timeouts are tiny and awaited as closed connections, never measured.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict

from idemproxy.protocol.errors import BodyTooLarge, IncompleteBody
from idemproxy.wire.http_messages import (
    BODY_HIGH_WATER,
    BODY_LOW_WATER,
    Request,
    Response,
    StreamResponse,
    problem_reply,
)
from tests.support.http_handlers import STUCK_S, Recorder, Seen
from tests.support.wire import Serve, get, post, until, wait

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
    assert reply.problem_document()["max_body"] == 10


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
    caller.hang_up()
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

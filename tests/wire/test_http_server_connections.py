"""The proxy listener's HTTP/1.1 server (``idemproxy.wire.http_server``): connections.

Pipelined requests answered in order one at a time, ``Connection: close`` and upgrades,
the head timeout, handlers whose caller left, shutdown with its grace period, early
answers and lingering. Raw callers from ``tests.support.wire`` against the real
``HttpServer`` on a loopback port.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from idemproxy.wire import http_server
from idemproxy.wire.http_messages import (
    Request,
    Response,
    StreamResponse,
)
from tests.support.http_handlers import UNTIL_S, Held, Recorder, answer_ok
from tests.support.wire import Handler, Serve, get, post, until, wait

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
        reply.problem_document()


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


async def test_the_head_timeout_counts_from_the_last_answer_not_from_the_connection(serve: Serve) -> None:
    """The head timer is kept across requests (not re-created per request): a caller sending
    each request well within the timeout of its previous answer is served past the moment the
    first timer was due, and still closed once it is idle for the whole timeout."""
    timeout_s = 0.5
    served = await serve(answer_ok, header_timeout_s=timeout_s)
    caller = await served.connect()
    for _ in range(3):  # the third request comes ~0.6 s after the connection opened
        await caller.send(get("/"))
        assert (await caller.reply()).status == 200
        await asyncio.sleep(0.6 * timeout_s)  # letting time pass, within the timeout of this answer

    assert await caller.rest() == b""  # idle for the whole timeout: closed, without an answer


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
    with caplog.at_level("INFO", logger="idemproxy.wire.http_server"):
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

"""The lean upstream client (``idemproxy.wire.upstream_client``) against real servers: its
connections and their life.

Keep-alive and the pool (idle timeouts, announced or not), how failures are classified
(refused, reset, cut short, timed out), the send guard asked right before writing,
releasing, cancelling and closing, and streamed request bodies against a slow or stuck
tool. Well-behaved answers come from the aiohttp tool server (``tests.support.upstream``);
misbehaving ones from the raw servers of ``tests.support.raw_tool``, which send exact
bytes and record what arrived on which connection.
"""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
import pytest
from yarl import URL

from idemproxy.wire.upstream_client import (
    KEEPALIVE_MARGIN_S,
    FailureKind,
    NotSent,
    UpstreamClient,
    UpstreamFailed,
    UpstreamResponse,
)
from tests.support.raw_tool import (
    OK,
    Peer,
    ServeRaw,
    answering,
    endless_upload,
    fetch,
    send,
    stream,
)
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

# -- keep-alive and the pool ------------------------------------------------------------


async def test_sequential_requests_share_one_connection(client: UpstreamClient, raw_server: ServeRaw) -> None:
    server = await raw_server(answering(OK))
    for target in ("/first", "/second"):
        response, body = await fetch(client, server.url, target=target)
        assert (response.status, body) == (200, b"ok")
    assert server.connections == 1
    assert server.served() == [(1, "/first"), (1, "/second")]


async def test_an_aiohttp_tool_gets_only_the_headers_given(client: UpstreamClient, upstream: Upstream) -> None:
    for number in (1, 2, 3):
        response, body = await fetch(
            client, upstream.url, "POST", "/items", headers={"X-Call": str(number)}, body=b"{}"
        )
        assert (response.status, orjson.loads(body)["effect"]) == (201, number)
    host = URL(upstream.url).raw_authority
    assert [effect.headers for effect in upstream.effects] == [
        {"Host": host, "X-Call": str(number), "Content-Length": "2"} for number in (1, 2, 3)
    ]  # nothing of the client's own: no User-Agent, Accept or Accept-Encoding


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        pytest.param(OK, True, id="http-1.1"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False, id="connection-close"
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, id="http-1.0"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True, id="http-1.0-keep-alive"
        ),
    ],
)
async def test_a_response_that_ends_the_connection_is_not_reused(
    client: UpstreamClient, raw_server: ServeRaw, answer: bytes, reused: bool
) -> None:
    server = await raw_server(answering(answer))  # the server itself would keep reading: only the client decides
    for target in ("/first", "/second"):
        response, body = await fetch(client, server.url, target=target)
        assert (response.status, body) == (200, b"ok")
    if reused:
        assert server.served() == [(1, "/first"), (1, "/second")]
    else:
        assert server.served() == [(1, "/first"), (2, "/second")]
        await server.until(lambda: 1 in server.finished)  # and the client closed it


@pytest.mark.parametrize(
    "farewell",
    [
        pytest.param(None, id="fin"),
        pytest.param(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n", id="unasked-408"),
    ],
)
async def test_a_pooled_connection_the_server_gave_up_on_is_discarded(
    client: UpstreamClient, raw_server: ServeRaw, farewell: bytes | None
) -> None:
    pooled = asyncio.Event()

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(OK)
            if peer.number == 1:
                await pooled.wait()  # then the server's idle keep-alive timeout strikes
                if farewell is None:
                    peer.writer.write_eof()
                else:
                    await peer.send(farewell)  # as some servers do, without closing
                await peer.until_client_closes()
                return

    server = await raw_server(handler)
    await fetch(client, server.url, target="/first")
    pooled.set()
    await server.until(lambda: 1 in server.finished)  # the client noticed and closed its end

    response, body = await fetch(client, server.url, "POST", "/second", body=b"{}")

    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]  # sent once, on a new connection


async def test_an_idle_connection_is_closed_after_keepalive(raw_server: ServeRaw) -> None:
    client = UpstreamClient(keepalive_s=0.05)
    try:
        server = await raw_server(answering(OK))
        await fetch(client, server.url, target="/first")
        await server.until(lambda: server.finished == [1])  # swept: the client closed it
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]


def announcing(timeout: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nKeep-Alive: %s\r\nContent-Length: 2\r\n\r\nok" % timeout.encode()


@pytest.mark.parametrize(
    ("announced", "reused"),
    [
        pytest.param("timeout=5, max=100", True, id="five-seconds"),
        pytest.param("max=100, Timeout = 30", True, id="any-order-and-case"),
        pytest.param("timeout=1", False, id="within-the-margin"),
        pytest.param("timeout=0", False, id="none"),
        pytest.param("max=100", True, id="no-timeout"),
    ],
)
async def test_a_connection_is_pooled_only_while_its_tool_announces_it_keeps_it(
    raw_server: ServeRaw, announced: str, reused: bool
) -> None:
    client = UpstreamClient()
    try:
        server = await raw_server(answering(announcing(announced)))
        await fetch(client, server.url, target="/first")
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (1 if reused else 2, "/second")]


@pytest.mark.parametrize(
    ("keepalive_s", "answer"),
    [
        pytest.param(0.02, OK, id="our-keepalive"),
        pytest.param(30.0, announcing(f"timeout={KEEPALIVE_MARGIN_S + 0.02}"), id="announced-by-the-tool"),
    ],
)
async def test_a_connection_idle_past_keepalive_is_not_taken_from_the_pool(
    raw_server: ServeRaw, keepalive_s: float, answer: bytes
) -> None:
    client = UpstreamClient(keepalive_s=keepalive_s)
    try:
        server = await raw_server(answering(answer))
        await fetch(client, server.url, target="/first")
        # Blocks the loop on purpose: time passes, but the sweeper cannot run before the next send.
        time.sleep(0.03)  # noqa: ASYNC251
        response, body = await fetch(client, server.url, target="/second")
    finally:
        await client.close()
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]
    await server.until(lambda: 1 in server.finished)


# -- failures -------------------------------------------------------------------------------------


async def test_a_refused_connection_is_connect(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, f"http://127.0.0.1:{free_port()}", "POST", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECT


async def test_a_connect_timeout_is_connect(client: UpstreamClient) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs until connect_s.
    # (Unlike a non-routable address, this needs no network: sandboxes may intercept outbound TCP.)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            with pytest.raises(UpstreamFailed) as failed:
                await send(client, f"http://127.0.0.1:{port}", "POST", body=b"{}", connect_s=0.05, read_s=0.05)
        finally:
            for filler in fillers:
                filler.close()
    assert failed.value.kind is FailureKind.CONNECT
    assert "timed out" in failed.value.detail


async def test_an_unresolvable_host_is_connect(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, "http://no-such-host.invalid:81", connect_s=2.0)
    assert failed.value.kind is FailureKind.CONNECT


async def test_no_answer_within_read_s_is_timeout(client: UpstreamClient, raw_server: ServeRaw) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_client_closes()  # never answers

    server = await raw_server(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "POST", "/silent", body=b"{}", read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert server.served() == [(1, "/silent")]
    await server.until(lambda: server.finished == [1])  # the timed-out connection was closed


async def test_read_s_counts_from_each_exchange_on_a_reused_connection(
    client: UpstreamClient, raw_server: ServeRaw
) -> None:
    """One read timer serves a connection's exchanges in turn: a later exchange gets its whole
    read_s, although the timer the first one armed is due meanwhile, and a silent answer is
    still a timeout."""
    read_s = 0.5
    answered = 0

    async def handler(peer: Peer) -> None:
        nonlocal answered
        while await peer.request() is not None:
            if answered == 2:
                await peer.until_client_closes()  # never answers the third
                return
            if answered == 1:
                await asyncio.sleep(0.6 * read_s)  # a slow answer, within read_s of its request
            answered += 1
            await peer.send(OK)

    server = await raw_server(handler)
    first, _ = await fetch(client, server.url, read_s=read_s)
    await asyncio.sleep(0.6 * read_s)  # letting time pass between two exchanges
    second, body = await fetch(client, server.url, read_s=read_s)  # answered 1.2 read_s after the first
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, read_s=read_s)

    assert (first.status, second.status, body) == (200, 200, b"ok")
    assert failed.value.kind is FailureKind.TIMEOUT
    assert [number for number, _ in server.served()] == [1, 1, 1]  # one connection throughout


async def test_an_aiohttp_tool_that_does_not_answer_in_time_is_timeout(
    client: UpstreamClient, upstream: Upstream
) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, upstream.url, "POST", "/gate", body=b"{}", read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert upstream.count("/gate") == 1
    upstream.release.set()


async def test_a_body_that_stalls_is_timeout(client: UpstreamClient, raw_server: ServeRaw) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await peer.until_client_closes()

    server = await raw_server(handler)
    response = await send(client, server.url, read_s=0.1)
    try:
        with pytest.raises(UpstreamFailed) as failed:
            await response.read()
    finally:
        response.release()
    assert failed.value.kind is FailureKind.TIMEOUT
    await server.until(lambda: server.finished == [1])


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_close_after_the_request_is_connection_lost(
    client: UpstreamClient, raw_server: ServeRaw, how: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if how == "rst":
            peer.reset()

    server = await raw_server(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "POST", "/dropped", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert server.served() == [(1, "/dropped")]


async def test_an_aiohttp_tool_dropping_the_connection_is_connection_lost(
    client: UpstreamClient, upstream: Upstream
) -> None:
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, upstream.url, "POST", "/reset", body=b"{}")
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert upstream.count("/reset") == 1


@pytest.mark.parametrize("reader", ["read", "chunks"])
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..", id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nhalf", id="mid-chunk"),
    ],
)
async def test_a_close_mid_body_is_connection_lost(
    client: UpstreamClient, raw_server: ServeRaw, answer: bytes, reader: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)  # then closes: less than was promised

    server = await raw_server(handler)
    received: list[bytes] = []

    async def read_all(response: UpstreamResponse) -> None:
        if reader == "read":
            received.append(await response.read())
        else:
            received.extend([chunk async for chunk in response.chunks()])

    response = await send(client, server.url)
    try:
        assert response.status == 200
        with pytest.raises(UpstreamFailed) as failed:
            await read_all(response)
    finally:
        response.release()
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    assert len(b"".join(received)) < 100  # what came before the break, never passed off as all of it


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 2000 Nope\r\n\r\n", id="bad-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="bad-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk"),
    ],
)
async def test_garbage_instead_of_a_response_is_connection_lost(
    client: UpstreamClient, raw_server: ServeRaw, answer: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_client_closes()  # the client must give up by itself

    server = await raw_server(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await fetch(client, server.url)
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    await server.until(lambda: server.finished == [1])


async def test_a_protocol_switch_is_connection_lost(
    client: UpstreamClient, raw_server: ServeRaw, caplog: pytest.LogCaptureFixture
) -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00"

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_client_closes()

    server = await raw_server(handler)
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert failed.value.kind is FailureKind.CONNECTION_LOST
    await server.until(lambda: server.finished == [1])
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []


@pytest.mark.parametrize("extra_write", [False, True], ids=["same-write", "own-write"])
async def test_bytes_after_a_complete_response_spoil_the_connection(
    client: UpstreamClient, raw_server: ServeRaw, extra_write: bool
) -> None:
    stray = b"HTTP/1.1 500 Stray\r\nContent-Length: 5\r\n\r\nstray"

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            if peer.number == 1 and extra_write:
                await peer.send(OK)
                await peer.send(stray)
            elif peer.number == 1:
                await peer.send(OK + stray)
            else:
                await peer.send(OK)

    server = await raw_server(handler)
    response, body = await fetch(client, server.url, target="/first")
    assert (response.status, response.reason, body) == (200, "OK", b"ok")
    await server.until(lambda: 1 in server.finished)  # the client closed the talkative connection
    response, body = await fetch(client, server.url, target="/second")
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/first"), (2, "/second")]


# -- the send guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True], ids=["new-connection", "pooled-connection"])
async def test_a_refusing_guard_writes_nothing_and_keeps_the_connection(
    client: UpstreamClient, raw_server: ServeRaw, pooled: bool
) -> None:
    server = await raw_server(answering(OK))
    if pooled:
        await fetch(client, server.url, target="/before")
    asked: list[bool] = []

    def refuse() -> bool:
        asked.append(True)
        return False

    with pytest.raises(NotSent):
        await send(client, server.url, "POST", "/refused", body=b"{}", guard=refuse)

    assert asked == [True]
    response, body = await fetch(client, server.url, "POST", "/after", body=b"{}", guard=lambda: True)
    assert (response.status, body) == (200, b"ok")
    # The next request went out cleanly on the very same connection: nothing of the refused one was written.
    assert server.served() == ([(1, "/before")] if pooled else []) + [(1, "/after")]
    assert server.connections == 1


async def test_a_guard_that_raises_closes_the_connection_it_was_asked_about(
    client: UpstreamClient, raw_server: ServeRaw
) -> None:
    server = await raw_server(answering(OK, OK))
    await fetch(client, server.url, target="/before")

    def broken() -> bool:
        raise LookupError("the lease table is gone")

    with pytest.raises(LookupError):
        await send(client, server.url, "POST", "/refused", body=b"{}", guard=broken)

    response, body = await fetch(client, server.url, target="/after")
    assert (response.status, body) == (200, b"ok")
    assert server.served() == [(1, "/before"), (2, "/after")]  # the first connection was closed, not pooled
    assert server.connections == 2


# -- releasing, cancelling, closing -------------------------------------------------------------


async def test_releasing_an_unread_response_closes_the_connection(client: UpstreamClient, raw_server: ServeRaw) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000

    server = await raw_server(answering(big, OK))
    response = await send(client, server.url, target="/big")
    assert response.status == 200
    response.release()
    response.release()  # twice is harmless
    await server.until(lambda: 1 in server.finished)
    response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/big"), (2, "/next")]


async def test_releasing_a_response_read_to_the_end_keeps_the_connection(
    client: UpstreamClient, raw_server: ServeRaw
) -> None:
    server = await raw_server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", OK))
    response = await send(client, server.url, target="/first")
    assert [chunk async for chunk in response.chunks()] == [b"abc"]
    response.release()
    await fetch(client, server.url, target="/second")
    assert server.served() == [(1, "/first"), (1, "/second")]


async def test_cancelling_send_while_waiting_for_the_head_closes_the_connection(
    client: UpstreamClient, raw_server: ServeRaw
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            if peer.number == 1:
                await peer.until_client_closes()  # never answers the first connection
                return
            await peer.send(OK)

    server = await raw_server(handler)
    sending = asyncio.create_task(send(client, server.url, "POST", "/hung", body=b"{}"))
    await server.until(lambda: len(server.requests) == 1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await server.until(lambda: 1 in server.finished)  # closed, not pooled with an answer pending
    _response, body = await fetch(client, server.url, target="/next")
    assert body == b"ok"
    assert server.served() == [(1, "/hung"), (2, "/next")]


async def test_close_closes_idle_connections_and_refuses_new_sends(raw_server: ServeRaw) -> None:
    client = UpstreamClient()
    server = await raw_server(answering(OK))
    await fetch(client, server.url)
    await client.close()
    await server.until(lambda: server.finished == [1])
    with pytest.raises(RuntimeError, match="closed"):
        await send(client, server.url)
    await client.close()  # twice is harmless
    assert server.connections == 1


async def test_a_response_in_flight_at_close_is_not_pooled_after(raw_server: ServeRaw) -> None:
    client = UpstreamClient()
    server = await raw_server(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"))
    response = await send(client, server.url)
    await client.close()
    assert await response.read() == b"abc"
    response.release()
    await server.until(lambda: server.finished == [1])


# -- streamed request bodies against a slow or stuck tool -----------------------------------------


async def test_a_slow_steady_upload_is_not_a_timeout(client: UpstreamClient, raw_server: ServeRaw) -> None:
    server = await raw_server(answering(OK))
    pieces = [b"piece %d;" % n for n in range(8)]
    # Each piece goes out well within read_s, though the upload takes longer than read_s.
    response, body = await fetch(client, server.url, "PUT", "/upload", body=stream(*pieces, every_s=0.05), read_s=0.25)
    assert (response.status, body) == (200, b"ok")
    assert server.requests[0].body == b"".join(pieces)


async def test_an_upload_that_stalls_past_read_s_is_timeout(client: UpstreamClient, raw_server: ServeRaw) -> None:
    server = await raw_server(answering(OK))
    with pytest.raises(UpstreamFailed) as failed:
        await send(client, server.url, "PUT", "/upload", body=stream(b"a", b"b", every_s=0.3), read_s=0.1)
    assert failed.value.kind is FailureKind.TIMEOUT  # not the connection loss the timeout itself caused
    assert "no data" in failed.value.detail
    await server.until(lambda: server.finished == [1])
    assert server.requests == []  # the body never completed


async def test_an_answer_before_the_upload_ends_stops_the_upload(client: UpstreamClient, raw_server: ServeRaw) -> None:
    """A tool may refuse a body early (413) and stop reading it: the answer is returned,
    the rest of the body is not sent, and the connection is not reused."""
    refused = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"

    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")  # the head only
        await peer.send(refused)
        await asyncio.Event().wait()  # and no more reading: the socket buffers fill up

    server = await raw_server(handler)
    async with asyncio.timeout(5):  # a hang fails here, not at the suite's timeout
        response, body = await fetch(client, server.url, "PUT", "/upload", body=endless_upload(), read_s=30)
    assert (response.status, body) == (413, b"too big!")
    assert (await fetch(client, server.url))[0].status == 413  # on a new connection: the server's second
    assert server.connections == 2


async def test_a_tool_that_stops_reading_the_body_is_timeout(client: UpstreamClient, raw_server: ServeRaw) -> None:
    async def handler(peer: Peer) -> None:
        await asyncio.Event().wait()  # reads nothing, answers nothing: the socket buffers fill up

    server = await raw_server(handler)
    async with asyncio.timeout(5):  # a hang fails here, not at the suite's timeout
        with pytest.raises(UpstreamFailed) as failed:
            await send(client, server.url, "PUT", "/upload", body=endless_upload(), read_s=0.2)
    assert failed.value.kind is FailureKind.TIMEOUT
    assert "no data" in failed.value.detail
    assert server.connections == 1

"""Slowloris: request heads and bodies that are trickled or never finished.

The stack runs with ``client_header_timeout`` and ``client_body_timeout`` of 1 s. The tests
never measure time: they wait, with a generous bound, for the server to answer or close, and
check that nothing was forwarded or recorded meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest

from tests.hostile.checks import assert_refusal
from tests.hostile.stack import Stack
from tests.support.wire import Connection, request

pytestmark = pytest.mark.asyncio(loop_scope="module")

_keys = (f"slow-{n}" for n in itertools.count())
#: Pacing of a trickle: well under the 1 s timeouts, so only their total can trip them.
TRICKLE_EVERY_S = 0.1


@asynccontextmanager
async def connection(stack: Stack) -> AsyncIterator[Connection]:
    opened = await Connection.open(stack.port)
    try:
        yield opened
    finally:
        await opened.close()


async def trickle(connection: Connection, data: bytes) -> None:
    """Send ``data`` a byte at a time until the server closes the connection."""
    for byte in data:
        if not await connection.send(bytes([byte])):
            return
        await asyncio.sleep(TRICKLE_EVERY_S)


def head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A complete request head without its body (``Content-Length`` among ``headers``)."""
    return request(method, target, headers, b"", length=False, close=False)


@pytest.mark.parametrize("sent", [b"POST /items HTTP/1.1\r\nHost: x\r\n", b"POST /items HT", b""], ids=str)
async def test_a_head_never_finished_is_closed(stack: Stack, sent: bytes) -> None:
    before = await stack.mark()
    async with connection(stack) as slow:
        await slow.send(sent)
        assert await slow.closed_by_server()
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


async def test_a_trickled_head_is_closed_however_steadily_it_arrives(stack: Stack) -> None:
    before = await stack.mark()
    async with connection(stack) as slow:
        endless = b"POST /items HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        trickling = asyncio.create_task(trickle(slow, endless))
        try:
            assert await slow.closed_by_server()
        finally:
            trickling.cancel()
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


async def test_an_idle_keep_alive_connection_is_closed(stack: Stack) -> None:
    async with connection(stack) as idle:
        await idle.send(request("GET", "/items/__health", close=False))
        assert (await idle.read_reply()).status == 201
        assert await idle.closed_by_server()


UNFINISHED = [
    pytest.param("POST", "/items", [("Content-Length", "100")], b"{", "problem", id="side-effect-length"),
    pytest.param(
        "POST", "/items", [("Transfer-Encoding", "chunked")], b"5\r\nabc", "problem", id="side-effect-chunked"
    ),
    pytest.param("POST", "/derive", [("Content-Length", "100")], b'{"a"', "problem", id="derive"),
    pytest.param("POST", "/mcp", [("Content-Length", "100")], b'{"jsonrpc"', "jsonrpc", id="mcp"),
    pytest.param("GET", "/items", [("Content-Length", "100")], b"abc", "problem", id="passthrough-length"),
    pytest.param("PUT", "/items", [("Expect", "100-continue"), ("Content-Length", "10")], b"", "problem", id="expect"),
]


@pytest.mark.parametrize(("method", "target", "headers", "sent", "answer"), UNFINISHED)
async def test_a_body_never_finished_gets_408_and_is_closed(
    stack: Stack, method: str, target: str, headers: list[tuple[str, str]], sent: bytes, answer: str
) -> None:
    before = await stack.mark()
    async with connection(stack) as slow:
        await slow.send(head(method, target, [("Idempotency-Key", next(_keys)), *headers]) + sent)
        reply = await slow.read_reply()
        if reply.status == 100:  # Expect: 100-continue, then nothing
            reply = await slow.read_reply()
        assert reply.status == 408, reply
        if answer == "problem":
            assert reply.problem == "request-timeout"
        else:  # MCP routes answer in JSON-RPC
            body = reply.json()
            assert isinstance(body, dict)
            assert body["error"]["data"]["type"] == "urn:idemproxy:problem:request-timeout"
        assert await slow.closed_by_server()
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


async def test_a_chunk_size_that_breaks_mid_body_ends_in_400(stack: Stack) -> None:
    """Once the handler reads the body, a framing error fails the body at once: the request is
    answered ``incomplete-body`` (nothing recorded) and the connection closed."""
    before = await stack.mark()
    async with connection(stack) as broken:
        headers = [("Idempotency-Key", next(_keys)), ("Transfer-Encoding", "chunked"), ("Expect", "100-continue")]
        await broken.send(head("POST", "/items", headers))
        assert (await broken.read_reply()).status == 100  # the handler has the request now
        await broken.send(b"3\r\nabc\r\nzz\r\nabc\r\n0\r\n\r\n")
        refusal = await broken.read_reply()
        assert_refusal(refusal, {"incomplete-body"})
        assert refusal.closed
        assert await broken.closed_by_server()
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


async def test_a_trickled_body_gets_408_however_steadily_it_arrives(stack: Stack) -> None:
    before = await stack.mark()
    async with connection(stack) as slow:
        await slow.send(head("POST", "/items", [("Idempotency-Key", next(_keys)), ("Content-Length", "1000")]))
        trickling = asyncio.create_task(trickle(slow, b"z" * 1000))
        try:
            reply = await slow.read_reply()
        finally:
            trickling.cancel()
        assert_refusal(reply, {"request-timeout"})
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


@pytest.mark.parametrize("target", ["/items", "/mcp", "/derive"])
async def test_a_caller_hanging_up_mid_body_is_no_error(stack: Stack, target: str) -> None:
    """No internal error, nothing recorded, nothing forwarded: the caller simply went away."""
    before, logged = await stack.mark(), len(stack.log.entries)
    async with connection(stack) as gone:
        await gone.send(head("POST", target, [("Idempotency-Key", next(_keys)), ("Content-Length", "100")]) + b"{")
    entry = await stack.log.wait_for(lambda entry: entry["route"] == target[1:], after=logged)
    assert entry["decision"] == "rejected", entry
    assert entry["status"] == 400, entry
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


async def test_a_body_that_arrives_in_time_in_pieces_is_accepted(stack: Stack) -> None:
    before = await stack.mark()
    body = orjson.dumps({"pieces": list(range(50))})
    async with connection(stack) as steady:
        await steady.send(
            head("POST", "/items", [("Idempotency-Key", next(_keys)), ("Content-Length", str(len(body)))])
        )
        for start in range(0, len(body), 40):
            await steady.send(body[start : start + 40])
        reply = await steady.read_reply()
    assert reply.status == 201, reply
    assert [seen.body for seen in stack.since(before)] == [body]
    stack.assert_sound_since(before)


async def test_a_caller_still_uploading_gets_its_413_not_a_reset(stack: Stack) -> None:
    """The 413 goes out as soon as the declared length is read; the caller only reads it once
    its upload is done. The proxy drops the rest of the body meanwhile instead of closing
    under it (which would reset the connection and lose the answer)."""
    before = await stack.mark()
    size = 8 * 1024 * 1024
    async with connection(stack) as uploading:
        await uploading.send(head("POST", "/items", [("Idempotency-Key", next(_keys)), ("Content-Length", str(size))]))
        for _ in range(size // 65536):
            assert await uploading.send(b"z" * 65536)
        refusal = await uploading.read_reply()
        assert_refusal(refusal, {"body-too-large"})
        assert refusal.closed
    await stack.assert_untouched_since(before)
    await stack.assert_serving()

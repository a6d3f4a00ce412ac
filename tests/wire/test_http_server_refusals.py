"""The proxy listener's HTTP/1.1 server (``idemproxy.wire.http_server``): what it refuses.

Malformed heads, targets, fields and heads over their limits (sent whole or trickled in),
broken chunked framing, expectations (and when ``100 Continue`` is sent), and where a
refusal falls among pipelined requests: each a problem+json answer, the connection closed
where the framing cannot be trusted. Raw callers from ``tests.support.wire`` against the
real ``HttpServer`` on a loopback port.
"""

from __future__ import annotations

import asyncio

import pytest

from idemproxy.protocol import PROBLEM_TYPE_PREFIX
from idemproxy.protocol.errors import IncompleteBody
from idemproxy.wire.http_messages import (
    Request,
    Response,
    StreamResponse,
)
from idemproxy.wire.http_server import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
)
from tests.support.http_handlers import Held, Recorder, answer_ok
from tests.support.wire import Reply, Serve, Served, get, post, wait

# -- refusals ----------------------------------------------------------------------------------


async def assert_refused(served: Served, data: bytes, status: int, slug: str) -> Reply:
    """``data`` gets a problem ``status``/``slug`` and then the connection closes, nothing more answered."""
    caller = await served.connect()
    caller.writer.write(data)
    reply = await caller.reply()
    assert (reply.status, reply.slug()) == (status, slug), reply
    assert reply.problem_document()["type"] == f"{PROBLEM_TYPE_PREFIX}{slug}"
    assert await caller.rest() == b""
    return reply


MALFORMED_HEADS = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="content-length-and-chunked",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", id="two-lengths"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
    pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", id="bad-length"),
    pytest.param(b"GET / HTTP/1.1\nHost: t\n\n", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n  b\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nBad@Name: x\r\n\r\n", id="non-token-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(b"G@T / HTTP/1.1\r\n\r\n", id="bad-method"),
    pytest.param(b"GET / HTTP/1.x\r\n\r\n", id="bad-version"),  # HTTP/9.9 is a 505
    pytest.param(b"GET /a b HTTP/1.1\r\n\r\n", id="space-in-target"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-hello"),
    pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", id="chunked-not-last"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nContent-Type: a/b\r\ncontent-type: c/d\r\n\r\n", id="two-content-types"),
    pytest.param(b"GET / HTTP/1.1\r\nUser-Agent: a\r\nUser-Agent: a\r\n\r\n", id="two-user-agents"),
]


@pytest.mark.parametrize("data", MALFORMED_HEADS)
async def test_a_malformed_head_is_refused_and_nothing_after_it_is_read(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, data + get("/after"), 400, "malformed-request")

    assert recorder.seen == []


async def test_a_malformed_request_after_a_good_one_on_the_same_connection(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/good"))
    good = await caller.reply()
    await caller.send(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n" + get("/after"))
    refused = await caller.reply()

    assert good.status == 200
    assert (refused.status, refused.slug()) == (400, "malformed-request")
    assert await caller.rest() == b""
    assert recorder.paths == ["/good"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n", id="chunk-too-long"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", id="bare-lf-in-chunks"
        ),
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc", id="coding-not-chunked"),
    ],
)
async def test_broken_chunked_framing_fails_the_body(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, data + get("/after"), 400, "incomplete-body")

    assert recorder.paths == ["/"]
    assert isinstance(recorder.seen[0].error, IncompleteBody)


async def test_refusals_tell_the_caller_the_connection_closes(serve: Serve) -> None:
    served = await serve(answer_ok)

    reply = await assert_refused(served, b"GET / HTTP/1.1\nHost: t\n\n", 400, "malformed-request")

    assert reply.headers.get("Connection") == "close"  # as every other response the server closes after
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert "Date" in reply.headers


async def test_a_target_up_to_max_line_is_served_and_one_byte_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    longest = "/" + "a" * (MAX_LINE - 1)

    reply = await served.exchange(get(longest))
    await assert_refused(served, get(longest + "a"), 414, "target-too-long")

    assert reply.status == 200
    assert recorder.paths == [longest]


async def test_a_target_split_across_reads_is_measured_whole(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/sync") + b"GET /" + b"a" * 5000)
    await caller.reply()  # the server has read the first part of the second target
    await caller.send(b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    reply = await caller.reply()

    assert (reply.status, reply.slug()) == (414, "target-too-long")
    assert recorder.paths == ["/sync"]


async def test_a_field_up_to_max_line_is_served_and_one_byte_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    longest = "X-Long: " + "v" * (MAX_LINE - len("X-Long"))  # name and value: MAX_LINE bytes

    reply = await served.exchange(get("/", longest))
    await assert_refused(served, get("/", longest + "v"), 431, "header-fields-too-large")

    assert reply.status == 200
    assert len(recorder.seen[0].headers["X-Long"]) == MAX_LINE - len("X-Long")


async def test_a_long_header_name_is_refused(serve: Serve) -> None:
    served = await serve(answer_ok)

    await assert_refused(served, get("/", "X" * (MAX_LINE + 1) + ": v"), 431, "header-fields-too-large")


async def test_max_headers_fields_are_served_and_one_more_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    fields = [f"X-{number}: {number}" for number in range(MAX_HEADERS - 1)]  # plus Host

    reply = await served.exchange(get("/", *fields))
    await assert_refused(served, get("/", *fields, "X-One-More: 1"), 431, "header-fields-too-large")

    assert reply.status == 200
    assert len(recorder.seen[0].headers) == MAX_HEADERS


def big_head_fields() -> list[str]:
    """Fields each well under MAX_LINE and fewer than MAX_HEADERS, together over MAX_HEAD."""
    fields = [f"X-Big-{number}: " + "b" * 4000 for number in range(MAX_HEAD // 4000 + 2)]
    assert len(fields) < MAX_HEADERS
    assert sum(map(len, fields)) > MAX_HEAD
    return fields


async def test_a_head_over_max_head_in_one_write_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    await assert_refused(served, get("/", *big_head_fields()), 431, "header-fields-too-large")

    assert recorder.seen == []


async def test_a_head_over_max_head_trickled_in_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    fields = "".join(f"X-Big-{number}: " + "b" * 3990 + "\r\n" for number in range(MAX_HEAD // 4000 + 1)).encode()
    fields = fields[: MAX_HEAD + 100]  # over MAX_HEAD by the last piece only, and never complete
    caller = await served.connect()
    await caller.send(get("/sync") + b"GET /big HTTP/1.1\r\n")
    await caller.reply()  # the server has read the start of the big head
    for start in range(0, len(fields), 4096):
        await caller.send(fields[start : start + 4096])
    refused = await caller.reply()

    assert (refused.status, refused.slug()) == (431, "header-fields-too-large")
    assert await caller.rest() == b""
    assert recorder.paths == ["/sync"]


async def test_a_split_head_followed_by_a_large_body_is_not_taken_for_a_large_head(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    body = b"p" * 200_000
    caller = await served.connect()
    await caller.send(get("/sync") + b"POST /upload HTTP/1.1\r\n")
    await caller.reply()  # the server has read the head's first line
    await caller.send(f"Host: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # one read: head + body
    reply = await caller.reply()

    assert reply.status == 200, reply
    assert reply.body == body
    assert recorder.paths == ["/sync", "/upload"]


async def test_an_unsupported_expectation_is_refused(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)

    reply = await assert_refused(
        served, post("/", b"body", "Expect: something-else") + get("/after"), 417, "expectation-failed"
    )

    assert "something-else" in reply.problem_document()["detail"]
    assert recorder.seen == []


async def test_100_continue_is_sent_before_the_body_is_read(serve: Serve) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/", "Content-Length: 7", "Expect: 100-Continue", method="PUT"))
    interim = await caller.reply()
    await caller.send(b"payload")
    final = await caller.reply()

    assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (final.status, final.body) == (200, b"payload")
    assert recorder.seen[0].body == b"payload"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(post("/", b"payload", "Expect: 100-continue"), id="body-with-the-head"),
        pytest.param(get("/", "Expect: 100-continue"), id="no-body"),
        pytest.param(post("/", b"", "Expect: 100-continue"), id="empty-body"),
        pytest.param(
            get("/", "Content-Length: 7", "Expect: 100-continue", method="PUT", version="1.0") + b"payload",
            id="http-1.0",
        ),
    ],
)
async def test_no_100_continue_when_the_body_has_already_arrived(serve: Serve, data: bytes) -> None:
    recorder = Recorder()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(data)
    reply = await caller.reply()

    assert reply.status == 200, reply.head  # the final answer directly, no interim 100
    assert recorder.paths == ["/"]


async def test_100_continue_for_a_pipelined_request_comes_after_the_answer_before_it(serve: Serve) -> None:
    release = asyncio.Event()
    recorder = Recorder()

    async def handler(request: Request) -> StreamResponse:
        if request.path == "/first":
            await release.wait()
        return await recorder(request)

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/first") + get("/second", "Content-Length: 4", "Expect: 100-continue", method="PUT"))
    release.set()
    first = await caller.reply()
    interim = await caller.reply()
    await caller.send(b"data")
    second = await caller.reply()

    assert (first.status, interim.status, second.status, second.body) == (200, 100, 200, b"data")


async def test_a_refusal_behind_a_request_in_progress_comes_after_its_answer(serve: Serve) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        started.set()
        await release.wait()
        return Response(body=b"first answer")

    served = await serve(handler)
    caller = await served.connect()
    await caller.send(get("/first") + b"GET /second HTTP/1.1\nHost: t\n\n")
    await wait(started)
    release.set()
    first = await caller.reply()
    refused = await caller.reply()

    assert (first.status, first.body) == (200, b"first answer")
    assert first.headers["Connection"] == "close"  # the server knows no more will be answered
    assert (refused.status, refused.slug()) == (400, "malformed-request")
    assert await caller.rest() == b""


async def test_a_refusal_behind_a_pipelined_request_drops_it_and_follows_the_answer(serve: Serve) -> None:
    recorder = Held()
    served = await serve(recorder)
    caller = await served.connect()
    await caller.send(get("/first") + get("/second") + get("/" + "t" * (MAX_LINE + 10)))
    await wait(recorder.started)
    recorder.release.set()
    first = await caller.reply()
    refused = await caller.reply()

    assert first.status == 200
    assert (refused.status, refused.slug()) == (414, "target-too-long")
    assert await caller.rest() == b""
    assert recorder.paths == ["/first"]

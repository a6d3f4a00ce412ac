"""Body framing: chunk extensions and trailers, bad chunk sizes, Content-Length and
Transfer-Encoding conflicts and overflows, unsupported codings, compressed bodies, and bodies
over a route's ``max_body`` (side-effecting and passthrough)."""

from __future__ import annotations

import gzip
import itertools

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.hostile.checks import assert_refusal, assert_refused
from tests.hostile.conftest import fuzz
from tests.hostile.stack import ITEMS_MAX_BODY, Stack
from tests.hostile.strategies import BAD_CHUNK_SIZES, chunk_extensions, chunked_bodies
from tests.support.wire import request

pytestmark = pytest.mark.asyncio(loop_scope="module")

_keys = (f"bodies-{n}" for n in itertools.count())
CHUNKED = ("Transfer-Encoding", "chunked")


def chunked_post(body: bytes, *headers: tuple[str, str], method: str = "POST") -> bytes:
    key = [("Idempotency-Key", next(_keys))] if method == "POST" else []
    return request(method, "/items", [*key, CHUNKED, *headers], body, length=False)


@fuzz(60)
@given(body=chunked_bodies())
async def test_well_formed_chunked_bodies_reach_the_tool_as_their_data(stack: Stack, body: tuple[bytes, bytes]) -> None:
    """Extensions and trailers are framing: the tool gets exactly the data, once."""
    encoded, data = body
    before = await stack.mark()
    reply = await stack.send(chunked_post(encoded))
    assert reply.status == 201, reply
    (seen,) = stack.since(before)
    assert seen.body == data
    assert not [name for name, _ in seen.headers if name.lower().startswith(b"x-trailer-")]
    assert await stack.records() == before.records + 1
    stack.assert_sound_since(before)


@fuzz(40)
@given(
    size=st.sampled_from(BAD_CHUNK_SIZES),
    extension=chunk_extensions,
    good=st.lists(st.binary(min_size=1, max_size=16), max_size=2),
    method=st.sampled_from(["POST", "GET"]),
)
async def test_bad_chunk_sizes_are_refused(
    stack: Stack, size: bytes, extension: bytes, good: list[bytes], method: str
) -> None:
    prefix = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in good)
    data = chunked_post(prefix + size + extension + b"\r\nabc\r\n0\r\n\r\n", method=method)
    await assert_refused(stack, data, parser=True)


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param([("Content-Length", "3"), CHUNKED], id="length-and-chunked"),
        pytest.param([CHUNKED, ("Content-Length", "3")], id="chunked-and-length"),
        pytest.param([CHUNKED, CHUNKED], id="chunked-twice"),
        pytest.param([("Transfer-Encoding", "chunked, identity")], id="chunked-not-last"),
        pytest.param([("Transfer-Encoding", "identity")], id="identity"),
        pytest.param([("Transfer-Encoding", "xchunked")], id="xchunked"),
        pytest.param([("Transfer-Encoding", "chunked\x0b")], id="chunked-vertical-tab"),
        pytest.param([("Content-Length", "3"), ("Content-Length", "4")], id="two-lengths"),
        pytest.param([("Content-Length", "3, 3")], id="length-list"),
        pytest.param([("Content-Length", "-3")], id="negative-length"),
        pytest.param([("Content-Length", "+3")], id="plus-length"),
        pytest.param([("Content-Length", "0x3")], id="hex-length"),
        pytest.param([("Content-Length", "3 3")], id="spaced-length"),
        pytest.param([("Content-Length", "9" * 30)], id="length-overflow"),
        pytest.param([("Content-Length", str(2**64))], id="length-2-to-64"),
    ],
)
async def test_conflicting_or_malformed_framing_is_refused(stack: Stack, framing: list[tuple[str, str]]) -> None:
    body = b"3\r\nabc\r\n0\r\n\r\n" if any(value.startswith("chunked") for _, value in framing) else b"abc"
    data = request("POST", "/items", [("Idempotency-Key", next(_keys)), *framing], body, length=False)
    await assert_refused(stack, data, parser=True)


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "br, chunked", "x-custom, chunked"])
async def test_transfer_codings_other_than_chunked_are_refused_not_dropped(stack: Stack, coding: str) -> None:
    data = chunked_post(b"3\r\nabc\r\n0\r\n\r\n", ("Transfer-Encoding", coding))
    data = data.replace(b"Transfer-Encoding: chunked\r\n", b"", 1)
    await assert_refused(stack, data, {"unsupported-transfer-coding"})


@pytest.mark.parametrize("valid", [True, False], ids=["gzip", "not-gzip"])
async def test_compressed_bodies_reach_the_tool_as_sent(stack: Stack, valid: bool) -> None:
    """Never decompressed (nor rejected) by the proxy: the tool gets the bytes and the coding."""
    body = gzip.compress(b'{"a": 1}') if valid else b"not gzip at all"
    headers = [("Idempotency-Key", next(_keys)), ("Content-Encoding", "gzip"), ("Content-Type", "application/json")]
    before = await stack.mark()
    reply = await stack.send(request("POST", "/items", headers, body))
    assert reply.status == 201, reply
    (seen,) = stack.since(before)
    assert seen.body == body
    assert (b"Content-Encoding", b"gzip") in seen.headers
    stack.assert_sound_since(before)


@fuzz(25)
@given(
    extra=st.integers(1, 64 * 1024),
    framing=st.sampled_from(["length", "chunked", "length-unsent"]),
    method=st.sampled_from(["POST", "PUT", "GET", "DELETE"]),
)
async def test_bodies_over_max_body_are_refused_before_anything_is_recorded(
    stack: Stack, extra: int, framing: str, method: str
) -> None:
    """Side-effecting (POST, PUT, DELETE) and passthrough (GET) alike: 413, nothing sent."""
    size = ITEMS_MAX_BODY + extra
    event(f"{method} {framing}")
    headers = [("Idempotency-Key", next(_keys))]
    if framing == "chunked":
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (b"z" * 4096,) * (size // 4096 + 1))
        data = request(method, "/items", [*headers, CHUNKED], body + b"0\r\n\r\n", length=False)
    elif framing == "length":
        data = request(method, "/items", headers, b"z" * size)
    else:  # the length alone decides; the body never comes
        data = request(method, "/items", [*headers, ("Content-Length", str(size))], b"", length=False)
    await assert_refused(stack, data, {"body-too-large"})


async def test_a_body_of_exactly_max_body_is_accepted(stack: Stack) -> None:
    before = await stack.mark()
    for data in (
        request("POST", "/items", [("Idempotency-Key", next(_keys))], b"z" * ITEMS_MAX_BODY),
        chunked_post(b"%x\r\n%s\r\n0\r\n\r\n" % (ITEMS_MAX_BODY, b"z" * ITEMS_MAX_BODY)),
        chunked_post(b"%x\r\n%s\r\n0\r\n\r\n" % (ITEMS_MAX_BODY, b"z" * ITEMS_MAX_BODY), method="GET"),
    ):
        reply = await stack.send(data)
        assert reply.status == 201, reply
    assert [len(seen.body) for seen in stack.since(before)] == [ITEMS_MAX_BODY] * 3
    stack.assert_sound_since(before)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param([("Content-Length", "3"), CHUNKED], b"3\r\nabc\r\n0\r\n\r\n", id="length-and-chunked"),
        pytest.param([CHUNKED], b"zz\r\nabc\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param([("Content-Length", "3"), ("Content-Length", "40")], b"abc", id="two-lengths"),
        pytest.param([("Content-Length", "3"), ("X-Bad", "a\x01b")], b"abc", id="bad-header"),
    ],
)
async def test_nothing_after_a_framing_error_is_read_as_a_request(
    stack: Stack, headers: list[tuple[str, str]], body: bytes
) -> None:
    """The classic smuggling set-up: the bytes behind a request whose framing is ambiguous
    are never parsed as a request of their own; the connection is closed instead."""
    first = request("POST", "/items", [("Idempotency-Key", next(_keys)), *headers], body, length=False, close=False)
    smuggled = request("POST", "/items", [("Idempotency-Key", "smuggled")], b"{}")
    before = await stack.mark()
    reply = await stack.send(first + smuggled)
    assert_refusal(reply, parser=True)
    assert reply.closed
    await stack.assert_untouched_since(before)
    await stack.assert_serving()

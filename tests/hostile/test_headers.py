"""Hostile header lines: control characters and CRLF injection, obsolete folding, bytes that are
not UTF-8, huge values, too many headers, bad keys. Each is refused with a 4xx and touches
nothing; header lines the proxy accepts reach the tool exactly as they were sent."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.checks import assert_refused
from tests.hostile.conftest import fuzz
from tests.hostile.stack import Stack
from tests.hostile.strategies import (
    field_values,
    header_names,
    invalid_utf8_values,
    non_token_names,
    obs_folds,
    values_with_a_control,
)
from tests.support.wire import request

pytestmark = pytest.mark.asyncio(loop_scope="module")

_keys = (f"headers-{n}" for n in itertools.count())


def post(headers: Sequence[tuple[str | bytes, str | bytes]]) -> bytes:
    """A side-effecting call with a fresh key (recorded, if it were accepted)."""
    return request("POST", "/items", [("Idempotency-Key", next(_keys)), *headers], b"{}")


@fuzz(60)
@given(name=header_names, value=st.one_of(values_with_a_control(), obs_folds()))
async def test_control_characters_and_folding_in_a_value_are_refused(stack: Stack, name: str, value: bytes) -> None:
    await assert_refused(stack, post([(name, value)]), parser=True)


@fuzz(40)
@given(name=non_token_names())
async def test_header_names_that_are_not_tokens_are_refused(stack: Stack, name: bytes) -> None:
    await assert_refused(stack, post([(name, b"v")]), parser=True)


@fuzz(40)
@given(name=header_names, value=invalid_utf8_values())
async def test_values_that_are_not_utf8_are_refused_rather_than_altered(stack: Stack, name: str, value: bytes) -> None:
    # aiohttp would drop the undecodable bytes when writing the header on to the tool.
    await assert_refused(stack, post([(name, value)]), {"invalid-header"})


@fuzz(40)
@given(
    headers=st.lists(st.tuples(header_names, field_values), min_size=1, max_size=6, unique_by=lambda h: h[0].lower()),
    injected=st.sampled_from([b"%0d%0aX-Injected: 1", b"\\r\\nX-Injected: 1", b"=?utf-8?q?=0D=0AX-Injected:_1?="]),
)
async def test_accepted_header_lines_reach_the_tool_as_sent(
    stack: Stack, headers: list[tuple[str, bytes]], injected: bytes
) -> None:
    """Encoded CRLFs stay text: no header line appears that the caller did not send."""
    headers = [*headers[:-1], (headers[-1][0], headers[-1][1] + injected)]
    before = await stack.mark()
    reply = await stack.send(post(headers))
    assert reply.status == 201, reply
    (seen,) = stack.since(before)
    received = {name.lower(): value for name, value in seen.headers}
    for name, value in headers:
        assert received[name.lower().encode()] == value
    assert b"x-injected" not in received
    stack.assert_sound_since(before)


@fuzz(15)
@given(size=st.integers(9_000, 64_000), where=st.sampled_from(["value", "name", "target"]))
async def test_huge_header_lines_and_targets_are_refused(stack: Stack, size: int, where: str) -> None:
    if where == "value":
        data = post([("X-Huge", b"v" * size)])
    elif where == "name":
        data = post([(b"X-" + b"n" * size, b"v")])
    else:
        data = request("POST", "/items?q=" + "q" * size, [("Idempotency-Key", next(_keys))], b"{}")
    await assert_refused(stack, data, parser=True)


@fuzz(10)
@given(count=st.integers(129, 2_000))
async def test_too_many_headers_are_refused(stack: Stack, count: int) -> None:
    await assert_refused(stack, post([(f"X-H{n}", b"v") for n in range(count)]), parser=True)


async def test_many_headers_under_the_limit_are_accepted(stack: Stack) -> None:
    before = await stack.mark()
    reply = await stack.send(post([(f"X-H{n}", b"v") for n in range(100)]))
    assert reply.status == 201, reply
    assert len(stack.since(before)) == 1


@pytest.mark.parametrize(
    ("headers", "problems"),
    [
        pytest.param([(b"Host", b"a"), (b"Host", b"b")], None, id="duplicate-host"),
        pytest.param([(b"Content-Length", b"2"), (b"Content-Length", b"3")], None, id="duplicate-content-length"),
        pytest.param([(b"Idempotency-Key", b"caf\xc3\xa9")], {"invalid-idempotency-key"}, id="key-non-ascii"),
        pytest.param([(b"Idempotency-Key", b"k\xff")], {"invalid-header"}, id="key-not-utf8"),
        pytest.param([(b"Idempotency-Key", b"k\x01")], None, id="key-control"),
        pytest.param([(b"Idempotency-Key", b"k" * 256)], {"invalid-idempotency-key"}, id="key-too-long"),
        pytest.param([(b"Idempotency-Key", b"")], {"invalid-idempotency-key"}, id="key-empty"),
        pytest.param([(b" Idempotency-Key", b"k")], None, id="leading-space-name"),
        pytest.param([(b"Idempotency-Key ", b"k")], None, id="space-before-colon"),
    ],
)
async def test_refused_key_and_framing_headers(
    stack: Stack, headers: list[tuple[bytes, bytes]], problems: set[str] | None
) -> None:
    has_key = any(name.strip().lower() == b"idempotency-key" for name, _ in headers)
    extra: list[tuple[bytes, bytes]] = [] if has_key else [(b"Idempotency-Key", next(_keys).encode())]
    framed = any(name.lower() == b"content-length" for name, _ in headers)
    data = request("POST", "/items", [*extra, *headers], b"{}", length=not framed)
    await assert_refused(stack, data, problems, parser=problems is None)

"""Request targets: path traversal in and around route prefixes, absolute-form, CONNECT,
``OPTIONS *`` and Host tricks. Nothing may leave its route, and no request may reach a host
no route names (the canary)."""

from __future__ import annotations

import itertools
import re
from urllib.parse import unquote

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.hostile.checks import assert_refusal, assert_refused
from tests.hostile.conftest import fuzz
from tests.hostile.stack import Stack
from tests.hostile.strategies import paths
from tests.support.wire import request

pytestmark = pytest.mark.asyncio(loop_scope="module")

_keys = (f"targets-{n}" for n in itertools.count())
#: The README's rule: encoded '.', '/', '\' and control characters are refused anywhere in a path.
_REFUSED_ESCAPE = re.compile(r"%(2e|2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
#: The routes the path fuzz can reach: prefix, the upstream's base path, strip_prefix.
_ROUTES = (("/tenant/a", "/base-a", True), ("/items", "", False))


def expected(path: str) -> tuple[str, str | None]:
    """What the README promises for a POST to ``path``: ``("refused", its problem)``,
    ``("forwarded", the path the tool sees)`` or ``("no-route", None)``."""
    if path.startswith("//"):
        return "refused", "absolute-form-refused"
    segments = [segment.split(";", 1)[0] for segment in path.split("/")]
    if "\\" in path or _REFUSED_ESCAPE.search(path) or any(segment in (".", "..") for segment in segments):
        return "refused", "invalid-request-target"
    for prefix, base, strip in _ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return "forwarded", base + ((path[len(prefix) :] or "/") if strip else path)
    return "no-route", None


@fuzz(150)
@given(path=paths(), query=st.sampled_from(["", "?q=1", "?q=%2e%2e%2f", "?a=..&b=%00", "?%ff=%fe"]))
async def test_paths_never_leave_their_route(stack: Stack, path: str, query: str) -> None:
    outcome, detail = expected(path)
    event(f"{outcome}: {detail}")
    data = request("POST", path + query, [("Idempotency-Key", next(_keys))], b"{}")
    if outcome == "refused":
        await assert_refused(stack, data, {detail} if detail else None)
        return
    if outcome == "no-route":
        await assert_refused(stack, data, {"no-route"})
        return
    before = await stack.mark()
    reply = await stack.send(data)
    assert reply.status == 201, (path, reply)
    (seen,) = stack.since(before)
    assert seen.raw_path == f"{detail}{query}"
    # Decoded once, as the tool's router would, the path is still under the route's base.
    assert not any(segment in (".", "..") for segment in unquote(seen.raw_path.partition("?")[0]).split("/"))
    assert await stack.records() == before.records + 1
    stack.assert_sound_since(before)


@fuzz(60)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]),
    form=st.sampled_from(
        [
            "http://{canary}/items",
            "HTTP://{canary}/items",
            "https://{canary}/items",
            "http://{canary}",
            "http://user:secret@{canary}/items",
            "http://127.0.0.1:{proxy}@{canary}/items",
            "http://{canary}/items?x=1#frag",
            "ws://{canary}/",
            "//{canary}/items",
            "///{canary}/items",
            "{canary}",
            "{canary}/items",
            "*",
        ]
    ),
    host=st.sampled_from(["{canary}", "idemproxy.test", "127.0.0.1:{proxy}"]),
)
async def test_absolute_form_and_asterisk_targets_reach_no_host(
    stack: Stack, method: str, form: str, host: str
) -> None:
    values = {"canary": stack.canary_authority, "proxy": str(stack.port)}
    target, host = form.format(**values), host.format(**values)
    data = request(method, target, [("Host", host), ("Idempotency-Key", next(_keys))], b"")
    await assert_refused(stack, data, {"absolute-form-refused", "invalid-request-target", "malformed-request"})


@fuzz(20)
@given(
    target=st.sampled_from(["{canary}", "{canary_host}:443", "/items", "http://{canary}/", "*", "[::1]:80"]),
    host=st.sampled_from(["{canary}", "idemproxy.test"]),
)
async def test_connect_reaches_no_host(stack: Stack, target: str, host: str) -> None:
    values = {"canary": stack.canary_authority, "canary_host": stack.canary_authority.split(":")[0]}
    data = request("CONNECT", target.format(**values), [("Host", host.format(**values))], b"")
    await assert_refused(stack, data, {"method-not-allowed"}, parser=True)


@fuzz(30)
@given(
    host=st.sampled_from(
        [
            "{canary}",
            "{canary}:80",
            "evil.example",
            "evil.example@{canary}",
            "127.0.0.1",
            "[::1]",
            "localhost:1",
            "{canary}/items",
            "",
        ]
    ),
    forwarded=st.booleans(),
)
async def test_host_header_never_chooses_the_upstream(stack: Stack, host: str, forwarded: bool) -> None:
    """Routing is by path alone: whatever Host (or X-Forwarded-Host) says, the configured tool gets it."""
    values = {"canary": stack.canary_authority}
    headers = [("Host", host.format(**values)), ("Idempotency-Key", next(_keys))]
    if forwarded:
        headers.append(("X-Forwarded-Host", stack.canary_authority))
    before = await stack.mark()
    reply = await stack.send(request("POST", "/items", headers, b"{}"))
    event(f"status {reply.status}")
    if reply.status != 201:  # aiohttp's parser may refuse a Host value outright
        assert_refusal(reply, parser=True)
        await stack.assert_untouched_since(before)
        return
    (seen,) = stack.since(before)
    received = {name.lower(): value for name, value in seen.headers}
    assert received[b"host"] == stack.recorder.url.removeprefix("http://").encode()
    stack.assert_sound_since(before)

"""Header hygiene, open-proxy refusals, keys, bodies and passthrough, end to end."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory, proxy_config
from tests.support.problems import problem_type
from tests.support.upstream import Upstream
from tests.support.wire import connected

KEY = {"Idempotency-Key": "op-1"}


async def raw_request(client: TestClient[Any, Any], request: bytes) -> tuple[int, bytes]:
    """Send bytes the HTTP client libraries would refuse to send; return status and body."""
    async with connected(client.server.port, host=client.server.host) as connection:
        await connection.send(request)
        reply = await connection.reply()
    return reply.status, reply.body


# -- header hygiene ---------------------------------------------------------------------


async def test_hop_by_hop_headers_are_removed_and_forwarding_headers_set(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy()
    response = await client.post(
        "/echo",
        json={},
        headers={
            **KEY,
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Upgrade": "websocket",
            "X-Forwarded-For": "10.0.0.1",
            "X-End-To-End": "kept",
        },
    )
    assert response.status == 200
    seen = {name.lower(): value for name, value in upstream.effects[0].headers.items()}
    for hop in ("x-private-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in seen, hop
    assert seen["x-end-to-end"] == "kept"
    assert seen["idempotency-key"] == "op-1"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"{client.server.host}:{client.server.port}"
    assert seen["host"] == upstream.url.removeprefix("http://")


async def test_set_cookie_reaches_the_first_caller_but_is_never_replayed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy()
    first = await client.post("/cookie", json={}, headers=KEY)
    replay = await client.post("/cookie", json={}, headers=KEY)
    assert "session=secret-of-first-caller" in first.headers.get("Set-Cookie", "")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Set-Cookie" not in replay.headers
    assert upstream.count() == 1


async def test_query_and_encoded_path_reach_the_upstream_unchanged(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy()
    status, body = await raw_request(
        client, b"GET /echo/a%20b/c?z=1&a=%2F&a=%e2%82%ac HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert orjson.loads(body)["raw_path"] == "/echo/a%20b/c?z=1&a=%2F&a=%e2%82%ac"


# -- never an open proxy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "slug"),
    [
        (b"POST http://evil.example/items HTTP/1.1\r\nHost: evil.example\r\n", 400, "absolute-form-refused"),
        (b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n", 400, "absolute-form-refused"),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n", 405, "method-not-allowed"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n", 400, "absolute-form-refused"),
        (b"POST /items/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n", 400, "invalid-request-target"),
        (b"POST /items/../admin HTTP/1.1\r\nHost: x\r\n", 400, "invalid-request-target"),
        (b"POST /items%2fadmin HTTP/1.1\r\nHost: x\r\n", 400, "invalid-request-target"),
    ],
    ids=["absolute-post", "absolute-get", "connect", "asterisk", "encoded-dots", "dots", "encoded-slash"],
)
async def test_non_origin_targets_are_refused_and_nothing_is_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream, request_bytes: bytes, status: int, slug: str
) -> None:
    client = await make_proxy()
    got_status, body = await raw_request(
        client, request_bytes + b"Idempotency-Key: k\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert got_status == status
    assert f"urn:idemproxy:problem:{slug}".encode() in body
    assert upstream.count() == 0


async def test_unknown_route_is_404(make_proxy: ProxyFactory, upstream: Upstream, store_url: str) -> None:
    config = proxy_config(upstream.url, store_url)
    only_items = config.__class__(
        routes=(config.routes[0].__class__(name="items", prefix="/items", upstream=config.routes[0].upstream),),
    )
    client = await make_proxy(config=only_items)
    response = await client.post("/itemsx", json={}, headers=KEY)
    assert response.status == 404
    assert await problem_type(response) == "no-route"
    assert (await client.post("/items", json={}, headers=KEY)).status == 201
    assert upstream.count() == 1


# -- keys ----------------------------------------------------------------------------------


async def test_missing_key_is_400_when_required(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(key_mode="require")
    response = await client.post("/items", json={})
    assert response.status == 400
    assert await problem_type(response) == "missing-idempotency-key"
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "key_header",
    [b"", b"k" * 256, b"bad\x01key", b"caf\xc3\xa9"],
    ids=["empty", "too-long", "control-char", "non-ascii"],
)
async def test_invalid_keys_are_400_and_nothing_is_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream, key_header: bytes
) -> None:
    client = await make_proxy()
    status, body = await raw_request(
        client,
        b"POST /items HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + key_header + b"\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status == 400
    if b"\x01" not in key_header:  # control characters are refused by aiohttp's HTTP parser itself
        assert b"urn:idemproxy:problem:invalid-idempotency-key" in body
    assert upstream.count() == 0


async def test_a_key_of_255_printable_characters_is_accepted(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    response = await client.post("/items", json={}, headers={"Idempotency-Key": "k" * 255})
    assert response.status == 201


async def test_derive_mode_deduplicates_calls_without_a_key(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(key_mode="derive")
    task = {"X-Agent-Task": "task-7"}
    first = await client.post("/items", json={"title": "a"}, headers=task)
    again = await client.post("/items", json={"title": "a"}, headers=task)
    other_task = await client.post("/items", json={"title": "a"}, headers={"X-Agent-Task": "task-8"})
    assert await first.read() == await again.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other_task.status == 201
    assert "Idempotent-Replayed" not in other_task.headers
    assert upstream.count() == 2


async def test_optional_mode_forwards_keyless_calls_unrecorded(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(key_mode="optional")
    for _ in range(2):
        assert (await client.post("/items", json={})).status == 201
    with_key = [await client.post("/items", json={}, headers=KEY) for _ in range(2)]
    assert with_key[1].headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 3


# -- bodies --------------------------------------------------------------------------------


async def test_oversize_body_with_content_length_is_413_before_anything_is_recorded(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(max_body="1KiB")
    response = await client.post("/items", data=b"x" * 2048, headers=KEY)
    assert response.status == 413
    assert await problem_type(response) == "body-too-large"
    small = await client.post("/items", data=b"x" * 10, headers=KEY)
    assert small.status == 201  # the key was not burnt by the refused request
    assert upstream.count() == 1


async def test_oversize_chunked_body_is_413(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(max_body="1KiB")

    async def chunks() -> Any:
        for _ in range(4):
            yield b"y" * 600

    response = await client.post("/items", data=chunks(), headers=KEY)
    assert response.status == 413
    assert upstream.count() == 0


# -- passthrough -----------------------------------------------------------------------------


async def test_safe_methods_pass_straight_through(make_proxy: ProxyFactory, upstream: Upstream, store_url: str) -> None:
    client = await make_proxy()
    first = await client.get("/items", headers=KEY)
    second = await client.get("/items", headers=KEY)
    head = await client.head("/items")
    assert (first.status, second.status, head.status) == (201, 201, 201)
    assert "Idempotent-Replayed" not in second.headers
    assert (await first.json())["effect"] == 1
    assert (await second.json())["effect"] == 2
    assert upstream.count() == 3


@pytest.mark.parametrize("size", [10, 64 * 1024, 64 * 1024 + 1, 300_000], ids=["small", "limit", "over", "large"])
async def test_passthrough_relays_bodies_whole_or_streamed(make_proxy: ProxyFactory, size: int) -> None:
    """Bodies up to 64 KiB are sent in one piece, larger ones streamed: the caller sees no difference."""
    client = await make_proxy()
    response = await client.get(f"/big/{size}")
    head = await client.head(f"/big/{size}")

    assert response.status == 200
    assert await response.read() == b"x" * size
    assert response.headers["Content-Length"] == str(size)
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert head.status == 200
    assert head.headers["Content-Length"] == str(size)  # the upstream's, not the empty body's
    assert await head.read() == b""


async def test_passthrough_reset_before_the_answer_is_a_clear_502(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    response = await client.get("/reset")
    assert response.status == 502
    assert response.content_type == "application/problem+json"
    assert (await client.get("/items")).status == 201  # still serving


async def test_methods_not_marked_side_effecting_pass_through(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(side_effect_methods=["POST"])
    for _ in range(2):
        assert (await client.put("/items", json={})).status == 201
    assert upstream.count() == 2


async def test_pooled_connection_loss_never_resends_a_put(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    """A PUT whose pooled upstream connection drops is never sent a second time (aiohttp's client would resend it)."""
    client = await make_proxy()
    warm = await client.put("/items", json={}, headers={"Idempotency-Key": "warm"})
    assert warm.status == 201  # the upstream connection is now pooled and reused next
    response = await client.put("/reset", json={}, headers=KEY)
    assert response.status == 502
    assert upstream.count("/reset") == 1

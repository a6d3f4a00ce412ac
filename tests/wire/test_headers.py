"""``idemproxy.wire.headers``: header hygiene between caller, proxy and upstream."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from idemproxy.wire.headers import (
    HOP_BY_HOP,
    client_response_headers,
    storable_response_headers,
    upstream_request_headers,
)


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def names(headers: CIMultiDict[str] | list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> set[str]:
    items = headers.items() if isinstance(headers, CIMultiDict) else headers
    return {name.lower() for name, _ in items}


def forward(
    *pairs: tuple[str, str], client_ip: str | None = "10.0.0.9", host: str | None = "proxy:8080"
) -> CIMultiDict[str]:
    return upstream_request_headers(hdrs(*pairs), client_ip=client_ip, scheme="http", host=host)


# -- request headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param("Connection", "keep-alive", id="connection"),
        pytest.param("Keep-Alive", "timeout=5", id="keep-alive"),
        pytest.param("Proxy-Authenticate", "Basic", id="proxy-authenticate"),
        pytest.param("Proxy-Authorization", "Basic c2VjcmV0", id="proxy-authorization"),
        pytest.param("Proxy-Connection", "keep-alive", id="proxy-connection"),
        pytest.param("TE", "trailers", id="te"),
        pytest.param("Trailer", "X-Checksum", id="trailer"),
        pytest.param("Transfer-Encoding", "chunked", id="transfer-encoding"),
        pytest.param("Upgrade", "websocket", id="upgrade"),
        pytest.param("UPGRADE", "h2c", id="upper-case-name"),
        pytest.param("Host", "proxy:8080", id="host"),
        pytest.param("Content-Length", "12", id="content-length"),
        pytest.param("Expect", "100-continue", id="expect"),
    ],
)
def test_request_header_not_forwarded(header: str, value: str) -> None:
    out = forward((header, value), ("Content-Type", "application/json"))
    assert header not in out
    assert out["Content-Type"] == "application/json"


def test_hop_by_hop_set_is_complete() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } <= HOP_BY_HOP


@pytest.mark.parametrize(
    ("connection_values", "dropped", "kept"),
    [
        pytest.param(["X-Secret"], {"x-secret"}, {"x-other"}, id="one-listed"),
        pytest.param(["keep-alive, X-Secret , x-other"], {"x-secret", "x-other"}, set(), id="list-with-spaces"),
        pytest.param(["x-SECRET"], {"x-secret"}, {"x-other"}, id="case-insensitive"),
        pytest.param(["close", "X-Secret"], {"x-secret"}, {"x-other"}, id="two-connection-headers"),
        pytest.param([",, ,X-Secret,"], {"x-secret"}, {"x-other"}, id="empty-tokens"),
        pytest.param(["close"], set(), {"x-secret", "x-other"}, id="nothing-extra-listed"),
    ],
)
def test_headers_named_in_connection_are_dropped(
    connection_values: list[str], dropped: set[str], kept: set[str]
) -> None:
    pairs = [("Connection", value) for value in connection_values]
    out = forward(*pairs, ("X-Secret", "s"), ("X-Other", "o"), ("Idempotency-Key", "k1"))
    assert names(out).isdisjoint(dropped | {"connection"})
    assert kept <= names(out)
    assert out["Idempotency-Key"] == "k1"


@pytest.mark.parametrize(
    ("incoming", "client_ip", "expected"),
    [
        pytest.param([], "10.0.0.9", ["10.0.0.9"], id="new-chain"),
        pytest.param(["203.0.113.1"], "10.0.0.9", ["203.0.113.1, 10.0.0.9"], id="appended-to-chain"),
        pytest.param(
            ["203.0.113.1, 198.51.100.2"],
            "10.0.0.9",
            ["203.0.113.1, 198.51.100.2, 10.0.0.9"],
            id="long-chain",
        ),
        pytest.param(
            ["203.0.113.1", "198.51.100.2"],
            "10.0.0.9",
            ["203.0.113.1, 198.51.100.2, 10.0.0.9"],
            id="repeated-headers-joined-in-order",
        ),
        pytest.param(["203.0.113.1"], None, ["203.0.113.1"], id="unknown-client-chain-untouched"),
        pytest.param([], None, [], id="unknown-client-no-chain"),
    ],
)
def test_x_forwarded_for(incoming: list[str], client_ip: str | None, expected: list[str]) -> None:
    out = forward(*[("X-Forwarded-For", value) for value in incoming], client_ip=client_ip)
    assert out.getall("X-Forwarded-For", []) == expected


def test_x_forwarded_proto_and_host_are_set_not_trusted() -> None:
    out = upstream_request_headers(
        hdrs(("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "spoofed.example"), ("Host", "proxy:8080")),
        client_ip="10.0.0.9",
        scheme="http",
        host="proxy:8080",
    )
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["proxy:8080"]
    assert "Host" not in out


def test_end_to_end_request_headers_are_forwarded_unchanged() -> None:
    pairs = [
        ("Idempotency-Key", "order-42"),
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer tool-token"),
        ("Accept", "application/json"),
        ("X-Agent-Task", "task-7"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
    ]
    out = forward(*pairs)
    assert out["Idempotency-Key"] == "order-42"
    assert out["Authorization"] == "Bearer tool-token"
    assert out["X-Agent-Task"] == "task-7"
    assert out.getall("X-Custom") == ["a", "b"]
    assert [pair for pair in out.items() if pair[0] in {name for name, _ in pairs}] == pairs
    assert set(out.keys()) == {name for name, _ in pairs} | {
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
    }


def test_request_headers_input_not_modified() -> None:
    original = hdrs(("Connection", "X-Secret"), ("X-Secret", "s"), ("X-Forwarded-For", "1.2.3.4"))
    forward_out = upstream_request_headers(original, client_ip="10.0.0.9", scheme="http", host="h")
    assert forward_out is not original
    assert list(original.items()) == [
        ("Connection", "X-Secret"),
        ("X-Secret", "s"),
        ("X-Forwarded-For", "1.2.3.4"),
    ]


# -- response headers -------------------------------------------------------------------

UPSTREAM_RESPONSE = hdrs(
    ("Content-Type", "application/json"),
    ("Content-Length", "17"),
    ("Connection", "keep-alive, X-Upstream-Debug"),
    ("Keep-Alive", "timeout=5"),
    ("Transfer-Encoding", "chunked"),
    ("X-Upstream-Debug", "node-3"),
    ("Set-Cookie", "session=abc; HttpOnly"),
    ("Set-Cookie2", "legacy=1"),
    ("Location", "/tickets/7"),
    ("ETag", '"v1"'),
    ("Link", "</a>; rel=next"),
    ("Link", "</b>; rel=prev"),
)

ALWAYS_DROPPED = {"connection", "keep-alive", "transfer-encoding", "x-upstream-debug"}


@pytest.mark.parametrize(
    ("keep_length", "has_length"),
    [pytest.param(True, True, id="keep-length"), pytest.param(False, False, id="drop-length")],
)
def test_client_response_headers(keep_length: bool, has_length: bool) -> None:
    out = client_response_headers(UPSTREAM_RESPONSE, keep_length=keep_length)
    assert ("content-length" in names(out)) is has_length
    if has_length:
        assert ("Content-Length", "17") in out
    assert names(out).isdisjoint(ALWAYS_DROPPED)
    # a live response belongs to this caller: its cookies are passed on
    assert ("Set-Cookie", "session=abc; HttpOnly") in out
    assert [value for name, value in out if name == "Link"] == ["</a>; rel=next", "</b>; rel=prev"]
    assert ("Location", "/tickets/7") in out


def test_storable_response_headers() -> None:
    stored = storable_response_headers(UPSTREAM_RESPONSE)
    assert isinstance(stored, tuple)
    assert stored == (
        ("Content-Type", "application/json"),
        ("Location", "/tickets/7"),
        ("ETag", '"v1"'),
        ("Link", "</a>; rel=next"),
        ("Link", "</b>; rel=prev"),
    )


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Set-Cookie", id="set-cookie"),
        pytest.param("set-cookie", id="set-cookie-lower"),
        pytest.param("Set-Cookie2", id="set-cookie2"),
        pytest.param("Content-Length", id="content-length"),
        pytest.param("Transfer-Encoding", id="transfer-encoding"),
        pytest.param("Connection", id="connection"),
        pytest.param("Trailer", id="trailer"),
    ],
)
def test_not_stored_for_replay(header: str) -> None:
    stored = storable_response_headers(hdrs((header, "x"), ("Content-Type", "text/plain")))
    assert header.lower() not in names(stored)
    assert ("Content-Type", "text/plain") in stored

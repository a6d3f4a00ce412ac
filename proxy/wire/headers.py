"""Header hygiene between caller, proxy and upstream (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from multidict import CIMultiDict, CIMultiDictProxy

from idemproxy.protocol.errors import AmbiguousHeader

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Recomputed by whoever writes the body next.
_FRAMING = frozenset({"content-length"})
#: Belong to one response only; never replayed to another caller.
_NOT_STORED = frozenset({"set-cookie", "set-cookie2"})


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return listed


_TO_UPSTREAM = HOP_BY_HOP | {"host", "content-length", "expect"}
_TO_CLIENT_FRAMED = HOP_BY_HOP | _FRAMING
_STORABLE = HOP_BY_HOP | _FRAMING | _NOT_STORED


@cache
def _to_upstream(drop: frozenset[str]) -> frozenset[str]:
    return _TO_UPSTREAM | drop


def _end_to_end(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> list[tuple[str, str]]:
    if "Connection" in headers:
        dropped = dropped | _connection_listed(headers)
    return [(name, value) for name, value in headers.items() if name.lower() not in dropped]


def refuse_ambiguous(headers: CIMultiDictProxy[str], own: tuple[str, ...]) -> None:
    """Refuse a request whose idemproxy headers (``own``: the key, caller and task header
    names) the tool could read otherwise than the proxy: one sent twice (the ledger reads
    the first, the tool may read another), or one named in ``Connection`` (dropped on the
    way as hop-by-hop, after the ledger recorded it)."""
    if "Connection" in headers:
        listed = _connection_listed(headers)
        for name in own:
            if name.lower() in listed:
                raise AmbiguousHeader(
                    f"The Connection header names {name}, which would remove it on the way to the tool while "
                    f"idemproxy records it; {', '.join(own)} are end-to-end headers: send them without naming "
                    "them in Connection."
                )
    for name in own:
        if len(headers.getall(name, ())) > 1:
            raise AmbiguousHeader(
                f"The request carries {name} more than once; idemproxy and the tool could each read a "
                "different one. Send it once."
            )


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    drop: Iterable[str] = (),
) -> CIMultiDict[str]:
    """What the upstream receives: end-to-end headers plus ``X-Forwarded-*``, without
    ``drop`` (lower-case names: the proxy's own credentials when authentication is on)."""
    out = CIMultiDict(_end_to_end(headers, _to_upstream(frozenset(drop)) if drop else _TO_UPSTREAM))
    if client_ip:
        prior = ", ".join(headers.getall("X-Forwarded-For", ()))
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    return out


def with_injected(headers: CIMultiDict[str], injected: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """``headers`` with a route's ``upstream_headers`` set (replacing what the caller sent).

    Applied just before sending, so injected secrets are never stored with the request."""
    if not injected:
        return headers
    out = headers.copy()
    for name, value in injected:
        out[name] = value
    return out


def client_response_headers(headers: CIMultiDictProxy[str], *, keep_length: bool) -> list[tuple[str, str]]:
    """What the caller receives from a live upstream response."""
    return _end_to_end(headers, HOP_BY_HOP if keep_length else _TO_CLIENT_FRAMED)


def storable_response_headers(headers: CIMultiDictProxy[str]) -> tuple[tuple[str, str], ...]:
    """What is kept for replay: end-to-end headers, without framing or cookies."""
    return tuple(_end_to_end(headers, _STORABLE))

"""``idemproxy.config.routes``: only origin-form targets under a configured prefix reach an upstream."""

from __future__ import annotations

import pytest
from yarl import URL

from idemproxy.config.routes import RouteTable, Target, parse_target, upstream_url
from idemproxy.config.settings import RouteConfig
from idemproxy.protocol.errors import (
    AbsoluteFormRefused,
    InvalidTarget,
    MethodNotAllowed,
    NoRoute,
    ProblemError,
)


def make_route(prefix: str, upstream: str = "http://tool:9000", *, strip_prefix: bool = False) -> RouteConfig:
    name = prefix.strip("/").replace("/", "-") or "root"
    return RouteConfig(name=name, prefix=prefix, upstream=URL(upstream), strip_prefix=strip_prefix)


# -- parse_target -----------------------------------------------------------------------

REFUSED = [
    # not origin-form: idemproxy is not a forward proxy
    pytest.param("GET", "http://evil/x", AbsoluteFormRefused, 400, id="absolute-form-http"),
    pytest.param("POST", "https://evil.example:443/x?y=1", AbsoluteFormRefused, 400, id="absolute-form-https"),
    pytest.param("GET", "evil.example:443", AbsoluteFormRefused, 400, id="authority-form-without-connect"),
    pytest.param("CONNECT", "evil.example:443", MethodNotAllowed, 405, id="connect-authority-form"),
    pytest.param("CONNECT", "/tickets", MethodNotAllowed, 405, id="connect-with-a-path"),
    pytest.param("OPTIONS", "*", AbsoluteFormRefused, 400, id="asterisk-form"),
    pytest.param("GET", "//evil/x", AbsoluteFormRefused, 400, id="scheme-relative"),
    pytest.param("GET", "//", AbsoluteFormRefused, 400, id="double-slash-only"),
    pytest.param("GET", "", AbsoluteFormRefused, 400, id="empty"),
    pytest.param("GET", "tickets/1", AbsoluteFormRefused, 400, id="relative-path"),
    # dot segments
    pytest.param("GET", "/tickets/../admin", InvalidTarget, 400, id="dotdot-segment"),
    pytest.param("GET", "/..", InvalidTarget, 400, id="dotdot-only"),
    pytest.param("GET", "/tickets/..", InvalidTarget, 400, id="trailing-dotdot"),
    pytest.param("GET", "/tickets/./1", InvalidTarget, 400, id="dot-segment"),
    pytest.param("GET", "/tickets/.", InvalidTarget, 400, id="trailing-dot"),
    pytest.param("GET", "/tickets/..?x=1", InvalidTarget, 400, id="dotdot-before-query"),
    # encoded dots, slashes and backslashes
    pytest.param("GET", "/%2e%2E/admin", InvalidTarget, 400, id="encoded-dotdot-mixed-case"),
    pytest.param("GET", "/tickets/.%2e/admin", InvalidTarget, 400, id="half-encoded-dotdot"),
    pytest.param("GET", "/tickets%2fadmin", InvalidTarget, 400, id="encoded-slash-lower"),
    pytest.param("GET", "/tickets%2Fadmin", InvalidTarget, 400, id="encoded-slash-upper"),
    pytest.param("GET", "/tickets%5Cadmin", InvalidTarget, 400, id="encoded-backslash-upper"),
    pytest.param("GET", "/tickets%5cadmin", InvalidTarget, 400, id="encoded-backslash-lower"),
    pytest.param("GET", "/tickets\\..\\admin", InvalidTarget, 400, id="raw-backslash"),
    # control characters, raw or escaped
    pytest.param("GET", "/tickets%00", InvalidTarget, 400, id="encoded-nul"),
    pytest.param("GET", "/tickets%0a", InvalidTarget, 400, id="encoded-lf"),
    pytest.param("GET", "/tickets%0D%0AX-Injected:1", InvalidTarget, 400, id="encoded-crlf"),
    pytest.param("GET", "/tickets%1f", InvalidTarget, 400, id="encoded-unit-separator"),
    pytest.param("GET", "/tickets%7F", InvalidTarget, 400, id="encoded-del"),
    pytest.param("GET", "/tickets\x00", InvalidTarget, 400, id="raw-nul"),
    pytest.param("GET", "/tickets\t1", InvalidTarget, 400, id="raw-tab"),
    pytest.param("GET", "/tick\u00e9ts", InvalidTarget, 400, id="raw-non-ascii"),
    pytest.param("GET", "/tickets#fragment", InvalidTarget, 400, id="fragment"),
    pytest.param("GET", "/tickets?q=1#fragment", InvalidTarget, 400, id="fragment-after-query"),
]


@pytest.mark.parametrize(("method", "target", "problem", "status"), REFUSED)
def test_parse_target_refuses(method: str, target: str, problem: type[ProblemError], status: int) -> None:
    with pytest.raises(problem) as info:
        parse_target(method, target)
    assert type(info.value) is problem
    assert info.value.status == status
    assert info.value.detail


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        pytest.param("/", "/", "", id="root"),
        pytest.param("/tickets", "/tickets", "", id="plain"),
        pytest.param("/tickets/", "/tickets/", "", id="trailing-slash"),
        pytest.param("/tickets/7?expand=true&b=2", "/tickets/7", "expand=true&b=2", id="with-query"),
        pytest.param("/tickets?", "/tickets", "", id="empty-query"),
        pytest.param("/search/a%20b", "/search/a%20b", "", id="percent-encoded-space"),
        pytest.param("/files/caf%C3%A9.txt", "/files/caf%C3%A9.txt", "", id="percent-encoded-utf8"),
        pytest.param("/tickets/v1.2/..a/a..", "/tickets/v1.2/..a/a..", "", id="dots-inside-segments"),
        pytest.param("/a?next=/../x&p=%2F%2e%00", "/a", "next=/../x&p=%2F%2e%00", id="escapes-only-in-query"),
        pytest.param("/a;v=1/b", "/a;v=1/b", "", id="matrix-params"),
        pytest.param("/a?x=1?y=2", "/a", "x=1?y=2", id="second-question-mark-in-query"),
    ],
)
def test_parse_target_accepts(target: str, path: str, query: str) -> None:
    parsed = parse_target("POST", target)
    assert parsed == Target(path=path, query=query)
    assert parsed.raw == (f"{path}?{query}" if query else path)


# -- RouteTable.match -------------------------------------------------------------------

TABLE = RouteTable(
    (
        make_route("/"),
        make_route("/tickets"),
        make_route("/tickets/bulk"),
        make_route("/mail/send"),
    )
)
NO_CATCH_ALL = RouteTable((make_route("/tickets"), make_route("/mail/send")))


@pytest.mark.parametrize(
    ("table", "path", "prefix"),
    [
        pytest.param(TABLE, "/tickets", "/tickets", id="exact"),
        pytest.param(TABLE, "/tickets/", "/tickets", id="prefix-with-slash"),
        pytest.param(TABLE, "/tickets/7", "/tickets", id="below-prefix"),
        pytest.param(TABLE, "/tickets/7/comments", "/tickets", id="deep-below-prefix"),
        pytest.param(TABLE, "/tickets/bulk", "/tickets/bulk", id="longest-prefix-exact"),
        pytest.param(TABLE, "/tickets/bulk/9", "/tickets/bulk", id="longest-prefix-below"),
        pytest.param(TABLE, "/tickets/bulky", "/tickets", id="longer-prefix-needs-a-boundary"),
        pytest.param(TABLE, "/ticketsx", "/", id="no-partial-segment-falls-to-catch-all"),
        pytest.param(TABLE, "/mail/send", "/mail/send", id="two-segment-prefix"),
        pytest.param(TABLE, "/mail", "/", id="parent-of-prefix-falls-to-catch-all"),
        pytest.param(TABLE, "/", "/", id="root"),
        pytest.param(TABLE, "/anything/else", "/", id="catch-all"),
        pytest.param(NO_CATCH_ALL, "/tickets/7", "/tickets", id="without-catch-all"),
    ],
)
def test_match(table: RouteTable, path: str, prefix: str) -> None:
    assert table.match(path).prefix == prefix


def test_match_does_not_depend_on_declaration_order() -> None:
    routes = (make_route("/"), make_route("/a"), make_route("/a/b"), make_route("/a/b/c"))
    for table in (RouteTable(routes), RouteTable(routes[::-1])):
        assert table.match("/a/b/c/d").prefix == "/a/b/c"
        assert table.match("/a/b/x").prefix == "/a/b"
        assert table.match("/a/x").prefix == "/a"
        assert table.match("/x").prefix == "/"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/ticketsx", id="partial-segment"),
        pytest.param("/ticket", id="shorter"),
        pytest.param("/mail", id="parent-of-prefix"),
        pytest.param("/mail/sender", id="partial-last-segment"),
        pytest.param("/", id="root"),
        pytest.param("/other", id="unknown"),
    ],
)
def test_no_route(path: str) -> None:
    with pytest.raises(NoRoute) as info:
        NO_CATCH_ALL.match(path)
    assert info.value.status == 404
    assert path in info.value.detail


def test_empty_table_has_no_route() -> None:
    with pytest.raises(NoRoute):
        RouteTable(()).match("/")


# -- upstream_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "upstream", "strip", "target", "expected"),
    [
        pytest.param("/", "http://tool:9000", False, "/tickets/7", "http://tool:9000/tickets/7", id="root-route"),
        pytest.param(
            "/tickets",
            "http://tool:9000",
            False,
            "/tickets/7",
            "http://tool:9000/tickets/7",
            id="prefix-kept",
        ),
        pytest.param(
            "/tickets",
            "http://tool:9000/api/v2",
            False,
            "/tickets/7",
            "http://tool:9000/api/v2/tickets/7",
            id="base-path-joined",
        ),
        pytest.param(
            "/tickets",
            "http://tool:9000/api/v2/",
            False,
            "/tickets/7",
            "http://tool:9000/api/v2/tickets/7",
            id="base-path-trailing-slash-not-doubled",
        ),
        pytest.param(
            "/tickets",
            "http://tool:9000/api",
            True,
            "/tickets/7",
            "http://tool:9000/api/7",
            id="strip-prefix",
        ),
        pytest.param(
            "/tickets",
            "http://tool:9000/api",
            True,
            "/tickets",
            "http://tool:9000/api/",
            id="strip-prefix-exact",
        ),
        pytest.param(
            "/tickets",
            "http://tool:9000",
            True,
            "/tickets/",
            "http://tool:9000/",
            id="strip-prefix-trailing-slash",
        ),
        pytest.param(
            "/v1/tickets",
            "http://tool",
            True,
            "/v1/tickets/7/comments",
            "http://tool/7/comments",
            id="strip-multi-segment-prefix",
        ),
        pytest.param("/", "http://tool/base", True, "/x", "http://tool/base/x", id="strip-root-prefix-is-noop"),
        pytest.param(
            "/tickets",
            "http://tool",
            False,
            "/tickets?b=2&a=1&a=0",
            "http://tool/tickets?b=2&a=1&a=0",
            id="query-order-preserved",
        ),
        pytest.param(
            "/tickets",
            "http://tool",
            False,
            "/tickets?q=a+b%20c&r=%2F%26",
            "http://tool/tickets?q=a+b%20c&r=%2F%26",
            id="query-escapes-preserved",
        ),
        pytest.param(
            "/tickets",
            "http://tool",
            False,
            "/tickets?flag&empty=",
            "http://tool/tickets?flag&empty=",
            id="query-without-values-preserved",
        ),
        pytest.param(
            "/search",
            "http://tool",
            False,
            "/search/a%20b/caf%C3%A9",
            "http://tool/search/a%20b/caf%C3%A9",
            id="encoded-path-not-re-encoded",
        ),
        pytest.param(
            "/search",
            "http://tool/my%20api",
            True,
            "/search/a%20b",
            "http://tool/my%20api/a%20b",
            id="encoded-base-path-kept",
        ),
        pytest.param(
            "/tickets",
            "https://tool:443/api",
            False,
            "/tickets",
            "https://tool/api/tickets",
            id="https-default-port",
        ),
        pytest.param(
            "/tickets",
            "http://[::1]:9000",
            False,
            "/tickets",
            "http://[::1]:9000/tickets",
            id="ipv6-upstream",
        ),
    ],
)
def test_upstream_url(prefix: str, upstream: str, strip: bool, target: str, expected: str) -> None:
    route = make_route(prefix, upstream, strip_prefix=strip)
    url = upstream_url(route, parse_target("POST", target))
    assert str(url) == expected
    assert url.raw_path == URL(expected, encoded=True).raw_path
    assert url.raw_query_string == URL(expected, encoded=True).raw_query_string


def test_upstream_url_stays_on_the_upstream_origin() -> None:
    """Whatever the target, the URL's origin is the route's upstream."""
    route = make_route("/", "http://tool:9000/base")
    for target in ("/x", "/@evil.example/x", "/x?u=http://evil/", "/:80/x"):
        url = upstream_url(route, parse_target("POST", target))
        assert url.origin() == URL("http://tool:9000"), target
        assert url.raw_path.startswith("/base/"), target

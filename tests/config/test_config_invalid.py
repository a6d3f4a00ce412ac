"""``idemproxy.config.settings``: invalid configuration documents.

Every key with a wrong type, value or unit (the ``INVALID`` table), non-finite
durations, every problem of a document named at once, and files that cannot be used or
read: each a ``ConfigError`` that names the key and says what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from idemproxy.config.settings import (
    ConfigError,
    load_config,
)
from tests.support.config_docs import UPSTREAM, doc, problems_of, route, write

# -- invalid documents ------------------------------------------------------------------

INVALID = [
    # structure and typos
    pytest.param([1, 2], "(top level)", "expected a mapping, got list", id="top-level-list"),
    pytest.param("just text", "(top level)", "expected a mapping, got str", id="top-level-scalar"),
    pytest.param({"rout": [], **doc()}, "rout", "unknown key; did you mean 'routes'?", id="typo-top-level-key"),
    pytest.param(doc(key_mod="derive"), "routes[0].key_mod", "unknown key", id="typo-route-key"),
    pytest.param({"store": {"urll": "redis://r"}, **doc()}, "store.urll", "unknown key", id="typo-store-key"),
    pytest.param(
        {"headers": {"idempotency": "X-K"}, **doc()},
        "headers.idempotency",
        "unknown key",
        id="typo-headers-key",
    ),
    pytest.param(
        {"route_defaults": {"prefix": "/x"}, **doc()},
        "route_defaults.prefix",
        "unknown key",
        id="prefix-in-defaults",
    ),
    pytest.param(
        {"route_defaults": {"retension": "1h"}, **doc()},
        "route_defaults.retension",
        "unknown key",
        id="typo-defaults",
    ),
    pytest.param({"routes": {"prefix": "/"}}, "routes", "expected a list of routes", id="routes-not-a-list"),
    pytest.param({"routes": ["/tickets"]}, "routes[0]", "expected a mapping", id="route-not-a-mapping"),
    pytest.param({"routes": [{"upstream": UPSTREAM}]}, "routes[0].prefix", "is required", id="missing-prefix"),
    pytest.param({"routes": [{"prefix": "/x"}]}, "routes[0].upstream", "is required", id="missing-upstream"),
    pytest.param({"store": 5, **doc()}, "store", "expected a mapping", id="store-not-a-mapping"),
    pytest.param({"headers": ["X-K"], **doc()}, "headers", "expected a mapping", id="headers-not-a-mapping"),
    pytest.param({"routes": []}, "routes", "no routes configured", id="empty-routes"),
    pytest.param({}, "routes", "no routes configured", id="no-routes"),
    # enums and scalars
    pytest.param(
        doc(key_mode="sometimes"),
        "routes[0].key_mode",
        "expected one of require, derive, optional",
        id="key-mode",
    ),
    pytest.param(
        doc(on_store_error="fail_maybe"),
        "routes[0].on_store_error",
        "expected one of fail_closed, fail_open",
        id="on-store-error",
    ),
    pytest.param(doc(strip_prefix="yes"), "routes[0].strip_prefix", "expected true or false", id="strip-prefix-str"),
    pytest.param(doc(retention="1w"), "routes[0].retention", "expected a duration", id="retention-unit"),
    pytest.param(doc(retention=0), "routes[0].retention", "greater than zero", id="retention-zero"),
    pytest.param(doc(connect_timeout="0s"), "routes[0].connect_timeout", "greater than zero", id="connect-zero"),
    pytest.param(doc(read_timeout="-1s"), "routes[0].read_timeout", "expected a duration", id="read-negative"),
    pytest.param(doc(wait="forever"), "routes[0].wait", "expected a duration", id="wait-word"),
    pytest.param(doc(max_body="1.5MiB"), "routes[0].max_body", "expected a size", id="max-body-fraction"),
    pytest.param(doc(max_stored_response="1TB"), "routes[0].max_stored_response", "expected a size", id="stored-unit"),
    pytest.param(doc(max_attempts=0), "routes[0].max_attempts", "at least 1", id="max-attempts-zero"),
    pytest.param(doc(max_attempts=True), "routes[0].max_attempts", "at least 1", id="max-attempts-bool"),
    pytest.param(doc(max_attempts="3"), "routes[0].max_attempts", "at least 1", id="max-attempts-str"),
    pytest.param(doc(name="has space"), "routes[0].name", "letters, digits", id="name-space"),
    pytest.param(doc(name="x" * 65), "routes[0].name", "1-64", id="name-too-long"),
    # methods
    pytest.param(doc(side_effect_methods=[]), "routes[0].side_effect_methods", "non-empty list", id="methods-empty"),
    pytest.param(doc(side_effect_methods="POST"), "routes[0].side_effect_methods", "list", id="methods-not-list"),
    pytest.param(
        doc(side_effect_methods=["PO ST"]),
        "routes[0].side_effect_methods",
        "HTTP method names",
        id="methods-token",
    ),
    pytest.param(
        doc(side_effect_methods=["POST", "CONNECT"]),
        "routes[0].side_effect_methods",
        "CONNECT is never proxied",
        id="methods-connect",
    ),
    pytest.param(
        doc(side_effect_methods=["GET", "POST"]),
        "routes[0].side_effect_methods",
        "['GET'] are safe methods",
        id="methods-safe-get",
    ),
    pytest.param(
        doc(side_effect_methods=["post", "head", "options"]),
        "routes[0].side_effect_methods",
        "['HEAD', 'OPTIONS'] are safe methods",
        id="methods-safe-lowercase",
    ),
    # statuses
    pytest.param(
        doc(not_applied_statuses="429"),
        "routes[0].not_applied_statuses",
        "list of HTTP status codes",
        id="statuses-not-list",
    ),
    pytest.param(
        doc(ambiguous_statuses=[500, 600]),
        "routes[0].ambiguous_statuses",
        "from 100 to 599",
        id="statuses-range",
    ),
    pytest.param(doc(ambiguous_statuses=[True]), "routes[0].ambiguous_statuses", "from 100 to 599", id="statuses-bool"),
    pytest.param(
        doc(not_applied_statuses=[429, 503], ambiguous_statuses=[503, 500]),
        "routes[0].ambiguous_statuses",
        "[503] also listed in not_applied_statuses",
        id="statuses-overlap",
    ),
    pytest.param(
        doc(not_applied_statuses=[302]),
        "routes[0].not_applied_statuses",
        "only 4xx and 5xx",
        id="not-applied-3xx",
    ),
    pytest.param(
        doc(ambiguous_statuses=[302]),
        "routes[0].ambiguous_statuses",
        "only 4xx and 5xx",
        id="ambiguous-3xx",
    ),
    # headers
    pytest.param(
        doc(fingerprint_headers="X-Tenant"),
        "routes[0].fingerprint_headers",
        "list of header names",
        id="fp-not-list",
    ),
    pytest.param(
        doc(fingerprint_headers=["X Tenant"]),
        "routes[0].fingerprint_headers",
        "HTTP header name",
        id="fp-bad-name",
    ),
    pytest.param({"headers": {"key": "Idem Key"}, **doc()}, "headers.key", "HTTP header name", id="key-header-space"),
    pytest.param({"headers": {"caller": ""}, **doc()}, "headers.caller", "HTTP header name", id="caller-header-empty"),
    # prefixes
    pytest.param(doc(prefix="tickets"), "routes[0].prefix", "path prefix", id="prefix-no-leading-slash"),
    pytest.param(doc(prefix="/a/../b"), "routes[0].prefix", "path prefix", id="prefix-dotdot"),
    pytest.param(doc(prefix="/.."), "routes[0].prefix", "path prefix", id="prefix-only-dotdot"),
    pytest.param(doc(prefix="/a/./b"), "routes[0].prefix", "path prefix", id="prefix-dot"),
    pytest.param(doc(prefix="/a//b"), "routes[0].prefix", "path prefix", id="prefix-double-slash"),
    pytest.param(doc(prefix="//a"), "routes[0].prefix", "path prefix", id="prefix-leading-double-slash"),
    pytest.param(doc(prefix="/a%20b"), "routes[0].prefix", "path prefix", id="prefix-percent-escape"),
    pytest.param(doc(prefix="/a%2e%2e"), "routes[0].prefix", "path prefix", id="prefix-encoded-dots"),
    pytest.param(doc(prefix="/a?x=1"), "routes[0].prefix", "path prefix", id="prefix-query"),
    pytest.param(doc(prefix="/a#f"), "routes[0].prefix", "path prefix", id="prefix-fragment"),
    pytest.param(doc(prefix="/a\\b"), "routes[0].prefix", "path prefix", id="prefix-backslash"),
    pytest.param(doc(prefix=5), "routes[0].prefix", "path prefix", id="prefix-int"),
    pytest.param(
        {"routes": [route(name="a"), route(name="b")]},
        "routes[1].prefix",
        "'/tickets' is already used by route 'a'",
        id="duplicate-prefix",
    ),
    pytest.param(
        {"routes": [route(prefix="/tickets"), route(prefix="/tickets/", name="b")]},
        "routes[1].prefix",
        "already used",
        id="duplicate-prefix-after-trimming",
    ),
    pytest.param(
        {"routes": [route(name="x"), route(prefix="/other", name="x")]},
        "routes[1].name",
        "'x' is already used",
        id="duplicate-name",
    ),
    pytest.param(
        {"routes": [route(prefix="/a/b"), route(prefix="/a-b")]},
        "routes[1].name",
        "'a-b' is already used",
        id="duplicate-derived-name",
    ),
    # upstream URLs
    pytest.param(doc(upstream="ftp://tool/x"), "routes[0].upstream", "http:// or https://", id="upstream-ftp"),
    pytest.param(doc(upstream="tool:9000"), "routes[0].upstream", "http:// or https://", id="upstream-no-scheme"),
    pytest.param(doc(upstream="http://"), "routes[0].upstream", "with a host", id="upstream-no-host"),
    pytest.param(doc(upstream="http://tool?x=1"), "routes[0].upstream", "must not carry a query", id="upstream-query"),
    pytest.param(doc(upstream="http://tool/#top"), "routes[0].upstream", "fragment", id="upstream-fragment"),
    pytest.param(
        doc(upstream="http://user:secret@tool"),
        "routes[0].upstream",
        "credentials",
        id="upstream-user-password",
    ),
    pytest.param(doc(upstream="http://user@tool"), "routes[0].upstream", "credentials", id="upstream-user"),
    pytest.param(doc(upstream="http://:secret@tool"), "routes[0].upstream", "credentials", id="upstream-password"),
    pytest.param(doc(upstream=9000), "routes[0].upstream", "http:// or https://", id="upstream-int"),
    # lease
    pytest.param(
        doc(lease="30s"),
        "routes[0].lease",
        "must exceed connect_timeout + read_timeout (35s), got 30s",
        id="lease-below-timeouts",
    ),
    pytest.param(
        doc(lease="35s"),
        "routes[0].lease",
        "must exceed connect_timeout + read_timeout (35s), got 35s",
        id="lease-equal-to-timeouts",
    ),
    pytest.param(
        doc(lease="10s", connect_timeout="2s", read_timeout="8s"),
        "routes[0].lease",
        "(10s), got 10s",
        id="lease-equal-custom-timeouts",
    ),
    # listeners, log level, store
    pytest.param({"listen": "8080", **doc()}, "listen", "expected 'HOST:PORT'", id="listen-no-host"),
    pytest.param({"listen": 8080, **doc()}, "listen", "expected 'HOST:PORT'", id="listen-int"),
    pytest.param({"listen": "0.0.0.0:0", **doc()}, "listen", "port from 1 to 65535", id="listen-port-zero"),
    pytest.param({"listen": "0.0.0.0:65536", **doc()}, "listen", "port from 1 to 65535", id="listen-port-high"),
    pytest.param({"admin_listen": "host:http", **doc()}, "admin_listen", "port from 1", id="admin-port-name"),
    pytest.param(
        {"listen": "127.0.0.1:9000", "admin_listen": "127.0.0.1:9000", **doc()},
        "admin_listen",
        "must differ from listen (127.0.0.1:9000)",
        id="admin-equals-listen",
    ),
    pytest.param({"log_level": "verbose", **doc()}, "log_level", "debug, info, warning, error", id="log-level"),
    pytest.param({"shutdown_grace": "soon", **doc()}, "shutdown_grace", "duration", id="shutdown-grace"),
    pytest.param({"client_header_timeout": 0, **doc()}, "client_header_timeout", "greater than zero", id="header-0"),
    pytest.param({"client_body_timeout": "slow", **doc()}, "client_body_timeout", "duration", id="body-timeout"),
    pytest.param({"store": "postgres://db", **doc()}, "store.url", "redis://HOST", id="store-scheme"),
    pytest.param({"store": "redis://", **doc()}, "store.url", "redis://HOST", id="store-redis-no-host"),
    pytest.param({"store": "sqlite:///", **doc()}, "store.url", "sqlite:///PATH", id="store-sqlite-no-path"),
    pytest.param({"store": "sqlite://ledger.db", **doc()}, "store.url", "sqlite:///PATH", id="store-sqlite-2-slashes"),
    pytest.param({"store": "unix://", **doc()}, "store.url", "socket's absolute path", id="store-unix-no-path"),
    pytest.param({"store": "unix://redis.sock", **doc()}, "store.url", "not a host ('redis.sock", id="store-unix-host"),
    pytest.param({"store": "unix:///r.sock?db=one", **doc()}, "store.url", "db must be a database", id="store-unix-db"),
    pytest.param(
        {"store": {"key_prefix": "has space"}, **doc()},
        "store.key_prefix",
        "1-32 letters",
        id="key-prefix-space",
    ),
    pytest.param({"store": {"key_prefix": "x" * 33}, **doc()}, "store.key_prefix", "1-32", id="key-prefix-long"),
    pytest.param(
        {"store": {"socket_timeout": 0}, **doc()},
        "store.socket_timeout",
        "greater than zero",
        id="socket-timeout",
    ),
    pytest.param(
        {"store": {"max_connections": 0}, **doc()},
        "store.max_connections",
        "at least 1",
        id="max-connections-zero",
    ),
    # a bad value in route_defaults is a problem of route_defaults
    pytest.param(
        {"route_defaults": {"key_mode": "sometimes"}, **doc()},
        "route_defaults.key_mode",
        "expected one of require, derive, optional",
        id="bad-value-in-route-defaults",
    ),
]


@pytest.mark.parametrize(("raw", "key", "expected"), INVALID)
def test_invalid_document(raw: Any, key: str, expected: str) -> None:
    problems = problems_of(raw)
    matching = [p for p in problems if p.startswith(f"{key}: ")]
    assert matching, f"no problem names {key!r}: {problems}"
    assert any(expected in p for p in matching), f"{expected!r} not in {matching}"


@pytest.mark.parametrize(
    ("policy_line", "key"),
    [
        pytest.param("lease: .nan", "routes[0].lease", id="lease-nan"),
        pytest.param("lease: .inf", "routes[0].lease", id="lease-inf"),
        pytest.param("retention: .inf", "routes[0].retention", id="retention-inf"),
        pytest.param("wait: .nan", "routes[0].wait", id="wait-nan"),
    ],
)
def test_non_finite_yaml_durations_are_rejected(tmp_path: Path, policy_line: str, key: str) -> None:
    """YAML spells NaN and infinity as ``.nan``/``.inf``; neither is a usable duration
    (the ledger computes ``round(lease_s * 1000)``)."""
    path = write(tmp_path, f"routes:\n  - prefix: /tickets\n    upstream: {UPSTREAM}\n    {policy_line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert any(p.startswith(f"{key}: ") for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        listen: nowhere
        routes:
          - prefix: /tickets
            upstream: {UPSTREAM}
            key_mode: sometimes
          - prefix: /mail
            upstream: {UPSTREAM}
            max_body: lots
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert [p.split(": ", 1)[0] for p in problems] == ["listen", "routes[0].key_mode", "routes[1].max_body"]
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_every_problem_of_one_route_is_reported() -> None:
    problems = problems_of(doc(key_mode="x", retention="x", upstream="ftp://x", typo=1))
    assert sorted(p.split(": ", 1)[0] for p in problems) == [
        "routes[0].key_mode",
        "routes[0].retention",
        "routes[0].typo",
        "routes[0].upstream",
    ]


def test_a_bad_route_does_not_hide_problems_of_the_next() -> None:
    problems = problems_of({"routes": [route(prefix="nope"), route(prefix="/b", lease="1s")]})
    assert [p.split(": ", 1)[0] for p in problems] == ["routes[0].prefix", "routes[1].lease"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("routes: [unclosed\n", "not valid YAML", id="unclosed-flow"),
        pytest.param("a: b: c\n", "not valid YAML", id="nested-colon"),
        pytest.param("routes:\n\t- prefix: /\n", "not valid YAML", id="tab-indent"),
        pytest.param("", "routes: no routes configured", id="empty-file"),
        pytest.param("# nothing here\n", "routes: no routes configured", id="only-comment"),
        pytest.param("- 1\n- 2\n", "(top level): expected a mapping", id="yaml-list"),
    ],
)
def test_unusable_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (problem,) = info.value.problems
    assert problem.startswith(expected)
    assert info.value.source == str(path)


@pytest.mark.parametrize(
    ("make_path", "expected"),
    [
        pytest.param(lambda tmp: tmp / "missing.yaml", "No such file or directory", id="missing"),
        pytest.param(lambda tmp: tmp, "Is a directory", id="directory"),
    ],
)
def test_unreadable_file(tmp_path: Path, make_path: Callable[[Path], Path], expected: str) -> None:
    path = make_path(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == [f"cannot read the file: {expected}"]
    assert info.value.source == str(path)

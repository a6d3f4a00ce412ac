"""``idemproxy.config``: typed configuration from YAML, environment and flags, and ``check-config``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from idemproxy.config import (
    DEFAULT_SIDE_EFFECT_METHODS,
    DEFAULT_STORE_URL,
    ConfigError,
    FailureMode,
    HeaderNames,
    HostPort,
    KeyMode,
    Overrides,
    ProxyConfig,
    RouteConfig,
    StoreConfig,
    load_config,
    parse_config,
)

UPSTREAM = "http://tool:9000"


def route(**policy: Any) -> dict[str, Any]:
    return {"prefix": "/tickets", "upstream": UPSTREAM, **policy}


def doc(**policy: Any) -> dict[str, Any]:
    """A document with one route carrying ``policy``."""
    return {"routes": [route(**policy)]}


def problems_of(raw: Any, overrides: Overrides | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, overrides)
    assert info.value.problems, "a ConfigError must name at least one problem"
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "idemproxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def only_route(config: ProxyConfig) -> RouteConfig:
    assert len(config.routes) == 1
    return config.routes[0]


# -- a full file ------------------------------------------------------------------------

FULL_FILE = """\
    listen: "0.0.0.0:9090"
    admin_listen: "[::1]:9091"
    log_level: DEBUG
    shutdown_grace: 15s
    client_header_timeout: 20s
    client_body_timeout: 45s
    store:
      url: redis://redis.internal:6379/2
      key_prefix: idem-test
      socket_timeout: 750ms
      max_connections: 16
    headers:
      key: X-Idem-Key
      caller: X-Caller
      task: X-Task
    route_defaults:
      max_attempts: 3
      retention: 12h
    routes:
      - name: tickets
        prefix: /tickets/
        upstream: https://tickets.internal:8443/api/v2
        strip_prefix: true
        side_effect_methods: [post, Put, DELETE]
        key_mode: derive
        retention: 24h
        wait: 500ms
        connect_timeout: 2s
        read_timeout: 20s
        lease: 1m
        max_body: 1MiB
        max_stored_response: 64KiB
        max_attempts: 7
        not_applied_statuses: [429, 503, 425]
        ambiguous_statuses: [500, 504]
        on_store_error: fail_open
        fingerprint_headers: [X-Tenant, Content-Type, x-tenant]
      - prefix: /mail/send
        upstream: http://mail:8025
"""


def test_full_file_every_value_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE), environ={})

    assert config.listen == HostPort("0.0.0.0", 9090)
    assert config.admin_listen == HostPort("::1", 9091)
    assert str(config.admin_listen) == "[::1]:9091"
    assert config.log_level == "debug"
    assert config.shutdown_grace_s == 15.0
    assert (config.client_header_timeout_s, config.client_body_timeout_s) == (20.0, 45.0)
    assert config.store == StoreConfig(
        url="redis://redis.internal:6379/2", key_prefix="idem-test", socket_timeout_s=0.75, max_connections=16
    )
    assert config.headers == HeaderNames(key="X-Idem-Key", caller="X-Caller", task="X-Task")

    tickets, mail = config.routes
    assert tickets == RouteConfig(
        name="tickets",
        prefix="/tickets",  # trailing slash trimmed
        upstream=URL("https://tickets.internal:8443/api/v2"),
        strip_prefix=True,
        side_effect_methods=frozenset({"POST", "PUT", "DELETE"}),
        key_mode=KeyMode.DERIVE,
        retention_s=86400.0,
        wait_s=0.5,
        connect_timeout_s=2.0,
        read_timeout_s=20.0,
        lease_s=60.0,
        max_body=1024 * 1024,
        max_stored_response=64 * 1024,
        max_attempts=7,
        not_applied_statuses=frozenset({425, 429, 503}),
        ambiguous_statuses=frozenset({500, 504}),
        on_store_error=FailureMode.FAIL_OPEN,
        fingerprint_headers=("content-type", "x-tenant"),  # lowercased, deduplicated, sorted
    )
    assert isinstance(tickets.key_mode, KeyMode)
    assert isinstance(tickets.on_store_error, FailureMode)
    assert tickets.upstream.port == 8443
    assert tickets.is_side_effecting("POST")
    assert not tickets.is_side_effecting("PATCH")

    # the second route: name derived from the prefix, route_defaults applied, the rest defaulted
    assert mail.name == "mail-send"
    assert mail.prefix == "/mail/send"
    assert mail.upstream == URL("http://mail:8025")
    assert mail.max_attempts == 3
    assert mail.retention_s == 43200.0
    assert mail.key_mode is KeyMode.REQUIRE
    assert mail.side_effect_methods == DEFAULT_SIDE_EFFECT_METHODS


def test_defaults() -> None:
    config = parse_config({"routes": [{"prefix": "/tickets", "upstream": UPSTREAM}]})
    assert config.listen == HostPort("127.0.0.1", 8080)
    assert config.admin_listen == HostPort("127.0.0.1", 8081)
    assert config.store == StoreConfig(
        url=DEFAULT_STORE_URL, key_prefix="idem", socket_timeout_s=2.0, max_connections=64
    )
    assert config.store.url == "sqlite:///.idemproxy/ledger.db"
    assert config.headers == HeaderNames("Idempotency-Key", "X-Idem-Caller", "X-Agent-Task")
    assert config.log_level == "info"
    assert config.shutdown_grace_s == 10.0
    assert (config.client_header_timeout_s, config.client_body_timeout_s) == (60.0, 60.0)
    tickets = only_route(config)
    assert tickets == RouteConfig(name="tickets", prefix="/tickets", upstream=URL(UPSTREAM))
    assert tickets.side_effect_methods == frozenset({"POST", "PUT", "PATCH", "DELETE"})
    assert tickets.key_mode is KeyMode.REQUIRE
    assert tickets.strip_prefix is False
    assert (tickets.retention_s, tickets.wait_s) == (86400.0, 10.0)
    assert (tickets.connect_timeout_s, tickets.read_timeout_s, tickets.lease_s) == (5.0, 30.0, 60.0)
    assert (tickets.max_body, tickets.max_stored_response, tickets.max_attempts) == (1048576, 1048576, 5)
    assert tickets.not_applied_statuses == frozenset({429, 503})
    assert tickets.ambiguous_statuses == frozenset({500, 502, 504})
    assert tickets.on_store_error is FailureMode.FAIL_CLOSED
    assert tickets.fingerprint_headers == ()


@pytest.mark.parametrize(
    ("prefix", "name"),
    [
        pytest.param("/", "root", id="root"),
        pytest.param("/tickets", "tickets", id="one-segment"),
        pytest.param("/tickets/", "tickets", id="trailing-slash"),
        pytest.param("/v1/tickets", "v1-tickets", id="two-segments"),
    ],
)
def test_route_name_derived_from_prefix(prefix: str, name: str) -> None:
    assert only_route(parse_config({"routes": [{"prefix": prefix, "upstream": UPSTREAM}]})).name == name


@pytest.mark.parametrize(
    ("store", "url"),
    [
        pytest.param("redis://r:6379/0", "redis://r:6379/0", id="string-shorthand-redis"),
        pytest.param("rediss://r:6380", "rediss://r:6380", id="string-shorthand-rediss"),
        pytest.param("sqlite:////var/lib/idem.db", "sqlite:////var/lib/idem.db", id="sqlite-absolute"),
        pytest.param({"url": "sqlite:///rel/idem.db"}, "sqlite:///rel/idem.db", id="mapping"),
        pytest.param("unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock", id="unix-socket"),
        pytest.param("unix://u:pw@/run/redis.sock?db=2", "unix://u:pw@/run/redis.sock?db=2", id="unix-auth-db"),
    ],
)
def test_store_url_forms(store: Any, url: str) -> None:
    assert parse_config({"store": store, **doc()}).store.url == url


# -- route_defaults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defaults", "policy", "attribute", "own", "inherited"),
    [
        pytest.param({"key_mode": "derive"}, {}, "key_mode", KeyMode.DERIVE, KeyMode.DERIVE, id="key-mode-applied"),
        pytest.param(
            {"key_mode": "derive"},
            {"key_mode": "optional"},
            "key_mode",
            KeyMode.OPTIONAL,
            KeyMode.DERIVE,
            id="key-mode-overridden",
        ),
        pytest.param({"retention": "1h"}, {}, "retention_s", 3600.0, 3600.0, id="retention-applied"),
        pytest.param(
            {"retention": "1h"},
            {"retention": "2d"},
            "retention_s",
            172800.0,
            3600.0,
            id="retention-overridden",
        ),
        pytest.param({"max_body": "2MiB"}, {}, "max_body", 2 * 1024**2, 2 * 1024**2, id="max-body-applied"),
        pytest.param({"max_body": "2MiB"}, {"max_body": 10}, "max_body", 10, 2 * 1024**2, id="max-body-overridden"),
        pytest.param({"strip_prefix": True}, {}, "strip_prefix", True, True, id="strip-prefix-applied"),
        pytest.param(
            {"strip_prefix": True},
            {"strip_prefix": False},
            "strip_prefix",
            False,
            True,
            id="strip-prefix-overridden",
        ),
        pytest.param(
            {"side_effect_methods": ["POST"]},
            {"side_effect_methods": ["put"]},
            "side_effect_methods",
            frozenset({"PUT"}),
            frozenset({"POST"}),
            id="methods-overridden",
        ),
        pytest.param(
            {"on_store_error": "fail_open"},
            {},
            "on_store_error",
            FailureMode.FAIL_OPEN,
            FailureMode.FAIL_OPEN,
            id="failure-mode-applied",
        ),
        pytest.param(
            {"fingerprint_headers": ["X-A"]},
            {"fingerprint_headers": []},
            "fingerprint_headers",
            (),
            ("x-a",),
            id="fingerprint-headers-overridden-empty",
        ),
        pytest.param(
            {"not_applied_statuses": [429]},
            {"not_applied_statuses": [503]},
            "not_applied_statuses",
            frozenset({503}),
            frozenset({429}),
            id="statuses-overridden",
        ),
        pytest.param({"lease": "2m"}, {"lease": "90s"}, "lease_s", 90.0, 120.0, id="lease-overridden"),
    ],
)
def test_route_defaults(
    defaults: dict[str, Any], policy: dict[str, Any], attribute: str, own: Any, inherited: Any
) -> None:
    raw = {
        "route_defaults": defaults,
        "routes": [route(**policy), {"prefix": "/other", "upstream": UPSTREAM}],
    }
    tickets, other = parse_config(raw).routes
    assert getattr(tickets, attribute) == own
    # the route without its own value gets the default, never the other route's override
    assert getattr(other, attribute) == inherited
    assert inherited != getattr(RouteConfig("x", "/", URL(UPSTREAM)), attribute), "not a default"


def test_route_defaults_lease_check_uses_merged_values() -> None:
    """A default read_timeout that the route's own lease does not exceed is caught per route."""
    raw = {"route_defaults": {"read_timeout": "90s"}, "routes": [route(lease="60s")]}
    assert any(p.startswith("routes[0].lease: ") and "95s" in p for p in problems_of(raw))
    ok = parse_config({"route_defaults": {"read_timeout": "90s"}, "routes": [route(lease="2m")]})
    assert only_route(ok).read_timeout_s == 90.0


# -- precedence: flags > environment > file -----------------------------------------------


def _listen(config: ProxyConfig) -> str:
    return str(config.listen)


def _admin(config: ProxyConfig) -> str:
    return str(config.admin_listen)


def _metrics(config: ProxyConfig) -> str:
    return str(config.metrics_listen)


def _store(config: ProxyConfig) -> str:
    return config.store.url


def _level(config: ProxyConfig) -> str:
    return config.log_level


_FIELDS = {
    # Overrides field -> (file key, environment variable, getter, (file value, env value, flag value))
    "listen": ("listen", "IDEMPROXY_LISTEN", _listen, ("10.0.0.1:1001", "10.0.0.2:1002", "10.0.0.3:1003")),
    "admin_listen": (
        "admin_listen",
        "IDEMPROXY_ADMIN_LISTEN",
        _admin,
        # Loopback: an exposed admin listener needs auth (tests/test_admin_exposure.py).
        ("127.0.0.1:2001", "127.0.0.2:2002", "127.0.0.3:2003"),
    ),
    "metrics_listen": (
        "metrics_listen",
        "IDEMPROXY_METRICS_LISTEN",
        _metrics,
        ("10.0.0.1:3001", "10.0.0.2:3002", "10.0.0.3:3003"),
    ),
    "store": ("store", "IDEMPROXY_STORE", _store, ("redis://file:1", "redis://env:2", "redis://flag:3")),
    "log_level": ("log_level", "IDEMPROXY_LOG_LEVEL", _level, ("error", "warning", "debug")),
}


@pytest.mark.parametrize("field_name", list(_FIELDS))
@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flags", "winner"),
    [
        pytest.param(True, False, False, 0, id="file-only"),
        pytest.param(True, True, False, 1, id="env-over-file"),
        pytest.param(True, False, True, 2, id="flag-over-file"),
        pytest.param(True, True, True, 2, id="flag-over-env-and-file"),
        pytest.param(False, True, False, 1, id="env-only"),
        pytest.param(False, True, True, 2, id="flag-over-env"),
    ],
)
def test_precedence(tmp_path: Path, field_name: str, in_file: bool, in_env: bool, in_flags: bool, winner: int) -> None:
    file_key, env_var, getter, values = _FIELDS[field_name]
    lines = [f"{file_key}: {values[0]!r}"] if in_file else []
    lines += ["routes:", f"  - {{prefix: /, upstream: '{UPSTREAM}'}}"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    environ = {env_var: values[1]} if in_env else {}
    overrides = Overrides(**{field_name: values[2]}) if in_flags else None
    config = load_config(path, overrides, environ)
    assert getter(config) == values[winner]


def test_environment_store_keeps_file_store_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        store: {{url: "redis://file:1", key_prefix: tenant-a, socket_timeout: 5s, max_connections: 8}}
        routes: [{{prefix: /, upstream: "{UPSTREAM}"}}]
        """,
    )
    config = load_config(path, environ={"IDEMPROXY_STORE": "rediss://env:6380"})
    assert config.store == StoreConfig(
        url="rediss://env:6380", key_prefix="tenant-a", socket_timeout_s=5.0, max_connections=8
    )


def test_environ_argument_replaces_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, f'listen: "127.0.0.1:7000"\nroutes: [{{prefix: /, upstream: "{UPSTREAM}"}}]\n')
    monkeypatch.setenv("IDEMPROXY_LISTEN", "127.0.0.1:7777")
    assert load_config(path, environ={}).listen == HostPort("127.0.0.1", 7000)
    assert load_config(path).listen == HostPort("127.0.0.1", 7777)  # environ=None: the process's


@pytest.mark.parametrize(
    ("variable", "field_name"),
    [
        pytest.param("IDEMPROXY_LISTEN", "listen", id="listen"),
        pytest.param("IDEMPROXY_ADMIN_LISTEN", "admin_listen", id="admin-listen"),
        pytest.param("IDEMPROXY_STORE", "store", id="store"),
        pytest.param("IDEMPROXY_UPSTREAM", "upstream", id="upstream"),
        pytest.param("IDEMPROXY_LOG_LEVEL", "log_level", id="log-level"),
    ],
)
def test_overrides_from_env(variable: str, field_name: str) -> None:
    overrides = Overrides.from_env({variable: "value", "UNRELATED": "x"})
    assert getattr(overrides, field_name) == "value"
    assert [name for name in Overrides.__slots__ if getattr(overrides, name) is not None] == [field_name]


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        pytest.param("IDEMPROXY_LISTEN", "nonsense", "listen", id="listen"),
        pytest.param("IDEMPROXY_ADMIN_LISTEN", "host:99999", "admin_listen", id="admin-listen"),
        pytest.param("IDEMPROXY_STORE", "mysql://db", "store", id="store"),
        pytest.param("IDEMPROXY_LOG_LEVEL", "verbose", "log_level", id="log-level"),
        pytest.param("IDEMPROXY_UPSTREAM", "ftp://tool", "upstream", id="upstream"),
    ],
)
def test_invalid_environment_value_is_reported(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"IDEMPROXY_UPSTREAM": UPSTREAM, variable: value})
    (problem,) = info.value.problems
    assert "IDEMPROXY_" in problem
    assert f".{key}: " in problem
    assert repr(value) in problem


# -- --upstream: the single default route ------------------------------------------------


@pytest.mark.parametrize(
    ("file_text", "overrides", "environ"),
    [
        pytest.param(None, Overrides(upstream="http://tool:9000/base"), {}, id="flag-no-file"),
        pytest.param("", Overrides(upstream="http://tool:9000/base"), {}, id="flag-empty-file"),
        pytest.param("listen: '127.0.0.1:7000'\n", Overrides(upstream="http://tool:9000/base"), {}, id="flag-file"),
        pytest.param(None, None, {"IDEMPROXY_UPSTREAM": "http://tool:9000/base"}, id="env-no-file"),
    ],
)
def test_upstream_creates_default_route(
    tmp_path: Path, file_text: str | None, overrides: Overrides | None, environ: dict[str, str]
) -> None:
    path = write(tmp_path, file_text) if file_text is not None else None
    default = only_route(load_config(path, overrides, environ))
    assert default.name == "default"
    assert default.prefix == "/"
    assert default.upstream == URL("http://tool:9000/base")
    assert default.key_mode is KeyMode.REQUIRE


def test_upstream_flag_route_gets_route_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "route_defaults:\n  key_mode: derive\n  max_attempts: 2\n")
    default = only_route(load_config(path, Overrides(upstream=UPSTREAM), environ={}))
    assert (default.name, default.key_mode, default.max_attempts) == ("default", KeyMode.DERIVE, 2)


@pytest.mark.parametrize(
    "routes",
    [
        pytest.param([{"prefix": "/tickets", "upstream": UPSTREAM}], id="with-routes"),
        pytest.param([], id="with-empty-routes"),
    ],
)
@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        pytest.param(Overrides(upstream=UPSTREAM), {}, id="flag"),
        pytest.param(None, {"IDEMPROXY_UPSTREAM": UPSTREAM}, id="env"),
    ],
)
def test_upstream_with_routes_in_file_is_an_error(
    routes: list[dict[str, Any]], overrides: Overrides | None, environ: dict[str, str]
) -> None:
    merged = (overrides or Overrides()).over(Overrides.from_env(environ))
    (problem,) = problems_of({"routes": routes}, merged)
    assert ".upstream: " in problem
    assert "cannot be combined with 'routes'" in problem


# -- invalid documents ------------------------------------------------------------------

INVALID = [
    # structure and typos
    pytest.param([1, 2], "(top level)", "expected a mapping, got list", id="top-level-list"),
    pytest.param("just text", "(top level)", "expected a mapping, got str", id="top-level-scalar"),
    pytest.param({"rout": [], **doc()}, "rout", "unknown key; expected one of", id="typo-top-level-key"),
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


# -- the CLI ----------------------------------------------------------------------------


def _cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("IDEMPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "idemproxy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **(env or {})},
        timeout=30,
        check=False,
    )


def test_cli_check_config_valid(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    result = _cli("check-config", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "2 route(s)" in result.stdout
    assert "tickets (/tickets -> https://tickets.internal:8443/api/v2)" in result.stdout
    assert result.stderr == ""


def test_cli_check_config_ignores_environment(tmp_path: Path) -> None:
    """check-config validates the file as written: IDEMPROXY_UPSTREAM must not make it fail."""
    path = write(tmp_path, FULL_FILE)
    result = _cli("check-config", path, cwd=tmp_path, env={"IDEMPROXY_UPSTREAM": UPSTREAM})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_cli_check_config_invalid(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        lissten: "127.0.0.1:8080"
        routes:
          - prefix: /tickets
            upstream: ftp://tool
          - prefix: /mail
            upstream: {UPSTREAM}
            lease: 10s
        """,
    )
    result = _cli("check-config", path, cwd=tmp_path)
    assert result.returncode == 2
    assert "OK" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    for line, key in zip(lines, ["lissten", "routes[0].upstream", "routes[1].lease"], strict=True):
        assert line.startswith(f"idemproxy: {path}: {key}: ")


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    result = _cli("check-config", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("file_text", "extra_args", "expected"),
    [
        pytest.param(
            "routes:\n  - prefix: /tickets\n    upstream: http://tool\n    key_mode: sometimes\n",
            [],
            "routes[0].key_mode: ",
            id="invalid-file",
        ),
        pytest.param(
            "routes:\n  - prefix: /tickets\n    upstream: http://tool\n",
            ["--upstream", UPSTREAM],
            ".upstream: cannot be combined",
            id="upstream-flag-with-routes",
        ),
        pytest.param(None, [], "routes: no routes configured", id="nothing-configured"),
        pytest.param(None, ["--upstream", UPSTREAM, "--listen", "nonsense"], ".listen: ", id="bad-listen-flag"),
    ],
)
def test_cli_run_with_invalid_config_exits_2_without_starting(
    tmp_path: Path, file_text: str | None, extra_args: list[str], expected: str
) -> None:
    ledger = tmp_path / "ledger.db"
    args: list[str | Path] = ["run", "--store", f"sqlite:///{ledger}", *extra_args]
    if file_text is not None:
        args += ["--config", write(tmp_path, file_text)]
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert all(line.startswith("idemproxy: ") for line in result.stderr.splitlines())
    # nothing was started: no ledger opened (neither the configured one nor the default one)
    assert not ledger.exists()
    assert not (tmp_path / ".idemproxy").exists()
    assert result.stdout == ""

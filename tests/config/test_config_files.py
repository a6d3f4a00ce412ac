"""``idemproxy.config.settings``: typed configuration from a YAML file.

A full file with every value typed, the defaults, route names and store URL forms,
``route_defaults`` and what a route inherits from them, and ``--upstream`` (the single
default route).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from idemproxy.config.settings import (
    DEFAULT_SIDE_EFFECT_METHODS,
    DEFAULT_STORE_URL,
    FailureMode,
    HostPort,
    KeyMode,
    Overrides,
    RouteConfig,
    StoreConfig,
    load_config,
    parse_config,
)
from idemproxy.protocol import HeaderNames
from tests.support.config_docs import FULL_FILE, UPSTREAM, doc, only_route, problems_of, route, write

# -- a full file ------------------------------------------------------------------------


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
    assert "IDEMPROXY_UPSTREAM: upstream: " in problem
    assert "cannot be combined with 'routes'" in problem

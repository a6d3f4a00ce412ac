"""Configuration documents as the config tests build them (``tests/config/test_config_*.py``)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from idemproxy.config.settings import ConfigError, Overrides, ProxyConfig, RouteConfig, parse_config

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


#: A configuration file that sets every key to a value other than its default.
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

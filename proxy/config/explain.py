"""``idemproxy check-config --explain``: the effective configuration, each value with where
it came from: ``FILE:LINE``, ``flag --NAME``, ``env IDEMPROXY_NAME`` or ``default``.

The listing is YAML (each origin a comment), in the order of docs/configuration.md.
Secrets are not shown: header values (``upstream_headers``, probe ``headers``) are
left out, identities are listed by name, and a store URL's password is masked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import yaml

from idemproxy.config.auth import AuthConfig
from idemproxy.config.budgets import BudgetConfig, Rate
from idemproxy.config.mcp import RouteMode
from idemproxy.config.reconcile import ReconcileConfig
from idemproxy.config.redis_urls import redacted
from idemproxy.config.settings import HostPort, LoadedConfig, RouteConfig, StoreConfig

DEFAULT = "default"
_COMMENT_COLUMN = 56


def explain(loaded: LoadedConfig) -> list[str]:
    """The lines of the listing."""
    return _Explainer(loaded).lines()


def duration(seconds: float) -> str:
    """``86400.0`` -> ``1d``, ``0.25`` -> ``250ms``: the largest unit that says it exactly."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and math.isclose(seconds % factor, 0, abs_tol=1e-9):
            return f"{round(seconds / factor)}{unit}"
    milliseconds = seconds * 1000
    if math.isclose(milliseconds, round(milliseconds), abs_tol=1e-9):
        return f"{round(milliseconds)}ms"
    return f"{seconds:g}s"


def size(count: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= factor and count % factor == 0:
            return f"{count // factor}{unit}"
    return f"{count}B"


def scalar(value: Any) -> str:
    """``value`` as YAML on one line (flow style for lists and mappings)."""
    if isinstance(value, HostPort):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True, sort_keys=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


class _Explainer:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.rows: list[tuple[str, str | None]] = []  # (text, origin); no origin: a heading

    # -- where values came from ----------------------------------------------------------------

    def origin(self, *paths: str, override: str | None = None) -> str:
        """The flag or variable that set ``override``, else the line of the first of ``paths``
        the file has, else ``default``."""
        if override is not None and override in self.loaded.overridden:
            return self.loaded.overridden[override]
        source = self.loaded.source
        for path in paths:
            if source is not None and (line := source.line_of(path)) is not None:
                return f"{source.name}:{line}"
        return DEFAULT

    def row(self, indent: int, key: str, value: Any, origin: str, *, item: bool = False) -> None:
        lead = " " * indent + ("- " if item else "")
        self.rows.append((f"{lead}{key}: {scalar(value)}", origin))

    def heading(self, indent: int, key: str, *, item: bool = False) -> None:
        self.rows.append((" " * indent + ("- " if item else "") + f"{key}:", None))

    def lines(self) -> list[str]:
        config = self.loaded.config
        self.top("listen", config.listen)
        self.top("admin_listen", config.admin_listen)
        self.top("metrics_listen", config.metrics_listen if config.metrics_listen is not None else "off")
        self.top("log_level", config.log_level)
        self.top("shutdown_grace", duration(config.shutdown_grace_s))
        self.top("log_keys", config.log_keys)
        self.top("client_header_timeout", duration(config.client_header_timeout_s))
        self.top("client_body_timeout", duration(config.client_body_timeout_s))
        self.top("max_connections", config.max_connections)
        self.top("allow_unauthenticated_credential_use", config.allow_unauthenticated_credential_use)
        self.store(config.store)
        self.heading(0, "headers")
        for key in ("key", "caller", "task"):
            self.row(2, key, getattr(config.headers, key), self.origin(f"headers.{key}"))
        self.heading(0, "routes")
        for index, route in enumerate(config.routes):
            self.route(index, route)
        self.auth(config.auth)
        self.budgets(config.budgets)
        width = min(_COMMENT_COLUMN, max(len(text) for text, _ in self.rows) + 2)
        return [text if origin is None else f"{text.ljust(width)}# {origin}" for text, origin in self.rows]

    def top(self, key: str, value: Any) -> None:
        self.row(0, key, value, self.origin(key, override=key))

    def store(self, store: StoreConfig) -> None:
        # ``store: URL`` is short for ``store: {url: URL}``.
        self.heading(0, "store")
        self.row(2, "url", redacted(store.url), self.origin("store.url", "store", override="store"))
        self.row(2, "key_prefix", store.key_prefix, self.origin("store.key_prefix"))
        self.row(2, "socket_timeout", duration(store.socket_timeout_s), self.origin("store.socket_timeout"))
        self.row(2, "max_connections", store.max_connections, self.origin("store.max_connections"))
        replicas = "decided at start" if store.min_replicas_ack is None else store.min_replicas_ack
        self.row(2, "min_replicas_ack", replicas, self.origin("store.min_replicas_ack"))
        timeout = duration(store.replica_ack_timeout_s)
        self.row(2, "replica_ack_timeout", timeout, self.origin("store.replica_ack_timeout"))
        self.row(2, "allow_eviction", store.allow_eviction, self.origin("store.allow_eviction"))

    # -- routes -------------------------------------------------------------------------------------

    def route(self, index: int, route: RouteConfig) -> None:
        from_upstream = "upstream" in self.loaded.overridden  # the one route --upstream made
        here = f"routes[{index}]"

        def own(key: str) -> str:
            if from_upstream:
                return self.loaded.overridden["upstream"]
            return self.origin(f"{here}.{key}")

        def policy(key: str) -> str:
            return self.origin(f"{here}.{key}", f"route_defaults.{key}")

        self.row(2, "name", route.name, own("name"), item=True)
        self.row(4, "prefix", route.prefix, own("prefix"))
        self.row(4, "upstream", str(route.upstream), own("upstream"))
        self.row(4, "mode", route.mode.value, policy("mode"))
        self.row(4, "strip_prefix", route.strip_prefix, policy("strip_prefix"))
        self.row(4, "side_effect_methods", sorted(route.side_effect_methods), policy("side_effect_methods"))
        self.row(4, "key_mode", route.key_mode.value, policy("key_mode"))
        self.row(4, "derive_scope", route.derive_scope.value, policy("derive_scope"))
        for key, seconds in (
            ("retention", route.retention_s),
            ("wait", route.wait_s),
            ("connect_timeout", route.connect_timeout_s),
            ("read_timeout", route.read_timeout_s),
            ("lease", route.lease_s),
        ):
            self.row(4, key, duration(seconds), policy(key))
        self.row(4, "max_body", size(route.max_body), policy("max_body"))
        self.row(4, "max_stored_response", size(route.max_stored_response), policy("max_stored_response"))
        self.row(4, "max_attempts", route.max_attempts, policy("max_attempts"))
        self.row(4, "not_applied_statuses", sorted(route.not_applied_statuses), policy("not_applied_statuses"))
        self.row(4, "ambiguous_statuses", sorted(route.ambiguous_statuses), policy("ambiguous_statuses"))
        self.row(4, "on_store_error", route.on_store_error.value, policy("on_store_error"))
        self.row(4, "fingerprint_headers", list(route.fingerprint_headers), policy("fingerprint_headers"))
        if route.upstream_headers:  # the names alone: the values are secrets
            names = _names(route.upstream_headers)
            self.row(4, "upstream_headers", names, policy("upstream_headers") + " (values not shown)")
        if route.mode is RouteMode.MCP:
            base = self.block_base(index, "mcp")
            self.heading(4, "mcp")
            tools = sorted(route.mcp.read_only_tools)
            self.row(6, "read_only_tools", tools, self.origin(f"{base}.read_only_tools"))
            self.row(6, "key_meta", route.mcp.key_meta, self.origin(f"{base}.key_meta"))
        if route.reconcile is not None:
            self.reconcile(self.block_base(index, "reconcile"), route.reconcile)

    def block_base(self, index: int, key: str) -> str:
        """Where a route's block was written: the route's own key, or ``route_defaults``'."""
        own = f"routes[{index}].{key}"
        source = self.loaded.source
        if "upstream" not in self.loaded.overridden and source is not None and source.line_of(own) is not None:
            return own
        return f"route_defaults.{key}"

    def reconcile(self, base: str, reconcile: ReconcileConfig) -> None:
        self.heading(4, "reconcile")
        probe = reconcile.probe
        if probe is not None:
            self.heading(6, "probe")
            self.row(8, "url", _without_secrets(probe.url), self.origin(f"{base}.probe.url"))
            self.row(8, "match", probe.match_source, self.origin(f"{base}.probe.match"))
            self.row(8, "method", probe.method, self.origin(f"{base}.probe.method"))
            self.row(8, "timeout", duration(probe.timeout_s), self.origin(f"{base}.probe.timeout"))
            statuses = sorted(probe.match_statuses)
            self.row(8, "match_statuses", statuses, self.origin(f"{base}.probe.match_statuses"))
            statuses = sorted(probe.absent_statuses)
            self.row(8, "absent_statuses", statuses, self.origin(f"{base}.probe.absent_statuses"))
            if probe.headers:
                names = _names(probe.headers)
                self.row(8, "headers", names, self.origin(f"{base}.probe.headers") + " (values not shown)")
        if reconcile.hook_name is not None:
            self.row(6, "hook", reconcile.hook_name, self.origin(f"{base}.hook"))
        if reconcile.resend_safe:
            self.row(6, "resend_safe", True, self.origin(f"{base}.resend_safe"))
        self.heading(6, "found")
        self.row(8, "status", reconcile.found.status, self.origin(f"{base}.found.status"))
        body = reconcile.found.body
        shown = body if isinstance(body, str) else json.dumps(body, sort_keys=True)
        self.row(8, "body", shown, self.origin(f"{base}.found.body"))
        self.row(6, "max_probes", reconcile.max_probes, self.origin(f"{base}.max_probes"))
        self.row(6, "backoff", duration(reconcile.backoff_s), self.origin(f"{base}.backoff"))
        self.row(6, "max_backoff", duration(reconcile.max_backoff_s), self.origin(f"{base}.max_backoff"))
        timeout = duration(reconcile.on_demand_timeout_s)
        self.row(6, "on_demand_timeout", timeout, self.origin(f"{base}.on_demand_timeout"))
        settle = "connect_timeout + read_timeout" if reconcile.settle_s is None else duration(reconcile.settle_s)
        self.row(6, "settle", settle, self.origin(f"{base}.settle"))

    # -- auth and budgets ---------------------------------------------------------------------------

    def auth(self, auth: AuthConfig | None) -> None:
        if auth is None:
            self.row(0, "auth", "off", DEFAULT)
            return
        self.heading(0, "auth")
        if auth.identities_file is not None:
            self.row(2, "identities_file", str(auth.identities_file), self.origin("auth.identities_file"))
        self.row(2, "max_skew", duration(auth.max_skew_s), self.origin("auth.max_skew"))
        self.row(2, "reload_check", duration(auth.reload_check_s), self.origin("auth.reload_check"))
        if auth.identities:
            self.heading(2, "identities")
        for index, identity in enumerate(auth.identities):  # names and access, never credentials
            here = f"auth.identities[{index}]"
            self.row(4, "name", identity.name, self.origin(f"{here}.name"), item=True)
            self.row(6, "ops", identity.ops.value, self.origin(f"{here}.ops"))

    def budgets(self, budgets: BudgetConfig) -> None:
        self.heading(0, "budgets")
        self.heading(2, "identity")
        calls = _rate(budgets.identity.calls)
        self.row(4, "calls", calls, self.origin("budgets.identity.calls"))
        attempts = budgets.identity.attempts_per_operation
        shown = "no cap" if attempts is None else attempts
        self.row(4, "attempts_per_operation", shown, self.origin("budgets.identity.attempts_per_operation"))
        self.heading(2, "task")
        self.row(4, "calls", _rate(budgets.task), self.origin("budgets.task.calls"))


def _rate(rate: Rate | None) -> str:
    return "no cap" if rate is None else f"{rate.limit}/{duration(rate.window_s)}"


def _names(items: Iterable[tuple[str, str]]) -> list[str]:
    return [name for name, _ in items]


def _without_secrets(url: str) -> str:
    """A probe URL as written, but with the query's values and any userinfo masked: an
    absolute probe URL may carry an API key."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
        url = scheme + sep + rest
    path, question, query = url.partition("?")
    if not question:
        return url
    return f"{path}?{'&'.join(_masked(part) for part in query.split('&'))}"


def _masked(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if not equals or value.startswith("{"):  # a flag, or a placeholder filled per operation
        return parameter
    return f"{name}=***"

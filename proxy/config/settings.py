"""Typed, frozen configuration, loaded from YAML, environment and flags.

Precedence: command-line flags > ``IDEMPROXY_*`` environment > file > defaults.
Every problem in a file is collected and reported with the offending key's path,
its line in the file (or the flag or environment variable that set it), the value
and what was expected; an invalid configuration never starts a proxy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from yarl import URL

from idemproxy.config.auth import AuthConfig, parse_auth, resolve_secret
from idemproxy.config.budgets import BudgetConfig, read_budgets
from idemproxy.config.convert import boolean, kind, positive_duration, positive_int, statuses
from idemproxy.config.key_paths import NestedProblems, Problems
from idemproxy.config.mcp import McpConfig, RouteMode, parse_mcp, parse_mode
from idemproxy.config.reconcile import ReconcileConfig, parse_reconcile
from idemproxy.config.redis_urls import (
    SentinelUrl,
    is_redis_url,
    is_topology_url,
    missing_redis_client,
    parse_topology_url,
)
from idemproxy.config.source import SourceMap, YamlError, load_yaml
from idemproxy.config.units import parse_duration, parse_size
from idemproxy.protocol import HeaderNames

DEFAULT_STORE_URL = "sqlite:///.idemproxy/ledger.db"
#: ``store.sqlite_synchronous``: the ``PRAGMA synchronous`` values the SQLite store may run with.
SQLITE_SYNCHRONOUS_MODES = ("full", "normal")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_SIDE_EFFECT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (header names, methods)
_PREFIX = re.compile(r"^/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]+(?:/[A-Za-z0-9._~!$&'()*+,;=:@-]+)*)?$")
_ENV_PREFIX = "IDEMPROXY_"


class KeyMode(StrEnum):
    REQUIRE = "require"  # 400 without a key
    DERIVE = "derive"  # derived from caller + task + fingerprint when absent
    OPTIONAL = "optional"  # without a key the call passes through unrecorded


class DeriveScope(StrEnum):
    """What a derived key (``key_mode: derive``) is scoped by, besides caller and request."""

    TASK = "task"  # the task header: a call without one is refused (400 missing-task)
    CALLER = "caller"  # the caller alone when no task is sent: identical calls across runs are one operation


class FailureMode(StrEnum):
    FAIL_CLOSED = "fail_closed"  # ledger down: refuse side-effecting calls with 503
    FAIL_OPEN = "fail_open"  # ledger down: forward without a record (explicit opt-in)


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: ``text`` is ``"key.path: message"``; it is at ``line`` of the file,
    or, with an ``origin``, in a value a flag or the environment set (``flag --listen``,
    ``env IDEMPROXY_LISTEN``)."""

    text: str
    line: int | None = None
    origin: str | None = None

    def __str__(self) -> str:
        return f"{self.origin}: {self.text}" if self.origin else self.text


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` lists them all (``"key.path:
    message"``, prefixed with the flag or variable for a value one of those set), ``located``
    the same with their lines, and ``lines()`` says each on a line of its own."""

    def __init__(self, problems: Sequence[str | Problem], source: str | None = None) -> None:
        self.located = [problem if isinstance(problem, Problem) else Problem(problem) for problem in problems]
        self.problems = [str(problem) for problem in self.located]
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems))

    def lines(self) -> list[str]:
        """``FILE:LINE: key.path: message`` for each problem, those with a line first, in file order;
        then ``env IDEMPROXY_X: ...``, ``flag --x: ...`` and ``FILE: ...`` for the others."""
        source = self.source or "configuration"
        in_file = sorted((p for p in self.located if p.line is not None and not p.origin), key=lambda p: p.line or 0)
        rest = [p for p in self.located if p.line is None or p.origin]
        return [_one_line(f"{source}:{p.line}: {p.text}") for p in in_file] + [
            _one_line(str(p) if p.origin else f"{source}: {p.text}") for p in rest
        ]


def _one_line(text: str) -> str:
    """A message on one line: some libraries' (JMESPath's) span lines and underline with carets."""
    parts = [part.strip() for part in text.splitlines()]
    return " ".join(part for part in parts if part and part.strip("^"))


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Only this host can connect: a loopback address, or ``localhost``. Any other
        name may resolve to an address that other machines reach."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    prefix: str
    upstream: URL
    strip_prefix: bool = False
    side_effect_methods: frozenset[str] = DEFAULT_SIDE_EFFECT_METHODS
    key_mode: KeyMode = KeyMode.REQUIRE
    derive_scope: DeriveScope = DeriveScope.TASK
    retention_s: float = 86400.0
    wait_s: float = 10.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    lease_s: float = 60.0
    max_body: int = 1024 * 1024
    max_stored_response: int = 1024 * 1024
    max_attempts: int = 5
    not_applied_statuses: frozenset[int] = frozenset({429, 503})
    ambiguous_statuses: frozenset[int] = frozenset({500, 502, 504})
    on_store_error: FailureMode = FailureMode.FAIL_CLOSED
    fingerprint_headers: tuple[str, ...] = ()
    reconcile: ReconcileConfig | None = None
    #: Set on every request forwarded to this route (and its probes); values resolved from secrets.
    upstream_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    mode: RouteMode = RouteMode.HTTP
    mcp: McpConfig = field(default_factory=McpConfig)  # read when mode is mcp (idemproxy.modes.mcp)

    def is_side_effecting(self, method: str) -> bool:
        return method in self.side_effect_methods


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    key_prefix: str = "idem"
    socket_timeout_s: float = 2.0
    max_connections: int = 64
    #: Redis only: replicas that must acknowledge a reservation (``WAIT``) before
    #: the request is forwarded; 0 forwards once the master has it. ``None`` (not
    #: set): the store decides, 1 wherever it has replicas (``RedisStore``).
    min_replicas_ack: int | None = None
    replica_ack_timeout_s: float = 1.0
    #: Redis only: start (and stay ready) although a node may evict records
    #: (a ``maxmemory-policy`` other than ``noeviction``); it is still logged and reported.
    allow_eviction: bool = False
    #: SQLite only: ``PRAGMA synchronous``. ``full`` syncs every commit; ``normal`` only at
    #: checkpoints, so a power loss or kernel crash (not a process crash) can lose the last
    #: commits (docs/stores.md, "SQLite").
    sqlite_synchronous: str = "full"

    def notes(self) -> list[str]:
        """What the durability settings mean for this store, for ``check-config``
        (for SQLite, only a relaxed ``sqlite_synchronous``: no replicas, no eviction)."""
        if not is_redis_url(self.url):
            if self.sqlite_synchronous == "full":
                return []
            return [
                "sqlite_synchronous normal: commits are not synced one by one, so a power loss or a kernel "
                "crash can lose the last reservations and outcomes; their retries then run the call again "
                "(a crash of the proxy process alone loses nothing)"
            ]
        notes = [self._replicas_note()]
        if self.allow_eviction:
            notes.append(
                "allow_eviction true: the proxy starts and stays ready although Redis may evict records "
                "(a maxmemory-policy other than noeviction); a retry of an evicted operation runs the call again"
            )
        return notes

    def _replicas_note(self) -> str:
        if self.min_replicas_ack == 0:
            return (
                "min_replicas_ack 0 (set explicitly): reservations do not wait for replicas, so one the "
                "master acknowledged but had not replicated yet is lost if a replica is promoted (a failover), "
                "and a retry with the same key then runs the call again; remove it to wait for one replica"
            )
        if self.min_replicas_ack is None and not is_topology_url(self.url):
            return (
                "min_replicas_ack decided at start: 1 if the master reports connected replicas, else 0 "
                "(set it to say which)"
            )
        wanted = self.min_replicas_ack or 1
        if self.min_replicas_ack is None:
            topology = "Sentinel" if isinstance(parse_topology_url(self.url), SentinelUrl) else "Cluster"
            setting = f"min_replicas_ack 1 (the default for {topology})"
        else:
            setting = f"min_replicas_ack {wanted}"
        return (
            f"{setting}: each reservation waits for {wanted} replica(s) before the call is forwarded "
            f"(replica_ack_timeout {self.replica_ack_timeout_s:g}s); run {wanted + 1} replicas per master, "
            "or a failover or one lost replica makes reservations fail with 503 until enough are back"
        )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    routes: tuple[RouteConfig, ...]
    listen: HostPort = HostPort("127.0.0.1", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 8081)
    #: /metrics, /healthz and /readyz alone, for Prometheus and the kubelet; None: off
    #: (the admin listener serves them too).
    metrics_listen: HostPort | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    headers: HeaderNames = field(default_factory=HeaderNames)
    log_level: str = "info"
    shutdown_grace_s: float = 10.0
    log_keys: bool = False  # idempotency keys and paths in access logs (debugging only)
    #: A connection's next request head must be complete this long after it opened or
    #: answered its previous request (idle keep-alive connections close then too).
    client_header_timeout_s: float = 60.0
    #: A request's whole body must arrive this long after its head, or 408.
    client_body_timeout_s: float = 60.0
    #: Connections the proxy listener keeps open at once, per worker process; one more is closed
    #: at once. nginx's default ``worker_connections``; a connection can hold two files (the
    #: caller's and its upstream's), so 512 of them, the store's pool and the listeners stay under
    #: 1024, the usual soft limit of open files (Docker 25+ among others): the limit refuses
    #: cleanly before ``accept`` and upstream connects fail with EMFILE. Agents' HTTP clients pool
    #: 100 connections at most by default (aiohttp, httpx).
    max_connections: int = 512
    auth: AuthConfig | None = None  # None: callers are named by the caller header, unauthenticated
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    #: Serve routes that inject credentials (``upstream_headers``) to unauthenticated callers on
    #: a non-loopback ``listen``: the operator's explicit word that the network is trusted.
    allow_unauthenticated_credential_use: bool = False


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values from flags or environment that win over the file."""

    listen: str | None = None
    admin_listen: str | None = None
    metrics_listen: str | None = None
    store: str | None = None
    upstream: str | None = None
    log_level: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Overrides:
        return cls(
            listen=environ.get(_ENV_PREFIX + "LISTEN"),
            admin_listen=environ.get(_ENV_PREFIX + "ADMIN_LISTEN"),
            metrics_listen=environ.get(_ENV_PREFIX + "METRICS_LISTEN"),
            store=environ.get(_ENV_PREFIX + "STORE"),
            upstream=environ.get(_ENV_PREFIX + "UPSTREAM"),
            log_level=environ.get(_ENV_PREFIX + "LOG_LEVEL"),
        )

    def over(self, lower: Overrides) -> Overrides:
        """These overrides, falling back to ``lower`` where unset."""
        return Overrides(
            listen=self.listen or lower.listen,
            admin_listen=self.admin_listen or lower.admin_listen,
            metrics_listen=self.metrics_listen or lower.metrics_listen,
            store=self.store or lower.store,
            upstream=self.upstream or lower.upstream,
            log_level=self.log_level or lower.log_level,
        )


#: Each override: the flag that sets it, the environment variable that sets it.
_OVERRIDE_SOURCES = {
    name: (f"flag --{name.replace('_', '-')}", f"env {_ENV_PREFIX}{name.upper()}") for name in Overrides.__slots__
}


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A configuration with what ``check-config --explain`` says about it: where each value came from."""

    config: ProxyConfig
    source: SourceMap | None  # where the file set each key; None without a file
    #: Top-level keys (and ``upstream``) a flag or the environment set: ``{"listen": "env IDEMPROXY_LISTEN"}``.
    overridden: Mapping[str, str]


def load_config(
    path: str | Path | None = None,
    overrides: Overrides | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """Build the configuration from an optional YAML file, ``environ`` and ``overrides``."""
    return load_config_explained(path, overrides, environ).config


def load_config_explained(
    path: str | Path | None = None,
    overrides: Overrides | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """``load_config``, keeping where each value came from."""
    env = Overrides.from_env(os.environ if environ is None else environ)
    flags = overrides or Overrides()
    origins = {
        name: flag if getattr(flags, name) else variable
        for name, (flag, variable) in _OVERRIDE_SOURCES.items()
        if getattr(flags, name) or getattr(env, name)
    }
    source = str(path) if path is not None else None
    raw: Any = {}
    source_map: SourceMap | None = None
    problems: list[Problem] = []
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read the file: {exc.strerror}"], source) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"not valid YAML: not UTF-8 text (byte {exc.start})"], source) from exc
        try:
            document = load_yaml(text, str(path))
        except YamlError as exc:
            raise ConfigError([Problem(exc.message, exc.line)], source) from exc
        raw = {} if document.data is None else document.data
        source_map = document.source
        problems = [Problem(f"{key}: {message}", line) for key, line, message in document.problems]
    return _parse(raw, flags.over(env), source, origins, source_map, problems)


def parse_config(raw: Any, overrides: Overrides | None = None, source: str | None = None) -> ProxyConfig:
    """Validate an already-parsed document; raises ``ConfigError`` naming every problem."""
    return _parse(raw, overrides or Overrides(), source, {}, None, []).config


def _parse(
    raw: Any,
    overrides: Overrides,
    source: str | None,
    origins: Mapping[str, str],
    source_map: SourceMap | None,
    found: list[Problem],
) -> LoadedConfig:
    reader = _Reader(origins)
    config = reader.proxy(raw, overrides)
    problems = list(found)
    for index, text in enumerate(reader.problems):
        origin = reader.origin_of.get(index)
        line = source_map.locate(text) if source_map is not None and origin is None else None
        problems.append(Problem(text, line, origin))
    if problems or config is None:
        raise ConfigError(problems, source)
    return LoadedConfig(config, source_map, reader.overridden)


class _Reader(Problems):
    """Walks the raw document, collecting every problem with its key path."""

    def __init__(self, origins: Mapping[str, str]) -> None:
        super().__init__()
        self._origins = origins
        self._origin: str | None = None
        #: Problem index -> the flag or variable whose value it is about (file problems have none).
        self.origin_of: dict[int, str] = {}
        #: Key paths with a problem, so checks across keys skip values that were not read.
        self.failed: set[str] = set()
        #: Keys a flag or the environment set, and which: ``{"listen": "env IDEMPROXY_LISTEN"}``.
        self.overridden: dict[str, str] = {}
        self._failed_defaults: frozenset[str] = frozenset()
        self._route_names: set[str] = set()
        #: The prefix and name of the route ``route`` read last, where those are valid.
        self._last_prefix: str | None = None
        self._last_name: str | None = None

    def fail(self, key: str | None, message: str) -> None:
        self.failed.add(self.path_of(key))
        super().fail(key, message)
        if self._origin is not None:
            self.origin_of[len(self.problems) - 1] = self._origin

    @contextmanager
    def from_origin(self, origin: str | None) -> Iterator[None]:
        """Problems found meanwhile are about a value from ``origin`` (a flag or variable)."""
        outer, self._origin = self._origin, origin
        try:
            yield
        finally:
            self._origin = outer

    def origin(self, name: str) -> str:
        """Which flag or variable set override ``name`` (both, when ``parse_config`` cannot tell)."""
        flag, variable = _OVERRIDE_SOURCES[name]
        return self._origins.get(name) or f"{flag} or {variable}"

    # -- document -----------------------------------------------------------------

    def proxy(self, raw: Any, overrides: Overrides) -> ProxyConfig | None:
        data = self.mapping(raw, _TOP_KEYS)
        if data is None:
            return None
        defaults = ProxyConfig(routes=())
        config = ProxyConfig(
            routes=(),
            listen=self.value(data, "listen", defaults.listen, _host_port),
            admin_listen=self.value(data, "admin_listen", defaults.admin_listen, _host_port),
            metrics_listen=self.value(data, "metrics_listen", defaults.metrics_listen, _host_port),
            log_level=self.value(data, "log_level", defaults.log_level, _log_level),
            shutdown_grace_s=self.value(data, "shutdown_grace", defaults.shutdown_grace_s, parse_duration),
            log_keys=self.value(data, "log_keys", defaults.log_keys, boolean),
            client_header_timeout_s=self.value(
                data, "client_header_timeout", defaults.client_header_timeout_s, positive_duration
            ),
            client_body_timeout_s=self.value(
                data, "client_body_timeout", defaults.client_body_timeout_s, positive_duration
            ),
            max_connections=self.value(data, "max_connections", defaults.max_connections, positive_int),
            allow_unauthenticated_credential_use=self.value(
                data,
                "allow_unauthenticated_credential_use",
                defaults.allow_unauthenticated_credential_use,
                boolean,
            ),
            store=self.store(data.get("store", {})),
            headers=self.headers(data.get("headers", {})),
        )
        route_defaults = self.route_defaults(data.get("route_defaults", {}))
        config = dataclasses.replace(config, routes=self.routes(data.get("routes", []), route_defaults))
        config = self.overrides(config, overrides, data, route_defaults)
        self.check_store(config.store)
        if not config.routes and not overrides.upstream and data.get("routes", []) == []:
            # (Routes that are there but wrong have problems of their own.)
            self.fail("routes", "no routes configured; add 'routes' to the file or pass --upstream URL")
        self.check_listeners(config, has_auth="auth" in data)
        return dataclasses.replace(
            config,
            auth=self.auth(data["auth"]) if "auth" in data else None,
            budgets=self.budgets(data["budgets"]) if "budgets" in data else BudgetConfig(),
        )

    def overrides(
        self, config: ProxyConfig, overrides: Overrides, data: Mapping[str, Any], route_defaults: dict[str, Any]
    ) -> ProxyConfig:
        """``config`` with the flags and environment applied: each is read as the key it
        replaces, and its problems name the flag or variable."""
        for name in ("listen", "admin_listen", "metrics_listen", "log_level", "store", "upstream"):
            value = getattr(overrides, name)
            if not value:
                continue
            with self.from_origin(self.origin(name)):
                before = len(self.problems)
                if name in ("listen", "admin_listen", "metrics_listen"):
                    config = dataclasses.replace(
                        config, **{name: self.value({name: value}, name, getattr(config, name), _host_port)}
                    )
                elif name == "log_level":
                    config = dataclasses.replace(
                        config, log_level=self.value({name: value}, name, config.log_level, _log_level)
                    )
                elif name == "store":
                    url = self.value({name: value}, name, config.store.url, _store_url)
                    config = dataclasses.replace(config, store=dataclasses.replace(config.store, url=url))
                elif "routes" in data:
                    self.fail("upstream", "cannot be combined with 'routes' in the file; use one or the other")
                else:
                    route = self.route({"prefix": "/", "name": "default", "upstream": value}, route_defaults)
                    config = dataclasses.replace(config, routes=(route,) if route is not None else ())
                    self._route_names.add("default")
                if len(self.problems) == before:
                    self.overridden[name] = self.origin(name)
                    self.failed -= {name, f"{name}.url"}
        return config

    def check_store(self, store: StoreConfig) -> None:
        """The store's settings that depend on its URL, once the overrides are applied:
        the URL may come from --store or IDEMPROXY_STORE."""
        if store.min_replicas_ack and not is_redis_url(store.url) and not {"store", "store.url"} & self.failed:
            with self.at("store"):
                self.fail("min_replicas_ack", f"needs a Redis store; {store.url.partition(':')[0]} has no replicas")
        waits = store.min_replicas_ack if store.min_replicas_ack is not None else int(is_topology_url(store.url))
        timeouts_read = not {"store.replica_ack_timeout", "store.socket_timeout"} & self.failed
        if (
            waits
            and is_redis_url(store.url)
            and store.replica_ack_timeout_s >= store.socket_timeout_s
            and timeouts_read
        ):
            # A WAIT cut off by the socket timeout is retried on another connection (in a
            # cluster, possibly to another master), where it finds nothing of its own to wait for.
            with self.at("store"):
                self.fail(
                    "replica_ack_timeout",
                    f"must be shorter than socket_timeout ({store.socket_timeout_s:g}s), got "
                    f"{store.replica_ack_timeout_s:g}s: reservations wait for {waits} replica(s) (min_replicas_ack), "
                    "and a WAIT the socket timeout cuts off is retried where it vouches for nothing",
                )

    def check_listeners(self, config: ProxyConfig, *, has_auth: bool) -> None:
        listen, admin_listen, metrics_listen = config.listen, config.admin_listen, config.metrics_listen
        listeners_read = not {"listen", "admin_listen"} & self.failed
        if listen == admin_listen and listeners_read:
            with self.from_origin(self.overridden.get("admin_listen") or self.overridden.get("listen")):
                self.fail("admin_listen", f"must differ from listen ({listen})")
        if metrics_listen is not None and metrics_listen in (listen, admin_listen) and listeners_read:
            with self.from_origin(self.overridden.get("metrics_listen")):
                self.fail("metrics_listen", f"must differ from listen ({listen}) and admin_listen ({admin_listen})")
        if not has_auth and not admin_listen.is_loopback:
            with self.from_origin(self.overridden.get("admin_listen")):
                self.fail("admin_listen", _exposed_admin_problem(admin_listen))
        credentialed = [route.name for route in config.routes if route.upstream_headers]
        if credentialed and not has_auth and not listen.is_loopback and not config.allow_unauthenticated_credential_use:
            with self.from_origin(self.overridden.get("listen")):
                self.fail("listen", _lent_credentials_problem(listen, credentialed))

    def store(self, raw: Any) -> StoreConfig:
        defaults = StoreConfig()
        if isinstance(raw, str):
            raw = {"url": raw}
        with self.at("store"):
            data = self.mapping(raw, _STORE_KEYS)
            if data is None:
                return defaults

            def replica_count(value: Any) -> int:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"expected a whole number of replicas (0 turns WAIT off), got {kind(value)}")
                return value

            return StoreConfig(
                url=self.value(data, "url", defaults.url, _store_url),
                key_prefix=self.value(data, "key_prefix", defaults.key_prefix, _key_prefix),
                socket_timeout_s=self.value(data, "socket_timeout", defaults.socket_timeout_s, positive_duration),
                max_connections=self.value(data, "max_connections", defaults.max_connections, positive_int),
                min_replicas_ack=self.value(data, "min_replicas_ack", defaults.min_replicas_ack, replica_count),
                replica_ack_timeout_s=self.value(
                    data, "replica_ack_timeout", defaults.replica_ack_timeout_s, positive_duration
                ),
                allow_eviction=self.value(data, "allow_eviction", defaults.allow_eviction, boolean),
                sqlite_synchronous=self.value(
                    data, "sqlite_synchronous", defaults.sqlite_synchronous, _sqlite_synchronous
                ),
            )

    def auth(self, raw: Any) -> AuthConfig | None:
        with self.at("auth"):
            # Every route's name, a route with problems' too: its problems are reported already,
            # and a scope naming it is not another one.
            config, problems = parse_auth(raw, frozenset(self._route_names))
            for problem in problems:
                key, _, message = problem.partition(": ")
                self.fail(None if key == "(top level)" else key, message)
            return config

    def budgets(self, raw: Any) -> BudgetConfig:
        with self.at("budgets"):
            return read_budgets(self, raw)

    def headers(self, raw: Any) -> HeaderNames:
        defaults = HeaderNames()
        with self.at("headers"):
            data = self.mapping(raw, _HEADER_KEYS)
            if data is None:
                return defaults
            return HeaderNames(
                key=self.value(data, "key", defaults.key, _header_name),
                caller=self.value(data, "caller", defaults.caller, _header_name),
                task=self.value(data, "task", defaults.task, _header_name),
            )

    def route_defaults(self, raw: Any) -> dict[str, Any]:
        with self.at("route_defaults"):
            data = self.mapping(raw, _ROUTE_POLICY_KEYS)
            if data is None:
                return {}
            fields, failed = self.route_policy(data)
            self._failed_defaults = failed
            return fields

    def route_policy(self, data: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
        """``RouteConfig`` fields for the valid policy keys in ``data``, and the keys that are not."""
        fields: dict[str, Any] = {}
        failed: set[str] = set()
        for key, (field_name, convert) in _ROUTE_POLICY.items():
            if key in data:
                before = len(self.problems)
                value = self.value(data, key, None, convert)
                if len(self.problems) == before:
                    fields[field_name] = value
                else:
                    failed.add(key)
        return fields, frozenset(failed)

    def routes(self, raw: Any, defaults: dict[str, Any]) -> tuple[RouteConfig, ...]:
        if not isinstance(raw, list):
            self.fail("routes", f"expected a list of routes, got {kind(raw)}")
            return ()
        routes: list[RouteConfig] = []
        prefixes: dict[str, str] = {}  # every valid prefix and name, a route with problems' too
        names: set[str] = set()
        for index, item in enumerate(raw):
            with self.at(f"routes[{index}]"):
                route = self.route(item, defaults)
                prefix, name = self._last_prefix, self._last_name
                if prefix is not None and prefix in prefixes:
                    self.fail("prefix", f"{prefix!r} is already used by route {prefixes[prefix]!r}")
                if name is not None and name in names:
                    self.fail("name", f"{name!r} is already used by another route")
                if prefix is not None:
                    prefixes.setdefault(prefix, name or "?")
                if name is not None:
                    names.add(name)
                if route is not None:
                    routes.append(route)
        self._route_names |= names
        return tuple(routes)

    def route(self, raw: Any, defaults: dict[str, Any]) -> RouteConfig | None:
        """One route, with every problem of it; ``_last_prefix`` and ``_last_name`` are its
        prefix and name where those are valid, for the checks across routes."""
        self._last_prefix = self._last_name = None
        data = self.mapping(raw, _ROUTE_KEYS)
        if data is None:
            return None
        before = len(self.problems)
        for required, expected in (("prefix", "a path prefix such as '/tickets'"), ("upstream", "an http(s):// URL")):
            if required not in data:
                self.fail(required, f"is required: {expected}")
        prefix = self.value(data, "prefix", None, _prefix)
        upstream = self.value(data, "upstream", None, _upstream_url)
        if "name" in data:
            name = self.value(data, "name", None, _route_name_value)
        else:
            name = _route_name(prefix) if prefix is not None else None
        self._last_prefix, self._last_name = prefix, name
        policy, failed = self.route_policy(data)
        failed |= {key for key in self._failed_defaults if key not in data}  # a bad default the route keeps
        # The checks across keys, on the values that were read: one that was not is reported already.
        fields = {**defaults, **policy}
        route = RouteConfig(name=name or "", prefix=prefix or "/", upstream=upstream or URL("http://invalid"), **fields)
        if not {"not_applied_statuses", "ambiguous_statuses"} & failed and (
            overlap := route.not_applied_statuses & route.ambiguous_statuses
        ):
            self.fail("ambiguous_statuses", f"{sorted(overlap)} also listed in not_applied_statuses")
        for key, listed in (
            ("not_applied_statuses", route.not_applied_statuses),
            ("ambiguous_statuses", route.ambiguous_statuses),
        ):
            if key not in failed and (bad := sorted(status for status in listed if status < 400)):
                self.fail(key, f"only 4xx and 5xx statuses can be listed, got {bad}")
        if "side_effect_methods" not in failed and (safe := route.side_effect_methods & SAFE_METHODS):
            self.fail("side_effect_methods", f"{sorted(safe)} are safe methods and are never recorded")
        if not {"lease", "connect_timeout", "read_timeout"} & failed and (
            route.lease_s <= route.connect_timeout_s + route.read_timeout_s
        ):
            inherited = " (from route_defaults)" if "lease" not in data and "lease_s" in defaults else ""
            self.fail(
                "lease",
                f"must exceed connect_timeout + read_timeout "
                f"({route.connect_timeout_s + route.read_timeout_s:g}s), got {route.lease_s:g}s{inherited}",
            )
        if len(self.problems) > before or prefix is None or upstream is None or name is None:
            return None
        return route


_TOP_KEYS = frozenset(
    {
        "listen",
        "admin_listen",
        "metrics_listen",
        "store",
        "headers",
        "routes",
        "route_defaults",
        "log_level",
        "shutdown_grace",
        "log_keys",
        "client_header_timeout",
        "client_body_timeout",
        "max_connections",
        "auth",
        "budgets",
        "allow_unauthenticated_credential_use",
    }
)
_STORE_KEYS = frozenset(
    {
        "url",
        "key_prefix",
        "socket_timeout",
        "max_connections",
        "min_replicas_ack",
        "replica_ack_timeout",
        "allow_eviction",
        "sqlite_synchronous",
    }
)
_HEADER_KEYS = frozenset({"key", "caller", "task"})
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _host_port(value: Any) -> HostPort:
    if not isinstance(value, str):
        raise ValueError(f"expected 'HOST:PORT', got {kind(value)}")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'HOST:PORT' with a port from 1 to 65535, got {value!r}")
    return HostPort(host, int(port))


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {kind(value)}")
    return value.lower()


def _exposed_admin_problem(admin_listen: HostPort) -> str:
    return (
        f"{admin_listen} is not a loopback address, and without 'auth' the operations API "
        "(/_idem/ops: stored answers, resolving operations) would answer anyone who can reach it: "
        "bind admin_listen to 127.0.0.1, or configure 'auth' with an identity that has 'ops: admin' "
        "(docs: Identities); serve health and metrics to the kubelet and Prometheus on metrics_listen"
    )


def _lent_credentials_problem(listen: HostPort, routes: list[str]) -> str:
    named = ", ".join(repr(name) for name in routes[:3]) + (" ..." if len(routes) > 3 else "")
    return (
        f"{listen} is not a loopback address, and without 'auth' anyone who can reach it could call "
        f"route(s) {named} with the credentials their upstream_headers inject, under any caller name: "
        "configure 'auth' (docs: Identities), bind listen to 127.0.0.1 (a sidecar), or, on a network "
        "you trust, set allow_unauthenticated_credential_use: true"
    )


def _store_url(value: Any) -> str:
    expected = (
        "redis://HOST[:PORT][/DB], rediss://..., redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB], "
        "redis+cluster://HOST:PORT[,HOST:PORT...], unix://[[USER]:PASSWORD@]/SOCKET_PATH[?db=DB] or sqlite:///PATH"
    )
    if not isinstance(value, str):
        raise ValueError(f"expected a URL ({expected}), got {kind(value)}")
    if is_redis_url(value) and (missing := missing_redis_client()):
        raise ValueError(missing)
    if is_topology_url(value):
        parse_topology_url(value)  # its ValueError names what is wrong
        return value
    url = URL(value)
    if url.scheme in ("redis", "rediss") and url.host:
        return value
    if url.scheme == "unix":
        return _unix_store_url(url, value, expected)
    if url.scheme == "sqlite" and value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    raise ValueError(f"expected {expected}, got {value!r}")


def _unix_store_url(url: URL, value: str, expected: str) -> str:
    # redis-py would ignore a host silently and connect to the socket anyway: refuse it.
    if url.host:
        raise ValueError(f"a unix:// URL names a socket path, not a host ({url.host!r}): expected {expected}")
    if url.path in ("", "/"):
        raise ValueError("a unix:// URL needs the socket's absolute path, e.g. unix:///run/redis/redis.sock")
    db = url.query.get("db", "0")
    if not db.isdigit():
        raise ValueError(f"db must be a database number, got {db!r}")
    return value


def _sqlite_synchronous(value: Any) -> str:
    if value not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"expected {' or '.join(SQLITE_SYNCHRONOUS_MODES)}, got {kind(value)}")
    return str(value)


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", value):
        raise ValueError(f"expected 1-32 letters, digits, '_', '.' or '-', got {kind(value)}")
    return value


def _header_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"expected an HTTP header name, got {kind(value)}")
    return value


def _header_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of header names, got {kind(value)}")
    return tuple(sorted({_header_name(item).lower() for item in value}))


def _methods(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of HTTP methods, got {kind(value)}")
    methods = set()
    for item in value:
        if not isinstance(item, str) or not _TOKEN.match(item):
            raise ValueError(f"expected HTTP method names, got {kind(item)}")
        methods.add(item.upper())
    if "CONNECT" in methods:
        raise ValueError("CONNECT is never proxied")
    return frozenset(methods)


def _enum(enum: type[KeyMode] | type[DeriveScope] | type[FailureMode]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        try:
            return enum(value)
        except ValueError:
            choices = ", ".join(member.value for member in enum)
            raise ValueError(f"expected one of {choices}, got {kind(value)}") from None

    return convert


def _prefix(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a path prefix such as '/tickets', got {kind(value)}")
    trimmed = value.rstrip("/") or "/"
    segments = trimmed.split("/")
    if not _PREFIX.match(trimmed) or any(segment in (".", "..") for segment in segments):
        raise ValueError(
            f"expected a path prefix such as '/tickets' (no '..', '.', '//', query or percent-escapes), got {value!r}"
        )
    return trimmed


def _route_name(prefix: str) -> str:
    return prefix.strip("/").replace("/", "-") or "root"


def _route_name_value(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(f"expected 1-64 letters, digits, '_', '.' or '-', got {kind(value)}")
    return value


def _upstream_url(value: Any) -> URL:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// or https:// URL, got {kind(value)}")
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if url.query_string or url.fragment or url.user is not None or url.password is not None:
        raise ValueError(f"the upstream URL must not carry a query, fragment or credentials, got {value!r}")
    return url


_NOT_INJECTABLE = frozenset({"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te"})


def _injected_headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of header name to 'env:NAME', 'file:PATH' or a value, got {kind(value)}")
    headers = []
    problems: list[tuple[str, str]] = []  # every header's, each under its name
    for name, ref in value.items():
        try:
            _header_name(name)
            if name.lower() in _NOT_INJECTABLE:
                raise ValueError(f"{name} is framing or hop-by-hop and cannot be injected")
            secret = resolve_secret(ref)
            if any(char in secret for char in "\r\n\0"):
                raise ValueError(f"the value for {name} contains CR, LF or NUL")
        except ValueError as exc:
            problems.append((str(name), str(exc)))
            continue
        headers.append((name, secret))
    if problems:
        raise NestedProblems(problems)
    return tuple(headers)


#: Route policy keys in YAML -> (RouteConfig field, converter).
_ROUTE_POLICY: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "strip_prefix": ("strip_prefix", boolean),
    "side_effect_methods": ("side_effect_methods", _methods),
    "key_mode": ("key_mode", _enum(KeyMode)),
    "derive_scope": ("derive_scope", _enum(DeriveScope)),
    "retention": ("retention_s", positive_duration),
    "wait": ("wait_s", parse_duration),
    "connect_timeout": ("connect_timeout_s", positive_duration),
    "read_timeout": ("read_timeout_s", positive_duration),
    "lease": ("lease_s", positive_duration),
    "max_body": ("max_body", parse_size),
    "max_stored_response": ("max_stored_response", parse_size),
    "max_attempts": ("max_attempts", positive_int),
    "not_applied_statuses": ("not_applied_statuses", statuses),
    "ambiguous_statuses": ("ambiguous_statuses", statuses),
    "on_store_error": ("on_store_error", _enum(FailureMode)),
    "fingerprint_headers": ("fingerprint_headers", _header_list),
    "reconcile": ("reconcile", parse_reconcile),
    "upstream_headers": ("upstream_headers", _injected_headers),
    "mode": ("mode", parse_mode),
    "mcp": ("mcp", parse_mcp),
}
_ROUTE_POLICY_KEYS = frozenset(_ROUTE_POLICY)
_ROUTE_KEYS = _ROUTE_POLICY_KEYS | {"name", "prefix", "upstream"}

"""Store URLs for Redis Sentinel and Redis Cluster, parsed into typed values.

::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?sentinel_password=...]
    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS. The host list names
sentinels (default port 26379) or cluster nodes to discover the cluster from
(default port 6379); the credentials authenticate to the Redis servers holding
the data. Plain ``redis://``, ``rediss://`` and ``unix://`` URLs are not
parsed here: redis-py reads them itself (``is_redis_url`` says which URLs name
a Redis store at all).

Messages never repeat a password.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]*))?$")
_MASTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """Ask ``sentinels`` where the master of ``master_name`` is; connect to it."""

    sentinels: tuple[Address, ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: For sentinels that require a password of their own (``requirepass`` in sentinel.conf).
    sentinel_password: str | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """Discover a Redis Cluster from any of ``nodes``."""

    nodes: tuple[Address, ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis store (any topology, TCP or a Unix socket)."""
    return url.partition("://")[0].lower() in PLAIN_SCHEMES or is_topology_url(url)


#: What ``pip install`` needs for a Redis store: the embedded SQLite store runs without it.
REDIS_EXTRA = "idemproxy[redis]"


def missing_redis_client() -> str | None:
    """A one-line problem when the Redis client packages (the ``redis`` extra) are not installed."""
    missing = [module for module in ("redis", "hiredis") if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (
        f"a Redis store needs the Redis client ({' and '.join(missing)} not installed): "
        f"pip install '{REDIS_EXTRA}', or use the embedded store (sqlite:///PATH)"
    )


def is_topology_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel or Cluster deployment (``parse_topology_url`` reads it)."""
    scheme = url.partition("://")[0].lower()
    return scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES


def parse_topology_url(url: str) -> SentinelUrl | ClusterUrl:
    """The typed form of a ``redis+sentinel://`` or ``redis+cluster://`` URL; ``ValueError`` says what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not is_topology_url(url):
        raise ValueError(f"expected a redis+sentinel:// or redis+cluster:// URL, got {redacted(url)!r}")
    sentinel = scheme in SENTINEL_SCHEMES
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError(f"a store URL has no fragment, got {redacted(url)!r}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    addresses = _addresses(hosts, SENTINEL_PORT if sentinel else CLUSTER_PORT, url)
    options = _options(query, allowed=("sentinel_password",) if sentinel else (), url=url)
    tls = scheme.startswith("rediss")
    if sentinel:
        master_name, db = _master_and_db(path, url)
        return SentinelUrl(addresses, master_name, db, username, password, options.get("sentinel_password"), tls=tls)
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0; remove the path from {redacted(url)!r}")
    return ClusterUrl(addresses, username, password, tls=tls)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon and password else None


def _addresses(hosts: str, default_port: int, url: str) -> tuple[Address, ...]:
    if not hosts:
        raise ValueError(f"expected at least one HOST[:PORT] after '://', got {redacted(url)!r}")
    found: list[Address] = []
    for item in hosts.split(","):
        match = _HOST.match(item.strip())
        if match is None:
            raise ValueError(f"expected HOST[:PORT] items separated by commas, got {item.strip()!r}")
        port_text = match.group("port")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise ValueError(f"expected a port from 1 to 65535, got {item.strip()!r}")
        address = Address(match.group("v6") or match.group("name"), port)
        if address in found:
            raise ValueError(f"{address} is listed twice in the store URL")
        found.append(address)
    return tuple(found)


def _master_and_db(path: str, url: str) -> tuple[str, int]:
    parts = path.strip("/").split("/") if path.strip("/") else []
    if not parts or len(parts) > 2:
        raise ValueError(f"expected redis+sentinel://HOST:PORT[,...]/MASTER_NAME[/DB], got {redacted(url)!r}")
    name = unquote(parts[0])
    if not _MASTER_NAME.match(name):
        raise ValueError(f"expected a master name of letters, digits, '.', '_' or '-', got {name!r}")
    if len(parts) == 1:
        return name, 0
    if not parts[1].isdigit():
        raise ValueError(f"expected a database number after the master name, got {parts[1]!r}")
    return name, int(parts[1])


def _options(query: str, *, allowed: tuple[str, ...], url: str) -> dict[str, str]:
    if not query:
        return {}
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"the store URL's query is malformed: {redacted(url)!r}") from None
    for name, values in parsed.items():
        if name not in allowed:
            expected = f"only {', '.join(allowed)}" if allowed else "no options"
            raise ValueError(f"unknown store URL option {name!r}; this URL takes {expected}")
        if len(values) > 1:
            raise ValueError(f"the store URL option {name!r} is given twice")
    return {name: values[0] for name, values in parsed.items()}


def redacted(url: str) -> str:
    """Any store URL without its passwords (userinfo, ``sentinel_password``), for messages and logs."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hosts}"
    redacted = f"{scheme}{sep}{netloc}{slash}{tail}"
    return re.sub(r"(sentinel_password=)[^&#]*", r"\1***", redacted)

"""The Redis clients a store URL names (``redis_urls``): redis-py's pooled
client for the topology, plus the multiplexed hot-path connection
(``redis_mux``) where it applies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.event import EventDispatcher

from idemproxy.config.redis_urls import Address, SentinelUrl, is_topology_url, parse_topology_url
from idemproxy.store.redis_mux import Endpoint, Locate, Login, RedisMux, locate_fixed

Client = aioredis.Redis | RedisCluster
NodeClient = Callable[[Address], aioredis.Redis]


@dataclass(frozen=True, slots=True)
class Clients:
    client: Client
    mux: RedisMux | None = None
    sentinel: Sentinel | None = None
    master_name: str | None = None
    #: Cluster: a plain client for one node (pub/sub).
    node_client: NodeClient | None = None
    #: Cluster: the client's event dispatcher (refreshes of its slots).
    cluster_events: EventDispatcher | None = None


def _retry() -> Retry:
    # Both scripts recognise a retried call by its owner, so retrying after a
    # lost reply never creates or applies anything twice.
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection, as the plain client's pool does."""


class _Sentinel(Sentinel):
    """One master lookup at a time.

    redis-py's ``discover_master`` moves the sentinel that answered to the front
    of its list by index across an ``await``; concurrent lookups (every new
    connection makes one, and a failover makes many) then duplicate one
    sentinel in the list and drop another, with its open connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lookup = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        async with self._lookup:
            return await super().discover_master(service_name)


def open_clients(url: str, *, socket_timeout_s: float, max_connections: int) -> Clients:
    """The clients for ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or ``redis+cluster://``."""
    timeouts: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    options: dict[str, Any] = {
        **timeouts,
        "retry": _retry(),
        "health_check_interval": 30,
        "protocol": 2,  # RESP2 works with every Redis 5+ and managed service
    }
    if not is_topology_url(url):
        # Requests beyond the pool wait for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout_s, **options
        )
        return Clients(aioredis.Redis.from_pool(pool), mux=plain_mux(url, socket_timeout_s))
    parsed = parse_topology_url(url)
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password, "ssl": parsed.tls}
    if isinstance(parsed, SentinelUrl):
        sentinel = _Sentinel(
            [(address.host, address.port) for address in parsed.sentinels],
            # No retries: a sentinel that does not answer is skipped for the next one
            # (redis-py's default would back off for seconds first).
            sentinel_kwargs={
                **timeouts,
                "retry": Retry(NoBackoff(), retries=0),
                "password": parsed.sentinel_password,
                "ssl": parsed.tls,
            },
        )
        client = sentinel.master_for(
            parsed.master_name,
            connection_pool_class=_BlockingSentinelPool,
            db=parsed.db,
            max_connections=max_connections,
            timeout=socket_timeout_s,
            **auth,
            **options,
        )
        # No multiplexed connection yet: the failover tests once hung with it (1 run in ~30,
        # not reproduced since), so Sentinel stays on redis-py's pool, which follows failovers.
        return Clients(client, sentinel=sentinel, master_name=parsed.master_name)

    def node_client(address: Address) -> aioredis.Redis:
        return aioredis.Redis(host=address.host, port=address.port, **auth, **options)

    events = EventDispatcher()
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(address.host, address.port) for address in parsed.nodes],
        max_connections=max_connections,
        event_dispatcher=events,
        **auth,
        **options,
    )
    return Clients(cluster, node_client=node_client, cluster_events=events)


def plain_mux(url: str, timeout_s: float) -> RedisMux | None:
    """The multiplexed connection for a ``redis://`` or ``unix://`` URL
    (``rediss://`` stays on redis-py's pooled TLS connections)."""
    options: dict[str, Any] = dict(parse_redis_url(url))
    connection_class = options.get("connection_class")
    if connection_class is SSLConnection:
        return None
    if connection_class is UnixDomainSocketConnection:
        locate: Locate = locate_fixed(Endpoint(unix_path=options["path"]))
    else:
        locate = locate_fixed(Endpoint(host=options.get("host", "localhost"), port=options.get("port", 6379)))
    login = Login(options.get("username"), options.get("password"), int(options.get("db", 0)))
    return RedisMux(locate, login, timeout_s=timeout_s)

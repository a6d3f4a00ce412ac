"""Change notifications between processes over Redis pub/sub.

Every transition script publishes on its operation's channel; a process
subscribes to the channels of the operations its waiting duplicates watch,
on one connection read by one listener task. A permanent keep-alive
subscription keeps that connection in pub/sub mode. When the connection
fails, every waiter is woken to re-read the record rather than miss a change
(they also poll, as a safety net). Cluster: the connection goes to one node
(``PUBLISH`` reaches every node) and moves to the next when that one fails.
Sentinel: it follows the master when the store sees a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from idemproxy.config.redis_urls import Address
from idemproxy.store.redis_clients import Client, NodeClient
from idemproxy.store.redis_schema import RedisKeys

log = logging.getLogger(__name__)

_RECONNECT_DELAY_S = 0.5
#: How long a new subscription waits for the server's confirmation before its
#: waiter goes on without it (and polls).
_CONFIRM_TIMEOUT_S = 0.5


class ChangeFeed:
    """Wakes this process's waiters when another process changes their records."""

    def __init__(
        self,
        client: Client,
        keys: RedisKeys,
        *,
        node_client: NodeClient | None,
        watched: Callable[[], Iterable[str]],
        notify: Callable[[str], None],
    ) -> None:
        self.keys = keys
        self._client = client
        self._node_client = node_client
        self._watched = watched
        self._notify = notify
        self._pubsub: PubSub | None = None
        self._node_connection: aioredis.Redis | None = None  # cluster: the node connection's client
        self._turn = random.randrange(1 << 16)  # spread processes' listeners over the nodes
        self._lock = asyncio.Lock()  # one connect/subscribe at a time
        self._keepalive_subscribed = False
        self._master_moved = False
        #: Subscriptions waiting for the server's confirmation, by channel.
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._pubsub = self._new_pubsub()
        # Connect before anyone can subscribe: redis-py's PubSub does not guard
        # against two concurrent first connects, and a subscription made on
        # the losing connection would never be read.
        await self._subscribe_keepalive()
        self._listener = asyncio.create_task(self._listen(), name="idemproxy-redis-pubsub")

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._listener
        await self._close_pubsub()

    def follow_master(self) -> None:
        """Sentinel: the master moved; the listener moves its connection between two reads."""
        self._master_moved = True

    def _wake_all(self) -> None:
        for op_id in list(self._watched()):
            self._notify(op_id)

    async def _follow_new_master(self) -> None:
        """Sentinel: move the pub/sub connection to the new master, then let
        waiters re-read what they may have missed meanwhile."""
        assert self._pubsub is not None
        try:
            async with self._lock:
                connection: AbstractConnection | None = self._pubsub.connection
                if connection is not None:
                    await connection.disconnect()
                    await connection.connect()  # type: ignore[no-untyped-call]  # asks the sentinels, resubscribes
        except (RedisError, OSError) as exc:
            log.warning("pub/sub could not follow the new master yet", extra={"error": str(exc)})
        self._wake_all()

    def _new_pubsub(self) -> PubSub:
        if self._node_client is None:
            return self._client.pubsub()  # the listener wants subscribe confirmations
        assert isinstance(self._client, RedisCluster)
        # Any node will do: a PUBLISH reaches every node of the cluster.
        nodes = self._client.get_nodes() or list(self._client.nodes_manager.startup_nodes.values())
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        self._node_connection = self._node_client(Address(node.host, int(node.port)))
        return self._node_connection.pubsub()

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        if self._node_connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._node_connection.aclose()

    async def _move(self) -> None:
        """Cluster: listen on the next node; its first subscription brings the watched channels along."""
        async with self._lock:
            await self._close_pubsub()
            self._pubsub = self._new_pubsub()
            self._keepalive_subscribed = False

    async def _subscribe_keepalive(self) -> None:
        """A permanent subscription keeps the connection in pub/sub mode while
        no operation is being waited for."""
        assert self._pubsub is not None
        try:
            async with self._lock:
                # After a move to another node, the watched channels too.
                channels = [self.keys.channel(op_id) for op_id in self._watched()]
                await self._pubsub.subscribe(self.keys.keepalive_channel(), *channels)
            self._keepalive_subscribed = True
        except (RedisError, OSError) as exc:
            log.warning("pub/sub unavailable; waiters will poll until it connects", extra={"error": str(exc)})

    async def subscribe(self, op_id: str) -> None:
        """Subscribe, and wait (briefly) until the server confirms it.

        Until then a change published through another connection can be
        processed first and its notification missed: Redis orders commands per
        connection only, and the waiter reads the record right after this."""
        if self._pubsub is None:
            return
        channel = self.keys.channel(op_id)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel.encode()] = confirmed
        try:
            # Bounded as a whole: while the pub/sub connection reconnects (a failover),
            # subscribing itself can wait on it, and a waiter must never hang on pub/sub.
            async with asyncio.timeout(_CONFIRM_TIMEOUT_S):
                async with self._lock:
                    await self._pubsub.subscribe(channel)
                await confirmed
        except TimeoutError:
            log.warning("pub/sub subscription not confirmed in time; waiters will poll", extra={"op": op_id})
        except Exception as exc:  # a waiter must never fail because of pub/sub
            # Also RuntimeError: while the listener reconnects, redis-py lets two
            # coroutines read the one pub/sub connection. Waiters fall back to polling.
            log.warning("pub/sub subscribe failed, waiters will poll", extra={"error": repr(exc)})
        finally:
            del self._confirmations[channel.encode()]

    async def unsubscribe(self, op_id: str) -> None:
        if self._pubsub is None:
            return
        try:
            async with asyncio.timeout(_CONFIRM_TIMEOUT_S), self._lock:
                await self._pubsub.unsubscribe(self.keys.channel(op_id))
        except Exception as exc:  # see subscribe; a stray subscription is harmless (TimeoutError too)
            log.warning("pub/sub unsubscribe failed", extra={"error": repr(exc)})

    async def _listen(self) -> None:
        assert self._pubsub is not None
        prefix = self.keys.channel_prefix.encode()
        while not self._closed:
            if self._master_moved:
                self._master_moved = False
                await self._follow_new_master()
            if not self._keepalive_subscribed:
                await self._subscribe_keepalive()
                if not self._keepalive_subscribed:
                    await asyncio.sleep(_RECONNECT_DELAY_S)
                    continue
            try:
                # A bounded read rather than listen(): redis-py's blocking read
                # does not end promptly when its task is cancelled.
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost, reconnecting", extra={"error": str(exc)})
                self._wake_all()  # let waiters re-read rather than miss a change
                if self._node_client is not None:
                    await self._move()  # the node may be gone for good (a cluster failover)
                await asyncio.sleep(_RECONNECT_DELAY_S)
                continue
            if message is not None and message["type"] == "subscribe":
                confirmed = self._confirmations.get(message["channel"])
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message is not None and message["type"] == "message":
                channel: bytes = message["channel"]
                if channel.startswith(prefix):
                    self._notify(channel[len(prefix) :].decode())

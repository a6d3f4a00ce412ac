"""Change notifications between processes over Redis pub/sub.

Every transition script publishes on its operation's channel; a process
subscribes to the channels of the operations its waiting duplicates watch,
on one connection read by one listener task. A permanent keep-alive
subscription keeps that connection in pub/sub mode. When the connection
fails, every waiter is woken to re-read the record rather than miss a change
(they also poll, as a safety net). Cluster: the connection goes to one node
(``PUBLISH`` reaches every node) and moves to the next when that one fails.
Sentinel: it follows the master when the store sees a failover.

One connection, one reader, one connector. redis-py's ``PubSub`` reconnects
its connection in place from whichever coroutine finds it broken (a
subscribe, or the read), and two reconnects of one connection at once leave
two coroutines reading one socket ("read() called while another coroutine is
already waiting for incoming data") and the other socket open, never closed.
So here a broken connection is never reconnected: the listener task closes
the whole ``PubSub`` and opens a fresh one, subscribed to every channel
watched by then (``_open``). Only the listener connects and reads; a subscribe
or unsubscribe only writes, only to a connected connection, and never waits
on redis-py's reconnect. Every await on the connection is bounded.
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
from redis.exceptions import ConnectionError as RedisConnectionError

from idemproxy import background
from idemproxy.config.redis_urls import Address
from idemproxy.store.redis_clients import Client, NodeClient
from idemproxy.store.redis_schema import RedisKeys

log = logging.getLogger(__name__)

_RECONNECT_DELAY_S = 0.5
#: How long a new subscription waits for the server's confirmation before its
#: waiter goes on without it (and polls).
_CONFIRM_TIMEOUT_S = 0.5
#: One read waits this long at most for a message (then checks whether to move).
_READ_TIMEOUT_S = 1.0
#: Opening a connection takes, each at most one socket timeout: up to three sentinels
#: asked for the master, the connect, its handshake, the first subscription.
_OPEN_TIMEOUTS = 6
#: ``PING`` the server after this long without a message (a write to a connection a
#: NAT or load balancer dropped fails, and the listener then opens a fresh one).
_HEALTH_CHECK_S = 30.0
_HEALTH_CHECK = b"idemproxy-health-check"


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
        timeout_s: float = 2.0,
    ) -> None:
        self.keys = keys
        self._client = client
        self._node_client = node_client
        self._watched = watched
        self._notify = notify
        self._open_timeout_s = _OPEN_TIMEOUTS * timeout_s
        #: The open pub/sub, subscribed to the keep-alive channel; ``None`` while there is none.
        self._pubsub: PubSub | None = None
        self._node_connection: aioredis.Redis | None = None  # cluster: the node connection's client
        self._turn = random.randrange(1 << 16)  # spread processes' listeners over the nodes
        #: Held while the connection is replaced or written to: a write never meets a half-open one.
        self._lock = asyncio.Lock()
        self._reopen = False
        #: Subscriptions waiting for the server's confirmation, by channel.
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._next_ping = 0.0
        self._closed = False

    async def start(self) -> None:
        await self._open()  # a first try; the listener keeps trying
        self._listener = asyncio.create_task(self._listen(), name="idemproxy-redis-pubsub")

    async def close(self) -> None:
        self._closed = True
        await background.stop(self._listener)
        async with self._lock:
            await self._discard()

    def follow_master(self) -> None:
        """Sentinel: the master moved; the listener opens a connection to the new one
        after its current read (within ``_READ_TIMEOUT_S``)."""
        self._reopen = True

    def _wake_all(self) -> None:
        for op_id in list(self._watched()):
            self._notify(op_id)

    # -- the connection: opened, read and closed by the listener only (and by close) ---------------------

    def _new_pubsub(self) -> PubSub:
        if self._node_client is None:
            return self._client.pubsub()  # behind Sentinel, its pool asks the sentinels for the master
        assert isinstance(self._client, RedisCluster)
        # Any node will do: a PUBLISH reaches every node of the cluster.
        nodes = self._client.get_nodes() or list(self._client.nodes_manager.startup_nodes.values())
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        self._node_connection = self._node_client(Address(node.host, int(node.port)))
        return self._node_connection.pubsub()

    async def _open(self) -> bool:
        """Replace the pub/sub connection with a fresh one, subscribed to the keep-alive
        channel and every channel watched by now; ``False`` (logged) when that failed."""
        try:
            async with self._lock:
                await self._discard()
                # Set at once: a subscriber waits for the lock from here on, and then
                # subscribes on this connection (or finds it gone).
                pubsub = self._pubsub = self._new_pubsub()
                try:
                    async with asyncio.timeout(self._open_timeout_s):
                        await pubsub.connect()  # type: ignore[no-untyped-call]  # a connected connection from the pool
                        channels = [self.keys.channel(op_id) for op_id in self._watched()]
                        await _connection(pubsub).send_command(
                            "SUBSCRIBE", self.keys.keepalive_channel(), *channels, check_health=False
                        )
                except BaseException as failed:  # named: mypyc loses a bare raise's exception across an await
                    await self._discard()
                    raise failed
                self._next_ping = asyncio.get_running_loop().time() + _HEALTH_CHECK_S
            return True
        except Exception as exc:  # RedisError, OSError, TimeoutError, and the client's own failures
            log.warning("pub/sub unavailable; waiters will poll until it connects", extra={"error": repr(exc)})
            return False

    async def _discard(self) -> None:
        """Close the current connection, if any (under ``_lock``)."""
        pubsub, self._pubsub = self._pubsub, None
        node_connection, self._node_connection = self._node_connection, None
        if pubsub is not None:
            await _close(pubsub, node_connection)

    async def _read(self) -> object:
        """The next reply on the connection, or ``None`` when none came in time. Never
        reconnects: a connection that is broken or closed raises ``RedisError``."""
        pubsub = self._pubsub
        if pubsub is None:
            raise RedisConnectionError("no pub/sub connection")
        connection = _connection(pubsub)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_ping:
            self._next_ping = loop.time() + _HEALTH_CHECK_S
            await self._send("PING", _HEALTH_CHECK)  # its answer is read below, and ignored
        # Straight from the connection: PubSub.get_message would reconnect it in place.
        reply: object = await connection.read_response(timeout=_READ_TIMEOUT_S, disconnect_on_error=True)
        if reply is not None:
            self._next_ping = loop.time() + _HEALTH_CHECK_S
        return reply

    async def _listen(self) -> None:
        prefix = self.keys.channel_prefix.encode()
        while not self._closed:
            if self._pubsub is None or self._reopen:
                self._reopen = False
                if not await self._open():
                    await asyncio.sleep(_RECONNECT_DELAY_S)
                    continue
                self._wake_all()  # let waiters re-read what they may have missed meanwhile
            try:
                reply = await self._read()
            except Exception as exc:  # this task must outlive any one failure of the connection
                log.warning("pub/sub connection lost, reconnecting", extra={"error": repr(exc)})
                async with self._lock:
                    await self._discard()  # the next connection goes to the next node (cluster)
                self._wake_all()  # let waiters re-read rather than miss a change
                await asyncio.sleep(_RECONNECT_DELAY_S)
                continue
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            kind, channel = reply[0], reply[1]
            if kind == b"subscribe":
                confirmed = self._confirmations.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif kind == b"message" and isinstance(channel, bytes) and channel.startswith(prefix):
                self._notify(channel[len(prefix) :].decode())

    # -- subscriptions: written by any coroutine, confirmed by the listener -----------------

    async def _send(self, *command: str | bytes) -> bool:
        """Write ``command`` on the open connection; ``False`` when none is open (the next one
        subscribes every watched channel). A failed write closes the connection; the
        listener's read then fails and it opens another."""
        if self._pubsub is None:
            return False  # not worth waiting for the lock
        async with self._lock:
            connection: AbstractConnection | None = None if self._pubsub is None else self._pubsub.connection
            if connection is None or not connection.is_connected:
                return False  # or redis-py would reconnect it here, under the listener's read
            await connection.send_command(*command, check_health=False)
            return True

    async def subscribe(self, op_id: str) -> None:
        """Subscribe, and wait (briefly) until the server confirms it.

        Until then a change published through another connection can be
        processed first and its notification missed: Redis orders commands per
        connection only, and the waiter reads the record right after this."""
        channel = self.keys.channel(op_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CONFIRM_TIMEOUT_S
        confirmed = loop.create_future()
        self._confirmations[channel.encode()] = confirmed
        try:
            async with asyncio.timeout_at(deadline):
                sent = await self._send("SUBSCRIBE", channel)
            if sent:
                # Not under the timeout above: on Python 3.11 asyncio.wait_for (redis-py's
                # write) can swallow the cancellation that ends it, and this wait must end anyway.
                await asyncio.wait((confirmed,), timeout=max(0.0, deadline - loop.time()))
                if not confirmed.done():
                    log.warning("pub/sub subscription not confirmed in time; waiters will poll", extra={"op": op_id})
        except TimeoutError:
            log.warning("pub/sub subscription not sent in time; waiters will poll", extra={"op": op_id})
        except Exception as exc:  # a waiter must never fail because of pub/sub
            log.warning("pub/sub subscribe failed, waiters will poll", extra={"error": repr(exc)})
        finally:
            del self._confirmations[channel.encode()]

    async def unsubscribe(self, op_id: str) -> None:
        try:
            async with asyncio.timeout(_CONFIRM_TIMEOUT_S):
                await self._send("UNSUBSCRIBE", self.keys.channel(op_id))
        except Exception as exc:  # see subscribe; a stray subscription is harmless (TimeoutError too)
            log.warning("pub/sub unsubscribe failed", extra={"error": repr(exc)})


def _connection(pubsub: PubSub) -> AbstractConnection:
    connection: AbstractConnection | None = pubsub.connection
    if connection is None:
        raise RedisConnectionError("the pub/sub connection is closed")
    return connection


async def _close(pubsub: PubSub, node_connection: aioredis.Redis | None) -> None:
    """Close ``pubsub``'s connection (and the cluster node client it came from): its socket is
    closed at once, and the connection returned to its pool."""
    with contextlib.suppress(Exception):
        await pubsub.aclose()
    if node_connection is not None:
        with contextlib.suppress(Exception):
            await node_connection.aclose()

"""The Redis ledger: one Lua script per transition, one round trip each.

One class serves a single Redis, a Sentinel-managed master and a Redis
Cluster; ``RedisStore.from_url`` builds the client the URL names. Every key of
one operation shares a hash tag (``redis_schema``), so each script runs on the
one node that owns the operation. What differs per topology:

- Sentinel: the pool asks the sentinels for the master on every new
  connection; a write that reaches a demoted master (``READONLY``) drops the
  connection and is retried against the new one, or fails as
  ``StoreUnavailable``: never a forward without a record.
- Cluster: index scans are pipelines split per node (not transactions);
  change notifications come from a plain connection to one node (``PUBLISH``
  is broadcast over the cluster bus), moved to another node when it fails.

A failover (the sentinels name another master; redis-py finds other masters in the
cluster) calls ``on_ledger_moved``: the promoted replica may lack acknowledged writes.

With ``min_replicas_ack`` a reservation counts only once that many replicas
acknowledged it (``WAIT`` on the connection that wrote it); otherwise it is
released again and the caller gets ``StoreUnavailable``. Not set, it is 1 for
Sentinel and Cluster, and for a plain Redis whose master reports connected
replicas when the store starts; 0 otherwise.

Every master holding ledger keys must not evict them (``redis_safety``): the
store reads each one's ``maxmemory-policy`` when it starts, refusing any but
``noeviction`` (``StoreUnsafe``) unless ``allow_eviction``, and again every 30 s
while it runs (``hazards``, which fail ``/readyz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.event import AsyncAfterSlotsCacheRefreshEvent, AsyncEventListenerInterface, EventDispatcher
from redis.exceptions import NoScriptError, RedisError

from idemproxy import background
from idemproxy.lifecycle.records import Evidence, OperationRecord, State
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store import redis_record
from idemproxy.store.base import (
    Counter,
    Full,
    Hazard,
    Lease,
    NotDurable,
    OpsQuery,
    RecordMissing,
    Store,
    StoreError,
    StoreUnavailable,
    StoreUnsafe,
    matches,
)
from idemproxy.store.redis_clients import Client, NodeClient, open_clients
from idemproxy.store.redis_errors import RedisConnectionError, RedisReplyError
from idemproxy.store.redis_mux import RedisMux
from idemproxy.store.redis_pubsub import ChangeFeed
from idemproxy.store.redis_safety import NodeSettings, Verdict, read_node
from idemproxy.store.redis_schema import (
    CHARGE,
    COUNT_IN_EVERY_SHARD,
    DUE_IN_EVERY_SHARD,
    INDEXED_STATES,
    NOTE,
    RENEW,
    RESERVE,
    SWAP_MARKER,
    TRANSITION,
    UNRESERVE,
    RedisKeys,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Sentinel: how often the sentinels are asked which node is the master.
_MASTER_CHECK_S = 0.5
#: How often the masters' settings are read again (a ``CONFIG SET`` at run time).
SAFETY_CHECK_S = 30.0
#: ... and how soon again after a check found a master unreachable.
_SAFETY_RETRY_S = 1.0


class RedisStore(Store):
    #: Pub/sub carries notifications between processes; polling is only a
    #: safety net for messages lost while the subscriber reconnects.
    poll_interval_s = 1.0

    def __init__(
        self,
        client: Client,
        *,
        key_prefix: str = "idem",
        min_replicas_ack: int | None = None,
        replica_ack_timeout_s: float = 1.0,
        node_client: NodeClient | None = None,
        max_connections: int = 64,
        socket_timeout_s: float = 2.0,
        sentinel: Sentinel | None = None,
        master_name: str | None = None,
        mux: RedisMux | None = None,
        allow_eviction: bool = False,
        safety_check_interval_s: float = SAFETY_CHECK_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        cluster_events: EventDispatcher | None = None,
    ) -> None:
        """Prefer ``from_url``. A ``RedisCluster`` client needs ``node_client``
        (a plain client for one node, for pub/sub), and tells a failover through
        ``cluster_events``, the event dispatcher it was made with (without it, a failover
        does not call ``on_ledger_moved``); a ``master_for`` client, the
        ``sentinel`` it came from and the ``master_name``. With ``mux``, the
        per-request commands share its one multiplexed connection; everything
        else (and ``WAIT``) uses ``client``.

        ``min_replicas_ack=None``: 1 for Sentinel and Cluster; for a plain
        Redis, decided by ``start``. ``allow_eviction``: start although a master
        may evict records (reported, not refused). The settings are read again
        every ``safety_check_interval_s``, waiting with ``sleep``."""
        super().__init__()
        if isinstance(client, RedisCluster) and node_client is None:
            raise ValueError("a RedisCluster client needs node_client for its pub/sub connection")
        self.keys = RedisKeys(key_prefix)
        if min_replicas_ack is None and (sentinel is not None or isinstance(client, RedisCluster)):
            min_replicas_ack = 1  # replicated by design: a failover must not lose a forwarded reservation
        #: ``None`` until ``start`` asked a plain Redis whether it has replicas.
        self.min_replicas_ack = min_replicas_ack
        self.replica_ack_timeout_s = replica_ack_timeout_s
        self._verdict = Verdict(allow_eviction=allow_eviction)
        self._safety_interval_s = safety_check_interval_s
        self._sleep = sleep
        self._safety_watch: asyncio.Task[None] | None = None
        self._redis = client
        self._mux = mux
        self._sentinel = sentinel
        self._master_name = master_name
        self._master_watch: asyncio.Task[None] | None = None
        # The cluster client fails (instead of waiting) when a node's pool is
        # exhausted; a store call holds at most one connection per node.
        self._gate = asyncio.Semaphore(max_connections) if isinstance(client, RedisCluster) else None
        self._gate_timeout_s = socket_timeout_s
        self._reserve = client.register_script(RESERVE)
        self._transition = client.register_script(TRANSITION)
        self._renew = client.register_script(RENEW)
        self._note = client.register_script(NOTE)
        self._due_in_every_shard = client.register_script(DUE_IN_EVERY_SHARD)
        self._count_in_every_shard = client.register_script(COUNT_IN_EVERY_SHARD)
        self._feed = ChangeFeed(
            client,
            self.keys,
            node_client=node_client,
            watched=lambda: self._watchers,
            notify=self._notify_local,
            timeout_s=socket_timeout_s,
        )
        if isinstance(client, RedisCluster) and cluster_events is not None:
            watch = _MastersWatch(client, self._cluster_masters_changed)
            cluster_events.register_listeners({AsyncAfterSlotsCacheRefreshEvent: [watch]})
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "idem",
        socket_timeout_s: float = 2.0,
        max_connections: int = 64,
        min_replicas_ack: int | None = None,
        replica_ack_timeout_s: float = 1.0,
        allow_eviction: bool = False,
        safety_check_interval_s: float = SAFETY_CHECK_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> RedisStore:
        """A store for ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
        ``redis+cluster://`` (``redis_urls``)."""
        clients = open_clients(url, socket_timeout_s=socket_timeout_s, max_connections=max_connections)
        return cls(
            clients.client,
            key_prefix=key_prefix,
            min_replicas_ack=min_replicas_ack,
            replica_ack_timeout_s=replica_ack_timeout_s,
            node_client=clients.node_client,
            max_connections=max_connections,
            socket_timeout_s=socket_timeout_s,
            sentinel=clients.sentinel,
            master_name=clients.master_name,
            mux=clients.mux,
            allow_eviction=allow_eviction,
            safety_check_interval_s=safety_check_interval_s,
            sleep=sleep,
            cluster_events=clients.cluster_events,
        )

    async def start(self) -> None:
        """Connect, and check the masters' settings: ``StoreUnsafe`` (the store
        closed again) when one may evict records and ``allow_eviction`` is off."""
        if isinstance(self._redis, RedisCluster):
            try:
                await self._redis.initialize()  # learn the nodes, for the pub/sub connection
            except (RedisError, OSError) as exc:
                log.warning("redis cluster unreachable at start; will retry", extra={"error": str(exc)})
        await self._check_at_start()
        with contextlib.suppress(StoreUnavailable):  # unreachable: the first reservation reads it
            await self.read_clock()
        await self._feed.start()
        if self._sentinel is not None:
            self._master_watch = asyncio.create_task(self._follow_master(), name="idemproxy-redis-sentinel")
        self._safety_watch = asyncio.create_task(self._recheck_safety(), name="idemproxy-redis-safety")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await background.stop(self._master_watch, self._safety_watch)
        await self._feed.close()
        if self._mux is not None:
            await self._mux.close()
        # Each step on its own: a connection that fails to close must not keep the rest open.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._sentinel.aclose()

    # -- the contract ------------------------------------------------------------------

    async def reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        args: list[Any] = [
            record.op_id,
            record.owner,
            record.lease_until_ms,
            redis_record.pack(record, redis_record.pack_evidence(evidence)),
            record.updated_ms,
        ]
        sent = time.monotonic()
        reply, acked = await self._run(self._reserve, self.keys.script_keys(record.op_id), args, durable=True)
        self.clock.observe(reply[1], sent, time.monotonic())
        if reply[0] == 1:
            self._check_durable(acked)
            return None
        return redis_record.unpack(record.op_id, reply[2], with_evidence=False)

    async def transition(self, transition: Transition) -> OperationRecord | None:
        new = transition.new
        args: list[Any] = [
            new.op_id,
            transition.expect_fence,
            " " + " ".join(sorted(transition.expect_states)) + " ",
            new.state.value,
            new.fence,
            new.owner,
            transition.ttl_ms,
            transition.due_at_ms,
            redis_record.pack_evidence(transition.evidence),
            self.keys.channel(new.op_id),
            INDEXED_STATES.index(new.state) + 3 if new.state in INDEXED_STATES else 0,
            new.updated_ms,
            redis_record.pack_head(new),
            "1" if transition.after_the_lease else "0",
        ]
        # A transition to PENDING is a take-over: a new attempt is reserved.
        durable = new.state is State.PENDING
        sent = time.monotonic()
        reply, acked = await self._run(self._transition, self.keys.script_keys(new.op_id), args, durable=durable)
        self.clock.observe(reply[1], sent, time.monotonic())
        if reply[0] == 1:
            self._notify_local(new.op_id)
            if durable:
                self._check_durable(acked)
            return None
        if reply[0] == -1:
            raise RecordMissing(new.op_id)
        return redis_record.unpack(new.op_id, reply[2], with_evidence=False)

    async def get(self, op_id: str) -> OperationRecord | None:
        key = self.keys.record(op_id)
        if self._mux is not None:
            value = await self._muxed("GET", key)
        else:
            value = await self._call(lambda: self._redis.get(key))
        return redis_record.unpack(op_id, value) if value is not None else None

    async def renew(self, leases: list[Lease]) -> list[bool]:
        if not leases:
            return []
        sent = time.monotonic()
        if self._mux is not None:
            replies = await asyncio.gather(
                *(
                    self._muxed_script(
                        self._renew,
                        [self.keys.record(lease.op_id), self.keys.due(lease.op_id)],
                        [lease.op_id, lease.fence, lease.owner, lease.term_ms],
                    )
                    for lease in leases
                )
            )
        else:

            async def run() -> list[Any]:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for lease in leases:
                        keys = [self.keys.record(lease.op_id), self.keys.due(lease.op_id)]
                        args = (lease.op_id, lease.fence, lease.owner, lease.term_ms)
                        pipe.execute_command("EVALSHA", self._renew.sha, len(keys), *keys, *args)
                    return await pipe.execute()

            replies = await self._call(lambda: self._loading(self._renew, run))
        received = time.monotonic()
        for now in replies:
            if now:
                self.clock.observe(int(now), sent, received)
                break
        return [bool(now) for now in replies]

    async def note(self, op_id: str, evidence: Evidence) -> bool:
        keys = [self.keys.record(op_id)]
        args = [redis_record.pack_evidence(evidence)]
        if self._mux is not None:
            return bool(await self._muxed_script(self._note, keys, args))
        return bool(await self._call(lambda: self._note(keys=keys, args=args)))

    async def due(self, now_ms: int, limit: int) -> list[str]:
        if not isinstance(self._redis, RedisCluster):  # one script over every shard, not 256 commands each second
            found, _ = await self._run(self._due_in_every_shard, self.keys.due_shards(), [now_ms, limit], durable=False)
            due = [(float(score), _text(op_id)) for op_id, score in zip(found[::2], found[1::2], strict=True)]
        else:  # the shards' indexes are on several masters

            async def run() -> list[Any]:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for shard in self.keys.due_shards():
                        pipe.zrangebyscore(shard, "-inf", now_ms, start=0, num=limit, withscores=True)
                    return await pipe.execute()

            due = [(score, _text(op_id)) for shard in await self._call(run) for op_id, score in shard]
        return [op_id for _, op_id in sorted(due)[:limit]]

    async def query(self, query: OpsQuery) -> list[OperationRecord]:
        if query.state in INDEXED_STATES:
            assert query.state is not None
            op_ids = await self._indexed(query.state, query.updated_before_ms)
        else:
            op_ids = await self._scan(query.limit * 20)
        records = await self._get_many(op_ids)
        matching = [record for record in records if matches(record, query)]
        matching.sort(key=lambda record: record.updated_ms, reverse=True)
        return matching[: query.limit]

    async def count_unresolved(self) -> dict[State, int]:
        shards = self.keys.every_state_shard()
        if not isinstance(self._redis, RedisCluster):  # one script over every shard
            counted, _ = await self._run(self._count_in_every_shard, shards, [len(INDEXED_STATES)], durable=False)
            return {state: int(count) for state, count in zip(INDEXED_STATES, counted, strict=True)}

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.zcard(shard)
                return await pipe.execute()

        counts = await self._call(run)
        per_state = len(counts) // len(INDEXED_STATES)
        return {state: sum(counts[i * per_state : (i + 1) * per_state]) for i, state in enumerate(INDEXED_STATES)}

    async def read_clock(self) -> None:
        sent = time.monotonic()
        if self._mux is not None:
            seconds, micros = await self._muxed("TIME")
        else:
            seconds, micros = await self._call(self._redis.time)
        self.clock.observe(int(seconds) * 1000 + int(micros) // 1000, sent, time.monotonic())

    async def ping(self) -> None:
        if self._mux is not None:
            await self._muxed("PING")
        await self._call(self._redis.ping)

    async def _indexed(self, state: State, updated_before_ms: int | None) -> list[str]:
        upper = updated_before_ms if updated_before_ms is not None else "+inf"

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for shard in self.keys.state_shards(state):
                    pipe.zrangebyscore(shard, "-inf", upper)
                return await pipe.execute()

        return [_text(op_id) for shard in await self._call(run) for op_id in shard]

    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        return sorted(await self._scan(limit, prefix))

    async def _scan(self, bound: int, id_prefix: str = "") -> list[str]:
        """At most ``bound`` op ids (starting with ``id_prefix``) from a SCAN (of every master,
        in a cluster): for operators only."""
        marker = ":op:"

        async def run() -> list[str]:
            found: list[str] = []
            async for key in self._redis.scan_iter(match=self.keys.record_pattern(id_prefix), count=1000):
                found.append(_text(key).rsplit(marker, 1)[1])
                if len(found) >= bound:
                    break
            return found

        return await self._call(run)

    async def _get_many(self, op_ids: list[str]) -> list[OperationRecord]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for op_id in op_ids:
                    pipe.get(self.keys.record(op_id))
                return await pipe.execute()

        replies = await self._call(run)
        return [
            redis_record.unpack(op_id, value) for op_id, value in zip(op_ids, replies, strict=True) if value is not None
        ]

    # -- scripts and replica acknowledgments -------------------------------------------

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any], *, durable: bool) -> tuple[Any, int]:
        """``script``'s reply, and how many replicas acknowledged it when
        ``durable`` and ``min_replicas_ack`` ask for a ``WAIT`` (else 0).

        ``WAIT`` vouches for the writes of its own connection. A call redis-py
        retried after a lost reply finds the record already written by the lost
        call and writes nothing, so its ``WAIT`` proves less: the one gap,
        documented in the README."""
        if durable and self.min_replicas_ack is None:  # a plain Redis that did not answer at start
            self._settle_replicas_ack(await self._read_settings())
        if not durable or not self.min_replicas_ack:
            if self._mux is not None:
                return await self._muxed_script(script, keys, args), 0
            return await self._call(lambda: script(keys=keys, args=args)), 0
        wanted = self.min_replicas_ack

        async def run() -> list[Any]:
            # WAIT counts the writes of its own connection, so it is pipelined
            # behind the script: one connection, one round trip.
            target: dict[str, Any] = {}
            if isinstance(self._redis, RedisCluster):
                await self._redis.initialize()
                target["target_nodes"] = self._redis.get_node_from_key(keys[0])  # WAIT has no key to route by
            timeout_ms = max(1, round(self.replica_ack_timeout_s * 1000))
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", wanted, timeout_ms, **target)
                return await pipe.execute()

        reply, acked = await self._call(lambda: self._loading(script, run))
        return reply, int(acked)

    def _check_durable(self, acked: int) -> None:
        """``NotDurable`` unless enough replicas acknowledged the write (the ledger
        releases the reservation; this store decides nothing)."""
        if self.min_replicas_ack and acked < self.min_replicas_ack:
            raise NotDurable(acked, self.min_replicas_ack, self.replica_ack_timeout_s)

    async def _loading(self, script: AsyncScript, run: Callable[[], Awaitable[T]]) -> T:
        """``run()`` a pipeline that calls ``script`` by its SHA, loading it
        if the server lost it (restart, failover, SCRIPT FLUSH).

        The pipelines send a raw ``EVALSHA``: redis-py's cluster pipeline
        refuses ``evalsha()`` (it cannot know that all keys share a slot; ours
        do), and neither pipeline then loads scripts by itself."""
        try:
            return await run()
        except NoScriptError:
            await self._redis.script_load(script.script)  # every master, in a cluster
            return await run()

    # -- the masters' settings (redis_safety) --------------------------------------------

    def hazards(self) -> tuple[Hazard, ...]:
        return self._verdict.hazards

    async def check_safety(self) -> tuple[Hazard, ...]:
        """Read every master's settings again and judge them: ``hazards`` (and with
        them ``/readyz`` and ``idemproxy_store_unsafe``) from now on. Runs every
        ``safety_check_interval_s`` by itself; ``StoreUnavailable`` when a master
        does not answer (the last judgment stands)."""
        settings = await self._read_settings()
        if self.min_replicas_ack is None:
            self._settle_replicas_ack(settings)
        return self._verdict.again(settings)

    async def _check_at_start(self) -> None:
        try:
            settings = await self._read_settings()
        except StoreUnavailable as exc:
            log.warning(
                "could not read the Redis masters' settings at start (maxmemory-policy, replicas); "
                "they are read as soon as Redis answers",
                extra={"error": str(exc)},
            )
            return
        self._settle_replicas_ack(settings)
        try:
            self._verdict.at_start(settings)
        except StoreUnsafe as refused:
            await self.close()
            raise refused  # by name: mypyc loses a bare raise's exception across an await

    def _settle_replicas_ack(self, settings: list[NodeSettings]) -> None:
        """Decide a plain Redis's ``min_replicas_ack`` (not set: 1 when its master has
        replicas), and warn about masters with fewer replicas than it asks for."""
        if self.min_replicas_ack is None:
            self.min_replicas_ack = 1 if any(node.replicas for node in settings) else 0
            log.info(
                f"store.min_replicas_ack not set: {self.min_replicas_ack}, as the master reports "
                f"{'connected' if self.min_replicas_ack else 'no'} replicas"
            )
        wanted = self.min_replicas_ack
        for node in settings:
            if wanted and node.replicas is not None and node.replicas < wanted:
                log.warning(
                    f"store.min_replicas_ack is {wanted} but redis {node.node} has {node.replicas} connected "
                    "replica(s): reservations there fail with 503 until enough connect "
                    "(store.min_replicas_ack: 0 forwards without waiting for replicas)"
                )

    async def _read_settings(self) -> list[NodeSettings]:
        """What every master holding ledger keys says (``redis_safety.read_node``)."""

        async def read() -> list[NodeSettings]:
            if isinstance(self._redis, RedisCluster):
                cluster = self._redis
                await cluster.initialize()
                return list(
                    await asyncio.gather(
                        *(
                            read_node(node.name, functools.partial(cluster.execute_command, target_nodes=node))
                            for node in cluster.get_primaries()
                        )
                    )
                )
            return [await read_node(await self._master_address(), self._redis.execute_command)]

        return await self._call(read)

    async def _master_address(self) -> str:
        if self._sentinel is not None:
            assert self._master_name is not None
            host, port = await self._sentinel.discover_master(self._master_name)
            return f"{host}:{port}"
        assert isinstance(self._redis, aioredis.Redis)
        options = self._redis.connection_pool.connection_kwargs
        if "path" in options:
            return f"unix://{options['path']}"
        return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"

    async def _recheck_safety(self) -> None:
        """``check_safety`` every ``safety_check_interval_s`` (sooner after a failed read)."""
        while not self._closed:
            current = self._verdict.current
            await self._sleep(self._safety_interval_s if current else min(self._safety_interval_s, _SAFETY_RETRY_S))
            try:
                await self.check_safety()
            except StoreUnavailable as exc:
                self._verdict.current = False  # /readyz reports the outage itself (ping)
                log.debug("could not read the Redis masters' settings", extra={"error": str(exc)})
            except Exception:  # this task must outlive any one bad reply
                log.exception("checking the Redis masters' settings failed")

    # -- Sentinel ----------------------------------------------------------------------

    async def _follow_master(self) -> None:
        """Move every connection to a newly promoted master at once.

        redis-py asks the sentinels only when it opens a connection, so pooled
        connections would keep writing to a demoted master that still accepts
        writes until the sentinels reconfigure it (some 10 s after a ``SENTINEL
        FAILOVER`` or a partition): writes its resync then throws away."""
        assert self._sentinel is not None
        assert self._master_name is not None
        assert isinstance(self._redis, aioredis.Redis)
        pool = self._redis.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        known: Any = None
        while not self._closed:
            await asyncio.sleep(_MASTER_CHECK_S)
            try:
                master = await self._sentinel.discover_master(self._master_name)
            except (RedisError, OSError):
                continue  # no sentinel knows a master now: connections fail until one does
            if known is not None and master != known:
                log.warning("the sentinels promoted a new master; reconnecting", extra={"master": str(master)})
                try:
                    # Connections ask the sentinels again when they reconnect;
                    # those in use are dropped when they are released.
                    await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]
                    await pool.disconnect(inuse_connections=False)
                except Exception:  # this task must outlive any one failover
                    log.exception("could not move the connections to the new master")
                if self._mux is not None:
                    self._mux.reconnect()
                self._feed.follow_master()
                self._ledger_moved()
            known = master

    def _cluster_masters_changed(self, before: frozenset[str], now: frozenset[str]) -> None:
        log.warning(
            "the cluster's masters changed (a failover); following the new ones",
            extra={"before": sorted(before), "now": sorted(now)},
        )
        self._ledger_moved()

    async def _subscribe(self, op_id: str) -> None:
        await self._feed.subscribe(op_id)

    async def _unsubscribe(self, op_id: str) -> None:
        await self._feed.unsubscribe(op_id)

    # -- error mapping -----------------------------------------------------------------

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        if self._gate is None:
            return await self._mapped(command)
        try:
            async with asyncio.timeout(self._gate_timeout_s):
                await self._gate.acquire()
        except TimeoutError as exc:
            raise StoreUnavailable("redis: no connection free in time") from exc
        try:
            return await self._mapped(command)
        finally:
            self._gate.release()

    async def _muxed(self, *args: Any) -> Any:
        assert self._mux is not None
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        try:
            return await self._mux.call(*args)
        except (RedisReplyError, RedisConnectionError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except StoreError:
            raise
        except Exception as broken:  # named apart: mypyc gives a name one type per function
            raise _client_failure(broken) from broken

    async def _muxed_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        assert self._mux is not None
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        try:
            return await self._mux.evalsha(script.sha, cast(str, script.script), keys, args)  # ours are str
        except (RedisReplyError, RedisConnectionError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except StoreError:
            raise
        except Exception as broken:
            raise _client_failure(broken) from broken

    @staticmethod
    async def _mapped(command: Callable[[], Awaitable[T]]) -> T:
        try:
            return await command()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except StoreError:
            raise
        except Exception as broken:  # named apart: mypyc gives a name one type per function
            raise _client_failure(broken) from broken

    # -- remembered names (appended for idemproxy.edge.auth) ----------------------------------

    async def remember_once(self, name: str, ttl_s: float) -> bool:
        key = self.keys.seen(name)
        ttl_ms = max(1, round(ttl_s * 1000))
        if self._mux is not None:
            return await self._muxed("SET", key, b"1", "NX", "PX", ttl_ms) is not None
        return bool(await self._call(lambda: self._redis.set(key, b"1", nx=True, px=ttl_ms)))

    # -- markers (appended for idemproxy.ledger.epoch) ------------------------------------

    async def read_marker(self, name: str) -> bytes | None:
        key = self.keys.marker(name)
        value = await self._call(lambda: self._redis.get(key))
        return cast(bytes | None, value)  # the clients do not decode

    @functools.cached_property
    def _swap_marker(self) -> AsyncScript:
        return self._redis.register_script(SWAP_MARKER)

    async def swap_marker(self, name: str, expected: bytes | None, value: bytes) -> bytes | None:
        keys = [self.keys.marker(name)]
        args = [b"" if expected is None else b"=" + expected, value]
        script = self._swap_marker
        if self._mux is not None:
            current = await self._muxed_script(script, keys, list(args))
        else:
            current = await self._call(lambda: script(keys=keys, args=args))
        return cast(bytes | None, current if current else None)

    # -- budgets and withdrawn reservations (appended for idemproxy.edge.budgets) ---------------

    @functools.cached_property
    def _charge(self) -> AsyncScript:
        return self._redis.register_script(CHARGE)

    @functools.cached_property
    def _unreserve(self) -> AsyncScript:
        return self._redis.register_script(UNRESERVE)

    async def charge(self, counters: Sequence[Counter], charge_id: str, now_ms: int) -> list[Full]:
        if not counters:
            return []
        # Every counter key carries the hash tag {budget}: one slot, so one script charges them all.
        keys = [self.keys.budget(counter.name) for counter in counters]
        args: list[str | int] = [now_ms, charge_id]
        for counter in counters:
            args += (counter.limit, counter.window_ms)
        script = self._charge
        if self._mux is not None:
            reply = await self._muxed_script(script, keys, list(args))
        else:
            reply = await self._call(lambda: script(keys=keys, args=args))
        return [Full(counters[int(reply[i]) - 1], max(1, int(reply[i + 1]))) for i in range(0, len(reply), 2)]

    async def unreserve(self, op_id: str, owner: str, fence: int) -> bool:
        keys = [self.keys.record(op_id), self.keys.due(op_id), self.keys.state_index(op_id, State.PENDING)]
        args: list[str | int] = [op_id, fence, owner, self.keys.channel(op_id)]
        script = self._unreserve
        if self._mux is not None:
            deleted = bool(await self._muxed_script(script, keys, list(args)))
        else:
            deleted = bool(await self._call(lambda: script(keys=keys, args=args)))
        if deleted:
            self._notify_local(op_id)
        return deleted


class _MastersWatch(AsyncEventListenerInterface):
    """Cluster: reports when redis-py's view of the masters changed, as soon as it learns it
    (a refresh of the slots, or a ``MOVED`` reply from a replica promoted in a failover). A
    slot migrated between masters changes no master, and loses nothing."""

    def __init__(self, cluster: RedisCluster, changed: Callable[[frozenset[str], frozenset[str]], None]) -> None:
        self._cluster = cluster
        self._changed = changed
        self._known: frozenset[str] | None = None

    async def listen(self, event: object) -> None:
        masters = frozenset(node.name for node in self._cluster.get_primaries())
        known, self._known = self._known, masters
        if known is not None and masters != known:
            self._changed(known, masters)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _client_failure(broken: Exception) -> StoreUnavailable:
    """Any other failure of the Redis client is an outage too, logged here once with its
    traceback: during a Cluster failover redis-py and uvloop raise ``AttributeError`` and
    ``RuntimeError`` from half-closed connections. Before a forward it becomes the
    fail-closed 503; after one, the outcome stays PENDING and its lease expiry makes it
    UNKNOWN. Never a 500 that invites a fresh attempt."""
    log.error("the Redis client failed unexpectedly; treating it as an outage", exc_info=broken)
    return StoreUnavailable(f"redis client failure: {type(broken).__name__}: {broken}")

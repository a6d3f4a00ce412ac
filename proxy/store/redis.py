"""The Redis ledger: one Lua script per transition, one round trip each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from idemproxy.records import Evidence, OperationRecord, State
from idemproxy.store import codec
from idemproxy.store.base import Lease, OpsQuery, RecordMissing, Store, StoreUnavailable, Transition, matches
from idemproxy.store.redis_schema import INDEXED_STATES, NOTE, RENEW, RESERVE, TRANSITION, RedisKeys

log = logging.getLogger(__name__)
T = TypeVar("T")

_RECONNECT_DELAY_S = 0.5


class RedisStore(Store):
    #: Pub/sub carries notifications between processes; polling is only a
    #: safety net for messages lost while the subscriber reconnects.
    poll_interval_s = 1.0

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "idem",
        socket_timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__()
        self.keys = RedisKeys(key_prefix)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            # Requests beyond the pool wait for a connection instead of failing.
            max_connections=max_connections,
            timeout=socket_timeout_s,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # Both scripts recognise a retried call by its owner, so retrying
            # after a lost reply never creates or applies anything twice.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            health_check_interval=30,
            protocol=2,  # RESP2 works with every Redis 5+ and managed service
        )
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._reserve = self._redis.register_script(RESERVE)
        self._transition = self._redis.register_script(TRANSITION)
        self._renew = self._redis.register_script(RENEW)
        self._note = self._redis.register_script(NOTE)
        self._pubsub: PubSub | None = None
        self._pubsub_lock = asyncio.Lock()  # one connect/subscribe at a time
        self._keepalive_subscribed = False
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        # Connect before anyone can subscribe: redis-py's PubSub does not guard
        # against two concurrent first connects, and a subscription made on
        # the losing connection would never be read.
        await self._subscribe_keepalive()
        self._listener = asyncio.create_task(self._listen(), name="idemproxy-redis-pubsub")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    # -- the contract ------------------------------------------------------------------

    async def reserve(self, record: OperationRecord, evidence: Evidence) -> OperationRecord | None:
        fields = codec.encode(record)
        args: list[Any] = [
            record.op_id,
            record.owner,
            record.lease_until_ms,
            codec.encode_evidence(evidence),
            record.updated_ms,
        ]
        for name, value in fields.items():
            args += (name, value)
        keys = self.keys.script_keys(record.op_id)
        reply = await self._call(lambda: self._reserve(keys=keys, args=args))
        if reply[0] == 1:
            return None
        return codec.decode(record.op_id, _pairs(reply[1]))

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
            codec.encode_evidence(transition.evidence),
            self.keys.channel(new.op_id),
            INDEXED_STATES.index(new.state) + 3 if new.state in INDEXED_STATES else 0,
            new.updated_ms,
        ]
        for name, value in codec.encode(new).items():
            args += (name, value)
        keys = self.keys.script_keys(new.op_id)
        reply = await self._call(lambda: self._transition(keys=keys, args=args))
        if reply[0] == 1:
            self._notify_local(new.op_id)
            return None
        if reply[0] == -1:
            raise RecordMissing(new.op_id)
        return codec.decode(new.op_id, _pairs(reply[1]))

    async def get(self, op_id: str) -> OperationRecord | None:
        fields = await self._call(lambda: self._redis.hgetall(self.keys.record(op_id)))
        if not fields:
            return None
        return codec.decode(op_id, {_text(name): value for name, value in fields.items()})

    async def renew(self, leases: list[Lease]) -> list[bool]:
        if not leases:
            return []

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for lease in leases:
                    await self._renew(
                        keys=[self.keys.record(lease.op_id), self.keys.due(lease.op_id)],
                        args=[lease.op_id, lease.fence, lease.owner, lease.until_ms],
                        client=pipe,
                    )
                return await pipe.execute()

        return [bool(renewed) for renewed in await self._call(run)]

    async def note(self, op_id: str, evidence: Evidence) -> bool:
        keys = [self.keys.record(op_id)]
        args = [codec.encode_evidence(evidence)]
        return bool(await self._call(lambda: self._note(keys=keys, args=args)))

    async def due(self, now_ms: int, limit: int) -> list[str]:
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
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for state in INDEXED_STATES:
                    for shard in self.keys.state_shards(state):
                        pipe.zcard(shard)
                return await pipe.execute()

        counts = await self._call(run)
        per_state = len(counts) // len(INDEXED_STATES)
        return {state: sum(counts[i * per_state : (i + 1) * per_state]) for i, state in enumerate(INDEXED_STATES)}

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def _indexed(self, state: State, updated_before_ms: int | None) -> list[str]:
        upper = updated_before_ms if updated_before_ms is not None else "+inf"

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for shard in self.keys.state_shards(state):
                    pipe.zrangebyscore(shard, "-inf", upper)
                return await pipe.execute()

        return [_text(op_id) for shard in await self._call(run) for op_id in shard]

    async def _scan(self, bound: int) -> list[str]:
        """At most ``bound`` op ids from a SCAN: listing resolved records is for operators only."""
        marker = ":op:"

        async def run() -> list[str]:
            found: list[str] = []
            async for key in self._redis.scan_iter(match=self.keys.record_pattern(), count=1000):
                found.append(_text(key).rsplit(marker, 1)[1])
                if len(found) >= bound:
                    break
            return found

        return await self._call(run)

    async def _get_many(self, op_ids: list[str]) -> list[OperationRecord]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for op_id in op_ids:
                    pipe.hgetall(self.keys.record(op_id))
                return await pipe.execute()

        replies = await self._call(run)
        return [
            codec.decode(op_id, {_text(name): value for name, value in fields.items()})
            for op_id, fields in zip(op_ids, replies, strict=True)
            if fields
        ]

    # -- notifications -----------------------------------------------------------------

    async def _subscribe_keepalive(self) -> None:
        """A permanent subscription keeps the connection in pub/sub mode while
        no operation is being waited for."""
        assert self._pubsub is not None
        try:
            async with self._pubsub_lock:
                await self._pubsub.subscribe(self.keys.keepalive_channel())
            self._keepalive_subscribed = True
        except (RedisError, OSError) as exc:
            log.warning("pub/sub unavailable; waiters will poll until it connects", extra={"error": str(exc)})

    async def _subscribe(self, op_id: str) -> None:
        if self._pubsub is None:
            return
        try:
            async with self._pubsub_lock:
                await self._pubsub.subscribe(self.keys.channel(op_id))
        except Exception as exc:  # a waiter must never fail because of pub/sub
            # Also RuntimeError: while the listener reconnects, redis-py lets two
            # coroutines read the one pub/sub connection. Waiters fall back to polling.
            log.warning("pub/sub subscribe failed, waiters will poll", extra={"error": repr(exc)})

    async def _unsubscribe(self, op_id: str) -> None:
        if self._pubsub is None:
            return
        try:
            async with self._pubsub_lock:
                await self._pubsub.unsubscribe(self.keys.channel(op_id))
        except Exception as exc:  # see _subscribe; a stray subscription is harmless
            log.warning("pub/sub unsubscribe failed", extra={"error": repr(exc)})

    async def _listen(self) -> None:
        assert self._pubsub is not None
        prefix = self.keys.channel_prefix.encode()
        while not self._closed:
            if not self._keepalive_subscribed:
                await self._subscribe_keepalive()
                if not self._keepalive_subscribed:
                    await asyncio.sleep(_RECONNECT_DELAY_S)
                    continue
            try:
                # A bounded read rather than listen(): redis-py's blocking read
                # does not end promptly when its task is cancelled.
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost, reconnecting", extra={"error": str(exc)})
                for op_id in list(self._watchers):
                    self._notify_local(op_id)  # let waiters re-read rather than miss a change
                await asyncio.sleep(_RECONNECT_DELAY_S)
                continue
            if message is not None and message["type"] == "message":
                channel: bytes = message["channel"]
                if channel.startswith(prefix):
                    self._notify_local(channel[len(prefix) :].decode())

    # -- error mapping -----------------------------------------------------------------

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        try:
            return await command()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: list[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

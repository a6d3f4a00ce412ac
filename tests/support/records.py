"""Records, transitions and operation ids as the ledger builds them, for driving a store directly.

The store contract suite (``tests/store/contract``) and the store fault, topology and
safety tests build their records here, and open stores with ``open_started`` (two Redis
stores standing for two proxy processes: ``writer_and_watcher``); ``record_for`` is the
UNKNOWN record a probe is run for (``tests/ledger/test_probes.py``,
``tests/e2e/test_trust_edges.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredRequest, StoredResponse
from idemproxy.protocol import ANONYMOUS
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store, Transition, open_store
from idemproxy.store.redis import RedisStore

LEASE_MS = 60_000
WAKE_TIMEOUT_S = 5.0
#: The op id of ``record_for``'s record.
OP = "0123456789abcdef0123456789abcdef"


def op_id_for(key: str, caller: str = ANONYMOUS, route: str = "root") -> str:
    """The operation id the proxy gives ``key`` (on the ``root`` route, unauthenticated by default)."""
    return operation_id(Scope(caller=caller, route=route, key=key))


def now_ms() -> int:
    return int(time.time() * 1000)


def new_op_id() -> str:
    return uuid.uuid4().hex


def make_record(
    op_id: str,
    owner: str = "instance-a:1",
    *,
    state: State = State.PENDING,
    fence: int = 1,
    attempt: int = 1,
    task: str | None = "task-7",
    retry_class: RetryClass | None = None,
    response: StoredResponse | None = None,
) -> OperationRecord:
    """A record as the ledger builds it on reserve (PENDING, fresh lease)."""
    now = now_ms()
    return OperationRecord(
        op_id=op_id,
        scope=Scope(caller="agent-1", route="tickets", key=f"key-{op_id[:8]}", task=task),
        state=state,
        fence=fence,
        fingerprint="sha256:" + hashlib.sha256(op_id.encode()).hexdigest(),
        attempt=attempt,
        owner=owner,
        lease_until_ms=now + LEASE_MS if state is State.PENDING else 0,
        method="POST",
        target="/tickets?project=ops",
        created_ms=now,
        updated_ms=now,
        retry_class=retry_class,
        response=response,
    )


def reserved(record: OperationRecord) -> Evidence:
    return Evidence(now_ms(), "reserved", {"attempt": record.attempt, "owner": record.owner})


def make_response(body: bytes | None, status: int = 201) -> StoredResponse:
    size = len(body) if body is not None else 4096
    digest = hashlib.sha256(body if body is not None else b"x" * size).hexdigest()
    return StoredResponse(
        status=status,
        headers=(("Content-Type", "application/octet-stream"), ("X-Request-Id", "r-1"), ("X-Dup", "a")),
        body=body,
        body_size=size,
        body_sha256=digest,
    )


def outcome(
    owned: OperationRecord,
    state: State,
    *,
    response: StoredResponse | None = None,
    retry_class: RetryClass | None = None,
) -> OperationRecord:
    """``owned`` after its attempt ended in ``state`` (as ``Ledger.finish`` builds it)."""
    return owned.evolve(
        state=state,
        response=response,
        retry_class=retry_class,
        lease_until_ms=owned.lease_until_ms if state is State.PENDING else 0,
        updated_ms=now_ms(),
    )


def move(
    new: OperationRecord,
    *,
    fence: int,
    states: set[State] | None = None,
    kind: str | None = None,
    ttl_s: float | None = None,
    detail: dict[str, Any] | None = None,
) -> Transition:
    return Transition(
        new=new,
        expect_fence=fence,
        expect_states=frozenset(states or {State.PENDING}),
        evidence=Evidence(now_ms(), kind or new.state.value.lower(), detail or {"by": new.owner}),
        ttl_s=ttl_s,
    )


def take_over(released: OperationRecord, owner: str) -> OperationRecord:
    """The next attempt's record, as ``Ledger._take_over`` builds it."""
    now = now_ms()
    return released.evolve(
        state=State.PENDING,
        fence=released.fence + 1,
        attempt=released.attempt + 1,
        owner=owner,
        lease_until_ms=now + LEASE_MS,
        updated_ms=now,
        retry_class=None,
        response=None,
    )


async def reserve_new(store: Store, owner: str = "instance-a:1", **fields: Any) -> OperationRecord:
    """Reserve a fresh op id; the stored record (with its evidence)."""
    record = make_record(new_op_id(), owner, **fields)
    evidence = reserved(record)
    assert await store.reserve(record, evidence) is None
    return record.evolve(evidence=(evidence,))


async def complete(store: Store, owned: OperationRecord, body: bytes) -> OperationRecord:
    """Record a COMPLETED outcome for ``owned``; the record as stored."""
    transition = move(outcome(owned, State.COMPLETED, response=make_response(body)), fence=owned.fence)
    assert await store.transition(transition) is None
    stored = await store.get(owned.op_id)
    assert stored is not None
    return stored


async def open_started(url: str) -> Store:
    """The store at ``url``, opened and started."""
    store = open_store(StoreConfig(url=url))
    await store.start()
    return store


@contextlib.asynccontextmanager
async def writer_and_watcher(redis_url: str) -> AsyncIterator[tuple[Store, RedisStore, aioredis.Redis]]:
    """Two RedisStore instances standing for two proxy processes, both pub/sub listeners up
    (test_redis_watch_right_after_start_subscribes_on_the_listened_connection says why), and a
    plain client to observe the server with."""
    writer = await open_started(redis_url)
    watcher = await open_started(redis_url)
    observer = aioredis.Redis.from_url(redis_url)
    try:
        assert isinstance(watcher, RedisStore)
        await wait_for_subscribers(observer, watcher.keys.keepalive_channel(), 2)
        yield writer, watcher, observer
    finally:
        await observer.aclose()
        await watcher.close()
        await writer.close()


async def wait_for_subscribers(client: aioredis.Redis, channel: str, count: int) -> None:
    """Poll the server until ``channel`` has ``count`` subscribers (bounded)."""
    deadline = time.monotonic() + WAKE_TIMEOUT_S
    while dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0) < count:
        assert time.monotonic() < deadline, f"{channel} never had {count} subscriber(s)"
        await asyncio.sleep(0.01)


def record_for(
    key: str = "k-1",
    *,
    caller: str = "agent",
    task: str | None = None,
    request: StoredRequest | None = None,
    target: str = "/items",
) -> OperationRecord:
    """An UNKNOWN record (op id ``OP``, on the ``root`` route) for a probe to look up."""
    return OperationRecord(
        op_id=OP,
        scope=Scope(caller=caller, route="root", key=key, task=task),
        state=State.UNKNOWN,
        fence=2,
        fingerprint="fp",
        attempt=1,
        owner="reconciler:1",
        lease_until_ms=0,
        method="POST",
        target=target,
        created_ms=0,
        updated_ms=0,
        request=request,
    )

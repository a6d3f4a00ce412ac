"""The store contract: one suite, run against the SQLite and the Redis ledger.

Every test here goes through the ``store`` fixture, which is parametrized over
both backends (Redis twice: over TCP and over its Unix socket). Where the
contract is about what lies under the store (expiry, the due index),
``Inspector`` reads the backend directly: a separate Redis client, or the
stdlib ``sqlite3`` on the store's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from idemproxy.config import StoreConfig
from idemproxy.records import UNRESOLVED_STATES, Evidence, OperationRecord, RetryClass, Scope, State, StoredResponse
from idemproxy.store import RecordMissing, Store, Transition, open_store
from idemproxy.store.base import Counter, Full, OpsQuery
from idemproxy.store.redis import RedisStore
from idemproxy.store.sqlite import SqliteStore
from tests.conftest import store_url_for

LEASE_MS = 60_000
WAKE_TIMEOUT_S = 5.0


@pytest.fixture(params=["sqlite", "redis", "redis-unix"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url_for(request, tmp_path)


# -- building records and transitions -------------------------------------------------------


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


# -- looking under the store --------------------------------------------------------------


class Inspector:
    """Reads (and, for expiry, writes) what lies under a store, bypassing it."""

    def __init__(self, store: Store, url: str) -> None:
        self.redis_store = store if isinstance(store, RedisStore) else None
        self.sqlite_store = store if isinstance(store, SqliteStore) else None
        assert self.redis_store is not None or self.sqlite_store is not None, type(store)
        self.redis: aioredis.Redis | None = aioredis.Redis.from_url(url) if self.redis_store else None

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def expires_in_ms(self, op_id: str) -> int | None:
        """Milliseconds until the record expires; ``None``: kept until resolved."""
        if self.redis is not None:
            assert self.redis_store is not None
            pttl = await self.redis.pttl(self.redis_store.keys.record(op_id))
            assert pttl != -2, "no record key"
            return None if pttl == -1 else int(pttl)
        expires_ms = self._sqlite_column(op_id, "expires_ms")
        return None if expires_ms is None else int(expires_ms) - now_ms()

    async def due_ms(self, op_id: str) -> int | None:
        """The op id's score in the reconciler's due index; ``None``: not in it."""
        if self.redis is not None:
            assert self.redis_store is not None
            score = await self.redis.zscore(self.redis_store.keys.due(op_id), op_id)
            return None if score is None else int(score)
        due_ms = self._sqlite_column(op_id, "due_ms")
        return None if due_ms is None else int(due_ms)

    async def expire(self, op_id: str) -> None:
        """Make the record's retention run out now."""
        if self.redis is not None:
            assert self.redis_store is not None
            key = self.redis_store.keys.record(op_id)
            assert await self.redis.pexpire(key, 1)
            deadline = time.monotonic() + WAKE_TIMEOUT_S
            while await self.redis.exists(key):
                assert time.monotonic() < deadline, "the record key did not expire"
                await asyncio.sleep(0.005)
            return
        assert self.sqlite_store is not None
        with contextlib.closing(sqlite3.connect(self.sqlite_store.path, timeout=5)) as db:
            cursor = db.execute("UPDATE operations SET expires_ms = ? WHERE op_id = ?", (now_ms() - 1000, op_id))
            db.commit()
            assert cursor.rowcount == 1

    def _sqlite_column(self, op_id: str, column: str) -> Any:
        assert self.sqlite_store is not None
        with contextlib.closing(sqlite3.connect(self.sqlite_store.path, timeout=5)) as db:
            row = db.execute(f"SELECT {column} FROM operations WHERE op_id = ?", (op_id,)).fetchone()
        assert row is not None, "no row for the op id"
        return row[0]


@pytest.fixture
async def inspector(store: Store, store_url: str) -> AsyncIterator[Inspector]:
    under = Inspector(store, store_url)
    yield under
    await under.aclose()


# -- reserve ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["task-7", None])
async def test_reserve_creates_a_pending_record(store: Store, task: str | None) -> None:
    record = make_record(new_op_id(), task=task)
    evidence = reserved(record)

    assert await store.reserve(record, evidence) is None

    stored = await store.get(record.op_id)
    assert stored == record.evolve(evidence=(evidence,))
    assert stored is not None
    assert stored.state is State.PENDING
    assert [entry.kind for entry in stored.evidence] == ["reserved"]
    assert stored.evidence[0].detail == {"attempt": 1, "owner": record.owner}


async def test_get_of_an_unknown_op_id_is_none(store: Store) -> None:
    assert await store.get(new_op_id()) is None


async def test_reserve_of_an_existing_op_id_returns_it_unchanged(store: Store) -> None:
    first = await reserve_new(store, "instance-a:1")
    rival = make_record(first.op_id, "instance-b:1", task="another-task").evolve(fingerprint="sha256:other")

    existing = await store.reserve(rival, reserved(rival))

    assert existing == first.evolve(evidence=())  # get() has the evidence
    assert await store.get(first.op_id) == first


async def test_reserve_of_a_completed_op_id_returns_the_completed_record(store: Store) -> None:
    first = await reserve_new(store)
    done = outcome(first, State.COMPLETED, response=make_response(b'{"id": 1}'))
    transition = move(done, fence=1, ttl_s=3600)
    assert await store.transition(transition) is None
    stored = await store.get(first.op_id)
    assert stored == done.evolve(evidence=(*first.evidence, transition.evidence))

    rival = make_record(first.op_id, "instance-b:1")
    assert await store.reserve(rival, reserved(rival)) == stored.evolve(evidence=())  # get() has the evidence


async def test_retried_reserve_by_the_same_owner_counts_as_created(store: Store) -> None:
    first = await reserve_new(store, "instance-a:1")
    retried = make_record(first.op_id, "instance-a:1")

    assert await store.reserve(retried, reserved(retried)) is None

    stored = await store.get(first.op_id)
    assert stored == first
    assert stored is not None
    assert len(stored.evidence) == 1


async def test_concurrent_reserves_have_exactly_one_winner(store: Store) -> None:
    op_id = new_op_id()
    records = [make_record(op_id, f"instance-{n}:1") for n in range(50)]

    results = await asyncio.gather(*(store.reserve(record, reserved(record)) for record in records))

    winners = [record for record, result in zip(records, results, strict=True) if result is None]
    assert len(winners) == 1
    stored = await store.get(op_id)
    assert stored is not None
    assert stored.owner == winners[0].owner
    assert len(stored.evidence) == 1
    assert stored.evidence[0].detail["owner"] == winners[0].owner
    assert all(result == stored.evolve(evidence=()) for result in results if result is not None)


# -- transition ---------------------------------------------------------------------------------


async def test_transition_applies_with_the_right_fence_and_state(store: Store) -> None:
    first = await reserve_new(store)
    body = b'{"ticket": 42, "note": "caf\xc3\xa9"}\n'
    done = outcome(first, State.COMPLETED, response=make_response(body))
    transition = move(done, fence=1, ttl_s=3600, detail={"status": 201, "note": "d\u00e9j\u00e0 vu \u2713"})

    assert await store.transition(transition) is None

    stored = await store.get(first.op_id)
    assert stored == done.evolve(evidence=(*first.evidence, transition.evidence))
    assert stored is not None
    assert stored.state is State.COMPLETED
    assert stored.response is not None
    assert stored.response.body == body
    assert [entry.kind for entry in stored.evidence] == ["reserved", "completed"]


async def test_evidence_is_appended_in_order(store: Store) -> None:
    first = await reserve_new(store)
    unknown = outcome(first, State.UNKNOWN, retry_class=RetryClass.READ_TIMEOUT)
    escalated = outcome(unknown, State.NEEDS_ATTENTION, retry_class=RetryClass.READ_TIMEOUT)
    resolved = outcome(escalated, State.COMPLETED, response=make_response(b"found"))
    transitions = [
        move(unknown, fence=1, detail={"error": "read timeout"}),
        move(escalated, fence=1, states={State.UNKNOWN}, detail={"probe": "none configured"}),
        move(resolved, fence=1, states={State.NEEDS_ATTENTION}, kind="resolved", ttl_s=60),
    ]

    for transition in transitions:
        assert await store.transition(transition) is None

    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.evidence == (first.evidence[0], *(transition.evidence for transition in transitions))
    assert [entry.kind for entry in stored.evidence] == ["reserved", "unknown", "needs_attention", "resolved"]
    assert stored == resolved.evolve(evidence=stored.evidence)


async def test_transition_with_a_wrong_fence_is_refused(store: Store) -> None:
    first = await reserve_new(store)
    done = outcome(first, State.COMPLETED, response=make_response(b"late"))

    current = await store.transition(move(done, fence=2))

    assert current == first.evolve(evidence=())
    assert await store.get(first.op_id) == first


async def test_transition_from_an_unexpected_state_is_refused(store: Store) -> None:
    first = await reserve_new(store)
    resolved = outcome(first, State.COMPLETED, response=make_response(b"resolved"))

    current = await store.transition(
        move(resolved, fence=1, states={State.UNKNOWN, State.NEEDS_ATTENTION}, kind="resolved")
    )

    assert current == first.evolve(evidence=())
    assert await store.get(first.op_id) == first


async def test_retried_transition_is_applied_once(store: Store) -> None:
    first = await reserve_new(store)
    done = outcome(first, State.COMPLETED, response=make_response(b"once"))
    transition = move(done, fence=1, ttl_s=3600)

    assert await store.transition(transition) is None
    after_first = await store.get(first.op_id)
    assert await store.transition(transition) is None

    stored = await store.get(first.op_id)
    assert stored == after_first
    assert stored is not None
    assert [entry.kind for entry in stored.evidence] == ["reserved", "completed"]


async def test_transition_of_an_unknown_op_id_raises_record_missing(store: Store) -> None:
    ghost = make_record(new_op_id())
    with pytest.raises(RecordMissing):
        await store.transition(move(outcome(ghost, State.COMPLETED), fence=1))
    assert await store.get(ghost.op_id) is None


async def test_zombie_owner_cannot_overwrite_the_new_owner(store: Store) -> None:
    a = await reserve_new(store, "instance-a:1")
    # A's attempt is released (proved not applied); B takes the operation over.
    released = outcome(a, State.RELEASED, retry_class=RetryClass.CONNECT_FAILED)
    assert await store.transition(move(released, fence=1, ttl_s=3600)) is None
    b = take_over(released, "instance-b:1")
    assert await store.transition(move(b, fence=1, states={State.RELEASED}, kind="reserved")) is None
    b_pending = await store.get(a.op_id)
    assert b_pending is not None
    assert (b_pending.state, b_pending.fence, b_pending.owner) == (State.PENDING, 2, "instance-b:1")

    # A wakes up and reports an outcome with its old fence, while B is still working ...
    zombie = move(outcome(a, State.COMPLETED, response=make_response(b"A's answer")), fence=1)
    assert await store.transition(zombie) == b_pending.evolve(evidence=())
    assert await store.get(a.op_id) == b_pending

    # ... and again after B has finished.
    b_done = outcome(b, State.COMPLETED, response=make_response(b"B's answer"))
    assert await store.transition(move(b_done, fence=2, ttl_s=3600)) is None
    final = await store.get(a.op_id)
    assert final is not None
    assert await store.transition(zombie) == final.evolve(evidence=())
    assert await store.get(a.op_id) == final
    assert final.owner == "instance-b:1"
    assert final.fence == 2
    assert final.response is not None
    assert final.response.body == b"B's answer"
    assert [entry.kind for entry in final.evidence] == ["reserved", "released", "reserved", "completed"]


# -- response bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [bytes(range(256)), bytes(range(255, -1, -1)) * 1024, b"", None],
    ids=["all-byte-values", "256KiB-binary", "empty", "not-stored"],
)
async def test_response_body_round_trips_exactly(store: Store, body: bytes | None) -> None:
    first = await reserve_new(store)
    response = make_response(body)
    done = outcome(first, State.COMPLETED, response=response)

    assert await store.transition(move(done, fence=1, ttl_s=3600)) is None

    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.response == response
    assert stored.response is not None
    assert stored.response.body == body
    assert type(stored.response.body) is type(body)


async def test_a_write_without_a_response_leaves_no_body_behind(store: Store) -> None:
    first = await reserve_new(store)
    done = outcome(first, State.COMPLETED, response=make_response(b"secret body"))
    assert await store.transition(move(done, fence=1)) is None
    # An operator resolution that discards the stored response.
    cleared = outcome(done, State.RELEASED)
    assert await store.transition(move(cleared, fence=1, states={State.COMPLETED})) is None

    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.response is None
    assert stored == cleared.evolve(evidence=stored.evidence)


# -- retention ----------------------------------------------------------------------------------


async def test_a_reserved_record_never_expires(store: Store, inspector: Inspector) -> None:
    first = await reserve_new(store)
    assert await inspector.expires_in_ms(first.op_id) is None


@pytest.mark.parametrize("state", [State.COMPLETED, State.RELEASED])
async def test_resolved_states_are_kept_for_their_ttl(store: Store, inspector: Inspector, state: State) -> None:
    first = await reserve_new(store)
    assert await store.transition(move(outcome(first, state), fence=1, ttl_s=120)) is None

    expires_in = await inspector.expires_in_ms(first.op_id)
    assert expires_in is not None
    assert 110_000 < expires_in <= 120_000


@pytest.mark.parametrize("state", [State.PENDING, State.UNKNOWN, State.NEEDS_ATTENTION])
async def test_unresolved_states_never_expire(store: Store, inspector: Inspector, state: State) -> None:
    first = await reserve_new(store)
    # Pass through a resolved state with a TTL first, so an expiry that is not
    # cleared would show.
    released = outcome(first, State.RELEASED)
    assert await store.transition(move(released, fence=1, ttl_s=120)) is None
    assert await inspector.expires_in_ms(first.op_id) is not None
    taken = take_over(released, "instance-b:1")
    assert await store.transition(move(taken, fence=1, states={State.RELEASED})) is None
    if state is not State.PENDING:
        assert await store.transition(move(outcome(taken, state), fence=2)) is None

    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is state
    assert await inspector.expires_in_ms(first.op_id) is None


@pytest.mark.parametrize("state", [State.PENDING, State.UNKNOWN, State.NEEDS_ATTENTION])
async def test_unresolved_states_are_never_given_a_ttl_even_when_asked(
    store: Store, inspector: Inspector, state: State
) -> None:
    """``Transition``: "unresolved states are never given a TTL"; DESIGN: "A PENDING
    or UNKNOWN record is never silently expired". The store is the last line."""
    first = await reserve_new(store)
    if state is State.PENDING:  # a take-over of a released operation
        released = outcome(first, State.RELEASED)
        assert await store.transition(move(released, fence=1, ttl_s=120)) is None
        transition = move(take_over(released, "instance-b:1"), fence=1, states={State.RELEASED}, ttl_s=120)
    else:
        transition = move(outcome(first, state), fence=1, ttl_s=120)

    assert await store.transition(transition) is None

    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is state
    assert await inspector.expires_in_ms(first.op_id) is None


async def test_an_expired_record_is_absent_and_can_be_reserved_anew(store: Store, inspector: Inspector) -> None:
    first = await reserve_new(store, "instance-a:1")
    done = outcome(first, State.COMPLETED, response=make_response(b"old"))
    assert await store.transition(move(done, fence=1, ttl_s=3600)) is None

    await inspector.expire(first.op_id)

    assert await store.get(first.op_id) is None
    with pytest.raises(RecordMissing):
        await store.transition(move(outcome(done, State.RELEASED), fence=1, states={State.COMPLETED}))
    again = make_record(first.op_id, "instance-b:1")
    evidence = reserved(again)
    assert await store.reserve(again, evidence) is None
    stored = await store.get(first.op_id)
    assert stored == again.evolve(evidence=(evidence,))
    assert await inspector.expires_in_ms(first.op_id) is None
    assert await inspector.due_ms(first.op_id) == again.lease_until_ms


# -- the reconciler's due index -----------------------------------------------------------------


@pytest.mark.parametrize("state", [State.COMPLETED, State.RELEASED, State.UNKNOWN, State.NEEDS_ATTENTION])
async def test_due_index_holds_pending_records_only(store: Store, inspector: Inspector, state: State) -> None:
    first = await reserve_new(store)
    assert await inspector.due_ms(first.op_id) == first.lease_until_ms

    assert await store.transition(move(outcome(first, state), fence=1)) is None
    assert await inspector.due_ms(first.op_id) is None


async def test_an_unresolved_record_is_counted_and_listed_in_its_state_only(store: Store) -> None:
    async def assert_indexed_as(op_id: str, state: State | None) -> None:
        counts = await store.count_unresolved()
        assert counts == {indexed: int(indexed is state) for indexed in UNRESOLVED_STATES}
        for indexed in UNRESOLVED_STATES:
            listed = [record.op_id for record in await store.query(OpsQuery(state=indexed))]
            assert listed == ([op_id] if indexed is state else [])

    first = await reserve_new(store)
    await assert_indexed_as(first.op_id, State.PENDING)
    # Every move an unresolved record makes, the same-state ones included (a new owner
    # takes over an expired lease; the reconciler claims an UNKNOWN record).
    taken = take_over(first, "instance-b:1")
    unknown = outcome(taken, State.UNKNOWN, retry_class=RetryClass.READ_TIMEOUT)
    claimed = unknown.evolve(fence=unknown.fence + 1, owner="reconciler:1", updated_ms=now_ms())
    escalated = outcome(claimed, State.NEEDS_ATTENTION, retry_class=RetryClass.READ_TIMEOUT)
    resolved = outcome(escalated, State.COMPLETED, response=make_response(b"found"))
    steps = [
        (move(taken, fence=1), State.PENDING),
        (move(unknown, fence=2), State.UNKNOWN),
        (move(claimed, fence=2, states={State.UNKNOWN}), State.UNKNOWN),
        (move(escalated, fence=3, states={State.UNKNOWN}), State.NEEDS_ATTENTION),
        (move(resolved, fence=3, states={State.NEEDS_ATTENTION}, kind="resolved", ttl_s=60), None),
    ]

    for transition, indexed_as in steps:
        assert await store.transition(transition) is None
        await assert_indexed_as(first.op_id, indexed_as)


async def test_a_taken_over_record_is_due_at_its_new_lease(store: Store, inspector: Inspector) -> None:
    first = await reserve_new(store)
    released = outcome(first, State.RELEASED)
    assert await store.transition(move(released, fence=1, ttl_s=60)) is None
    assert await inspector.due_ms(first.op_id) is None

    taken = take_over(released, "instance-b:1").evolve(lease_until_ms=first.lease_until_ms + 7000)
    assert await store.transition(move(taken, fence=1, states={State.RELEASED})) is None
    assert await inspector.due_ms(first.op_id) == taken.lease_until_ms


# -- notifications ------------------------------------------------------------------------------


async def test_watch_is_woken_by_a_transition_on_the_same_store(store: Store) -> None:
    first = await reserve_new(store)
    async with store.watch(first.op_id) as changed:
        assert not changed.is_set()
        done = outcome(first, State.COMPLETED, response=make_response(b"done"))
        assert await store.transition(move(done, fence=1)) is None
        await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED


async def test_watchers_of_one_op_id_are_all_woken(store: Store) -> None:
    first = await reserve_new(store)
    other = await reserve_new(store)
    async with (
        store.watch(first.op_id) as one,
        store.watch(first.op_id) as two,
        store.watch(other.op_id) as unrelated,
    ):
        done = outcome(first, State.COMPLETED, response=make_response(b"done"))
        assert await store.transition(move(done, fence=1)) is None
        await asyncio.wait_for(asyncio.gather(one.wait(), two.wait()), WAKE_TIMEOUT_S)
        assert not unrelated.is_set()


async def open_started(url: str) -> Store:
    store = open_store(StoreConfig(url=url))
    await store.start()
    return store


async def wait_for_subscribers(client: aioredis.Redis, channel: str, count: int) -> None:
    """Poll the server until ``channel`` has ``count`` subscribers (bounded)."""
    deadline = time.monotonic() + WAKE_TIMEOUT_S
    while dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0) < count:
        assert time.monotonic() < deadline, f"{channel} never had {count} subscriber(s)"
        await asyncio.sleep(0.01)


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


async def test_watch_is_woken_by_a_transition_through_another_redis_store(redis_url: str) -> None:
    """Two RedisStore instances stand for two proxy processes: pub/sub carries the change."""
    async with writer_and_watcher(redis_url) as (writer, watcher, _):
        first = await reserve_new(writer)
        async with watcher.watch(first.op_id) as changed:
            assert not changed.is_set()
            done = outcome(first, State.COMPLETED, response=make_response(b"done"))
            assert await writer.transition(move(done, fence=1)) is None
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
            stored = await watcher.get(first.op_id)
            assert stored is not None
            assert stored.state is State.COMPLETED


async def pubsub_connections(client: aioredis.Redis) -> int:
    """How many connections to the server are in pub/sub mode."""
    return sum(1 for connection in await client.client_list() if int(connection["sub"]) > 0)


async def test_redis_watch_right_after_start_subscribes_on_the_listened_connection(redis_url: str) -> None:
    """A watch entered before the pub/sub listener has connected must not open a
    second pub/sub connection: the listener reads one connection only, so a
    subscription made on another one never wakes anybody (cross-process
    notifications for that op id are lost; waiters fall back to polling)."""
    observer = aioredis.Redis.from_url(redis_url)
    store = open_store(StoreConfig(url=redis_url))
    try:
        assert isinstance(store, RedisStore)
        before = await pubsub_connections(observer)
        await store.start()
        op_id = new_op_id()
        async with store.watch(op_id):
            await wait_for_subscribers(observer, store.keys.keepalive_channel(), 1)
            await wait_for_subscribers(observer, store.keys.channel(op_id), 1)
            opened = await pubsub_connections(observer) - before
            assert opened == 1, f"one store opened {opened} pub/sub connections"
    finally:
        await store.close()
        await observer.aclose()


# -- liveness and lifecycle -----------------------------------------------------------------------


async def test_ping_succeeds(store: Store) -> None:
    await store.ping()  # raises StoreUnavailable unless the store answers


async def test_close_twice_is_harmless(store_url: str) -> None:
    store = await open_started(store_url)
    await store.ping()  # raises StoreUnavailable unless the store answers
    await store.close()
    await store.close()


# -- budget counters (charge) -----------------------------------------------------------------------

WINDOW_MS = 60_000


def budget(name: str = "identity:agent-1", limit: int = 3, window_ms: int = WINDOW_MS) -> Counter:
    return Counter(name, limit, window_ms)


async def test_charge_fills_a_counter_then_says_when_its_oldest_charge_slides_out(store: Store) -> None:
    counter = budget(limit=3)
    t0 = now_ms()
    for n in range(3):
        assert await store.charge([counter], f"charge-{n}", t0 + n * 1000) == []
    assert await store.charge([counter], "charge-3", t0 + 3000) == [Full(counter, WINDOW_MS - 3000)]
    assert await store.charge([counter], "charge-3", t0 + WINDOW_MS - 1) == [Full(counter, 1)]
    # The first charge slides out exactly one window after it was made.
    assert await store.charge([counter], "charge-3", t0 + WINDOW_MS) == []
    assert await store.charge([counter], "charge-4", t0 + WINDOW_MS) == [Full(counter, 1000)]


async def test_charge_is_all_or_none_across_counters(store: Store) -> None:
    identity = budget("identity:agent-1", limit=1)
    task = budget("task:t-1", limit=3)
    t0 = now_ms()
    assert await store.charge([identity, task], "first", t0) == []
    assert await store.charge([identity, task], "second", t0 + 1) == [Full(identity, WINDOW_MS - 1)]
    # The refused charge left the task counter untouched: it still has room for two.
    assert await store.charge([task], "third", t0 + 2) == []
    assert await store.charge([task], "fourth", t0 + 3) == []
    assert await store.charge([task], "fifth", t0 + 4) == [Full(task, WINDOW_MS - 4)]


async def test_charge_reports_every_full_counter(store: Store) -> None:
    identity = budget("identity:agent-1", limit=1, window_ms=10_000)
    task = budget("task:t-1", limit=1)
    t0 = now_ms()
    assert await store.charge([identity, task], "first", t0) == []
    assert await store.charge([identity, task], "second", t0 + 500) == [
        Full(identity, 9_500),
        Full(task, WINDOW_MS - 500),
    ]


async def test_counters_with_different_names_are_separate(store: Store) -> None:
    t0 = now_ms()
    assert await store.charge([budget("identity:a", limit=1)], "a-1", t0) == []
    assert await store.charge([budget("identity:b", limit=1)], "b-1", t0) == []
    assert await store.charge([budget("task:a", limit=1)], "t-1", t0) == []  # a task named like an identity
    assert await store.charge([budget("identity:a", limit=1)], "a-2", t0) != []


async def test_a_retried_charge_is_counted_once(store: Store) -> None:
    counter = budget(limit=2)
    t0 = now_ms()
    assert await store.charge([counter], "attempt-1", t0) == []
    assert await store.charge([counter], "attempt-1", t0 + 1) == []  # the reply was lost; redis-py retried
    assert await store.charge([counter], "attempt-2", t0 + 2) == []
    assert await store.charge([counter], "attempt-1", t0 + 3) == []  # still charged, even with the counter full
    assert await store.charge([counter], "attempt-3", t0 + 4) == [Full(counter, WINDOW_MS - 4)]


async def test_a_lowered_limit_waits_until_enough_charges_slid_out(store: Store) -> None:
    t0 = now_ms()
    for n in range(3):
        assert await store.charge([budget(limit=3)], f"charge-{n}", t0 + n * 10_000) == []
    lowered = budget(limit=1)
    # Room for one more only once the two newest of three are gone too: the newest decides.
    assert await store.charge([lowered], "next", t0 + 25_000) == [Full(lowered, 20_000 + WINDOW_MS - 25_000)]


async def test_concurrent_charges_never_exceed_the_limit(store: Store) -> None:
    identity = budget("identity:agent-1", limit=5)
    task = budget("task:t-1", limit=50)
    t0 = now_ms()
    results = await asyncio.gather(*(store.charge([identity, task], f"charge-{n}", t0) for n in range(30)))
    assert sum(result == [] for result in results) == 5
    assert await store.charge([task], "after", t0) == []  # only the 5 admitted charges reached the task


async def test_charge_of_no_counters_charges_nothing(store: Store) -> None:
    assert await store.charge([], "nothing", now_ms()) == []


# -- withdrawn reservations (unreserve) -------------------------------------------------------------


async def test_unreserve_deletes_a_fresh_reservation_and_leaves_no_trace(store: Store) -> None:
    first = await reserve_new(store)
    assert await store.unreserve(first.op_id, first.owner, 1)
    assert await store.get(first.op_id) is None
    assert (await store.count_unresolved())[State.PENDING] == 0
    assert first.op_id not in await store.due(first.lease_until_ms + 1, 100)
    # The key is free: the next reservation creates the record afresh.
    again = make_record(first.op_id, "instance-b:1")
    assert await store.reserve(again, reserved(again)) is None
    assert await store.unreserve(first.op_id, first.owner, 1) is False  # a retried call: no longer ours


async def test_unreserve_only_deletes_the_owners_pending_reservation(store: Store) -> None:
    first = await reserve_new(store)
    assert await store.unreserve(first.op_id, "instance-b:1", 1) is False
    assert await store.unreserve(first.op_id, first.owner, 2) is False
    assert await store.unreserve(new_op_id(), first.owner, 1) is False
    done = outcome(first, State.COMPLETED, response=make_response(b"done"))
    assert await store.transition(move(done, fence=1)) is None
    assert await store.unreserve(first.op_id, first.owner, 1) is False
    stored = await store.get(first.op_id)
    assert stored is not None
    assert stored.state is State.COMPLETED


async def test_unreserve_wakes_watchers(store: Store) -> None:
    first = await reserve_new(store)
    async with store.watch(first.op_id) as changed:
        assert await store.unreserve(first.op_id, first.owner, 1)
        await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
    assert await store.get(first.op_id) is None


async def test_unreserve_wakes_watchers_through_another_redis_store(redis_url: str) -> None:
    async with writer_and_watcher(redis_url) as (writer, watcher, observer):
        first = await reserve_new(writer)
        async with watcher.watch(first.op_id) as changed:
            # SUBSCRIBE is not acknowledged to the caller: wait until the server has it.
            await wait_for_subscribers(observer, watcher.keys.channel(first.op_id), 1)
            assert await writer.unreserve(first.op_id, first.owner, 1)
            await asyncio.wait_for(changed.wait(), WAKE_TIMEOUT_S)
        assert await watcher.get(first.op_id) is None


def test_the_sqlite_store_refuses_a_url_of_another_kind() -> None:
    """A URL meant for Redis must never become a SQLite file named after it."""
    with pytest.raises(ValueError, match="expected sqlite:///PATH"):
        SqliteStore.from_url("unix:///run/redis.sock")

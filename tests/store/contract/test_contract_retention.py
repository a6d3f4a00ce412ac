"""The store contract, on SQLite and on Redis (over TCP and over its Unix socket; see this
folder's ``conftest.py``): retention and the reconciler's due index.

Resolved records are kept for their TTL and unresolved ones forever; an expired record is
absent and can be reserved anew; only PENDING records are due, at their lease. Where the
contract is about what lies under the store, ``Inspector`` reads the backend directly: a
separate Redis client, or the stdlib ``sqlite3`` on the store's file.
"""

from __future__ import annotations

import random

import pytest

from idemproxy.lifecycle.records import UNRESOLVED_STATES, RetryClass, State
from idemproxy.store import RecordMissing, Store
from idemproxy.store.base import Lease, OpsQuery
from tests.support.records import (
    make_record,
    make_response,
    move,
    now_ms,
    outcome,
    reserve_new,
    reserved,
    take_over,
)
from tests.support.store_inspector import Inspector

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
    """``Transition``: "unresolved states are never given a TTL"; docs/design.md: "A PENDING
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


async def test_due_gives_the_earliest_across_every_shard_up_to_the_limit(store: Store) -> None:
    """The reconciler's question: what is due by now, earliest first, at most ``limit``. The
    records' op ids spread over the shards; their leases end in an order unrelated to that."""
    records = [(await reserve_new(store)) for _ in range(40)]
    leases = random.Random(23).sample(range(40), 40)
    base = now_ms() + 60_000  # each lease ends 60 s + 1 s x its place from its renewal (cutoffs: 500 ms off)
    renewed = [
        Lease(record.op_id, 1, record.owner, 60_000 + 1000 * order)
        for record, order in zip(records, leases, strict=True)
    ]
    assert await store.renew(renewed) == [True] * 40
    by_lease = [record.op_id for _, record in sorted(zip(leases, records, strict=True), key=lambda pair: pair[0])]
    assert len({record.op_id[:2] for record in records}) > 20  # many shards

    assert await store.due(base - 500, 100) == []
    assert await store.due(base + 29_500, 10) == by_lease[:10]
    assert await store.due(base + 29_500, 100) == by_lease[:30]
    assert await store.due(base + 39_500, 1000) == by_lease


async def test_a_taken_over_record_is_due_at_its_new_lease(store: Store, inspector: Inspector) -> None:
    first = await reserve_new(store)
    released = outcome(first, State.RELEASED)
    assert await store.transition(move(released, fence=1, ttl_s=60)) is None
    assert await inspector.due_ms(first.op_id) is None

    taken = take_over(released, "instance-b:1").evolve(lease_until_ms=first.lease_until_ms + 7000)
    assert await store.transition(move(taken, fence=1, states={State.RELEASED})) is None
    assert await inspector.due_ms(first.op_id) == taken.lease_until_ms

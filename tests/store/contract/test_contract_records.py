"""The store contract, on SQLite and on Redis (over TCP and over its Unix socket; see this
folder's ``conftest.py``): records.

Reserving an op id (and finding it taken), fenced transitions between states with their
evidence, and stored response bodies (kept, or only their size and digest).
"""

from __future__ import annotations

import asyncio

import pytest

from idemproxy.lifecycle.records import RetryClass, State
from idemproxy.store import RecordMissing, Store
from tests.support.records import (
    make_record,
    make_response,
    move,
    new_op_id,
    outcome,
    reserve_new,
    reserved,
    take_over,
)

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


# -- shortened ids ---------------------------------------------------------------------------------


async def test_ids_with_a_prefix_are_found_in_order_and_bounded(store: Store) -> None:
    ids = [f"{prefix}{n:024x}" for prefix in ("c0ffee01", "c0ffee02", "c0ffef00") for n in range(2)]
    for op_id in reversed(ids):
        await reserve_new_with_id(store, op_id)

    assert await store.ids_with_prefix("c0ffee", 10) == ids[:4]
    assert await store.ids_with_prefix("c0ffee02", 10) == ids[2:4]
    assert await store.ids_with_prefix(ids[5], 10) == [ids[5]]
    assert await store.ids_with_prefix("c0ffed", 10) == []
    assert len(await store.ids_with_prefix("c0ff", 3)) == 3


async def reserve_new_with_id(store: Store, op_id: str) -> None:
    record = make_record(op_id)
    assert await store.reserve(record, reserved(record)) is None

"""The store contract, on SQLite and on Redis: leases end by the store's own clock.

Whatever clock the instance asking has (here: one two minutes ahead, as a skewed
or jumped instance would), a transition that takes an operation from its holder
(a claim, an escalation, an operator's verdict on a PENDING operation) applies
only once the holder's lease has ended by the store's clock, and an ended lease
is never renewed (the trust issue, item 14).
"""

from __future__ import annotations

import pytest

from idemproxy.lifecycle import transitions
from idemproxy.lifecycle.records import OperationRecord, State
from idemproxy.lifecycle.transitions import Transition
from idemproxy.store import Store
from idemproxy.store.base import Lease
from tests.support.records import make_record, move, new_op_id, outcome, reserved

SKEWED_AHEAD_MS = 120_000


async def reserve_with_lease(store: Store, lease_until_ms: int) -> OperationRecord:
    record = make_record(new_op_id(), "instance-a:1").evolve(lease_until_ms=lease_until_ms)
    assert await store.reserve(record, reserved(record)) is None
    return record


def taking(record: OperationRecord, how: str, now_ms: int) -> Transition:
    if how == "claim":
        return transitions.claim(record, "instance-b:reconciler:1", now_ms + 30_000, now_ms, "GET")
    if how == "escalate":
        return transitions.escalate(record, "instance-b:reconciler:1", now_ms, "no reconcile method configured")
    return transitions.resolve(record, how == "resolve-done", None, "operator:1", now_ms, {"by": "ops"}, 60.0)


@pytest.mark.parametrize("how", ["claim", "escalate", "resolve-done", "resolve-not-done"])
async def test_a_live_lease_is_not_taken_by_an_instance_whose_clock_says_it_ended(store: Store, how: str) -> None:
    live = await reserve_with_lease(store, store.clock.latest_ms() + 60_000)
    skewed_now = store.clock.now_ms() + SKEWED_AHEAD_MS  # past the lease, by this instance's clock

    current = await store.transition(taking(live, how, skewed_now))

    assert current == live.evolve(evidence=())
    stored = await store.get(live.op_id)
    assert stored is not None
    assert (stored.state, stored.fence, stored.owner) == (State.PENDING, 1, "instance-a:1")


@pytest.mark.parametrize("how", ["claim", "escalate", "resolve-done", "resolve-not-done"])
async def test_a_lease_ended_by_the_stores_clock_is_taken(store: Store, how: str) -> None:
    ended = await reserve_with_lease(store, store.clock.earliest_ms() - 1)
    taken = taking(ended, how, store.clock.now_ms())

    assert await store.transition(taken) is None

    stored = await store.get(ended.op_id)
    assert stored is not None
    assert (stored.state, stored.fence) == (taken.new.state, 2)


async def test_an_operator_resolves_an_unknown_operation_a_reconciler_is_probing(store: Store) -> None:
    """Only a PENDING operation's lease protects it from a verdict: an UNKNOWN one's claim is
    a probe, and the operator's word settles what the probe was trying to find out."""
    ended = await reserve_with_lease(store, store.clock.earliest_ms() - 1)
    claim = transitions.claim(ended, "instance-b:reconciler:1", store.clock.latest_ms() + 60_000, 0, "GET")
    assert await store.transition(claim) is None

    verdict = transitions.resolve(claim.new, False, None, "operator:1", store.clock.now_ms(), {}, 60.0)

    assert await store.transition(verdict) is None


async def test_the_owner_records_its_outcome_after_its_lease_ended(store: Store) -> None:
    """The lease guards against others; the owner's own outcome is always recorded."""
    ended = await reserve_with_lease(store, store.clock.earliest_ms() - 1)

    assert await store.transition(move(outcome(ended, State.COMPLETED), fence=1)) is None


async def test_a_live_lease_is_renewed_for_its_term_by_the_stores_clock(store: Store) -> None:
    live = await reserve_with_lease(store, store.clock.latest_ms() + 2_000)
    before_ms = store.clock.earliest_ms()

    assert await store.renew([Lease(live.op_id, 1, live.owner, 600_000)]) == [True]

    stored = await store.get(live.op_id)
    assert stored is not None
    assert before_ms + 600_000 <= stored.lease_until_ms <= store.clock.latest_ms() + 600_000


async def test_an_ended_lease_is_never_renewed(store: Store) -> None:
    """Whoever found it ended may be about to take the operation over: reviving it would
    let two owners believe they hold it."""
    ended = await reserve_with_lease(store, store.clock.earliest_ms() - 1)

    assert await store.renew([Lease(ended.op_id, 1, ended.owner, 600_000)]) == [False]

    stored = await store.get(ended.op_id)
    assert stored is not None
    assert stored.lease_until_ms == ended.lease_until_ms

"""Property-based: random interleavings of competing owners never break the ledger's invariants.

A hypothesis state machine drives a real store (SQLite and Redis) with
reserve / record outcome / take over / expire-and-claim / probe result /
operator resolution, issued by several competing owners that each remember
the fencing token they hold. A plain model predicts every answer:

- a write with a stale fence or from a state it does not leave is refused,
  and changes nothing;
- only the holder of the current fence can move the record, and every move
  is one the state table allows;
- the fence never goes down, COMPLETED is final, and the evidence only grows
  (one entry per applied write).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredResponse
from idemproxy.protocol.keys import Scope
from idemproxy.store import Store, Transition, open_store

T = TypeVar("T")
OWNERS = ("proxy-a", "proxy-b", "proxy-c", "reconciler-x", "reconciler-y")
#: Every move a write may make: (from, to).
ALLOWED = {
    (State.PENDING, State.COMPLETED),
    (State.PENDING, State.RELEASED),
    (State.PENDING, State.UNKNOWN),
    (State.PENDING, State.NEEDS_ATTENTION),
    (State.UNKNOWN, State.UNKNOWN),
    (State.UNKNOWN, State.COMPLETED),
    (State.UNKNOWN, State.RELEASED),
    (State.UNKNOWN, State.NEEDS_ATTENTION),
    (State.NEEDS_ATTENTION, State.COMPLETED),
    (State.NEEDS_ATTENTION, State.RELEASED),
    (State.RELEASED, State.PENDING),
}
RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"ok":1}', 8, "sha")


@dataclass
class Model:
    state: State
    fence: int
    owner: str
    writes: int  # applied writes, including the reservation


def run_machine(store_url: str) -> None:
    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store: Store = open_store(StoreConfig(url=store_url))
            self.run(self.store.start())
            self.op_id = uuid.uuid4().hex
            self.model: Model | None = None
            self.held: dict[str, int] = {}  # the fence each actor believes it holds
            self.counter = 0

        def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            self.run(self.store.close())
            self.loop.close()

        def record(self) -> OperationRecord:
            record = self.run(self.store.get(self.op_id))
            assert record is not None
            return record

        def write(self, actor: str, to: State, leaves: set[State], *, fence_bump: bool, response: bool = False) -> None:
            """``actor`` tries to move the record from one of ``leaves`` to ``to`` with the fence
            it holds, as the proxy's code paths do; the model predicts the answer."""
            assert self.model is not None
            current = self.record()
            believed = self.held.get(actor, 0)
            new_fence = believed + 1 if fence_bump else believed
            self.counter += 1
            new_owner = f"{actor}:{self.counter}"
            new = current.evolve(
                state=to,
                fence=new_fence,
                owner=new_owner,
                lease_until_ms=0,
                response=RESPONSE if response else None,
            )
            answer = self.run(
                self.store.transition(
                    Transition(new, believed, frozenset(leaves), Evidence(self.counter, f"{actor}->{to}"))
                )
            )
            expected_applied = believed == self.model.fence and self.model.state in leaves
            assert (answer is None) == expected_applied, (actor, believed, self.model, to)
            if expected_applied:
                assert (self.model.state, to) in ALLOWED, f"a code path moved {self.model.state} -> {to}"
                self.model = Model(to, new_fence, new_owner, self.model.writes + 1)
                self.held[actor] = new_fence

        # -- rules -----------------------------------------------------------------------

        @initialize(owner=st.sampled_from(OWNERS[:3]))
        def reserve(self, owner: str) -> None:
            record = OperationRecord(
                op_id=self.op_id,
                scope=Scope("caller", "route", "key"),
                state=State.PENDING,
                fence=1,
                fingerprint="fp",
                attempt=1,
                owner=f"{owner}:0",
                lease_until_ms=1,
                method="POST",
                target="/x",
                created_ms=1,
                updated_ms=1,
            )
            assert self.run(self.store.reserve(record, Evidence(0, "reserved"))) is None
            self.model = Model(State.PENDING, 1, record.owner, 1)
            self.held[owner] = 1

        @rule(rival=st.sampled_from(OWNERS))
        def rival_reserve_gets_the_existing_record(self, rival: str) -> None:
            assert self.model is not None
            rival_record = self.record().evolve(owner=f"{rival}:rival", fence=1, state=State.PENDING)
            existing = self.run(self.store.reserve(rival_record, Evidence(0, "rival")))
            assert existing is not None
            assert (existing.state, existing.fence) == (self.model.state, self.model.fence)

        @rule(owner=st.sampled_from(OWNERS[:3]), to=st.sampled_from([State.COMPLETED, State.RELEASED, State.UNKNOWN]))
        def owner_records_an_outcome(self, owner: str, to: State) -> None:
            self.write(owner, to, {State.PENDING}, fence_bump=False, response=to is State.COMPLETED)

        @rule(owner=st.sampled_from(OWNERS[:3]))
        def owner_takes_over_a_released_operation(self, owner: str) -> None:
            # A new attempt: the taker presents the fence it read, and gets the next one.
            assert self.model is not None
            if self.model.state is State.RELEASED:
                self.held[owner] = self.model.fence
            self.write(owner, State.PENDING, {State.RELEASED}, fence_bump=True)

        @rule(reconciler=st.sampled_from(OWNERS[3:]))
        def reconciler_claims_an_expired_or_unknown_operation(self, reconciler: str) -> None:
            assert self.model is not None
            if self.model.state in (State.PENDING, State.UNKNOWN):
                self.held[reconciler] = self.model.fence  # read fresh, then claim
            self.write(reconciler, State.UNKNOWN, {State.PENDING, State.UNKNOWN}, fence_bump=True)

        @rule(
            reconciler=st.sampled_from(OWNERS[3:]),
            result=st.sampled_from([State.COMPLETED, State.RELEASED, State.NEEDS_ATTENTION]),
        )
        def reconciler_records_a_probe_result(self, reconciler: str, result: State) -> None:
            self.write(reconciler, result, {State.UNKNOWN}, fence_bump=False, response=result is State.COMPLETED)

        @precondition(lambda self: self.model is not None)
        @rule(done=st.booleans())
        def operator_resolves(self, done: bool) -> None:
            assert self.model is not None
            if self.model.state in (State.UNKNOWN, State.NEEDS_ATTENTION):
                self.held["operator"] = self.model.fence
            to = State.COMPLETED if done else State.RELEASED
            self.write("operator", to, {State.UNKNOWN, State.NEEDS_ATTENTION}, fence_bump=True, response=done)

        @rule(actor=st.sampled_from(OWNERS), stale_by=st.integers(min_value=1, max_value=3))
        def stale_fence_is_always_refused(self, actor: str, stale_by: int) -> None:
            assert self.model is not None
            before = self.record()
            self.held[actor] = self.model.fence - stale_by
            self.write(actor, State.COMPLETED, set(State), fence_bump=False, response=True)
            assert self.record() == before

        # -- invariants ------------------------------------------------------------------

        @invariant()
        def store_agrees_with_the_model(self) -> None:
            if self.model is None:
                return
            record = self.record()
            assert (record.state, record.fence, record.owner) == (self.model.state, self.model.fence, self.model.owner)
            assert len(record.evidence) == self.model.writes  # append-only: one entry per write
            assert (record.response is not None) == (record.state is State.COMPLETED)

    LedgerMachine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run_state_machine_as_test(LedgerMachine, settings=LedgerMachine.TestCase.settings)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_competing_owners_never_break_the_ledger(backend: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if backend == "sqlite" else str(request.getfixturevalue("redis_url"))
    run_machine(url)

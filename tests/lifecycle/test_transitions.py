"""``idemproxy.lifecycle.transitions``: every row of ``ALLOWED`` is the edge its builder
takes, no other edge can be built, and random event sequences keep the invariants
(at most one forward that takes effect per operation, a COMPLETED answer never
changes, fencing tokens only grow)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from idemproxy.lifecycle import transitions
from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredResponse
from idemproxy.lifecycle.transitions import ALLOWED, NEW_OWNER, Event, Transition, TransitionNotAllowed, Unreserve
from idemproxy.protocol.keys import Scope

NOW = 1_000_000
PROXY = Path(__file__).resolve().parents[2] / "proxy"


def response(tag: str) -> StoredResponse:
    return StoredResponse(201, (("X-Tag", tag),), tag.encode(), len(tag), "sha-" + tag)


def record(state: State | None, *, fence: int = 3, attempt: int = 2, lease_until_ms: int = 0) -> OperationRecord:
    return OperationRecord(
        op_id="op",
        scope=Scope("caller", "route", "key", "task"),
        state=state or State.PENDING,
        fence=fence,
        fingerprint="fp",
        attempt=attempt,
        owner="owner-1",
        lease_until_ms=lease_until_ms,
        method="POST",
        target="/charges",
        created_ms=NOW - 10_000,
        updated_ms=NOW - 5_000,
        attempt_ms=NOW - 5_000,
        response=response("done") if state is State.COMPLETED else None,
    )


def build(event: Event, before: OperationRecord) -> Transition:
    """The transition ``event`` makes from ``before``, through the builder the proxy uses."""
    builders: dict[Event, Callable[[OperationRecord], Transition | Unreserve]] = {
        Event.RESERVE: lambda r: transitions.reserve(
            r.op_id, r.scope, "fp", "POST", "/c", "owner-2", NOW + 30_000, NOW
        ),
        Event.RECREATE: lambda r: transitions.recreate(r, NOW, NOW + 10_000, {"reason": "lost"}),
        Event.TAKE_OVER: lambda r: transitions.take_over(r, "owner-2", NOW + 30_000, NOW),
        Event.WITHDRAW: lambda r: transitions.withdraw(r, NOW, {}, 60.0),
        Event.COMPLETE: lambda r: transitions.finish(r, State.COMPLETED, None, response("new"), NOW, {}, 60.0),
        Event.RELEASE: lambda r: transitions.finish(
            r, State.RELEASED, RetryClass.NOT_APPLIED_STATUS, None, NOW, {}, 60.0
        ),
        Event.MARK_UNKNOWN: lambda r: transitions.finish(
            r, State.UNKNOWN, RetryClass.READ_TIMEOUT, None, NOW, {}, 60.0
        ),
        Event.CLAIM: lambda r: transitions.claim(r, "reconciler-1", NOW + 5_000, NOW, "probe"),
        Event.PROBE_FOUND: lambda r: transitions.probed(r, Event.PROBE_FOUND, NOW, 1, {}, 60.0, response("seen")),
        Event.PROBE_ABSENT: lambda r: transitions.probed(r, Event.PROBE_ABSENT, NOW, 1, {}, 60.0),
        Event.PROBE_INCONCLUSIVE: lambda r: transitions.probed(
            r, Event.PROBE_INCONCLUSIVE, NOW, 1, {}, 60.0, next_probe_ms=NOW + 1_000
        ),
        Event.PROBES_EXHAUSTED: lambda r: transitions.probed(r, Event.PROBES_EXHAUSTED, NOW, 3, {}, 60.0),
        Event.ESCALATE: lambda r: transitions.escalate(r, "reconciler-1", NOW, "no probe configured"),
        Event.RESOLVE_DONE: lambda r: transitions.resolve(r, True, response("op"), "ops-1", NOW, {}, 60.0),
        Event.RESOLVE_NOT_DONE: lambda r: transitions.resolve(r, False, None, "ops-1", NOW, {}, 60.0),
        Event.CORRECT_LATE: lambda r: transitions.correct_late(r, response("late"), "owner-1", NOW, 60.0),
    }
    built = builders[event](before)
    assert isinstance(built, Transition)
    return built


BUILT_EDGES = [(before, event, after) for (before, event), after in ALLOWED.items() if event is not Event.EXPIRE]


@pytest.mark.parametrize(("before", "event", "after"), BUILT_EDGES, ids=lambda v: str(getattr(v, "value", v)))
def test_each_row_of_allowed_is_the_edge_its_builder_takes(before: State | None, event: Event, after: State) -> None:
    old = record(before)

    transition = build(event, old)

    assert transition.event is event
    assert transition.new.state is after
    assert transition.expect_states == (frozenset() if before is None else frozenset({before}))
    if before is not None:
        assert transition.expect_fence == old.fence
        assert transition.new.fence == old.fence + (1 if event in NEW_OWNER else 0)
    assert transition.new.op_id == old.op_id
    assert transition.new.scope == old.scope
    assert transition.evidence.at_ms == NOW


def test_only_settled_records_expire_and_nothing_leaves_completed_otherwise() -> None:
    leaving_completed = {event for (before, event) in ALLOWED if before is State.COMPLETED}
    expiring = {before for (before, event) in ALLOWED if event is Event.EXPIRE}

    assert leaving_completed == {Event.EXPIRE}
    assert expiring == {State.COMPLETED, State.RELEASED}


@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
@pytest.mark.parametrize("before", [None, *State], ids=lambda s: "absent" if s is None else s.value)
@pytest.mark.parametrize("after", list(State), ids=lambda s: s.value)
def test_no_edge_outside_allowed_can_be_built(before: State | None, event: Event, after: State) -> None:
    new = record(after)
    expect = frozenset() if before is None else frozenset({before})

    if ALLOWED.get((before, event), "none") is after:
        assert Transition(new, 1, expect, Evidence(NOW, "x"), event=event).new is new
    else:
        with pytest.raises(TransitionNotAllowed, match=event.value):
            Transition(new, 1, expect, Evidence(NOW, "x"), event=event)


def test_a_first_attempt_is_withdrawn_without_a_trace_a_later_one_gives_its_attempt_back() -> None:
    first = record(State.PENDING, fence=1, attempt=1)
    later = record(State.PENDING, fence=4, attempt=3)

    assert transitions.withdraw(first, NOW, {}, 60.0) == Unreserve("op", "owner-1", 1)
    given_back = transitions.withdraw(later, NOW, {"why": "budget"}, 60.0)
    assert isinstance(given_back, Transition)
    assert (given_back.new.state, given_back.new.attempt, given_back.evidence.kind) == (State.RELEASED, 2, "withdrawn")


def test_a_claim_dates_an_abandoned_attempt_at_the_end_of_its_owners_lease() -> None:
    abandoned = record(State.PENDING, lease_until_ms=NOW - 1_000)

    claimed = transitions.claim(abandoned, "reconciler-1", NOW + 5_000, NOW, "probe").new

    assert claimed.attempt_ms == NOW - 1_000  # the owner may have sent until then
    assert claimed.retry_class is RetryClass.LEASE_EXPIRED
    assert transitions.resolvable(abandoned, NOW)
    assert not transitions.resolvable(record(State.PENDING, lease_until_ms=NOW + 1), NOW)


def test_only_the_lifecycle_builds_transitions_or_writes_a_state() -> None:
    """Finding where a state changes means opening one file."""
    writers = []
    for path in sorted(PROXY.rglob("*.py")):
        if path.parent.name == "lifecycle":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            decoding = path.parent.name == "store" and name == "OperationRecord"  # a stored record, read back
            if name in {"Transition", "OperationRecord"} and not decoding:
                writers.append(f"{path.relative_to(PROXY)}:{node.lineno} {name}(...)")
            if name == "evolve" and any(keyword.arg in {"state", "fence"} for keyword in node.keywords):
                writers.append(f"{path.relative_to(PROXY)}:{node.lineno} evolve(state/fence=...)")

    assert writers == [], "transitions belong in proxy/lifecycle/transitions.py"


# -- random event sequences -----------------------------------------------------------------------


class Attempt:
    def __init__(self, fence: int, owner: str) -> None:
        self.fence = fence
        self.owner = owner
        self.sent = False
        self.took_effect = False
        self.finished = False


class OneOperation(RuleBasedStateMachine):
    """One operation driven by owners, a reconciler and an operator through the lifecycle's
    builders, applied by a store that only checks each transition's guard. The actors
    tell the truth about what they saw; a forward happens only while its attempt holds
    the record (the lease check before sending)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: OperationRecord | None = None
        self.attempts: list[Attempt] = []
        self.effects = 0
        self.answer: StoredResponse | None = None  # the first COMPLETED answer
        self.fences: list[int] = []
        self.clock = NOW
        self.max_attempts = 3
        self.lease_ran_out = False

    def apply(self, change: Transition | Unreserve) -> bool:
        """What a store does: write it if the guard holds."""
        self.clock += 1
        if isinstance(change, Unreserve):
            held = self.current
            if (
                held is not None
                and held.state is State.PENDING
                and (held.owner, held.fence) == (change.owner, change.fence)
            ):
                self.current = None
                self.fences = []  # a new record starts a new history
                return True
            return False
        if not change.expect_states:
            if self.current is not None:
                return False
        elif (
            self.current is None
            or self.current.state not in change.expect_states
            or self.current.fence != change.expect_fence
        ):
            return False
        assert change.event is not None
        assert ALLOWED[(next(iter(change.expect_states), None), change.event)] is change.new.state
        self.current = change.new
        self.fences.append(change.new.fence)
        return True

    def holder(self, attempt: Attempt) -> bool:
        return (
            self.current is not None
            and self.current.state is State.PENDING
            and self.current.fence == attempt.fence
            and self.current.owner == attempt.owner
        )

    @rule()
    def request(self) -> None:
        """A caller sends the operation: reserved if new, taken over if released."""
        owner = f"owner-{len(self.attempts) + 1}"
        if self.current is None:
            change = transitions.reserve(
                "op", Scope("c", "r", "k"), "fp", "POST", "/c", owner, self.clock + 10, self.clock
            )
        elif self.current.state is State.RELEASED and self.current.attempt < self.max_attempts:
            change = transitions.take_over(self.current, owner, self.clock + 10, self.clock)
        else:
            return
        if self.apply(change):
            self.attempts.append(Attempt(change.new.fence, owner))
            self.lease_ran_out = False

    def pick(self, latest: bool, index: int) -> Attempt | None:
        if not self.attempts:
            return None
        return self.attempts[-1] if latest else self.attempts[index % len(self.attempts)]

    @rule(latest=st.booleans(), index=st.integers(0, 5), effect=st.booleans())
    def send(self, latest: bool, index: int, effect: bool) -> None:
        attempt = self.pick(latest, index)
        if attempt is not None and not attempt.sent and self.holder(attempt):
            attempt.sent = True
            attempt.took_effect = effect
            self.effects += effect

    @rule(latest=st.booleans(), index=st.integers(0, 5), ambiguous=st.booleans())
    def finish(self, latest: bool, index: int, ambiguous: bool) -> None:
        attempt = self.pick(latest, index)
        if attempt is None or attempt.finished:
            return
        attempt.finished = True
        owned = (self.current or record(None)).evolve(fence=attempt.fence, owner=attempt.owner, state=State.PENDING)
        change: Transition | Unreserve
        if not attempt.sent:
            change = transitions.withdraw(owned, self.clock, {}, 60.0)
        elif ambiguous:
            change = transitions.finish(owned, State.UNKNOWN, RetryClass.READ_TIMEOUT, None, self.clock, {}, 60.0)
        elif attempt.took_effect:
            change = transitions.finish(owned, State.COMPLETED, None, response(attempt.owner), self.clock, {}, 60.0)
        else:
            change = transitions.finish(
                owned, State.RELEASED, RetryClass.NOT_APPLIED_STATUS, None, self.clock, {}, 60.0
            )
        applied = self.apply(change)
        late = not applied and attempt.took_effect and self.current is not None
        if late and self.current is not None and self.current.state is State.RELEASED:
            # A late answer proves what a probe missed.
            self.apply(transitions.correct_late(self.current, response(attempt.owner), attempt.owner, self.clock, 60))

    @precondition(lambda self: self.current is not None and self.current.state is State.PENDING)
    @rule()
    def lease_runs_out(self) -> None:
        """The owner paused or died: its lease ends (it may already have sent)."""
        self.lease_ran_out = True

    @precondition(
        lambda self: (
            self.current is not None
            and (self.current.state is State.UNKNOWN or (self.current.state is State.PENDING and self.lease_ran_out))
        )
    )
    @rule()
    def claim(self) -> None:
        """A reconciler takes an unknown outcome, or one whose owner's lease ran out."""
        assert self.current is not None
        self.apply(transitions.claim(self.current, "reconciler", self.clock + 5, self.clock, "probe"))

    @precondition(lambda self: self.current is not None and self.current.state is State.UNKNOWN)
    @rule(conclusive=st.booleans(), exhausted=st.booleans())
    def probe(self, conclusive: bool, exhausted: bool) -> None:
        assert self.current is not None
        if conclusive:
            event = Event.PROBE_FOUND if self.effects else Event.PROBE_ABSENT
        else:
            event = Event.PROBES_EXHAUSTED if exhausted else Event.PROBE_INCONCLUSIVE
        seen = response("probe") if event is Event.PROBE_FOUND else None
        self.apply(transitions.probed(self.current, event, self.clock, 1, {}, 60.0, seen, self.clock + 5))

    @precondition(
        lambda self: (
            self.current is not None
            and (self.current.state is State.UNKNOWN or (self.current.state is State.PENDING and self.lease_ran_out))
        )
    )
    @rule()
    def escalate(self) -> None:
        assert self.current is not None
        self.apply(transitions.escalate(self.current, "reconciler", self.clock, "unprobeable"))

    @precondition(lambda self: self.current is not None and transitions.resolvable(self.current, 0))
    @rule()
    def resolve(self) -> None:
        """An operator who checked the tool tells the truth."""
        assert self.current is not None
        done = self.effects > 0
        seen = response("operator") if done else None
        self.apply(transitions.resolve(self.current, done, seen, "ops", self.clock, {}, 60.0))

    @invariant()
    def at_most_one_forward_takes_effect(self) -> None:
        assert self.effects <= 1

    @invariant()
    def a_completed_answer_never_changes(self) -> None:
        if self.current is not None and self.current.state is State.COMPLETED:
            if self.answer is None:
                self.answer = self.current.response
            assert self.current.response == self.answer
        elif self.answer is not None:
            pytest.fail(f"a COMPLETED operation became {self.current}")

    @invariant()
    def fencing_tokens_only_grow(self) -> None:
        assert self.fences == sorted(self.fences)


OneOperation.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_event_sequences_keep_the_invariants = OneOperation.TestCase

"""Every change of an operation record, as pure functions: the one place where a state is written.

Each function takes the record as it is (or nothing, for a new one), what
happened, and the time, and returns a ``Transition``: the new record, the state
and fencing token the old one must still have, the evidence to append, how
long to keep the result and when the reconciler must look at it. A store
applies a ``Transition`` atomically or reports that the guard failed; it
decides nothing. ``ALLOWED`` lists every edge, and ``Transition`` refuses to be
built for any other, so the table is the state machine::

    (absent) --reserve--> PENDING --complete--> COMPLETED --expire--> (absent)
                           |  |  \\--release--> RELEASED --take-over--> PENDING
                           |  \\--mark-unknown--> UNKNOWN --probe-found--> COMPLETED
                           \\--claim (lease ran out)--^  \\--probe-absent--> RELEASED
                                                      \\--probes-exhausted--> NEEDS_ATTENTION

``docs/design.md`` has the whole table with what each state answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from idemproxy.lifecycle.records import (
    UNRESOLVED_STATES,
    Evidence,
    OperationRecord,
    RetryClass,
    State,
    StoredRequest,
    StoredResponse,
)
from idemproxy.protocol.keys import Scope


class Event(StrEnum):
    """What happened to an operation (the evidence's ``kind`` names it too)."""

    RESERVE = "reserve"  # a first attempt is about to be forwarded
    RECREATE = "recreate"  # the record vanished (a store lost it) before its outcome was written
    TAKE_OVER = "take-over"  # a released operation's next attempt is about to be forwarded
    WITHDRAW = "withdraw"  # a reserved attempt will not be sent after all: the attempt is given back
    COMPLETE = "complete"  # the tool gave a definitive answer
    RELEASE = "release"  # the tool proved it did nothing (refused connection, 429/503 ...)
    MARK_UNKNOWN = "mark-unknown"  # sent, and nobody knows whether it took effect
    CLAIM = "claim"  # a reconciler takes an unknown (or abandoned) operation to probe it
    PROBE_FOUND = "probe-found"  # the probe saw the effect
    PROBE_ABSENT = "probe-absent"  # the probe proved there is none
    PROBE_INCONCLUSIVE = "probe-inconclusive"  # no proof either way: probe again later
    PROBES_EXHAUSTED = "probes-exhausted"  # the route's probes are used up
    ESCALATE = "escalate"  # no probe can ever settle it (none configured, unsafe to send)
    RESOLVE_DONE = "resolve-done"  # an operator established the effect happened
    RESOLVE_NOT_DONE = "resolve-not-done"  # an operator established it did not
    CORRECT_LATE = "correct-late"  # a fenced owner's late answer proves an effect a probe missed
    EXPIRE = "expire"  # a settled record's retention ran out (the store's TTL does it)


_P, _C, _R, _U, _N = State.PENDING, State.COMPLETED, State.RELEASED, State.UNKNOWN, State.NEEDS_ATTENTION

#: Every allowed edge: ``(state before or None for no record, event) -> state after or None``.
#: COMPLETED has no edge but expiry: a completed answer never changes.
ALLOWED: dict[tuple[State | None, Event], State | None] = {
    (None, Event.RESERVE): _P,
    (None, Event.RECREATE): _P,
    (_R, Event.TAKE_OVER): _P,
    (_P, Event.WITHDRAW): _R,  # a taken-over attempt; a first one is deleted instead (``Unreserve``)
    (_P, Event.COMPLETE): _C,
    (_P, Event.RELEASE): _R,
    (_P, Event.MARK_UNKNOWN): _U,
    (_P, Event.CLAIM): _U,  # only once its owner's lease ran out
    (_U, Event.CLAIM): _U,  # only while no reconciler holds it
    (_U, Event.PROBE_FOUND): _C,
    (_U, Event.PROBE_ABSENT): _R,
    (_U, Event.PROBE_INCONCLUSIVE): _U,
    (_U, Event.PROBES_EXHAUSTED): _N,
    (_P, Event.ESCALATE): _N,
    (_U, Event.ESCALATE): _N,
    (_P, Event.RESOLVE_DONE): _C,  # only once its owner's lease ran out
    (_U, Event.RESOLVE_DONE): _C,
    (_N, Event.RESOLVE_DONE): _C,
    (_P, Event.RESOLVE_NOT_DONE): _R,
    (_U, Event.RESOLVE_NOT_DONE): _R,
    (_N, Event.RESOLVE_NOT_DONE): _R,
    (_R, Event.CORRECT_LATE): _C,
    (_C, Event.EXPIRE): None,
    (_R, Event.EXPIRE): None,
}

#: Events that hand the operation to a new owner: they bump the fencing token.
NEW_OWNER = frozenset(
    {
        Event.TAKE_OVER,
        Event.CLAIM,
        Event.PROBE_INCONCLUSIVE,
        Event.ESCALATE,
        Event.RESOLVE_DONE,
        Event.RESOLVE_NOT_DONE,
        Event.CORRECT_LATE,
    }
)


#: Events that take an operation from whoever may still hold it. The store applies them only
#: once the holder's lease has ended on the store's own clock, never on the clock of the
#: instance asking (``Transition.after_the_lease``); an operator's verdict counts among them
#: only for a PENDING operation (an UNKNOWN one's claim is a probe, which a verdict overrides).
_TAKEN_FROM_HOLDER = frozenset({Event.CLAIM, Event.ESCALATE})
_VERDICTS = frozenset({Event.RESOLVE_DONE, Event.RESOLVE_NOT_DONE})


class TransitionNotAllowed(ValueError):
    """A transition outside ``ALLOWED``: a bug in the caller, never a data condition."""


_NO_EDGE = object()


@dataclass(frozen=True, slots=True, init=False)
class Transition:
    """Replace the record with ``new`` if it is in ``expect_states`` with ``expect_fence``.

    ``expect_states`` empty: create ``new`` where no record exists (``expect_fence`` 0).
    ``ttl_s`` is how long the new record is kept (``None``: until resolved;
    unresolved states are never given a TTL). ``evidence`` is appended. ``due_ms``:
    when the reconciler must look at the record; 0 takes it off the schedule,
    ``None`` means its lease expiry for PENDING records.

    ``event`` names the edge of ``ALLOWED`` it takes, and only such an edge can be
    built. The functions below are the only ones in idemproxy that build a
    ``Transition`` (a test checks); stores take any, which their own tests use
    (``event`` None) to check the guard.
    """

    new: OperationRecord
    expect_fence: int
    expect_states: frozenset[State]
    evidence: Evidence
    ttl_s: float | None
    due_ms: int | None
    event: Event | None

    def __init__(  # compiled by mypyc, unlike a generated one
        self,
        new: OperationRecord,
        expect_fence: int,
        expect_states: frozenset[State],
        evidence: Evidence,
        ttl_s: float | None = None,
        due_ms: int | None = None,
        event: Event | None = None,
    ) -> None:
        if event is not None:
            for before in expect_states or (None,):
                if ALLOWED.get((before, event), _NO_EDGE) is not new.state:
                    raise TransitionNotAllowed(
                        f"{event.value} may not move an operation from {before} to {new.state.value}"
                    )
        object.__setattr__(self, "new", new)
        object.__setattr__(self, "expect_fence", expect_fence)
        object.__setattr__(self, "expect_states", expect_states)
        object.__setattr__(self, "evidence", evidence)
        object.__setattr__(self, "ttl_s", ttl_s)
        object.__setattr__(self, "due_ms", due_ms)
        object.__setattr__(self, "event", event)

    def with_record(self, new: OperationRecord, evidence: Evidence) -> Transition:
        """The same guarded change, writing ``new`` and ``evidence`` instead."""
        return Transition(new, self.expect_fence, self.expect_states, evidence, self.ttl_s, self.due_ms, self.event)

    @property
    def after_the_lease(self) -> bool:
        """Whether the store may apply it only once the current lease has ended (its clock)."""
        event = self.event
        return event in _TAKEN_FROM_HOLDER or (event in _VERDICTS and State.PENDING in self.expect_states)

    @property
    def due_at_ms(self) -> int:
        if self.due_ms is not None:
            return self.due_ms
        return self.new.lease_until_ms if self.new.state is State.PENDING else 0

    @property
    def ttl_ms(self) -> int:
        """The expiry to set in ms, 0 for none: an unresolved record never expires."""
        if self.new.state in UNRESOLVED_STATES or not self.ttl_s:
            return 0
        return round(self.ttl_s * 1000)


@dataclass(frozen=True, slots=True)
class Unreserve:
    """Delete a first attempt's reservation that nothing was sent for: nothing stays recorded."""

    op_id: str
    owner: str
    fence: int


# -- an attempt's own transitions (the ledger) -----------------------------------------------------------


def reserve(
    op_id: str,
    scope: Scope,
    fingerprint: str,
    method: str,
    target: str,
    owner: str,
    lease_until_ms: int,
    now_ms: int,
    stored_request: StoredRequest | None = None,
) -> Transition:
    """A new operation's record: its first attempt, PENDING, held by ``owner`` until
    ``lease_until_ms`` (the store's ``reserve`` creates it where none exists)."""
    record = OperationRecord(
        op_id=op_id,
        scope=scope,
        state=State.PENDING,
        fence=1,
        fingerprint=fingerprint,
        attempt=1,
        owner=owner,
        lease_until_ms=lease_until_ms,
        method=method,
        target=target,
        created_ms=now_ms,
        updated_ms=now_ms,
        attempt_ms=now_ms,
        request=stored_request,
    )
    return Transition(record, 0, frozenset(), _reserved(record, now_ms), event=Event.RESERVE)


def take_over(
    released: OperationRecord,
    owner: str,
    lease_until_ms: int,
    now_ms: int,
    stored_request: StoredRequest | None = None,
) -> Transition:
    """The next attempt of ``released``: a new owner and fence, the attempt counted."""
    record = released.evolve(
        state=State.PENDING,
        fence=released.fence + 1,
        attempt=released.attempt + 1,
        owner=owner,
        lease_until_ms=lease_until_ms,
        updated_ms=now_ms,
        attempt_ms=now_ms,
        retry_class=None,
        response=None,
        probes=0,
        next_probe_ms=0,
        request=stored_request,
    )
    return Transition(
        record, released.fence, frozenset({State.RELEASED}), _reserved(record, now_ms), event=Event.TAKE_OVER
    )


def withdraw(owned: OperationRecord, now_ms: int, detail: dict[str, Any], retention_s: float) -> Transition | Unreserve:
    """Give back ``owned``, an attempt that will not be sent: a first attempt leaves no
    record; a taken-over one is released (``release_unsent``), so the key is forwarded later."""
    if owned.fence == 1:
        return Unreserve(owned.op_id, owned.owner, owned.fence)
    return release_unsent(owned, now_ms, "withdrawn", detail, retention_s)


def release_unsent(
    owned: OperationRecord, now_ms: int, kind: str, detail: dict[str, Any], retention_s: float
) -> Transition:
    """RELEASE ``owned`` with its attempt given back: nothing was sent for it. ``kind`` names
    why in the evidence (``withdrawn``; ``not-durable``: too few replicas acknowledged
    the reservation, and a PENDING record would make retries wait for its lease)."""
    released = owned.evolve(
        state=State.RELEASED, attempt=owned.attempt - 1, lease_until_ms=0, updated_ms=now_ms, retry_class=None
    )
    return Transition(
        released,
        owned.fence,
        frozenset({State.PENDING}),
        Evidence(now_ms, kind, detail),
        retention_s,
        event=Event.WITHDRAW,
    )


_OUTCOME_EVENTS = {State.COMPLETED: Event.COMPLETE, State.RELEASED: Event.RELEASE, State.UNKNOWN: Event.MARK_UNKNOWN}


def finish(
    owned: OperationRecord,
    state: State,
    retry_class: RetryClass | None,
    response: StoredResponse | None,
    now_ms: int,
    detail: dict[str, Any],
    retention_s: float,
) -> Transition:
    """Record how the attempt ``owned`` ended: COMPLETED (with the tool's answer),
    RELEASED (nothing happened) or UNKNOWN (to be reconciled at once)."""
    new = owned.evolve(
        state=state,
        retry_class=retry_class,
        response=response if state is State.COMPLETED else None,
        updated_ms=now_ms,
        lease_until_ms=0,
    )
    return Transition(
        new,
        owned.fence,
        frozenset({State.PENDING}),
        Evidence(now_ms, state.value.lower(), detail),
        ttl_s=retention_s if state in (State.COMPLETED, State.RELEASED) else None,
        due_ms=now_ms if state is State.UNKNOWN else None,  # reconcile at once
        event=_OUTCOME_EVENTS[state],
    )


def recreate(owned: OperationRecord, now_ms: int, lease_until_ms: int, detail: dict[str, Any]) -> Transition:
    """Put back ``owned``'s record, which the store lost while the attempt was in flight
    (a failover to a replica that never had it), so that its outcome can be written
    with the usual guard. The owner and fence are the attempt's own."""
    record = owned.evolve(lease_until_ms=lease_until_ms, updated_ms=now_ms, evidence=())
    return Transition(record, 0, frozenset(), Evidence(now_ms, "recreated", detail), event=Event.RECREATE)


def correct_late(
    released: OperationRecord, response: StoredResponse | None, owner: str, now_ms: int, retention_s: float
) -> Transition:
    """A fenced owner's late answer proves an effect on an operation a probe found absent:
    COMPLETED with that answer (the only edge out of RELEASED but a new attempt)."""
    corrected = released.evolve(
        state=State.COMPLETED,
        fence=released.fence + 1,
        owner=owner,
        response=response,
        reconciled=True,
        updated_ms=now_ms,
    )
    evidence = Evidence(now_ms, "corrected", {"reason": "a late outcome proves the effect", "owner": owner})
    return Transition(
        corrected, released.fence, frozenset({State.RELEASED}), evidence, ttl_s=retention_s, event=Event.CORRECT_LATE
    )


# -- reconciliation (the reconciler) ---------------------------------------------------------------------


def claim(record: OperationRecord, owner: str, lease_until_ms: int, now_ms: int, method: str) -> Transition:
    """Take ``record`` (PENDING with its lease run out, or UNKNOWN and unclaimed) to probe it."""
    claimed = record.evolve(
        state=State.UNKNOWN,
        fence=record.fence + 1,
        owner=owner,
        lease_until_ms=lease_until_ms,
        retry_class=record.retry_class or RetryClass.LEASE_EXPIRED,
        updated_ms=now_ms,
        # The last moment the abandoned attempt can have been sent: its lease's end.
        attempt_ms=max(record.attempt_ms, record.lease_until_ms)
        if record.state is State.PENDING
        else record.attempt_ms,
    )
    evidence = Evidence(now_ms, "claimed", {"by": owner, "from_state": record.state.value, "method": method})
    return Transition(
        claimed, record.fence, frozenset({record.state}), evidence, due_ms=lease_until_ms, event=Event.CLAIM
    )


def probed(
    claimed: OperationRecord,
    event: Event,
    now_ms: int,
    probes: int,
    detail: dict[str, Any],
    retention_s: float,
    response: StoredResponse | None = None,
    next_probe_ms: int = 0,
) -> Transition:
    """Record a probe's result on the UNKNOWN record ``claimed`` holds: ``PROBE_FOUND`` (with the
    ``response`` it established), ``PROBE_ABSENT``, ``PROBES_EXHAUSTED``, or ``PROBE_INCONCLUSIVE``
    (the claim is given up, a new fence, probed again at ``next_probe_ms``)."""
    ttl_s: float | None = None
    due_ms: int | None = None
    if event is Event.PROBE_FOUND:
        final = claimed.evolve(state=State.COMPLETED, response=response, reconciled=True)
        ttl_s = retention_s
    elif event is Event.PROBE_ABSENT:
        final = claimed.evolve(state=State.RELEASED)
        ttl_s = retention_s
    elif event is Event.PROBES_EXHAUSTED:
        final = claimed.evolve(state=State.NEEDS_ATTENTION)
    else:
        final = claimed.evolve(fence=claimed.fence + 1, owner="", next_probe_ms=next_probe_ms)
        due_ms = next_probe_ms
    final = final.evolve(probes=probes, lease_until_ms=0, updated_ms=now_ms)
    return Transition(
        final, claimed.fence, frozenset({State.UNKNOWN}), Evidence(now_ms, "probe", detail), ttl_s, due_ms, event=event
    )


def escalate(record: OperationRecord, owner: str, now_ms: int, reason: str) -> Transition:
    """Hand ``record`` to a person: no probe can ever settle it."""
    escalated = record.evolve(
        state=State.NEEDS_ATTENTION,
        fence=record.fence + 1,
        owner=owner,
        lease_until_ms=0,
        retry_class=record.retry_class or RetryClass.LEASE_EXPIRED,
        updated_ms=now_ms,
    )
    evidence = Evidence(now_ms, "escalated", {"reason": reason})
    return Transition(escalated, record.fence, frozenset({record.state}), evidence, event=Event.ESCALATE)


# -- an operator (the admin API) -------------------------------------------------------------------------


def resolvable(record: OperationRecord, now_ms: int) -> bool:
    """Whether an operator may resolve ``record``: nobody knows its outcome, and no owner is
    still establishing it."""
    return record.state in (State.UNKNOWN, State.NEEDS_ATTENTION) or (
        record.state is State.PENDING and not record.lease_alive(now_ms)
    )


def resolve(
    record: OperationRecord,
    done: bool,
    response: StoredResponse | None,
    resolver: str,
    now_ms: int,
    detail: dict[str, Any],
    retention_s: float,
) -> Transition:
    """An operator's verdict on ``record`` (``resolvable``): COMPLETED with the ``response``
    to replay, or RELEASED so the next request with the key is forwarded."""
    base = record.evolve(fence=record.fence + 1, owner=resolver, lease_until_ms=0, updated_ms=now_ms, next_probe_ms=0)
    if done:
        new = base.evolve(state=State.COMPLETED, response=response, reconciled=True)
    else:
        new = base.evolve(state=State.RELEASED)
    return Transition(
        new,
        record.fence,
        frozenset({record.state}),
        Evidence(now_ms, "resolved", detail),
        ttl_s=retention_s,
        event=Event.RESOLVE_DONE if done else Event.RESOLVE_NOT_DONE,
    )


def _reserved(record: OperationRecord, now_ms: int) -> Evidence:
    return Evidence(now_ms, "reserved", {"attempt": record.attempt, "owner": record.owner})

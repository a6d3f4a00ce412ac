"""The ledger's state machine as pure functions, free of I/O.

``decide`` says what a request gets given the record already stored under its
operation id; ``classify`` says which state an attempt ends in given what the
upstream did. Both are driven by tables in ``tests/lifecycle/test_decisions.py``;
the transitions themselves are ``idemproxy.lifecycle.transitions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from idemproxy.lifecycle.records import OperationRecord, RetryClass, State
from idemproxy.wire.upstream_client import FailureKind


class Action(StrEnum):
    RETRY = "retry"  # take the released operation over and forward a new attempt
    REPLAY = "replay"  # answer with the stored response
    WAIT = "wait"  # another attempt is in flight: wait for its outcome
    MISMATCH = "mismatch"  # same key, different request
    UNKNOWN = "unknown"  # nobody knows whether the effect happened
    NEEDS_ATTENTION = "needs-attention"
    NOT_STORED = "not-stored"  # completed, but the response was too large to keep
    EXHAUSTED = "exhausted"  # released, and no attempts left


def decide(record: OperationRecord, fingerprint: str, now_ms: int, max_attempts: int) -> Action:
    """What a request with ``fingerprint`` gets when ``record`` already exists."""
    if record.fingerprint != fingerprint:
        return Action.MISMATCH
    match record.state:
        case State.COMPLETED:
            if record.response is None or record.response.body is None:
                return Action.NOT_STORED
            return Action.REPLAY
        case State.PENDING:
            return Action.WAIT if record.lease_alive(now_ms) else Action.UNKNOWN
        case State.UNKNOWN:
            return Action.UNKNOWN
        case State.NEEDS_ATTENTION:
            return Action.NEEDS_ATTENTION
        case State.RELEASED:
            return Action.RETRY if record.attempt < max_attempts else Action.EXHAUSTED


def needs_reconciling(record: OperationRecord, now_ms: int) -> bool:
    """Nobody knows the outcome and nobody is establishing it right now."""
    if record.state is State.PENDING:
        return not record.lease_alive(now_ms)
    return record.state is State.UNKNOWN and not record.claimed(now_ms)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: State  # COMPLETED, RELEASED or UNKNOWN
    retry_class: RetryClass | None = None


COMPLETED = Outcome(State.COMPLETED)
#: The tool said it did nothing (a ``not_applied_statuses`` answer, an MCP refusal).
NOT_APPLIED = Outcome(State.RELEASED, RetryClass.NOT_APPLIED_STATUS)
#: An answer that may follow an effect (an ``ambiguous_statuses`` answer, an MCP server error).
AMBIGUOUS = Outcome(State.UNKNOWN, RetryClass.AMBIGUOUS_STATUS)
#: The owner's lease ran out before it sent anything.
NOT_SENT = Outcome(State.RELEASED, RetryClass.NOT_SENT)
#: The proxy stopped, or failed, with the request possibly sent.
ABORTED = Outcome(State.UNKNOWN, RetryClass.ABORTED)

_FAILURE_OUTCOMES = {
    FailureKind.CONNECT: Outcome(State.RELEASED, RetryClass.CONNECT_FAILED),
    FailureKind.TIMEOUT: Outcome(State.UNKNOWN, RetryClass.READ_TIMEOUT),
    FailureKind.CONNECTION_LOST: Outcome(State.UNKNOWN, RetryClass.CONNECTION_LOST),
}


def classify_status(status: int, not_applied: frozenset[int], ambiguous: frozenset[int]) -> Outcome:
    """The outcome of an attempt that got a complete HTTP response."""
    if status in not_applied:
        return NOT_APPLIED
    if status in ambiguous:
        return AMBIGUOUS
    return COMPLETED


def classify_failure(kind: FailureKind) -> Outcome:
    """The outcome of an attempt that got no complete HTTP response."""
    return _FAILURE_OUTCOMES[kind]


def next_step(record: OperationRecord, now_ms: int, max_attempts: int, reconcile_method: str | None) -> str:
    """The exact condition under which ``record`` moves forward, for operators."""
    resolve = f"or an operator resolves it: idemproxy ops resolve {record.op_id} --done|--not-done"
    match record.state:
        case State.COMPLETED:
            return "Final: duplicates get the stored answer until the record's retention runs out."
        case State.RELEASED:
            if record.attempt >= max_attempts:
                return f"Final: all {max_attempts} attempts were used; a new key is a new operation."
            return f"The next request with this key is forwarded as attempt {record.attempt + 1} of {max_attempts}."
        case State.PENDING if record.lease_alive(now_ms):
            return (
                f"Waiting for owner {record.owner} to record the outcome of attempt {record.attempt}; "
                f"if it has not by {record.lease_until_ms} (lease expiry, ms), the outcome becomes unknown."
            )
        case State.NEEDS_ATTENTION:
            return (
                "Nothing automatic will change it: an operator must resolve it: "
                f"idemproxy ops resolve {record.op_id} --done|--not-done"
            )
    if reconcile_method is None:
        return f"No reconcile method is configured for the route: it escalates to NEEDS_ATTENTION, {resolve}."
    if record.claimed(now_ms):
        return f"Reconciler {record.owner} is running a {reconcile_method} now: found -> COMPLETED, absent -> RELEASED."
    when = f"at {record.next_probe_ms} (ms)" if record.next_probe_ms > now_ms else "now (it is due)"
    return (
        f"A {reconcile_method} runs {when}: found -> COMPLETED, proven absent -> RELEASED, "
        f"unknown -> retried with backoff, then NEEDS_ATTENTION; {resolve}."
    )

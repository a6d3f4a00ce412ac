"""``idemproxy.lifecycle.decisions``: what a duplicate gets, and which state an attempt ends in.

The tables follow docs/design.md, "The operation record" and "What a duplicate gets".
"""

from __future__ import annotations

from typing import Any

import pytest

from idemproxy.lifecycle.decisions import Action, Outcome, classify_failure, classify_status, decide
from idemproxy.lifecycle.records import OperationRecord, RetryClass, State, StoredResponse
from idemproxy.protocol.keys import Scope
from idemproxy.wire.upstream_client import FailureKind

NOW_MS = 1_700_000_000_000
FP = "a" * 64
OTHER_FP = "b" * 64
MAX_ATTEMPTS = 5
ALIVE = NOW_MS + 30_000
EXPIRED = NOW_MS - 1

BODY = StoredResponse(
    status=201,
    headers=(("Content-Type", "application/json"),),
    body=b'{"id":7}',
    body_size=8,
    body_sha256="x",
)
EMPTY_BODY = StoredResponse(status=204, headers=(), body=b"", body_size=0, body_sha256="e")
NOT_KEPT = StoredResponse(status=200, headers=(), body=None, body_size=10_000_000, body_sha256="big")

_UNSET: Any = object()


def record(
    state: State,
    *,
    attempt: int = 1,
    lease_until_ms: int = ALIVE,
    response: StoredResponse | None = _UNSET,
    fingerprint: str = FP,
) -> OperationRecord:
    if response is _UNSET:
        response = BODY if state is State.COMPLETED else None
    return OperationRecord(
        op_id="op-1",
        scope=Scope(caller="agent", route="tickets", key="k1"),
        state=state,
        fence=3,
        fingerprint=fingerprint,
        attempt=attempt,
        owner="instance-a",
        lease_until_ms=lease_until_ms,
        method="POST",
        target="/tickets",
        created_ms=NOW_MS - 60_000,
        updated_ms=NOW_MS - 1_000,
        response=response,
    )


DECIDE_TABLE = [
    # -- PENDING: lease alive -> wait; expired -> the owner vanished, outcome unknown
    pytest.param(record(State.PENDING, lease_until_ms=ALIVE), FP, Action.WAIT, id="pending-same-lease-alive"),
    pytest.param(record(State.PENDING, lease_until_ms=NOW_MS + 1), FP, Action.WAIT, id="pending-same-lease-1ms-left"),
    pytest.param(record(State.PENDING, lease_until_ms=NOW_MS), FP, Action.UNKNOWN, id="pending-same-lease-ends-now"),
    pytest.param(record(State.PENDING, lease_until_ms=EXPIRED), FP, Action.UNKNOWN, id="pending-same-lease-expired"),
    pytest.param(record(State.PENDING, lease_until_ms=ALIVE), OTHER_FP, Action.MISMATCH, id="pending-diff-lease-alive"),
    pytest.param(
        record(State.PENDING, lease_until_ms=EXPIRED),
        OTHER_FP,
        Action.MISMATCH,
        id="pending-diff-lease-expired",
    ),
    # -- COMPLETED: replay what was stored; a body that was not kept cannot be replayed
    pytest.param(record(State.COMPLETED, response=BODY), FP, Action.REPLAY, id="completed-same-body"),
    pytest.param(
        record(State.COMPLETED, response=EMPTY_BODY),
        FP,
        Action.REPLAY,
        id="completed-same-empty-body-is-stored",
    ),
    pytest.param(record(State.COMPLETED, response=NOT_KEPT), FP, Action.NOT_STORED, id="completed-same-body-none"),
    pytest.param(record(State.COMPLETED, response=None), FP, Action.NOT_STORED, id="completed-same-no-response"),
    pytest.param(record(State.COMPLETED, response=BODY), OTHER_FP, Action.MISMATCH, id="completed-diff-body"),
    pytest.param(record(State.COMPLETED, response=NOT_KEPT), OTHER_FP, Action.MISMATCH, id="completed-diff-body-none"),
    pytest.param(
        record(State.COMPLETED, lease_until_ms=EXPIRED),
        FP,
        Action.REPLAY,
        id="completed-same-lease-irrelevant",
    ),
    # -- RELEASED: retry while attempts are left
    pytest.param(record(State.RELEASED, attempt=1), FP, Action.RETRY, id="released-same-first-attempt-used"),
    pytest.param(
        record(State.RELEASED, attempt=MAX_ATTEMPTS - 1),
        FP,
        Action.RETRY,
        id="released-same-one-attempt-left",
    ),
    pytest.param(
        record(State.RELEASED, attempt=MAX_ATTEMPTS),
        FP,
        Action.EXHAUSTED,
        id="released-same-attempts-exhausted",
    ),
    pytest.param(record(State.RELEASED, attempt=MAX_ATTEMPTS + 1), FP, Action.EXHAUSTED, id="released-same-beyond-max"),
    pytest.param(record(State.RELEASED, attempt=1), OTHER_FP, Action.MISMATCH, id="released-diff-attempts-left"),
    pytest.param(record(State.RELEASED, attempt=MAX_ATTEMPTS), OTHER_FP, Action.MISMATCH, id="released-diff-exhausted"),
    pytest.param(
        record(State.RELEASED, lease_until_ms=ALIVE), FP, Action.RETRY, id="released-same-stale-lease-ignored"
    ),
    # -- UNKNOWN: reconcile, whatever the lease says
    pytest.param(record(State.UNKNOWN), FP, Action.UNKNOWN, id="unknown-same"),
    pytest.param(
        record(State.UNKNOWN, lease_until_ms=ALIVE), FP, Action.UNKNOWN, id="unknown-same-stale-lease-ignored"
    ),
    pytest.param(record(State.UNKNOWN), OTHER_FP, Action.MISMATCH, id="unknown-diff"),
    # -- NEEDS_ATTENTION: 409 until an operator resolves it
    pytest.param(record(State.NEEDS_ATTENTION), FP, Action.NEEDS_ATTENTION, id="needs-attention-same"),
    pytest.param(record(State.NEEDS_ATTENTION), OTHER_FP, Action.MISMATCH, id="needs-attention-diff"),
]


@pytest.mark.parametrize(("existing", "fingerprint", "expected"), DECIDE_TABLE)
def test_decide(existing: OperationRecord, fingerprint: str, expected: Action) -> None:
    assert decide(existing, fingerprint, NOW_MS, MAX_ATTEMPTS) is expected


def test_decide_table_covers_every_state() -> None:
    covered = {param.values[0].state for param in DECIDE_TABLE}
    assert covered == set(State)


@pytest.mark.parametrize("state", [pytest.param(state, id=state.value) for state in State])
def test_any_state_with_a_different_fingerprint_is_a_mismatch(state: State) -> None:
    assert decide(record(state), OTHER_FP, NOW_MS, MAX_ATTEMPTS) is Action.MISMATCH


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "expected"),
    [
        pytest.param(1, 1, Action.EXHAUSTED, id="single-attempt-route-used"),
        pytest.param(1, 2, Action.RETRY, id="two-attempts-one-used"),
        pytest.param(2, 2, Action.EXHAUSTED, id="two-attempts-both-used"),
        pytest.param(9, 10, Action.RETRY, id="ten-attempts-nine-used"),
    ],
)
def test_released_retry_depends_on_max_attempts(attempt: int, max_attempts: int, expected: Action) -> None:
    assert decide(record(State.RELEASED, attempt=attempt), FP, NOW_MS, max_attempts) is expected


def test_pending_lease_is_judged_against_now() -> None:
    pending = record(State.PENDING, lease_until_ms=NOW_MS + 5_000)
    assert decide(pending, FP, NOW_MS + 4_999, MAX_ATTEMPTS) is Action.WAIT
    assert decide(pending, FP, NOW_MS + 5_000, MAX_ATTEMPTS) is Action.UNKNOWN


DEFAULT_NOT_APPLIED = frozenset({429, 503})
DEFAULT_AMBIGUOUS = frozenset({500, 502, 504})
COMPLETED = Outcome(State.COMPLETED, None)
RELEASED = Outcome(State.RELEASED, RetryClass.NOT_APPLIED_STATUS)
AMBIGUOUS = Outcome(State.UNKNOWN, RetryClass.AMBIGUOUS_STATUS)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(200, COMPLETED, id="200-ok"),
        pytest.param(201, COMPLETED, id="201-created"),
        pytest.param(204, COMPLETED, id="204-no-content"),
        pytest.param(302, COMPLETED, id="302-redirect"),
        pytest.param(400, COMPLETED, id="400-final-answer"),
        pytest.param(404, COMPLETED, id="404-final-answer"),
        pytest.param(409, COMPLETED, id="409-final-answer"),
        pytest.param(422, COMPLETED, id="422-final-answer"),
        pytest.param(429, RELEASED, id="429-not-applied"),
        pytest.param(503, RELEASED, id="503-not-applied"),
        pytest.param(500, AMBIGUOUS, id="500-ambiguous"),
        pytest.param(502, AMBIGUOUS, id="502-ambiguous"),
        pytest.param(504, AMBIGUOUS, id="504-ambiguous"),
        pytest.param(501, COMPLETED, id="501-not-listed"),
        pytest.param(505, COMPLETED, id="505-not-listed"),
    ],
)
def test_classify_status_default_sets(status: int, expected: Outcome) -> None:
    assert classify_status(status, DEFAULT_NOT_APPLIED, DEFAULT_AMBIGUOUS) == expected


@pytest.mark.parametrize(
    ("status", "not_applied", "ambiguous", "expected"),
    [
        pytest.param(408, {408, 425}, {500}, RELEASED, id="custom-not-applied-408"),
        pytest.param(425, {408, 425}, {500}, RELEASED, id="custom-not-applied-425"),
        pytest.param(429, {408, 425}, {500}, COMPLETED, id="429-not-in-custom-set-is-final"),
        pytest.param(503, {408, 425}, {500}, COMPLETED, id="503-not-in-custom-set-is-final"),
        pytest.param(500, {408, 425}, {500}, AMBIGUOUS, id="custom-ambiguous-500"),
        pytest.param(502, {408, 425}, {500}, COMPLETED, id="502-not-in-custom-set-is-final"),
        pytest.param(520, set(), {520, 599}, AMBIGUOUS, id="custom-ambiguous-520"),
        pytest.param(503, set(), set(), COMPLETED, id="empty-sets-503-final"),
        pytest.param(500, set(), set(), COMPLETED, id="empty-sets-500-final"),
    ],
)
def test_classify_status_custom_sets(
    status: int, not_applied: set[int], ambiguous: set[int], expected: Outcome
) -> None:
    assert classify_status(status, frozenset(not_applied), frozenset(ambiguous)) == expected


FAILURE_TABLE = [
    pytest.param(FailureKind.CONNECT, Outcome(State.RELEASED, RetryClass.CONNECT_FAILED), id="connect-nothing-sent"),
    pytest.param(FailureKind.TIMEOUT, Outcome(State.UNKNOWN, RetryClass.READ_TIMEOUT), id="timeout-after-sending"),
    pytest.param(
        FailureKind.CONNECTION_LOST,
        Outcome(State.UNKNOWN, RetryClass.CONNECTION_LOST),
        id="connection-lost-after-sending",
    ),
]


@pytest.mark.parametrize(("kind", "expected"), FAILURE_TABLE)
def test_classify_failure(kind: FailureKind, expected: Outcome) -> None:
    assert classify_failure(kind) == expected


def test_failure_table_covers_every_kind() -> None:
    assert {param.values[0] for param in FAILURE_TABLE} == set(FailureKind)

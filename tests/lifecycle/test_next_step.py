"""``needs_reconciling`` and ``next_step`` (the operator's "what moves this forward") as tables."""

from __future__ import annotations

from typing import Any

import pytest

from idemproxy.lifecycle.decisions import needs_reconciling, next_step
from idemproxy.lifecycle.records import OperationRecord, RetryClass, State
from idemproxy.protocol.keys import Scope

NOW = 1_700_000_000_000
OP = "0123456789abcdef0123456789abcdef"
RESOLVE = f"idemproxy ops resolve {OP} --done|--not-done"


def record(state: State, **changes: Any) -> OperationRecord:
    base = OperationRecord(
        op_id=OP,
        scope=Scope(caller="agent", route="tickets", key="k-1"),
        state=state,
        fence=3,
        fingerprint="fp",
        attempt=1,
        owner="",
        lease_until_ms=0,
        method="POST",
        target="/tickets",
        created_ms=NOW - 60_000,
        updated_ms=NOW - 30_000,
        retry_class=RetryClass.CONNECTION_LOST if state is State.UNKNOWN else None,
    )
    return base.evolve(**changes)


@pytest.mark.parametrize(
    ("state", "changes", "expected"),
    [
        pytest.param(State.PENDING, {"lease_until_ms": NOW + 1, "owner": "a:1"}, False, id="pending-lease-alive"),
        pytest.param(State.PENDING, {"lease_until_ms": NOW, "owner": "a:1"}, True, id="pending-lease-ends-now"),
        pytest.param(State.PENDING, {"lease_until_ms": NOW - 1, "owner": "a:1"}, True, id="pending-lease-expired"),
        pytest.param(State.PENDING, {"lease_until_ms": 0}, True, id="pending-no-lease"),
        pytest.param(State.UNKNOWN, {}, True, id="unknown-unclaimed"),
        pytest.param(State.UNKNOWN, {"lease_until_ms": NOW + 5_000, "owner": "r:1"}, False, id="unknown-claimed"),
        pytest.param(State.UNKNOWN, {"lease_until_ms": NOW - 1, "owner": "r:1"}, True, id="unknown-claim-expired"),
        pytest.param(State.UNKNOWN, {"next_probe_ms": NOW + 60_000}, True, id="unknown-probe-scheduled-later"),
        pytest.param(State.COMPLETED, {}, False, id="completed"),
        pytest.param(State.COMPLETED, {"lease_until_ms": NOW - 1}, False, id="completed-stale-lease"),
        pytest.param(State.RELEASED, {}, False, id="released"),
        pytest.param(State.NEEDS_ATTENTION, {}, False, id="needs-attention"),
        pytest.param(State.NEEDS_ATTENTION, {"lease_until_ms": NOW - 1}, False, id="needs-attention-stale-lease"),
    ],
)
def test_needs_reconciling(state: State, changes: dict[str, Any], expected: bool) -> None:
    assert needs_reconciling(record(state, **changes), NOW) is expected


# (record state, record changes, max_attempts, reconcile method, must contain, must not contain)
NEXT_STEPS = [
    pytest.param(
        State.COMPLETED,
        {},
        5,
        "probe",
        ["Final: duplicates get the stored answer"],
        ["ops resolve", "attempt"],
        id="completed",
    ),
    pytest.param(
        State.RELEASED,
        {"attempt": 2},
        5,
        None,
        ["next request with this key is forwarded as attempt 3 of 5"],
        ["Final", "ops resolve"],
        id="released-attempts-left",
    ),
    pytest.param(
        State.RELEASED,
        {"attempt": 4},
        5,
        "probe",
        ["forwarded as attempt 5 of 5"],
        ["Final"],
        id="released-last-attempt-left",
    ),
    pytest.param(
        State.RELEASED,
        {"attempt": 5},
        5,
        "probe",
        ["Final: all 5 attempts were used", "a new key is a new operation"],
        ["forwarded", "ops resolve"],
        id="released-attempts-exhausted",
    ),
    pytest.param(
        State.RELEASED,
        {"attempt": 7},
        5,
        None,
        ["Final: all 5 attempts were used"],
        ["forwarded"],
        id="released-beyond-max-attempts",
    ),
    pytest.param(
        State.PENDING,
        {"owner": "inst-a:7", "lease_until_ms": NOW + 30_000, "attempt": 2},
        5,
        "probe",
        ["Waiting for owner inst-a:7", "outcome of attempt 2", str(NOW + 30_000), "the outcome becomes unknown"],
        ["ops resolve"],
        id="pending-lease-alive",
    ),
    pytest.param(
        State.PENDING,
        {"owner": "inst-a:7", "lease_until_ms": NOW - 1},
        5,
        "probe",
        ["A probe runs now (it is due)", "found -> COMPLETED", "proven absent -> RELEASED", RESOLVE],
        ["Waiting for owner"],
        id="pending-lease-expired-with-probe",
    ),
    pytest.param(
        State.PENDING,
        {"owner": "inst-a:7", "lease_until_ms": NOW - 1},
        5,
        None,
        ["No reconcile method is configured", "escalates to NEEDS_ATTENTION", RESOLVE],
        ["Waiting for owner", "runs now"],
        id="pending-lease-expired-without-method",
    ),
    pytest.param(
        State.UNKNOWN,
        {},
        5,
        "probe",
        ["A probe runs now (it is due)", "unknown -> retried with backoff, then NEEDS_ATTENTION", RESOLVE],
        ["Reconciler"],
        id="unknown-unclaimed-due",
    ),
    pytest.param(
        State.UNKNOWN,
        {"next_probe_ms": NOW + 4_000, "probes": 2},
        5,
        "hook",
        [f"A hook runs at {NOW + 4_000} (ms)", RESOLVE],
        ["now (it is due)"],
        id="unknown-unclaimed-scheduled",
    ),
    pytest.param(
        State.UNKNOWN,
        {"next_probe_ms": NOW - 10},
        5,
        "resend",
        ["A resend runs now (it is due)", RESOLVE],
        [],
        id="unknown-unclaimed-overdue-resend",
    ),
    pytest.param(
        State.UNKNOWN,
        {"owner": "inst-b:reconciler:3", "lease_until_ms": NOW + 10_000},
        5,
        "probe",
        ["Reconciler inst-b:reconciler:3 is running a probe now", "found -> COMPLETED, absent -> RELEASED"],
        ["runs now (it is due)"],
        id="unknown-claimed",
    ),
    pytest.param(
        State.UNKNOWN,
        {"owner": "inst-b:reconciler:3", "lease_until_ms": NOW - 1},
        5,
        "hook",
        ["A hook runs now (it is due)", RESOLVE],
        ["is running"],
        id="unknown-claim-expired",
    ),
    pytest.param(
        State.UNKNOWN,
        {},
        5,
        None,
        ["No reconcile method is configured for the route", "escalates to NEEDS_ATTENTION", RESOLVE],
        ["runs now"],
        id="unknown-without-method",
    ),
    pytest.param(
        State.NEEDS_ATTENTION,
        {"probes": 5},
        5,
        "probe",
        ["Nothing automatic will change it", "an operator must resolve it", RESOLVE],
        ["runs now", "Final"],
        id="needs-attention-with-method",
    ),
    pytest.param(
        State.NEEDS_ATTENTION,
        {},
        5,
        None,
        ["Nothing automatic will change it", RESOLVE],
        ["No reconcile method"],
        id="needs-attention-without-method",
    ),
]


@pytest.mark.parametrize(("state", "changes", "max_attempts", "method", "contains", "excludes"), NEXT_STEPS)
def test_next_step(
    state: State,
    changes: dict[str, Any],
    max_attempts: int,
    method: str | None,
    contains: list[str],
    excludes: list[str],
) -> None:
    text = next_step(record(state, **changes), NOW, max_attempts, method)
    for expected in contains:
        assert expected in text
    for unexpected in excludes:
        assert unexpected not in text


def test_next_step_names_this_operation_only() -> None:
    other = record(State.NEEDS_ATTENTION).evolve(op_id="f" * 32)
    text = next_step(other, NOW, 5, "probe")
    assert f"idemproxy ops resolve {'f' * 32} --done|--not-done" in text
    assert OP not in text


def test_next_step_depends_on_the_clock_for_leases() -> None:
    pending = record(State.PENDING, owner="inst-a:1", lease_until_ms=NOW + 1_000)
    before = next_step(pending, NOW, 5, "probe")
    after = next_step(pending, NOW + 1_000, 5, "probe")
    assert before.startswith("Waiting for owner inst-a:1")
    assert after.startswith("A probe runs now")

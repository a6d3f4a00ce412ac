"""The in-memory answers for duplicates of completed operations (``CompletedCache``)."""

from __future__ import annotations

from typing import Any

import pytest

from idemproxy.ledger.completed_cache import ENTRY_OVERHEAD_BYTES, CompletedCache
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredRequest, StoredResponse
from idemproxy.protocol.keys import Scope

NOW_S = 1_800_000_000.0
RETENTION_S = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW_S

    def __call__(self) -> float:
        return self.now


def completed(
    op_id: str = "op-1", *, body: bytes | None = b'{"id": 1}', age_s: float = 0, **changes: Any
) -> OperationRecord:
    at_ms = int((NOW_S - age_s) * 1000)
    record = OperationRecord(
        op_id=op_id,
        scope=Scope(caller="agent", route="tickets", key=op_id),
        state=State.COMPLETED,
        fence=1,
        fingerprint="f" * 64,
        attempt=1,
        owner="instance-a:1",
        lease_until_ms=0,
        method="POST",
        target="/tickets",
        created_ms=at_ms,
        updated_ms=at_ms,
        response=StoredResponse(status=201, headers=(), body=body, body_size=len(body or b""), body_sha256="x"),
    )
    return record.evolve(**changes) if changes else record


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_completed_record_is_kept_and_returned(clock: Clock) -> None:
    cache = CompletedCache(clock=clock)
    record = completed()
    cache.remember(record, RETENTION_S)
    assert cache.get("op-1") == record
    assert cache.get("op-2") is None


@pytest.mark.parametrize("state", [State.PENDING, State.RELEASED, State.UNKNOWN, State.NEEDS_ATTENTION])
def test_only_completed_records_are_kept(clock: Clock, state: State) -> None:
    cache = CompletedCache(clock=clock)
    cache.remember(completed(state=state), RETENTION_S)
    assert cache.get("op-1") is None
    assert len(cache) == 0


def test_a_completed_record_without_its_body_is_not_kept(clock: Clock) -> None:
    """Its duplicates get ``response-not-stored`` from the store, as they always did."""
    cache = CompletedCache(clock=clock)
    cache.remember(completed(body=None), RETENTION_S)
    assert len(cache) == 0


def test_an_entry_ends_when_its_record_expires_in_the_store(clock: Clock) -> None:
    cache = CompletedCache(clock=clock, max_age_s=10 * RETENTION_S)
    cache.remember(completed(age_s=RETENTION_S - 5), RETENTION_S)
    clock.now += 4.9
    assert cache.get("op-1") is not None
    clock.now += 0.1
    assert cache.get("op-1") is None
    assert len(cache) == 0


def test_an_entry_ends_after_max_age_however_long_the_retention(clock: Clock) -> None:
    cache = CompletedCache(clock=clock, max_age_s=60)
    cache.remember(completed(), RETENTION_S)
    clock.now += 59.9
    assert cache.get("op-1") is not None
    clock.now += 0.1
    assert cache.get("op-1") is None


def test_a_record_already_expired_is_not_kept(clock: Clock) -> None:
    cache = CompletedCache(clock=clock)
    cache.remember(completed(age_s=RETENTION_S), RETENTION_S)
    cache.remember(completed("op-2"), 0.0)  # a request that names no retention
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first(clock: Clock) -> None:
    cache = CompletedCache(clock=clock, max_entries=2)
    cache.remember(completed("a"), RETENTION_S)
    cache.remember(completed("b"), RETENTION_S)
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.remember(completed("c"), RETENTION_S)
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None


def test_bodies_are_bounded_in_bytes(clock: Clock) -> None:
    body = b"x" * 1000
    entry = len(body) + ENTRY_OVERHEAD_BYTES
    cache = CompletedCache(clock=clock, max_bytes=2 * entry)
    for op_id in ("a", "b", "c"):
        cache.remember(completed(op_id, body=body), RETENTION_S)
    assert [cache.get(op_id) is not None for op_id in ("a", "b", "c")] == [False, True, True]
    cache.remember(completed("huge", body=b"x" * (2 * entry)), RETENTION_S)  # larger than the whole cache
    assert cache.get("huge") is None
    assert len(cache) == 2


def test_remembering_an_entry_again_replaces_it_and_counts_it_once(clock: Clock) -> None:
    body = b"x" * 1000
    cache = CompletedCache(clock=clock, max_bytes=2 * (len(body) + ENTRY_OVERHEAD_BYTES))
    for _ in range(5):
        cache.remember(completed("a", body=body), RETENTION_S)
    cache.remember(completed("b", body=body), RETENTION_S)
    assert cache.get("a") is not None
    assert cache.get("b") is not None


def test_what_a_replay_does_not_need_is_not_kept(clock: Clock) -> None:
    cache = CompletedCache(clock=clock)
    record = completed(
        request=StoredRequest(headers=(("Authorization", "Bearer secret"),), body=b"{}"),
        evidence=(Evidence(1, "reserved", {}),),
    )
    cache.remember(record, RETENTION_S)
    kept = cache.get("op-1")
    assert kept is not None
    assert kept.request is None
    assert kept.evidence == ()
    assert kept.response == record.response
    assert kept.fingerprint == record.fingerprint

"""Every row of docs/design.md's "what a duplicate gets" table, end to end, on both stores."""

from __future__ import annotations

import asyncio

from idemproxy.lifecycle.records import Evidence, RetryClass, State
from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.store import Store, Transition
from tests.conftest import ProxyFactory, proxy_config
from tests.support.answers import snapshot, watching
from tests.support.problems import problem_type
from tests.support.records import op_id_for
from tests.support.upstream import Upstream

KEY = {"Idempotency-Key": "op-1"}


async def test_completed_same_fingerprint_is_replayed_byte_for_byte(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy()
    first = await client.post("/items", json={"title": "a"}, headers=KEY)
    second = await client.post("/items", json={"title": "a"}, headers=KEY)

    assert first.status == 201
    assert await snapshot(first) == await snapshot(second)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["ETag"] == '"1"'
    assert upstream.count() == 1


async def test_json_body_with_other_key_order_is_the_same_request(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    headers = {**KEY, "Content-Type": "application/json"}
    first = await client.post("/items", data=b'{"a": 1, "b": [1, 2]}', headers=headers)
    second = await client.post("/items", data=b'{"b":[1,2],"a":1}', headers=headers)
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


async def test_different_fingerprint_gets_422_in_any_state(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    await client.post("/items", json={"title": "a"}, headers=KEY)
    other_body = await client.post("/items", json={"title": "b"}, headers=KEY)
    other_path = await client.post("/items/x", json={"title": "a"}, headers=KEY)
    other_method = await client.put("/items", json={"title": "a"}, headers=KEY)

    for response in (other_body, other_path, other_method):
        assert response.status == 422
        assert await problem_type(response) == "fingerprint-mismatch"
    assert upstream.count() == 1


async def test_pending_duplicate_waits_and_gets_the_same_response(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(wait="20s")
    first = asyncio.create_task(client.post("/gate", json={}, headers=KEY))
    await upstream.arrived.wait()
    async with watching(store) as waiting:
        duplicate = asyncio.create_task(client.post("/gate", json={}, headers=KEY))
        await waiting.wait()
        upstream.release.set()
        first_response, duplicate_response = await asyncio.gather(first, duplicate)

    assert first_response.status == 201
    assert await snapshot(first_response) == await snapshot(duplicate_response)
    assert duplicate_response.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


async def test_pending_duplicate_past_the_wait_bound_gets_409_with_retry_after(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(wait="200ms")
    first = asyncio.create_task(client.post("/gate", json={}, headers=KEY))
    await upstream.arrived.wait()
    duplicate = await client.post("/gate", json={}, headers=KEY)

    assert duplicate.status == 409
    assert await problem_type(duplicate) == "operation-in-flight"
    assert duplicate.headers["Retry-After"] == "1"
    upstream.release.set()
    first_response = await first
    later = await client.post("/gate", json={}, headers=KEY)
    assert await snapshot(later) == await snapshot(first_response)
    assert upstream.count() == 1


UNDECIDABLE_PROBE = {
    "probe": {"url": "{upstream}/probe-status/500", "match": "matches[0]"},
    "max_probes": 3,
    "backoff": "1h",  # the next probe is far beyond a request's on-demand bound
    "max_backoff": "1h",
}


async def test_timeout_after_sending_makes_the_outcome_unknown(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(connect_timeout="1s", read_timeout="300ms", lease="10s", reconcile=UNDECIDABLE_PROBE)
    first = await client.post("/slow", json={}, headers=KEY)
    duplicate = await client.post("/slow", json={}, headers=KEY)

    assert first.status == 504
    assert await problem_type(first) == "upstream-timeout"
    assert duplicate.status == 409
    assert int(duplicate.headers["Retry-After"]) >= 1
    body = await duplicate.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"].endswith("outcome-unknown")
    assert body["retry_class"] == RetryClass.READ_TIMEOUT
    assert body["probes"] == 1
    assert upstream.count() == 1


async def test_unknown_outcome_without_a_reconcile_method_needs_attention(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(connect_timeout="1s", read_timeout="300ms", lease="10s")
    first = await client.post("/slow", json={}, headers=KEY)
    duplicate = await client.post("/slow", json={}, headers=KEY)

    assert first.status == 504
    assert duplicate.status == 409
    body = await duplicate.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["type"].endswith("needs-attention")
    assert body["retry_class"] == RetryClass.READ_TIMEOUT
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert record.state is State.NEEDS_ATTENTION
    assert record.evidence[-1].kind == "escalated"
    assert upstream.count() == 1


async def test_connection_reset_after_sending_makes_the_outcome_unknown(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(reconcile=UNDECIDABLE_PROBE)
    first = await client.post("/reset", json={}, headers=KEY)
    duplicate = await client.post("/reset", json={}, headers=KEY)

    assert first.status == 502
    assert await problem_type(first) == "upstream-connection-lost"
    assert duplicate.status == 409
    assert await problem_type(duplicate) == "outcome-unknown"
    assert upstream.count() == 1


async def test_ambiguous_status_is_passed_through_once_then_unknown(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(reconcile=UNDECIDABLE_PROBE)
    first = await client.post("/status/502", json={}, headers=KEY)
    duplicate = await client.post("/status/502", json={}, headers=KEY)

    assert first.status == 502
    assert await first.json() == {"status": 502}
    assert duplicate.status == 409
    assert await problem_type(duplicate) == "outcome-unknown"
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert record.state is State.UNKNOWN
    assert record.retry_class is RetryClass.AMBIGUOUS_STATUS
    assert upstream.count() == 1


async def test_needs_attention_gets_409_and_is_never_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(reconcile=UNDECIDABLE_PROBE)
    await client.post("/reset", json={}, headers=KEY)
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert record.state is State.UNKNOWN
    escalated = record.evolve(state=State.NEEDS_ATTENTION, fence=record.fence + 1, owner="reconciler")
    applied = await store.transition(
        Transition(escalated, record.fence, frozenset({State.UNKNOWN}), Evidence(0, "escalated"))
    )
    assert applied is None

    duplicate = await client.post("/reset", json={}, headers=KEY)
    assert duplicate.status == 409
    assert await problem_type(duplicate) == "needs-attention"
    assert upstream.count() == 1


async def test_not_applied_status_releases_and_the_retry_is_a_new_attempt(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy()
    first = await client.post("/status/503", json={}, headers=KEY)
    assert first.status == 503
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert (record.state, record.attempt, record.retry_class) == (
        State.RELEASED,
        1,
        RetryClass.NOT_APPLIED_STATUS,
    )

    retry = await client.post("/status/503", json={}, headers=KEY)
    assert retry.status == 503
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert (record.state, record.attempt) == (State.RELEASED, 2)
    assert upstream.count() == 2


async def test_released_operation_with_no_attempts_left_gets_429(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy(max_attempts=2)
    statuses = [(await client.post("/status/429", json={}, headers=KEY)).status for _ in range(2)]
    exhausted = await client.post("/status/429", json={}, headers=KEY)

    assert statuses == [429, 429]
    assert exhausted.status == 429
    assert await problem_type(exhausted) == "attempts-exhausted"
    assert upstream.count() == 2


async def test_connect_failure_releases_the_operation(
    make_proxy: ProxyFactory, store: Store, unused_tcp_port: int
) -> None:
    client = await make_proxy(config=proxy_config(f"http://127.0.0.1:{unused_tcp_port}", connect_timeout="1s"))
    response = await client.post("/items", json={}, headers=KEY)

    assert response.status == 502
    assert await problem_type(response) == "upstream-unreachable"
    record = await store.get(op_id_for("op-1"))
    assert record is not None
    assert (record.state, record.retry_class) == (State.RELEASED, RetryClass.CONNECT_FAILED)


async def test_completed_response_too_large_to_store_is_answered_once_then_409(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(max_stored_response="1KiB")
    first = await client.post("/big/200000", json={}, headers=KEY)
    body = await first.read()
    duplicate = await client.post("/big/200000", json={}, headers=KEY)

    assert first.status == 200
    assert body == b"x" * 200000
    assert duplicate.status == 409
    problem = await duplicate.json(content_type=PROBLEM_CONTENT_TYPE)
    assert problem["type"].endswith("response-not-stored")
    assert (problem["original_status"], problem["body_size"]) == (200, 200000)
    assert upstream.count() == 1


async def test_hundred_concurrent_duplicates_cause_one_effect_and_identical_answers(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    client = await make_proxy(wait="30s")
    requests = [asyncio.create_task(client.post("/gate", json={"n": 1}, headers=KEY)) for _ in range(100)]
    await upstream.arrived.wait()
    upstream.release.set()
    responses = await asyncio.gather(*requests)

    snapshots = [await snapshot(response) for response in responses]
    assert upstream.count() == 1
    assert [item for item in snapshots if item != snapshots[0]] == []
    assert snapshots[0][0] == 201
    assert sum(response.headers.get("Idempotent-Replayed") == "true" for response in responses) == 99


async def test_same_key_from_two_callers_stays_separate(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    client = await make_proxy()
    alice = {**KEY, "X-Idem-Caller": "alice"}
    bob = {**KEY, "X-Idem-Caller": "bob"}
    alice_first = await (await client.post("/items", json={"n": 1}, headers=alice)).json()
    bob_first = await (await client.post("/items", json={"n": 1}, headers=bob)).json()
    alice_again = await (await client.post("/items", json={"n": 1}, headers=alice)).json()
    bob_again = await (await client.post("/items", json={"n": 1}, headers=bob)).json()

    assert upstream.count() == 2
    assert alice_first == alice_again
    assert bob_first == bob_again
    assert alice_first["effect"] != bob_first["effect"]

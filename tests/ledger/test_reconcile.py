"""Reconciling unknown outcomes from the tool's observed state, on both stores.

Each test ends with the invariant: the tool performed the side effect at most
once, and every caller that got a definitive answer got the same one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from idemproxy.ledger.ledger import Ledger, OperationRequest, Owned
from idemproxy.lifecycle.decisions import COMPLETED as COMPLETED_OUTCOME
from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredResponse
from idemproxy.protocol.keys import Scope
from idemproxy.store import Store, Transition
from tests.conftest import ProxyFactory
from tests.support import reconcile_hooks
from tests.support.answers import snapshot, watching
from tests.support.problems import problem_type
from tests.support.proxy_server import proxy_app
from tests.support.records import op_id_for
from tests.support.upstream import Upstream

KEY = {"Idempotency-Key": "op-1"}
LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}


async def record_of(store: Store, key: str = "op-1") -> OperationRecord:
    record = await store.get(op_id_for(key))
    assert record is not None
    return record


def kinds(record: OperationRecord) -> list[str]:
    return [evidence.kind for evidence in record.evidence]


async def reconcile_now(client: TestClient[Any, Any], record: OperationRecord) -> OperationRecord | None:
    """What the background reconciler does for a due operation, run once, now."""
    return await proxy_app(client).reconciler.reconcile(record)


async def test_lost_acknowledgment_is_reconciled_from_the_tools_state(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(reconcile={"probe": LOOKUP, "found": {"status": 201}})
    first = await client.post("/reset", json={"title": "a"}, headers=KEY)  # committed, answer lost
    retry = await client.post("/reset", json={"title": "a"}, headers=KEY)
    again = await client.post("/reset", json={"title": "a"}, headers=KEY)

    assert first.status == 502
    assert retry.status == 201
    assert retry.headers["Idempotent-Reconciled"] == "true"
    assert await retry.json() == {"effect": 1, "path": "/reset", "key": "op-1"}
    assert await snapshot(again) == await snapshot(retry)
    record = await record_of(store)
    assert (record.state, record.reconciled, record.probes) == (State.COMPLETED, True, 1)
    assert kinds(record) == ["reserved", "unknown", "claimed", "probe"]
    assert record.evidence[-1].detail["result"] == "found"
    assert upstream.count() == 1


async def test_effect_proven_absent_releases_for_a_new_attempt(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(
        connect_timeout="1s", read_timeout="200ms", lease="5s", reconcile={"probe": LOOKUP, "settle": "50ms"}
    )
    first = await client.post("/flaky", json={}, headers=KEY)  # timed out; the tool did nothing
    upstream.flaky_ok = True
    retry = await client.post("/flaky", json={}, headers=KEY)

    assert first.status == 504
    assert retry.status == 201
    assert "Idempotent-Reconciled" not in retry.headers
    record = await record_of(store)
    assert (record.state, record.attempt) == (State.COMPLETED, 2)
    assert "probe" in kinds(record)
    assert upstream.count() == 1


async def test_timeout_then_late_commit_is_never_forwarded_twice(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    upstream.late_s = 0.5
    client = await make_proxy(
        connect_timeout="1s", read_timeout="150ms", lease="5s", reconcile={"probe": LOOKUP, "settle": "60s"}
    )
    first = await client.post("/late", json={}, headers=KEY)
    early = await client.post("/late", json={}, headers=KEY)  # probe: absent, but not yet settled

    assert first.status == 504
    assert early.status == 409
    assert await problem_type(early) == "outcome-unknown"
    assert int(early.headers["Retry-After"]) > 30  # the next probe waits for the settle time
    record = await record_of(store)
    assert (record.state, record.probes) == (State.UNKNOWN, 0)
    assert record.evidence[-1].detail["result"] == "absent"
    assert "settles_at_ms" in record.evidence[-1].detail  # absence proves nothing yet

    await upstream.committed.wait()  # the tool commits after the proxy gave up
    reconciled = await reconcile_now(client, record)
    late = await client.post("/late", json={}, headers=KEY)

    assert reconciled is not None
    assert reconciled.state is State.COMPLETED
    assert late.status == 200
    assert late.headers["Idempotent-Reconciled"] == "true"
    assert upstream.count() == 1


async def test_probe_that_keeps_failing_escalates_to_needs_attention_and_never_forwards(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, unused_tcp_port: int
) -> None:
    unreachable = {"url": f"http://127.0.0.1:{unused_tcp_port}/lookup?key={{key}}", "match": "matches[0]"}
    client = await make_proxy(reconcile={"probe": unreachable, "max_probes": 2, "backoff": "1h", "max_backoff": "1h"})
    await client.post("/reset", json={}, headers=KEY)
    first_retry = await client.post("/reset", json={}, headers=KEY)
    second_retry = await client.post("/reset", json={}, headers=KEY)  # backoff: no new probe yet

    assert first_retry.status == 409
    assert await problem_type(first_retry) == "outcome-unknown"
    assert int(first_retry.headers["Retry-After"]) > 3000
    assert await problem_type(second_retry) == "outcome-unknown"
    record = await record_of(store)
    assert (record.state, record.probes) == (State.UNKNOWN, 1)

    escalated = await reconcile_now(client, record)  # the background's next due probe
    last = await client.post("/reset", json={}, headers=KEY)

    assert escalated is not None
    assert (escalated.state, escalated.probes) == (State.NEEDS_ATTENTION, 2)
    assert await problem_type(last) == "needs-attention"
    record = await record_of(store)
    assert kinds(record).count("probe") == 2
    assert all(e.detail["result"] == "unknown" for e in record.evidence if e.kind == "probe")
    assert upstream.count() == 1


async def test_resend_safe_route_reconciles_by_sending_the_same_request_again(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    upstream.drop_first = True
    client = await make_proxy(reconcile={"resend_safe": True})
    first = await client.post("/keyed", json={"n": 1}, headers=KEY)
    retry = await client.post("/keyed", json={"n": 1}, headers=KEY)

    assert first.status == 502
    assert retry.status == 201
    assert await retry.read() == upstream.keyed_answers["op-1"]
    assert retry.headers["Idempotent-Reconciled"] == "true"
    record = await record_of(store)
    assert record.request is not None
    assert orjson.loads(record.request.body) == {"n": 1}
    assert upstream.count() == 1


async def test_hook_route_reconciles_through_python(make_proxy: ProxyFactory, upstream: Upstream, store: Store) -> None:
    reconcile_hooks.UPSTREAM_URL = upstream.url
    client = await make_proxy(reconcile={"hook": "tests.support.reconcile_hooks:lookup_effect"})
    await client.post("/reset", json={}, headers=KEY)
    retry = await client.post("/reset", json={}, headers=KEY)

    assert retry.status == 200
    assert await retry.json() == {"found_by": "hook"}
    record = await record_of(store)
    assert record.evidence[-1].detail["method"] == "hook"
    assert upstream.count() == 1


async def test_concurrent_duplicates_share_one_probe(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    client = await make_proxy(reconcile={"probe": LOOKUP, "found": {"status": 201}})
    await client.post("/reset", json={}, headers=KEY)
    responses = await asyncio.gather(*(client.post("/reset", json={}, headers=KEY) for _ in range(20)))

    snapshots = [await snapshot(response) for response in responses]
    assert [item for item in snapshots if item != snapshots[0]] == []
    assert snapshots[0][0] == 201
    assert upstream.lookups == 1
    record = await record_of(store)
    assert kinds(record).count("probe") == 1
    assert upstream.count() == 1


async def test_owner_renews_its_lease_while_the_request_is_in_flight(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    # The answer trickles in for 2.4 s; the lease is 1.5 s. Only renewal keeps it alive.
    upstream.trickle_chunks, upstream.trickle_every_s = 8, 0.3
    client = await make_proxy(connect_timeout="200ms", read_timeout="1s", lease="1500ms", wait="20s")
    first = asyncio.create_task(client.post("/trickle", json={}, headers=KEY))
    await upstream.arrived.wait()
    initial = await record_of(store)
    await upstream.trickled(6).wait()  # 2.1 s in: the first lease ran out long ago

    renewed = await record_of(store)
    assert renewed.state is State.PENDING
    assert renewed.owner == initial.owner
    assert renewed.lease_until_ms > initial.lease_until_ms
    async with watching(store) as waiting:
        duplicate = asyncio.create_task(client.post("/trickle", json={}, headers=KEY))
        await waiting.wait()
        first_response, duplicate_response = await asyncio.gather(first, duplicate)
    assert first_response.status == 201
    assert await first_response.read() == await duplicate_response.read()
    assert duplicate_response.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


async def test_expired_lease_of_a_vanished_owner_counts_as_unknown(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    """A PENDING record nobody renews (its owner crashed) is reconciled, not waited on forever."""
    client = await make_proxy(reconcile={"probe": LOOKUP, "found": {"status": 201}})
    await client.post("/items", json={}, headers={"Idempotency-Key": "warm"})
    crashed = (await record_of(store, "warm")).evolve(
        op_id=op_id_for("op-1"), state=State.PENDING, fence=1, owner="crashed:1", lease_until_ms=1, response=None
    )
    crashed = crashed.evolve(scope=crashed.scope.__class__(caller="anonymous", route="root", key="op-1"))
    assert await store.reserve(crashed, crashed.evidence[0]) is None
    upstream.effects.append(upstream.effects[0].__class__("POST", "/items", {"Idempotency-Key": "op-1"}, b"{}"))

    retry = await client.post("/items", json={}, headers=KEY)

    assert retry.status == 201
    record = await record_of(store)
    assert (record.state, record.retry_class) == (State.COMPLETED, RetryClass.LEASE_EXPIRED)
    assert kinds(record)[-2:] == ["claimed", "probe"]
    assert upstream.count() == 2  # the "warm" call and the crashed owner's effect; no new one


async def test_owner_paused_past_its_lease_before_sending_never_sends(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, monkeypatch: Any
) -> None:
    """A process stalled between reserving and sending (GC pause, SIGSTOP) must not send:
    a reconciler may already have proven the effect absent and released the operation."""
    client = await make_proxy(connect_timeout="100ms", read_timeout="200ms", lease="400ms")
    reserve = store.reserve

    async def reserve_then_stall(*args: Any) -> Any:
        reserved = await reserve(*args)
        await asyncio.sleep(0.5)  # the injected fault: the owner stalls past its 400 ms lease
        return reserved

    monkeypatch.setattr(store, "reserve", reserve_then_stall)
    stalled = await client.post("/items", json={}, headers=KEY)
    monkeypatch.undo()
    record = await record_of(store)

    assert stalled.status == 503
    assert await problem_type(stalled) == "lease-lost"
    assert (record.state, record.retry_class) == (State.RELEASED, RetryClass.NOT_SENT)
    assert upstream.count() == 0
    retry = await client.post("/items", json={}, headers=KEY)
    assert retry.status == 201
    assert upstream.count() == 1


async def test_late_success_of_a_fenced_owner_corrects_a_wrongly_released_operation(store: Store) -> None:
    """If a zombie's request did take effect after a probe found nothing, its late
    success must put the ledger right before anyone forwards the operation again."""
    ledger = Ledger(store)
    scope = Scope(caller="anonymous", route="root", key="op-1")
    request = OperationRequest(op_id_for("op-1"), scope, "fp", "POST", "/items", 5.0, 1.0, 5)
    owned = await ledger.begin(request)
    assert isinstance(owned, Owned)
    zombie = owned.record
    claimed = zombie.evolve(state=State.UNKNOWN, fence=2, owner="reconciler:1")
    assert await store.transition(Transition(claimed, 1, frozenset({State.PENDING}), Evidence(1, "claimed"))) is None
    released = claimed.evolve(state=State.RELEASED, fence=3, owner="")
    assert await store.transition(Transition(released, 2, frozenset({State.UNKNOWN}), Evidence(2, "probe"))) is None

    response = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id": 1}', 9, "sha")
    current = await ledger.finish(zombie, COMPLETED_OUTCOME, response, 60.0, {"status": 201})

    assert current is not None
    stored = await record_of(store)
    assert (stored.state, stored.reconciled) == (State.COMPLETED, True)
    assert stored.response is not None
    assert stored.response.body == b'{"id": 1}'
    assert kinds(stored)[-2:] == ["late-outcome", "corrected"]

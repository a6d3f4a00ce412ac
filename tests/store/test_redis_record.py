"""The Redis record layout (``store.redis_record``): exact round trips, and what one record costs in Redis."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredRequest, StoredResponse
from idemproxy.protocol.keys import Scope
from idemproxy.store import Transition, redis_record
from idemproxy.store.base import Lease
from idemproxy.store.redis import RedisStore
from idemproxy.store.redis_schema import NOTE, RedisKeys
from tests.support.redis_server import RedisServer

# -- strategies -------------------------------------------------------------------------------

ms = st.integers(min_value=0, max_value=2**50)
counts = st.integers(min_value=0, max_value=2**31)
text = st.text(max_size=40)
digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(bytes.hex),  # what the proxy writes: kept as 32 raw bytes
    st.binary(min_size=32, max_size=32).map(lambda raw: raw.hex().upper()),
    st.text(max_size=80),
)
headers = st.lists(st.tuples(text, text), max_size=5).map(tuple)
bodies = st.binary(max_size=2048)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)


@st.composite
def responses(draw: st.DrawFn) -> StoredResponse:
    status = draw(st.integers(min_value=100, max_value=599))
    body = draw(st.none() | bodies)
    if body is not None and draw(st.booleans()):  # as the proxy records one: the body's own size and digest
        return StoredResponse(status, draw(headers), body, len(body), hashlib.sha256(body).hexdigest())
    return StoredResponse(status, draw(headers), body, draw(counts), draw(digests))


evidence = st.builds(Evidence, at_ms=ms, kind=text, detail=st.dictionaries(text, json_values, max_size=4))
records = st.builds(
    OperationRecord,
    op_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    scope=st.builds(Scope, caller=text, route=text, key=text, task=st.none() | text),
    state=st.sampled_from(State),
    fence=counts,
    fingerprint=digests,
    attempt=counts,
    owner=text,
    lease_until_ms=ms,
    method=text,
    target=text,
    created_ms=ms,
    updated_ms=ms,
    retry_class=st.none() | st.sampled_from(RetryClass),
    response=st.none() | responses(),
    reconciled=st.booleans(),
    probes=counts,
    next_probe_ms=ms,
    attempt_ms=ms,
    request=st.none() | st.builds(StoredRequest, headers=headers, body=bodies),
    evidence=st.lists(evidence, max_size=4).map(tuple),
)


def packed(record: OperationRecord) -> bytes:
    return redis_record.pack(record, b"".join(redis_record.pack_evidence(entry) for entry in record.evidence))


# -- round trips ---------------------------------------------------------------------------------


@given(records)
def test_a_record_round_trips_exactly(record: OperationRecord) -> None:
    value = packed(record)
    assert redis_record.unpack(record.op_id, value) == record
    assert redis_record.unpack(record.op_id, value, with_evidence=False) == record.evolve(evidence=())


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis(port=redis_server.port) as connection:
        yield connection


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=records, extra=evidence)
def test_a_record_survives_being_repacked_by_a_script(
    client: redis.Redis, record: OperationRecord, extra: Evidence
) -> None:
    """NOTE (like RENEW) re-packs the record with Redis's cmsgpack: the bytes
    it reads back as strings must come out as they went in."""
    key = RedisKeys("test-record").record(record.op_id)
    client.set(key, packed(record), px=60_000)
    assert client.eval(NOTE, 1, key, redis_record.pack_evidence(extra)) == 1
    value = client.get(key)
    assert isinstance(value, bytes)
    assert redis_record.unpack(record.op_id, value) == record.evolve(evidence=(*record.evidence, extra))
    assert 0 < int(client.pttl(key)) <= 60_000  # kept its TTL


def test_a_hex_fingerprint_is_kept_as_its_raw_bytes() -> None:
    record = realistic("9c0f3e5d7a1b2c4d6e8f0a1b2c3d4e5f", 1_795_497_145_432)
    value = packed(record)
    assert bytes.fromhex(record.fingerprint) in value
    assert record.fingerprint.encode() not in value


# -- through the scripts ---------------------------------------------------------------------


def realistic(op_id: str, now: int) -> OperationRecord:
    """A PENDING record as the proxy reserves one for a JSON tool call."""
    return OperationRecord(
        op_id=op_id,
        scope=Scope(caller="agent-executor", route="tickets", key="6f1c2a9e-3b7d-4e2a-9c1f-8d5b7a2e4c10", task="t-42"),
        state=State.PENDING,
        fence=1,
        fingerprint=hashlib.sha256(op_id.encode()).hexdigest(),
        attempt=1,
        owner="idemproxy-7d9f8c-x2k4q:4711:5be3a1:1093",
        lease_until_ms=now + 30_000,
        method="POST",
        target="/v1/tickets?project=ops",
        created_ms=now,
        updated_ms=now,
        attempt_ms=now,
    )


def realistic_response() -> StoredResponse:
    body = (
        b'{"id":"tkt_01J9ZK3QF7M2XH5W8R6N4T1VBC","status":"created","title":"Disk full on db-3",'
        b'"queue":"ops","priority":"high","assignee":null,"created_at":"2026-11-24T05:12:25Z"}'
    )
    return StoredResponse(
        status=201,
        headers=(
            ("Content-Type", "application/json; charset=utf-8"),
            ("Date", "Tue, 24 Nov 2026 05:12:25 GMT"),
            ("Server", "nginx/1.22.1"),
            ("Location", "/v1/tickets/tkt_01J9ZK3QF7M2XH5W8R6N4T1VBC"),
            ("X-Request-Id", "req_7Hq2LmN9pXv4"),
            ("ETag", '"33a64df551425fcc55e4d42a148795d9"'),
        ),
        body=body,
        body_size=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


async def complete(store: RedisStore, pending: OperationRecord, response: StoredResponse) -> OperationRecord:
    """Record ``response`` the way the ledger does: lease off, a day's retention."""
    now = pending.updated_ms + 87
    done = pending.evolve(state=State.COMPLETED, response=response, updated_ms=now, lease_until_ms=0)
    detail = {"status": response.status, "size": response.body_size}
    applied = await store.transition(
        Transition(done, pending.fence, frozenset({State.PENDING}), Evidence(now, "completed", detail), ttl_s=86_400)
    )
    assert applied is None
    return done


async def test_a_completed_record_costs_redis_under_1_kib_besides_its_body(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    await store.start()
    try:
        pending = realistic("9c0f3e5d7a1b2c4d6e8f0a1b2c3d4e5f", 1_795_497_145_432)
        reserved = Evidence(pending.created_ms, "reserved", {"attempt": 1, "owner": pending.owner})
        assert await store.reserve(pending, reserved) is None
        response = realistic_response()
        await complete(store, pending, response)
    finally:
        await store.close()
    async with aioredis.Redis.from_url(redis_url) as client:
        usage = int(await client.memory_usage(store.keys.record(pending.op_id), samples=0))
    assert response.body is not None
    assert usage - len(response.body) < 1024, f"MEMORY USAGE {usage} B, of which the body is {len(response.body)} B"


async def test_renew_and_note_keep_binary_bodies_intact(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    await store.start()
    try:
        request = StoredRequest(
            headers=(("Content-Type", "application/octet-stream"), ("X-Ünïcode", "✓")), body=b"\xff\x00\xfe"
        )
        # A lease that has not ended by the server's clock: an ended one is never renewed.
        pending = realistic("0123456789abcdef0123456789abcdef", store.clock.now_ms()).evolve(request=request)
        reserved = Evidence(pending.created_ms, "reserved", {"attempt": 1, "owner": pending.owner})
        assert await store.reserve(pending, reserved) is None
        assert await store.renew([Lease(pending.op_id, pending.fence, pending.owner, 60_000)]) == [True]
        probe = Evidence(pending.created_ms + 1, "probe", {"result": "unknown", "body": "non-ascii ✓"})
        assert await store.note(pending.op_id, probe)
        renewed = await store.get(pending.op_id)
        assert renewed is not None
        assert renewed.lease_until_ms > pending.lease_until_ms
        expected = pending.evolve(lease_until_ms=renewed.lease_until_ms, evidence=(reserved, probe))
        assert await store.get(pending.op_id) == expected
        body = bytes(range(256)) * 8  # not UTF-8, and larger than the digest is recomputed for
        response = realistic_response()
        response = StoredResponse(201, response.headers, body, len(body), hashlib.sha256(body).hexdigest())
        done = await complete(store, expected, response)
        assert await store.note(pending.op_id, probe)
        stored = await store.get(pending.op_id)
        assert stored is not None
        assert stored.evolve(evidence=()) == done.evolve(evidence=())
        assert [entry.kind for entry in stored.evidence] == ["reserved", "probe", "completed", "probe"]
    finally:
        await store.close()

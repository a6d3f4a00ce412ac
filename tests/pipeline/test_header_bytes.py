"""A tool's answer is kept and replayed byte for byte, header values included, and an
answer that cannot be kept still completes its operation (issue 22, item 7).

Header values travel as ``str``: the wire bytes decoded as UTF-8 with
``surrogateescape`` (``upstream_client``), written back the same way
(``http_server``); bytes that are not UTF-8 become lone surrogates, which
neither store's serializer takes as they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from hypothesis import given
from hypothesis import strategies as st

from idemproxy import metrics
from idemproxy.app import build_admin_app
from idemproxy.lifecycle.records import Evidence, OperationRecord, State, StoredRequest, StoredResponse
from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store, Transition, codec, redis_record
from idemproxy.store.base import RecordNotStorable
from idemproxy.store.redis_schema import RedisKeys
from idemproxy.store.sqlite import SqliteStore
from tests.conftest import ProxyFactory, proxy_config
from tests.support.proxy_server import proxy_app
from tests.support.upstream import Upstream
from tests.support.wire import Connection, until

KEY = "op-bytes-1"
HIGH_BYTES = bytes(range(0x80, 0x100))
#: What the tool answers with: not UTF-8, every high byte, and UTF-8 text mixed with an
#: encoded surrogate and a truncated sequence.
TOOL_HEADERS = (
    (b"X-Foo", b"\xff\xfe"),
    (b"X-High", HIGH_BYTES),
    (b"X-Mixed", "caf\u00e9".encode() + b" \xed\xa0\x80 \xc3"),
    (b"X-Text", "na\u00efve \u2014 ok".encode()),
)
TOOL_BODY = b'{"id":"tkt_1","status":"created"}'


def wire(value: bytes) -> str:
    """``value`` as the proxy carries a header value (``upstream_client``)."""
    return value.decode("utf-8", "surrogateescape")


def op_id_for(key: str) -> str:
    return operation_id(Scope(caller="anonymous", route="root", key=key))


# -- a tool that writes its answer's bytes itself (aiohttp will not send such header values) ----


class RawTool:
    """Answers every request with ``TOOL_HEADERS`` and ``body``, counting each as an effect
    (``arrived`` is set then); with a ``gate``, answers only once it is set."""

    def __init__(self) -> None:
        self.effects = 0
        self.url = ""
        self.body = TOOL_BODY
        self.arrived = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def answer(self) -> bytes:
        head = [b"HTTP/1.1 201 Created", b"Content-Type: application/json"]
        head += [name + b": " + value for name, value in TOOL_HEADERS]
        head.append(b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:  # keep-alive: the proxy pools its connection to the tool
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.effects += 1
                self.arrived.set()
                if self.gate is not None:
                    await self.gate.wait()
                writer.write(self.answer())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed its connection
        finally:
            self._writers.discard(writer)
            writer.close()

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()  # an answer still held back (a failed test) is let go
        for writer in list(self._writers):
            writer.close()


@pytest.fixture
async def raw_tool() -> AsyncIterator[RawTool]:
    tool = RawTool()
    server = await asyncio.start_server(tool.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tool.url = f"http://127.0.0.1:{port}"
    yield tool
    server.close()
    tool.close()
    await server.wait_closed()


def effect_number(body: bytes) -> int:
    """Which effect of the test upstream's ``/items`` ``body`` reports."""
    effect: int = orjson.loads(body)["effect"]
    return effect


def tool_headers(response: ClientResponse) -> list[tuple[bytes, bytes]]:
    """The tool's own headers among ``response``'s raw header bytes, in order."""
    names = {name.lower() for name, _ in TOOL_HEADERS}
    return [(name, value) for name, value in response.raw_headers if name.lower() in names]


async def problem(response: ClientResponse) -> dict[str, Any]:
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    return body


# -- through the proxy -------------------------------------------------------------------------------


async def test_header_bytes_reach_the_first_caller_and_every_replay_exactly(
    make_proxy: ProxyFactory, raw_tool: RawTool, store: Store, store_url: str
) -> None:
    client = await make_proxy(proxy_config(raw_tool.url, store_url))
    first = await client.post("/tickets", json={"title": "a"}, headers={"Idempotency-Key": KEY})
    first_body = await first.read()
    retries = [await client.post("/tickets", json={"title": "a"}, headers={"Idempotency-Key": KEY}) for _ in range(2)]

    assert (first.status, first_body) == (201, TOOL_BODY)
    assert tool_headers(first) == list(TOOL_HEADERS)
    for retry in retries:
        assert (retry.status, await retry.read()) == (201, TOOL_BODY)
        assert tool_headers(retry) == list(TOOL_HEADERS)
        assert retry.headers["Idempotent-Replayed"] == "true"
    assert raw_tool.effects == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.response is not None
    kept = {name.encode(): value.encode("utf-8", "surrogateescape") for name, value in record.response.headers}
    assert [(name, kept[name]) for name, _ in TOOL_HEADERS] == list(TOOL_HEADERS)


async def test_the_operations_api_shows_header_bytes_escaped(
    make_proxy: ProxyFactory, aiohttp_client: Any, raw_tool: RawTool, store: Store, store_url: str
) -> None:
    config = proxy_config(raw_tool.url, store_url)
    client = await make_proxy(config)
    assert (await client.post("/tickets", json={"title": "a"}, headers={"Idempotency-Key": KEY})).status == 201
    admin = await aiohttp_client(build_admin_app(store, config))

    shown = await admin.get(f"/_idem/ops/{op_id_for(KEY)}")

    assert shown.status == 200
    headers = (await shown.json())["response"]["headers"]
    assert headers["X-Foo"] == "\\xff\\xfe"
    assert headers["X-Text"] == "na\u00efve \u2014 ok"


async def test_a_caller_gone_before_a_large_answer_streams_does_not_leave_the_operation_pending(
    make_proxy: ProxyFactory, raw_tool: RawTool, store: Store, store_url: str
) -> None:
    """The answer is over ``max_stored_response``, so it is streamed to the first caller; that
    caller hung up while the tool worked. The answer is still read to its end and recorded."""
    raw_tool.body = b"x" * 100_000
    raw_tool.gate = asyncio.Event()
    client = await make_proxy(proxy_config(raw_tool.url, store_url, max_stored_response="1KiB", wait="10s"))
    listener = proxy_app(client).http_server
    caller = await Connection.open(client.server.port, host=client.server.host)
    await caller.send(
        f"POST /tickets HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".encode()
    )
    await raw_tool.arrived.wait()
    await caller.close()
    await until(lambda: not listener.connections)  # the proxy saw the caller go
    raw_tool.gate.set()
    retry = await client.post("/tickets", json={}, headers={"Idempotency-Key": KEY})

    assert retry.status == 409
    body = await problem(retry)
    assert body["type"] == "urn:idemproxy:problem:response-not-stored"
    assert (body["original_status"], body["body_size"]) == (201, 100_000)
    assert raw_tool.effects == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert record.state is State.COMPLETED


async def test_a_failure_after_the_tool_answered_leaves_the_outcome_unknown_never_pending(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything that breaks once the request may have been sent (here the upstream timer,
    as the tool's answer is in) is an outcome nobody knows: UNKNOWN, reconciled, never resent."""

    class Broken:
        def observe(self, seconds: float) -> None:
            raise RuntimeError("a bug after the tool answered")

    monkeypatch.setattr(metrics, "_upstream_seconds", lambda route, method: Broken())
    client = await make_proxy(wait="0s")
    first = await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY})
    retry = await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY})

    assert first.status == 409  # not a 500
    assert (await problem(first))["type"] == "urn:idemproxy:problem:outcome-unknown"
    assert retry.status == 409
    assert (await problem(retry))["type"] == "urn:idemproxy:problem:needs-attention"  # no probe configured
    assert upstream.count() == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert record.state is State.NEEDS_ATTENTION
    unknown = next(entry for entry in record.evidence if entry.kind == "unknown")
    assert unknown.detail["failure"] == "internal-error"


def rejecting_completions(store: Store, error: Callable[[], Exception], *, even_without_body: bool) -> None:
    """Make ``store`` refuse to complete an operation with its answer's body, or (with
    ``even_without_body``) to complete one at all, as a store does with an answer its
    format cannot hold; every other call reaches the real store."""
    transition = store.transition

    async def refuse(change: Transition) -> OperationRecord | None:
        response = change.new.response
        if change.new.state is State.COMPLETED and (even_without_body or (response and response.body is not None)):
            raise error()
        return await transition(change)

    store.transition = refuse  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: RecordNotStorable("the answer is over the store's size limit"), id="not-storable"),
        pytest.param(lambda: RuntimeError("a bug in the store"), id="unexpected"),
    ],
)
async def test_an_answer_the_store_refuses_completes_the_operation_without_it(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, error: Callable[[], Exception]
) -> None:
    rejecting_completions(store, error, even_without_body=False)
    client = await make_proxy()
    first = await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY})
    first_body = await first.read()
    retries = [await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY}) for _ in range(2)]

    assert first.status == 201  # the tool's real answer, not a 500
    assert effect_number(first_body) == 1
    answers = [(retry.status, await problem(retry)) for retry in retries]
    assert answers[0] == answers[1]
    status, body = answers[0]
    assert status == 409
    assert body["type"] == "urn:idemproxy:problem:response-not-stored"
    assert (body["original_status"], body["body_size"]) == (201, len(first_body))
    assert body["body_sha256"] == hashlib.sha256(first_body).hexdigest()
    assert "could not be stored" in body["detail"]
    assert upstream.count() == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.response is not None
    assert (record.response.body, record.response.headers) == (None, ())
    assert record.response.not_stored_reason is not None
    assert record.evidence[-1].detail["not_stored"] == record.response.not_stored_reason


async def test_when_not_even_the_outcome_can_be_stored_the_caller_still_gets_the_answer_and_nothing_is_resent(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    rejecting_completions(store, lambda: RuntimeError("a bug in the store"), even_without_body=True)
    client = await make_proxy(wait="0s")
    first = await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY})
    retry = await client.post("/items", json={"title": "a"}, headers={"Idempotency-Key": KEY})

    assert first.status == 201
    assert effect_number(await first.read()) == 1
    assert retry.status == 409  # the record stays PENDING until its lease ends: never a second forward
    assert (await problem(retry))["type"] == "urn:idemproxy:problem:operation-in-flight"
    assert upstream.count() == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert record.state is State.PENDING


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sqlite_refusing_an_answer_over_its_length_limit_completes_the_operation_without_it(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    assert isinstance(store, SqliteStore)
    # SQLite's real refusal (SQLITE_TOOBIG), lowered to within test sizes: a reservation fits, the answer not.
    store._conn().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 16 * 1024)
    client = await make_proxy(max_stored_response="1MiB")
    first = await client.post("/big/100000", json={}, headers={"Idempotency-Key": KEY})
    first_body = await first.read()
    retry = await client.post("/big/100000", json={}, headers={"Idempotency-Key": KEY})

    assert (first.status, first_body) == (200, b"x" * 100000)
    assert retry.status == 409
    body = await problem(retry)
    assert body["type"] == "urn:idemproxy:problem:response-not-stored"
    assert (body["original_status"], body["body_size"]) == (200, 100000)
    assert upstream.count() == 1
    record = await store.get(op_id_for(KEY))
    assert record is not None
    assert (record.state, record.response and record.response.body) == (State.COMPLETED, None)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_request_the_ledger_cannot_hold_is_refused_before_anything_is_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    assert isinstance(store, SqliteStore)
    store._conn().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 16 * 1024)
    # resend_safe keeps the request in the record, so its body must fit the ledger.
    client = await make_proxy(reconcile={"resend_safe": True})

    response = await client.post("/items", data=b"x" * 100000, headers={"Idempotency-Key": KEY})

    assert response.status == 413
    assert (await problem(response))["type"] == "urn:idemproxy:problem:body-too-large"
    assert upstream.count() == 0
    assert await store.get(op_id_for(KEY)) is None


# -- both codecs -------------------------------------------------------------------------------------


def completed(
    headers: tuple[tuple[str, str], ...], request_headers: tuple[tuple[str, str], ...] = ()
) -> OperationRecord:
    now = 1_795_497_145_432
    return OperationRecord(
        op_id="ab" + "0" * 62,
        scope=Scope(caller="agent-1", route="tickets", key="k-1"),
        state=State.COMPLETED,
        fence=1,
        fingerprint=hashlib.sha256(b"fp").hexdigest(),
        attempt=1,
        owner="host:1:abc:1",
        lease_until_ms=0,
        method="POST",
        target="/tickets",
        created_ms=now,
        updated_ms=now + 5,
        attempt_ms=now,
        response=StoredResponse(201, headers, TOOL_BODY, len(TOOL_BODY), hashlib.sha256(TOOL_BODY).hexdigest()),
        request=StoredRequest(request_headers, b"{}") if request_headers else None,
    )


def sqlite_round_trip(record: OperationRecord) -> OperationRecord:
    return codec.decode(record.op_id, codec.encode(record))


def redis_round_trip(record: OperationRecord) -> OperationRecord:
    return redis_record.unpack(record.op_id, redis_record.pack(record, b""))


ROUND_TRIPS = [
    pytest.param(sqlite_round_trip, id="sqlite"),
    pytest.param(redis_round_trip, id="redis"),
]


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_every_high_byte_in_a_header_value_round_trips(
    round_trip: Callable[[OperationRecord], OperationRecord],
) -> None:
    headers = (
        *((f"X-{byte:02x}", wire(bytes([byte]))) for byte in HIGH_BYTES),
        ("X-All", wire(HIGH_BYTES)),
        ("X-Text", "caf\u00e9"),
    )
    record = completed(headers, request_headers=headers)

    back = round_trip(record)

    assert back == record
    assert back.response is not None
    assert [value.encode("utf-8", "surrogateescape") for _, value in back.response.headers[:128]] == [
        bytes([byte]) for byte in HIGH_BYTES
    ]


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@given(values=st.lists(st.binary(max_size=24), min_size=1, max_size=6))
def test_any_header_bytes_round_trip(
    round_trip: Callable[[OperationRecord], OperationRecord], values: list[bytes]
) -> None:
    record = completed(tuple((f"X-{index}", wire(value)) for index, value in enumerate(values)))

    back = round_trip(record)

    assert back.response is not None
    assert [value.encode("utf-8", "surrogateescape") for _, value in back.response.headers] == values


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(codec.encode, id="sqlite"),
        pytest.param(lambda record: redis_record.pack(record, b""), id="redis"),
    ],
)
def test_a_value_no_wire_bytes_decode_to_is_refused_as_not_storable(encode: Callable[[OperationRecord], Any]) -> None:
    """A lone high surrogate is what no header bytes decode to: the store says so, by type."""
    with pytest.raises(RecordNotStorable):
        encode(completed((("X-Bad", "\ud800"),)))


async def test_a_store_refusing_a_record_leaves_the_stored_one_unchanged(store: Store) -> None:
    pending = completed(()).evolve(state=State.PENDING, response=None, lease_until_ms=1_795_497_175_432)
    assert await store.reserve(pending, Evidence(pending.created_ms, "reserved")) is None
    bad = completed((("X-Bad", "\ud800"),))

    with pytest.raises(RecordNotStorable):
        await store.transition(Transition(bad, 1, frozenset({State.PENDING}), Evidence(bad.updated_ms, "completed")))

    current = await store.get(pending.op_id)
    assert current is not None
    assert current.evolve(evidence=()) == pending


# -- records written before header bytes were kept (the format that must stay readable) ------------

OLD_SCOPE = Scope(caller="agent-1", route="tickets", key="k-\u00e9t\u00e9", task="t-42")
OLD_BODY = b'{"id":"tkt_1","title":"caf\xc3\xa9"}'
OLD_EVIDENCE = (
    Evidence(1_795_497_145_432, "reserved", {"attempt": 1, "owner": "host:4711:5be3a1:7"}),
    Evidence(1_795_497_145_519, "completed", {"status": 201, "size": 30}),
)
OLD_COMPLETED = OperationRecord(
    op_id="5f" + "0" * 62,
    scope=OLD_SCOPE,
    state=State.COMPLETED,
    fence=2,
    fingerprint=hashlib.sha256(b"fp").hexdigest(),
    attempt=1,
    owner="host:4711:5be3a1:7",
    lease_until_ms=0,
    method="POST",
    target="/v1/tickets?project=ops",
    created_ms=1_795_497_145_432,
    updated_ms=1_795_497_145_519,
    response=StoredResponse(
        201,
        (
            ("Content-Type", "application/json; charset=utf-8"),
            ("X-Title", "caf\u00e9 \u2014 \U0001f600"),
            ("ETag", '"1"'),
        ),
        OLD_BODY,
        len(OLD_BODY),
        hashlib.sha256(OLD_BODY).hexdigest(),
    ),
    attempt_ms=1_795_497_145_432,
    request=StoredRequest((("Content-Type", "application/json"), ("X-Note", "na\u00efve")), b'{"title":"a"}'),
    evidence=OLD_EVIDENCE,
)
OLD_NOT_KEPT = OLD_COMPLETED.evolve(
    op_id="6a" + "1" * 62,
    request=None,
    response=StoredResponse(
        200,
        (("Content-Type", "application/octet-stream"),),
        None,
        200000,
        hashlib.sha256(b"x" * 200000).hexdigest(),
    ),
)

#: The SQLite columns the code before this change wrote for each (``codec.encode``, evidence appended).
OLD_SQLITE_ROWS = {
    OLD_COMPLETED.op_id: {
        "s": "COMPLETED",
        "f": 2,
        "fp": "5aef96240bca5582e6fd0468879a26863d81d1c1fb602def55926ef33ec8bb1f",
        "a": 1,
        "o": "host:4711:5be3a1:7",
        "l": 0,
        "m": b'{"scope":["agent-1","tickets","k-\xc3\xa9t\xc3\xa9","t-42"],"method":"POST",'
        b'"target":"/v1/tickets?project=ops","created_ms":1795497145432,"updated_ms":1795497145519,'
        b'"attempt_ms":1795497145432,"request_headers":[["Content-Type","application/json"],'
        b'["X-Note","na\xc3\xafve"]],"response":{"status":201,"headers":[["Content-Type",'
        b'"application/json; charset=utf-8"],["X-Title","caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80"],'
        b'["ETag","\\"1\\""]],"size":30,'
        b'"sha256":"8c1cc44b9fbff906c4aca4fb74960ab059fe07fd2b23f19519fca12a552e9ce6","stored":true}}',
        "b": OLD_BODY,
        "q": b'{"title":"a"}',
        "e": b'{"at_ms":1795497145432,"kind":"reserved","attempt":1,"owner":"host:4711:5be3a1:7"}\n'
        b'{"at_ms":1795497145519,"kind":"completed","status":201,"size":30}',
    },
    OLD_NOT_KEPT.op_id: {
        "s": "COMPLETED",
        "f": 2,
        "fp": "5aef96240bca5582e6fd0468879a26863d81d1c1fb602def55926ef33ec8bb1f",
        "a": 1,
        "o": "host:4711:5be3a1:7",
        "l": 0,
        "m": b'{"scope":["agent-1","tickets","k-\xc3\xa9t\xc3\xa9","t-42"],"method":"POST",'
        b'"target":"/v1/tickets?project=ops","created_ms":1795497145432,"updated_ms":1795497145519,'
        b'"attempt_ms":1795497145432,"response":{"status":200,"headers":[["Content-Type",'
        b'"application/octet-stream"]],"size":200000,'
        b'"sha256":"91e3faafd322bcdf160f3f0ce886acb092b9b9e2a1e8526b40f21a8898a8700b","stored":false}}',
        "b": b"",
        "q": b"",
        "e": b'{"at_ms":1795497145432,"kind":"reserved","attempt":1,"owner":"host:4711:5be3a1:7"}\n'
        b'{"at_ms":1795497145519,"kind":"completed","status":201,"size":30}',
    },
}
#: The Redis values (``redis_record.pack``) the code before this change wrote for each.
OLD_REDIS_VALUES = {
    OLD_COMPLETED.op_id: bytes.fromhex(
        "98a9434f4d504c4554454402b2686f73743a343731313a3562653361313a3700da00f89dc4205aef96240bca5582e6fd04"
        "68879a26863d81d1c1fb602def55926ef33ec8bb1f01a76167656e742d31a77469636b657473a76b2dc3a974c3a9a4742d"
        "3432a4504f5354b72f76312f7469636b6574733f70726f6a6563743d6f7073cf000001a20bf83458570092ccc996ac436f"
        "6e74656e742d54797065bf6170706c69636174696f6e2f6a736f6e3b20636861727365743d7574662d38a7582d5469746c"
        "65ae636166c3a920e2809420f09f9880a445546167a322312281af726571756573745f6865616465727394ac436f6e7465"
        "6e742d54797065b06170706c69636174696f6e2f6a736f6ea6582d4e6f7465a66e61c3af7665be7b226964223a22746b74"
        "5f31222c227469746c65223a22636166c3a9227dad7b227469746c65223a2261227dda005a93cf000001a20bf83458a872"
        "6573657276656482a7617474656d707401a56f776e6572b2686f73743a343731313a3562653361313a3793cf000001a20b"
        "f834afa9636f6d706c6574656482a6737461747573ccc9a473697a651e"
    ),
    OLD_NOT_KEPT.op_id: bytes.fromhex(
        "98a9434f4d504c4554454402b2686f73743a343731313a3562653361313a3700da00ba9cc4205aef96240bca5582e6fd04"
        "68879a26863d81d1c1fb602def55926ef33ec8bb1f01a76167656e742d31a77469636b657473a76b2dc3a974c3a9a4742d"
        "3432a4504f5354b72f76312f7469636b6574733f70726f6a6563743d6f7073cf000001a20bf83458570094ccc892ac436f"
        "6e74656e742d54797065b86170706c69636174696f6e2f6f637465742d73747265616dce00030d40c42091e3faafd322bc"
        "df160f3f0ce886acb092b9b9e2a1e8526b40f21a8898a8700bc2c2da005a93cf000001a20bf83458a87265736572766564"
        "82a7617474656d707401a56f776e6572b2686f73743a343731313a3562653361313a3793cf000001a20bf834afa9636f6d"
        "706c6574656482a6737461747573ccc9a473697a651e"
    ),
}


async def write_old_record(store_url: str, op_id: str) -> None:
    """Put ``op_id``'s record into the store as the previous version wrote it (in SQLite,
    under the columns' current names: opening the file renamed them, ``test_migrations``)."""
    if store_url.startswith("sqlite:///"):
        row = OLD_SQLITE_ROWS[op_id]
        columns = [codec.V1_COLUMNS[name] for name in row]
        with sqlite3.connect(Path(store_url.removeprefix("sqlite:///"))) as db:
            db.execute(
                f"INSERT INTO operations (op_id, {', '.join(columns)}, due_ms, updated_ms, expires_ms)"
                f" VALUES (?, {', '.join('?' * len(row))}, NULL, ?, NULL)",
                (op_id, *row.values(), 1_795_497_145_519),
            )
        return
    client = aioredis.from_url(store_url)
    try:
        await client.set(RedisKeys("idem").record(op_id), OLD_REDIS_VALUES[op_id])
    finally:
        await client.aclose()


@pytest.mark.parametrize("old", [OLD_COMPLETED, OLD_NOT_KEPT], ids=["completed", "body-not-kept"])
async def test_a_record_the_previous_version_wrote_still_reads_the_same(
    store: Store, store_url: str, old: OperationRecord
) -> None:
    await write_old_record(store_url, old.op_id)

    assert await store.get(old.op_id) == old


@pytest.mark.parametrize("old", [OLD_COMPLETED, OLD_NOT_KEPT], ids=["completed", "body-not-kept"])
def test_a_record_of_utf8_text_is_written_as_the_previous_version_wrote_it(old: OperationRecord) -> None:
    """Only values that are not UTF-8 text change the layout: an older proxy sharing the
    store during a rolling upgrade reads everything else."""
    fields = codec.encode(old)
    row = OLD_SQLITE_ROWS[old.op_id]
    assert (fields[codec.META], fields[codec.BODY], fields[codec.REQUEST_BODY]) == (row["m"], row["b"], row["q"])
    evidence = b"".join(redis_record.pack_evidence(entry) for entry in old.evidence)
    assert redis_record.pack(old, evidence) == OLD_REDIS_VALUES[old.op_id]

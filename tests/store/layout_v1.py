"""The records in the version-1 store fixtures (``tests/store/fixtures``), and how they were written.

``fixtures/ledger-v1.sqlite3`` and ``fixtures/ledger-v1.rdb`` were written by
``fixtures/make_v1.py`` with the code before the readable store layouts (SQLite
columns ``s f fp a o l m b q e``, schema version 1): each record was reserved
and then moved through ``MOVES`` by the stores themselves, so the files hold
exactly what that version wrote, indexes, due times and expiry included.

``V1_RECORDS`` is what each record reads back as (evidence included). The two
``anonymous``/``root`` records are the proxy's own for ``REQUEST`` under their
key: ``COMPLETED_KEY`` replays, ``PENDING_KEY`` is in progress until 2100.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredRequest, StoredResponse
from idemproxy.protocol.keys import Scope, fingerprint, operation_id

T0 = 1_795_497_145_432
#: A lease that outlives every test run (2100-01-01).
FAR_LEASE_MS = 4_102_444_800_000
#: Retention of the resolved records that have one: 50 years, so the fixture never expires.
LONG_TTL_S = 50 * 365 * 86_400.0

#: The request the proxy-owned records were made for (``POST /v1/tickets?project=ops``, no
#: fingerprint headers configured).
REQUEST_PATH = "/v1/tickets"
REQUEST_QUERY = "project=ops"
REQUEST_HEADERS = {"Content-Type": "application/json"}
REQUEST_BODY = b'{"title":"Disk full on db-3","queue":"ops"}'
REQUEST_FP = fingerprint("POST", REQUEST_PATH, REQUEST_QUERY, REQUEST_HEADERS, (), REQUEST_BODY)
COMPLETED_KEY = "v1-completed"
PENDING_KEY = "v1-pending"

HIGH_BYTES = bytes(range(0x80, 0x100))
#: Response headers as the proxy carries them: not UTF-8 bytes as lone surrogates.
RAW_HEADERS = (
    ("Content-Type", "application/json"),
    ("X-Foo", b"\xff\xfe".decode("utf-8", "surrogateescape")),
    ("X-High", HIGH_BYTES.decode("utf-8", "surrogateescape")),
    ("X-Mixed", ("caf\u00e9".encode() + b" \xed\xa0\x80 \xc3").decode("utf-8", "surrogateescape")),
    ("X-Text", "na\u00efve \u2014 ok"),
)
COMPLETED_BODY = b'{"id":"tkt_01J9ZK3QF7","status":"created","title":"Disk full on db-3"}'
BIG_BODY = bytes(range(256)) * 16  # 4 KiB, not UTF-8: its digest is kept, not recomputed


def _proxy_scope(key: str) -> Scope:
    return Scope(caller="anonymous", route="root", key=key)


def _op_id(scope: Scope) -> str:
    return operation_id(scope)


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Move:
    """One transition after the reservation: the record becomes ``new`` (evidence aside)."""

    new: OperationRecord
    evidence: Evidence
    ttl_s: float | None = None
    due_ms: int | None = None


@dataclass(frozen=True)
class Written:
    """One record of the fixtures: reserved as ``reserved`` with ``first``, then ``moves``."""

    name: str
    reserved: OperationRecord
    first: Evidence
    moves: tuple[Move, ...]

    @property
    def op_id(self) -> str:
        return self.reserved.op_id

    @property
    def expected(self) -> OperationRecord:
        last = self.moves[-1].new if self.moves else self.reserved
        return last.evolve(evidence=(self.first, *(move.evidence for move in self.moves)))


def _pending(
    scope: Scope, owner: str, *, fingerprint: str = REQUEST_FP, request: StoredRequest | None = None
) -> OperationRecord:
    return OperationRecord(
        op_id=_op_id(scope),
        scope=scope,
        state=State.PENDING,
        fence=1,
        fingerprint=fingerprint,
        attempt=1,
        owner=owner,
        lease_until_ms=T0 + 30_000,
        method="POST",
        target=f"{REQUEST_PATH}?{REQUEST_QUERY}",
        created_ms=T0,
        updated_ms=T0,
        attempt_ms=T0,
        request=request,
    )


def _reserved(record: OperationRecord) -> Evidence:
    return Evidence(record.updated_ms, "reserved", {"attempt": record.attempt, "owner": record.owner})


def _completed() -> Written:
    pending = _pending(_proxy_scope(COMPLETED_KEY), "host-a:4711:5be3a1:1")
    response = StoredResponse(201, RAW_HEADERS, COMPLETED_BODY, len(COMPLETED_BODY), _digest(COMPLETED_BODY))
    done = pending.evolve(state=State.COMPLETED, response=response, lease_until_ms=0, updated_ms=T0 + 87)
    detail = {"status": 201, "size": len(COMPLETED_BODY)}
    return Written(
        "completed",
        pending,
        _reserved(pending),
        (Move(done, Evidence(T0 + 87, "completed", detail), ttl_s=LONG_TTL_S),),
    )


def _pending_record() -> Written:
    """A second attempt, in progress: taken over after the first one's lease ran out."""
    request = StoredRequest(
        (("Content-Type", "application/json"), ("X-Note", b"na\xefve".decode("utf-8", "surrogateescape"))),
        REQUEST_BODY,
    )
    first = _pending(_proxy_scope(PENDING_KEY), "host-a:4711:5be3a1:2", request=request)
    released = first.evolve(
        state=State.RELEASED, retry_class=RetryClass.CONNECT_FAILED, lease_until_ms=0, updated_ms=T0 + 5
    )
    second = released.evolve(
        state=State.PENDING,
        fence=2,
        attempt=2,
        owner="host-b:77:9c0f3e:1",
        lease_until_ms=FAR_LEASE_MS,
        retry_class=None,
        updated_ms=T0 + 900,
        attempt_ms=T0 + 900,
    )
    return Written(
        "pending",
        first,
        _reserved(first),
        (
            Move(released, Evidence(T0 + 5, "released", {"failure": "connect-failed"})),
            Move(second, Evidence(T0 + 900, "taken-over", {"attempt": 2, "owner": second.owner})),
        ),
    )


def _reconciled_big() -> Written:
    """A large binary answer established by a probe, with a stored request and odd header bytes."""
    scope = Scope(caller="agent-\u00e9", route="tickets", key="v1-big", task="t-42")
    request = StoredRequest(
        (
            ("Content-Type", "application/octet-stream"),
            (b"X-\xff".decode("utf-8", "surrogateescape"), "\u2713"),
            ("X-Raw", b"\x80\x81".decode("utf-8", "surrogateescape")),
        ),
        b"\x00\xff\xfe binary request",
    )
    pending = _pending(scope, "host-a:4711:5be3a1:3", request=request, fingerprint="sha256:not-hex")
    unknown = pending.evolve(
        state=State.UNKNOWN,
        fence=2,
        owner="",
        lease_until_ms=0,
        retry_class=RetryClass.READ_TIMEOUT,
        updated_ms=T0 + 30_000,
        attempt_ms=T0 + 30_000,
    )
    response = StoredResponse(200, (("Content-Type", "application/octet-stream"),), BIG_BODY, 4096, _digest(BIG_BODY))
    done = unknown.evolve(
        state=State.COMPLETED,
        fence=3,
        owner="reconciler:host-c:1",
        response=response,
        reconciled=True,
        probes=2,
        next_probe_ms=T0 + 90_000,
        updated_ms=T0 + 91_000,
    )
    return Written(
        "reconciled-big",
        pending,
        _reserved(pending),
        (
            Move(unknown, Evidence(T0 + 30_000, "unknown", {"failure": "read-timeout"}), due_ms=T0 + 60_000),
            Move(
                done,
                Evidence(T0 + 91_000, "probe", {"result": "applied", "nested": [1, 2.5, None, {"a": "\u00e9"}]}),
                ttl_s=LONG_TTL_S,
            ),
        ),
    )


def _not_kept() -> Written:
    scope = Scope(caller="agent-1", route="files", key="v1-not-kept")
    pending = _pending(scope, "host-a:4711:5be3a1:4", fingerprint=_digest(b"upload"))
    response = StoredResponse(200, (), None, 5_000_000, _digest(b"x" * 16), "the store refused the record: too large")
    done = pending.evolve(state=State.COMPLETED, response=response, lease_until_ms=0, updated_ms=T0 + 400)
    return Written(
        "not-kept",
        pending,
        _reserved(pending),
        (Move(done, Evidence(T0 + 400, "completed", {"status": 200, "stored": False})),),
    )


def _unknown() -> Written:
    scope = Scope(caller="agent-1", route="payments", key="v1-unknown", task="run-9")
    pending = _pending(scope, "host-a:4711:5be3a1:5", fingerprint=_digest(b"pay"))
    unknown = pending.evolve(
        state=State.UNKNOWN,
        fence=2,
        owner="",
        lease_until_ms=0,
        retry_class=RetryClass.AMBIGUOUS_STATUS,
        probes=1,
        next_probe_ms=T0 + 120_000,
        updated_ms=T0 + 60_000,
    )
    return Written(
        "unknown",
        pending,
        _reserved(pending),
        (Move(unknown, Evidence(T0 + 60_000, "unknown", {"status": 502}), due_ms=T0 + 120_000),),
    )


def _attention() -> Written:
    scope = Scope(caller="agent-2", route="payments", key="v1-attention")
    pending = _pending(scope, "host-a:4711:5be3a1:6", fingerprint=_digest(b"refund"))
    attention = pending.evolve(
        state=State.NEEDS_ATTENTION,
        fence=2,
        owner="",
        lease_until_ms=0,
        retry_class=RetryClass.LEASE_EXPIRED,
        probes=5,
        updated_ms=T0 + 600_000,
    )
    return Written(
        "attention",
        pending,
        _reserved(pending),
        (Move(attention, Evidence(T0 + 600_000, "escalated", {"probes": 5, "why": "gave up \u2014 ask"})),),
    )


def _released() -> Written:
    scope = Scope(caller="agent-1", route="tickets", key="v1-released")
    pending = _pending(scope, "host-a:4711:5be3a1:7", fingerprint=_digest(b"busy"))
    busy = StoredResponse(503, (("Retry-After", "1"),), b"busy", 4, _digest(b"busy"))
    released = pending.evolve(
        state=State.RELEASED,
        retry_class=RetryClass.NOT_APPLIED_STATUS,
        response=busy,
        lease_until_ms=0,
        updated_ms=T0 + 12,
    )
    return Written(
        "released",
        pending,
        _reserved(pending),
        (Move(released, Evidence(T0 + 12, "released", {"status": 503}), ttl_s=LONG_TTL_S),),
    )


WRITTEN = (_completed(), _pending_record(), _reconciled_big(), _not_kept(), _unknown(), _attention(), _released())
V1_RECORDS = {written.op_id: written.expected for written in WRITTEN}
BY_NAME = {written.name: written for written in WRITTEN}

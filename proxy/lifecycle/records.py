"""The operation record: the durable checkpoint of one side-effecting call.

Records are immutable values; a state change is a new record written by a
store with a compare-and-set on the fencing token (``fence``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from idemproxy.protocol.keys import Scope

# Each record is declared once, by its annotated fields, in order; what walks a record
# reads them back (``RECORD_FIELDS``: ``OperationRecord.evolve``, and the stores'
# layouts, which name their columns and elements after them). The classes built on
# every request also define ``__init__`` themselves (``init=False``): mypyc compiles
# that one, while the one ``dataclass`` generates stays interpreted and costs ~14x
# more. ``tests/release/test_build_info.py`` checks each sets exactly its fields, in
# field order and with the declared defaults, so it cannot drift from the declaration.


class State(StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    RELEASED = "RELEASED"
    UNKNOWN = "UNKNOWN"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"


#: States whose outcome nobody knows yet: never expired, always escalated.
UNRESOLVED_STATES = frozenset({State.PENDING, State.UNKNOWN, State.NEEDS_ATTENTION})


class RetryClass(StrEnum):
    """Why the last attempt did not end in a definitive response."""

    CONNECT_FAILED = "connect-failed"  # nothing reached the tool
    NOT_APPLIED_STATUS = "not-applied-status"  # the tool said it did nothing (429, 503)
    READ_TIMEOUT = "read-timeout"  # sent, no answer in time
    CONNECTION_LOST = "connection-lost"  # sent, connection reset or closed
    AMBIGUOUS_STATUS = "ambiguous-status"  # 500/502/504: may or may not have happened
    LEASE_EXPIRED = "lease-expired"  # the owning instance vanished
    ABORTED = "aborted"  # the proxy stopped while the request was in flight
    NOT_SENT = "not-sent"  # the owner's lease ran out before it sent anything


@dataclass(frozen=True, slots=True, init=False)
class StoredResponse:
    """The tool's answer as kept for replay.

    Header names and values are ``str`` as the proxy carries them: the wire bytes
    decoded as UTF-8, each byte that is not part of UTF-8 text as a lone surrogate
    (``surrogateescape``, as ``upstream_client`` reads them and ``http_server`` writes
    them). The stores keep the bytes, so a replay sends what the tool sent.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None  # None when the body exceeded the route's storage limit, or could not be stored
    body_size: int
    body_sha256: str
    #: Why the headers and body were not kept when the store could not hold them (the
    #: status, size and digest still are); None when kept, or only too large to keep.
    not_stored_reason: str | None = None

    def __init__(
        self,
        status: int,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None,
        body_size: int,
        body_sha256: str,
        not_stored_reason: str | None = None,
    ) -> None:
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "body_size", body_size)
        object.__setattr__(self, "body_sha256", body_sha256)
        object.__setattr__(self, "not_stored_reason", not_stored_reason)


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """What was sent, kept only for routes that reconcile by resending or by
    probes that quote the request body."""

    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True, init=False)
class Evidence:
    """One observed fact about an operation, appended and never rewritten."""

    at_ms: int
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __init__(self, at_ms: int, kind: str, detail: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "at_ms", at_ms)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "detail", {} if detail is None else detail)

    def to_dict(self) -> dict[str, Any]:
        return {"at_ms": self.at_ms, "kind": self.kind, **self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evidence:
        data = dict(data)
        return cls(at_ms=int(data.pop("at_ms")), kind=str(data.pop("kind")), detail=data)


@dataclass(frozen=True, slots=True, init=False)
class OperationRecord:
    op_id: str
    scope: Scope
    state: State
    fence: int  # bumped on every change of owner; transitions must present the current one
    fingerprint: str
    attempt: int
    owner: str
    lease_until_ms: int  # the owner (attempt or reconciler) holds the record until then
    method: str
    target: str
    created_ms: int
    updated_ms: int
    retry_class: RetryClass | None = None
    response: StoredResponse | None = None
    reconciled: bool = False  # the response was established by reconciliation or an operator
    probes: int = 0  # reconciliation probes since the outcome became unknown
    next_probe_ms: int = 0  # an UNKNOWN record is not probed again before this
    #: The last moment the current attempt may have been sent: when it was reserved,
    #: or, once its owner's lease ran out, that lease's end (a paused owner that
    #: wakes checks its lease before sending, so it cannot send later than that).
    attempt_ms: int = 0
    request: StoredRequest | None = None
    evidence: tuple[Evidence, ...] = ()

    def __init__(
        self,
        op_id: str,
        scope: Scope,
        state: State,
        fence: int,
        fingerprint: str,
        attempt: int,
        owner: str,
        lease_until_ms: int,
        method: str,
        target: str,
        created_ms: int,
        updated_ms: int,
        retry_class: RetryClass | None = None,
        response: StoredResponse | None = None,
        reconciled: bool = False,
        probes: int = 0,
        next_probe_ms: int = 0,
        attempt_ms: int = 0,
        request: StoredRequest | None = None,
        evidence: tuple[Evidence, ...] = (),
    ) -> None:
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "fence", fence)
        object.__setattr__(self, "fingerprint", fingerprint)
        object.__setattr__(self, "attempt", attempt)
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "lease_until_ms", lease_until_ms)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "created_ms", created_ms)
        object.__setattr__(self, "updated_ms", updated_ms)
        object.__setattr__(self, "retry_class", retry_class)
        object.__setattr__(self, "response", response)
        object.__setattr__(self, "reconciled", reconciled)
        object.__setattr__(self, "probes", probes)
        object.__setattr__(self, "next_probe_ms", next_probe_ms)
        object.__setattr__(self, "attempt_ms", attempt_ms)
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "evidence", evidence)

    def lease_alive(self, now_ms: int) -> bool:
        return self.state is State.PENDING and self.lease_until_ms > now_ms

    def claimed(self, now_ms: int) -> bool:
        """An UNKNOWN record some reconciler is probing right now."""
        return self.state is State.UNKNOWN and self.lease_until_ms > now_ms

    def evolve(self, **changes: Any) -> OperationRecord:
        """A copy with ``changes`` (what ``dataclasses.replace`` does, at a fraction of its
        cost: it runs on every request). Unknown field names raise ``TypeError``."""
        values = [getattr(self, name) for name in RECORD_FIELDS]
        position = _RECORD_POSITIONS
        for name, value in changes.items():
            at = position.get(name)
            if at is None:
                raise TypeError(f"OperationRecord has no field {name!r}")
            values[at] = value
        return OperationRecord(*values)


#: ``OperationRecord``'s fields, in order: its one declaration, as data.
RECORD_FIELDS: Final = tuple(declared.name for declared in dataclasses.fields(OperationRecord))
_RECORD_POSITIONS: Final = {name: at for at, name in enumerate(RECORD_FIELDS)}


def record_fields(*names: str) -> tuple[str, ...]:
    """``names``, each one of ``OperationRecord``'s fields (else ``ValueError``, at import):
    for a store layout that names its parts after the fields they hold."""
    unknown = [name for name in names if name not in _RECORD_POSITIONS]
    if unknown:
        raise ValueError(f"OperationRecord has no field(s) {unknown}")
    return names

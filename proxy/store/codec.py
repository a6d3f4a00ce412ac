"""The SQLite store's field layout for a record (Redis packs its own: ``redis_record``),
and what both layouts share.

The record fields the SQL statements inspect (``COLUMN_FIELDS``: state, fence,
owner, lease, and the fingerprint and attempt) are columns of their own, named
after the field; everything else travels as one orjson blob (``meta``) plus the
raw response body (``response_body``) and the stored request's body
(``request_body``), so a replay is served byte for byte without re-encoding.
Evidence (``evidence``) is JSON lines, appended by the store and never rewritten.

Headers are ``[name, value]`` pairs. A name or value that is not UTF-8 text
(the tool sent bytes that are not UTF-8: see ``StoredResponse``) is kept as
its wire bytes, ``{"base64": "..."}`` here; everything else is written as
before such bytes were kept, so records of text headers read the same in
either version. A response kept without its headers and body because the
store could not hold them says why (``not_stored``).

Schema version 1 named the columns ``s f fp a o l m b q e``; ``sqlite`` renames
them when it opens such a file (``V1_COLUMNS``). The values are the same.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

from idemproxy.lifecycle.records import (
    Evidence,
    OperationRecord,
    RetryClass,
    State,
    StoredRequest,
    StoredResponse,
    record_fields,
)
from idemproxy.protocol.keys import Scope
from idemproxy.store.base import RecordNotStorable

STATE: Final = "state"
FENCE: Final = "fence"
FINGERPRINT: Final = "fingerprint"
ATTEMPT: Final = "attempt"
OWNER: Final = "owner"
LEASE: Final = "lease_until_ms"
#: The record's fields that are columns of their own, named after the field, in column order.
COLUMN_FIELDS: Final = record_fields(STATE, FENCE, FINGERPRINT, ATTEMPT, OWNER, LEASE)
META: Final = "meta"
BODY: Final = "response_body"
REQUEST_BODY: Final = "request_body"
EVIDENCE: Final = "evidence"

#: Fields every write replaces, in this order.
WRITTEN_FIELDS: Final[tuple[str, ...]] = (*COLUMN_FIELDS, META, BODY, REQUEST_BODY)

#: Schema version 1's name for each column (``sqlite`` renames them on open).
V1_COLUMNS: Final = {
    "s": STATE,
    "f": FENCE,
    "fp": FINGERPRINT,
    "a": ATTEMPT,
    "o": OWNER,
    "l": LEASE,
    "m": META,
    "b": BODY,
    "q": REQUEST_BODY,
    "e": EVIDENCE,
}


def encode(record: OperationRecord) -> dict[str, str | int | bytes]:
    """The column values to write for ``record`` (evidence excluded: it is appended),
    typed as the columns are; ``RecordNotStorable`` when some value cannot be encoded."""
    try:
        return _encode(record)
    except (TypeError, ValueError) as exc:  # orjson's JSONEncodeError is a TypeError
        raise not_storable(exc) from exc


def _encode(record: OperationRecord) -> dict[str, str | int | bytes]:
    meta: dict[str, Any] = {
        "scope": [record.scope.caller, record.scope.route, record.scope.key, record.scope.task],
        "method": record.method,
        "target": record.target,
        "created_ms": record.created_ms,
        "updated_ms": record.updated_ms,
    }
    meta.update(reconcile_state(record))
    if record.attempt_ms:
        meta["attempt_ms"] = record.attempt_ms
    if record.request is not None:
        meta["request_headers"] = _json_headers(record.request.headers)
    # Every text column's value must be text SQLite can keep (a lone surrogate is not).
    fields: dict[str, str | int | bytes] = {
        STATE: record.state.value,
        FENCE: record.fence,
        FINGERPRINT: _checked_text(record.fingerprint),
        ATTEMPT: record.attempt,
        OWNER: _checked_text(record.owner),
        LEASE: record.lease_until_ms,
    }
    response = record.response
    if response is not None:
        meta["response"] = {
            "status": response.status,
            "headers": _json_headers(response.headers),
            "size": response.body_size,
            "sha256": response.body_sha256,
            "stored": response.body is not None,
        }
        if response.not_stored_reason is not None:
            meta["response"]["not_stored"] = response.not_stored_reason
    fields[META] = orjson.dumps(meta)
    # Always written, so a transition never leaves a previous body behind.
    fields[BODY] = response.body if response is not None and response.body is not None else b""
    fields[REQUEST_BODY] = record.request.body if record.request is not None else b""
    return fields


def _checked_text(text: str) -> str:
    text.encode()  # UnicodeEncodeError (a ValueError) for what UTF-8 cannot hold, as before
    return text


def reconcile_state(record: OperationRecord) -> dict[str, Any]:
    """The reconciliation fields that are not at their default (shared by both stores' layouts)."""
    state: dict[str, Any] = {}
    if record.retry_class is not None:
        state["retry_class"] = record.retry_class.value
    if record.reconciled:
        state["reconciled"] = True
    if record.probes:
        state["probes"] = record.probes
    if record.next_probe_ms:
        state["next_probe_ms"] = record.next_probe_ms
    return state


def reconcile_state_fields(stored: Mapping[str, Any]) -> dict[str, Any]:
    """``OperationRecord`` keyword arguments from what ``reconcile_state`` kept."""
    retry_class = stored.get("retry_class")
    return {
        "retry_class": RetryClass(retry_class) if retry_class is not None else None,
        "reconciled": stored.get("reconciled", False),
        "probes": stored.get("probes", 0),
        "next_probe_ms": stored.get("next_probe_ms", 0),
    }


def encode_evidence(evidence: Evidence) -> bytes:
    try:
        return orjson.dumps(evidence.to_dict())
    except TypeError as exc:
        raise not_storable(exc) from exc


def not_storable(exc: Exception) -> RecordNotStorable:
    """``RecordNotStorable`` for a layout's encoding failure ``exc`` (shared by both layouts)."""
    return RecordNotStorable(f"the record cannot be encoded: {type(exc).__name__}: {exc}")


def header_item(text: str) -> str | bytes:
    """A header name or value as a layout keeps it (shared by both layouts): the text
    itself when it is UTF-8 text, else the wire bytes it was read from.
    ``UnicodeEncodeError`` when it was read from no bytes (a surrogate outside
    ``surrogateescape``'s range)."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")
    return text


def header_text(item: str | bytes) -> str:
    """A header name or value from what ``header_item`` kept."""
    return item if isinstance(item, str) else item.decode("utf-8", "surrogateescape")


def _json_headers(headers: Iterable[tuple[str, str]]) -> list[list[str | dict[str, str]]]:
    return [[_json_item(name), _json_item(value)] for name, value in headers]


def _json_item(text: str) -> str | dict[str, str]:
    item = header_item(text)
    return item if isinstance(item, str) else {"base64": base64.b64encode(item).decode("ascii")}


def _json_headers_back(pairs: Iterable[list[Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((_json_text(name), _json_text(value)) for name, value in pairs)


def _json_text(item: str | dict[str, str]) -> str:
    return item if isinstance(item, str) else header_text(base64.b64decode(item["base64"]))


def decode(op_id: str, fields: Mapping[str, bytes | str | int]) -> OperationRecord:
    meta = orjson.loads(_bytes(fields[META]))
    caller, route, key, task = meta["scope"]
    response = None
    if (stored := meta.get("response")) is not None:
        body = fields.get(BODY) if stored["stored"] else None
        response = StoredResponse(
            status=stored["status"],
            headers=_json_headers_back(stored["headers"]),
            body=_bytes(body) if body is not None else None,
            body_size=stored["size"],
            body_sha256=stored["sha256"],
            not_stored_reason=stored.get("not_stored"),
        )
    request = None
    if (request_headers := meta.get("request_headers")) is not None:
        request = StoredRequest(
            headers=_json_headers_back(request_headers),
            body=_bytes(fields.get(REQUEST_BODY) or b""),
        )
    return OperationRecord(
        op_id=op_id,
        scope=Scope(caller=caller, route=route, key=key, task=task),
        state=State(_text(fields[STATE])),
        fence=int(fields[FENCE]),
        fingerprint=_text(fields[FINGERPRINT]),
        attempt=int(fields[ATTEMPT]),
        owner=_text(fields[OWNER]),
        lease_until_ms=int(fields[LEASE]),
        method=meta["method"],
        target=meta["target"],
        created_ms=meta["created_ms"],
        updated_ms=meta["updated_ms"],
        response=response,
        **reconcile_state_fields(meta),
        attempt_ms=meta.get("attempt_ms", 0),
        request=request,
        evidence=decode_evidence(fields.get(EVIDENCE)),
    )


def decode_evidence(raw: bytes | str | int | None) -> tuple[Evidence, ...]:
    if not raw:
        return ()
    lines = _bytes(raw).split(b"\n")
    return tuple(Evidence.from_dict(orjson.loads(line)) for line in lines if line)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str | int) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()

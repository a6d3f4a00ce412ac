"""How the Redis store lays out one operation record: one string, a MessagePack array.

Only what the Lua scripts read or change is a top-level element, so a script
checks its guards and rewrites the record with Redis's built-in ``cmsgpack``;
everything else is one blob (``meta``) that only Python parses::

    [state, fence, owner, lease_until_ms, meta, response_body, request_body, evidence]
      1      2      3      4               5     6              7             8      <- Lua index

(``FIELDS``; the scripts call them ``STATE``, ``FENCE``, ... : ``redis_schema``).

- response_body: the stored body; ``false`` when there is none (no response
  yet, or its body exceeded the route's storage limit).
- request_body: the stored request's body; ``false`` when no request is kept.
- evidence: the entries, each one MessagePack array ``[at_ms, kind, detail]``
  (``detail`` left out when empty), concatenated: a script appends one by
  string concatenation and never parses them.

``cmsgpack`` knows no ``bin`` type (it refuses to read one) and writes every
string as ``raw``, so the top level keeps bytes as ``raw`` strings and Python
reads it with ``raw=True``. ``meta`` and the evidence entries are opaque to
the scripts and keep MessagePack's full types::

    meta = [fingerprint, attempt, caller, route, key, task, method, target,
            created_ms, updated_ms - created_ms, attempt_ms - created_ms, response, extras]
    response = nil | [status, [name, value, ...]] | [status, [name, value, ...], size, sha256]

A SHA-256 hex digest (the fingerprint, the body's digest) is kept as its 32
raw bytes (``bin``; any other text stays ``str``). A header name or value that
is not UTF-8 text (bytes the tool sent that are not UTF-8: see
``StoredResponse``) is kept as its wire bytes (``bin``); text headers are
``str``, as before such bytes were kept. The response's size and digest are
left out when they are the stored body's own and the body is small enough to
hash again on every read (``_DERIVED_DIGEST_MAX``). ``extras`` maps the rarer
fields that are not at their default (``retry_class``, ``reconciled``,
``probes``, ``next_probe_ms``, ``request_headers``, ``not_stored``: the
response's ``not_stored_reason``) and is left out when none is.

Packing raises ``RecordNotStorable`` for a value that cannot be encoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, cast

import msgpack
import orjson

from idemproxy.lifecycle.records import (
    Evidence,
    OperationRecord,
    State,
    StoredRequest,
    StoredResponse,
    record_fields,
)
from idemproxy.protocol.keys import Scope
from idemproxy.store import codec

#: The record's fields that are top-level elements of their own (what the scripts check).
ELEMENT_FIELDS: Final = record_fields("state", "fence", "owner", "lease_until_ms")
#: The top-level elements, in order. Only their positions are stored (no names), and
#: the scripts call them by these names (``redis_schema``).
FIELDS: Final = (*ELEMENT_FIELDS, "meta", "response_body", "request_body", "evidence")
#: Each element's position, as Lua counts (from 1).
LUA_POSITIONS: Final = {name: at for at, name in enumerate(FIELDS, start=1)}
#: Bodies up to this size get their digest recomputed on read instead of stored.
_DERIVED_DIGEST_MAX = 1024
_DIGEST_BYTES = 32


# One packer per format, reused: ``msgpack.packb`` builds a Packer (and its buffer) per call.
# Nothing awaits while one is in use, and the records are packed on the event loop's thread.
_TEXT_PACKER = msgpack.Packer(use_bin_type=False)
_BINARY_PACKER = msgpack.Packer(use_bin_type=True)
_HEAD_PACKER = msgpack.Packer(use_bin_type=False, autoreset=False)


def pack(record: OperationRecord, evidence: bytes) -> bytes:
    """The whole value for ``record`` whose evidence is ``evidence`` (``pack_evidence`` output, concatenated)."""
    return pack_head(record) + cast(bytes, _TEXT_PACKER.pack(evidence))


def pack_head(record: OperationRecord) -> bytes:
    """The value for ``record`` up to its evidence: a script completes it with the packed evidence."""
    try:
        meta = _pack_meta(record)
        packer = _HEAD_PACKER
        packer.reset()
        packer.pack_array_header(len(FIELDS))
        response = record.response
        request = record.request
        for value in (
            record.state.value,
            record.fence,
            record.owner,
            record.lease_until_ms,
            meta,
            response.body if response is not None and response.body is not None else False,
            request.body if request is not None else False,
        ):
            packer.pack(value)
        return cast(bytes, packer.bytes())
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise codec.not_storable(exc) from exc


def pack_evidence(evidence: Evidence) -> bytes:
    entry: list[Any] = [evidence.at_ms, evidence.kind]
    if evidence.detail:
        entry.append(evidence.detail)
    try:
        return cast(bytes, _EVIDENCE_PACKER.pack(entry))
    except (TypeError, ValueError, OverflowError) as exc:
        raise codec.not_storable(exc) from exc


def unpack(op_id: str, value: bytes, *, with_evidence: bool = True) -> OperationRecord:
    """The record stored as ``value``; without its evidence unless ``with_evidence``."""
    state, fence, owner, lease, meta, body, request_body, evidence = msgpack.unpackb(value, raw=True)
    (fingerprint, attempt, caller, route, key, task, method, target, created, updated, attempted, stored, *rest) = (
        msgpack.unpackb(meta, raw=False)
    )
    extras: dict[str, Any] = rest[0] if rest else {}
    request = None
    if request_body is not False:
        request = StoredRequest(headers=_pairs(extras.get("request_headers", ())), body=request_body)
    return OperationRecord(
        op_id=op_id,
        scope=Scope(caller=caller, route=route, key=key, task=task),
        state=State(state.decode()),
        fence=fence,
        fingerprint=_digest_text(fingerprint),
        attempt=attempt,
        owner=owner.decode(),
        lease_until_ms=lease,
        method=method,
        target=target,
        created_ms=created,
        updated_ms=created + updated,
        response=_unpack_response(stored, body, extras.get("not_stored")) if stored is not None else None,
        **codec.reconcile_state_fields(extras),
        attempt_ms=created + attempted,
        request=request,
        evidence=unpack_evidence(evidence) if with_evidence else (),
    )


def unpack_evidence(packed: bytes) -> tuple[Evidence, ...]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(packed)
    return tuple(Evidence(at_ms, kind, detail[0] if detail else {}) for at_ms, kind, *detail in unpacker)


def _pack_meta(record: OperationRecord) -> bytes:
    scope = record.scope
    response = record.response
    meta: list[Any] = [
        _digest_bytes(record.fingerprint),
        record.attempt,
        scope.caller,
        scope.route,
        scope.key,
        scope.task,
        record.method,
        record.target,
        record.created_ms,
        record.updated_ms - record.created_ms,
        record.attempt_ms - record.created_ms,
        _pack_response(response) if response is not None else None,
    ]
    extras = codec.reconcile_state(record)
    if record.request is not None and record.request.headers:
        extras["request_headers"] = _flat(record.request.headers)
    if response is not None and response.not_stored_reason is not None:
        extras["not_stored"] = response.not_stored_reason
    if extras:
        meta.append(extras)
    return cast(bytes, _BINARY_PACKER.pack(meta))


def _pack_response(response: StoredResponse) -> list[Any]:
    packed: list[Any] = [response.status, _flat(response.headers)]
    if not _derivable(response):
        packed += (response.body_size, _digest_bytes(response.body_sha256))
    return packed


def _unpack_response(
    stored: Sequence[Any], body: bytes | Literal[False], not_stored_reason: str | None
) -> StoredResponse:
    status, headers, *size_and_digest = stored
    kept = body if body is not False else None
    if size_and_digest:
        size, digest = size_and_digest
    else:
        assert isinstance(kept, bytes), "a response without size and digest has its body stored"
        size, digest = len(kept), hashlib.sha256(kept).hexdigest()
    return StoredResponse(
        status=status,
        headers=_pairs(headers),
        body=kept,
        body_size=size,
        body_sha256=_digest_text(digest),
        not_stored_reason=not_stored_reason,
    )


def _derivable(response: StoredResponse) -> bool:
    """Whether the size and digest are the stored body's own, cheap to compute again."""
    body = response.body
    return (
        body is not None
        and len(body) <= _DERIVED_DIGEST_MAX
        and len(body) == response.body_size
        and hashlib.sha256(body).hexdigest() == response.body_sha256
    )


def _digest_bytes(text: str) -> bytes | str:
    """A lower-case SHA-256 hex digest as its raw bytes; any other text unchanged."""
    if len(text) != 2 * _DIGEST_BYTES:
        return text
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return text
    return raw if raw.hex() == text else text  # fromhex also takes upper case and spaces


def _digest_text(value: bytes | str) -> str:
    return value.hex() if isinstance(value, bytes) else value


def _flat(pairs: Iterable[tuple[str, str]]) -> list[str | bytes]:
    return [codec.header_item(item) for pair in pairs for item in pair]


def _pairs(flat: Sequence[str | bytes]) -> tuple[tuple[str, str], ...]:
    items = [codec.header_text(item) for item in flat]
    return tuple(zip(items[::2], items[1::2], strict=True))


def _json_like(value: object) -> Any:
    """Evidence detail MessagePack has no type for (an enum, a date): as JSON would write it."""
    return orjson.loads(orjson.dumps(value))


#: Reused as the packers above are (a failed ``pack`` empties its buffer again).
_EVIDENCE_PACKER = msgpack.Packer(use_bin_type=True, default=_json_like)

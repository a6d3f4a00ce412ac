"""Operation keys and ids: request fingerprints, derived keys, tool-call keys and
scoped operation ids. The adapters derive the very same keys the proxy does.

A fingerprint says "this is the same request": method, path, the query with
its parameters sorted, the configured headers, and the body (canonical JSON
when the body is JSON, so key order and whitespace do not matter).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from idemproxy.protocol.errors import InvalidKey
from idemproxy.protocol.exact_json import may_hold_a_long_integer

MAX_KEY_LENGTH = 255
_SEPARATOR = b"\x1f"


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON: keys sorted, no insignificant whitespace, UTF-8.

    The rule ``canonical_body`` applies to a JSON body, for callers that hold the
    parsed value (the adapters derive operation keys from tool arguments with it).
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits (and other values orjson refuses): the standard
        # library writes them exactly, still deterministically.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_body(body: bytes, content_type: str | None) -> bytes:
    """The bytes that stand for ``body`` in a fingerprint."""
    if not body or content_type is None or not _is_json(content_type):
        return body
    if may_hold_a_long_integer(body):
        # orjson reads integers beyond 64 bits as floats, which would make
        # different numbers look equal: keep the exact bytes instead.
        return body
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        # Not JSON after all, or nested deeper than orjson re-encodes (254 levels):
        # the raw bytes are the request.
        return body


def normalized_query(query_string: str) -> str:
    """Parameters sorted by name; repeated parameters keep their order, which may matter."""
    if not query_string:
        return ""
    pairs = parse_qsl(query_string, keep_blank_values=True)
    return urlencode(sorted(pairs, key=lambda pair: pair[0]))


def fingerprint(
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    header_names: Iterable[str],
    body: bytes,
) -> str:
    digest = hashlib.sha256()
    for part in (method.upper(), path, normalized_query(query_string)):
        digest.update(part.encode())
        digest.update(_SEPARATOR)
    for name in header_names:
        digest.update(name.encode())
        digest.update(b":")
        digest.update(headers.get(name, "").encode())
        digest.update(_SEPARATOR)
    digest.update(canonical_body(body, headers.get("Content-Type")))
    return digest.hexdigest()


def derive_key(caller: str, task: str | None, request_fingerprint: str) -> str:
    """The key for a request that carries none (route key mode ``derive``)."""
    material = orjson.dumps([caller, task, request_fingerprint])
    return "derived:" + hashlib.sha256(material).hexdigest()


def validate_key(key: str) -> str:
    if not key:
        raise InvalidKey("The idempotency key is empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"The idempotency key has {len(key)} characters; at most {MAX_KEY_LENGTH} are allowed.")
    if not key.isascii() or not key.isprintable():
        raise InvalidKey("The idempotency key must consist of printable ASCII characters.")
    return key


def operation_id(scope: Scope) -> str:
    """A stable id for (caller, route, key): what the ledger stores the operation under.

    The caller is part of it, so one caller can never reach another's record.
    """
    material = orjson.dumps([scope.caller, scope.route, scope.key])
    return hashlib.blake2b(material, digest_size=16).hexdigest()


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json")


@dataclass(frozen=True, slots=True, init=False)
class Scope:
    """Who asked, through which route, under which key; part of the operation id."""

    caller: str
    route: str
    key: str
    task: str | None = None

    def __init__(self, caller: str, route: str, key: str, task: str | None = None) -> None:
        object.__setattr__(self, "caller", caller)
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "task", task)


# -- tool-call keys --------------------------------------------------------------------------------
# The operation key of a tool call: one derivation for the adapters and the MCP route mode.
#
# A model mints a fresh tool-call id each time it re-issues a call, so the key
# comes from what stays the same: the run (task) the call belongs to, the tool's
# name and the canonical JSON of its arguments::
#
#     key = "op1-" + sha256(canonical_json([run_id, tool, arguments])).hexdigest()
#
# The adapters put it on the requests a tool sends (``Idempotency-Key``) or in
# an MCP ``tools/call``'s ``params._meta``; an MCP route derives the very same
# key for a call that carries none, with the ``X-Agent-Task`` header as the run.

#: Bumped if the derivation ever changes, so old and new keys never collide.
KEY_VERSION = "op1"


def tool_call_key(run_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """The operation key of a call of ``tool`` with ``arguments`` in run ``run_id``.

    Two calls get the same key exactly when they belong to the same run, name
    the same tool and carry equal arguments (key order and whitespace do not
    matter; ``1`` and ``1.0`` differ, as in the proxy's fingerprints). Raises
    ``TypeError`` when the arguments are not JSON values.
    """
    material = canonical_json([run_id, tool, arguments])
    return f"{KEY_VERSION}-{hashlib.sha256(material).hexdigest()}"

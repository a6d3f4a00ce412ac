"""MCP messages as idemproxy reads them, free of I/O.

Parsing and validating one JSON-RPC message (or a batch), the mirrored
``Mcp-Method`` / ``Mcp-Name`` headers, which ``tools/call`` is an operation and
its fingerprint, what a server's answer means for the ledger
(``classify_status``, ``classify_reply``), and a stored response under another
caller's id. ``idemproxy.modes.mcp`` does the I/O; the table of outcomes is in its
docstring.

JSON is read with integers of any size kept exact (``idemproxy.protocol.exact_json``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from idemproxy.config.mcp import McpConfig
from idemproxy.config.settings import RouteConfig
from idemproxy.lifecycle.decisions import AMBIGUOUS, COMPLETED, NOT_APPLIED, Outcome
from idemproxy.protocol.errors import BadRequest, BodyTooLarge, FingerprintMismatch, ProblemError
from idemproxy.protocol.exact_json import dumps, loads
from idemproxy.protocol.keys import canonical_json

SESSION_HEADER = "Mcp-Session-Id"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
JSON = "application/json"
SSE = "text/event-stream"

# JSON-RPC error codes: the standard ones, MCP's HeaderMismatch, and idemproxy's own
# (from the implementation-defined server range) for every problem+json type.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32001
PROXY_PROBLEM = -32050
#: Errors that prove the server refused the request before any tool ran.
REFUSED_CODES = frozenset({PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS})
#: The params field Mcp-Name mirrors, by method.
_NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

RequestId = int | str
_BASE64_VALUE = re.compile(r"^=\?base64\?([A-Za-z0-9+/=]*)\?=$")


class JsonRpcError(Exception):
    """A message idemproxy refuses before anything is recorded or forwarded."""

    def __init__(self, code: int, message: str, request_id: RequestId | None = None, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status

    def to_json(self) -> bytes:
        return error_body(self.request_id, {"code": self.code, "message": self.message})


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message as a client sent it."""

    body: dict[str, Any]
    method: str | None  # None for a response to a server's request
    id: RequestId | None  # None for a notification


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A ``tools/call`` request that is an operation."""

    request_id: RequestId
    name: str
    arguments: dict[str, Any]
    key: str | None  # from params._meta, if the caller sent one
    fingerprint: str  # the tool and its canonical arguments: what "the same call" means


def parse_messages(body: bytes) -> list[Message] | Message:
    """The message in ``body``, or the list of messages of a batch."""
    try:
        value = loads(body)
    except ValueError:
        raise JsonRpcError(PARSE_ERROR, "Parse error: the request body is not JSON.") from None
    if isinstance(value, list):
        if not value:
            raise JsonRpcError(INVALID_REQUEST, "Invalid request: an empty batch.")
        return [_message(item) for item in value]
    return _message(value)


def _message(value: Any) -> Message:
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        raise JsonRpcError(INVALID_REQUEST, "Invalid request: not a JSON-RPC 2.0 message object.", _id_of(value))
    request_id = value.get("id")
    method = value.get("method")
    if "method" in value:
        if not isinstance(method, str) or not method:
            raise JsonRpcError(INVALID_REQUEST, "Invalid request: 'method' must be a non-empty string.", _id_of(value))
        if "id" in value and not _valid_id(request_id):
            raise JsonRpcError(INVALID_REQUEST, "Invalid request: 'id' must be a string or an integer.")
        if "params" in value and not isinstance(value["params"], dict | list):
            raise JsonRpcError(INVALID_REQUEST, "Invalid request: 'params' must be an object.", _id_of(value))
        return Message(value, method, request_id)
    if ("result" in value) == ("error" in value) or "id" not in value:
        raise JsonRpcError(
            INVALID_REQUEST, "Invalid request: neither a request nor a response (one of result or error, and an id)."
        )
    return Message(value, None, request_id if _valid_id(request_id) else None)


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _id_of(value: Any) -> RequestId | None:
    request_id = value.get("id") if isinstance(value, dict) else None
    return request_id if _valid_id(request_id) else None


def check_mirrored_headers(headers: Mapping[str, str], message: Message) -> None:
    """Refuse a message whose ``Mcp-Method`` / ``Mcp-Name`` headers say something else than
    its body: an intermediary routing on the headers must never see another call than
    the one the server runs."""
    method = headers.get(METHOD_HEADER)
    if method is not None and method != message.method:
        raise JsonRpcError(
            HEADER_MISMATCH,
            f"Header mismatch: {METHOD_HEADER} {method!r} does not match the body's method {message.method!r}.",
            message.id,
        )
    name = headers.get(NAME_HEADER)
    field_name = _NAMED.get(message.method or "")
    if name is None or field_name is None:
        return
    params = message.body.get("params")
    value = params.get(field_name) if isinstance(params, dict) else None
    if _header_value(name) != value:
        raise JsonRpcError(
            HEADER_MISMATCH,
            f"Header mismatch: {NAME_HEADER} {name!r} does not match the body's params.{field_name} {value!r}.",
            message.id,
        )


def _header_value(value: str) -> str | None:
    """A mirrored header's value, Base64-decoded when sent as ``=?base64?...?=``."""
    encoded = _BASE64_VALUE.match(value)
    if encoded is None:
        return value
    try:
        return base64.b64decode(encoded.group(1), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def recorded_call(message: Message, config: McpConfig) -> ToolCall | None:
    """The operation ``message`` asks for, or None when it passes through."""
    if message.method != "tools/call" or message.id is None:
        return None
    params = message.body.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(name, str) or not name:
        raise JsonRpcError(INVALID_PARAMS, "Invalid params: tools/call needs params.name.", message.id, status=200)
    if name in config.read_only_tools:
        return None
    arguments = params.get("arguments")
    meta = params.get("_meta")
    if arguments is not None and not isinstance(arguments, dict):
        raise JsonRpcError(INVALID_PARAMS, "Invalid params: arguments must be an object.", message.id, status=200)
    if meta is not None and not isinstance(meta, dict):
        raise JsonRpcError(INVALID_PARAMS, "Invalid params: _meta must be an object.", message.id, status=200)
    key = meta.get(config.key_meta) if meta else None
    if key is not None and not isinstance(key, str):
        raise JsonRpcError(
            INVALID_PARAMS, f"Invalid params: _meta[{config.key_meta!r}] must be a string.", message.id, status=200
        )
    arguments = arguments or {}
    try:
        fingerprint = hashlib.sha256(canonical_json(["mcp", "tools/call", name, arguments])).hexdigest()
    except (TypeError, ValueError, RecursionError):  # nesting beyond what the canonical form supports
        raise JsonRpcError(
            INVALID_PARAMS, "Invalid params: arguments are nested too deeply.", message.id, status=200
        ) from None
    return ToolCall(message.id, name, arguments, key, fingerprint)


def response_to(data: bytes, request_id: RequestId) -> dict[str, Any] | None:
    """``data`` as the JSON-RPC response to ``request_id``, or None if it is something else."""
    try:
        message = loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict) or "method" in message or ("result" not in message and "error" not in message):
        return None
    answered = message.get("id")
    if not _valid_id(answered) or answered != request_id or type(answered) is not type(request_id):
        return None
    return message


def classify_status(status: int, route: RouteConfig) -> Outcome | None:
    """The outcome an HTTP status alone decides; None for 2xx (the body decides)."""
    if status in route.not_applied_statuses:
        return NOT_APPLIED
    if status in route.ambiguous_statuses or status >= 500:
        return AMBIGUOUS
    if 200 <= status < 300:
        return None
    return NOT_APPLIED  # the MCP transport refused the message (no session, bad header ...)


def classify_reply(reply: Mapping[str, Any] | None) -> Outcome:
    """The outcome of a call the server answered with ``reply`` (None: no response to it)."""
    if reply is None:
        return AMBIGUOUS
    error = reply.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        return COMPLETED if code in REFUSED_CODES else AMBIGUOUS
    result = reply.get("result")
    if isinstance(result, dict) and result.get("resultType") == "incomplete":
        return NOT_APPLIED
    return COMPLETED


def with_id(stored: bytes, request_id: RequestId) -> bytes:
    """The stored response under ``request_id``.

    A response established by reconciliation may be the probe's JSON rather than a
    JSON-RPC response; it is answered as the tool's result (text content)."""
    try:
        message = loads(stored)
    except ValueError:
        message = None
    if not isinstance(message, dict) or ("result" not in message and "error" not in message):
        text = stored.decode("utf-8", "replace")
        message = {"jsonrpc": "2.0", "result": {"content": [{"type": "text", "text": text}], "isError": False}}
    return dumps({**message, "id": request_id})


def reply_kind(reply: Mapping[str, Any] | None) -> str:
    if reply is None:
        return "none"
    error = reply.get("error")
    if error is not None:
        return f"error {error.get('code') if isinstance(error, dict) else '?'}"
    return "result"


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def accepts_only_sse(accept: str) -> bool:
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return SSE in types and not types & {JSON, "application/*", "*/*"}


def error_body(request_id: RequestId | None, error: dict[str, Any]) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": request_id, "error": error})


def problem_error(exc: ProblemError) -> dict[str, Any]:
    """One of idemproxy's problems as a JSON-RPC error object; ``data`` is its problem+json."""
    detail = exc.detail
    if isinstance(exc, BadRequest):
        code = INVALID_PARAMS
    elif isinstance(exc, BodyTooLarge):
        code = INVALID_REQUEST
    else:
        code = PROXY_PROBLEM
    if isinstance(exc, FingerprintMismatch):  # its detail speaks of HTTP requests
        detail = "The key was first used for a call of another tool or with other arguments; use a new key."
    return {"code": code, "message": f"{exc.title}: {detail}", "data": orjson.loads(exc.to_json())}

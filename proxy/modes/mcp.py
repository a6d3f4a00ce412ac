"""The MCP route mode: idempotent ``tools/call`` over Streamable HTTP.

On a route with ``mode: mcp`` each POST body is read as one JSON-RPC message.
A ``tools/call`` request for a tool not listed in ``mcp.read_only_tools`` is an
operation; every other message (``initialize``, notifications, ``tools/list``,
read-only calls, a client's responses, the GET stream, DELETE) is forwarded
untouched, and so are the bodies of recorded calls. Both transport
generations look the same here: session-based (``initialize``,
``Mcp-Session-Id``) and sessionless (``Mcp-Method`` / ``Mcp-Name`` headers,
protocol metadata in ``_meta``).

- **Key**: ``params._meta[mcp.key_meta]``, else the key header, else per the
  route's ``key_mode`` (``derive``: ``tool_call_key(task, tool, arguments)``,
  the adapters' own derivation, with the task header as the run; a call
  without a task is refused unless the route's ``derive_scope`` is ``caller``).
- **Fingerprint**: the tool's name and the canonical JSON of its arguments;
  never the JSON-RPC id or ``_meta`` (progress token, protocol metadata), so a
  call re-issued by a new session or a restarted client matches.
- **Stored**: the final JSON-RPC response only. An ``application/json``
  answer is kept as received; a ``text/event-stream`` answer is relayed to the
  first caller as it arrives and only the event carrying the response to this
  call's id is kept (progress and log notifications are not).
- **Replayed**: ``application/json`` (one SSE event for a client that accepts
  only SSE), with the caller's own JSON-RPC id and ``Mcp-Session-Id``; the
  first caller's session never reaches anyone else.

Outcomes, in the ledger's terms (``classify_status`` and ``classify_reply``):

- a JSON-RPC ``result``, ``isError: true`` included, is definitive (the tool
  ran and answered): ``COMPLETED``;
- a ``result`` with ``resultType: "incomplete"`` (the server asks for input
  before it acts, SEP-2322) is ``RELEASED``, so the client's follow-up with
  the same arguments and its answers is forwarded;
- a JSON-RPC ``error`` coded -32700, -32600, -32601 or -32602 (refused before
  any tool ran) is definitive; any other code (-32603, server-defined, an
  exception in a handler) may follow an effect: ``UNKNOWN``;
- HTTP statuses: the route's ``not_applied_statuses`` release and
  ``ambiguous_statuses`` make it unknown, as on any route; any other status
  below 500 is the MCP transport refusing the message before any tool ran (no
  session, bad header): ``RELEASED``; other 5xx: ``UNKNOWN``;
- a 2xx without a JSON-RPC response to the call, and failures of the
  connection: ``UNKNOWN``, as on any route.

idemproxy's own answers on an MCP route are JSON-RPC error responses rather
than problem+json, because MCP clients read nothing else: HTTP 200 answering a
request whose id is known (so the client hands it to the waiting call), else
the problem's own status (400 for -32700 / -32600, 413, 502 ...). ``data``
holds the problem+json members (``type``, ``status``, ``operation`` ...).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from idemproxy.config.routes import Target
from idemproxy.config.settings import KeyMode, RouteConfig
from idemproxy.edge.observe import OBSERVATION, SIDE_EFFECTING, Decided, TaskNamed
from idemproxy.edge.problems import record_decision
from idemproxy.ledger.forwarder import UpstreamFailed, UpstreamResponse
from idemproxy.ledger.ledger import Answered
from idemproxy.lifecycle.decisions import AMBIGUOUS, COMPLETED, classify_failure
from idemproxy.lifecycle.records import StoredResponse
from idemproxy.modes.mcp_messages import (
    INVALID_REQUEST,
    JSON,
    SESSION_HEADER,
    SSE,
    JsonRpcError,
    RequestId,
    ToolCall,
    accepts_only_sse,
    check_mirrored_headers,
    classify_reply,
    classify_status,
    error_body,
    media_type,
    parse_messages,
    problem_error,
    recorded_call,
    reply_kind,
    response_to,
    with_id,
)
from idemproxy.pipeline.answers import answer
from idemproxy.pipeline.operations import Call, Pipeline, accept_key
from idemproxy.pipeline.relay import Reply, abort, read_body, relay, write_eof_quietly, write_quietly
from idemproxy.protocol import OPERATION_HEADER, Decision
from idemproxy.protocol.errors import MissingKey, ProblemError
from idemproxy.protocol.keys import Scope, tool_call_key
from idemproxy.wire.headers import client_response_headers, refuse_ambiguous
from idemproxy.wire.http_messages import Request, Response, StreamResponse
from idemproxy.wire.sse import SseEvent, SseParser
from idemproxy.wire.upstream_client import FailureKind

log = logging.getLogger(__name__)

_NO_REPLY = classify_failure(FailureKind.CONNECTION_LOST)
_STORED_HEADERS = (("Content-Type", JSON),)


def _error_response(
    status: int, request_id: RequestId | None, error: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(status=status, body=error_body(request_id, error), content_type=JSON, headers=headers)


# -- the route ------------------------------------------------------------------------------


class McpMode:
    """Every request to a ``mode: mcp`` route."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def handle(self, request: Request, route: RouteConfig, target: Target) -> StreamResponse:
        return await _handle(self.pipeline, request, route, target)


async def _handle(proxy: Pipeline, request: Request, route: RouteConfig, target: Target) -> StreamResponse:
    """Everything a request to an MCP route gets."""
    observation = request[OBSERVATION]
    request_id: RequestId | None = None
    try:
        if request.method != "POST":
            refuse_ambiguous(request.headers, proxy.own_headers)
            observation.record(Decided(Decision.PASSTHROUGH))
            return await proxy.passthrough(request, route, target)
        body = await read_body(request, route.max_body)
        parsed = parse_messages(body)
        if not isinstance(parsed, list):
            request_id = parsed.id if parsed.method is not None else None
        refuse_ambiguous(request.headers, proxy.own_headers)  # answered under the call's id when known
        if isinstance(parsed, list):  # a batch (protocol 2025-03-26 only)
            if any(recorded_call(message, route.mcp) for message in parsed):
                raise JsonRpcError(
                    INVALID_REQUEST,
                    "Invalid request: a batch must not carry a tools/call idemproxy records; send it on its own.",
                )
            observation.record(Decided(Decision.PASSTHROUGH))
            return await proxy.forward_unrecorded(request, route, target, body)
        check_mirrored_headers(request.headers, parsed)
        call = recorded_call(parsed, route.mcp)
        if call is None:
            observation.record(Decided(Decision.PASSTHROUGH))
            return await proxy.forward_unrecorded(request, route, target, body)
        observation.record(SIDE_EFFECTING)
        return await _tool_call(proxy, request, route, target, body, call)
    except JsonRpcError as refused:
        record_decision(request, Decision.REJECTED)
        return Response(status=refused.status, body=refused.to_json(), content_type=JSON)
    except ProblemError as exc:
        # Answering a request whose id is known with 200 hands the error to the waiting call.
        record_decision(request, exc.decision)
        status = 200 if request_id is not None else exc.status
        return _error_response(status, request_id, problem_error(exc), exc.headers)


async def _tool_call(
    proxy: Pipeline,
    request: Request,
    route: RouteConfig,
    target: Target,
    body: bytes,
    call: ToolCall,
) -> StreamResponse:
    observation = request[OBSERVATION]
    headers = request.headers
    caller, task = proxy.caller_and_task(request)
    observation.record(TaskNamed(task))
    key = call.key if call.key is not None else headers.get(proxy.names.key)
    if key is None:
        if route.key_mode is KeyMode.REQUIRE:
            raise MissingKey(
                f"Route {route.name!r} requires an operation key on tools/call: "
                f"params._meta[{route.mcp.key_meta!r}] or the {proxy.names.key} header."
            )
        if route.key_mode is KeyMode.OPTIONAL:
            await proxy.charge_unrecorded(request, route, caller, task)
            observation.record(Decided(Decision.UNRECORDED))
            return await proxy.forward_unrecorded(request, route, target, body)
        proxy.check_derivable(route, task)
        key = tool_call_key(task or "", call.name, call.arguments)
    else:
        accept_key(key)
    operation = Call(request, route, target, body, Scope(caller, route.name, key, task), call.fingerprint)
    begun = await proxy.begin_operation(operation)
    if isinstance(begun, StreamResponse):
        return begun
    if isinstance(begun, Answered):
        return _replay(request, answer(begun, route, observation), call)
    op_id = begun.record.op_id

    async def read(upstream: UpstreamResponse) -> Reply:
        return await _relay_call(request, upstream, call, route, op_id)

    # An MCP client hangs up the moment it has its answer: that cancels nothing, and the
    # outcome is recorded all the same (``wire.http_server``).
    return await proxy.forward_owned(begun, read)


def _replay(request: Request, stored: Response, call: ToolCall) -> Response:
    """The stored response for this caller: its own id and session, JSON or one SSE event."""
    assert isinstance(stored.body, bytes)
    body = with_id(stored.body, call.request_id)
    content_type = JSON
    if accepts_only_sse(request.headers.get("Accept", "")):
        body, content_type = b"event: message\ndata: " + body + b"\n\n", SSE
    response = Response(status=stored.status, body=body, content_type=content_type)
    for name, value in stored.headers.items():
        if name.lower() not in ("content-type", "content-length", SESSION_HEADER.lower()):
            response.headers.add(name, value)
    if (session := request.headers.get(SESSION_HEADER)) is not None:
        response.headers[SESSION_HEADER] = session
    return response


# -- reading the server's answer --------------------------------------------------------------


def _stored(data: bytes | None, size: int, sha256: str) -> StoredResponse:
    return StoredResponse(status=200, headers=_STORED_HEADERS, body=data, body_size=size, body_sha256=sha256)


async def _relay_call(
    request: Request, upstream: UpstreamResponse, call: ToolCall, route: RouteConfig, op_id: str
) -> Reply:
    by_status = classify_status(upstream.status, route)
    content_type = media_type(upstream.headers)
    if by_status is None and content_type == SSE:
        return await _relay_stream(request, upstream, call, route, op_id)
    relayed = await relay(request, upstream, route.max_stored_response, op_id)
    detail: dict[str, object] = {"status": upstream.status}
    if relayed.stored is None:  # the body broke off after streaming began
        kind = relayed.failed or FailureKind.CONNECTION_LOST
        return Reply(relayed.response, classify_failure(kind), None, {**detail, "failure": kind.value})
    data = relayed.stored.body
    if by_status is not None or content_type != JSON:
        return Reply(relayed.response, by_status or AMBIGUOUS, None, {**detail, "content_type": content_type})
    stored = _stored(data, relayed.stored.body_size, relayed.stored.body_sha256)
    if data is None:  # over max_stored_response: completed, but only its size and hash are kept
        return Reply(relayed.response, COMPLETED, stored, {**detail, "jsonrpc": "not stored"})
    reply = response_to(data, call.request_id)
    return Reply(relayed.response, classify_reply(reply), stored, {**detail, "jsonrpc": reply_kind(reply)})


async def _relay_stream(
    request: Request, upstream: UpstreamResponse, call: ToolCall, route: RouteConfig, op_id: str
) -> Reply:
    """Stream the server's events to the first caller as they come, up to the response to
    the call (which ends the stream, MCP says); keep only that response."""
    response = StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=client_response_headers(upstream.headers, keep_length=True),
    )
    response.headers[OPERATION_HEADER] = op_id
    with contextlib.suppress(ConnectionError):  # the first caller may be gone: the outcome still counts
        await response.prepare(request)
    parser = SseParser(route.max_stored_response)
    oversize: SseEvent | None = None
    detail: dict[str, object] = {"status": upstream.status, "streamed": True}
    try:
        async for chunk in upstream.chunks():
            await write_quietly(response, chunk)
            for event in parser.feed(chunk):
                if event.data is None:
                    oversize = oversize or event
                elif (reply := response_to(event.data, call.request_id)) is not None:
                    # Recorded at once: clients hang up as soon as they have their answer.
                    stored = _stored(event.data, event.size, event.sha256)
                    return Reply(response, classify_reply(reply), stored, {**detail, "jsonrpc": reply_kind(reply)})
    except UpstreamFailed as exc:  # cut off before the answer
        abort(request)
        kind = exc.kind
        return Reply(response, classify_failure(kind), None, {**detail, "failure": kind.value})
    await write_eof_quietly(response)
    if oversize is not None:
        # An event too large to read was, in all likelihood, the response.
        stored = _stored(None, oversize.size, oversize.sha256)
        return Reply(response, COMPLETED, stored, {**detail, "jsonrpc": "not stored"})
    return Reply(response, _NO_REPLY, None, {**detail, "jsonrpc": "none"})

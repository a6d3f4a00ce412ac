"""One request path for every mode: reserve, forward, finish.

A mode (``idemproxy.modes``) turns its wire message into an operation: the route,
the scope it is recorded under and its fingerprint, and how to read the tool's
answer. ``Pipeline`` does the rest, the same for all of them: it reserves the
operation in the ledger (or says what a duplicate gets), forwards the attempt
it owns, and records the outcome, fenced. Calls a route does not record pass
through here too, so budgets and header rules apply to them alike.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from multidict import CIMultiDict

from idemproxy import metrics
from idemproxy.config.routes import Target, upstream_target
from idemproxy.config.settings import DeriveScope, FailureMode, RouteConfig
from idemproxy.edge.auth import CREDENTIAL_HEADERS, IDENTITY, READ_BODY
from idemproxy.edge.budgets import Budgets
from idemproxy.edge.observe import OBSERVATION, Decided, Keyed
from idemproxy.ledger.epoch import LostLedger
from idemproxy.ledger.forwarder import Forwarder, NotSent, UpstreamFailed, UpstreamRequest
from idemproxy.ledger.ledger import Answered, Ledger, OperationRequest, Owned
from idemproxy.lifecycle.decisions import ABORTED, NOT_SENT, Outcome, classify_failure
from idemproxy.lifecycle.records import OperationRecord, StoredRequest, StoredResponse
from idemproxy.pipeline.relay import CHUNK, ReadReply, UpstreamTimer, abort, read_body, unrecorded_failure
from idemproxy.protocol import ANONYMOUS, Decision, HeaderNames
from idemproxy.protocol.errors import (
    BodyTooLarge,
    InvalidKey,
    LeaseLost,
    LedgerLost,
    LedgerUnavailable,
    MissingTask,
    OutcomeUnknown,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from idemproxy.protocol.keys import Scope, operation_id, validate_key
from idemproxy.store import StoreUnavailable
from idemproxy.store.base import RecordNotStorable
from idemproxy.wire.headers import (
    client_response_headers,
    upstream_request_headers,
    with_injected,
)
from idemproxy.wire.http_messages import Request, Response, StreamResponse
from idemproxy.wire.upstream_client import Body, FailureKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, init=False)
class Call:
    """One request a mode turned into an operation: the request, its route and target,
    the body to forward, the scope it is recorded under and its fingerprint."""

    request: Request
    route: RouteConfig
    target: Target
    body: bytes
    scope: Scope
    fingerprint: str

    def __init__(  # compiled by mypyc, unlike a generated one
        self, request: Request, route: RouteConfig, target: Target, body: bytes, scope: Scope, fingerprint: str
    ) -> None:
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "fingerprint", fingerprint)


@dataclass(frozen=True, slots=True, init=False)
class Forwarding:
    """A call whose attempt this proxy owns: the call, its record (the attempt and the
    fencing token its outcome is recorded with) and the headers it is forwarded with."""

    call: Call
    record: OperationRecord
    headers: CIMultiDict[str]

    def __init__(  # compiled by mypyc, unlike a generated one
        self, call: Call, record: OperationRecord, headers: CIMultiDict[str]
    ) -> None:
        object.__setattr__(self, "call", call)
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "headers", headers)


class Pipeline:
    """Reserve, forward, finish: what every mode does with an operation."""

    def __init__(
        self,
        ledger: Ledger,
        forwarder: Forwarder,
        header_names: HeaderNames,
        budgets: Budgets | None = None,  # None: no budget can apply, none is looked at
    ) -> None:
        self.ledger = ledger
        self.forwarder = forwarder
        self.names = header_names
        self.budgets = budgets
        #: The headers the ledger reads, which the tool must read alike (``refuse_ambiguous``).
        self.own_headers = (header_names.key, header_names.caller, header_names.task)

    def caller_and_task(self, request: Request) -> tuple[str, str | None]:
        """Who asks (the authenticated identity, else the caller header) and for which task."""
        identity = request.get(IDENTITY)
        headers = request.headers
        caller = identity.name if identity is not None else headers.get(self.names.caller) or ANONYMOUS
        return caller, headers.get(self.names.task)

    async def begin_operation(self, call: Call) -> Forwarding | Answered | StreamResponse:
        """Reserve ``call``'s operation in the ledger.

        Returns the attempt to forward when the caller owns it, else the ledger's
        answer; a response instead when the ledger is down and the route fails open."""
        request, route, target, body, scope = call.request, call.route, call.target, call.body, call.scope
        op_id = operation_id(scope)
        observation = request[OBSERVATION]
        observation.record(Keyed(op_id, scope.key))
        upstream_headers = None  # built only when needed: a replay forwards nothing
        stored_request = None
        if route.reconcile is not None and route.reconcile.stores_request:
            upstream_headers = self.upstream_headers(request, scope.key)  # a resend sends the same key
            stored_request = StoredRequest(headers=tuple(upstream_headers.items()), body=body)
        budget = None
        if self.budgets is not None:
            budget = self.budgets.applying(request.get(IDENTITY), scope.caller, scope.task)
        op = OperationRequest(
            op_id=op_id,
            scope=scope,
            fingerprint=call.fingerprint,
            method=request.method,
            target=target.raw,
            lease_s=route.lease_s,
            wait_s=route.wait_s,
            max_attempts=route.max_attempts if budget is None else budget.max_attempts(route.max_attempts),
            stored_request=stored_request,
            retention_s=route.retention_s,
        )
        try:
            begun = await self.ledger.begin(op)
        except LostLedger as lost:
            metrics.STORE_ERRORS.labels("reserve").inc()
            raise LedgerLost(
                f"The operation ledger lost its records ({lost}), so nothing is forwarded until an operator "
                "confirms: retries of operations it had answered would run again. See `idemproxy ops ledger`.",
                headers={"Retry-After": "60"},
            ) from lost
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("reserve").inc()
            if route.on_store_error is FailureMode.FAIL_OPEN:
                log.warning("ledger unavailable; forwarding unrecorded (fail_open)", extra={"route": route.name})
                observation.record(Decided(Decision.FAIL_OPEN))
                return await self.forward_unrecorded(request, route, target, body)
            raise LedgerUnavailable(
                "The operation ledger is unreachable, so the request was not forwarded (fail-closed). "
                "Retry with the same key.",
                headers={"Retry-After": "1"},
            ) from exc
        except RecordNotStorable as too_large:
            # Nothing was written or forwarded: the request is more than the ledger can hold.
            raise BodyTooLarge(
                f"The request cannot be recorded in the ledger ({too_large}); it was not forwarded."
            ) from too_large
        if budget is not None:
            begun = await budget.admit(self.ledger, begun, route)  # BudgetExceeded when spent
        if not isinstance(begun, Owned):
            return begun
        if upstream_headers is None:
            upstream_headers = self.upstream_headers(request, scope.key)
        return Forwarding(call, begun.record, upstream_headers)

    def check_derivable(self, route: RouteConfig, task: str | None) -> None:
        """A derived key needs the task header unless the route opts into caller scope: without
        a task, identical calls from different runs would be one operation, and the later
        run would get the earlier one's answer."""
        if not task and route.derive_scope is DeriveScope.TASK:
            raise MissingTask(
                f"Route {route.name!r} derives operation keys per task, and this call carries neither an "
                f"{self.names.key} nor an {self.names.task} header. Send {self.names.task} naming the run "
                f"(or an {self.names.key}); without it, identical calls from different runs would be one "
                "operation.",
                header=self.names.task,
            )

    async def charge_unrecorded(self, request: Request, route: RouteConfig, caller: str, task: str | None) -> None:
        """Budgets count a side-effecting call forwarded without a record too."""
        if self.budgets is not None:
            budget = self.budgets.applying(request.get(IDENTITY), caller, task)
            if budget is not None:
                await budget.charge_unrecorded(route)  # BudgetExceeded when spent

    async def forward_owned(self, forwarding: Forwarding, read: ReadReply) -> StreamResponse:
        """Send the attempt ``forwarding`` owns and record its outcome; ``read`` turns the
        tool's response into the caller's answer and the outcome. A caller that hangs up
        meanwhile cancels nothing (``wire.http_server``): the outcome is recorded all the same.
        Only shutdown cancels, once its grace period is over; cancelled while recording, the
        attempt stays PENDING under its lease and is reconciled, as after a crash (the caller
        got no answer, so every answer given is the reconciled one)."""
        call, owned = forwarding.call, forwarding.record
        request, route = call.request, call.route
        op_id = owned.op_id
        request[OBSERVATION].record(Decided(Decision.FORWARDED, owned.attempt))
        try:
            with UpstreamTimer(request, route):
                sending = UpstreamRequest(
                    request.method,
                    upstream_target(route, call.target),
                    with_injected(forwarding.headers, route.upstream_headers),
                    call.body,
                )
                async with self.forwarder.request(
                    route, sending, guard=lambda: self.ledger.leases.still_held(op_id)
                ) as upstream:
                    reply = await read(upstream)
        except UpstreamFailed as failed:
            metrics.UPSTREAM_FAILURES.labels(route.name, failed.kind.value).inc()
            return await self.record_failure(route, owned, failed.kind, failed.detail)
        except NotSent as not_sent:  # named apart: mypyc gives a name one type per function
            # Paused or stalled past the lease: a reconciler may own the operation now.
            # Nothing was sent, so release it if it is still ours.
            await self.finish(owned, NOT_SENT, None, route, {"failure": "not-sent"})
            raise LeaseLost(
                "This proxy's claim on the operation ran out before the request was sent; it was not "
                "sent. Retry with the same key.",
                headers={"Retry-After": "1"},
                operation=op_id,
            ) from not_sent
        except asyncio.CancelledError as cancelled:
            # The proxy is shutting down mid-request: nobody knows what the tool did.
            await asyncio.shield(self.finish(owned, ABORTED, None, route, {"failure": "aborted"}))
            # Re-raised by name: after an ``await`` in an ``except`` block, mypyc's bare
            # ``raise`` re-raises a CancelledError it no longer holds a reference to.
            raise cancelled
        except Exception as broken:
            # A bug once the request may have been sent: the tool may have acted, so the outcome
            # is unknown, to be reconciled; never left PENDING under a lease this process renews.
            log.exception("forwarding failed unexpectedly; the outcome is unknown", extra={"op": op_id})
            detail: dict[str, object] = {"failure": "internal-error", "error": f"{type(broken).__name__}: {broken}"}
            await self.finish(owned, ABORTED, None, route, detail)
            raise OutcomeUnknown(
                "The request may have been sent, but its answer could not be relayed; whether it took "
                "effect is unknown until reconciliation establishes it. Retry later with the same key.",
                headers={"Retry-After": "1"},
                operation=op_id,
            ) from broken
        await self.finish(owned, reply.outcome, reply.stored, route, reply.detail)
        return reply.response

    async def record_failure(
        self, route: RouteConfig, owned: OperationRecord, kind: FailureKind, detail: str
    ) -> StreamResponse:
        outcome = classify_failure(kind)
        await self.finish(owned, outcome, None, route, {"failure": kind.value, "error": detail})
        error: UpstreamError
        if kind is FailureKind.CONNECT:
            error = UpstreamUnreachable(f"The request was not sent: {detail}. Retry with the same key.")
        elif kind is FailureKind.TIMEOUT:
            error = UpstreamTimeout(
                "The request was sent but the upstream did not answer in time; whether it took effect "
                "is unknown. Retry with the same key to learn the outcome."
            )
        else:
            error = UpstreamConnectionLost(
                f"The request was sent but the connection was lost ({detail}); whether it took effect "
                "is unknown. Retry with the same key to learn the outcome."
            )
        error.extensions["operation"] = owned.op_id
        error.extensions["state"] = outcome.state.value  # UNKNOWN: retry to learn it; RELEASED: retry
        error.extensions["attempt"] = owned.attempt
        raise error

    async def finish(
        self,
        owned: OperationRecord,
        outcome: Outcome,
        stored: StoredResponse | None,
        route: RouteConfig,
        detail: dict[str, object],
    ) -> None:
        try:
            current = await self.ledger.finish(owned, outcome, stored, route.retention_s, detail)
        except StoreUnavailable:
            metrics.STORE_ERRORS.labels("record").inc()
            log.error(
                "could not record the outcome; the operation stays PENDING until its lease expires",
                extra={"op": owned.op_id, "outcome": outcome.state.value},
            )
            return
        if current is not None:
            log.warning(
                "outcome rejected by the fencing token: another owner decided this operation",
                extra={"op": owned.op_id, "state": current.state.value, "fence": current.fence},
            )

    # -- calls that bypass the ledger ----------------------------------------------------

    async def passthrough(self, request: Request, route: RouteConfig, target: Target) -> StreamResponse:
        length = request.content_length
        if length is not None and length > route.max_body:
            raise BodyTooLarge(f"The request body exceeds route {route.name!r}'s max_body ({route.max_body} bytes).")
        data: Body = request.get(READ_BODY)
        if data is None and request.body_exists:
            if length is None:
                # Chunked: no length to check up front, so it is read (within max_body) before sending.
                data = await read_body(request, route.max_body)
            else:
                data = request.content.iter_chunked(CHUNK)
        return await self._stream(request, route, target, data, length)

    async def forward_unrecorded(
        self, request: Request, route: RouteConfig, target: Target, body: bytes
    ) -> StreamResponse:
        return await self._stream(request, route, target, body)

    async def _stream(
        self, request: Request, route: RouteConfig, target: Target, data: Body, length: int | None = None
    ) -> StreamResponse:
        try:
            with UpstreamTimer(request, route):
                headers = with_injected(self.upstream_headers(request), route.upstream_headers)
                sending = UpstreamRequest(request.method, upstream_target(route, target), headers, data, length)
                return await self._relay_stream(request, route, sending)
        except UpstreamFailed as exc:
            metrics.UPSTREAM_FAILURES.labels(route.name, exc.kind.value).inc()
            raise unrecorded_failure(exc) from exc

    async def _relay_stream(self, request: Request, route: RouteConfig, sending: UpstreamRequest) -> StreamResponse:
        async with self.forwarder.request(route, sending) as upstream:
            size = upstream.content_length
            if size is not None and size <= CHUNK and request.method != "HEAD":
                # A small body is read whole and sent with the headers in one write.
                body = await upstream.read()
                return Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    body=body,
                    headers=client_response_headers(upstream.headers, keep_length=False),
                )
            response = StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, keep_length=True),
            )
            try:
                await response.prepare(request)
                async for chunk in upstream.chunks():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                return response  # the caller hung up; nothing was recorded, nothing to do
            except UpstreamFailed:
                abort(request)  # a truncated body must not look complete
            return response

    def upstream_headers(self, request: Request, key: str | None = None) -> CIMultiDict[str]:
        """What the tool receives: the caller's end-to-end headers, except that the caller
        header names the identity authentication established (when it is on), and the key
        header carries ``key``, the key the ledger recorded (when given)."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client_ip = peer[0] if isinstance(peer, tuple) else None
        identity = request.get(IDENTITY)
        drop = CREDENTIAL_HEADERS if identity is not None else ()
        headers = upstream_request_headers(
            request.headers, client_ip=client_ip, scheme=request.scheme, host=request.host, drop=drop
        )
        if identity is not None:
            headers[self.names.caller] = identity.name  # replaces whatever the client claimed
        if key is not None:
            headers[self.names.key] = key
        return headers


def accept_key(key: str) -> str:
    """A key sent by the caller, checked: ``validate_key``, and never a dot segment, which a
    probe URL or a tool could read as a path step."""
    validate_key(key)
    if key in (".", ".."):
        raise InvalidKey(f"The idempotency key may not be {key!r}: a tool could read it as a path step.")
    return key

"""The proxy's request path: route, key, fingerprint, ledger, forward, answer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

from idemproxy import metrics
from idemproxy.auth import CREDENTIAL_HEADERS, IDENTITY, READ_BODY
from idemproxy.budgets import Budgets
from idemproxy.config import FailureMode, HeaderNames, KeyMode, RouteConfig
from idemproxy.decisions import Action, FailureKind, Outcome, classify_failure, classify_status
from idemproxy.errors import (
    PROBLEM_CONTENT_TYPE,
    AttemptsExhausted,
    BodyTooLarge,
    FingerprintMismatch,
    InFlight,
    InternalError,
    LeaseLost,
    LedgerUnavailable,
    MethodNotAllowed,
    MissingKey,
    NeedsAttention,
    NoRoute,
    OutcomeUnknown,
    ProblemError,
    ResponseNotStored,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from idemproxy.fingerprint import derive_key, fingerprint, operation_id, validate_key
from idemproxy.forwarder import Forwarder, NotSent, UpstreamFailed, failure_kind
from idemproxy.headers import (
    client_response_headers,
    storable_response_headers,
    upstream_request_headers,
    with_injected,
)
from idemproxy.ledger import Answered, Ledger, OperationRequest, Owned
from idemproxy.mcp_config import RouteMode
from idemproxy.observe import OBSERVATION, Observation
from idemproxy.records import OperationRecord, RetryClass, Scope, State, StoredRequest, StoredResponse
from idemproxy.routes import RouteTable, Target, parse_target, upstream_url
from idemproxy.store import StoreUnavailable

log = logging.getLogger(__name__)

REPLAYED_HEADER = "Idempotent-Replayed"
RECONCILED_HEADER = "Idempotent-Reconciled"
OPERATION_HEADER = "Idempotency-Operation"
ANONYMOUS = "anonymous"
_CHUNK = 64 * 1024
#: What ``begin_operation`` returns as headers when nothing is to be forwarded (never modified).
_NO_HEADERS: CIMultiDict[str] = CIMultiDict()


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where errors become problem+json responses."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ProblemError as exc:
        return problem_response(exc, request)
    except web.HTTPException as exc:
        if exc.status == 413:  # aiohttp's own body limit
            return problem_response(BodyTooLarge(exc.text or "Request body too large."), request)
        if exc.status == 404:  # the admin listener's router
            return problem_response(NoRoute(f"No endpoint {request.path!r}."), request)
        if exc.status == 405:
            allow = {"Allow": exc.headers.get("Allow", "")}
            return problem_response(MethodNotAllowed(f"{request.method} is not allowed here.", headers=allow), request)
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.raw_path})
        return problem_response(InternalError("The proxy failed unexpectedly; see its logs."), request)


def _decide(request: web.Request, decision: str) -> None:
    observation = request.get(OBSERVATION)
    if observation is not None and observation.decision is None:
        observation.decision = decision


@web.middleware
async def non_origin_target_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Targets the catch-all route cannot match (``CONNECT host:443``, ``OPTIONS *``) get
    the same problem+json refusal as every other non-origin target."""
    if request.match_info.http_exception is not None:
        parse_target(request.method, request.raw_path)
        raise NoRoute(f"No route is configured for {request.raw_path!r}.")
    response: web.StreamResponse = await handler(request)
    return response


def problem_response(exc: ProblemError, request: web.Request) -> web.Response:
    _decide(request, exc.decision)
    return web.Response(
        status=exc.status,
        body=exc.to_json(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers,
    )


class ProxyHandler:
    """Handles every request on the proxy listener."""

    def __init__(
        self,
        routes: RouteTable,
        ledger: Ledger,
        forwarder: Forwarder,
        header_names: HeaderNames,
        budgets: Budgets | None = None,  # None: no budget can apply, none is looked at
    ) -> None:
        self.routes = routes
        self.ledger = ledger
        self.forwarder = forwarder
        self.names = header_names
        self.budgets = budgets

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = parse_target(request.method, request.raw_path)
        route = self.routes.match(target.path)
        observation = request[OBSERVATION]
        observation.route = route.name
        if route.mode is RouteMode.MCP:  # the body, not the method, says what is recorded
            from idemproxy.mcp import handle_mcp  # idemproxy.mcp builds on this module

            return await handle_mcp(self, request, route, target)
        if not route.is_side_effecting(request.method):
            observation.decision = "passthrough"
            return await self._passthrough(request, route, target)
        observation.side_effecting = True
        body = await _read_body(request, route.max_body)
        return await self._side_effect(request, route, target, body, observation)

    # -- side-effecting calls ----------------------------------------------------------

    async def _side_effect(
        self, request: web.Request, route: RouteConfig, target: Target, body: bytes, observation: Observation
    ) -> web.StreamResponse:
        headers = request.headers
        request_fp = fingerprint(request.method, target.path, target.query, headers, route.fingerprint_headers, body)
        identity = request.get(IDENTITY)
        caller = identity.name if identity is not None else headers.get(self.names.caller) or ANONYMOUS
        task = headers.get(self.names.task)
        key = headers.get(self.names.key)
        observation.task = task
        if key is None:
            if route.key_mode is KeyMode.REQUIRE:
                raise MissingKey(f"Route {route.name!r} requires an {self.names.key} header on {request.method}.")
            if route.key_mode is KeyMode.OPTIONAL:
                await self.charge_unrecorded(request, route, caller, task)
                observation.decision = "unrecorded"
                return await self._forward_unrecorded(request, route, target, body)
            key = derive_key(caller, task, request_fp)
        else:
            validate_key(key)
        scope = Scope(caller=caller, route=route.name, key=key, task=task)
        begun, upstream_headers = await self.begin_operation(
            request, route, target, body, observation, scope, request_fp
        )
        if isinstance(begun, web.StreamResponse):
            return begun
        if isinstance(begun, Answered):
            observation.attempt = begun.record.attempt
            return _answer(begun, route, observation)
        observation.decision = "forwarded"
        observation.attempt = begun.record.attempt
        return await self._forward_owned(request, route, target, body, begun.record, upstream_headers)

    async def begin_operation(
        self,
        request: web.Request,
        route: RouteConfig,
        target: Target,
        body: bytes,
        observation: Observation,
        scope: Scope,
        request_fingerprint: str,
    ) -> tuple[Owned | Answered | web.StreamResponse, CIMultiDict[str]]:
        """Reserve the operation in the ledger (shared by HTTP and MCP routes).

        Returns the ledger's answer and, when the caller owns the attempt, the
        headers to forward with; a response instead when the ledger is down and
        the route fails open."""
        observation.key = scope.key
        upstream_headers = None  # built only when needed: a replay forwards nothing
        stored_request = None
        if route.reconcile is not None and route.reconcile.stores_request:
            upstream_headers = self._upstream_headers(request)
            stored_request = StoredRequest(headers=tuple(upstream_headers.items()), body=body)
        budget = None
        if self.budgets is not None:
            budget = self.budgets.applying(request.get(IDENTITY), scope.caller, scope.task)
        op = OperationRequest(
            op_id=operation_id(scope),
            scope=scope,
            fingerprint=request_fingerprint,
            method=request.method,
            target=target.raw,
            lease_s=route.lease_s,
            wait_s=route.wait_s,
            max_attempts=route.max_attempts if budget is None else budget.max_attempts(route.max_attempts),
            stored_request=stored_request,
        )
        observation.op_id = op.op_id
        try:
            begun = await self.ledger.begin(op)
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("reserve").inc()
            if route.on_store_error is FailureMode.FAIL_OPEN:
                log.warning("ledger unavailable; forwarding unrecorded (fail_open)", extra={"route": route.name})
                observation.decision = "fail_open"
                return await self._forward_unrecorded(request, route, target, body), _NO_HEADERS
            raise LedgerUnavailable(
                "The operation ledger is unreachable, so the request was not forwarded (fail-closed). "
                "Retry with the same key.",
                headers={"Retry-After": "1"},
            ) from exc
        if budget is not None:
            begun = await budget.admit(self.ledger, begun, route)  # BudgetExceeded when spent
        if not isinstance(begun, Owned):
            return begun, _NO_HEADERS
        return begun, upstream_headers if upstream_headers is not None else self._upstream_headers(request)

    async def charge_unrecorded(self, request: web.Request, route: RouteConfig, caller: str, task: str | None) -> None:
        """Budgets count a side-effecting call forwarded without a record too."""
        if self.budgets is not None:
            budget = self.budgets.applying(request.get(IDENTITY), caller, task)
            if budget is not None:
                await budget.charge_unrecorded(route)  # BudgetExceeded when spent

    async def _forward_owned(
        self,
        request: web.Request,
        route: RouteConfig,
        target: Target,
        body: bytes,
        owned: OperationRecord,
        upstream_headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        url = upstream_url(route, target)
        op_id = owned.op_id
        try:
            with _upstream_timer(request, route):
                async with self.forwarder.request(
                    route,
                    request.method,
                    url,
                    with_injected(upstream_headers, route.upstream_headers),
                    body,
                    guard=lambda: self.ledger.leases.still_held(op_id),
                ) as upstream:
                    outcome = classify_status(upstream.status, route.not_applied_statuses, route.ambiguous_statuses)
                    relayed = await _relay(request, upstream, route.max_stored_response, owned.op_id)
        except UpstreamFailed as exc:
            metrics.UPSTREAM_FAILURES.labels(route.name, exc.kind.value).inc()
            return await self._record_failure(route, owned, exc.kind, exc.detail)
        except NotSent as exc:
            # Paused or stalled past the lease: a reconciler may own the operation now.
            # Nothing was sent, so release it if it is still ours.
            await self._finish(
                owned, Outcome(State.RELEASED, RetryClass.NOT_SENT), None, route, {"failure": "not-sent"}
            )
            raise LeaseLost(
                "This proxy's claim on the operation ran out before the request was sent; it was not "
                "sent. Retry with the same key.",
                headers={"Retry-After": "1"},
                operation=op_id,
            ) from exc
        except asyncio.CancelledError:
            # The proxy is shutting down mid-request: nobody knows what the tool did.
            await asyncio.shield(
                self._finish(owned, Outcome(State.UNKNOWN, RetryClass.ABORTED), None, route, {"failure": "aborted"})
            )
            raise
        if relayed.stored is None:
            kind = relayed.failed or FailureKind.CONNECTION_LOST
            await self._finish(owned, classify_failure(kind), None, route, {"failure": kind.value, "streamed": True})
            return relayed.response
        stored = relayed.stored
        detail: dict[str, object] = {"status": stored.status, "size": stored.body_size}  # the digest is in the response
        await self._finish(owned, outcome, stored, route, detail)
        return relayed.response

    async def _record_failure(
        self, route: RouteConfig, owned: OperationRecord, kind: FailureKind, detail: str
    ) -> web.StreamResponse:
        outcome = classify_failure(kind)
        await self._finish(owned, outcome, None, route, {"failure": kind.value, "error": detail})
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
        raise error

    async def _finish(
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

    async def _passthrough(self, request: web.Request, route: RouteConfig, target: Target) -> web.StreamResponse:
        data = request.get(READ_BODY, request.content if request.body_exists else None)
        if request.content_length is not None and request.content_length > route.max_body:
            raise BodyTooLarge(f"The request body exceeds route {route.name!r}'s max_body ({route.max_body} bytes).")
        if data is request.content and request.content_length is None:
            # Chunked: no length to check up front, so it is read (within max_body) before sending.
            data = await _read_body(request, route.max_body)
        return await self._stream(request, route, target, data)

    async def _forward_unrecorded(
        self, request: web.Request, route: RouteConfig, target: Target, body: bytes
    ) -> web.StreamResponse:
        return await self._stream(request, route, target, body)

    async def _stream(self, request: web.Request, route: RouteConfig, target: Target, data: Any) -> web.StreamResponse:
        url = upstream_url(route, target)
        try:
            with _upstream_timer(request, route):
                return await self._relay_stream(request, route, url, data)
        except UpstreamFailed as exc:
            metrics.UPSTREAM_FAILURES.labels(route.name, exc.kind.value).inc()
            raise _unrecorded_failure(exc) from exc

    async def _relay_stream(self, request: web.Request, route: RouteConfig, url: URL, data: Any) -> web.StreamResponse:
        async with self.forwarder.request(
            route, request.method, url, with_injected(self._upstream_headers(request), route.upstream_headers), data
        ) as upstream:
            length = upstream.content_length
            if length is not None and length <= _CHUNK and request.method != "HEAD":
                # A small body is read whole and sent with the headers in one write.
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise UpstreamFailed(failure_kind(exc), f"{type(exc).__name__}: {exc}") from exc
                return web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    body=body,
                    headers=client_response_headers(upstream.headers, keep_length=False),
                )
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, keep_length=True),
            )
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                return response  # the caller hung up; nothing was recorded, nothing to do
            except (aiohttp.ClientError, TimeoutError):
                _abort(request)  # a truncated body must not look complete
            return response

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client_ip = peer[0] if isinstance(peer, tuple) else None
        drop = CREDENTIAL_HEADERS if IDENTITY in request else ()
        return upstream_request_headers(
            request.headers, client_ip=client_ip, scheme=request.scheme, host=request.host, drop=drop
        )


# -- helpers ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Relayed:
    response: web.StreamResponse
    stored: StoredResponse | None  # None when the body was interrupted
    failed: FailureKind | None = None


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, max_stored: int, op_id: str) -> _Relayed:
    """Read the upstream's answer for the first caller and for the ledger.

    Bodies up to ``max_stored`` are buffered and kept for replay; a larger one
    is streamed to the first caller and only its size and hash are kept.
    """
    digest = hashlib.sha256()
    buffered = bytearray()
    size = 0
    streaming: web.StreamResponse | None = None
    try:
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if streaming is not None:
                await _write_quietly(streaming, chunk)
                continue
            buffered += chunk
            if len(buffered) > max_stored:
                streaming = web.StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=client_response_headers(upstream.headers, keep_length=True),
                )
                streaming.headers[OPERATION_HEADER] = op_id
                await streaming.prepare(request)
                await _write_quietly(streaming, bytes(buffered))
                buffered = bytearray()
    except (aiohttp.ClientError, TimeoutError) as exc:
        if streaming is None:
            raise UpstreamFailed(failure_kind(exc), f"{type(exc).__name__}: {exc}") from exc
        _abort(request)
        return _Relayed(streaming, None, failure_kind(exc))
    stored = StoredResponse(
        status=upstream.status,
        headers=storable_response_headers(upstream.headers),
        body=bytes(buffered) if streaming is None else None,
        body_size=size,
        body_sha256=digest.hexdigest(),
    )
    if streaming is not None:
        await _write_eof_quietly(streaming)
        return _Relayed(streaming, stored)
    response = web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=stored.body,
        headers=client_response_headers(upstream.headers, keep_length=False),
    )
    response.headers[OPERATION_HEADER] = op_id
    return _Relayed(response, stored)


async def _write_quietly(response: web.StreamResponse, chunk: bytes) -> None:
    # The first caller may hang up; the ledger still needs the whole body's hash.
    with contextlib.suppress(ConnectionError):
        await response.write(chunk)


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _answer(answered: Answered, route: RouteConfig, observation: Observation) -> web.Response:
    """The response for a request that must not be forwarded."""
    record = answered.record
    action = answered.action
    if action is Action.REPLAY:
        if answered.reconciled:
            observation.decision = "reconciled_found"
        else:
            observation.decision = "waited_replayed" if answered.waited else "replayed"
        stored = record.response
        assert stored is not None
        assert stored.body is not None
        response = web.Response(status=stored.status, body=stored.body, headers=stored.headers)
        response.headers[REPLAYED_HEADER] = "true"
        if record.reconciled:
            response.headers[RECONCILED_HEADER] = "true"
        response.headers[OPERATION_HEADER] = record.op_id
        return response
    raise _problem_for(action, record, route)


def _problem_for(action: Action, record: OperationRecord, route: RouteConfig) -> ProblemError:
    facts: dict[str, Any] = {
        "operation": record.op_id,
        "state": record.state.value,
        "attempt": record.attempt,
    }
    match action:
        case Action.MISMATCH:
            return FingerprintMismatch(
                "This idempotency key was first used for a different request (method, path, query, "
                "headers or body differ). Use a new key for a new request.",
                **facts,
            )
        case Action.WAIT:
            return InFlight(
                f"An earlier request with this key is still in flight after waiting {route.wait_s:g}s. "
                "Retry later with the same key to get its outcome.",
                headers={"Retry-After": "1"},
                **facts,
            )
        case Action.UNKNOWN:
            retry_in_s = max(1, -(-(record.next_probe_ms - int(time.time() * 1000)) // 1000))
            return OutcomeUnknown(
                "An earlier attempt was sent but its outcome is unknown "
                f"({record.retry_class or 'lease expired'}); it will not be forwarded again until "
                "the outcome is established. Retry later with the same key, or ask an operator to resolve it.",
                headers={"Retry-After": str(retry_in_s)},
                retry_class=record.retry_class,
                probes=record.probes,
                **facts,
            )
        case Action.NEEDS_ATTENTION:
            return NeedsAttention(
                "The outcome of this operation could not be established automatically; an operator "
                f"must resolve it (`idemproxy ops resolve {record.op_id} --done|--not-done`) before it "
                "can be answered or retried.",
                retry_class=record.retry_class,
                probes=record.probes,
                **facts,
            )
        case Action.NOT_STORED:
            stored = record.response
            return ResponseNotStored(
                "The operation completed, but its response body exceeded the route's "
                "max_stored_response and was not kept; it will not be forwarded again.",
                original_status=stored.status if stored else None,
                body_size=stored.body_size if stored else None,
                body_sha256=stored.body_sha256 if stored else None,
                **facts,
            )
        case Action.EXHAUSTED:
            return AttemptsExhausted(
                f"All {route.max_attempts} attempts of this operation were used up without a definitive answer.",
                max_attempts=route.max_attempts,
                **facts,
            )
    raise AssertionError(f"no problem for {action}")


@contextlib.contextmanager
def _upstream_timer(request: web.Request, route: RouteConfig) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        request[OBSERVATION].upstream_s = elapsed
        metrics.upstream_seconds(route.name, request.method).observe(elapsed)


def _unrecorded_failure(exc: UpstreamFailed) -> UpstreamError:
    if exc.kind is FailureKind.CONNECT:
        return UpstreamUnreachable(f"The request was not sent: {exc.detail}.")
    if exc.kind is FailureKind.TIMEOUT:
        return UpstreamTimeout("The upstream did not answer in time.")
    return UpstreamConnectionLost(f"The upstream connection was lost: {exc.detail}.")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or 413 before anything is recorded."""
    too_large = BodyTooLarge(f"The request body exceeds this route's max_body of {limit} bytes.", max_body=limit)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    if READ_BODY in request:  # authentication read it to check a signature
        read = request[READ_BODY]
        if len(read) > limit:
            raise too_large
        return read
    body = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)

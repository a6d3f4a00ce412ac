"""The admin listener: health for orchestrators, and ``/_idem/ops`` for operators.

``GET /_idem/ops/{op_id}`` shows one operation's full record and the exact
condition it needs to move forward; ``GET /_idem/ops`` lists operations by
state, route, task and age; ``POST /_idem/ops/{op_id}/resolve`` settles an
UNKNOWN or NEEDS_ATTENTION operation as done (with the response to replay)
or not done (released for a new attempt). Every resolution is recorded as
evidence with who and when.

With authentication on, ``/_idem/ops`` needs an identity with ``ops: read``
(its own operations: those whose ``scope.caller`` is its name) or ``ops:
admin`` (every caller's operations, ``?caller=`` to filter, and resolve).

``/_idem/console`` is the same for a person with a browser (``idemproxy.ops.console``),
through the same functions and behind the same authentication.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import itertools
import re
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

import orjson
import yaml
from aiohttp import web

from idemproxy import metrics
from idemproxy.config.settings import RouteConfig
from idemproxy.config.units import parse_duration
from idemproxy.edge.auth import IDENTITY, ExpectHandler, OpsAccess
from idemproxy.ledger.epoch import EpochWatch, epoch_watch
from idemproxy.lifecycle import transitions
from idemproxy.lifecycle.decisions import next_step
from idemproxy.lifecycle.records import OperationRecord, State, StoredRequest, StoredResponse
from idemproxy.lifecycle.transitions import Transition
from idemproxy.ops.console import Desk, mount_console
from idemproxy.protocol.errors import (
    AmbiguousOperationId,
    Forbidden,
    InvalidQuery,
    InvalidResolution,
    InvalidTransition,
    LedgerLost,
    LedgerUnavailable,
    OperationNotFound,
    UnsupportedMediaType,
)
from idemproxy.store import Store, StoreUnavailable
from idemproxy.store.base import OpsQuery
from idemproxy.wire.headers import HOP_BY_HOP

STORE_KEY = web.AppKey("store", Store)
ROUTES_KEY = web.AppKey("routes", dict[str, RouteConfig])
RESOLVER_KEY = web.AppKey("resolver", str)

#: Bodies up to this size are shown inline in ``show``; larger ones by size and hash only.
_INLINE_BODY = 16 * 1024
_MAX_LIMIT = 1000
_MAX_DURATION_CHARS = 32
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_REPLAYABLE = HOP_BY_HOP | {"content-length", "set-cookie", "set-cookie2"}
_OP_ID = re.compile(r"[0-9a-f]{32}")
#: A shortened operation id an operator may type (``ops show 3f9a1c``), if only one id starts so.
_OP_ID_PREFIX = re.compile(r"[0-9a-f]{6,31}")
_PREFIX_CANDIDATES = 5
#: Header values an operator never sees in a stored request (besides those the route injects).
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_REDACTED = "[redacted]"
_LIMIT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²"
_resolutions = itertools.count(1)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The ledger answers, and keeps what it is given: side-effecting calls can be
    recorded. A store setting that can lose records (``Store.hazards``, e.g. an
    evicting Redis) fails it with its ``reason``, unless the operator accepted it."""
    store = request.app[STORE_KEY]
    try:
        await store.ping()
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    for hazard in store.hazards():
        if not hazard.accepted:
            raise LedgerUnavailable(f"The ledger can lose records: {hazard.detail}", reason=hazard.reason)
    if (lost := epoch_watch(store).lost) is not None:
        raise LedgerLost(f"The ledger lost its records ({lost}); see `idemproxy ops ledger`.", reason="ledger-lost")
    return web.json_response({"status": "ready"})


_MAX_BY = 200  # as the OpenAPI description says


async def show_ledger(request: web.Request) -> web.Response:
    """The ledger's epoch as this instance knows it, and whether it found the ledger lost."""
    return _json(_ledger_view(epoch_watch(request.app[STORE_KEY])))


async def confirm_ledger(request: web.Request) -> web.Response:
    """An operator accepts a ledger loss: reservations resume on every instance (within a
    second); retries of operations the lost records answered are forwarded again."""
    identity = request.get(IDENTITY)
    if identity is not None and identity.ops is not OpsAccess.ADMIN:
        raise Forbidden(f"Identity {identity.name!r} may not confirm a ledger loss; that takes 'ops: admin'.")
    payload = await _json_object(request, 'a JSON object, such as {"by": "alice"}')
    by = payload.get("by") or "unknown"
    if not isinstance(by, str) or len(by) > _MAX_BY:
        raise InvalidResolution(f"'by' must be a string of at most {_MAX_BY} characters.")
    if identity is not None:  # the marker names who confirmed, not who they say they are
        by = identity.name
    watch = epoch_watch(request.app[STORE_KEY])
    try:
        if watch.lost is None:
            await watch.check()  # another instance may have found it lost just now
        if watch.lost is None:
            raise InvalidTransition("The ledger is not lost: there is nothing to confirm.")
        await watch.confirm(_shown(by))
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    return _json(_ledger_view(watch))


def _ledger_view(watch: EpochWatch) -> dict[str, Any]:
    known = watch.known
    return {
        "epoch": None if known is None else known.id,
        "generation": None if known is None else known.generation,
        "confirmed_by": None if known is None else known.confirmed_by,
        "lost": watch.lost,
    }


async def show_operation(request: web.Request) -> web.Response:
    return _json(await _operation_view(request, request.match_info["op_id"]))


async def _operation_view(request: web.Request, op_id: str) -> dict[str, Any]:
    record = await _load(request, op_id, shortened=True)
    identity = request.get(IDENTITY)
    if identity is not None and not identity.can_see(record.scope.caller):
        raise Forbidden(f"Identity {identity.name!r} may only see its own operations.")
    return record_view(record, request.app[ROUTES_KEY].get(record.scope.route))


async def list_operations(request: web.Request) -> web.Response:
    records = await _visible_records(request, parse_query(request.query))
    routes = request.app[ROUTES_KEY]
    return _json({"operations": [summary_view(record, routes.get(record.scope.route)) for record in records]})


async def _visible_records(request: web.Request, query: OpsQuery) -> list[OperationRecord]:
    """What ``query`` finds, of the operations the request's identity may see."""
    identity = request.get(IDENTITY)
    if identity is not None and identity.ops is not OpsAccess.ADMIN:
        if query.caller not in (None, identity.name):
            raise Forbidden(f"Identity {identity.name!r} may only list its own operations.")
        query = dataclasses.replace(query, caller=identity.name)
    try:
        return await request.app[STORE_KEY].query(query)
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc


async def _record_views(request: web.Request, query: OpsQuery) -> list[dict[str, Any]]:
    routes = request.app[ROUTES_KEY]
    return [record_view(record, routes.get(record.scope.route)) for record in await _visible_records(request, query)]


async def resolve_operation(request: web.Request) -> web.Response:
    _may_resolve(request)
    record = await _load(request, request.match_info["op_id"])
    payload = await _json_object(request, "a JSON object with 'outcome': 'done' or 'not_done'")
    return _json(await _settle(request, record, payload))


async def _json_object(request: web.Request, expected: str) -> dict[str, Any]:
    """The request's body, a JSON object. Only a body declared
    ``application/json`` is read: a page on another site can make a browser send text/plain or
    a form to a loopback admin listener without asking first, never JSON."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"The admin API takes {expected}, sent as Content-Type: application/json "
            f"(got {request.headers.get('Content-Type', 'none')[:100]!r})."
        )
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidResolution(f"The body must be JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidResolution(f"The body must be {expected}.")
    return payload


async def _resolve_view(request: web.Request, op_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The console's resolve: the same checks, in the same order, as ``POST /_idem/ops/{id}/resolve``."""
    _may_resolve(request)
    return await _settle(request, await _load(request, op_id), payload)


def _may_resolve(request: web.Request) -> None:
    identity = request.get(IDENTITY)
    if identity is not None and identity.ops is not OpsAccess.ADMIN:
        raise Forbidden(f"Identity {identity.name!r} may not resolve operations; that takes 'ops: admin'.")


async def _settle(request: web.Request, record: OperationRecord, payload: dict[str, Any]) -> dict[str, Any]:
    """Apply the operator's resolution of ``record``; the resolved operation's view."""
    identity = request.get(IDENTITY)
    if identity is not None:  # the evidence names who proved it, not who they say they are
        payload = {**payload, "by": identity.name}
    route = request.app[ROUTES_KEY].get(record.scope.route)
    store = request.app[STORE_KEY]
    resolver = f"{request.app[RESOLVER_KEY]}:{next(_resolutions)}"
    # A PENDING operation's lease must have ended by the store's clock; the store checks it again.
    transition = resolution(record, payload, route, resolver, store.clock.earliest_ms())
    try:
        current = await store.transition(transition)
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    if current is None:
        metrics.RECONCILED.labels(record.scope.route, "resolved").inc()
    elif current.fence == record.fence and current.state is State.PENDING:
        raise InvalidTransition(
            "Only UNKNOWN and NEEDS_ATTENTION operations can be resolved; this one is PENDING "
            "with a lease that has not ended by the ledger's clock.",
            operation=record.op_id,
            state=current.state.value,
        )
    else:
        raise InvalidTransition(
            "The operation changed while it was being resolved; look at it again.",
            operation=record.op_id,
            state=current.state.value,
        )
    return record_view(transition.new.evolve(evidence=(*record.evidence, transition.evidence)), route)


def resolution(
    record: OperationRecord, payload: dict[str, Any], route: RouteConfig | None, resolver: str, now: int
) -> Transition:
    """The transition an operator's ``payload`` asks for (validated); ``now``: the store's clock."""
    if not transitions.resolvable(record, now):
        raise InvalidTransition(
            f"Only UNKNOWN and NEEDS_ATTENTION operations can be resolved; this one is {record.state.value}"
            + (" with a live lease" if record.state is State.PENDING else "")
            + ".",
            operation=record.op_id,
            state=record.state.value,
        )
    outcome = payload.get("outcome")
    by = payload.get("by")
    reason = payload.get("reason")
    for name, value in (("by", by), ("reason", reason)):
        if value is not None and not isinstance(value, str):
            raise InvalidResolution(f"'{name}' must be a string.")
    evidence_detail = {"outcome": outcome, "by": by or "unknown", "reason": reason}
    retention_s = route.retention_s if route is not None else 86400.0
    response = None
    if outcome == "done":
        response = _response(payload.get("response"))
        evidence_detail["status"] = response.status
    elif outcome == "not_done":
        if "response" in payload:
            raise InvalidResolution("'response' only goes with outcome 'done'.")
    else:
        raise InvalidResolution(f"'outcome' must be 'done' or 'not_done', got {outcome!r}.")
    return transitions.resolve(record, outcome == "done", response, resolver, now, evidence_detail, retention_s)


def _response(raw: Any) -> StoredResponse:
    if raw is None:
        raise InvalidResolution(
            "Outcome 'done' needs the 'response' to replay: {'status': 201, 'headers': {...}, 'body': ...}."
        )
    if not isinstance(raw, dict):
        raise InvalidResolution("'response' must be an object with 'status', 'headers' and 'body'.")
    status = raw.get("status")
    if isinstance(status, float) and status.is_integer():  # 201.0 is the integer 201 in JSON
        status = int(status)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise InvalidResolution(f"'response.status' must be an HTTP status from 200 to 599, got {status!r}.")
    headers = _resolution_headers(raw.get("headers", {}))
    if "body_base64" in raw:
        try:
            body = base64.b64decode(raw["body_base64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise InvalidResolution(f"'response.body_base64' is not base64: {exc}") from exc
    elif isinstance(raw.get("body"), str):
        body = raw["body"].encode()
    elif "body" in raw:
        body = orjson.dumps(raw["body"])
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
    else:
        body = b""
    return StoredResponse(
        status=status,
        headers=tuple(headers.items()),
        body=body,
        body_size=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


def _resolution_headers(raw: Any) -> dict[str, str]:
    """Headers an operator gives for the replayed answer: end-to-end ones only, well-formed."""
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise InvalidResolution("'response.headers' must map header names to strings.")
    for name, value in raw.items():
        if not _TOKEN.fullmatch(name):
            raise InvalidResolution(f"'response.headers': {name!r} is not a valid header name.")
        if any(char in value for char in "\r\n\0"):
            raise InvalidResolution(f"'response.headers': the value of {name!r} contains CR, LF or NUL.")
        if name.lower() in _NOT_REPLAYABLE:
            raise InvalidResolution(
                f"'response.headers': {name} is not replayed (framing, hop-by-hop and cookies never are)."
            )
    return dict(raw)


def summary_view(record: OperationRecord, route: RouteConfig | None) -> dict[str, Any]:
    return {
        "operation": record.op_id,
        "state": record.state.value,
        "route": record.scope.route,
        "caller": record.scope.caller,
        "task": record.scope.task,
        "method": record.method,
        "target": record.target,
        "attempt": record.attempt,
        "probes": record.probes,
        "retry_class": record.retry_class,
        "reconciled": record.reconciled,
        "created_ms": record.created_ms,
        "updated_ms": record.updated_ms,
    }


def record_view(record: OperationRecord, route: RouteConfig | None) -> dict[str, Any]:
    now = int(time.time() * 1000)
    view = summary_view(record, route)
    view.update(
        key=record.scope.key,
        fingerprint=record.fingerprint,
        fence=record.fence,
        owner=record.owner,
        lease_until_ms=record.lease_until_ms,
        next_probe_ms=record.next_probe_ms,
        attempt_ms=record.attempt_ms,
        response=_response_view(record.response),
        request=_request_view(record.request, route),
        evidence=[evidence.to_dict() for evidence in record.evidence],
        next=next_step(
            record,
            now,
            route.max_attempts if route is not None else record.attempt,
            route.reconcile.method if route is not None and route.reconcile is not None else None,
        ),
    )
    return view


def _request_view(stored: StoredRequest | None, route: RouteConfig | None) -> dict[str, Any] | None:
    """The request as it was forwarded, where the route keeps it (to resend it, or for probes
    that quote its body): credentials' values are never shown, nor the values of the headers
    the route injects."""
    if stored is None:
        return None
    secret = _SECRET_HEADERS | {name.lower() for name, _ in route.upstream_headers} if route else _SECRET_HEADERS
    headers = {_shown(name): _REDACTED if name.lower() in secret else _shown(value) for name, value in stored.headers}
    view: dict[str, Any] = {
        "headers": headers,
        "size": len(stored.body),
        "sha256": hashlib.sha256(stored.body).hexdigest(),
    }
    view.update(_inline_body(stored.body))
    return view


def _response_view(response: StoredResponse | None) -> dict[str, Any] | None:
    if response is None:
        return None
    view: dict[str, Any] = {
        "status": response.status,
        # Header bytes that are not UTF-8 are kept exactly (as lone surrogates); shown escaped.
        "headers": {_shown(name): _shown(value) for name, value in response.headers},
        "size": response.body_size,
        "sha256": response.body_sha256,
        "stored": response.body is not None,
    }
    if response.not_stored_reason is not None:
        view["not_stored_reason"] = response.not_stored_reason
    if response.body is not None:
        view.update(_inline_body(response.body))
    return view


def _inline_body(body: bytes) -> dict[str, str]:
    """A body small enough to show inline: as text when it is UTF-8, else in base64."""
    if len(body) > _INLINE_BODY:
        return {}
    try:
        return {"body": body.decode()}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode()}


def _shown(text: str) -> str:
    """``text`` as JSON can carry it: bytes that are not UTF-8 as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_query(params: Mapping[str, str]) -> OpsQuery:
    """The store query ``GET /_idem/ops`` makes of its parameters (``InvalidQuery`` when invalid)."""
    unknown = set(params) - {"state", "route", "task", "caller", "older_than", "limit"}
    if unknown:
        raise InvalidQuery(
            f"Unknown query parameters {sorted(unknown)}; use state, route, task, caller, older_than, limit."
        )
    state = None
    if "state" in params:
        try:
            state = State(params["state"].upper())
        except ValueError:
            raise InvalidQuery(
                f"'state' must be one of {', '.join(s.value for s in State)}, got {params['state']!r}."
            ) from None
    updated_before_ms = None
    if "older_than" in params:
        if len(params["older_than"]) > _MAX_DURATION_CHARS:
            raise InvalidQuery(
                f"'older_than' must be a duration such as '10m', at most {_MAX_DURATION_CHARS} characters."
            )
        try:
            age_ms = round(parse_duration(params["older_than"]) * 1000)
        except ValueError as exc:
            raise InvalidQuery(f"'older_than': {exc}.") from exc
        # Older than the epoch matches nothing; clamped, so the store never sees an out-of-range number.
        updated_before_ms = max(0, int(time.time() * 1000) - age_ms)
    limit = params.get("limit", "100")
    if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= _MAX_LIMIT:
        raise InvalidQuery(f"'limit' must be a whole number from 1 to {_MAX_LIMIT}, got {limit!r}.")
    return OpsQuery(
        state=state,
        route=params.get("route"),
        task=params.get("task"),
        caller=params.get("caller"),
        updated_before_ms=updated_before_ms,
        limit=int(limit),
    )


async def _load(request: web.Request, op_id: str, *, shortened: bool = False) -> OperationRecord:
    """The operation ``op_id`` names; ``shortened``: or the one operation whose id starts with it."""
    if shortened and _OP_ID_PREFIX.fullmatch(op_id):
        op_id = await _unique_id(request, op_id)
    elif not _OP_ID.fullmatch(op_id):
        raise OperationNotFound(
            f"{op_id[:64]!r} is not an operation id (32 lower-case hex characters, as in Idempotency-Operation"
            + (", or the first 6 or more of them)." if shortened else ").")
        )
    try:
        record = await request.app[STORE_KEY].get(op_id)
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    if record is None:
        raise OperationNotFound(f"No operation {op_id!r} (it may never have existed, or its retention ran out).")
    return record


async def _unique_id(request: web.Request, prefix: str) -> str:
    try:
        found = await request.app[STORE_KEY].ids_with_prefix(prefix, _PREFIX_CANDIDATES + 1)
    except StoreUnavailable as exc:
        raise LedgerUnavailable(f"The ledger is unreachable: {exc}") from exc
    if not found:
        raise OperationNotFound(f"No operation id starts with {prefix!r} (or its retention ran out).")
    if len(found) > 1:
        identity = request.get(IDENTITY)
        more = "more than " if len(found) > _PREFIX_CANDIDATES else ""
        # Ids of other callers' operations are shown only to who may see every operation.
        sees_all = identity is None or identity.ops is OpsAccess.ADMIN
        shown = f": {', '.join(found[:_PREFIX_CANDIDATES])}" if sees_all else ""
        raise AmbiguousOperationId(
            f"{more}{min(len(found), _PREFIX_CANDIDATES)} operation ids start with {prefix!r}{shown}; "
            "give more of the id."
        )
    return found[0]


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI description of this API (``openapi/admin.yaml`` in the package)."""
    text = resources.files("idemproxy").joinpath("openapi", "admin.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    return document


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


def admin_routes(app: web.Application, expect: ExpectHandler) -> None:
    """``expect``: each route's ``Expect: 100-continue`` step (credentials before the body)."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/_idem/openapi.json", openapi, expect_handler=expect)
    app.router.add_get("/_idem/ops", list_operations, expect_handler=expect)
    app.router.add_get("/_idem/ops/{op_id}", show_operation, expect_handler=expect)
    app.router.add_post("/_idem/ops/{op_id}/resolve", resolve_operation, expect_handler=expect)
    app.router.add_get("/_idem/ledger", show_ledger, expect_handler=expect)
    app.router.add_post("/_idem/ledger/confirm", confirm_ledger, expect_handler=expect)
    desk = Desk(parse_query=parse_query, find=_record_views, show=_operation_view, resolve=_resolve_view)
    mount_console(app, desk, expect)

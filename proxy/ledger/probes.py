"""Asking a tool whether an operation took effect: probe, hook or resend.

A probe that errors, times out or answers an unexpected status is
``unknown``, never ``absent``: only positive evidence of absence releases an
operation for another attempt.

A probe URL's values come from callers (the key, caller, task and body
fields), and the probe is sent with the tool's credentials and believed: a
value must never make it ask about anything else. Each is percent-encoded
whole (everything but unreserved characters); one that cannot be a path
segment at all (``Unprobeable``) makes the operation unprobeable, and the
reconciler hands it to an operator without sending anything.

Hooks (``reconcile.hook: module:function``) are async functions taking the
record and an ``aiohttp.ClientSession`` and returning a ``ProbeResult``::

    from urllib.parse import quote

    from idemproxy.ledger.probes import ProbeResult, segment_problem

    async def find_ticket(record, session):
        if segment_problem(record.scope.key) is not None:  # "..", "a/b": would ask about another path
            return ProbeResult.unknown("the key cannot be a path segment")
        async with session.get(f"http://tickets/by-key/{quote(record.scope.key, safe='')}") as response:
            if response.status == 404:
                return ProbeResult.absent()
            if response.status == 200:
                return ProbeResult.found(200, await response.read())
            return ProbeResult.unknown(f"status {response.status}")
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote

import jmespath
import orjson
from multidict import CIMultiDict
from yarl import URL

from idemproxy.config.reconcile import FoundResponse, ProbeConfig, ReconcileConfig, url_fields
from idemproxy.config.routes import Target, upstream_url
from idemproxy.config.settings import RouteConfig
from idemproxy.ledger.forwarder import Forwarder, UpstreamFailed
from idemproxy.lifecycle.decisions import classify_status
from idemproxy.lifecycle.records import OperationRecord, State, StoredResponse
from idemproxy.wire.headers import storable_response_headers, with_injected

JSON_HEADERS = (("Content-Type", "application/json"),)
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: How many rounds of percent-decoding a path value is checked through (a tool, or a
#: framework in front of it, may decode more than once).
_DECODINGS = 3


class Unprobeable(Exception):
    """A value that cannot be placed in a probe URL's path without changing the path."""


class ProbeOutcome(StrEnum):
    FOUND = "found"
    ABSENT = "absent"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: ProbeOutcome
    response: StoredResponse | None = None  # what callers get, when FOUND
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def found(
        cls,
        status: int,
        body: bytes,
        /,
        headers: tuple[tuple[str, str], ...] = JSON_HEADERS,
        **detail: Any,
    ) -> ProbeResult:
        response = StoredResponse(
            status=status,
            headers=headers,
            body=body,
            body_size=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
        return cls(ProbeOutcome.FOUND, response, detail)

    @classmethod
    def absent(cls, **detail: Any) -> ProbeResult:
        return cls(ProbeOutcome.ABSENT, None, detail)

    @classmethod
    def unknown(cls, reason: str, **detail: Any) -> ProbeResult:
        return cls(ProbeOutcome.UNKNOWN, None, {"reason": reason, **detail})


async def run_probe(route: RouteConfig, record: OperationRecord, forwarder: Forwarder) -> ProbeResult:
    """Whatever the route's reconcile method says about ``record``; never raises."""
    config = route.reconcile
    if config is None:
        return ProbeResult.unknown("no reconcile method configured")
    try:
        if config.probe is not None:
            return await _http_probe(config, config.probe, route, record, forwarder)
        if config.hook is not None:
            return await _hook_probe(config, record, forwarder)
        return await _resend(route, record, forwarder)
    except Exception as exc:  # a probe must never take the reconciler down
        return ProbeResult.unknown(f"{type(exc).__name__}: {exc}")


async def _http_probe(
    config: ReconcileConfig,
    probe: ProbeConfig,
    route: RouteConfig,
    record: OperationRecord,
    forwarder: Forwarder,
) -> ProbeResult:
    try:
        url = render_url(probe.url, route, record)
    except (LookupError, Unprobeable) as exc:  # the reconciler escalates the unprobeable before this
        return ProbeResult.unknown(f"cannot build the probe URL: {exc}")
    detail: dict[str, Any] = {"method": "probe", "url": url}
    try:
        headers = CIMultiDict(route.upstream_headers)
        headers.update(probe.headers)  # the probe's own headers are the more specific
        # Sent as rendered: a client that re-quoted it would undo part of the encoding.
        fetched = await forwarder.fetch(probe.method, URL(url, encoded=True), headers, None, probe.timeout_s)
    except UpstreamFailed as exc:
        return ProbeResult.unknown(exc.detail, **detail)
    detail["probe_status"] = fetched.status
    if fetched.status in probe.absent_statuses:
        return ProbeResult.absent(**detail)
    if fetched.status not in probe.match_statuses:
        return ProbeResult.unknown(f"unexpected probe status {fetched.status}", **detail)
    try:
        document = orjson.loads(fetched.body)
    except orjson.JSONDecodeError:
        return ProbeResult.unknown("the probe's body is not JSON", **detail)
    resource = probe.match.search(document)
    if resource is None or resource in ([], {}, False, ""):
        return ProbeResult.absent(**detail)
    body = found_body(config.found, resource, document, fetched.body, record.scope.key)
    return ProbeResult.found(config.found.status, body, **detail)


async def _hook_probe(config: ReconcileConfig, record: OperationRecord, forwarder: Forwarder) -> ProbeResult:
    assert config.hook is not None
    result = await config.hook(record, forwarder.session)
    if not isinstance(result, ProbeResult):
        return ProbeResult.unknown(f"hook {config.hook_name} returned {type(result).__name__}, not ProbeResult")
    return ProbeResult(result.outcome, result.response, {"method": "hook", **result.detail})


async def _resend(route: RouteConfig, record: OperationRecord, forwarder: Forwarder) -> ProbeResult:
    """The upstream honours Idempotency-Key: sending the request again returns the original outcome."""
    if record.request is None:
        return ProbeResult.unknown("the original request was not kept, so it cannot be resent")
    path, _, query = record.target.partition("?")
    url = upstream_url(route, Target(path=path, query=query))
    detail: dict[str, Any] = {"method": "resend"}
    try:
        fetched = await forwarder.fetch(
            record.method,
            url,
            with_injected(CIMultiDict(record.request.headers), route.upstream_headers),
            record.request.body,
            route.read_timeout_s,
        )
    except UpstreamFailed as exc:
        return ProbeResult.unknown(exc.detail, **detail)
    detail["resend_status"] = fetched.status
    outcome = classify_status(fetched.status, route.not_applied_statuses, route.ambiguous_statuses)
    if outcome.state is not State.COMPLETED:
        return ProbeResult.unknown(f"the resend was answered {fetched.status}", **detail)
    return ProbeResult.found(fetched.status, fetched.body, storable_response_headers(fetched.headers), **detail)


def unprobeable(route: RouteConfig, record: OperationRecord) -> str | None:
    """Why the route's probe can never be sent for ``record`` (a value that cannot be placed
    in the probe URL's path), or None. A body field that is missing is not such a reason:
    that probe stays unknown, as any probe that fails."""
    config = route.reconcile
    if config is None or config.probe is None:
        return None
    try:
        render_url(config.probe.url, route, record)
    except Unprobeable as exc:
        return f"the probe URL cannot be built safely: {exc}"
    except (LookupError, ValueError):  # a missing field, a body that is not JSON: the probe says unknown
        pass
    return None


def render_url(template: str, route: RouteConfig, record: OperationRecord) -> str:
    """The probe URL for ``record``.

    Every substituted value but ``{upstream}`` is percent-encoded whole: all but the
    unreserved characters, in the path as in the query. A value in the path must also
    stand as one segment: ``Unprobeable`` when it is empty, ``.`` or ``..``, or holds
    ``/``, ``\\`` or a control character, as sent or once percent-decoded (clients
    and servers collapse ``%2E%2E`` too). ``LookupError`` when a body field is missing.
    """
    values: dict[str, str] = {
        "key": record.scope.key,
        "op_id": record.op_id,
        "caller": record.scope.caller,
        "task": record.scope.task or "",
    }
    body_fields = [name for name in url_fields(template) if name.startswith("body.")]
    if body_fields:
        if record.request is None:
            raise LookupError("the original request body was not kept")
        document = orjson.loads(record.request.body)
        for name in body_fields:
            value: Any = document
            for part in name.removeprefix("body.").split("."):
                if not isinstance(value, dict) or part not in value:
                    raise LookupError(f"the request body has no field {name.removeprefix('body.')!r}")
                value = value[part]
            values[name] = value if isinstance(value, str) else orjson.dumps(value).decode()
    upstream = str(route.upstream).rstrip("/")
    # The query starts at the template's first '?' (or '#') outside a placeholder.
    blanked = _PLACEHOLDER.sub(lambda match: "_" * len(match.group(0)), template)
    query_at = min((at for at in (blanked.find("?"), blanked.find("#")) if at >= 0), default=len(template))

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "upstream":
            return upstream
        value = values[name]
        if match.start() < query_at and (problem := segment_problem(value)) is not None:
            raise Unprobeable(f"{{{name}}} cannot stand in the probe URL's path: {problem}")
        return quote(value, safe="")

    return _PLACEHOLDER.sub(substitute, template)


def segment_problem(value: str) -> str | None:
    """Why ``value`` cannot be one path segment, or None."""
    seen = value
    for decodings in range(_DECODINGS):
        how = "" if decodings == 0 else " once percent-decoded" if decodings == 1 else f" decoded {decodings} times"
        if not seen:
            return f"it is empty{how}"
        if seen.split(";", 1)[0] in (".", ".."):  # some servers read "..;x" as ".."
            return f"it is a dot segment{how}"
        if "/" in seen or "\\" in seen:
            return f"it holds a slash or a backslash{how}"
        if _CONTROL.search(seen):
            return f"it holds a control character{how}"
        decoded = unquote(seen)
        if decoded == seen:
            return None
        seen = decoded
    return f"it is still percent-encoded after {_DECODINGS} decodings"


def found_body(found: FoundResponse, resource: Any, document: Any, raw: bytes, key: str) -> bytes:
    if found.body == "resource":
        return orjson.dumps(resource)
    if found.body == "probe":
        return raw
    return orjson.dumps(_fill(found.body, {"resource": resource, "probe": document, "key": key}))


def _fill(template: Any, context: dict[str, Any]) -> Any:
    if isinstance(template, str) and template.startswith("${") and template.endswith("}"):
        return jmespath.search(template[2:-1], context)
    if isinstance(template, dict):
        return {name: _fill(value, context) for name, value in template.items()}
    if isinstance(template, list):
        return [_fill(value, context) for value in template]
    return template

"""The one place where errors become problem+json responses."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from idemproxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BodyTooLarge,
    InternalError,
    MethodNotAllowed,
    NoRoute,
    ProblemError,
)
from idemproxy.observe import OBSERVATION
from idemproxy.routes import parse_target

log = logging.getLogger(__name__)


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


def record_decision(request: web.Request, decision: str) -> None:
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
    record_decision(request, exc.decision)
    return web.Response(
        status=exc.status,
        body=exc.to_json(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers,
    )

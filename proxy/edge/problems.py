"""The one place where errors become problem+json responses, on both listeners."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler as AiohttpHandler

from idemproxy.edge.observe import Decided, record
from idemproxy.protocol import PROBLEM_CONTENT_TYPE, Decision
from idemproxy.protocol.errors import BodyTooLarge, InternalError, MethodNotAllowed, NoRoute, ProblemError
from idemproxy.wire.http_messages import Handler, Request, StreamResponse, problem_reply

log = logging.getLogger(__name__)


async def answer_problems(request: Request, handler: Handler) -> StreamResponse:
    """The proxy listener's step that turns errors into problem+json responses."""
    try:
        return await handler(request)
    except ProblemError as exc:
        record_decision(request, exc.decision)
        return problem_reply(exc)
    except Exception:
        log.exception("unhandled error", extra={"path": request.raw_path})
        return problem_reply(InternalError("The proxy failed unexpectedly; see its logs."))


def record_decision(request: Request, decision: Decision) -> None:
    """``decision`` is the request's unless one was recorded before (``Decided``)."""
    record(request, Decided(decision))


@web.middleware
async def problem_middleware(request: web.Request, handler: AiohttpHandler) -> web.StreamResponse:
    """The admin listener's middleware that turns errors into problem+json responses."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ProblemError as exc:
        return problem_response(exc)
    except web.HTTPException as exc:
        if exc.status == 413:  # aiohttp's own body limit
            return problem_response(BodyTooLarge(exc.text or "Request body too large."))
        if exc.status == 404:  # the router
            return problem_response(NoRoute(f"No endpoint {request.path!r}."))
        if exc.status == 405:
            allow = {"Allow": exc.headers.get("Allow", "")}
            return problem_response(MethodNotAllowed(f"{request.method} is not allowed here.", headers=allow))
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.raw_path})
        return problem_response(InternalError("The proxy failed unexpectedly; see its logs."))


def problem_response(exc: ProblemError) -> web.Response:
    return web.Response(
        status=exc.status,
        body=exc.to_json(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers,
    )

"""Bodies in transit: the caller's, read whole within a limit, and the tool's
answer, relayed to the first caller and kept for the ledger."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from idemproxy import metrics
from idemproxy.config.settings import RouteConfig
from idemproxy.edge.auth import READ_BODY
from idemproxy.edge.observe import OBSERVATION, UpstreamTimed
from idemproxy.ledger.forwarder import UpstreamFailed, UpstreamResponse
from idemproxy.lifecycle.decisions import Outcome
from idemproxy.lifecycle.records import StoredResponse
from idemproxy.protocol import OPERATION_HEADER
from idemproxy.protocol.errors import (
    BodyTooLarge,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from idemproxy.wire.headers import (
    client_response_headers,
    storable_response_headers,
)
from idemproxy.wire.http_messages import Request, Response, StreamResponse
from idemproxy.wire.upstream_client import FailureKind

CHUNK = 64 * 1024


@dataclass(slots=True, init=False)
class Reply:
    """The tool's answer to a forwarded attempt, read: what the caller gets and what is recorded."""

    response: StreamResponse  # what the first caller gets (or got, when streamed)
    outcome: Outcome
    stored: StoredResponse | None  # kept for replay when the outcome is COMPLETED
    detail: dict[str, object]  # evidence

    def __init__(  # compiled by mypyc, unlike a generated one
        self, response: StreamResponse, outcome: Outcome, stored: StoredResponse | None, detail: dict[str, object]
    ) -> None:
        self.response = response
        self.outcome = outcome
        self.stored = stored
        self.detail = detail


ReadReply = Callable[[UpstreamResponse], Awaitable[Reply]]


@dataclass(slots=True, init=False)
class Relayed:
    response: StreamResponse
    stored: StoredResponse | None  # None when the body was interrupted
    failed: FailureKind | None = None

    def __init__(  # compiled by mypyc, unlike a generated one
        self, response: StreamResponse, stored: StoredResponse | None, failed: FailureKind | None = None
    ) -> None:
        self.response = response
        self.stored = stored
        self.failed = failed


async def relay(request: Request, upstream: UpstreamResponse, max_stored: int, op_id: str) -> Relayed:
    """Read the upstream's answer for the first caller and for the ledger.

    Bodies up to ``max_stored`` are buffered and kept for replay; a larger one
    is streamed to the first caller and only its size and hash are kept.
    """
    digest = hashlib.sha256()
    buffered = bytearray()
    size = 0
    streaming: StreamResponse | None = None
    try:
        async for chunk in upstream.chunks():
            digest.update(chunk)
            size += len(chunk)
            if streaming is not None:
                await write_quietly(streaming, chunk)
                continue
            buffered += chunk
            if len(buffered) > max_stored:
                streaming = StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=client_response_headers(upstream.headers, keep_length=True),
                )
                streaming.headers[OPERATION_HEADER] = op_id
                with contextlib.suppress(ConnectionError):  # the first caller may be gone: the outcome still counts
                    await streaming.prepare(request)
                await write_quietly(streaming, bytes(buffered))
                buffered = bytearray()
    except UpstreamFailed as exc:
        if streaming is None:
            raise
        abort(request)
        return Relayed(streaming, None, exc.kind)
    body = bytes(buffered) if streaming is None else None
    stored = StoredResponse(
        status=upstream.status,
        headers=storable_response_headers(upstream.headers),
        body=body,
        body_size=size,
        body_sha256=digest.hexdigest(),
    )
    if streaming is not None or body is None:
        assert streaming is not None
        await write_eof_quietly(streaming)
        return Relayed(streaming, stored)
    response = Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=client_response_headers(upstream.headers, keep_length=False),
    )
    response.headers[OPERATION_HEADER] = op_id
    return Relayed(response, stored)


async def write_quietly(response: StreamResponse, chunk: bytes) -> None:
    # The first caller may hang up; the ledger still needs the whole body's hash.
    with contextlib.suppress(ConnectionError):
        await response.write(chunk)


async def write_eof_quietly(response: StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()


def abort(request: Request) -> None:
    if request.transport is not None:
        request.transport.close()


class UpstreamTimer(metrics.Timer):
    """Times a request to the upstream, for the metrics and for the request's observation."""

    __slots__ = ("_observation",)

    def __init__(self, request: Request, route: RouteConfig) -> None:
        super().__init__(metrics.upstream_seconds(route.name, request.method))
        self._observation = request[OBSERVATION]

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self._observation.record(UpstreamTimed(self.elapsed_s))


def unrecorded_failure(exc: UpstreamFailed) -> UpstreamError:
    if exc.kind is FailureKind.CONNECT:
        return UpstreamUnreachable(f"The request was not sent: {exc.detail}.")
    if exc.kind is FailureKind.TIMEOUT:
        return UpstreamTimeout("The upstream did not answer in time.")
    return UpstreamConnectionLost(f"The upstream connection was lost: {exc.detail}.")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, or 413 before anything is recorded."""
    if READ_BODY in request:  # authentication read it to check a signature
        read = request[READ_BODY]
        if len(read) <= limit:
            return read
    else:
        try:
            return await request.read(limit)
        except BodyTooLarge:
            pass
    raise BodyTooLarge(f"The request body exceeds this route's max_body of {limit} bytes.", max_body=limit)

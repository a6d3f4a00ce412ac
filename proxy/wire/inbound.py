"""What the listeners accept from callers while a request is still arriving.

The HTTP parsers (llhttp on the proxy listener, aiohttp's on the admin
listener) refuse malformed framing themselves (see README, "Threat model");
this module owns the rest of the inbound edge:

- **Time.** A connection must deliver a complete request head within
  ``client_header_timeout`` of opening or of its previous response (the
  listener's head timer, which also closes idle keep-alive connections), and the
  whole body within ``client_body_timeout`` of the head. A caller that
  trickles either (slowloris) is cut off: the body with ``408
  request-timeout``, the head by closing the connection.
- **Bytes as sent.** Request bodies are never decompressed
  (``auto_decompress=False``): a gzip body reaches the tool as the caller
  sent it, with its ``Content-Encoding``, and is fingerprinted as sent.
- **Transfer codings.** Only ``chunked`` is understood; a request that
  declares another (``gzip, chunked``) is refused rather than forwarded with
  its coding silently dropped.
- **Header values the tool would get altered.** Header bytes that are not
  UTF-8 are read into lone surrogates; such a request is refused rather than
  forwarded with its bytes changed.
- **Body-stream failures are the caller's.** A body cut off by a closed
  connection, or timed out, is answered as such (``incomplete-body``,
  ``request-timeout``), whatever it broke on its way, never as a 500 or as
  an upstream failure.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler as AiohttpHandler
from aiohttp.typedefs import Middleware
from multidict import CIMultiDictProxy

from idemproxy.protocol.errors import IncompleteBody, InvalidHeader, RequestTimeout, UnsupportedTransferCoding
from idemproxy.wire.http_messages import Handler, Request, RequestBody, Step, StreamResponse

#: How far along ``__cause__`` links a body-stream failure is looked for.
_CAUSE_DEPTH = 8

R = TypeVar("R")


def server_options(header_timeout_s: float) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments for the admin listener."""
    return {"keepalive_timeout": header_timeout_s, "auto_decompress": False}


def inbound_middleware(body_timeout_s: float) -> Middleware:
    """The admin listener's inbound checks (``guard_inbound``)."""

    @web.middleware
    async def inbound(request: web.Request, handler: AiohttpHandler) -> web.StreamResponse:
        return await guard_inbound(
            request.headers, request.content, functools.partial(handler, request), body_timeout_s
        )

    return inbound


def inbound_step(body_timeout_s: float) -> Step:
    """The proxy listener's inbound checks (``guard_inbound``)."""

    async def inbound(request: Request, handler: Handler) -> StreamResponse:
        return await guard_inbound(
            request.headers, request.content, functools.partial(handler, request), body_timeout_s
        )

    return inbound


async def guard_inbound(
    headers: CIMultiDictProxy[str],
    body: StreamReader | RequestBody,
    handle: Callable[[], Awaitable[R]],
    body_timeout_s: float,
) -> R:
    """Refuse what could not be forwarded as sent; bound the time the body may take to arrive."""
    _check_headers(headers)
    if body.is_eof():  # no body, or all of it has arrived already
        return await handle()
    deadline = asyncio.get_running_loop().call_later(body_timeout_s, _expire, body, body_timeout_s)
    try:
        return await handle()
    except Exception as exc:
        failure = body.exception()
        if failure is None or not _caused_by(exc, failure):
            raise
        if isinstance(failure, RequestTimeout | IncompleteBody):
            raise failure from None
        raise IncompleteBody(
            f"The request body could not be read to its end ({type(failure).__name__}: {failure}); "
            "nothing was recorded."
        ) from exc
    finally:
        deadline.cancel()


def _check_headers(headers: CIMultiDictProxy[str]) -> None:
    coding = headers.get("Transfer-Encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        raise UnsupportedTransferCoding(
            f"Transfer-Encoding {coding!r} is not supported; send the body with 'chunked' or Content-Length."
        )
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidHeader(f"The value of {name} is not UTF-8 text.") from None


def _expire(body: StreamReader | RequestBody, timeout_s: float) -> None:
    """Fail whoever reads a body that is still arriving (the handler, or the upstream client
    streaming it); on the admin listener the ``TimeoutError`` also stops aiohttp from lingering
    to read the rest."""
    if not body.is_eof() and body.exception() is None:
        body.set_exception(
            RequestTimeout(
                f"The request body did not arrive within {timeout_s:g}s (client_body_timeout); nothing was recorded."
            )
        )


def _caused_by(exc: BaseException, failure: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(_CAUSE_DEPTH):
        if seen is None:
            return False
        if seen is failure:
            return True
        seen = seen.__cause__
    return False

"""What the listeners accept from callers while a request is still arriving.

aiohttp's parser refuses malformed framing itself (see README, "Threat
model"); this module owns the rest of the inbound edge:

- **Time.** A connection must deliver a complete request head within
  ``client_header_timeout`` of opening or of its previous response (aiohttp's
  keep-alive timer, which also closes idle keep-alive connections), and the
  whole body within ``client_body_timeout`` of the head. A caller that
  trickles either (slowloris) is cut off: the body with ``408
  request-timeout``, the head by closing the connection.
- **Bytes as sent.** Request bodies are never decompressed
  (``auto_decompress=False``): a gzip body reaches the tool as the caller
  sent it, with its ``Content-Encoding``, and is fingerprinted as sent.
- **Transfer codings.** Only ``chunked`` is understood; a request that
  declares another (``gzip, chunked``) is refused rather than forwarded with
  its coding silently dropped.
- **Header values the tool would get altered.** aiohttp reads header bytes
  that are not UTF-8 into lone surrogates and drops them when it writes the
  header on; such a request is refused instead.
- **Body-stream failures are the caller's.** A body cut off by a closed
  connection, or timed out, is answered as such (``incomplete-body``,
  ``request-timeout``), whatever it broke on its way, never as a 500 or as
  an upstream failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler, Middleware

from idemproxy.errors import IncompleteBody, InvalidHeader, RequestTimeout, UnsupportedTransferCoding

#: How far along ``__cause__`` links a body-stream failure is looked for.
_CAUSE_DEPTH = 8


def server_options(header_timeout_s: float) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments for a listener facing callers."""
    return {"keepalive_timeout": header_timeout_s, "auto_decompress": False}


def inbound_middleware(body_timeout_s: float) -> Middleware:
    """Bound the time a caller may take to send its body; refuse what could not be forwarded as sent."""

    @web.middleware
    async def inbound(request: web.Request, handler: Handler) -> web.StreamResponse:
        _check_headers(request)
        body = request.content
        if body.is_eof():  # no body, or all of it has arrived already
            return await handler(request)
        deadline = asyncio.get_running_loop().call_later(body_timeout_s, _expire, body, body_timeout_s)
        try:
            return await handler(request)
        except Exception as exc:
            failure = body.exception()
            if failure is None or not _caused_by(exc, failure):
                raise
            if isinstance(failure, RequestTimeout):
                raise failure from None
            raise IncompleteBody(
                f"The request body could not be read to its end ({type(failure).__name__}: {failure}); "
                "nothing was recorded."
            ) from exc
        finally:
            deadline.cancel()

    return inbound


def _check_headers(request: web.Request) -> None:
    coding = request.headers.get("Transfer-Encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        raise UnsupportedTransferCoding(
            f"Transfer-Encoding {coding!r} is not supported; send the body with 'chunked' or Content-Length."
        )
    for name, value in request.headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidHeader(f"The value of {name} is not UTF-8 text.") from None


def _expire(body: StreamReader, timeout_s: float) -> None:
    """Fail whoever reads a body that is still arriving (the handler, or the upstream client
    streaming it); the ``TimeoutError`` also stops aiohttp from lingering to read the rest."""
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

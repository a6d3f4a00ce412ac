"""The proxy listener's HTTP/1.1 server: llhttp (``httptools``) parsing under a lean asyncio protocol.

It serves the requests and responses of ``http_messages``.

aiohttp's ``web.Application`` cost about 54 µs of CPU per request before any
of idemproxy's code ran (bench: a server that only answers, wrk c=64 POST);
this one costs about 10 µs. The admin listener stays on aiohttp.

What it guarantees:

- **Framing is llhttp's.** Requests with conflicting or malformed framing
  (``Content-Length`` with ``Transfer-Encoding``, bad chunk sizes, bare LF,
  obsolete line folding, non-token names) are refused with a problem+json
  ``400`` and the connection is closed: nothing after a framing error is
  read as a request.
- **HTTP/1.x only, as RFC 9112 frames it** (``check_head``): another major
  version gets ``505``; HTTP/0.9, ``Transfer-Encoding`` in HTTP/1.0, and an
  HTTP/1.1 request without exactly one well-formed ``Host`` get ``400``; the
  connection is closed after the answer, like after any framing refusal.
- **Bounded heads.** A target or header line over ``MAX_LINE`` bytes gets
  ``414``/``431``, more than ``MAX_HEADERS`` fields ``431``; a head must be
  complete within ``header_timeout_s`` of the connection opening or of the
  previous response, or the connection is closed.
- **One request at a time per connection**, in order: pipelined requests
  wait (reading pauses) until the response before them is written.
- **Bounded pipelining.** At most ``MAX_PIPELINED`` requests are parsed ahead of
  the one being answered; the rest of a read stays raw bytes until answers make
  room. A caller whose answers back up (the write buffer over its high-water
  mark) is not read from, and one that reads none of them for
  ``header_timeout_s`` is disconnected.
- **Bounded connections.** Past ``max_connections`` open connections, a new one
  is closed at once, without a word, and counted.
- **Handlers are never cancelled because a caller left**: a request whose
  caller hung up still runs to its end (the ledger must record what
  happened); its writes fail with ``ConnectionResetError``. Only
  ``shutdown`` cancels, after its grace period.
- **Backpressure both ways.** A body the handler does not read fast enough
  pauses reading; a caller that does not read its answer pauses the writer.
- **``100 Continue`` only when the body is wanted.** A caller that holds its
  body back (``Expect: 100-continue``) is invited to send it when the handler
  first waits for it, so whatever refuses a request from its head alone
  (authentication, scopes, routing) answers before the caller sends a byte.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from email.utils import formatdate
from http import HTTPStatus

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from idemproxy import metrics
from idemproxy.protocol.errors import (
    ExpectationFailed,
    HeaderFieldsTooLarge,
    HttpVersionNotSupported,
    IncompleteBody,
    InternalError,
    MalformedRequest,
    ProblemError,
    TargetTooLong,
)
from idemproxy.wire.http_messages import (
    BODY_HIGH_WATER,
    Handler,
    Request,
    RequestBody,
    Response,
    StreamResponse,
    problem_reply,
)

log = logging.getLogger(__name__)

#: Longest request target, and longest header field (name and value), in bytes (aiohttp's limits).
MAX_LINE = 8190
MAX_HEADERS = 128
#: The most a head may take before it is complete (httptools buffers a field until its line ends).
MAX_HEAD = MAX_LINE * 8

#: How long a connection closed while its caller may still be sending keeps reading (and
#: dropping) what arrives: closing a socket with unread data resets the connection, and the
#: reset can destroy the answer before the caller reads it (a 413 to a caller mid-upload).
LINGER_S = 5.0
#: uvloop's timers have millisecond resolution: one firing this close to its deadline is due
#: (re-arming it would spin until the clock's next tick).
_TIMER_SLACK_S = 0.001
#: How long ``shutdown`` waits for handlers it cancelled to unwind.
_CANCELLED_WAIT_S = 1.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Requests parsed ahead of the one being answered, on one connection. Pipelining is bounded so
#: that a caller that sends requests faster than it reads answers cannot grow the proxy:
#:
#: - Reading pauses while any request waits (and while the caller does not read its answers),
#:   so what is queued is what one read brought: at most 256 KiB (asyncio and uvloop read no
#:   more at once). That is the byte bound; no separate one is needed.
#: - Parsed at once, one read of small requests was thousands of request objects (the shortest
#:   head is 18 bytes; issue 22 measured 7 MB per connection). So a read is parsed
#:   ``MAX_PIPELINED`` heads at a time and the rest kept as the raw bytes it came as: ``_take``
#:   cuts it after a head's CRLF CRLF (every head ends with one: llhttp refuses bare LFs) and
#:   parses on when answers make room.
#: - 16 keeps a pipelining client's usual depth in one parse (TechEmpower's plaintext benchmark
#:   pipelines 16) while 16 request objects are a few KiB.
#:
#: nginx bounds pipelining the same way, by bytes held rather than requests: it parses one
#: request at a time, keeps what follows in its header buffers (``client_header_buffer_size``,
#: ``large_client_header_buffers``) and reads no more from the socket until it gets there; a
#: caller that reads no answer is cut off after ``send_timeout`` (60 s) without progress.
MAX_PIPELINED = 16
#: The shortest request head llhttp completes (``PUT / HTTP/1.0`` and an empty line): a piece
#: of fewer than 18 x n bytes ends fewer than n + 1 heads (one more if a head was under way).
_MIN_HEAD = 18
_HEAD_END = b"\r\n\r\n"
#: The longest rest of a read whose CRLF CRLFs are counted to feed it whole (a pipelined batch);
#: beyond it, heads are cut one by one, and bodies skipped unscanned.
_COUNTED = 1024
#: How often, at most, a listener at ``max_connections`` logs that it closes new connections.
_REFUSAL_LOG_EVERY_S = 10.0


#: RFC 9112 §4, ``reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )``, without obs-text: a
#: status line is ASCII, and whatever reads it (a terminal, a log) sees no control character.
_REASON = re.compile(r"[\t\x20-\x7e]*")


#: Fields a request may carry once at most (aiohttp's list): two Hosts, say, would let the
#: proxy and the tool each believe a different one.
_SINGLETON_FIELDS = (
    "Content-Length",
    "Content-Location",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Host",
    "Max-Forwards",
    "Server",
    "Transfer-Encoding",
    "User-Agent",
)


def _refuse_duplicate_singletons(headers: CIMultiDictProxy[str]) -> None:
    for name in _SINGLETON_FIELDS:
        if len(headers.getall(name, ())) > 1:
            raise MalformedRequest(f"The request has more than one {name} header.")


#: RFC 9110 §7.2, ``Host = uri-host [ ":" port ]``, with ``uri-host`` as RFC 3986 §3.2.2 has
#: it: an IP literal in brackets, or a reg-name (an IPv4 address is one) of unreserved and
#: sub-delims characters and percent-encoded octets. No userinfo, path or white space. The
#: value may be empty (RFC 9112 §3.2), the host may not be when a port follows (``:80``: an
#: "http" URI with an empty host is invalid, RFC 9110 §4.2.1), nor have an empty label (``..``,
#: or nothing but dots): both refused by nginx too, and ``X-Forwarded-Host`` carries the value
#: on to the tool, which could read ``..`` as a path step.
_HOST = re.compile(
    r"(?:(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]"
    r"|(?!\.*(?::|$))(?!.*\.\.)(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?)?"
)
#: Host values found valid (a sidecar's callers send one or two): the match costs more than
#: the rest of ``check_head``. Emptied when full, so a caller churning values cannot grow it.
_VALID_HOSTS: set[str] = set()
_VALID_HOSTS_MAX = 64


def _valid_host(host: str) -> bool:
    if host in _VALID_HOSTS:
        return True
    if _HOST.fullmatch(host) is None:
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True


def check_head(version: str, headers: CIMultiDictProxy[str]) -> None:
    """Refuse a request head RFC 9112 does not let a server answer as sent; llhttp checks the rest.

    - A major version other than 1 gets ``505`` (RFC 9110 §15.6.6). llhttp refuses every
      version but 0.9, 1.0, 1.1 and 2.0 itself; ``unsupported_version`` turns those into
      ``505`` too. ``HTTP/1.2`` stays a ``400``: stricter than RFC 9110 §2.5 and nginx,
      which serve it as HTTP/1.1, and no client sends it.
    - HTTP/0.9 (a request line without a version, which llhttp reports as 0.9) gets ``400``:
      its answer would have no status line or headers at all. nginx still serves it.
    - ``Transfer-Encoding`` in HTTP/1.0 gets ``400`` (RFC 9112 §6.1: the framing must be
      taken as faulty). The RFC also allows reading the message and then closing; refusing
      is what nginx does (``client sent HTTP/1.0 request with "Transfer-Encoding" header``),
      and it never dechunks a body that an HTTP/1.0 hop in front may have framed otherwise.
    - ``Host`` (RFC 9112 §3.2): an HTTP/1.1 request without one, or with a value that is not
      ``host[:port]``, gets ``400`` (more than one is refused with the other fields a request
      may carry once, ``_SINGLETON_FIELDS``). HTTP/1.0 may omit it, as in nginx. A host
      that is empty before a port (``:80``) or has an empty label (``..``) is not well-formed
      (``_HOST``), as in nginx.
      An empty ``Host`` is accepted, where nginx refuses it: RFC 9112 §3.2 allows it (a
      target URI without an authority), and ``Host`` chooses nothing here (routes match
      the path alone), so the empty value harms nothing.
    """
    if version != "1.1":
        major = version.partition(".")[0]
        if major == "0":
            raise MalformedRequest("HTTP/0.9 requests (a request line without a version) are not supported.")
        if major != "1":
            raise HttpVersionNotSupported(f"HTTP/{version} is not supported; idemproxy speaks HTTP/1.1.")
        if "Transfer-Encoding" in headers:
            raise MalformedRequest(
                f"Transfer-Encoding is not allowed in an HTTP/{version} request (RFC 9112 §6.1); "
                "send Content-Length, or HTTP/1.1."
            )
    host = headers.get("Host")
    if host is None:
        if version != "1.0":
            raise MalformedRequest("An HTTP/1.1 request must carry a Host header (RFC 9112 §3.2).")
    elif not _valid_host(host):
        raise MalformedRequest("The Host header is not a host with an optional port (RFC 9112 §3.2).")


def unsupported_version(version: str) -> HttpVersionNotSupported | None:
    """``505`` for a version llhttp parsed, then refused (or reported 2.0 and failed on later):
    a major version of 2 or more. Anything else it refused is a malformed request, ``HTTP/10.0``
    too: two digits are not HTTP-version syntax (RFC 9112 §2.3), where nginx answers ``505``."""
    major = version.partition(".")[0]
    if major.isdigit() and int(major) >= 2:
        return HttpVersionNotSupported(f"HTTP/{version} is not supported; idemproxy speaks HTTP/1.1.")
    return None


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


_date = _Date()


class _Connection(asyncio.Protocol):
    """One caller's connection: parses requests and answers them one at a time."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.keep_alive = True
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = False
        self._head_size = 0
        self._url: list[bytes] = []
        self._url_size = 0
        self._fields: list[tuple[str, str]] = []
        self._fields_size = 0
        self._head_written = False  # of the response in progress
        self._arriving: Request | None = None  # the request whose body is being read
        self._waiting: collections.deque[Request] = collections.deque()  # pipelined, not yet answered
        self._answering: asyncio.Task[None] | None = None
        self._refusal: ProblemError | None = None  # to be sent once the response in progress is written
        self._stopped = False  # no more requests are parsed on this connection
        self._lingering = False  # answered and ending: what still arrives is dropped
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._head_timer: asyncio.Handle | None = None
        self._head_timer_at = 0.0  # loop time it is due at
        self._head_deadline = 0.0  # loop time; 0: none due
        self._stall_timer: asyncio.TimerHandle | None = None  # runs while the caller does not read
        self._held = b""  # a read's bytes from ``_held_at`` on: not parsed yet (``MAX_PIPELINED``)
        self._held_at = 0
        self._body_left = 0  # of a Content-Length body being parsed: no head can end in it

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if not self.server.admit(self):
            self.abort()  # nothing read, nothing to write: the caller sees the connection end
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._held:  # delivered although reading was paused: it comes after what is held
            data = self._held[self._held_at :] + data
            self._held = b""
        self._take(data, 0)
        self._update_reading()

    def _take(self, data: bytes, at: int) -> None:
        """Parse ``data`` from ``at`` on, as far as ``MAX_PIPELINED`` lets; hold the rest unparsed."""
        end = len(data)
        while at < end and not self._stopped:
            if self._body_left:
                cut = min(end, at + self._body_left)
            else:
                room = MAX_PIPELINED - len(self._waiting) + (1 if self._answering is None else 0)
                if room <= 0:
                    self._held = data
                    self._held_at = at
                    return
                under_way = 1 if self._in_head else 0
                # Commonly the whole rest: too short to end more heads than there is room for.
                cut = end if (end - at) // _MIN_HEAD + under_way <= room else self._cut(data, at, room, under_way)
            self._parse(data if at == 0 and cut == end else memoryview(data)[at:cut], cut - at)
            at = cut

    def _cut(self, data: bytes, at: int, room: int, under_way: int) -> int:
        """Where the piece of ``data`` from ``at`` ends so that at most ``room`` heads end in it
        (``under_way``: 1 if a head is under way, which may end in it too).

        The whole rest when it holds no more CRLF CRLFs than there is room for (counted only in
        a short rest: a body is not scanned); else the piece ends after the next head (and the
        one under way, if there is room for both): the next piece is cut from there."""
        end = len(data)
        found = data.find(_HEAD_END, at)
        if found < 0:
            return end  # no head but the one under way can end in it
        if under_way + 1 > room and found > at:
            return found  # the head under way may end before it (its CRLF CRLF split across reads)
        cut = found + len(_HEAD_END)
        rest = end - cut
        if rest // _MIN_HEAD + under_way + 1 <= room or (
            rest <= _COUNTED and data.count(_HEAD_END, cut) + under_way + 1 <= room
        ):
            return end
        return cut

    def _parse(self, data: bytes | memoryview, size: int) -> None:
        was_in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The HTTP/2 connection preface (``PRI * HTTP/2.0``) is the one upgrade llhttp
            # pauses on before a head is complete: nobody would ever answer it.
            unsupported = unsupported_version(self._parser.get_http_version())
            if unsupported is not None:
                self._refuse(unsupported)
            else:
                self._stop()  # the rest is another protocol, which the proxy does not speak
        except httptools.HttpParserCallbackError as failed_callback:  # named apart: see handler.forward_owned
            cause = failed_callback.__context__
            self._refuse(cause if isinstance(cause, ProblemError) else MalformedRequest(str(cause)))
        except httptools.HttpParserError as exc:
            if not self._stopped:
                # The version is this request's once parsed (and 1.x from an earlier one before).
                unsupported = unsupported_version(self._parser.get_http_version())
                self._refuse(unsupported or MalformedRequest(f"The request could not be parsed: {exc}."))
        if was_in_head and self._in_head and not self._stopped:  # bytes httptools holds for an unfinished head
            self._head_size += size  # (a piece holds one head's bytes, or at most 18 x MAX_PIPELINED)
            if self._head_size > MAX_HEAD:
                self._refuse(HeaderFieldsTooLarge(f"The request head exceeds {MAX_HEAD} bytes."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self._stopped = True
        self.keep_alive = False
        self._cancel_head_timer()
        self._cancel_stall_timer()
        lost = ConnectionResetError("the caller closed the connection")
        for request in (self._arriving, *self._waiting):
            if request is not None and not request.content.is_eof():
                request.content.set_exception(lost)
        self._waiting.clear()
        self._held = b""
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(lost)

    def pause_writing(self) -> None:
        """The caller does not read its answers as fast as they come: take no new request, and
        disconnect it if it reads nothing more for ``header_timeout_s`` (nginx: ``send_timeout``)."""
        self._writing_paused = True
        self._cancel_stall_timer()
        self._stall_timer = self.loop.call_later(self.server.header_timeout_s, self._stalled)
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._cancel_stall_timer()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._update_reading()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._body_left = 0
        self._url = []
        self._url_size = 0
        self._fields = []
        self._fields_size = 0

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_LINE:
            raise TargetTooLong(f"The request target exceeds {MAX_LINE} bytes.")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: dropped, as aiohttp does
        if len(name) + len(value) > MAX_LINE:
            raise HeaderFieldsTooLarge(f"A header field exceeds {MAX_LINE} bytes.")
        if len(self._fields) >= MAX_HEADERS:
            raise HeaderFieldsTooLarge(f"The request has more than {MAX_HEADERS} header fields.")
        self._fields_size += len(name) + len(value) + 4
        if self._url_size + self._fields_size > MAX_HEAD:
            raise HeaderFieldsTooLarge(f"The request head exceeds {MAX_HEAD} bytes.")
        self._fields.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        self._head_arrived()
        parser = self._parser
        headers = CIMultiDictProxy(CIMultiDict(self._fields))
        if len(self._fields) != len({name.lower() for name, _ in self._fields}):
            _refuse_duplicate_singletons(headers)
        version = parser.get_http_version()
        check_head(version, headers)
        expect = headers.get("Expect")
        expects_continue = False
        if expect is not None and version == "1.1":  # HTTP/1.0 expectations are ignored (RFC 9110 §10.1.1)
            # Expect is a list (RFC 9110 §10.1.1), its field lines one list (§5.3): a second
            # line is a second expectation, not one to ignore (nginx refuses it as a duplicate).
            if expect.lower() != "100-continue" or len(headers.getall("Expect")) > 1:
                expected = ", ".join(headers.getall("Expect"))
                raise ExpectationFailed(f"Expect: {expected!r} is not supported; only 100-continue is.")
            expects_continue = True
        raw_path = (self._url[0] if len(self._url) == 1 else b"".join(self._url)).decode("utf-8", "surrogateescape")
        request = Request(
            parser.get_method().decode("ascii"),
            raw_path,
            version,
            headers,
            RequestBody(self, expects_continue=expects_continue),
            keep_alive=parser.should_keep_alive(),
            connection=self,
        )
        if parser.should_upgrade() and (request.content_length or "Transfer-Encoding" in headers):
            raise MalformedRequest("An upgrade offer on a request with a body is not supported.")
        self._arriving = request
        self._body_left = request.content_length or 0
        if self._answering is None:
            self._answer(request)
        else:
            self._waiting.append(request)

    def on_body(self, data: bytes) -> None:
        request = self._arriving
        assert request is not None
        if self._body_left:
            self._body_left -= len(data)
        request.content.feed(data)

    def on_message_complete(self) -> None:
        request = self._arriving
        assert request is not None
        request.content.feed_eof()
        self._arriving = None
        self._body_left = 0
        if not request.keep_alive:
            self._stopped = True  # whatever follows a final request is not read

    # -- answering --------------------------------------------------------------------------

    def _answer(self, request: Request) -> None:
        self._head_written = False
        self._answering = self.loop.create_task(self._respond(request))

    async def _respond(self, request: Request) -> None:
        try:
            try:
                response = await self.server.handler(request)
            except Exception as exc:
                if isinstance(exc, ConnectionError) and (self.transport is None or self.transport.is_closing()):
                    raise  # the caller left and a write failed: not a failure of the proxy
                log.exception("unhandled error in the proxy listener", extra={"path": request.raw_path})
                if self._head_written:  # too late for a problem: cut the response short
                    self.keep_alive = False
                    self.close()
                    raise ConnectionResetError("the response was cut short") from None
                response = problem_reply(InternalError("The proxy failed unexpectedly; see its logs."))
            if not request.content.is_eof():
                self.keep_alive = False  # the rest of an unread body cannot be told from the next request
            try:
                await self._send(request, response)
            except ValueError:  # an invalid head from the handler; nothing of it was written
                log.exception("invalid response head", extra={"path": request.raw_path})
                await self._send(request, problem_reply(InternalError("The proxy failed unexpectedly; see its logs.")))
        except ConnectionError:
            self.keep_alive = False
        except asyncio.CancelledError:
            self.keep_alive = False
            self.abort()
            raise
        finally:
            self._answering = None
        self._next(request)

    async def _send(self, request: Request, response: StreamResponse) -> None:
        if isinstance(response, Response):
            await response.send(request)
        else:
            await response.prepare(request)
            await response.write_eof()

    def _next(self, answered: Request) -> None:
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._send_refusal(refusal)
            return
        if (
            not (self.keep_alive and answered.keep_alive)
            or self.server.closing
            or self.transport is None
            or self.transport.is_closing()
        ):
            self._end(caller_may_send=not answered.content.is_eof())
            return
        if self._waiting:
            self._answer(self._waiting.popleft())
        if self._held:  # room for one more request: parse on
            held, self._held = self._held, b""
            self._take(held, self._held_at)
        if self._answering is None and not self._stopped:
            self._arm_head_timer()
        self._update_reading()

    def _refuse(self, problem: ProblemError) -> None:
        """The request stream broke: answer ``problem`` (unless a body in progress takes the blame) and close.
        One warning line, no traceback: a caller sending garbage must not flood the logs with errors."""
        log.warning("refused a request the HTTP parser could not read", extra={"error": problem.detail})
        arriving = self._arriving
        # Not ``arriving not in self._waiting``: mypyc compiles that into ``arriving.__contains__(self._waiting)``.
        waiting = any(request is arriving for request in self._waiting)
        being_answered = arriving is not None and not waiting and not arriving.content.is_eof()
        self._stop()
        if being_answered:
            assert arriving is not None
            # Its handler is reading the body: it answers (``incomplete-body``), then the connection closes.
            arriving.content.set_exception(IncompleteBody(problem.detail))
            return
        if self._answering is not None:
            self._refusal = problem
            return
        self._send_refusal(problem)

    def _send_refusal(self, problem: ProblemError) -> None:
        self._cancel_head_timer()
        response = problem_reply(problem)
        response.headers["Content-Length"] = str(len(response.body))
        response.headers["Connection"] = "close"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._head("1.1", problem.status, None, response.headers) + response.body)
        self._end(caller_may_send=True)

    def _end(self, *, caller_may_send: bool) -> None:
        """Close after the last answer; if the caller may still be sending, linger first: send
        the end of the stream after the answer and drop what arrives, for ``LINGER_S`` at most."""
        transport = self.transport
        if not caller_may_send or transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        self._stop()
        self._lingering = True
        transport.write_eof()
        self._arm_head_timer(LINGER_S)
        self._update_reading()

    def _stop(self) -> None:
        self._stopped = True
        self.keep_alive = False
        self._waiting.clear()
        self._held = b""

    # -- writing ----------------------------------------------------------------------------

    def response_head(self, request: Request, status: int, reason: str | None, headers: CIMultiDict[str]) -> bytes:
        if (
            not self.keep_alive
            or not request.keep_alive
            or self.server.closing
            or headers.get("Connection", "").lower() == "close"
        ):
            self.keep_alive = False
            headers["Connection"] = "close"
        elif request.version == "1.0":
            headers["Connection"] = "keep-alive"
        head = self._head(request.version, status, reason, headers)
        self._head_written = True
        return head

    @staticmethod
    def _head(version: str, status: int, reason: str | None, headers: CIMultiDict[str]) -> bytes:
        if reason is None:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        elif not (reason.isascii() and reason.isprintable()) and not _REASON.fullmatch(reason):
            # A tool's reason reaches here cleaned (``upstream_client``); anything else is a bug.
            raise ValueError("a reason phrase with a line break, a control character or non-ASCII text")
        lines = [f"HTTP/{version} {status} {reason}\r\n"]
        if "Date" not in headers:
            lines.append(f"Date: {_date.now()}\r\n")
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError(f"a line break or colon in response header {name!r}")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def send_continue(self) -> None:
        """Invite the caller to send the body it holds back (``RequestBody`` calls this when a
        reader first waits for a body whose caller expects ``100 Continue``). Not sooner, as
        nginx: a request refused from its head (no credentials, say) is answered without
        inviting the body (RFC 9110 §10.1.1 lets a server send a final status instead)."""
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self._head_written:
            transport.write(_CONTINUE)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        if not self._writing_paused:
            return
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        self._drain_waiter = self.loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    # -- reading and time -------------------------------------------------------------------

    def body_wanted(self) -> None:
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        arriving = self._arriving
        pause = bool(self._waiting) or bool(self._held) or (self._stopped and not self._lingering)
        if arriving is not None:
            if arriving.content.buffered > BODY_HIGH_WATER:
                pause = True
        elif self._writing_paused and not self._lingering:
            pause = True  # between requests, while answers back up: produce no more of them
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _arm_head_timer(self, after_s: float | None = None) -> None:
        """Close the connection unless a head arrives within ``after_s`` (``header_timeout_s``).

        The timer is kept from one request to the next and only moved when it would fire too
        late; when it fires early it waits for the rest. A new timer per keep-alive request,
        and cancelling the old, cost about 1.5% of the request's CPU."""
        deadline = self.loop.time() + (self.server.header_timeout_s if after_s is None else after_s)
        self._head_deadline = deadline
        if self._head_timer is not None:
            if self._head_timer_at <= deadline:
                return
            self._head_timer.cancel()
        self._schedule_head_timer(deadline)

    def _schedule_head_timer(self, at: float) -> None:
        self._head_timer = self.loop.call_at(at, self._head_timer_fired)
        self._head_timer_at = at  # not TimerHandle.when(): uvloop gives a plain Handle when due at once

    def _head_arrived(self) -> None:
        self._head_deadline = 0.0  # the timer stays; it finds nothing due when it fires

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline == 0.0:
            return
        now = self.loop.time()
        if now + _TIMER_SLACK_S < deadline:
            self._schedule_head_timer(deadline)
            return
        self.close()  # within the loop clock's millisecond of the deadline: due

    def _cancel_head_timer(self) -> None:
        self._head_deadline = 0.0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        """The caller read none of its answers for ``header_timeout_s``: abort (closing would wait
        for it to read what is buffered). A handler still answering sees its write fail."""
        self._stall_timer = None
        log.warning(
            "closed a connection whose caller stopped reading its answers",
            extra={"timeout_s": self.server.header_timeout_s, "queued": len(self._waiting)},
        )
        self.abort()

    @property
    def queued(self) -> int:
        """Requests parsed ahead of the one being answered (at most ``MAX_PIPELINED``)."""
        return len(self._waiting)

    @property
    def max_body(self) -> int:
        return self.server.max_body

    @property
    def idle(self) -> bool:
        """No request is being answered (a lingering connection is idle)."""
        return self._answering is None

    def close(self) -> None:
        self._stop()
        self._cancel_head_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._stop()
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    """A protocol factory for ``loop.create_server``, and the connections it serves.

    ``max_connections`` (None: no limit) bounds the connections open at once. One more is
    accepted and closed at once (RST if it already sent something), without an answer: an
    answer would take reading its request and lingering, which is what a flood must not get.
    nginx does the same when ``worker_connections`` are used up ("worker_connections are not
    enough"). Accepting it, rather than leaving it in the listen backlog, tells the caller at
    once; idemproxy's callers retry with the same key, which is safe."""

    def __init__(
        self, handler: Handler, *, header_timeout_s: float, max_body: int, max_connections: int | None = None
    ) -> None:
        self.handler = handler
        self.header_timeout_s = header_timeout_s
        self.max_body = max_body
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.closing = False
        self._refusal_logged_at: float | None = None
        self._all_closed: asyncio.Event | None = None  # set once shutting down and every connection is gone
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def __call__(self) -> _Connection:
        return _Connection(self)

    def admit(self, connection: _Connection) -> bool:
        """Count ``connection`` in, or False when ``max_connections`` are open (it is counted refused)."""
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            metrics.REFUSED_CONNECTIONS.inc()
            now = self.loop.time()
            if self._refusal_logged_at is None or now - self._refusal_logged_at >= _REFUSAL_LOG_EVERY_S:
                self._refusal_logged_at = now
                log.warning(
                    "max_connections are open: new connections are closed at once",
                    extra={"max_connections": self.max_connections},
                )
            return False
        self.connections.add(connection)
        metrics.OPEN_CONNECTIONS.inc()
        return True

    def forget(self, connection: _Connection) -> None:
        if connection not in self.connections:
            return  # refused by ``admit``
        self.connections.discard(connection)
        metrics.OPEN_CONNECTIONS.dec()
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def shutdown(self, grace_s: float) -> None:
        """Close idle connections now, let requests in progress finish within ``grace_s``, then cancel them.
        Stop accepting (``Server.close()``) first."""
        self.closing = True
        self._all_closed = asyncio.Event()
        if not self.connections:
            return
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        deadline = self.loop.time() + grace_s
        answering = [c._answering for c in self.connections if c._answering is not None]
        if answering:
            _, late = await asyncio.wait(answering, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=_CANCELLED_WAIT_S)
        # Answers given: let what the transports still buffer reach the callers, within the grace.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(max(deadline, self.loop.time())):
                await self._all_closed.wait()
        for connection in list(self.connections):
            connection.abort()

"""The conformance corpus (issue 22): hostile HTTP requests as raw bytes, each with what
idemproxy must answer and what the tool may receive (``test_conformance_corpus.py`` runs them
against the proxy and, differentially, against nginx).

A case's bytes are written out line by line, ``CRLF`` and all, with two placeholders:

- ``{id}``: the case's number, four digits (so a ``Content-Length`` computed over the
  placeholder stays right). Every request a case sends names it in its target
  (``/items/c/{id}``) and in ``X-Case``: whatever reaches a tool is traced to its case.
- ``{canary}``: the authority of the hostile stack's canary, which no route names.

A case expects, of idemproxy:

- ``answers``: the answers in order, each ``"<status>"`` or ``"<status> <problem type>"`` for
  problem+json; none when the connection closes without an answer;
- ``closes``: whether the connection closes right after the last answer (it says
  ``Connection: close``), rather than idling until the keep-alive timeout;
- ``reaches``: the requests the tool receives, in order (method, target, body); nothing
  unless listed. A request smuggled into a body (``/smuggled``) may reach the tool only as
  that body.

The differential run sends the same bytes through nginx: a case where nginx forwards
nothing (or not the smuggled request) while idemproxy forwards it fails unless the case
says ``lenient_because``, specifically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Every request's target and ``X-Case`` carry the case number (4 digits, like the placeholder).
PATH = b"/items/c/{id}"
HOST = b"Host: idemproxy.test"
TAG = b"X-Case: {id}"
KEY = b"Idempotency-Key: corpus-{id}"
CLOSE = b"Connection: close"
#: The route's ``max_body`` in the hostile stack (``tests.hostile.stack.ITEMS_MAX_BODY``).
MAX_BODY = 1024


@dataclass(frozen=True, slots=True)
class Tool:
    """One request as the tool must receive it; ``{id}`` in ``target`` and ``body`` stands
    for the case number."""

    method: str
    target: str
    body: bytes = b""
    #: Header lines the tool must receive among the others (names case-insensitive).
    fields: tuple[tuple[bytes, bytes], ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    group: str
    data: bytes
    answers: tuple[str, ...]
    closes: bool = True
    reaches: tuple[Tool, ...] = ()
    #: Why idemproxy forwards what nginx refuses (required for every such case).
    lenient_because: str | None = None
    #: What the case is about, when the name does not say it.
    note: str = ""


def head(*lines: bytes) -> bytes:
    """Lines, each ended with ``CRLF``, and the empty line that ends a head."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def post(
    *fields: bytes,
    body: bytes = b"abc",
    target: bytes = PATH,
    method: bytes = b"POST",
    length: bool = True,
    close: bool = True,
    key: bool = True,
    version: bytes = b"HTTP/1.1",
    host: bytes | None = HOST,
) -> bytes:
    """A request with the standard fields (``host``, ``X-Case``, the key), then ``fields``, then
    ``Content-Length`` (when ``length``) and ``Connection: close`` (when ``close``)."""
    lines = [method + b" " + target + b" " + version, *([host] if host else []), TAG, *([KEY] if key else []), *fields]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(CLOSE)
    return head(*lines) + body


def chunked(*fields: bytes, body: bytes, close: bool = True, version: bytes = b"HTTP/1.1") -> bytes:
    """A chunked request: ``body`` is sent as given, framing and all."""
    return post(b"Transfer-Encoding: chunked", *fields, body=body, length=False, close=close, version=version)


#: The request a smuggling case hides: reaching the tool as a request of its own is the attack.
SMUGGLED = head(
    b"POST /items/c/{id}/smuggled HTTP/1.1", HOST, TAG, b"Idempotency-Key: smuggled-{id}", b"Content-Length: 0", CLOSE
)
#: A legitimate second request on the same connection (pipelining), for the control cases.
SECOND = head(
    b"POST /items/c/{id}/second HTTP/1.1", HOST, TAG, b"Idempotency-Key: second-{id}", b"Content-Length: 0", CLOSE
)

S = SMUGGLED
#: The last chunk: a chunked body that ends at once.
LAST = b"0\r\n\r\n"
#: "abc", chunked.
ABC_CHUNKED = b"3\r\nabc\r\n" + LAST

#: What the tool receives of most cases that reach it.
ABC = Tool("POST", "/items/c/{id}", b"abc")

OK = ("201",)
MALFORMED = ("400 malformed-request",)
#: A framing error in a body the handler was already reading: the body takes the blame.
BROKEN_BODY = ("400 incomplete-body",)
TOO_LARGE = ("413 body-too-large",)


def many_fields(count: int, size: int = 1) -> list[bytes]:
    return [b"X-H%d: %b" % (n, b"v" * size) for n in range(count)]


# fmt: off
CORPUS: list[Case] = [
    # -- request smuggling: two framings at once, or one a front end may read otherwise ----------
    Case("cl-te", "smuggling",
         post(b"Content-Length: %d" % len(LAST + S), b"Transfer-Encoding: chunked", body=LAST + S, length=False,
              close=False),
         MALFORMED, note="CL.TE: the length covers the smuggled request, the chunked body ends before it"),
    Case("te-cl", "smuggling",
         post(b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(LAST + S), body=LAST + S, length=False,
              close=False),
         MALFORMED, note="TE.CL"),
    Case("two-lengths", "smuggling",
         post(b"Content-Length: 3", b"Content-Length: %d" % len(b"abc" + S), body=b"abc" + S, length=False,
              close=False),
         MALFORMED, note="the first length ends before the smuggled request, the second after it"),
    Case("two-equal-lengths", "smuggling",
         post(b"Content-Length: 3", b"Content-Length: 3", length=False), MALFORMED),
    Case("length-list", "smuggling", post(b"Content-Length: 3, 3", length=False), MALFORMED),
    Case("length-plus-sign", "smuggling", post(b"Content-Length: +3", length=False), MALFORMED),
    Case("length-minus-sign", "smuggling", post(b"Content-Length: -3", length=False), MALFORMED),
    Case("length-hex", "smuggling", post(b"Content-Length: 0x3", length=False), MALFORMED),
    Case("length-inner-space", "smuggling", post(b"Content-Length: 1 2", body=b"a" * 12, length=False), MALFORMED),
    Case("length-overflow", "smuggling", post(b"Content-Length: 18446744073709551619", length=False), MALFORMED),
    Case("length-empty", "smuggling", post(b"Content-Length: ", body=b"", length=False), MALFORMED),
    Case("length-leading-zeros", "smuggling", post(b"Content-Length: 0003", length=False), OK, reaches=(ABC,),
         note="1*DIGIT: leading zeros are a valid length"),
    Case("length-with-spaces", "smuggling", post(b"Content-Length:   3   ", length=False), OK, reaches=(ABC,),
         note="optional whitespace around a value is not part of it"),
    Case("length-with-tabs", "smuggling", post(b"Content-Length:\t3\t", length=False), OK,
         reaches=(Tool("POST", "/items/c/{id}", b"abc", ((b"Content-Length", b"3"),)),),
         lenient_because="RFC 9110 §5.5 excludes leading and trailing whitespace, SP and HTAB alike (OWS), from "
                         "a field value, so the length is 3; nginx 1.22 strips SP only and refuses '\\t3\\t' as an "
                         "invalid Content-Length. The tool gets the body framed by the proxy (Content-Length: 3)"),
    Case("length-hides-a-request", "smuggling", post(body=S, close=False), OK, closes=False,
         reaches=(Tool("POST", "/items/c/{id}", S),), note="the smuggled request is the body, and stays one"),
    Case("te-obs-fold", "smuggling",
         post(b"Transfer-Encoding:", b" chunked", body=LAST + S, length=False, close=False),
         MALFORMED, note="Transfer-Encoding's value on a folded line"),
    Case("te-hidden-in-fold", "smuggling",
         post(b"Content-Length: %d" % len(LAST + S), b"X-Folded: a", b" Transfer-Encoding: chunked", body=LAST + S,
              length=False, close=False),
         MALFORMED, note="a folded line that reads as Transfer-Encoding to a parser that does not unfold"),
    Case("te-space-before-colon", "smuggling",
         post(b"Content-Length: %d" % len(LAST + S), b"Transfer-Encoding : chunked", body=LAST + S, length=False,
              close=False),
         MALFORMED),
    Case("te-xchunked", "smuggling",
         post(b"Transfer-Encoding: xchunked", body=ABC_CHUNKED + S, length=False, close=False),
         ("400 unsupported-transfer-coding",)),
    Case("te-chunked-identity", "smuggling",
         post(b"Transfer-Encoding: chunked, identity", body=ABC_CHUNKED + S, length=False, close=False), MALFORMED),
    Case("te-identity-chunked", "smuggling",
         post(b"Transfer-Encoding: identity, chunked", body=ABC_CHUNKED, length=False),
         ("400 unsupported-transfer-coding",), note="chunked last, after a coding that is not (any more) registered"),
    Case("te-gzip-chunked", "smuggling", post(b"Transfer-Encoding: gzip, chunked", body=ABC_CHUNKED, length=False),
         ("400 unsupported-transfer-coding",)),
    Case("te-twice", "smuggling",
         post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=ABC_CHUNKED + S, length=False,
              close=False), MALFORMED),
    Case("te-in-http-1.0", "smuggling", chunked(body=LAST + S, close=False, version=b"HTTP/1.0"), MALFORMED),
    Case("te-uppercase", "smuggling", post(b"Transfer-Encoding: CHUNKED", body=ABC_CHUNKED, length=False), OK,
         reaches=(ABC,), note="transfer-coding names are case-insensitive"),
    Case("te-tab", "smuggling", post(b"Transfer-Encoding:\tchunked", body=ABC_CHUNKED, length=False), OK,
         reaches=(Tool("POST", "/items/c/{id}", b"abc", ((b"Content-Length", b"3"),)),),
         lenient_because="RFC 9110 §5.5 excludes leading whitespace, HTAB as well as SP (OWS), from a field value, "
                         "so the coding is 'chunked'; nginx 1.22 keeps the HTAB and refuses '\\tchunked' as an "
                         "unknown coding (501). The tool gets the body de-chunked, framed by Content-Length"),
    Case("pipelined-second-request", "smuggling", post(close=False) + SECOND, ("201", "201"),
         reaches=(ABC, Tool("POST", "/items/c/{id}/second")), note="control: a well-framed request after another"),
    Case("get-body-hides-a-request", "smuggling", post(body=S, method=b"GET", key=False, close=False), OK,
         closes=False, reaches=(Tool("GET", "/items/c/{id}", S),)),
    Case("chunked-then-second-request", "smuggling", chunked(body=ABC_CHUNKED, close=False) + SECOND, ("201", "201"),
         reaches=(ABC, Tool("POST", "/items/c/{id}/second")), note="control"),
    Case("upgrade-with-a-body", "smuggling",
         post(b"Connection: Upgrade", b"Upgrade: websocket", body=S, close=False), MALFORMED,
         note="after a switch of protocols the body would be the new protocol's"),
    # -- chunk framing -------------------------------------------------------------------------------
    Case("chunk-negative", "chunks", chunked(body=b"-3\r\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-hex-overflow", "chunks", chunked(body=b"10000000000000003\r\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-0x-prefix", "chunks", chunked(body=b"0x3\r\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-leading-space", "chunks", chunked(body=b" 3\r\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-trailing-space", "chunks", chunked(body=b"3 \r\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-leading-zeros", "chunks", chunked(body=b"0000000000000000003\r\nabc\r\n" + LAST), OK,
         reaches=(ABC,)),
    Case("chunk-extension", "chunks", chunked(body=b'3;name=value;q="a b"\r\nabc\r\n' + LAST), OK, reaches=(ABC,)),
    Case("chunk-extension-long", "chunks", chunked(body=b"3;x=" + b"e" * 16000 + b"\r\nabc\r\n" + LAST),
         OK, reaches=(ABC,),
         note="chunk-ext abuse: a 16 KB extension, skipped as it streams (never buffered), within client_body_timeout"),
    Case("chunk-extension-many", "chunks", chunked(body=b"3" + b";e" * 4000 + b"\r\nabc\r\n" + LAST), OK,
         reaches=(ABC,), note="chunk-ext abuse: 4000 extensions, skipped like one"),
    Case("chunk-extension-bare-lf", "chunks", chunked(body=b"3;x\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-extension-quoted-crlf", "chunks",
         chunked(body=b'3;x="\r\nabc\r\n' + LAST, close=False) + S, BROKEN_BODY,
         note="a quoted-string holds no CR or LF: a parser that skips to the line's end reads the smuggled request"),
    Case("chunk-data-overrun", "chunks", chunked(body=b"3\r\nabcde\r\n" + LAST), BROKEN_BODY,
         note="no CRLF after the chunk's data"),
    Case("chunk-size-bare-lf", "chunks", chunked(body=b"3\nabc\r\n" + LAST), BROKEN_BODY),
    Case("chunk-data-bare-lf", "chunks", chunked(body=b"3\r\nabc\n" + LAST), BROKEN_BODY),
    Case("chunk-size-bare-cr", "chunks", chunked(body=b"3\rabc\r\n" + LAST), BROKEN_BODY),
    Case("last-chunk-bare-lf", "chunks", chunked(body=b"3\r\nabc\r\n0\n\n"), BROKEN_BODY),
    Case("trailer-is-a-request", "chunks", chunked(body=b"3\r\nabc\r\n0\r\n" + S, close=False), BROKEN_BODY,
         note="the trailer section holds a request line"),
    Case("trailer-field", "chunks", chunked(body=b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"), OK, reaches=(ABC,)),
    Case("length-longer-than-body", "chunks", post(b"Content-Length: 10", length=False, close=False),
         ("408 request-timeout",), note="the body stops short of its length"),
    Case("chunk-never-ends", "chunks", chunked(body=b"3\r\nabc\r\n", close=False), ("408 request-timeout",),
         note="the body stops before its last chunk"),
    # -- oversize ------------------------------------------------------------------------------------
    Case("target-too-long", "oversize", post(target=PATH + b"?q=" + b"q" * 9000), ("414 target-too-long",)),
    Case("header-too-long", "oversize", post(b"X-Big: " + b"v" * 9000), ("431 header-fields-too-large",)),
    Case("too-many-headers", "oversize", post(*many_fields(129)), ("431 header-fields-too-large",)),
    Case("head-too-large", "oversize", post(*many_fields(9, 7500)), ("431 header-fields-too-large",)),
    Case("body-over-max-body", "oversize", post(body=b"z" * (MAX_BODY + 1)), TOO_LARGE),
    Case("length-over-max-body", "oversize", post(b"Content-Length: 100000", body=b"", length=False), TOO_LARGE,
         note="refused from the length alone; the body is never sent"),
    Case("chunked-over-max-body", "oversize",
         chunked(body=b"200\r\n" + b"z" * 512 + b"\r\n" + b"200\r\n" + b"z" * 512 + b"\r\n1\r\nz\r\n" + LAST),
         TOO_LARGE),
    Case("body-of-max-body", "oversize", post(body=b"z" * MAX_BODY), OK,
         reaches=(Tool("POST", "/items/c/{id}", b"z" * MAX_BODY),), note="control"),
    Case("method-too-long", "oversize", post(method=b"P" * 8000), MALFORMED),
    # -- request targets -----------------------------------------------------------------------------
    Case("absolute-form-canary", "targets", post(target=b"http://{canary}/items/c/{id}"),
         ("400 absolute-form-refused",)),
    Case("absolute-form-evil", "targets", post(target=b"http://evil.example/items/c/{id}"),
         ("400 absolute-form-refused",)),
    Case("scheme-relative", "targets", post(target=b"//evil.example/items/c/{id}"), ("400 absolute-form-refused",)),
    Case("connect-canary", "targets", head(b"CONNECT {canary} HTTP/1.1", b"Host: {canary}", TAG),
         ("405 method-not-allowed",)),
    Case("connect-evil", "targets", head(b"CONNECT evil.example:443 HTTP/1.1", b"Host: evil.example:443", TAG),
         ("405 method-not-allowed",)),
    Case("authority-form-post", "targets", post(target=b"evil.example:80"), MALFORMED),
    Case("asterisk-form-options", "targets", head(b"OPTIONS * HTTP/1.1", HOST, TAG, CLOSE),
         ("400 absolute-form-refused",), note="a server-wide OPTIONS means nothing to a tool"),
    Case("asterisk-form-post", "targets", post(target=b"*"), ("400 absolute-form-refused",)),
    Case("fragment", "targets", post(target=PATH + b"#fragment"), ("400 invalid-request-target",),
         note="a fragment is never sent (RFC 9110 §4.2.5)"),
    Case("backslash", "targets", post(target=PATH + b"\\..\\..\\x"), ("400 invalid-request-target",)),
    Case("dot-segments", "targets", post(target=PATH + b"/../../../x"), ("400 invalid-request-target",)),
    Case("encoded-dot-segments", "targets", post(target=PATH + b"/%2e%2e/%2E%2e/x"),
         ("400 invalid-request-target",)),
    Case("space-in-target", "targets", post(target=PATH + b"/a b"), MALFORMED),
    Case("utf8-in-target", "targets", post(target=PATH + "/café".encode()), MALFORMED),
    # -- CR, LF and NUL where they do not belong -----------------------------------------------------
    Case("request-line-bare-lf", "lines",
         b"POST /items/c/{id} HTTP/1.1\n" + post(body=b"abc")[len(b"POST /items/c/{id} HTTP/1.1\r\n"):], MALFORMED),
    Case("request-line-bare-cr", "lines",
         b"POST /items/c/{id} HTTP/1.1\r" + post(body=b"abc")[len(b"POST /items/c/{id} HTTP/1.1\r\n"):], MALFORMED),
    Case("all-bare-lf", "lines", post().replace(b"\r\n", b"\n"), MALFORMED),
    Case("target-bare-cr", "lines", post(target=PATH + b"\r/x"), MALFORMED),
    Case("target-bare-lf", "lines", post(target=PATH + b"\n/x"), MALFORMED),
    Case("header-bare-lf", "lines", post(b"X-A: 1\nX-B: 2"), MALFORMED),
    Case("header-bare-cr", "lines", post(b"X-A: 1\rX-B: 2"), MALFORMED),
    Case("nul-in-target", "lines", post(target=PATH + b"\x00x"), MALFORMED),
    Case("nul-in-header-name", "lines", post(b"X-\x00A: 1"), MALFORMED),
    Case("nul-in-header-value", "lines", post(b"X-A: a\x00b"), MALFORMED),
    Case("control-in-header-value", "lines", post(b"X-A: a\x01b"), MALFORMED),
    Case("del-in-header-value", "lines", post(b"X-A: a\x7fb"), MALFORMED),
    # -- header lines --------------------------------------------------------------------------------
    Case("obs-fold", "headers", post(b"X-A: 1", b" 2"), MALFORMED),
    Case("obs-fold-tab", "headers", post(b"X-A: 1", b"\t2"), MALFORMED),
    Case("first-field-folded", "headers", post(host=b" X-A: 1\r\n" + HOST), MALFORMED,
         note="whitespace before the first field line (RFC 9112 §2.2)"),
    Case("space-before-colon", "headers", post(b"X-A : 1"), MALFORMED),
    Case("space-before-colon-length", "headers",
         post(b"Content-Length : %d" % len(S), body=S, length=False, close=False), MALFORMED,
         note="a parser that drops the line reads the body as a request"),
    Case("tab-before-colon", "headers", post(b"X-A\t: 1"), MALFORMED),
    Case("space-in-name", "headers", post(b"X A: 1"), MALFORMED),
    Case("parenthesis-in-name", "headers", post(b"X(A): 1"), MALFORMED),
    Case("obs-text-in-name", "headers", post(b"X-\xe9: 1"), MALFORMED),
    Case("no-colon", "headers", post(b"X-A 1"), MALFORMED),
    Case("empty-name", "headers", post(b": 1"), MALFORMED),
    Case("underscore-in-name", "headers", post(b"X_A: 1"), OK, reaches=(ABC,), note="control: a token"),
    Case("obs-text-in-value", "headers", post(b"X-A: caf\xe9"), ("400 invalid-header",),
         note="not UTF-8: refused, not forwarded with its bytes changed"),
    Case("utf8-in-value", "headers", post("X-A: café".encode()), OK, reaches=(ABC,)),
    Case("duplicate-host", "headers", post(b"Host: evil.example"), MALFORMED),
    Case("missing-host", "headers", post(host=None), MALFORMED),
    Case("empty-host", "headers", post(host=b"Host:"), OK, reaches=(ABC,),
         lenient_because="RFC 9112 §3.2 allows an empty Host (a target URI without an authority), where nginx "
                         "answers 400; idemproxy routes by path alone, so an empty Host chooses nothing "
                         "(check_head in proxy/wire/http_server.py)"),
    Case("host-with-userinfo", "headers", post(host=b"Host: user@evil.example"), MALFORMED),
    Case("host-with-path", "headers", post(host=b"Host: evil.example/x"), MALFORMED),
    Case("host-port-only", "headers", post(host=b"Host: :80"), MALFORMED,
         note='an "http" URI with an empty host is invalid (RFC 9110 §4.2.1)'),
    Case("host-dot-dot", "headers", post(host=b"Host: .."), MALFORMED,
         note="an empty label, which X-Forwarded-Host would carry to the tool as a path step"),
    Case("host-dot", "headers", post(host=b"Host: ."), MALFORMED),
    Case("host-encoded-dot-dot", "headers", post(host=b"Host: %2e%2e"), OK, reaches=(ABC,),
         note="percent-encoded octets are a reg-name's (RFC 3986 §3.2.2); nginx forwards it too"),
    Case("host-tab", "headers", post(host=b"Host:\tidemproxy.test"), OK, reaches=(ABC,),
         lenient_because="RFC 9110 §5.5 excludes leading whitespace, HTAB as well as SP (OWS), from a field value, "
                         "so the host is 'idemproxy.test'; nginx 1.22 keeps the HTAB and refuses the Host as "
                         "invalid. Host chooses no upstream here (routes match the path alone)"),
    Case("host-percent-encoded", "headers", post(host=b"Host: idem%70roxy.test"), OK, reaches=(ABC,)),
    Case("host-with-comma", "headers", post(host=b"Host: a.example,b.example"), OK, reaches=(ABC,),
         note="',' is a sub-delim: a valid reg-name"),
    # -- versions and methods ------------------------------------------------------------------------
    Case("http-0.9", "versions", b"GET /items/c/{id}\r\n", (),
         note="llhttp reads on for a head, so the connection closes at client_header_timeout without an answer: "
              "an HTTP/0.9 client could not read an HTTP/1.1 one, nor does any 0.9 request reach the tool"),
    Case("http-0.9-with-head", "versions", head(b"GET /items/c/{id}", HOST, TAG), MALFORMED),
    Case("http-2-preface", "versions", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ("505 http-version-not-supported",)),
    Case("http-2.0-request", "versions", post(version=b"HTTP/2.0"), ("505 http-version-not-supported",)),
    Case("http-1.2", "versions", post(version=b"HTTP/1.2"), MALFORMED),
    Case("http-10.0", "versions", post(version=b"HTTP/10.0"), MALFORMED),
    Case("lowercase-version", "versions", post(version=b"http/1.1"), MALFORMED),
    Case("lowercase-method", "versions", post(method=b"post"), MALFORMED),
    Case("unknown-method", "versions", post(method=b"FOO"), MALFORMED),
    Case("tab-after-method", "versions", b"POST\t" + post()[5:], MALFORMED),
    Case("two-spaces-after-method", "versions", b"POST  " + post()[5:], OK, reaches=(ABC,),
         note="RFC 9112 §3 lets a recipient split the request line on whitespace; nginx does too"),
    Case("space-after-version", "versions", post(version=b"HTTP/1.1 "), MALFORMED),
    Case("leading-empty-line", "versions", b"\r\n" + post(), OK, reaches=(ABC,),
         note="RFC 9112 §2.2: a server should ignore an empty line before the request line"),
    Case("http-1.0-keep-alive", "versions",
         post(b"Connection: keep-alive", close=False, version=b"HTTP/1.0"), OK, closes=False, reaches=(ABC,),
         note="control"),
    # -- Expect --------------------------------------------------------------------------------------
    Case("expect-continue-body-sent", "expect", post(b"Expect: 100-continue"), OK, reaches=(ABC,),
         note="the body came with the head: no 100 Continue is due"),
    Case("expect-continue-uppercase", "expect", post(b"Expect: 100-Continue"), OK, reaches=(ABC,)),
    Case("expect-unknown", "expect", post(b"Expect: 200-ok"), ("417 expectation-failed",)),
    Case("expect-list", "expect", post(b"Expect: 100-continue, 200-ok"), ("417 expectation-failed",)),
    Case("expect-empty", "expect", post(b"Expect: "), ("417 expectation-failed",)),
    Case("expect-twice", "expect", post(b"Expect: 100-continue", b"Expect: 200-ok"), ("417 expectation-failed",)),
    Case("expect-in-http-1.0", "expect", post(b"Expect: 200-ok", version=b"HTTP/1.0"), OK, reaches=(ABC,),
         note="HTTP/1.0 expectations are ignored (RFC 9110 §10.1.1)"),
    # -- the proxy's own headers: key, caller, task --------------------------------------------------
    Case("key-twice", "keys", post(b"Idempotency-Key: corpus-{id}"), ("400 ambiguous-header",)),
    Case("key-twice-differing", "keys", post(b"Idempotency-Key: other-{id}"), ("400 ambiguous-header",)),
    Case("key-empty", "keys", post(b"Idempotency-Key: ", key=False), ("400 invalid-idempotency-key",)),
    Case("key-control", "keys", post(b"Idempotency-Key: k\x01{id}", key=False), MALFORMED),
    Case("key-tab", "keys", post(b"Idempotency-Key: k\t{id}", key=False), ("400 invalid-idempotency-key",)),
    Case("key-non-ascii", "keys", post("Idempotency-Key: clé-{id}".encode(), key=False),
         ("400 invalid-idempotency-key",)),
    Case("key-not-utf8", "keys", post(b"Idempotency-Key: cl\xe9-{id}", key=False), ("400 invalid-header",)),
    Case("key-too-long", "keys", post(b"Idempotency-Key: {id}" + b"k" * 252, key=False),
         ("400 invalid-idempotency-key",)),
    Case("key-longest", "keys", post(b"Idempotency-Key: {id}" + b"k" * 251, key=False), OK, reaches=(ABC,),
         note="control: 255 characters"),
    Case("key-dot-dot", "keys", post(b"Idempotency-Key: ..", key=False), ("400 invalid-idempotency-key",),
         note="a probe URL or a tool could read it as a path step"),
    Case("key-dots", "keys", post(b"Idempotency-Key: ...", key=False), OK, reaches=(ABC,),
         note="control: not a dot segment"),
    Case("key-traversal", "keys", post(b"Idempotency-Key: ../../{id}/../x", key=False), OK, reaches=(ABC,)),
    Case("key-in-connection", "keys", post(b"Connection: Idempotency-Key", close=False),
         ("400 ambiguous-header",), closes=False,
         note="hop-by-hop: it would be dropped on the way to the tool. The request was read whole: the "
              "connection serves on"),
    Case("caller-twice", "keys", post(b"X-Idem-Caller: a", b"X-Idem-Caller: b"), ("400 ambiguous-header",)),
    Case("caller-empty", "keys", post(b"X-Idem-Caller: "), OK, reaches=(ABC,)),
    Case("caller-control", "keys", post(b"X-Idem-Caller: a\x01b"), MALFORMED),
    Case("caller-non-ascii", "keys", post("X-Idem-Caller: agent-é".encode()), OK, reaches=(ABC,)),
    Case("caller-very-long", "keys", post(b"X-Idem-Caller: " + b"c" * 8000), OK, reaches=(ABC,)),
    Case("caller-dot-dot", "keys", post(b"X-Idem-Caller: .."), OK, reaches=(ABC,)),
    Case("task-twice", "keys", post(b"X-Agent-Task: a", b"X-Agent-Task: b"), ("400 ambiguous-header",)),
    Case("task-empty", "keys", post(b"X-Agent-Task: "), OK, reaches=(ABC,)),
    Case("task-control", "keys", post(b"X-Agent-Task: a\x1bb"), MALFORMED),
    Case("task-non-ascii", "keys", post("X-Agent-Task: tâche".encode()), OK, reaches=(ABC,)),
    Case("task-very-long", "keys", post(b"X-Agent-Task: " + b"t" * 8000), OK, reaches=(ABC,)),
    Case("task-dot-dot", "keys", post(b"X-Agent-Task: ../.."), OK, reaches=(ABC,)),
]
# fmt: on

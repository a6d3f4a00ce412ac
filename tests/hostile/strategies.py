"""Hypothesis strategies for hostile requests: bytes, headers, targets, bodies, JSON."""

from __future__ import annotations

import json
import string
from typing import Any

import orjson
from hypothesis import strategies as st

TOKEN = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
#: Header names whose meaning the proxy or the framing depends on; fuzzed on purpose elsewhere.
_MEANINGFUL = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "expect",
        "upgrade",
        "content-encoding",
        "content-type",
        "idempotency-key",
        "x-idem-caller",
        "x-agent-task",
        "authorization",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-idem-key-id",
        "x-idem-timestamp",
        "x-idem-signature",
        "mcp-method",
        "mcp-name",
        "mcp-session-id",
        "close",  # listed in the requests' own "Connection: close", so hop-by-hop
    }
)
#: Field-value bytes RFC 9110 allows: VCHAR, SP, HTAB (obs-text is covered by ``invalid_utf8``).
_VCHAR = bytes(range(0x21, 0x7F))
#: Control characters no field value may carry (HTAB is allowed; CR and LF are handled apart).
CONTROLS = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
#: Byte sequences that are not UTF-8.
INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",  # a lead byte without its continuation
    b"\xa0\xa1",  # continuations without a lead byte
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\x80",  # an overlong NUL
    b"\xf8\x88\x80\x80\x80",  # five bytes
)

header_names = st.text(TOKEN, min_size=1, max_size=24).filter(lambda name: name.lower() not in _MEANINGFUL)
#: A well-formed field value: no leading or trailing whitespace.
_vchars = st.sampled_from([bytes([b]) for b in _VCHAR])
field_values: st.SearchStrategy[bytes] = st.builds(
    lambda first, middle, last: first + middle + last,
    _vchars,
    st.lists(st.one_of(_vchars, st.sampled_from([b" ", b"\t"])), max_size=40).map(b"".join),
    _vchars,
)


@st.composite
def values_with_a_control(draw: st.DrawFn) -> bytes:
    """A field value with one byte no field value may carry: a control character, or a
    CR or LF that does not end the line (a bare CR, a bare LF)."""
    before, after = draw(field_values), draw(field_values)
    bad = draw(
        st.one_of(
            st.sampled_from([bytes([b]) for b in CONTROLS]),
            st.just(b"\r"),  # bare CR: followed by a value byte, never by LF
            st.just(b"\n"),  # bare LF
        )
    )
    return before + bad + after


#: Bytes a header name may not contain (``:`` ends the name, so it is not among them).
NOT_TOKEN = bytes(b for b in range(256) if chr(b) not in TOKEN and b not in (ord(":"), ord("\r"), ord("\n")))


@st.composite
def non_token_names(draw: st.DrawFn) -> bytes:
    before = draw(st.text(TOKEN, max_size=6)).encode()
    after = draw(st.text(TOKEN, max_size=6)).encode()
    return before + bytes([draw(st.sampled_from(NOT_TOKEN))]) + after


@st.composite
def obs_folds(draw: st.DrawFn) -> bytes:
    """A value continued on the next line (obsolete line folding), which RFC 9112 forbids."""
    return draw(field_values) + b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"  "])) + draw(field_values)


@st.composite
def invalid_utf8_values(draw: st.DrawFn) -> bytes:
    return draw(field_values) + draw(st.sampled_from(INVALID_UTF8)) + draw(field_values)


# -- request targets -----------------------------------------------------------------------

#: Segments around and inside route prefixes: plain, dot segments raw and encoded (once and
#: twice), encoded slashes and backslashes, path parameters, escapes of control characters.
SEGMENTS = (
    "x",
    "items",
    "a",
    "b",
    "base-a",
    "",
    ".",
    "..",
    "...",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%2e",
    "a%2eb",
    "%252e%252e",
    "%25",
    "%2f",
    "%2F",
    "..%2f",
    "%5c",
    "%5C",
    "\\",
    "..\\",
    ";",
    "..;",
    "..;x=1",
    ".;",
    "%00",
    "%0d%0a",
    "%0A",
    "%7f",
    "%ff",
    "%e2%82%ac",
    "~",
    "a%20b",
    "@",
    ":",
)
BENIGN_SEGMENTS = ("x", "items", "a", "b", "base-a", "7", "a%20b", "%ff", "~", "@", ":", ";", "%252e%252e", "%25")
PREFIXES = ("/items", "/tenant/a", "/tenant", "/tenant/ab", "/tenant/a/..", "/itemsx", "/nope", "")


@st.composite
def paths(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(PREFIXES))
    segments = draw(st.lists(st.one_of(st.sampled_from(BENIGN_SEGMENTS), st.sampled_from(SEGMENTS)), max_size=4))
    path = prefix + "".join("/" + segment for segment in segments)
    return path or "/"


# -- bodies ----------------------------------------------------------------------------------

chunk_extensions = st.one_of(
    st.just(b""),
    st.text(TOKEN, min_size=1, max_size=8).map(lambda name: b";" + name.encode()),
    st.tuples(st.text(TOKEN, min_size=1, max_size=8), st.text(TOKEN, min_size=1, max_size=8)).map(
        lambda pair: b";" + pair[0].encode() + b"=" + pair[1].encode()
    ),
    st.text(TOKEN, min_size=1, max_size=8).map(lambda name: b";" + name.encode() + b'="quoted value"'),
)
#: Trailer fields, all named ``X-Trailer-...`` so a test can tell whether one was forwarded.
trailers = st.lists(
    st.tuples(header_names, field_values).map(lambda pair: b"X-Trailer-" + pair[0].encode() + b": " + pair[1]),
    max_size=3,
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(encoded, data)``: a well-formed chunked body (extensions, trailers) and what it carries;
    at most 512 bytes of data."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
    encoded = bytearray()
    for chunk in chunks:
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(chunk)
        encoded += size.encode() + draw(chunk_extensions) + b"\r\n" + chunk + b"\r\n"
    encoded += b"0" + draw(chunk_extensions) + b"\r\n"
    for trailer in draw(trailers):
        encoded += trailer + b"\r\n"
    encoded += b"\r\n"
    return bytes(encoded), b"".join(chunks)


#: Chunk-size lines that are not a chunk size.
BAD_CHUNK_SIZES = (b"zz", b"0x3", b"-3", b"+3", b"3.0", b"f" * 17, b"1" * 40, b"", b"3\x00", b"\xff", b"3\x0b")


# -- JSON --------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_containers = st.one_of(
    st.lists(json_scalars, max_size=3), st.dictionaries(st.text(max_size=8), json_scalars, max_size=3)
)
#: JSON values of every type but one.
json_non_strings = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), json_containers)
json_non_objects = st.one_of(json_scalars, st.lists(json_scalars, max_size=3))


def _json_containers_of(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4))


json_values = st.recursive(json_scalars, _json_containers_of, max_leaves=12)


def dumps(value: object) -> bytes:
    """JSON, integers beyond 64 bits included."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode()


@st.composite
def malformed_json(draw: st.DrawFn) -> bytes:
    """Bodies that claim to be JSON and are not, or are JSON parsers disagree on."""
    document = dumps(draw(json_values))
    kind = draw(
        st.sampled_from(
            ["truncated", "garbage-after", "invalid-utf8", "nan", "big-int", "deep", "unbalanced", "surrogate",
             "duplicate-keys", "comment", "single-quotes", "bom", "bytes"]
        )
    )  # fmt: skip
    if kind == "truncated":
        return document[: draw(st.integers(0, max(0, len(document) - 1)))] or b"{"
    if kind == "garbage-after":
        return document + draw(st.sampled_from([b"x", b"}", b",", b"\x00", b" {}"]))
    if kind == "invalid-utf8":
        return b'{"text": "' + draw(st.sampled_from(INVALID_UTF8)) + b'", "v": ' + document + b"}"
    if kind == "nan":
        return b'{"v": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])) + b"}"
    if kind == "big-int":
        return b'{"v": ' + str(draw(st.integers(2**64, 2**200))).encode() + b"}"
    if kind == "deep":
        depth = draw(st.integers(200, 5000))
        return b"[" * depth + b"]" * depth
    if kind == "unbalanced":
        return b"[" * draw(st.integers(1, 3000))
    if kind == "surrogate":
        return b'{"v": "\\ud800", "w": "\\udfff\\ud800"}'
    if kind == "duplicate-keys":
        return b'{"a": 1, "a": ' + document + b"}"
    if kind == "comment":
        return b"// comment\n" + document
    if kind == "single-quotes":
        return b"{'a': 1}"
    if kind == "bom":
        return b"\xef\xbb\xbf" + document
    return draw(st.binary(min_size=1, max_size=200))

"""``idemproxy.protocol.keys``: "the same request", derived keys, scoped operation ids."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from idemproxy.protocol.errors import InvalidKey
from idemproxy.protocol.keys import Scope, derive_key, fingerprint, operation_id, validate_key

JSON = "application/json"


@dataclass(frozen=True)
class Req:
    """One request as the fingerprint sees it."""

    body: bytes = b'{"title":"printer on fire","priority":1}'
    content_type: str | None = JSON
    method: str = "POST"
    path: str = "/tickets"
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    header_names: tuple[str, ...] = ()

    def fp(self) -> str:
        pairs = list(self.headers)
        if self.content_type is not None:
            pairs.append(("Content-Type", self.content_type))
        headers = CIMultiDictProxy(CIMultiDict(pairs))
        return fingerprint(self.method, self.path, self.query, headers, self.header_names, self.body)


BASE = Req()

SAME = [
    # JSON: canonical form, so key order and whitespace do not matter
    pytest.param(
        Req(body=b'{"a":1,"b":[1,2],"c":{"x":null,"y":true}}'),
        Req(body=b'{"c":{"y":true,"x":null},"b":[1,2],"a":1}'),
        id="json-key-order",
    ),
    pytest.param(
        Req(body=b'{"a":1,"b":"x"}'),
        Req(body=b'  {\n  "a" : 1 ,\r\n\t"b":"x"\n}\n'),
        id="json-whitespace",
    ),
    pytest.param(
        Req(body=b'{"a":"\\u00e9"}'),
        Req(body='{"a":"\u00e9"}'.encode()),
        id="json-escaped-vs-literal-unicode",
    ),
    pytest.param(
        Req(body=b'{"b":1,"a":2}', content_type="application/json; charset=utf-8"),
        Req(body=b'{"a":2,"b":1}', content_type="application/json"),
        id="json-with-charset",
    ),
    pytest.param(
        Req(body=b'{"b":1,"a":2}', content_type="Application/JSON"),
        Req(body=b'{"a":2,"b":1}', content_type="application/json"),
        id="json-content-type-case",
    ),
    pytest.param(
        Req(body=b'{"b":1,"a":2}', content_type="application/merge-patch+json"),
        Req(body=b'{"a":2, "b":1}', content_type="application/merge-patch+json"),
        id="json-suffix-type",
    ),
    # invalid JSON under a JSON content type: the raw bytes are the request
    pytest.param(
        Req(body=b'{"a": 1,', content_type=JSON),
        Req(body=b'{"a": 1,', content_type="text/plain"),
        id="invalid-json-is-raw-bytes",
    ),
    # the query: parameter order does not matter
    pytest.param(Req(query="a=1&b=2"), Req(query="b=2&a=1"), id="query-order"),
    pytest.param(Req(query="q=a%20b"), Req(query="q=a+b"), id="query-space-encodings"),
    pytest.param(Req(query="x=%41"), Req(query="x=A"), id="query-percent-encoding"),
    # the method's case is normalised
    pytest.param(Req(method="post"), Req(method="POST"), id="method-case"),
    # headers that are not configured do not count
    pytest.param(
        Req(headers=(("X-Request-Id", "1"), ("Idempotency-Key", "k1"))),
        Req(headers=(("X-Request-Id", "2"), ("Idempotency-Key", "k2"))),
        id="unconfigured-headers",
    ),
    pytest.param(
        Req(headers=(("X-Tenant", "acme"),), header_names=("x-tenant",)),
        Req(headers=(("x-tenant", "acme"),), header_names=("x-tenant",)),
        id="configured-header-name-case",
    ),
    pytest.param(Req(body=b""), Req(body=b"", content_type=None), id="empty-body"),
]


@pytest.mark.parametrize(("first", "second"), SAME)
def test_same_fingerprint(first: Req, second: Req) -> None:
    assert first.fp() == second.fp()


DIFFERENT = [
    pytest.param(Req(body=b'{"a":1}'), Req(body=b'{"a":2}'), id="json-value"),
    pytest.param(Req(body=b'{"a":1}'), Req(body=b'{"a":"1"}'), id="json-type"),
    pytest.param(Req(body=b'{"a":[1,2]}'), Req(body=b'{"a":[2,1]}'), id="json-array-order"),
    pytest.param(Req(body=b'{"a":1}'), Req(body=b'{"a":1,"b":null}'), id="json-extra-null-key"),
    pytest.param(
        Req(body=b'{"id":18446744073709551616}'),
        Req(body=b'{"id":18446744073709551617}'),
        id="json-integers-beyond-64-bits",
    ),
    pytest.param(
        Req(body=b'{"a":1,"b":2}', content_type="text/plain"),
        Req(body=b'{"b":2,"a":1}', content_type="text/plain"),
        id="non-json-type-raw-bytes",
    ),
    pytest.param(
        Req(body=b'{"a":1, "b":2}', content_type=None),
        Req(body=b'{"a":1,"b":2}', content_type=None),
        id="no-content-type-raw-bytes",
    ),
    pytest.param(
        Req(body=b"a=1&b=2", content_type="application/x-www-form-urlencoded"),
        Req(body=b"b=2&a=1", content_type="application/x-www-form-urlencoded"),
        id="form-body-raw-bytes",
    ),
    pytest.param(
        Req(body=b'{"a": 1,', content_type=JSON),
        Req(body=b'{"a":1,', content_type=JSON),
        id="invalid-json-whitespace-counts",
    ),
    pytest.param(Req(body=b"x"), Req(body=b""), id="body-vs-empty"),
    pytest.param(Req(query="a=1"), Req(query="a=2"), id="query-value"),
    pytest.param(Req(query="a=1"), Req(query="b=1"), id="query-name"),
    pytest.param(Req(query="a=1"), Req(query=""), id="query-vs-none"),
    pytest.param(Req(query="a=1"), Req(query="a=1&a=1"), id="query-repeated"),
    pytest.param(Req(method="POST"), Req(method="PUT"), id="method"),
    pytest.param(Req(path="/tickets"), Req(path="/tickets/"), id="path-trailing-slash"),
    pytest.param(Req(path="/tickets/1"), Req(path="/tickets/2"), id="path"),
    pytest.param(Req(path="/a", query="b"), Req(path="/a?b", query=""), id="path-query-boundary"),
    pytest.param(
        Req(headers=(("X-Tenant", "acme"),), header_names=("x-tenant",)),
        Req(headers=(("X-Tenant", "globex"),), header_names=("x-tenant",)),
        id="configured-header-value",
    ),
    pytest.param(
        Req(headers=(("X-Tenant", "acme"),), header_names=("x-tenant",)),
        Req(headers=(), header_names=("x-tenant",)),
        id="configured-header-missing",
    ),
    pytest.param(
        Req(headers=(("X-Tenant", "acme"),), header_names=("x-tenant",)),
        Req(headers=(("X-Tenant", "acme"),)),
        id="header-configured-vs-not",
    ),
]


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
def test_different_fingerprint(first: Req, second: Req) -> None:
    assert first.fp() != second.fp()


def test_fingerprint_is_stable_sha256_hex() -> None:
    first = BASE.fp()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert replace(BASE).fp() == first


def test_content_type_is_not_itself_fingerprinted() -> None:
    """A JSON body keeps its fingerprint whichever JSON media type announces it."""
    assert Req(content_type="application/json").fp() == Req(content_type="application/vnd.api+json").fp()


# -- derived keys -----------------------------------------------------------------------

FP1 = "1" * 64
FP2 = "2" * 64


def test_derive_key_is_stable_and_valid() -> None:
    key = derive_key("agent-a", "task-1", FP1)
    assert key == derive_key("agent-a", "task-1", FP1)
    assert key.startswith("derived:")
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(("agent-a", "task-1", FP1), ("agent-b", "task-1", FP1), id="caller"),
        pytest.param(("agent-a", "task-1", FP1), ("agent-a", "task-2", FP1), id="task"),
        pytest.param(("agent-a", "task-1", FP1), ("agent-a", None, FP1), id="task-vs-none"),
        pytest.param(("agent-a", "", FP1), ("agent-a", None, FP1), id="empty-task-vs-none"),
        pytest.param(("agent-a", "task-1", FP1), ("agent-a", "task-1", FP2), id="fingerprint"),
        pytest.param(("a", "bc", FP1), ("ab", "c", FP1), id="no-concatenation-ambiguity"),
    ],
)
def test_derive_key_distinct(first: tuple[str, str | None, str], second: tuple[str, str | None, str]) -> None:
    assert derive_key(*first) != derive_key(*second)


# -- key validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k", id="one-char"),
        pytest.param("a" * 255, id="255-chars"),
        pytest.param("550e8400-e29b-41d4-a716-446655440000", id="uuid"),
        pytest.param("order 42/retry:1 ~!@#$%^&*()", id="printable-punctuation-and-space"),
    ],
)
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("a" * 256, "256 characters; at most 255", id="256-chars"),
        pytest.param("a" * 10_000, "at most 255", id="huge"),
        pytest.param("key\x00", "printable ASCII", id="nul"),
        pytest.param("key\n", "printable ASCII", id="newline"),
        pytest.param("key\tx", "printable ASCII", id="tab"),
        pytest.param("key\x7f", "printable ASCII", id="del"),
        pytest.param("cl\u00e9", "printable ASCII", id="non-ascii-latin"),
        pytest.param("\u0441lient", "printable ASCII", id="non-ascii-cyrillic-lookalike"),
        pytest.param("\u00a0", "printable ASCII", id="non-breaking-space"),
    ],
)
def test_validate_key_rejects(key: str, message: str) -> None:
    with pytest.raises(InvalidKey, match=re.escape(message)) as info:
        validate_key(key)
    assert info.value.status == 400


# -- operation ids ----------------------------------------------------------------------

SCOPE = Scope(caller="agent-a", route="tickets", key="k1", task="t1")


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(replace(SCOPE, caller="agent-b"), id="caller"),
        pytest.param(replace(SCOPE, route="mail"), id="route"),
        pytest.param(replace(SCOPE, key="k2"), id="key"),
        pytest.param(replace(SCOPE, caller="agent-a:tickets", route="", key="k1"), id="caller-route-boundary"),
        pytest.param(replace(SCOPE, route="tickets:k1", key=""), id="route-key-boundary"),
    ],
)
def test_operation_id_differs(other: Scope) -> None:
    assert operation_id(other) != operation_id(SCOPE)


def test_operation_id_is_stable() -> None:
    op_id = operation_id(SCOPE)
    assert op_id == operation_id(Scope(caller="agent-a", route="tickets", key="k1", task="t1"))
    assert re.fullmatch(r"[0-9a-f]{32}", op_id)


def test_operation_id_does_not_depend_on_task() -> None:
    """One key names one operation for its caller and route, whichever task retries it."""
    assert operation_id(replace(SCOPE, task="t2")) == operation_id(SCOPE)
    assert operation_id(replace(SCOPE, task=None)) == operation_id(SCOPE)

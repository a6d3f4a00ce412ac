"""Malformed JSON where the proxy reads JSON: ``key_mode: derive`` and MCP routes.

On an HTTP route the proxy does not judge bodies: malformed JSON is the tool's to refuse. What
the proxy owes it is a key: the body is fingerprinted by its exact bytes when it cannot be read
as JSON, so a retry of the same malformed call is the same operation (replayed, one effect)
and never a 500. On an MCP route the proxy reads every POST as JSON-RPC: anything that is not
a well-formed message is refused with a JSON-RPC error before anything is recorded or sent.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from idemproxy.modes.mcp_messages import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR
from tests.hostile.conftest import fuzz
from tests.hostile.stack import Stack
from tests.hostile.strategies import (
    dumps,
    json_non_objects,
    json_non_strings,
    json_scalars,
    json_values,
    malformed_json,
)
from tests.support.wire import Reply, request

pytestmark = pytest.mark.asyncio(loop_scope="module")

_tasks = (f"json-{n}" for n in itertools.count())
JSON = ("Content-Type", "application/json")


@fuzz(60)
@given(body=malformed_json())
async def test_derive_mode_gives_malformed_json_one_operation(stack: Stack, body: bytes) -> None:
    headers = [JSON, ("X-Agent-Task", next(_tasks))]
    before = await stack.mark()
    first = await stack.send(request("POST", "/derive", headers, body))
    again = await stack.send(request("POST", "/derive", headers, body))
    assert first.status == 201, first
    assert again.status == 201, again
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.body == first.body
    assert [seen.body for seen in stack.since(before)] == [body]  # the tool got it once, byte for byte
    assert await stack.records() == before.records + 1
    stack.assert_sound_since(before)


# -- MCP ---------------------------------------------------------------------------------------


def mcp_post(message: bytes, *headers: tuple[str, str]) -> bytes:
    return request("POST", "/mcp", [JSON, ("Accept", "application/json, text/event-stream"), *headers], message)


def call(params: Any, request_id: Any = 1) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})


not_objects: st.SearchStrategy[Any] = st.one_of(json_scalars, st.just([]))
bad_ids: st.SearchStrategy[Any] = st.one_of(
    st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2), st.just({})
)


@st.composite
def refused_messages(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]], int, Any]:
    """``(body, headers, code, id)``: a message the proxy must refuse with JSON-RPC ``code``,
    answering ``id`` (None when it cannot tell which request it answers)."""
    kind = draw(
        st.sampled_from(
            ["not-json", "not-a-message", "wrong-version", "bad-method", "bad-id", "empty-batch",
             "batched-call", "no-name", "bad-arguments", "bad-meta", "bad-key", "header-mismatch"]
        )
    )  # fmt: skip
    event(kind)
    request_id = draw(st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=12)))
    if kind == "not-json":
        return draw(malformed_json().filter(_not_json)), [], PARSE_ERROR, None
    if kind == "not-a-message":
        return dumps(draw(not_objects)), [], INVALID_REQUEST, None
    if kind == "wrong-version":
        version = draw(json_values.filter(lambda value: value != "2.0"))
        return dumps({"jsonrpc": version, "id": 1, "method": "tools/call"}), [], INVALID_REQUEST, None
    if kind == "bad-method":
        method = draw(st.one_of(st.just(""), json_non_strings))
        return dumps({"jsonrpc": "2.0", "id": request_id, "method": method}), [], INVALID_REQUEST, request_id
    if kind == "bad-id":
        return orjson.dumps({"jsonrpc": "2.0", "id": draw(bad_ids), "method": "tools/call"}), [], INVALID_REQUEST, None
    if kind == "empty-batch":
        return b"[]", [], INVALID_REQUEST, None
    if kind == "batched-call":
        batch = [orjson.loads(call({"name": "file", "arguments": {}}, request_id)), {"jsonrpc": "2.0", "method": "x"}]
        return orjson.dumps(draw(st.permutations(batch))), [], INVALID_REQUEST, None
    if kind == "no-name":
        params = draw(
            st.one_of(st.just({}), st.builds(lambda name: {"name": name}, st.one_of(st.just(""), json_non_strings)))
        )
        return call(params, request_id), [], INVALID_PARAMS, request_id
    if kind == "bad-arguments":
        arguments = draw(json_non_objects.filter(lambda value: value is not None))
        return call({"name": "file", "arguments": arguments}, request_id), [], INVALID_PARAMS, request_id
    if kind == "bad-meta":
        meta = draw(json_non_objects.filter(lambda value: value is not None))
        return call({"name": "file", "_meta": meta}, request_id), [], INVALID_PARAMS, request_id
    if kind == "bad-key":
        key = draw(json_non_strings.filter(lambda value: value is not None))
        params = {"name": "file", "_meta": {"io.idemproxy/idempotency-key": key}}
        return call(params, request_id), [], INVALID_PARAMS, request_id
    header = draw(st.sampled_from([("Mcp-Method", "tools/list"), ("Mcp-Name", "another-tool")]))
    return call({"name": "file", "arguments": {}}, request_id), [header], HEADER_MISMATCH, request_id


def _not_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return False


def jsonrpc_error(reply: Reply) -> dict[str, Any]:
    assert reply.content_type == "application/json", reply
    body = reply.json()
    assert isinstance(body, dict), body
    assert body.get("jsonrpc") == "2.0", body
    assert set(body) == {"jsonrpc", "id", "error"}, body
    error: dict[str, Any] = body["error"]
    return {"id": body["id"], **error}


@fuzz(120)
@given(message=refused_messages())
async def test_mcp_refuses_malformed_messages_before_anything_happens(
    stack: Stack, message: tuple[bytes, list[tuple[str, str]], int, Any]
) -> None:
    body, headers, code, request_id = message
    before = await stack.mark()
    reply = await stack.send(mcp_post(body, *headers))
    error = jsonrpc_error(reply)
    assert error["code"] == code, (error, body)
    # A request whose id the proxy could read is answered with 200 (the client hands the error to
    # the waiting call); otherwise the HTTP status itself says the message was refused.
    assert reply.status == (200 if request_id is not None and code == INVALID_PARAMS else 400), reply
    if request_id is not None:
        assert error["id"] == request_id
    await stack.assert_untouched_since(before)
    await stack.assert_serving()


@fuzz(60)
@given(value=st.one_of(json_values, st.binary(max_size=64)), wrap=st.booleans())
async def test_mcp_never_fails_on_any_body(stack: Stack, value: object, wrap: bool) -> None:
    """Arbitrary JSON (or bytes): never a 5xx, and a record only for a call the tool received."""
    if isinstance(value, bytes):
        body = value
    elif wrap:  # a JSON-RPC envelope around arbitrary params
        body = dumps({"jsonrpc": "2.0", "id": next(_tasks), "method": "tools/call", "params": value})
    else:
        body = dumps(value)
    before = await stack.mark()
    reply = await stack.send(mcp_post(body, ("X-Agent-Task", next(_tasks))))
    assert reply.status < 500, reply
    forwarded = stack.since(before)
    assert len(forwarded) <= 1
    recorded = await stack.records() - before.records
    assert recorded <= len(forwarded), "recorded without forwarding"
    if forwarded:
        assert forwarded[0].body == body
    stack.assert_sound_since(before)

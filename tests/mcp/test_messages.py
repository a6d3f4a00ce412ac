"""The MCP mode's decisions without sockets: messages, keys, fingerprints, outcomes, SSE framing, config."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from typing import Any

import orjson
import pytest

from idemproxy.config.mcp import McpConfig, RouteMode, parse_mcp
from idemproxy.config.settings import ConfigError, KeyMode, parse_config
from idemproxy.lifecycle.decisions import AMBIGUOUS, COMPLETED, NOT_APPLIED
from idemproxy.lifecycle.records import RetryClass, State
from idemproxy.modes.mcp_messages import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    PARSE_ERROR,
    PROXY_PROBLEM,
    JsonRpcError,
    Message,
    accepts_only_sse,
    check_mirrored_headers,
    classify_reply,
    classify_status,
    parse_messages,
    problem_error,
    recorded_call,
    response_to,
    with_id,
)
from idemproxy.protocol import DEFAULT_KEY_META
from idemproxy.protocol.errors import FingerprintMismatch, MissingKey
from idemproxy.protocol.exact_json import loads
from idemproxy.wire.sse import SseParser
from tests.conftest import proxy_config

CONFIG = McpConfig(read_only_tools=frozenset({"list_tickets"}))


def message(body: dict[str, Any]) -> Message:
    parsed = parse_messages(orjson.dumps(body))
    assert isinstance(parsed, Message)
    return parsed


def tool_call(request_id: Any = 1, **params: Any) -> Message:
    return message({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})


# -- which calls are operations --------------------------------------------------------------


def test_a_tools_call_is_an_operation_with_its_key_from_meta() -> None:
    call = recorded_call(tool_call(name="create_ticket", arguments={"a": 1}, _meta={DEFAULT_KEY_META: "k"}), CONFIG)
    assert call is not None
    assert (call.request_id, call.name, call.arguments, call.key) == (1, "create_ticket", {"a": 1}, "k")


@pytest.mark.parametrize(
    "body",
    [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_tickets"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "create_ticket"}},  # a notification
        {"jsonrpc": "2.0", "id": 1, "result": {}},  # the client's answer to a server request
    ],
    ids=["read-only-tool", "tools-list", "initialize", "notification", "call-without-id", "response"],
)
def test_everything_else_passes_through(body: dict[str, Any]) -> None:
    assert recorded_call(message(body), CONFIG) is None


def test_the_fingerprint_is_the_tool_and_its_arguments_only() -> None:
    first = recorded_call(
        tool_call(1, name="t", arguments={"a": 1, "b": [1, 2]}, _meta={"progressToken": 1, DEFAULT_KEY_META: "k"}),
        CONFIG,
    )
    reissued = recorded_call(
        tool_call("x", name="t", arguments={"b": [1, 2], "a": 1}, _meta={"progressToken": "p"}), CONFIG
    )
    assert first is not None
    assert reissued is not None
    assert first.fingerprint == reissued.fingerprint
    for other in ({"name": "u", "arguments": {"a": 1, "b": [1, 2]}}, {"name": "t", "arguments": {"a": 1.0}}):
        changed = recorded_call(tool_call(**other), CONFIG)
        assert changed is not None
        assert changed.fingerprint != first.fingerprint


def test_integers_beyond_64_bits_stay_exact() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"n":%d}}}'
    calls = [recorded_call(parse_messages(body % n), CONFIG) for n in (2**70, 2**70 + 1)]  # type: ignore[arg-type]
    assert calls[0] is not None
    assert calls[1] is not None
    assert calls[0].arguments == {"n": 2**70}
    assert calls[0].fingerprint != calls[1].fingerprint
    assert loads(with_id(b'{"jsonrpc":"2.0","id":1,"result":{"n":%d}}' % 2**70, 2)) == {
        "jsonrpc": "2.0",
        "id": 2,
        "result": {"n": 2**70},
    }


@pytest.mark.parametrize(
    "number",
    [2**63 - 1, 2**63, 2**64, -(2**63) - 1, -(2**70), 10**18, 10**19, 10**19 + 7, 99 * 10**40],
)
def test_every_integer_near_and_beyond_64_bits_is_read_exactly(number: int) -> None:
    assert loads(b'{"n":%d,"s":"12345678901234567890"}' % number) == {"n": number, "s": "12345678901234567890"}


def test_digit_runs_broken_by_other_bytes_are_no_long_integer() -> None:
    # 18 digits, a dot, 18 digits: no integer beyond 64 bits, so nothing to keep exact.
    assert loads(b'{"x":123456789012345678.123456789012345678}') == {"x": 123456789012345678.123456789012345678}
    assert loads(b"[123456789012345678, 123456789012345678]") == [123456789012345678] * 2


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"name": ""},
        {"name": "t", "arguments": [1]},
        {"name": "t", "_meta": []},
        {"name": "t", "_meta": {DEFAULT_KEY_META: 7}},
    ],
    ids=["no-name", "empty-name", "arguments-not-object", "meta-not-object", "key-not-string"],
)
def test_malformed_tool_calls_are_invalid_params(params: dict[str, Any]) -> None:
    with pytest.raises(JsonRpcError) as refused:
        recorded_call(tool_call(9, **params), CONFIG)
    assert (refused.value.code, refused.value.request_id, refused.value.status) == (INVALID_PARAMS, 9, 200)


def test_hostile_nesting_is_refused_not_crashed_on() -> None:
    deep = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":%s1%s}}}'
    with pytest.raises(JsonRpcError) as refused:
        recorded_call(parse_messages(deep % (b"[" * 1020, b"]" * 1020)), CONFIG)  # type: ignore[arg-type]
    assert refused.value.code == INVALID_PARAMS
    with pytest.raises(JsonRpcError) as unparsed:  # the exact-integer reader has a depth limit too
        parse_messages(b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000)
    assert unparsed.value.code == PARSE_ERROR


# -- mirrored headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({}, False),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "create_ticket"}, False),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?Y3JlYXRlX3RpY2tldA==?="}, False),
        ({"Mcp-Method": "tools/list"}, True),
        ({"Mcp-Name": "list_tickets"}, True),
        ({"Mcp-Name": "=?base64?bGlzdF90aWNrZXRz?="}, True),
        ({"Mcp-Name": "=?base64?not base64?="}, True),
    ],
)
def test_mirrored_headers_must_match_the_body(headers: dict[str, str], refused: bool) -> None:
    call = tool_call(3, name="create_ticket")
    if not refused:
        check_mirrored_headers(headers, call)
        return
    with pytest.raises(JsonRpcError) as error:
        check_mirrored_headers(headers, call)
    assert (error.value.code, error.value.request_id, error.value.status) == (HEADER_MISMATCH, 3, 400)


def test_mcp_name_mirrors_the_uri_of_a_resource_read() -> None:
    read = message({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///a"}})
    check_mirrored_headers({"Mcp-Method": "resources/read", "Mcp-Name": "file:///a"}, read)
    with pytest.raises(JsonRpcError):
        check_mirrored_headers({"Mcp-Name": "file:///b"}, read)


# -- what the server's answer means ------------------------------------------------------------------


def routed(**route: Any) -> Any:
    return proxy_config("http://127.0.0.1:1", mode="mcp", **route).routes[0]


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (200, None),
        (202, None),
        (400, State.RELEASED),  # the transport refused the message: no session, bad header
        (404, State.RELEASED),  # session expired
        (429, State.RELEASED),
        (500, State.UNKNOWN),
        (501, State.UNKNOWN),
        (503, State.RELEASED),
        (504, State.UNKNOWN),
    ],
)
def test_http_statuses(status: int, state: State | None) -> None:
    outcome = classify_status(status, routed())
    assert (outcome.state if outcome else None) is state


def test_the_routes_status_lists_still_apply() -> None:
    route = routed(not_applied_statuses=[409], ambiguous_statuses=[404])
    assert classify_status(409, route) == NOT_APPLIED
    outcome = classify_status(404, route)
    assert outcome is not None
    assert outcome.state is State.UNKNOWN


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ({"result": {"content": []}}, COMPLETED),
        ({"result": {"content": [], "isError": True}}, COMPLETED),  # the tool ran and answered
        ({"result": {"resultType": "incomplete", "inputRequests": {}}}, NOT_APPLIED),  # asks for input first
        ({"error": {"code": -32602, "message": "Unknown tool"}}, COMPLETED),  # refused before any tool ran
        ({"error": {"code": -32601, "message": "Method not found"}}, COMPLETED),
        ({"error": {"code": -32603, "message": "Internal error"}}, AMBIGUOUS),
        ({"error": {"code": 0, "message": "handler raised"}}, AMBIGUOUS),
        ({"error": "not an object"}, AMBIGUOUS),
        (None, AMBIGUOUS),
    ],
)
def test_json_rpc_answers(reply: dict[str, Any] | None, outcome: Any) -> None:
    assert classify_reply(reply) == outcome
    assert AMBIGUOUS.retry_class is RetryClass.AMBIGUOUS_STATUS


@pytest.mark.parametrize(
    ("data", "matches"),
    [
        (b'{"jsonrpc":"2.0","id":5,"result":{}}', True),
        (b'{"jsonrpc":"2.0","id":5,"error":{"code":-1,"message":"x"}}', True),
        (b'{"jsonrpc":"2.0","id":"5","result":{}}', False),
        (b'{"jsonrpc":"2.0","id":6,"result":{}}', False),
        (b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":5}}', False),
        (b'{"jsonrpc":"2.0","id":5,"method":"sampling/createMessage","params":{}}', False),
        (b"not json", False),
    ],
)
def test_only_the_response_to_the_call_is_its_answer(data: bytes, matches: bool) -> None:
    assert (response_to(data, 5) is not None) is matches


def test_a_replay_gets_the_callers_id() -> None:
    stored = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}]}}'
    assert orjson.loads(with_id(stored, "call-b")) == {
        "jsonrpc": "2.0",
        "id": "call-b",
        "result": {"content": [{"type": "text", "text": "ok"}]},
    }


def test_a_reconciled_answer_that_is_not_json_rpc_becomes_the_tools_result() -> None:
    assert orjson.loads(with_id(b'{"id": 42, "title": "disk"}', 3)) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"content": [{"type": "text", "text": '{"id": 42, "title": "disk"}'}], "isError": False},
    }


def test_problems_become_json_rpc_errors_with_the_problem_as_data() -> None:
    error = problem_error(FingerprintMismatch("other arguments", operation="op-1"))
    assert error["code"] == PROXY_PROBLEM
    assert error["data"]["type"] == "urn:idemproxy:problem:fingerprint-mismatch"
    assert error["data"]["operation"] == "op-1"
    assert problem_error(MissingKey("no key"))["code"] == INVALID_PARAMS


@pytest.mark.parametrize(
    ("accept", "only_sse"),
    [("application/json, text/event-stream", False), ("text/event-stream", True), ("*/*", False), ("", False)],
)
def test_a_replay_is_json_unless_the_client_takes_only_sse(accept: str, only_sse: bool) -> None:
    assert accepts_only_sse(accept) is only_sse


# -- SSE framing ----------------------------------------------------------------------------------------


def test_sse_events_survive_any_chunking() -> None:
    big = b"y" * 500
    stream = (
        b': keep-alive\r\n\r\nevent: message\r\nid: 1\r\ndata: {"a":1}\r\n\r\n'
        b"data: line1\ndata: line2\n\nretry: 10\rdata: x\r\r"
        b"data: " + big + b"\n\n" + b"id: " + b"z" * 1000 + b"\ndata: after\n\n"
    )
    rng = random.Random(7)
    for _ in range(200):
        parser = SseParser(max_data=100)
        events = []
        position = 0
        while position < len(stream):
            size = rng.randint(1, 40)
            events += parser.feed(stream[position : position + size])
            position += size
        assert [(event.event, event.data, event.size) for event in events] == [
            ("message", b'{"a":1}', 7),
            ("message", b"line1\nline2", 11),
            ("message", b"x", 1),
            ("message", None, 500),  # too large to keep: size and hash only
            ("message", b"after", 5),
        ]
        assert events[3].sha256 == hashlib.sha256(big).hexdigest()


# -- configuration --------------------------------------------------------------------------------------


def test_routes_default_to_http_mode() -> None:
    route = proxy_config("http://127.0.0.1:1").routes[0]
    assert route.mode is RouteMode.HTTP
    assert route.mcp == McpConfig()


def test_an_mcp_route() -> None:
    route = proxy_config(
        "http://127.0.0.1:1",
        mode="mcp",
        key_mode="derive",
        mcp={"read_only_tools": ["list_tickets", "search"], "key_meta": "com.example/op-key"},
    ).routes[0]
    assert route.mode is RouteMode.MCP
    assert route.key_mode is KeyMode.DERIVE
    assert route.mcp == McpConfig(frozenset({"list_tickets", "search"}), "com.example/op-key")


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"mode": "grpc"}, "routes[0].mode: expected one of http, mcp, got str 'grpc'"),
        ({"mcp": ["x"]}, "routes[0].mcp: expected a mapping"),
        ({"mcp": {"read_only": []}}, "read_only: unknown key; did you mean 'read_only_tools'?"),
        ({"mcp": {"read_only_tools": "list_tickets"}}, "read_only_tools: expected a list of tool names"),
        ({"mcp": {"read_only_tools": [""]}}, "read_only_tools: expected a list of tool names"),
        ({"mcp": {"key_meta": "has space"}}, "key_meta: expected an MCP _meta key"),
        ({"mcp": {"key_meta": "io.modelcontextprotocol/key"}}, "key_meta: the prefix of"),
        ({"mcp": {"key_meta": "dev.mcp.tools/key"}}, "reserved for MCP itself"),
    ],
)
def test_invalid_mcp_settings_are_named(route: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1", **route}]})
    assert any(problem in line for line in error.value.problems), error.value.problems


def test_meta_keys_without_a_prefix_or_under_other_prefixes_are_fine() -> None:
    assert parse_mcp({"key_meta": "idempotency-key"}).key_meta == "idempotency-key"
    assert parse_mcp({"key_meta": "com.example.mcp/key"}).key_meta == "com.example.mcp/key"


def test_the_proxy_and_the_mcp_adapter_never_import_the_mcp_sdk() -> None:
    code = (
        "import sys, idemproxy.app, idemproxy.modes.mcp, idemproxy.adapters.mcp; "
        "print(sorted(name for name in sys.modules if name == 'mcp' or name.startswith('mcp.')))"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"

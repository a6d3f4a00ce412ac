"""The MCP route mode end to end: the real ``mcp`` client, the real proxy, real FastMCP servers.

Each tool call's side effect is counted by the server (``Tickets``); the invariant is the
proxy's: one effect per operation, and every caller of it gets the same answer under its
own JSON-RPC id and session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import State
from idemproxy.modes.mcp_messages import HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, PROXY_PROBLEM
from idemproxy.protocol.keys import Scope, operation_id, tool_call_key
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config
from tests.mcp.conftest import McpProxyFactory
from tests.mcp.ticket_server import Tickets

KEY_META = "io.idemproxy/idempotency-key"
JSON_AND_SSE = "application/json, text/event-stream"
PROTOCOL = "2025-06-18"
#: The run a derived key is scoped by (``key_mode: derive`` refuses calls without one).
RUN = {"X-Agent-Task": "run-1"}


@asynccontextmanager
async def mcp_session(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized session of the SDK's own client."""
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10.0)) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def call(request_id: int | str, name: str, arguments: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if key is not None:
        params["_meta"] = {KEY_META: key, "progressToken": f"progress-{request_id}"}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


class RawSession:
    """Plain HTTP on the MCP endpoint, to see ids, headers and bodies on the wire."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.session_id: str | None = None

    async def initialize(self) -> RawSession:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
        }
        response = await self.post(hello)
        assert response.status_code == 200
        self.session_id = response.headers["Mcp-Session-Id"]
        initialized = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert initialized.status_code == 202
        return self

    async def post(self, message: Any, **headers: str) -> httpx.Response:
        sent = {"Accept": JSON_AND_SSE, "Content-Type": "application/json", "MCP-Protocol-Version": PROTOCOL}
        if self.session_id is not None:
            sent["Mcp-Session-Id"] = self.session_id
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        content = message if isinstance(message, bytes) else orjson.dumps(message)
        return await self.http.post(self.url, content=content, headers=sent)


def reply_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response in ``response``: its body, or the last message of its SSE stream."""
    if response.headers["Content-Type"].startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        messages = [orjson.loads(event) for event in events if event]
        return [message for message in messages if "id" in message and "method" not in message][-1]
    reply: dict[str, Any] = response.json()
    return reply


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        yield client


# -- recorded calls ---------------------------------------------------------------------------


async def test_the_same_key_in_meta_files_one_ticket(mcp_proxy: McpProxyFactory, tickets: Tickets) -> None:
    url = await mcp_proxy()
    async with mcp_session(url) as session:
        first = await session.call_tool("create_ticket", {"title": "disk full"}, meta={KEY_META: "ticket-1"})
        again = await session.call_tool("create_ticket", {"title": "disk full"}, meta={KEY_META: "ticket-1"})
    assert first.structuredContent == again.structuredContent == {"id": 1, "title": "disk full"}
    assert tickets.titled("disk full") == 1


async def test_a_replay_carries_the_callers_own_id_and_session(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    url = await mcp_proxy()
    first_session = await RawSession(http, url).initialize()
    other_session = await RawSession(http, url).initialize()
    first = await first_session.post(call(7, "create_ticket", {"title": "disk"}, key="ticket-2"))
    assert first.headers["Content-Type"].startswith("text/event-stream")  # the server streams its answer
    replay = await other_session.post(call("call-b", "create_ticket", {"title": "disk"}, key="ticket-2"))

    assert replay.status_code == 200
    assert replay.headers["Content-Type"].startswith("application/json")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Idempotency-Operation"] == first.headers["Idempotency-Operation"]
    assert replay.headers["Mcp-Session-Id"] == other_session.session_id
    assert first_session.session_id not in replay.text
    stored, replayed = reply_of(first), reply_of(replay)
    assert stored["id"] == 7
    assert replayed["id"] == "call-b"
    assert replayed["result"] == stored["result"]
    assert tickets.titled("disk") == 1


async def test_a_client_that_accepts_only_sse_gets_the_replay_as_one_event(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    raw = await RawSession(http, await mcp_proxy()).initialize()
    await raw.post(call(1, "create_ticket", {"title": "sse"}, key="ticket-sse"))
    replay = await raw.post(call(2, "create_ticket", {"title": "sse"}, key="ticket-sse"), Accept="text/event-stream")
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    assert replay.text.startswith("event: message\ndata: ")
    assert reply_of(replay)["id"] == 2
    assert tickets.titled("sse") == 1


async def test_a_reissued_call_in_a_new_session_is_the_same_derived_operation(
    mcp_proxy: McpProxyFactory, tickets: Tickets, store: Store
) -> None:
    url = await mcp_proxy()
    task = {"X-Agent-Task": "triage-42"}
    async with mcp_session(url, task) as session:
        first = await session.call_tool("create_ticket", {"title": "db-1", "steps": 0})
    async with mcp_session(url, task) as restarted:  # new session, JSON-RPC ids start over
        again = await restarted.call_tool("create_ticket", {"steps": 0, "title": "db-1"})
    assert again.structuredContent == first.structuredContent
    assert tickets.titled("db-1") == 1
    key = tool_call_key("triage-42", "create_ticket", {"title": "db-1", "steps": 0})
    record = await store.get(operation_id(Scope("anonymous", "root", key)))
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.scope.task == "triage-42"


async def test_a_caller_that_hangs_up_on_its_answer_leaves_the_outcome_recorded(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient, store: Store
) -> None:
    """MCP clients close the stream as soon as the response event is in: that must not stop
    the proxy recording it (the request is not cancelled), so a retry replays it."""
    url = await mcp_proxy()
    session = await RawSession(http, url).initialize()
    sent = {"Accept": JSON_AND_SSE, "Content-Type": "application/json", "MCP-Protocol-Version": PROTOCOL}
    assert session.session_id is not None
    sent["Mcp-Session-Id"] = session.session_id
    message = orjson.dumps(call(5, "create_ticket", {"title": "hung up"}, key="ticket-hangup"))
    async with http.stream("POST", url, content=message, headers=sent) as streamed:
        op_id = streamed.headers["Idempotency-Operation"]
        async for line in streamed.aiter_lines():
            if line.startswith("data: ") and '"result"' in line:
                break  # leaving the block closes the connection mid-stream
    record = await store.wait_for(
        op_id, time.monotonic() + 10, lambda current: current is not None and current.state is State.COMPLETED
    )
    assert record is not None
    assert record.state is State.COMPLETED
    again = await session.post(call(6, "create_ticket", {"title": "hung up"}, key="ticket-hangup"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert reply_of(again)["result"]["structuredContent"] == {"id": 1, "title": "hung up"}
    assert tickets.titled("hung up") == 1


async def test_a_key_reused_with_other_arguments_is_a_json_rpc_error(
    mcp_proxy: McpProxyFactory, tickets: Tickets
) -> None:
    async with mcp_session(await mcp_proxy()) as session:
        await session.call_tool("create_ticket", {"title": "first"}, meta={KEY_META: "ticket-3"})
        with pytest.raises(McpError) as refused:
            await session.call_tool("create_ticket", {"title": "second"}, meta={KEY_META: "ticket-3"})
    assert refused.value.error.code == PROXY_PROBLEM
    assert isinstance(refused.value.error.data, dict)
    assert refused.value.error.data["type"] == "urn:idemproxy:problem:fingerprint-mismatch"
    assert refused.value.error.data["status"] == 422
    assert "another tool or with other arguments" in refused.value.error.message
    assert tickets.titled("first") == 1
    assert tickets.titled("second") == 0


async def test_progress_reaches_the_first_caller_and_never_a_replay(
    mcp_proxy: McpProxyFactory, tickets: Tickets
) -> None:
    seen: list[list[float]] = [[], []]

    def progress(into: list[float]) -> Any:
        async def report(progress: float, total: float | None, message: str | None) -> None:
            into.append(progress)

        return report

    async with mcp_session(await mcp_proxy(), RUN) as session:
        arguments = {"title": "slow", "steps": 3}
        first = await session.call_tool("create_ticket", arguments, progress_callback=progress(seen[0]))
        again = await session.call_tool("create_ticket", arguments, progress_callback=progress(seen[1]))
    assert seen == [[1.0, 2.0, 3.0], []]
    assert again.structuredContent == first.structuredContent
    assert tickets.titled("slow") == 1


async def test_concurrent_duplicates_wait_for_the_first_answer(mcp_proxy: McpProxyFactory, tickets: Tickets) -> None:
    url = await mcp_proxy()
    async with mcp_session(url) as one, mcp_session(url) as two:
        arguments = {"title": "race", "delay": 0.3}
        results = await asyncio.gather(
            one.call_tool("create_ticket", arguments, meta={KEY_META: "ticket-race"}),
            two.call_tool("create_ticket", arguments, meta={KEY_META: "ticket-race"}),
        )
    assert results[0].structuredContent == results[1].structuredContent
    assert tickets.titled("race") == 1


async def test_an_error_result_from_the_tool_is_its_answer(mcp_proxy: McpProxyFactory, tickets: Tickets) -> None:
    async with mcp_session(await mcp_proxy(), RUN) as session:
        first = await session.call_tool("explode", {"reason": "quota"})
        again = await session.call_tool("explode", {"reason": "quota"})
    assert first.isError
    assert again.isError
    assert again.content == first.content
    assert tickets.explosions == 1


async def test_read_only_tools_pass_through(mcp_proxy: McpProxyFactory, tickets: Tickets) -> None:
    async with mcp_session(await mcp_proxy(mcp={"read_only_tools": ["list_tickets"]})) as session:
        await session.call_tool("list_tickets", {}, meta={KEY_META: "same-key"})
        await session.call_tool("list_tickets", {}, meta={KEY_META: "same-key"})
    assert tickets.reads == 2


async def test_tools_not_marked_read_only_are_recorded(mcp_proxy: McpProxyFactory, tickets: Tickets) -> None:
    async with mcp_session(await mcp_proxy(), RUN) as session:
        await session.call_tool("list_tickets", {})
        await session.call_tool("list_tickets", {})
    assert tickets.reads == 1


async def test_a_message_the_server_refuses_leaves_the_operation_open(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    url = await mcp_proxy()
    stale = RawSession(http, url)
    stale.session_id = "expired-session"
    refused = await stale.post(call(1, "create_ticket", {"title": "later"}, key="ticket-4"))
    assert refused.status_code == 404  # the server's own answer, relayed
    fresh = await RawSession(http, url).initialize()
    done = await fresh.post(call(2, "create_ticket", {"title": "later"}, key="ticket-4"))
    assert reply_of(done)["result"]["structuredContent"] == {"id": 1, "title": "later"}
    assert tickets.titled("later") == 1


async def test_keys_are_required_where_the_route_says_so(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    url = await mcp_proxy(key_mode="require")
    async with mcp_session(url) as session:
        with pytest.raises(McpError) as refused:
            await session.call_tool("create_ticket", {"title": "keyless"})
    assert refused.value.error.code == INVALID_PARAMS
    assert isinstance(refused.value.error.data, dict)
    assert refused.value.error.data["type"] == "urn:idemproxy:problem:missing-idempotency-key"
    assert tickets.titled("keyless") == 0
    raw = await RawSession(http, url).initialize()
    for request_id in (1, 2):  # the Idempotency-Key header works too
        await raw.post(call(request_id, "create_ticket", {"title": "header"}), Idempotency_Key="ticket-5")
    assert tickets.titled("header") == 1


@pytest.mark.parametrize("server", ["session", "sessionless"])
async def test_an_answer_too_large_to_keep_is_not_repeated(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient, server: str
) -> None:
    raw = RawSession(http, await mcp_proxy(server, max_stored_response="64B"))
    if server == "session":
        await raw.initialize()
    first = await raw.post(call(1, "create_ticket", {"title": "a long title " * 10}, key="ticket-big"))
    again = await raw.post(call(2, "create_ticket", {"title": "a long title " * 10}, key="ticket-big"))
    assert reply_of(first)["result"]["structuredContent"]["id"] == 1  # the first caller gets it all
    assert again.json()["error"]["data"]["type"] == "urn:idemproxy:problem:response-not-stored"
    assert again.json()["id"] == 2
    assert tickets.titled("a long title " * 10) == 1


async def test_an_unreachable_ledger_refuses_the_call_as_a_json_rpc_error(
    aiohttp_client: Any, mcp_servers: dict[str, str], tickets: Tickets, http: httpx.AsyncClient
) -> None:
    store = open_store(StoreConfig(url="redis://127.0.0.1:1/0", socket_timeout_s=0.2))  # nothing listens there
    await store.start()
    try:
        config = proxy_config(mcp_servers["sessionless"], mode="mcp", key_mode="derive")
        client = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
        raw = RawSession(http, str(client.make_url("/mcp")))
        listed = await raw.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        refused = await raw.post(call(2, "create_ticket", {"title": "no ledger"}), X_Agent_Task="run-1")
    finally:
        await store.close()
    assert listed.status_code == 200  # passes through: nothing to record
    assert refused.status_code == 200  # the client hands the error to the waiting call
    assert refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert refused.json()["id"] == 2
    assert error["code"] == PROXY_PROBLEM
    assert error["data"]["type"] == "urn:idemproxy:problem:ledger-unavailable"
    assert tickets.titled("no ledger") == 0


# -- the sessionless generation ------------------------------------------------------------------


def sessionless_call(request_id: int, title: str) -> dict[str, Any]:
    message = call(request_id, "create_ticket", {"title": title})
    message["params"]["_meta"] = {
        KEY_META: f"sessionless-{title}",
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientInfo": {"name": f"client-{request_id}", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return message


async def test_sessionless_calls_with_mirrored_headers(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless"))
    mirrored = {"Mcp_Method": "tools/call", "Mcp_Name": "create_ticket"}
    first = await raw.post(sessionless_call(1, "stateless"), **mirrored)
    again = await raw.post(sessionless_call(2, "stateless"), **mirrored)
    assert first.headers["Content-Type"].startswith("application/json")  # this server answers JSON
    assert "Mcp-Session-Id" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert reply_of(first)["id"] == 1
    assert reply_of(again)["id"] == 2
    assert reply_of(again)["result"] == reply_of(first)["result"]
    assert tickets.titled("stateless") == 1


@pytest.mark.parametrize(
    "headers",
    [{"Mcp_Method": "tools/list"}, {"Mcp_Method": "tools/call", "Mcp_Name": "list_tickets"}],
    ids=["method", "name"],
)
async def test_mirrored_headers_that_contradict_the_body_are_refused(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless"))
    refused = await raw.post(sessionless_call(1, "smuggled"), **headers)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == HEADER_MISMATCH
    assert refused.json()["id"] == 1
    assert tickets.titled("smuggled") == 0


# -- malformed messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "request_id"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"', 400, PARSE_ERROR, None),
        (b"\xff\xfe", 400, PARSE_ERROR, None),
        (b'"tools/call"', 400, INVALID_REQUEST, None),
        (b'{"jsonrpc": "1.0", "id": 3, "method": "tools/call"}', 400, INVALID_REQUEST, 3),
        (b'{"jsonrpc": "2.0", "id": 4, "method": 42}', 400, INVALID_REQUEST, 4),
        (b'{"jsonrpc": "2.0", "id": null, "method": "tools/call"}', 400, INVALID_REQUEST, None),
        (b'{"jsonrpc": "2.0", "id": 5}', 400, INVALID_REQUEST, None),
        (b"[]", 400, INVALID_REQUEST, None),
        (
            b'[{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "create_ticket",'
            b' "arguments": {"title": "batched"}}}]',
            400,
            INVALID_REQUEST,
            None,
        ),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {}}', 200, INVALID_PARAMS, 7),
        (
            b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "create_ticket",'
            b' "arguments": ["batched"]}}',
            200,
            INVALID_PARAMS,
            8,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "create_ticket",'
            b' "arguments": {"title": "x"}, "_meta": {"io.idemproxy/idempotency-key": ""}}}',
            200,
            INVALID_PARAMS,
            9,
        ),
    ],
    ids=[
        "truncated",
        "not-utf8",
        "not-an-object",
        "wrong-version",
        "method-not-a-string",
        "null-request-id",
        "neither-request-nor-response",
        "empty-batch",
        "batch-with-a-recorded-call",
        "call-without-a-name",
        "arguments-not-an-object",
        "empty-key",
    ],
)
async def test_malformed_json_rpc_gets_a_json_rpc_error(
    mcp_proxy: McpProxyFactory,
    tickets: Tickets,
    http: httpx.AsyncClient,
    body: bytes,
    status: int,
    code: int,
    request_id: int | None,
) -> None:
    refused = await RawSession(http, await mcp_proxy()).post(body)
    assert refused.status_code == status
    assert refused.headers["Content-Type"].startswith("application/json")
    reply = refused.json()
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == request_id
    assert reply["error"]["code"] == code
    assert tickets.filed == []

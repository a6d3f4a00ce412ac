"""The MCP route's side of issue 22: a derived key needs the run (``X-Agent-Task``) unless
the route opts into caller scope, keys that are dot segments and idemproxy's headers sent
twice are refused, all as JSON-RPC errors, and the server files nothing it should not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from idemproxy.modes.mcp_messages import INVALID_PARAMS
from idemproxy.store import Store
from idemproxy.store.base import OpsQuery
from tests.mcp.conftest import McpProxyFactory
from tests.mcp.test_mcp_route import JSON_AND_SSE, PROTOCOL, RawSession, call, reply_of
from tests.mcp.ticket_server import Tickets


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        yield client


def refusal(response: httpx.Response, request_id: int, slug: str) -> dict[str, Any]:
    """The JSON-RPC error answering ``request_id`` (HTTP 200: the client hands it to the waiting call)."""
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["id"] == request_id
    error: dict[str, Any] = reply["error"]
    assert error["code"] == INVALID_PARAMS
    assert error["data"]["type"] == f"urn:idemproxy:problem:{slug}"
    return error


async def test_a_derived_call_without_a_task_is_refused_with_a_json_rpc_error(
    mcp_proxy: McpProxyFactory, tickets: Tickets, store: Store, http: httpx.AsyncClient
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless"))  # key_mode: derive, derive_scope: task
    # Two runs file the same ticket: before, the second got the first one's ticket.
    first = await raw.post(call(1, "create_ticket", {"title": "disk full"}))
    second = await raw.post(call(2, "create_ticket", {"title": "disk full"}))

    for request_id, response in ((1, first), (2, second)):
        error = refusal(response, request_id, "missing-task")
        assert error["data"]["header"] == "X-Agent-Task"
        assert "X-Agent-Task" in error["message"]
    assert await store.query(OpsQuery()) == []
    assert tickets.titled("disk full") == 0


async def test_with_the_run_named_the_same_call_is_one_operation_per_run(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless"))
    run_a = [await raw.post(call(n, "create_ticket", {"title": "db"}), X_Agent_Task="run-a") for n in (1, 2)]
    run_b = await raw.post(call(3, "create_ticket", {"title": "db"}), X_Agent_Task="run-b")

    assert reply_of(run_a[1])["result"] == reply_of(run_a[0])["result"]
    assert run_a[1].headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in run_b.headers
    assert tickets.titled("db") == 2  # one per run


async def test_derive_scope_caller_opts_into_taskless_derived_keys(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless", derive_scope="caller"))
    first = await raw.post(call(1, "create_ticket", {"title": "nightly"}))
    again = await raw.post(call(2, "create_ticket", {"title": "nightly"}))

    assert reply_of(first)["result"]["structuredContent"] == {"id": 1, "title": "nightly"}
    assert reply_of(again)["result"] == reply_of(first)["result"]
    assert reply_of(again)["id"] == 2
    assert again.headers["Idempotent-Replayed"] == "true"
    assert tickets.titled("nightly") == 1


@pytest.mark.parametrize("key", [".", ".."])
async def test_a_dot_segment_key_in_meta_is_refused(
    mcp_proxy: McpProxyFactory, tickets: Tickets, http: httpx.AsyncClient, key: str
) -> None:
    raw = RawSession(http, await mcp_proxy("sessionless"))
    response = await raw.post(call(1, "create_ticket", {"title": "dots"}, key=key), X_Agent_Task="run-1")
    refusal(response, 1, "invalid-idempotency-key")
    assert tickets.titled("dots") == 0


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")], id="two-keys"),
        pytest.param([("X-Agent-Task", "run-1"), ("X-Agent-Task", "run-2")], id="two-tasks"),
        pytest.param([("X-Agent-Task", "run-1"), ("Connection", "X-Agent-Task")], id="connection-task"),
        pytest.param([("Idempotency-Key", "k-1"), ("Connection", "Idempotency-Key")], id="connection-key"),
    ],
)
async def test_an_own_header_sent_twice_or_as_hop_by_hop_is_refused(
    mcp_proxy: McpProxyFactory, tickets: Tickets, store: Store, http: httpx.AsyncClient, extra: list[tuple[str, str]]
) -> None:
    url = await mcp_proxy("sessionless")
    headers = [("Accept", JSON_AND_SSE), ("Content-Type", "application/json"), ("MCP-Protocol-Version", PROTOCOL)]
    message = orjson.dumps(call(7, "create_ticket", {"title": "smuggled"}))
    response = await http.post(url, content=message, headers=httpx.Headers([*headers, *extra]))

    refusal(response, 7, "ambiguous-header")
    assert await store.query(OpsQuery()) == []
    assert tickets.titled("smuggled") == 0

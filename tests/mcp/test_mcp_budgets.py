"""Budgets on an MCP route: a recorded ``tools/call`` is charged like any side-effecting
request, and a refusal reaches the MCP client as a JSON-RPC error it can read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import parse_config
from idemproxy.modes.mcp_messages import PROXY_PROBLEM
from idemproxy.store import Store
from tests.mcp.test_mcp_route import RawSession, call, reply_of
from tests.mcp.ticket_server import Tickets


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        yield client


async def test_tool_calls_are_budgeted_and_replays_are_not(
    aiohttp_client: Any, store: Store, mcp_servers: dict[str, str], tickets: Tickets, http: httpx.AsyncClient
) -> None:
    config = parse_config(
        {
            "budgets": {"task": {"calls": "1/1m"}},
            "routes": [{"prefix": "/", "upstream": mcp_servers["session"], "mode": "mcp", "key_mode": "derive"}],
        }
    )
    client = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
    raw = await RawSession(http, str(client.make_url("/mcp"))).initialize()
    task = {"X_Agent_Task": "triage-7"}

    first = await raw.post(call(1, "create_ticket", {"title": "budgeted"}), **task)
    listed = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, **task)  # passes through
    refused = await raw.post(call(3, "create_ticket", {"title": "over budget"}), **task)
    replayed = await raw.post(call(4, "create_ticket", {"title": "budgeted"}), **task)

    assert reply_of(first)["result"]["structuredContent"]["title"] == "budgeted"
    assert listed.status_code == 200
    assert refused.status_code == 200  # the client hands the error to the waiting call
    assert refused.json()["id"] == 3
    error = refused.json()["error"]
    assert error["code"] == PROXY_PROBLEM
    assert error["data"]["type"] == "urn:idemproxy:problem:budget-exceeded"
    assert (error["data"]["budget"], error["data"]["task"], error["data"]["limit"]) == ("task-calls", "triage-7", 1)
    assert refused.headers["Retry-After"] == str(error["data"]["retry_after"])
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert reply_of(replayed)["id"] == 4
    assert (tickets.titled("budgeted"), tickets.titled("over budget")) == (1, 0)

"""Fixtures for the MCP tests: real FastMCP servers on loopback, the real proxy in front.

Two servers share one ``Tickets`` record of side effects: ``session`` (session-based,
answers tools/call with an SSE stream) and ``sessionless`` (stateless, answers
``application/json``), covering both Streamable HTTP generations and both answer forms.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from idemproxy.app import build_proxy_app
from idemproxy.store import Store
from tests.conftest import proxy_config
from tests.mcp.ticket_server import ServerThread, Tickets, ticket_server

McpProxyFactory = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def ticket_record() -> Tickets:
    return Tickets()


@pytest.fixture(scope="session")
def mcp_servers(ticket_record: Tickets) -> Iterator[dict[str, str]]:
    servers = {
        "session": ServerThread(
            ticket_server(ticket_record, stateless=False, json_response=False).streamable_http_app()
        ),
        "sessionless": ServerThread(
            ticket_server(ticket_record, stateless=True, json_response=True).streamable_http_app()
        ),
    }
    for server in servers.values():
        server.start()
    yield {name: server.url for name, server in servers.items()}
    for server in servers.values():
        server.stop()


@pytest.fixture
def tickets(ticket_record: Tickets) -> Tickets:
    ticket_record.reset()
    return ticket_record


@pytest.fixture
def store_url(redis_url: str) -> str:
    """The MCP mode does not depend on the store; the store contract suite covers both."""
    return redis_url


@pytest.fixture
def mcp_proxy(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], store: Store, mcp_servers: dict[str, str]
) -> McpProxyFactory:
    """``await mcp_proxy(server="session", **route_policy)``: the MCP endpoint URL through a real proxy."""

    async def factory(server: str = "session", **route: Any) -> str:
        config = proxy_config(mcp_servers[server], mode="mcp", **{"key_mode": "derive", **route})
        client = await aiohttp_client(build_proxy_app(config, store))
        return str(client.make_url("/mcp"))

    return factory

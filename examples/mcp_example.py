"""An MCP server behind idemproxy: a re-proposed and a resumed tool call file one ticket, not three.

    pip install 'idemproxy[autogen]'
    python examples/mcp_example.py

No API key is needed. In this process, on free loopback ports: an MCP ticket
server (the ``mcp`` SDK's FastMCP over Streamable HTTP, not idempotent: every
``create_ticket`` files a ticket), idemproxy in front of it with an MCP route
(embedded SQLite ledger), and idemproxy's admin listener.

1. An AutoGen agent, played by ``ReplayChatCompletionClient``, files the ticket
   through an ``McpWorkbench`` and then proposes the same call again under a
   new call id. ``idempotent_mcp_params`` puts each call's operation key in
   ``params._meta``.
2. The "process restarts": a plain ``mcp`` client in a new MCP session
   resumes the run (``McpOperationKeys``) and sends the call once more.
3. A verifier reads the operation from the ledger, and the read-only
   ``list_tickets`` tool (passed through, never recorded) counts the tickets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import FunctionCall
from autogen_core.models import CreateResult, ModelInfo, RequestUsage
from autogen_ext.models.replay import ReplayChatCompletionClient
from autogen_ext.tools.mcp import McpWorkbench, StreamableHttpServerParams
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.fastmcp import FastMCP

from idemproxy.adapters import AgentRun, Verifier, expected_operation_id, operation_key
from idemproxy.adapters.autogen import idempotent_mcp_params
from idemproxy.adapters.mcp import McpOperationKeys
from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.config.settings import parse_config
from idemproxy.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_stack import serving, serving_idemproxy  # the examples' shared helpers, next to this file

TITLE = "Disk full on db-1"


def ticket_server() -> FastMCP:
    """The tool: an MCP server whose create_ticket is not idempotent at all."""
    server = FastMCP("tickets", log_level="ERROR")
    tickets: list[dict[str, Any]] = []

    @server.tool()
    def create_ticket(title: str) -> dict[str, Any]:
        """File a ticket in the tracker."""
        tickets.append({"id": len(tickets) + 1, "title": title})
        return tickets[-1]

    @server.tool()
    def list_tickets() -> list[dict[str, Any]]:
        """The tickets filed so far."""
        return tickets

    return server


@asynccontextmanager
async def serving_asgi(app: Any) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def mcp_server_behind_idemproxy(ledger_dir: str) -> AsyncIterator[tuple[str, str]]:
    """The MCP endpoint through idemproxy, and idemproxy's admin listener."""
    async with serving_asgi(ticket_server().streamable_http_app()) as server_url:
        route = {
            "name": "tickets",
            "prefix": "/",
            "upstream": server_url,
            "mode": "mcp",
            "key_mode": "require",  # every tools/call must carry its key; the adapters send it
            "mcp": {"read_only_tools": ["list_tickets"]},
        }
        config = parse_config({"store": f"sqlite:///{ledger_dir}/ledger.db", "routes": [route]})
        store = open_store(config.store)
        await store.start()
        try:
            async with (
                serving_idemproxy(build_proxy_app(config, store)) as proxy_url,
                serving(build_admin_app(store, config)) as admin_url,
            ):
                yield f"{proxy_url}/mcp", admin_url
        finally:
            await store.close()


def file_ticket_call(call_id: str) -> CreateResult:
    return CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id=call_id, name="create_ticket", arguments=json.dumps({"title": TITLE}))],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )


async def run_autogen_worker(mcp_url: str, run: AgentRun) -> list[str]:
    info = ModelInfo(vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False)
    turns: list[CreateResult | str] = [file_ticket_call("call_1"), file_ticket_call("call_2"), "Filed."]
    model = ReplayChatCompletionClient(turns, model_info=info)
    params = idempotent_mcp_params(StreamableHttpServerParams(url=mcp_url), run)
    async with McpWorkbench(params) as workbench:
        agent = AssistantAgent("worker", model_client=model, workbench=workbench, max_tool_iterations=5)
        result = await agent.run(task=f"File a ticket: {TITLE}")
    return [
        f"{item.call_id}: {describe(json.loads(item.content))}"
        for message in result.messages
        if isinstance(message, ToolCallExecutionEvent)
        for item in message.content
    ]


def describe(ticket: dict[str, Any]) -> str:
    return f"ticket #{ticket['id']} {ticket['title']!r}"


async def resume_with_the_mcp_sdk(mcp_url: str, run: AgentRun) -> tuple[str, int]:
    """A new MCP session resumes the run: the call, then the tickets filed so far."""
    async with (
        httpx.AsyncClient(auth=McpOperationKeys(run)) as http,
        streamable_http_client(mcp_url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        again = await session.call_tool("create_ticket", {"title": TITLE})
        listed = await session.call_tool("list_tickets", {})
    filed = listed.structuredContent["result"] if listed.structuredContent else []
    return describe(again.structuredContent or {}), len(filed)


async def main() -> int:
    with tempfile.TemporaryDirectory() as ledger_dir:
        async with mcp_server_behind_idemproxy(ledger_dir) as (mcp_url, admin_url):
            run = AgentRun()
            print(f"run {run.run_id}")
            for line in await run_autogen_worker(mcp_url, run):
                print(f"  autogen tool result {line}")
            # The process restarts; the application resumes the run under its saved id.
            result, filed = await resume_with_the_mcp_sdk(mcp_url, AgentRun(run.run_id))
            print(f"  resumed mcp client result: {result}")
            key = operation_key(run.run_id, "create_ticket", {"title": TITLE})
            async with Verifier(admin_url) as verifier:
                print(f"verifier: {await verifier.check_operation(expected_operation_id(key, route='tickets'))}")
    print(f"tickets filed at the tool: {filed}")
    return 0 if filed == 1 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    # The SDK's server logs an error when a client ends its session with the GET stream open.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.CRITICAL)
    # AutoGen 0.7 opens Streamable HTTP with the mcp SDK's deprecated spelling.
    warnings.filterwarnings("ignore", "Use `streamable_http_client` instead", DeprecationWarning)
    sys.exit(asyncio.run(main()))

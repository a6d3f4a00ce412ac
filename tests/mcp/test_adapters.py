"""AutoGen's and CAMEL's MCP clients through the proxy's MCP route: a repeated call has one effect.

The route requires keys, so every call that gets through carries the key the
adapter put in ``params._meta``; the server records which key each filing came with.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import FunctionCall
from autogen_core.models import CreateResult, RequestUsage
from autogen_ext.models.replay import ReplayChatCompletionClient
from autogen_ext.tools.mcp import McpWorkbench, StreamableHttpServerParams

from idemproxy.adapters import AgentRun, operation_key
from idemproxy.adapters.autogen import idempotent_mcp_params
from idemproxy.adapters.camel import IdempotentMCPClient
from tests.adapters.test_autogen import MODEL_INFO
from tests.adapters.test_camel import ScriptedModel
from tests.mcp.conftest import McpProxyFactory
from tests.mcp.ticket_server import Tickets

# AutoGen 0.7 opens Streamable HTTP with the mcp SDK's deprecated spelling.
pytestmark = pytest.mark.filterwarnings("ignore:Use `streamable_http_client` instead:DeprecationWarning")

ARGUMENTS = {"title": "disk full"}


@pytest.fixture
async def keyed_url(mcp_proxy: McpProxyFactory) -> str:
    return await mcp_proxy(key_mode="require")


def expected_keys(count: int) -> list[str | None]:
    return [operation_key("task-42", "create_ticket", ARGUMENTS)] * count


async def test_an_autogen_mcp_workbench_files_one_ticket(keyed_url: str, tickets: Tickets) -> None:
    params = idempotent_mcp_params(StreamableHttpServerParams(url=keyed_url, timeout=10), AgentRun("task-42"))
    async with McpWorkbench(params) as workbench:
        first = await workbench.call_tool("create_ticket", ARGUMENTS)
        again = await workbench.call_tool("create_ticket", ARGUMENTS)
    assert not first.is_error
    assert again.result == first.result
    assert tickets.titled("disk full") == 1
    assert tickets.keys == expected_keys(1)


def autogen_call(call_id: str) -> CreateResult:
    return CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id=call_id, name="create_ticket", arguments=json.dumps(ARGUMENTS))],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )


async def test_an_autogen_agent_re_proposing_an_mcp_call_files_one_ticket(keyed_url: str, tickets: Tickets) -> None:
    model = ReplayChatCompletionClient(
        [autogen_call("call_1"), autogen_call("call_2"), "Filed."], model_info=MODEL_INFO
    )
    params = idempotent_mcp_params(StreamableHttpServerParams(url=keyed_url, timeout=10), AgentRun("task-42"))
    async with McpWorkbench(params) as workbench:
        agent = AssistantAgent("worker", model_client=model, workbench=workbench, max_tool_iterations=5)
        result = await agent.run(task="Our disk is full: file a ticket.")
    answers = [item for m in result.messages if isinstance(m, ToolCallExecutionEvent) for item in m.content]
    assert [answer.call_id for answer in answers] == ["call_1", "call_2"]
    assert answers[0].content == answers[1].content
    assert not any(answer.is_error for answer in answers)
    assert tickets.titled("disk full") == 1


async def test_a_camel_mcp_client_files_one_ticket(keyed_url: str, tickets: Tickets) -> None:
    async with IdempotentMCPClient({"url": keyed_url}, AgentRun("task-42"), timeout=10) as client:
        tool = {tool.get_function_name(): tool for tool in client.get_tools()}["create_ticket"]
        first = await tool.func.async_call(**ARGUMENTS)  # what ChatAgent runs for an MCP tool
        again = await client.call_tool("create_ticket", ARGUMENTS)
    assert json.loads(first) == {"id": 1, "title": "disk full"}
    assert json.loads(again.content[0].text) == json.loads(first)
    assert tickets.titled("disk full") == 1
    assert tickets.keys == expected_keys(1)


async def test_a_camel_agent_re_proposing_an_mcp_call_files_one_ticket(keyed_url: str, tickets: Tickets) -> None:
    model = ScriptedModel(("call_1", "create_ticket", ARGUMENTS), ("call_2", "create_ticket", ARGUMENTS), "Filed.")
    async with IdempotentMCPClient({"url": keyed_url}, AgentRun("task-42"), timeout=10) as client:
        from camel.agents import ChatAgent

        agent = ChatAgent("You file tickets.", model, tools=client.get_tools())
        response = await agent.astep("Our disk is full: file a ticket.")
    records: list[Any] = response.info["tool_calls"]
    assert [record.tool_call_id for record in records] == ["call_1", "call_2"]
    assert records[0].result == records[1].result
    assert tickets.titled("disk full") == 1


def test_camel_clients_must_use_streamable_http() -> None:
    with pytest.raises(ValueError, match="Streamable HTTP only"):
        IdempotentMCPClient({"url": "http://127.0.0.1:1/sse", "type": "sse"}, AgentRun("task-42"))


def test_autogen_params_must_be_streamable_http() -> None:
    from autogen_ext.tools.mcp import SseServerParams

    with pytest.raises(TypeError, match="Streamable HTTP only"):
        idempotent_mcp_params(SseServerParams(url="http://127.0.0.1:1/sse"), AgentRun("task-42"))  # type: ignore[arg-type]

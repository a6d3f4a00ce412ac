"""AutoGen 0.7 end to end: a scripted AssistantAgent, a real proxy, the counting upstream.

ReplayChatCompletionClient plays the model, so no LLM is involved; everything
else is the real framework, the real proxy and a real Redis ledger.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import FunctionCall
from autogen_core.models import CreateResult, FunctionExecutionResult, ModelInfo, RequestUsage
from autogen_core.tools import BaseTool, FunctionTool, StaticWorkbench
from autogen_ext.models.replay import ReplayChatCompletionClient
from multidict import CIMultiDict
from yarl import URL

from idemproxy.adapters import AgentRun, ProxyClient, Verifier, key_from_call_id, operation_key
from idemproxy.adapters.autogen import IdempotentHttpTool, IdempotentTool, IdempotentWorkbench, idempotent_tools
from idemproxy.adapters.httpx_auth import IdempotencyAuth
from tests.conftest import ProxyFactory
from tests.support.upstream import Upstream

MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False
)
TITLE = {"title": "disk full"}


def call(call_id: str, name: str = "create_ticket", arguments: dict[str, Any] = TITLE) -> CreateResult:
    return CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id=call_id, name=name, arguments=json.dumps(arguments))],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )


def scripted(*turns: CreateResult | str) -> ReplayChatCompletionClient:
    return ReplayChatCompletionClient(list(turns), model_info=MODEL_INFO)


async def run_agent(model: ReplayChatCompletionClient, **agent: Any) -> list[FunctionExecutionResult]:
    """Run one scripted task; the tool results in the order the agent produced them."""
    assistant = AssistantAgent("worker", model_client=model, max_tool_iterations=5, **agent)
    result = await assistant.run(task="Our disk is full: file a ticket.")
    return [item for m in result.messages if isinstance(m, ToolCallExecutionEvent) for item in m.content]


def contents(results: list[FunctionExecutionResult]) -> list[tuple[str, str, bool]]:
    return [(result.call_id, result.content, bool(result.is_error)) for result in results]


@pytest.fixture
def create_ticket(proxy_client: ProxyClient) -> Callable[[str], Awaitable[str]]:
    async def create_ticket(title: str) -> str:
        """File a ticket in the tracker."""
        response = await proxy_client.post("/items", json={"title": title})
        return f"ticket #{response.json()['effect']} (operation {response.operation_id})"

    return create_ticket


async def test_a_retried_and_a_re_proposed_call_have_one_effect(
    create_ticket: Callable[[str], Awaitable[str]], upstream: Upstream, run: AgentRun
) -> None:
    # The model files the ticket, then proposes the same call again under a new id.
    first_run = await run_agent(
        scripted(call("call_1"), call("call_2"), "Filed."), tools=idempotent_tools([create_ticket], run)
    )
    # The process restarts and the run resumes under its id: call_1 is executed again.
    resumed = AgentRun(run.run_id)
    second_run = await run_agent(scripted(call("call_1"), "Filed."), tools=idempotent_tools([create_ticket], resumed))

    assert upstream.count() == 1
    answers = contents(first_run + second_run)
    assert [call_id for call_id, _, _ in answers] == ["call_1", "call_2", "call_1"]
    assert len({content for _, content, _ in answers}) == 1
    assert answers[0][1].startswith("ticket #1 ")
    assert not any(is_error for _, _, is_error in answers)
    sent = CIMultiDict(upstream.effects[0].headers)
    assert sent["Idempotency-Key"] == operation_key("task-42", "create_ticket", TITLE)
    assert sent["X-Agent-Task"] == "task-42"


async def test_a_sync_tool_gets_its_operation_in_autogens_thread(
    proxy_url: str, upstream: Upstream, run: AgentRun
) -> None:
    def create_ticket(title: str) -> str:
        """File a ticket in the tracker."""
        with httpx.Client(base_url=proxy_url, auth=IdempotencyAuth()) as client:
            response = client.post("/items", json={"title": title})
        return f"ticket #{response.json()['effect']}"

    tools = idempotent_tools([FunctionTool(create_ticket, description="File a ticket.")], run)
    results = await run_agent(scripted(call("call_1"), call("call_2"), "Filed."), tools=tools)

    assert contents(results) == [("call_1", "ticket #1", False), ("call_2", "ticket #1", False)]
    assert upstream.count() == 1
    sent = CIMultiDict(upstream.effects[0].headers)
    assert sent["Idempotency-Key"] == operation_key("task-42", "create_ticket", TITLE)
    assert sent["X-Agent-Task"] == "task-42"


async def test_without_the_adapter_autogen_loses_the_operation_of_a_sync_tool(
    proxy_url: str, upstream: Upstream, run: AgentRun
) -> None:
    """The control for the test above: AutoGen's run_in_executor drops the context."""

    def create_ticket(title: str) -> str:
        """File a ticket in the tracker."""
        with httpx.Client(base_url=proxy_url, auth=IdempotencyAuth()) as client:
            return client.post("/items", json={"title": title}).text

    with run.operation("create_ticket", TITLE):  # open around the whole agent: not enough
        results = await run_agent(scripted(call("call_1"), "Filed."), tools=[create_ticket])

    [(_, content, is_error)] = contents(results)
    assert is_error
    assert "outside any tool-call operation" in content
    assert upstream.count() == 0


async def test_call_id_keys_make_a_re_proposal_a_new_operation(
    create_ticket: Callable[[str], Awaitable[str]], upstream: Upstream
) -> None:
    run = AgentRun("task-7", keys=key_from_call_id)
    await run_agent(scripted(call("call_1"), call("call_2"), "Filed."), tools=idempotent_tools([create_ticket], run))
    assert upstream.count() == 2
    await run_agent(scripted(call("call_1"), "Filed."), tools=idempotent_tools([create_ticket], run))
    assert upstream.count() == 2


async def test_a_wrapped_tool_keeps_the_schema_the_model_sees(create_ticket: Callable[[str], Awaitable[str]]) -> None:
    plain = FunctionTool(create_ticket, description="File a ticket.", strict=True)
    wrapped = IdempotentTool(plain, AgentRun())
    assert wrapped.schema == plain.schema
    assert (wrapped.name, wrapped.description) == ("create_ticket", "File a ticket.")
    assert wrapped.return_value_as_string("x") == "x"


async def test_a_workbench_gives_each_call_its_operation(
    create_ticket: Callable[[str], Awaitable[str]], upstream: Upstream, run: AgentRun
) -> None:
    tool = FunctionTool(create_ticket, description="File a ticket.")
    async with IdempotentWorkbench(StaticWorkbench([tool]), run) as workbench:
        results = await run_agent(scripted(call("call_1"), call("call_2"), "Filed."), workbench=workbench)
        direct = await workbench.call_tool("create_ticket", TITLE, call_id="call_3")
        assert [schema["name"] for schema in await workbench.list_tools()] == ["create_ticket"]
    assert upstream.count() == 1
    assert direct.to_text() == results[0].content == results[1].content


def test_a_workbench_holding_a_sync_function_tool_is_refused(run: AgentRun) -> None:
    def create_ticket(title: str) -> str:
        return title

    sync_tool = FunctionTool(create_ticket, description="File a ticket.")
    with pytest.raises(TypeError, match="idempotent_tools"):
        IdempotentWorkbench(StaticWorkbench([sync_tool]), run)
    wrapped: list[BaseTool[Any, Any]] = idempotent_tools([sync_tool], run)
    IdempotentWorkbench(StaticWorkbench(wrapped), run)  # the way the message says


TICKET_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "description": "What is wrong"}},
    "required": ["title"],
}


@pytest.fixture
async def http_tool(proxy_url: str, run: AgentRun) -> AsyncIterator[IdempotentHttpTool]:
    url = URL(proxy_url)
    assert url.host is not None
    assert url.port is not None
    tool = IdempotentHttpTool(
        name="create_ticket",
        description="File a ticket in the tracker.",
        host=url.host,
        port=url.port,
        path="/items",
        method="POST",
        json_schema=TICKET_SCHEMA,
        return_type="json",
        run=run,
        caller="worker",
    )
    yield tool
    await tool.close()


async def test_the_http_tool_sends_each_call_through_the_proxy_once(
    http_tool: IdempotentHttpTool, upstream: Upstream
) -> None:
    results = await run_agent(scripted(call("call_1"), call("call_2"), "Filed."), tools=[http_tool])
    assert upstream.count() == 1
    assert results[0].content == results[1].content
    assert json.loads(results[0].content)["effect"] == 1
    sent = CIMultiDict(upstream.effects[0].headers)
    assert sent["Idempotency-Key"] == operation_key("task-42", "create_ticket", TITLE)
    assert (sent["X-Agent-Task"], sent["X-Idem-Caller"]) == ("task-42", "worker")


async def test_the_http_tool_config_carries_the_run_across_a_restart(
    http_tool: IdempotentHttpTool, upstream: Upstream
) -> None:
    await run_agent(scripted(call("call_1"), "Filed."), tools=[http_tool])
    config = http_tool.dump_component()
    assert config.provider == "idemproxy.adapters.autogen.IdempotentHttpTool"
    assert config.config["run_id"] == "task-42"

    restored = IdempotentHttpTool.load_component(config)
    try:
        assert restored.run_scope.run_id == "task-42"
        results = await run_agent(scripted(call("call_9"), "Filed."), tools=[restored])
    finally:
        await restored.close()
    assert upstream.count() == 1
    assert json.loads(results[0].content)["effect"] == 1


async def test_the_http_tool_fills_path_parameters_and_queries_for_reads(proxy_url: str, upstream: Upstream) -> None:
    url = URL(proxy_url)
    assert url.host is not None
    assert url.port is not None
    tool = IdempotentHttpTool(
        name="ticket_status",
        host=url.host,
        port=url.port,
        path="/echo/{ticket}",
        method="GET",
        json_schema={
            "type": "object",
            "properties": {"ticket": {"type": "string"}, "verbose": {"type": "boolean"}},
            "required": ["ticket", "verbose"],
        },
        return_type="json",
        run=AgentRun("task-9"),
    )
    try:
        results = await run_agent(
            scripted(call("call_1", "ticket_status", {"ticket": "T-1", "verbose": True}), "Done."), tools=[tool]
        )
    finally:
        await tool.close()
    echoed = json.loads(results[0].content)
    assert echoed["raw_path"] == "/echo/T-1?verbose=true"
    assert "Idempotency-Key" not in CIMultiDict(echoed["headers"])
    assert CIMultiDict(echoed["headers"])["X-Agent-Task"] == "task-9"
    assert upstream.count() == 1


async def test_an_unknown_outcome_reaches_the_model_as_a_tool_error(
    make_proxy: ProxyFactory, upstream: Upstream, run: AgentRun
) -> None:
    proxy = await make_proxy(connect_timeout="1s", read_timeout="300ms", lease="10s")
    async with ProxyClient(str(proxy.make_url("/"))) as client:

        async def slow_tool(title: str) -> str:
            """A tool that never answers in time."""
            return (await client.post("/slow", json={"title": title})).text()

        results = await run_agent(
            scripted(call("call_1", "slow_tool"), call("call_2", "slow_tool"), "Gave up."),
            tools=idempotent_tools([slow_tool], run),
        )
    first, second = contents(results)
    assert first[2]
    assert "upstream-timeout" in first[1]
    assert second[2]
    assert "409" in second[1]
    assert upstream.count() == 1


async def test_a_verifier_agent_checks_what_the_worker_reported(
    create_ticket: Callable[[str], Awaitable[str]], admin_url: str, upstream: Upstream, run: AgentRun
) -> None:
    [reported] = await run_agent(scripted(call("call_1"), "Filed."), tools=idempotent_tools([create_ticket], run))
    op_id = reported.content.split("operation ")[1].rstrip(")")

    async with Verifier(admin_url) as verifier:
        check = FunctionTool(verifier.check_operation, description="Check an operation at the proxy.")
        [checked] = await run_agent(
            scripted(call("call_v", "check_operation", {"operation_id": op_id}), "Verified."), tools=[check]
        )
    assert not checked.is_error
    assert checked.content.startswith(f"Operation {op_id} is COMPLETED")
    assert upstream.count() == 1

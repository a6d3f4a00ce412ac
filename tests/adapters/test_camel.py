"""CAMEL end to end: a ChatAgent driven by a scripted model, a real proxy, the counting upstream.

``ScriptedModel`` is CAMEL's own ``StubModel`` answering from a script of
tool calls and texts, so no LLM is involved; everything else is real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from camel.agents import ChatAgent
from camel.models.stub_model import StubModel
from camel.toolkits import FunctionTool
from camel.types import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    Choice,
    CompletionUsage,
    ModelType,
)
from camel.types.agents import ToolCallingRecord
from multidict import CIMultiDict

from idemproxy.adapters import AgentRun, ProxyClient, current_operation, key_from_call_id, operation_key
from idemproxy.adapters.camel import IdempotentChatAgent, IdempotentFunctionTool, idempotent_tools
from idemproxy.adapters.httpx_auth import IdempotencyAuth
from tests.support.upstream import Upstream

TITLE = {"title": "disk full"}
Turn = tuple[str, str, dict[str, Any]] | str  # (call id, tool, arguments) or a final text


class ScriptedModel(StubModel):
    """CAMEL's stub model, answering each request with the next turn of a script."""

    def __init__(self, *turns: Turn) -> None:
        super().__init__(ModelType.STUB)
        self.turns = list(turns)

    def _next(self) -> ChatCompletion:
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            message = ChatCompletionMessage(role="assistant", content=turn)
        else:
            call_id, name, arguments = turn
            message = ChatCompletionMessage(
                role="assistant",
                content=None,
                tool_calls=[
                    ChatCompletionMessageFunctionToolCall(
                        id=call_id, type="function", function={"name": name, "arguments": json.dumps(arguments)}
                    )
                ],
            )
        return ChatCompletion(
            id="scripted",
            model="stub",
            object="chat.completion",
            created=int(time.time()),
            choices=[
                Choice(
                    finish_reason="stop" if isinstance(turn, str) else "tool_calls",
                    index=0,
                    message=message,
                    logprobs=None,
                )
            ],
            usage=CompletionUsage(completion_tokens=1, prompt_tokens=1, total_tokens=2),
        )

    def _run(self, messages: Any, response_format: Any = None, tools: Any = None) -> ChatCompletion:
        return self._next()

    async def _arun(self, messages: Any, response_format: Any = None, tools: Any = None) -> ChatCompletion:
        return self._next()


def call(call_id: str, name: str = "create_ticket", arguments: dict[str, Any] = TITLE) -> Turn:
    return (call_id, name, arguments)


async def astep(agent: ChatAgent) -> list[ToolCallingRecord]:
    response = await agent.astep("Our disk is full: file a ticket.")
    records: list[ToolCallingRecord] = response.info["tool_calls"]
    return records


def results(records: list[ToolCallingRecord]) -> list[tuple[str, Any]]:
    return [(record.tool_call_id, record.result) for record in records]


@pytest.fixture
def create_ticket(proxy_client: ProxyClient) -> Callable[[str], Awaitable[str]]:
    async def create_ticket(title: str) -> str:
        """File a ticket in the tracker.

        Args:
            title (str): What is wrong.
        """
        response = await proxy_client.post("/items", json={"title": title})
        return f"ticket #{response.json()['effect']}"

    return create_ticket


@pytest.fixture
def sync_create_ticket(proxy_url: str) -> Callable[[str], str]:
    def create_ticket(title: str) -> str:
        """File a ticket in the tracker.

        Args:
            title (str): What is wrong.
        """
        with httpx.Client(base_url=proxy_url, auth=IdempotencyAuth()) as client:
            response = client.post("/items", json={"title": title})
        return f"ticket #{response.json()['effect']}"

    return create_ticket


async def test_a_retried_and_a_re_proposed_call_have_one_effect(
    create_ticket: Callable[[str], Awaitable[str]], upstream: Upstream, run: AgentRun
) -> None:
    model = ScriptedModel(call("call_1"), call("call_2"), "Filed.")
    first_run = await astep(IdempotentChatAgent("You file tickets.", model, run=run, tools=[create_ticket]))
    # The process restarts and the run resumes under its id: call_1 is executed again.
    resumed = IdempotentChatAgent(
        "You file tickets.", ScriptedModel(call("call_1"), "Filed."), run=AgentRun(run.run_id), tools=[create_ticket]
    )
    second_run = await astep(resumed)

    assert upstream.count() == 1
    assert results(first_run + second_run) == [
        ("call_1", "ticket #1"),
        ("call_2", "ticket #1"),
        ("call_1", "ticket #1"),
    ]
    sent = CIMultiDict(upstream.effects[0].headers)
    assert sent["Idempotency-Key"] == operation_key("task-42", "create_ticket", TITLE)
    assert sent["X-Agent-Task"] == "task-42"


async def test_a_sync_tool_gets_its_operation_in_astep(
    sync_create_ticket: Callable[[str], str], upstream: Upstream, run: AgentRun
) -> None:
    agent = IdempotentChatAgent(
        "You file tickets.",
        ScriptedModel(call("call_1"), call("call_2"), "Filed."),
        run=run,
        tools=[sync_create_ticket],
    )
    assert results(await astep(agent)) == [("call_1", "ticket #1"), ("call_2", "ticket #1")]
    assert upstream.count() == 1
    sent = CIMultiDict(upstream.effects[0].headers)
    assert sent["Idempotency-Key"] == operation_key("task-42", "create_ticket", TITLE)
    assert sent["X-Agent-Task"] == "task-42"


async def test_without_the_adapter_camel_loses_the_operation_of_a_sync_tool(
    sync_create_ticket: Callable[[str], str], upstream: Upstream, run: AgentRun
) -> None:
    """The control for the test above: ChatAgent.astep's run_in_executor drops the context."""
    agent = ChatAgent("You file tickets.", ScriptedModel(call("call_1"), "Filed."), tools=[sync_create_ticket])
    with run.operation("create_ticket", TITLE):  # open around the whole step: not enough
        [(call_id, result)] = results(await astep(agent))
    assert call_id == "call_1"
    assert "outside any tool-call operation" in result
    assert upstream.count() == 0


async def test_a_sync_tool_gets_its_operation_in_step(
    sync_create_ticket: Callable[[str], str], upstream: Upstream, run: AgentRun
) -> None:
    agent = IdempotentChatAgent(
        "You file tickets.",
        ScriptedModel(call("call_1"), call("call_2"), "Filed."),
        run=run,
        tools=[sync_create_ticket],
    )
    # step() blocks its thread; the proxy is served by this test's event loop.
    response = await asyncio.to_thread(agent.step, "Our disk is full: file a ticket.")
    assert results(response.info["tool_calls"]) == [("call_1", "ticket #1"), ("call_2", "ticket #1")]
    assert upstream.count() == 1
    assert CIMultiDict(upstream.effects[0].headers)["X-Agent-Task"] == "task-42"


async def test_the_call_id_reaches_the_operation_and_can_be_the_key(
    create_ticket: Callable[[str], Awaitable[str]], upstream: Upstream
) -> None:
    seen: list[str | None] = []

    async def create_ticket_and_trace(title: str) -> str:
        """File a ticket in the tracker.

        Args:
            title (str): What is wrong.
        """
        opened = current_operation()
        seen.append(opened.call_id if opened else "no operation")
        return await create_ticket(title)

    run = AgentRun("task-7", keys=key_from_call_id)
    traced = "create_ticket_and_trace"
    model = ScriptedModel(call("call_1", traced), call("call_2", traced), "Filed.")
    agent = IdempotentChatAgent("You file tickets.", model, run=run, tools=[create_ticket_and_trace])
    await astep(agent)
    assert seen == ["call_1", "call_2"]
    assert upstream.count() == 2  # with call-id keys a re-proposal is a new operation


async def test_a_wrapped_function_tool_keeps_its_schema_and_names_positional_arguments(
    sync_create_ticket: Callable[[str], str], upstream: Upstream, run: AgentRun
) -> None:
    plain = FunctionTool(sync_create_ticket)
    wrapped = IdempotentFunctionTool(plain, run)
    assert wrapped.get_openai_tool_schema() == plain.get_openai_tool_schema()
    assert await wrapped.async_call("disk full") == "ticket #1"
    assert await asyncio.to_thread(wrapped, title="disk full") == "ticket #1"
    assert upstream.count() == 1
    assert CIMultiDict(upstream.effects[0].headers)["Idempotency-Key"] == operation_key(
        "task-42", "create_ticket", TITLE
    )


async def test_tools_added_later_are_wrapped_and_wrapping_is_not_repeated(
    create_ticket: Callable[[str], Awaitable[str]], run: AgentRun
) -> None:
    agent = IdempotentChatAgent("You file tickets.", ScriptedModel("Nothing to do."), run=run)
    agent.add_tool(create_ticket)
    [tool] = agent.tool_dict.values()
    assert isinstance(tool, IdempotentFunctionTool)
    assert tool.run_scope is run
    assert idempotent_tools([tool], AgentRun()) == [tool]

"""An AutoGen agent behind idemproxy: a retried tool call files one ticket, not three.

    pip install 'idemproxy[autogen]'
    python examples/autogen_example.py

No API key is needed: ``ReplayChatCompletionClient`` plays a model that files
a ticket, then proposes the same call again under a new call id; then the
"process restarts" and the resumed run executes the first call once more.
The example ticket tool, idemproxy (embedded SQLite ledger) and its admin
listener run in this process on free loopback ports. The ticket tool counts
what it filed: one ticket, and a verifier reads the operation from the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

import aiohttp
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import FunctionCall
from autogen_core.models import CreateResult, ModelInfo, RequestUsage
from autogen_core.tools import FunctionTool
from autogen_ext.models.replay import ReplayChatCompletionClient

from idemproxy.adapters import AgentRun, ProxyClient, Verifier
from idemproxy.adapters.autogen import idempotent_tools

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_stack import tool_behind_idemproxy

TITLE = "Disk full on db-1"


def file_ticket_call(call_id: str) -> CreateResult:
    """What a model says when it wants the ticket filed."""
    return CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id=call_id, name="create_ticket", arguments=json.dumps({"title": TITLE}))],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )


def scripted_model(*turns: CreateResult | str) -> ReplayChatCompletionClient:
    info = ModelInfo(vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False)
    return ReplayChatCompletionClient(list(turns), model_info=info)


async def run_worker(model: ReplayChatCompletionClient, tools: list[FunctionTool], run: AgentRun) -> list[str]:
    agent = AssistantAgent("worker", model_client=model, tools=idempotent_tools(tools, run), max_tool_iterations=5)
    result = await agent.run(task=f"File a ticket: {TITLE}")
    return [
        f"{item.call_id}: {item.content}"
        for message in result.messages
        if isinstance(message, ToolCallExecutionEvent)
        for item in message.content
    ]


async def main() -> int:
    with tempfile.TemporaryDirectory() as ledger_dir:
        async with tool_behind_idemproxy(ledger_dir) as (tool_url, proxy_url, admin_url):
            async with ProxyClient(proxy_url) as proxy:

                async def create_ticket(title: str) -> str:
                    """File a ticket in the tracker."""
                    response = await proxy.post("/tickets", json={"title": title})
                    ticket = response.json()
                    replayed = " (answered from the ledger)" if response.replayed else ""
                    return f"ticket #{ticket['id']}, operation {response.operation_id}{replayed}"

                tools = [FunctionTool(create_ticket, description="File a ticket in the tracker.")]
                run = AgentRun()
                print(f"run {run.run_id}")
                seen = await run_worker(
                    scripted_model(file_ticket_call("call_1"), file_ticket_call("call_2"), "Filed."), tools, run
                )
                # The process restarts; the application resumes the run under its saved id.
                resumed = AgentRun(run.run_id)
                seen += await run_worker(scripted_model(file_ticket_call("call_1"), "Filed."), tools, resumed)
            for line in seen:
                print(f"  tool result {line}")

            op_id = seen[0].split("operation ")[1].split(" ")[0]
            async with Verifier(admin_url) as verifier:
                print(f"verifier: {await verifier.check_operation(op_id)}")
            async with aiohttp.ClientSession() as session, session.get(f"{tool_url}/tickets") as listed:
                filed = (await listed.json())["count"]
    print(f"tickets filed at the tool: {filed}")
    return 0 if filed == 1 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(asyncio.run(main()))

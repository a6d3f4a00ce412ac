"""A CAMEL agent behind idemproxy: a retried tool call files one ticket, not three.

    pip install 'idemproxy[camel]'
    python examples/camel_example.py

No API key is needed: a subclass of CAMEL's ``StubModel`` plays a model that
files a ticket, then proposes the same call again under a new call id; then
the "process restarts" and the resumed run executes the first call once
more. The tool is synchronous (httpx), as many CAMEL tools are. The example
ticket tool, idemproxy (embedded SQLite ledger) and its admin listener run
in this process on free loopback ports. The ticket tool counts what it
filed: one ticket, and a verifier reads the operation from the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from camel.models.stub_model import StubModel
from camel.types import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    Choice,
    CompletionUsage,
    ModelType,
)

from idemproxy.adapters import AgentRun, Verifier
from idemproxy.adapters.camel import IdempotentChatAgent
from idemproxy.adapters.httpx_auth import IdempotencyAuth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_stack import tool_behind_idemproxy

TITLE = "Disk full on db-1"


class ScriptedModel(StubModel):
    """CAMEL's stub model, answering each request with the next turn of a script:
    a ``(call_id, tool, arguments)`` tool call or a final text."""

    def __init__(self, *turns: tuple[str, str, dict[str, Any]] | str) -> None:
        super().__init__(ModelType.STUB)
        self.turns = list(turns)

    def _next(self) -> ChatCompletion:
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            message, reason = ChatCompletionMessage(role="assistant", content=turn), "stop"
        else:
            call_id, name, arguments = turn
            function = {"name": name, "arguments": json.dumps(arguments)}
            call = ChatCompletionMessageFunctionToolCall(id=call_id, type="function", function=function)
            message, reason = ChatCompletionMessage(role="assistant", content=None, tool_calls=[call]), "tool_calls"
        return ChatCompletion(
            id="scripted",
            model="stub",
            object="chat.completion",
            created=int(time.time()),
            choices=[Choice(finish_reason=reason, index=0, message=message, logprobs=None)],
            usage=CompletionUsage(completion_tokens=1, prompt_tokens=1, total_tokens=2),
        )

    def _run(self, messages: Any, response_format: Any = None, tools: Any = None) -> ChatCompletion:
        return self._next()

    async def _arun(self, messages: Any, response_format: Any = None, tools: Any = None) -> ChatCompletion:
        return self._next()


def file_ticket(call_id: str) -> tuple[str, str, dict[str, Any]]:
    return (call_id, "create_ticket", {"title": TITLE})


async def run_worker(model: ScriptedModel, tool: Callable[[str], str], run: AgentRun) -> list[str]:
    agent = IdempotentChatAgent("You file tickets.", model, run=run, tools=[tool])
    response = await agent.astep(f"File a ticket: {TITLE}")
    return [f"{record.tool_call_id}: {record.result}" for record in response.info["tool_calls"]]


async def main() -> int:
    with tempfile.TemporaryDirectory() as ledger_dir:
        async with tool_behind_idemproxy(ledger_dir) as (tool_url, proxy_url, admin_url):

            def create_ticket(title: str) -> str:
                """File a ticket in the tracker.

                Args:
                    title (str): What is wrong.
                """
                # A synchronous tool: the adapter runs it in a thread that keeps the operation.
                with httpx.Client(base_url=proxy_url, auth=IdempotencyAuth()) as client:
                    response = client.post("/tickets", json={"title": title})
                replayed = " (answered from the ledger)" if response.headers.get("Idempotent-Replayed") else ""
                operation = response.headers.get("Idempotency-Operation")
                return f"ticket #{response.json()['id']}, operation {operation}{replayed}"

            run = AgentRun()
            print(f"run {run.run_id}")
            seen = await run_worker(
                ScriptedModel(file_ticket("call_1"), file_ticket("call_2"), "Filed."), create_ticket, run
            )
            # The process restarts; the application resumes the run under its saved id.
            resumed = AgentRun(run.run_id)
            seen += await run_worker(ScriptedModel(file_ticket("call_1"), "Filed."), create_ticket, resumed)
            for line in seen:
                print(f"  tool result {line}")

            op_id = seen[0].split("operation ")[1].split(" ")[0]
            async with Verifier(admin_url) as verifier:
                print(f"verifier: {await verifier.check_operation(op_id)}")
            async with httpx.AsyncClient() as client:
                filed = (await client.get(f"{tool_url}/tickets")).json()["count"]
    print(f"tickets filed at the tool: {filed}")
    return 0 if filed == 1 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(asyncio.run(main()))

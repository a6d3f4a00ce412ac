"""IdempotencyAuth: httpx clients, synchronous and asynchronous, through a real proxy."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from multidict import CIMultiDict

from idemproxy.adapters import AgentRun, NoOperation, ProxyProblem
from idemproxy.adapters.httpx_auth import IdempotencyAuth, raise_for_problem
from tests.support.upstream import Upstream


async def test_a_sync_client_in_a_thread_sends_the_operations_key(
    proxy_url: str, upstream: Upstream, run: AgentRun
) -> None:
    def create_ticket(title: str) -> tuple[int, str | None]:
        with httpx.Client(base_url=proxy_url, auth=IdempotencyAuth(caller="executor")) as client:
            response = client.post("/items", json={"title": title})
        return response.json()["effect"], response.headers.get("Idempotent-Replayed")

    answers = []
    for _ in range(2):
        with run.operation("create_ticket", {"title": "a"}) as opened:
            answers.append(await asyncio.to_thread(create_ticket, "a"))
    assert answers == [(1, None), (1, "true")]
    sent = CIMultiDict(upstream.effects[0].headers)
    assert (sent["Idempotency-Key"], sent["X-Agent-Task"], sent["X-Idem-Caller"]) == (opened.key, "task-42", "executor")
    assert len(opened.operation_ids) == 1


async def test_an_async_client_sends_the_operations_key(proxy_url: str, upstream: Upstream, run: AgentRun) -> None:
    async with httpx.AsyncClient(base_url=proxy_url, auth=IdempotencyAuth()) as client:
        for _ in range(2):
            with run.operation("create_ticket", {"title": "a"}):
                response = await client.post("/items", json={"title": "a"})
    assert response.headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


async def test_outside_an_operation_nothing_is_sent(proxy_url: str, upstream: Upstream) -> None:
    async with httpx.AsyncClient(base_url=proxy_url, auth=IdempotencyAuth()) as client:
        with pytest.raises(NoOperation):
            await client.post("/items", json={})
        assert (await client.get("/items")).status_code == 201  # reads pass through without a key
    assert [effect.method for effect in upstream.effects] == ["GET"]


async def test_raise_for_problem_tells_idemproxys_problems_from_the_tools(proxy_url: str) -> None:
    async with httpx.AsyncClient(base_url=proxy_url) as client:
        missing_key = await client.post("/items", json={})
        tools_own = await client.post("/status/404", json={}, headers={"Idempotency-Key": "k404"})
    with pytest.raises(ProxyProblem) as caught:
        raise_for_problem(missing_key)
    assert (caught.value.status, caught.value.slug) == (400, "missing-idempotency-key")
    assert raise_for_problem(tools_own) is tools_own

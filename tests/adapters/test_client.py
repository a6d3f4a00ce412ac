"""ProxyClient against a real proxy and the counting upstream."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from idemproxy.adapters import (
    AgentRun,
    ClientState,
    NoOperation,
    ProxyClient,
    ProxyConnectionError,
    ProxyProblem,
    ProxyTimeout,
    expected_operation_id,
)
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

ROUTE = "root"  # the route name of prefix "/"


def sent_headers(upstream: Upstream, index: int = -1) -> CIMultiDict[str]:
    return CIMultiDict(upstream.effects[index].headers)


async def test_a_tool_call_reaches_the_tool_with_its_key_and_task(
    proxy_client: ProxyClient, upstream: Upstream, run: AgentRun
) -> None:
    with run.operation("create_ticket", {"title": "a"}) as opened:
        response = await proxy_client.post("/items", json={"title": "a"})
    assert response.status == 201
    assert response.json()["effect"] == 1
    assert not response.replayed
    assert sent_headers(upstream)["Idempotency-Key"] == opened.key
    assert sent_headers(upstream)["X-Agent-Task"] == "task-42"
    assert response.operation_id == expected_operation_id(opened.key, route=ROUTE)
    assert opened.operation_ids == [response.operation_id]


async def test_a_re_executed_call_is_answered_from_the_ledger(
    proxy_client: ProxyClient, upstream: Upstream, run: AgentRun
) -> None:
    answers = []
    for _ in range(3):
        with run.operation("create_ticket", {"title": "a"}):
            answers.append(await proxy_client.post("/items", json={"title": "a"}))
    assert upstream.count() == 1
    assert [answer.replayed for answer in answers] == [False, True, True]
    assert len({(answer.status, answer.body, answer.operation_id) for answer in answers}) == 1


async def test_each_request_of_a_call_is_its_own_operation_and_all_replay(
    proxy_client: ProxyClient, upstream: Upstream, run: AgentRun
) -> None:
    async def create_and_comment() -> list[int]:
        with run.operation("create_and_comment", {"title": "a"}):
            created = await proxy_client.post("/items", json={"title": "a"})
            commented = await proxy_client.post("/items/1/comments", json={"text": "hi"})
            return [created.json()["effect"], commented.json()["effect"]]

    assert await create_and_comment() == [1, 2]
    assert await create_and_comment() == [1, 2]
    assert upstream.count() == 2


async def test_a_side_effect_outside_any_operation_is_not_sent(proxy_client: ProxyClient, upstream: Upstream) -> None:
    with pytest.raises(NoOperation):
        await proxy_client.post("/items", json={})
    assert upstream.count() == 0


async def test_an_explicit_key_needs_no_operation(proxy_client: ProxyClient, upstream: Upstream) -> None:
    first = await proxy_client.post("/items", json={}, key="my-key")
    second = await proxy_client.post("/items", json={}, key="my-key")
    assert second.replayed
    assert first.body == second.body
    assert sent_headers(upstream)["Idempotency-Key"] == "my-key"


async def test_the_caller_is_sent_and_scopes_the_operation(proxy_url: str, upstream: Upstream, run: AgentRun) -> None:
    async with ProxyClient(proxy_url, caller="executor", headers={"X-Trace": "t1"}) as client:
        with run.operation("create_ticket", {}) as opened:
            response = await client.post("/items", json={})
    assert sent_headers(upstream)["X-Idem-Caller"] == "executor"
    assert sent_headers(upstream)["X-Trace"] == "t1"
    assert response.operation_id == expected_operation_id(opened.key, route=ROUTE, caller="executor")


async def test_idemproxy_problems_raise_and_the_tools_own_statuses_do_not(
    proxy_client: ProxyClient, proxy_url: str
) -> None:
    await proxy_client.post("/items", json={"a": 1}, key="reused")
    with pytest.raises(ProxyProblem) as caught:
        await proxy_client.post("/items", json={"a": 2}, key="reused")
    problem = caught.value
    assert (problem.status, problem.slug, problem.state) == (422, "fingerprint-mismatch", "COMPLETED")
    assert problem.operation == expected_operation_id("reused", route=ROUTE)

    not_found = await proxy_client.post("/status/404", json={}, key="tool-says-404")
    assert not_found.status == 404
    assert not not_found.ok

    async with ProxyClient(proxy_url, raise_for_problem=False) as lenient:
        answer = await lenient.post("/items", json={"a": 3}, key="reused")
    assert answer.status == 422
    assert answer.headers["Content-Type"].startswith("application/problem+json")


async def test_a_proxy_that_is_not_listening_is_a_connection_error(run: AgentRun) -> None:
    async with ProxyClient(f"http://127.0.0.1:{free_port()}") as client:
        with run.operation("create_ticket", {}), pytest.raises(ProxyConnectionError, match="unreachable"):
            await client.post("/items", json={})


async def test_no_answer_in_time_is_a_timeout_and_a_retry_never_acts_twice(
    proxy_url: str, upstream: Upstream, run: AgentRun
) -> None:
    async with ProxyClient(proxy_url, timeout=0.3) as client:
        with run.operation("open_gate", {}) as opened, pytest.raises(ProxyTimeout):
            await client.post("/gate", json={})
    upstream.release.set()
    # The proxy's handler is not cancelled when its caller hangs up: the tool's late answer is
    # recorded, and the retry gets it (waiting for it if need be) instead of acting again.
    async with ProxyClient(proxy_url) as client:
        with run.operation("open_gate", {}) as retried:
            answer = await client.post("/gate", json={})
    assert retried.key == opened.key
    assert answer.headers["Idempotent-Replayed"] == "true"
    assert answer.headers["Idempotency-Operation"] == expected_operation_id(opened.key, route=ROUTE)
    assert upstream.count() == 1


async def test_the_lifecycle_is_explicit(proxy_url: str) -> None:
    client = ProxyClient(proxy_url)
    assert client.state is ClientState.UNOPENED
    await client.get("/items")  # opens on first use
    assert client.state is ClientState.OPENED
    await client.close()
    await client.close()
    assert client.state is ClientState.CLOSED
    with pytest.raises(RuntimeError, match="cannot be reopened"):
        await client.get("/items")


async def test_a_client_belongs_to_one_event_loop(proxy_client: ProxyClient) -> None:
    await proxy_client.open()
    with pytest.raises(RuntimeError, match="another event loop"):
        await asyncio.to_thread(asyncio.run, proxy_client.get("/items"))


@pytest.mark.parametrize("base_url", ["127.0.0.1:8080", "/relative", "ftp://host/"])
def test_the_base_url_must_be_an_http_url(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        ProxyClient(base_url)


async def test_paths_are_paths_on_the_proxy(proxy_client: ProxyClient) -> None:
    with pytest.raises(ValueError, match="absolute URL"):
        await proxy_client.get("http://elsewhere.example/items")

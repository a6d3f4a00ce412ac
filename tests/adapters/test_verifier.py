"""Verifier: operation state read from the admin API of a real proxy, and its failure modes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from idemproxy.adapters import (
    AgentRun,
    ObservedOperation,
    OperationNotFound,
    ProxyClient,
    ProxyConnectionError,
    ProxyProblem,
    UnexpectedResponse,
    Verifier,
    expected_operation_id,
)
from idemproxy.lifecycle.records import State
from tests.conftest import ProxyFactory
from tests.support.redis_server import free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
MISSING = "0" * 32


async def test_a_completed_call_is_observed_as_the_ledger_recorded_it(
    proxy_client: ProxyClient, admin_url: str, run: AgentRun
) -> None:
    with run.operation("create_ticket", {"title": "a"}) as opened:
        response = await proxy_client.post("/items", json={"title": "a"})
    async with Verifier(admin_url) as verifier:
        observed = await verifier.observe(opened.operation_ids[0])
        said = await verifier.check_operation(opened.operation_ids[0])
    assert observed.op_id == response.operation_id == expected_operation_id(opened.key, route="root")
    assert (observed.state, observed.attempt, observed.response_status) == (State.COMPLETED, 1, 201)
    assert observed.settled
    assert observed.record["task"] == "task-42"
    assert observed.next_step is not None
    assert said.startswith(f"Operation {observed.op_id} is COMPLETED after attempt 1")
    assert "must not be repeated" in said


async def test_an_unknown_outcome_is_observed_as_unsettled(
    make_proxy: ProxyFactory, admin_url: str, run: AgentRun
) -> None:
    client = await make_proxy(connect_timeout="1s", read_timeout="300ms", lease="10s")
    async with ProxyClient(str(client.make_url("/"))) as proxy:
        with run.operation("slow_tool", {}) as opened, pytest.raises(ProxyProblem) as caught:
            await proxy.post("/slow", json={})
    assert caught.value.slug == "upstream-timeout"
    async with Verifier(admin_url) as verifier:
        observed = await verifier.observe(opened.operation_ids[0])
        said = await verifier.check_operation(opened.operation_ids[0])
    assert observed.state in (State.UNKNOWN, State.NEEDS_ATTENTION)
    assert not observed.settled
    assert observed.next_step is not None
    assert observed.next_step in said
    assert "operator" in said


async def test_an_operation_the_ledger_never_saw_is_not_found(admin_url: str) -> None:
    async with Verifier(admin_url) as verifier:
        with pytest.raises(OperationNotFound):
            await verifier.observe(MISSING)
        assert "no record of operation" in await verifier.check_operation(MISSING)


@pytest.mark.parametrize("op_id", ["", "../healthz", "a/b", "x" * 256])
async def test_what_is_not_an_operation_id_is_never_requested(admin_url: str, op_id: str) -> None:
    async with Verifier(admin_url) as verifier:
        with pytest.raises(ValueError, match="not an operation id"):
            await verifier.observe(op_id)
        assert "not an operation id" in await verifier.check_operation(op_id)


async def test_an_admin_listener_that_is_down_is_a_connection_error() -> None:
    async with Verifier(f"http://127.0.0.1:{free_port()}") as verifier:
        with pytest.raises(ProxyConnectionError):
            await verifier.observe(MISSING)
        assert "could not be read" in await verifier.check_operation(MISSING)


def _answers() -> dict[str, Callable[[], web.Response]]:
    problem = b'{"type":"urn:idemproxy:problem:ledger-unavailable","status":503,"detail":"down"}'
    return {
        "a" * 32: lambda: web.Response(status=503, body=problem, content_type="application/problem+json"),
        "b" * 32: lambda: web.Response(status=200, text="<html>proxy login</html>", content_type="text/html"),
        "c" * 32: lambda: web.json_response({"operation": "c" * 32}),
        "d" * 32: lambda: web.json_response({"operation": "d" * 32, "state": "HALF_DONE"}),
        "e" * 32: lambda: web.Response(status=401, text="who are you?"),
    }


@pytest.fixture
async def faulty_admin_url(aiohttp_server: ServerFactory) -> str:
    """Answers the real admin API gives only under faults (ledger down, a broken
    deployment in front of it), from a real aiohttp server."""
    answers = _answers()

    async def show(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer admin-token":
            return web.Response(status=401)
        return answers[request.match_info["op_id"]]()

    app = web.Application()
    app.router.add_get("/_idem/ops/{op_id}", show)
    server = await aiohttp_server(app)
    return str(server.make_url("/")).rstrip("/")


@pytest.mark.parametrize(
    ("op_id", "error", "message"),
    [
        ("a" * 32, ProxyProblem, "ledger-unavailable"),
        ("b" * 32, UnexpectedResponse, "not JSON"),
        ("c" * 32, UnexpectedResponse, "no operation record"),
        ("d" * 32, UnexpectedResponse, "unknown state 'HALF_DONE'"),
        ("e" * 32, UnexpectedResponse, "answered 401"),
    ],
)
async def test_answers_that_are_not_a_record_are_errors_that_say_so(
    faulty_admin_url: str, op_id: str, error: type[Exception], message: str
) -> None:
    async with Verifier(faulty_admin_url, headers={"Authorization": "Bearer admin-token"}) as verifier:
        with pytest.raises(error, match=message):
            await verifier.observe(op_id)
        assert message in await verifier.check_operation(op_id)


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ("COMPLETED", "must not be repeated"),
        ("RELEASED", "Retrying with the same key is safe"),
        ("PENDING", "in flight"),
        ("UNKNOWN", "Do not retry blindly"),
        ("NEEDS_ATTENTION", "An operator must resolve it"),
    ],
)
def test_every_state_has_a_meaning_for_the_next_step(state: str, words: str) -> None:
    record = {"operation": "f" * 32, "state": state, "attempt": 2, "next": "Proxy says so."}
    said = ObservedOperation.from_record("f" * 32, record).summary()
    assert words in said
    assert said.endswith("Proxy: Proxy says so.")

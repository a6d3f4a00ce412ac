"""The operation context: which headers a request gets, and where the context reaches."""

from __future__ import annotations

import asyncio

import pytest

from idemproxy.adapters import AgentRun, NoOperation, Operation, current_operation, operation_headers
from idemproxy.protocol import HeaderNames

URL = "http://proxy:8080/items"


def test_a_side_effecting_request_carries_the_key_and_the_task(run: AgentRun) -> None:
    with run.operation("create_ticket", {"title": "a"}, call_id="call_1") as opened:
        headers = operation_headers("POST", URL, b'{"title":"a"}', content_type="application/json")
    assert headers == {"Idempotency-Key": opened.key, "X-Agent-Task": "task-42"}
    assert (opened.tool, opened.call_id, opened.run_id) == ("create_ticket", "call_1", "task-42")


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "get"])
def test_a_safe_request_carries_the_task_only(run: AgentRun, method: str) -> None:
    with run.operation("look_up", {}):
        assert operation_headers(method, URL) == {"X-Agent-Task": "task-42"}


def test_configured_header_names_are_used(run: AgentRun) -> None:
    names = HeaderNames(key="X-Op-Key", caller="X-Who", task="X-Run")
    with run.operation("create_ticket", {}) as opened:
        assert operation_headers("POST", URL, names=names) == {"X-Op-Key": opened.key, "X-Run": "task-42"}


def test_outside_an_operation_a_side_effect_is_refused_and_a_read_is_plain() -> None:
    with pytest.raises(NoOperation, match=r"asyncio\.to_thread"):
        operation_headers("POST", URL)
    assert operation_headers("GET", URL) == {}
    assert current_operation() is None


def test_distinct_requests_of_one_call_get_distinct_keys_and_a_resent_one_its_own_again(run: AgentRun) -> None:
    with run.operation("create_and_comment", {"title": "a"}) as opened:
        create = opened.key_for("POST", URL, b'{"title": "a"}', "application/json")
        comment = opened.key_for("POST", URL + "/1/comments", b'{"text": "hi"}', "application/json")
        create_again = opened.key_for("POST", URL, b'{ "title":"a" }', "application/json")
        close = opened.key_for("PATCH", URL + "/1", b'{"state": "closed"}', "application/json")
    assert create == opened.key
    assert comment == f"{opened.key}/2"
    assert create_again == create
    assert close == f"{opened.key}/3"


def test_a_re_executed_call_reuses_every_key(run: AgentRun) -> None:
    def keys_of_one_execution() -> list[str]:
        with run.operation("create_and_comment", {"title": "a"}) as opened:
            return [opened.key_for("POST", URL, b"1"), opened.key_for("POST", URL + "/c", b"2")]

    assert keys_of_one_execution() == keys_of_one_execution()


def test_operations_nest_and_unwind(run: AgentRun) -> None:
    with run.operation("outer", {}) as outer:
        with run.operation("inner", {}) as inner:
            assert current_operation() is inner
        assert current_operation() is outer
    assert current_operation() is None


async def test_the_operation_reaches_tasks_and_to_thread_but_not_run_in_executor(run: AgentRun) -> None:
    """Why the adapters run synchronous tools with asyncio.to_thread."""

    def seen() -> Operation | None:
        return current_operation()

    async def in_task() -> Operation | None:
        return current_operation()

    loop = asyncio.get_running_loop()
    with run.operation("create_ticket", {}) as opened:
        assert await asyncio.create_task(in_task()) is opened
        assert await asyncio.to_thread(seen) is opened
        assert await loop.run_in_executor(None, seen) is None


def test_observed_operation_ids_are_kept_once_in_order(run: AgentRun) -> None:
    with run.operation("t", {}) as opened:
        for op_id in ("b", "a", "b"):
            opened.observe(op_id)
    assert opened.operation_ids == ["b", "a"]

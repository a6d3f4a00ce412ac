"""Budgets through the real proxy, on both stores: per identity and per task calls in a
sliding window, attempts per operation, what is charged and what a refused caller gets.

Windows are measured on an injected clock (``budget_clock``) that the tests move; the
upstream counts every side effect it performs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from idemproxy.app import build_proxy_app
from idemproxy.config.settings import StoreConfig, parse_config
from idemproxy.lifecycle.records import State
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store import Store, open_store
from idemproxy.store.base import OpsQuery
from idemproxy.store.redis import RedisStore
from tests.support.answers import watching
from tests.support.auth import EXECUTOR2_TOKEN, EXECUTOR_TOKEN, bearer, identities, write_identities
from tests.support.clock import Clock
from tests.support.problems import assert_problem
from tests.support.proxy_server import proxy_app
from tests.support.upstream import Upstream

Client = TestClient[Any, Any]
ROUTE = "tools"


ProxyFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_proxy(
    aiohttp_client: Callable[..., Awaitable[Client]], store: Store, upstream: Upstream, clock: Clock
) -> ProxyFactory:
    """``await make_proxy(budgets, identities=[...], **route_policy)``."""

    async def factory(
        budgets: dict[str, Any] | None = None, *, identities_file: Path | None = None, **route: Any
    ) -> Client:
        raw: dict[str, Any] = {
            "store": "sqlite:///unused.db",
            "routes": [{"prefix": "/", "name": ROUTE, "upstream": upstream.url, **route}],
        }
        if budgets is not None:
            raw["budgets"] = budgets
        if identities_file is not None:
            raw["auth"] = {"identities_file": str(identities_file)}
        return await aiohttp_client(build_proxy_app(parse_config(raw), store, budget_clock=clock))

    return factory


def with_budgets(directory: Path, **budgets: dict[str, Any]) -> Path:
    """The test identities file, with ``budgets`` for the identities named."""
    secret = directory / "signer.key"
    secret.write_bytes(b"signer-secret-0123456789abcdef\n")
    items = [
        {**item, "budgets": budgets[item["name"]]} if item["name"] in budgets else item for item in identities(secret)
    ]
    return write_identities(directory / "identities.yaml", items)


async def post(
    proxy: Client,
    key: str,
    *,
    path: str = "/items",
    caller: str | None = None,
    task: str | None = None,
    token: str | None = None,
) -> Any:
    headers = {"Idempotency-Key": key}
    if caller is not None:
        headers["X-Idem-Caller"] = caller
    if task is not None:
        headers["X-Agent-Task"] = task
    if token is not None:
        headers.update(bearer(token))
    return await proxy.post(path, json={"key": key}, headers=headers)


async def refused(response: Any) -> dict[str, Any]:
    body = await assert_problem(response, 429, "budget-exceeded")
    assert response.headers["Retry-After"] == str(body["retry_after"])
    return body


def op_id(key: str, caller: str = "anonymous") -> str:
    return operation_id(Scope(caller=caller, route=ROUTE, key=key))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- calls per identity ----------------------------------------------------------------------------


async def test_identity_calls_are_capped_in_a_sliding_window(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, clock: Clock
) -> None:
    proxy = await make_proxy({"identity": {"calls": "2/1m"}})
    assert (await post(proxy, "k1", caller="bot")).status == 201
    assert (await post(proxy, "k2", caller="bot")).status == 201

    body = await refused(await post(proxy, "k3", caller="bot"))
    assert body["budget"] == "identity-calls"
    assert (body["identity"], body["limit"], body["window"], body["retry_after"]) == ("bot", 2, 60, 60)
    assert "'bot'" in body["detail"]
    assert "task" not in body
    assert upstream.count() == 2
    assert await store.get(op_id("k3", "bot")) is None  # nothing recorded for a refused request

    clock.advance(30)
    assert (await refused(await post(proxy, "k3", caller="bot")))["retry_after"] == 30
    clock.advance(30)  # both charges slide out of the window
    assert (await post(proxy, "k3", caller="bot")).status == 201
    assert upstream.count() == 3


async def test_retry_after_is_when_the_oldest_charge_in_the_window_slides_out(
    make_proxy: ProxyFactory, clock: Clock
) -> None:
    proxy = await make_proxy({"identity": {"calls": "2/60s"}})
    assert (await post(proxy, "k1")).status == 201
    clock.advance(10)
    assert (await post(proxy, "k2")).status == 201
    clock.advance(10)
    assert (await refused(await post(proxy, "k3")))["retry_after"] == 40
    clock.advance(39.5)
    assert (await refused(await post(proxy, "k3")))["retry_after"] == 1  # rounded up, never 0
    clock.advance(0.5)
    assert (await post(proxy, "k3")).status == 201
    assert (await refused(await post(proxy, "k4")))["retry_after"] == 10  # now k2's charge is the oldest


async def test_each_caller_has_its_own_counter(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1h"}})
    assert (await post(proxy, "k1", caller="planner-bot")).status == 201
    await refused(await post(proxy, "k2", caller="planner-bot"))
    assert (await post(proxy, "k2", caller="writer-bot")).status == 201
    assert (await post(proxy, "k2")).status == 201  # anonymous is a caller too
    assert upstream.count() == 3


async def test_concurrent_new_operations_never_exceed_the_budget(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_proxy({"identity": {"calls": "3/1m"}})
    responses = await asyncio.gather(*(post(proxy, f"k{n}") for n in range(12)))
    assert sorted(response.status for response in responses) == [201] * 3 + [429] * 9
    assert upstream.count() == 3
    assert len(await store.query(OpsQuery())) == 3  # the refused reservations were withdrawn


async def test_concurrent_duplicates_of_a_refused_operation_are_all_refused_and_leave_no_record(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    """Duplicates that find the refused attempt's reservation wait for it; its withdrawal
    wakes them, and each then tries as a new attempt of its own."""
    proxy = await make_proxy({"identity": {"calls": "1/1m"}}, wait="30s")
    assert (await post(proxy, "k0")).status == 201
    responses = await asyncio.gather(*(post(proxy, "k1") for _ in range(10)))
    assert [response.status for response in responses] == [429] * 10
    assert upstream.count() == 1
    assert await store.get(op_id("k1")) is None


# -- what is never charged ---------------------------------------------------------------------------


async def test_replays_are_never_charged_nor_refused(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1m"}})
    first = await post(proxy, "k1")
    assert first.status == 201
    await refused(await post(proxy, "k2"))  # the budget is spent
    for _ in range(3):
        replay = await post(proxy, "k1")
        assert replay.status == 201
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert await replay.read() == await first.read()
    assert upstream.count() == 1


async def test_a_duplicate_waiting_for_the_first_attempt_is_not_charged(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1m"}}, wait="20s")
    first = asyncio.create_task(post(proxy, "k1", path="/gate"))
    await upstream.arrived.wait()
    async with watching(store) as waiting:
        duplicate = asyncio.create_task(post(proxy, "k1", path="/gate"))
        await waiting.wait()
        upstream.release.set()
        answers = await asyncio.gather(first, duplicate)
    assert [answer.status for answer in answers] == [201, 201]
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert upstream.count() == 1


async def test_safe_methods_are_not_charged(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1m"}})
    for _ in range(3):
        assert (await proxy.get("/items")).status == 201  # the test tool answers every method alike
    assert (await post(proxy, "k1")).status == 201
    await refused(await post(proxy, "k2"))


async def test_a_request_no_budget_applies_to_costs_no_store_call(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"task": {"calls": "1/1m"}})
    before = sample("idemproxy_ledger_duration_seconds_count", operation="charge")
    for n in range(3):
        assert (await post(proxy, f"k{n}")).status == 201  # no X-Agent-Task: no budget applies
    assert sample("idemproxy_ledger_duration_seconds_count", operation="charge") == before


async def test_without_budgets_or_auth_the_proxy_has_no_budgets_at_all(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    assert proxy_app(proxy).budgets is None


async def test_unrecorded_calls_on_an_optional_key_route_are_charged_too(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, clock: Clock
) -> None:
    proxy = await make_proxy({"identity": {"calls": "2/1m"}}, key_mode="optional")
    for _ in range(2):
        assert (await proxy.post("/items", json={}, headers={"X-Idem-Caller": "bot"})).status == 201
    unrecorded = sample("idemproxy_requests_total", route=ROUTE, method="POST", decision="unrecorded")
    body = await refused(await proxy.post("/items", json={}, headers={"X-Idem-Caller": "bot"}))
    assert (body["budget"], body["retry_after"]) == ("identity-calls", 60)
    assert sample("idemproxy_requests_total", route=ROUTE, method="POST", decision="unrecorded") == unrecorded
    await refused(await post(proxy, "k1", caller="bot"))  # the same budget covers recorded calls
    assert upstream.count() == 2
    assert await store.query(OpsQuery()) == []
    clock.advance(60)
    assert (await proxy.post("/items", json={}, headers={"X-Idem-Caller": "bot"})).status == 201


# -- calls per task ------------------------------------------------------------------------------------


async def test_a_task_budget_is_shared_by_every_identity_on_the_task(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    proxy = await make_proxy({"task": {"calls": "3/1h"}}, identities_file=with_budgets(tmp_path))
    for n, token in enumerate([EXECUTOR_TOKEN, EXECUTOR2_TOKEN, EXECUTOR_TOKEN]):
        assert (await post(proxy, f"k{n}", task="refine-42", token=token)).status == 201

    body = await refused(await post(proxy, "k3", task="refine-42", token=EXECUTOR2_TOKEN))
    assert (body["budget"], body["task"], body["limit"], body["window"]) == ("task-calls", "refine-42", 3, 3600)
    assert body["retry_after"] == 3600
    assert "identity" not in body
    assert (await post(proxy, "k3", task="refine-43", token=EXECUTOR2_TOKEN)).status == 201  # another task
    assert (await post(proxy, "k4", token=EXECUTOR2_TOKEN)).status == 201  # no task
    assert upstream.count() == 5


async def test_when_both_budgets_are_spent_the_one_freeing_last_is_named(
    make_proxy: ProxyFactory, clock: Clock
) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1m"}, "task": {"calls": "1/1h"}})
    assert (await post(proxy, "k1", task="t")).status == 201
    body = await refused(await post(proxy, "k2", task="t"))
    assert (body["budget"], body["retry_after"]) == ("task-calls", 3600)
    clock.advance(60)
    body = await refused(await post(proxy, "k2", task="t"))
    assert (body["budget"], body["retry_after"]) == ("task-calls", 3540)
    assert (await post(proxy, "k2", task="another")).status == 201  # the identity's window has room again


async def test_a_refused_task_charge_leaves_the_identity_uncharged(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"identity": {"calls": "2/1m"}, "task": {"calls": "1/1m"}})
    assert (await post(proxy, "k1", task="t")).status == 201
    for _ in range(3):
        assert (await refused(await post(proxy, "k2", task="t")))["budget"] == "task-calls"
    assert (await post(proxy, "k2", task="u")).status == 201  # the refusals spent none of the identity's 2
    assert (await refused(await post(proxy, "k3", task="v")))["budget"] == "identity-calls"


# -- retries of released operations ----------------------------------------------------------------


async def test_a_refused_retry_keeps_its_operation_for_after_the_window(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store, clock: Clock
) -> None:
    proxy = await make_proxy({"identity": {"calls": "1/1m"}})
    assert (await post(proxy, "k1", path="/status/503")).status == 503  # not applied: released for retry
    body = await refused(await post(proxy, "k1", path="/status/503"))  # a new attempt: charged
    assert body["budget"] == "identity-calls"
    record = await store.get(op_id("k1"))
    assert record is not None
    assert (record.state, record.attempt) == (State.RELEASED, 1)  # the refused attempt was given back
    assert record.evidence[-1].kind == "withdrawn"
    assert record.evidence[-1].detail == {"budget": "identity-calls", "attempt": 2}

    clock.advance(60)
    assert (await post(proxy, "k1", path="/status/503")).status == 503
    record = await store.get(op_id("k1"))
    assert record is not None
    assert (record.state, record.attempt) == (State.RELEASED, 2)
    assert upstream.count() == 2


# -- attempts per operation ------------------------------------------------------------------------


async def test_attempts_per_operation_caps_retries_below_the_route(
    make_proxy: ProxyFactory, upstream: Upstream, store: Store
) -> None:
    proxy = await make_proxy({"identity": {"attempts_per_operation": 2}}, max_attempts=5, retention="1h")
    for _ in range(2):
        assert (await post(proxy, "k1", path="/status/503")).status == 503
    body = await refused(await post(proxy, "k1", path="/status/503"))
    assert (body["budget"], body["limit"], body["attempt"]) == ("attempts", 2, 2)
    assert body["operation"] == op_id("k1")
    assert "window" not in body
    # Nothing frees an attempt: the key becomes new once its record expires (the route's retention).
    assert 3500 < body["retry_after"] <= 3600
    assert "a new key is a new operation" in body["detail"]
    assert upstream.count() == 2
    record = await store.get(op_id("k1"))
    assert record is not None
    assert (record.state, record.attempt) == (State.RELEASED, 2)


async def test_the_routes_lower_max_attempts_still_answers_as_exhausted(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy({"identity": {"attempts_per_operation": 3}}, max_attempts=1)
    assert (await post(proxy, "k1", path="/status/503")).status == 503
    await assert_problem(await post(proxy, "k1", path="/status/503"), 429, "attempts-exhausted")
    assert upstream.count() == 1


# -- an identity's own budgets ---------------------------------------------------------------------


async def test_an_identitys_budgets_replace_the_defaults_key_by_key(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    identities_file = with_budgets(
        tmp_path, executor={"calls": "unlimited"}, executor2={"calls": "2/1m", "attempts_per_operation": 2}
    )
    proxy = await make_proxy(
        {"identity": {"calls": "1/1m", "attempts_per_operation": 1}}, identities_file=identities_file
    )
    for n in range(4):
        assert (await post(proxy, f"k{n}", token=EXECUTOR_TOKEN)).status == 201
    # executor kept the default attempts_per_operation of 1.
    assert (await post(proxy, "retried", path="/status/503", token=EXECUTOR_TOKEN)).status == 503
    body = await refused(await post(proxy, "retried", path="/status/503", token=EXECUTOR_TOKEN))
    assert (body["budget"], body["limit"], body["identity"]) == ("attempts", 1, "executor")

    assert (await post(proxy, "k0", token=EXECUTOR2_TOKEN)).status == 201
    assert (await post(proxy, "k1", path="/status/503", token=EXECUTOR2_TOKEN)).status == 503
    body = await refused(await post(proxy, "k2", token=EXECUTOR2_TOKEN))
    assert (body["budget"], body["limit"], body["identity"]) == ("identity-calls", 2, "executor2")
    assert upstream.count() == 7


async def test_identity_budgets_change_when_the_identities_file_is_reloaded(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(identities_file=with_budgets(tmp_path, executor={"calls": "1/1m"}))
    assert (await post(proxy, "k1", token=EXECUTOR_TOKEN)).status == 201
    await refused(await post(proxy, "k2", token=EXECUTOR_TOKEN))
    with_budgets(tmp_path, executor={"calls": "3/1m"})
    assert proxy_app(proxy).authenticator.identities.reload()
    assert (await post(proxy, "k2", token=EXECUTOR_TOKEN)).status == 201


# -- when the counters cannot be charged -------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_store_error", "status"), [("fail_closed", 503), ("fail_open", 201)], ids=["fail_closed", "fail_open"]
)
async def test_a_counter_that_cannot_be_charged_follows_the_routes_failure_mode(
    aiohttp_client: Callable[..., Awaitable[Client]],
    redis_url: str,
    upstream: Upstream,
    on_store_error: str,
    status: int,
) -> None:
    store = open_store(StoreConfig(url=redis_url))
    await store.start()
    assert isinstance(store, RedisStore)
    # A real Redis error on the counter alone: its key holds a string, so the charge script fails.
    broken = aioredis.Redis.from_url(redis_url)
    await broken.set(store.keys.budget("identity:bot"), "not a counter")
    await broken.aclose()
    try:
        config = parse_config(
            {
                "budgets": {"identity": {"calls": "5/1m"}},
                "routes": [{"prefix": "/", "name": ROUTE, "upstream": upstream.url, "on_store_error": on_store_error}],
            }
        )
        proxy = await aiohttp_client(build_proxy_app(config, store))
        response = await post(proxy, "k1", caller="bot")
        assert response.status == status
        record = await store.get(op_id("k1", "bot"))
        if on_store_error == "fail_closed":
            await assert_problem(response, 503, "ledger-unavailable")
            assert record is None  # the reservation was withdrawn: nothing sent, nothing recorded
            assert upstream.count() == 0
        else:
            assert record is not None
            assert record.state is State.COMPLETED  # forwarded uncharged, and recorded as usual
            assert upstream.count() == 1
        await proxy.close()
    finally:
        await store.close()


# -- metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budgets", "path", "kind"),
    [
        pytest.param({"identity": {"calls": "1/1m"}}, "/items", "identity-calls", id="identity-calls"),
        pytest.param({"task": {"calls": "1/1m"}}, "/items", "task-calls", id="task-calls"),
        pytest.param({"identity": {"attempts_per_operation": 1}}, "/status/503", "attempts", id="attempts"),
    ],
)
async def test_refusals_are_counted_by_budget_and_as_a_decision(
    make_proxy: ProxyFactory, budgets: dict[str, Any], path: str, kind: str
) -> None:
    proxy = await make_proxy(budgets)
    before = {
        "refusals": sample("idemproxy_budget_refusals_total", route=ROUTE, kind=kind),
        "decision": sample("idemproxy_requests_total", route=ROUTE, method="POST", decision="budget_exceeded"),
    }
    assert (await post(proxy, "k1", path=path, task="t")).status != 429
    retried_key = "k1" if kind == "attempts" else "k2"
    assert (await refused(await post(proxy, retried_key, path=path, task="t")))["budget"] == kind
    assert sample("idemproxy_budget_refusals_total", route=ROUTE, kind=kind) == before["refusals"] + 1
    decided = sample("idemproxy_requests_total", route=ROUTE, method="POST", decision="budget_exceeded")
    assert decided == before["decision"] + 1

"""Metrics, read the way Prometheus reads them: every decision the proxy can make, counted.

Each decision is driven through the in-process proxy (both stores) and read back from the
admin app's ``/metrics`` with the right labels (``idemproxy_decisions_total``, what a
duplicate was prevented from doing, probes and reconciliation), and so is a ledger outage
(fail_closed, fail_open, store errors). The prometheus-client registry is
process-global, so counters are compared as deltas (after minus before), never as
absolute values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from idemproxy.app import build_admin_app, build_proxy_app, refresh_unresolved_once
from idemproxy.config.settings import StoreConfig, parse_config
from idemproxy.metrics import DECISIONS, PREVENTED
from idemproxy.store import open_store
from idemproxy.wire.upstream_client import FailureKind
from tests.support.answers import watching
from tests.support.metrics import Client, Delta, Env, EnvFactory, scrape
from tests.support.problems import problem_type
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream

LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}
UNDECIDABLE = {"url": "{upstream}/probe-status/500", "match": "matches[0]"}
PROBE_RESULTS = ("found", "absent", "unknown")
RECONCILE_OUTCOMES = ("found", "absent", "escalated", "resolved")
FAILURE_KINDS = tuple(kind.value for kind in FailureKind)


# -- every decision, counted with the right labels --------------------------------------------


async def forward_once(env: Env) -> None:
    assert (await env.proxy.post("/items", json={"n": 1}, headers={"Idempotency-Key": "k"})).status == 201


async def forward_then_replay(env: Env) -> None:
    first = await env.proxy.post("/items", json={"n": 1}, headers={"Idempotency-Key": "k"})
    second = await env.proxy.post("/items", json={"n": 1}, headers={"Idempotency-Key": "k"})
    assert (first.status, second.status) == (201, 201)
    assert second.headers["Idempotent-Replayed"] == "true"


async def wait_for_in_flight_then_replay(env: Env) -> None:
    first = asyncio.create_task(env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "k"}))
    await env.upstream.arrived.wait()
    async with watching(env.store) as waiting:
        duplicate = asyncio.create_task(env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "k"}))
        await waiting.wait()
        env.upstream.release.set()
        answers = await asyncio.gather(first, duplicate)
    assert [answer.status for answer in answers] == [201, 201]


async def lost_ack_then_reconciled(env: Env) -> None:
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})).status == 502
    retry = await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})
    assert retry.status == 201
    assert retry.headers["Idempotent-Reconciled"] == "true"


async def in_flight_past_the_wait_bound(env: Env) -> None:
    first = asyncio.create_task(env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "k"}))
    await env.upstream.arrived.wait()
    duplicate = await env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "k"})
    assert await problem_type(duplicate) == "operation-in-flight"
    env.upstream.release.set()
    assert (await first).status == 201


async def reuse_key_for_another_request(env: Env) -> None:
    assert (await env.proxy.post("/items", json={"n": 1}, headers={"Idempotency-Key": "k"})).status == 201
    other = await env.proxy.post("/items", json={"n": 2}, headers={"Idempotency-Key": "k"})
    assert await problem_type(other) == "fingerprint-mismatch"


async def lost_ack_then_undecidable_probe(env: Env) -> None:
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})).status == 502
    retry = await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})
    assert await problem_type(retry) == "outcome-unknown"


async def lost_ack_without_reconcile_method(env: Env) -> None:
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})).status == 502
    retry = await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})
    assert await problem_type(retry) == "needs-attention"


async def large_response_then_duplicate(env: Env) -> None:
    assert (await env.proxy.post("/big/4096", json={}, headers={"Idempotency-Key": "k"})).status == 200
    duplicate = await env.proxy.post("/big/4096", json={}, headers={"Idempotency-Key": "k"})
    assert await problem_type(duplicate) == "response-not-stored"


async def not_applied_until_exhausted(env: Env) -> None:
    assert (await env.proxy.post("/status/503", json={}, headers={"Idempotency-Key": "k"})).status == 503
    again = await env.proxy.post("/status/503", json={}, headers={"Idempotency-Key": "k"})
    assert await problem_type(again) == "attempts-exhausted"


async def no_key(env: Env) -> None:
    response = await env.proxy.post("/items", json={})
    assert await problem_type(response) == "missing-idempotency-key"


async def no_key_on_optional_route(env: Env) -> None:
    assert (await env.proxy.post("/items", json={})).status == 201


async def safe_method(env: Env) -> None:
    assert (await env.proxy.get("/items")).status == 201


async def timeout_then_proven_absent_then_forwarded(env: Env) -> None:
    assert (await env.proxy.post("/flaky", json={}, headers={"Idempotency-Key": "k"})).status == 504
    env.upstream.flaky_ok = True
    retry = await env.proxy.post("/flaky", json={}, headers={"Idempotency-Key": "k"})
    assert retry.status == 201
    assert "Idempotent-Reconciled" not in retry.headers


async def lost_ack_resolved_by_an_operator(env: Env) -> None:
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})).status == 502
    resolved = await env.admin.post(
        f"/_idem/ops/{env.op_id('k')}/resolve",
        json={"outcome": "done", "response": {"status": 201, "body": {"id": 7}}, "by": "test"},
    )
    assert resolved.status == 200
    retry = await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "k"})
    assert (retry.status, await retry.json()) == (201, {"id": 7})


@dataclass(frozen=True)
class Scenario:
    name: str
    drive: Callable[[Env], Awaitable[None]]
    decisions: dict[str, int]
    policy: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)
    reconciled: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    method: str = "POST"


SCENARIOS = [
    Scenario("forwarded", forward_once, {"forwarded": 1}),
    Scenario("replayed", forward_then_replay, {"forwarded": 1, "replayed": 1}),
    Scenario(
        "waited_replayed", wait_for_in_flight_then_replay, {"forwarded": 1, "waited_replayed": 1}, {"wait": "20s"}
    ),
    Scenario(
        "reconciled_found",
        lost_ack_then_reconciled,
        {"forwarded": 1, "reconciled_found": 1},
        {"reconcile": {"probe": LOOKUP, "found": {"status": 201}}},
        probes={"found": 1},
        reconciled={"found": 1},
        failures={"connection-lost": 1},
    ),
    Scenario("conflict", in_flight_past_the_wait_bound, {"forwarded": 1, "conflict": 1}, {"wait": "200ms"}),
    Scenario("mismatch", reuse_key_for_another_request, {"forwarded": 1, "mismatch": 1}),
    Scenario(
        "unknown",
        lost_ack_then_undecidable_probe,
        {"forwarded": 1, "unknown": 1},
        {"reconcile": {"probe": UNDECIDABLE, "max_probes": 3, "backoff": "1h"}},
        probes={"unknown": 1},
        failures={"connection-lost": 1},
    ),
    Scenario(
        "needs_attention",
        lost_ack_without_reconcile_method,
        {"forwarded": 1, "needs_attention": 1},
        reconciled={"escalated": 1},
        failures={"connection-lost": 1},
    ),
    Scenario(
        "not_stored", large_response_then_duplicate, {"forwarded": 1, "not_stored": 1}, {"max_stored_response": "1KiB"}
    ),
    Scenario("exhausted", not_applied_until_exhausted, {"forwarded": 1, "exhausted": 1}, {"max_attempts": 1}),
    Scenario("rejected", no_key, {"rejected": 1}),
    Scenario("unrecorded", no_key_on_optional_route, {"unrecorded": 1}, {"key_mode": "optional"}),
    Scenario("passthrough", safe_method, {"passthrough": 1}, method="GET"),
    Scenario(
        "absent",
        timeout_then_proven_absent_then_forwarded,
        {"forwarded": 2},
        {
            "connect_timeout": "1s",
            "read_timeout": "200ms",
            "lease": "5s",
            "reconcile": {"probe": LOOKUP, "settle": "50ms"},
        },
        probes={"absent": 1},
        reconciled={"absent": 1},
        failures={"timeout": 1},
    ),
    Scenario(
        "resolved",
        lost_ack_resolved_by_an_operator,
        {"forwarded": 1, "replayed": 1},
        reconciled={"resolved": 1},
        failures={"connection-lost": 1},
    ),
]
#: Decisions counted by other tests: the ledger outage test here, budget refusals in test_budgets;
#: and 500s, which only a bug produces.
COUNTED_ELSEWHERE = {"fail_closed", "fail_open", "budget_exceeded"}
NOT_PRODUCIBLE = {"error"}


def test_every_decision_is_driven_by_some_test() -> None:
    driven = {decision for scenario in SCENARIOS for decision in scenario.decisions}
    assert driven | COUNTED_ELSEWHERE | NOT_PRODUCIBLE == set(DECISIONS)
    assert not (driven | COUNTED_ELSEWHERE) & NOT_PRODUCIBLE


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
async def test_each_decision_is_counted_with_its_route_and_method(make_env: EnvFactory, scenario: Scenario) -> None:
    env = await make_env(f"m-{scenario.name}", **scenario.policy)
    delta = await env.measure(scenario.drive)
    route = env.route

    for decision in DECISIONS:
        expected = scenario.decisions.get(decision, 0)
        assert delta("idemproxy_requests_total", route=route, decision=decision) == expected, decision
        assert delta("idemproxy_requests_total", route=route, method=scenario.method, decision=decision) == expected
    prevented = sum(count for decision, count in scenario.decisions.items() if decision in PREVENTED)
    assert delta("idemproxy_duplicate_side_effects_prevented_total", route=route) == prevented
    for result in PROBE_RESULTS:
        assert delta("idemproxy_reconciler_probes_total", route=route, result=result) == scenario.probes.get(result, 0)
    for outcome in RECONCILE_OUTCOMES:
        expected = scenario.reconciled.get(outcome, 0)
        assert delta("idemproxy_reconciled_operations_total", route=route, outcome=outcome) == expected, outcome
    for kind in FAILURE_KINDS:
        assert delta("idemproxy_upstream_failures_total", route=route, kind=kind) == scenario.failures.get(kind, 0)


# -- ledger outage: fail_closed, fail_open, store errors -------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_store_outage_counts_fail_closed_fail_open_and_store_errors(
    aiohttp_client: Callable[..., Awaitable[Client]], upstream: Upstream, private_redis: RedisServer
) -> None:
    store = open_store(StoreConfig(url=private_redis.url, socket_timeout_s=0.5))
    await store.start()
    try:
        config = parse_config(
            {
                "store": private_redis.url,
                "routes": [
                    {"prefix": "/closed", "name": "m-outage-closed", "upstream": upstream.url, "strip_prefix": True},
                    {
                        "prefix": "/open",
                        "name": "m-outage-open",
                        "upstream": upstream.url,
                        "strip_prefix": True,
                        "on_store_error": "fail_open",
                    },
                ],
            }
        )
        proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
        admin = await aiohttp_client(build_admin_app(store, config))
        before = await scrape(admin)
        private_redis.kill()

        closed = await proxy.post("/closed/items", json={}, headers={"Idempotency-Key": "k"})
        opened = await proxy.post("/open/items", json={}, headers={"Idempotency-Key": "k"})
        await refresh_unresolved_once(store)
        delta = Delta(before, await scrape(admin))
    finally:
        await store.close()

    assert await problem_type(closed) == "ledger-unavailable"
    assert opened.status == 201
    assert upstream.count() == 1
    assert delta("idemproxy_requests_total", route="m-outage-closed", method="POST", decision="fail_closed") == 1
    assert delta("idemproxy_requests_total", route="m-outage-closed") == 1
    assert delta("idemproxy_requests_total", route="m-outage-open", method="POST", decision="fail_open") == 1
    assert delta("idemproxy_requests_total", route="m-outage-open") == 1
    assert delta("idemproxy_store_errors_total", operation="reserve") == 2
    # At least this test's refresh; the admin app's own refresher may have failed too.
    assert delta("idemproxy_store_errors_total", operation="count") >= 1
    assert delta("idemproxy_duplicate_side_effects_prevented_total") == 0
    assert delta("idemproxy_upstream_duration_seconds_count", route="m-outage-open", method="POST") == 1
    assert delta("idemproxy_upstream_duration_seconds_count", route="m-outage-closed") == 0

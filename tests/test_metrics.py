"""Metrics and the access log, read the way Prometheus and an operator read them.

Every decision the proxy can make in a test is driven through the in-process
proxy (both stores) and read back from the admin app's ``/metrics``. The
prometheus-client registry is process-global, so counters are compared as
deltas (after minus before), never as absolute values.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from idemproxy.app import build_admin_app, build_proxy_app, refresh_unresolved_once
from idemproxy.config import ProxyConfig, StoreConfig, parse_config
from idemproxy.decisions import FailureKind
from idemproxy.fingerprint import operation_id
from idemproxy.logs import JsonFormatter
from idemproxy.metrics import DECISIONS, PREVENTED
from idemproxy.records import Scope, State
from idemproxy.store import Store, open_store
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream
from tests.test_duplicates import problem_type, watching

Client = TestClient[Any, Any]
PROBLEM = "application/problem+json"
LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}
UNDECIDABLE = {"url": "{upstream}/probe-status/500", "match": "matches[0]"}
PROBE_RESULTS = ("found", "absent", "unknown")
RECONCILE_OUTCOMES = ("found", "absent", "escalated", "resolved")
FAILURE_KINDS = tuple(kind.value for kind in FailureKind)
LEDGER_OPERATIONS = ("reserve", "take_over", "record")


# -- reading the exposition -----------------------------------------------------------------


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == wanted for key, wanted in labels.items())
        )

    def label_values(self) -> Iterator[tuple[str, str, str]]:
        for sample in self.samples:
            for label, value in sample.labels.items():
                yield sample.name, label, value


async def scrape(admin: Client) -> Scrape:
    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(await response.text())


@dataclass
class Delta:
    before: Scrape
    after: Scrape

    def __call__(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


# -- the proxy under test ---------------------------------------------------------------------


@dataclass
class Env:
    proxy: Client
    admin: Client
    upstream: Upstream
    store: Store
    route: str

    def op_id(self, key: str, caller: str = "anonymous") -> str:
        return operation_id(Scope(caller=caller, route=self.route, key=key))

    async def measure(self, drive: Callable[[Env], Awaitable[None]]) -> Delta:
        before = await scrape(self.admin)
        await drive(self)
        return Delta(before, await scrape(self.admin))


EnvFactory = Callable[..., Awaitable[Env]]


def config_for(upstream: Upstream, route: str, log_keys: bool = False, **policy: Any) -> ProxyConfig:
    return parse_config(
        {
            "store": "sqlite:///unused.db",
            "log_keys": log_keys,
            "routes": [{"prefix": "/", "name": route, "upstream": upstream.url, **policy}],
        }
    )


@pytest.fixture
def make_env(aiohttp_client: Callable[..., Awaitable[Client]], store: Store, upstream: Upstream) -> EnvFactory:
    """``await make_env(route_name, **policy)``: a proxy and its admin app on ``store``.

    Background reconciliation is off so that which request reconciles an
    operation (and so its decision) is deterministic; on-demand reconciliation runs."""

    async def factory(route: str, *, log_keys: bool = False, **policy: Any) -> Env:
        config = config_for(upstream, route, log_keys, **policy)
        proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
        admin = await aiohttp_client(build_admin_app(store, config))
        return Env(proxy, admin, upstream, store, route)

    return factory


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


# -- histograms and gauges -------------------------------------------------------------------------


async def test_upstream_overhead_and_ledger_histograms_get_observations(make_env: EnvFactory) -> None:
    env = await make_env("m-histograms")
    env.upstream.trickle_chunks, env.upstream.trickle_every_s = 3, 0.1  # the tool takes at least 300ms
    before = await scrape(env.admin)
    started = time.perf_counter()
    first = await env.proxy.post("/trickle", json={}, headers={"Idempotency-Key": "k"})
    assert (first.status, await first.text()) == (201, "chunk 0\nchunk 1\nchunk 2\n")
    elapsed_s = time.perf_counter() - started
    forwarded = Delta(before, await scrape(env.admin))
    replay = await env.measure(forward_once_again)
    retried = await env.measure(not_applied_then_new_attempt)

    route = env.route
    upstream_s = forwarded("idemproxy_upstream_duration_seconds_sum", route=route, method="POST")
    overhead_s = forwarded("idemproxy_overhead_seconds_sum", route=route)
    assert forwarded("idemproxy_upstream_duration_seconds_count", route=route, method="POST") == 1
    assert forwarded("idemproxy_overhead_seconds_count", route=route) == 1
    assert upstream_s >= 0.3
    assert 0 <= overhead_s < upstream_s  # the overhead excludes the tool's time
    assert upstream_s + overhead_s <= elapsed_s
    assert forwarded("idemproxy_upstream_duration_seconds_bucket", route=route, method="POST", le="0.25") == 0
    assert forwarded("idemproxy_upstream_duration_seconds_bucket", route=route, method="POST", le="+Inf") == 1
    assert forwarded("idemproxy_ledger_duration_seconds_count", operation="reserve") == 1
    assert forwarded("idemproxy_ledger_duration_seconds_count", operation="record") == 1
    assert forwarded("idemproxy_ledger_duration_seconds_count", operation="take_over") == 0
    assert forwarded("idemproxy_ledger_duration_seconds_sum", operation="reserve") > 0

    # A replay is a side-effecting request (proxy overhead, one ledger call) but no tool call.
    assert replay("idemproxy_overhead_seconds_count", route=route) == 1
    assert replay("idemproxy_upstream_duration_seconds_count", route=route) == 0
    assert replay("idemproxy_ledger_duration_seconds_count", operation="reserve") == 1
    assert replay("idemproxy_ledger_duration_seconds_count", operation="record") == 0

    # A released operation's new attempt takes it over.
    assert retried("idemproxy_ledger_duration_seconds_count", operation="take_over") == 1
    assert retried("idemproxy_upstream_duration_seconds_count", route=route, method="POST") == 2


async def forward_once_again(env: Env) -> None:
    assert (await env.proxy.post("/trickle", json={}, headers={"Idempotency-Key": "k"})).status == 201


async def not_applied_then_new_attempt(env: Env) -> None:
    for _ in range(2):
        assert (await env.proxy.post("/status/503", json={}, headers={"Idempotency-Key": "r"})).status == 503


async def test_connect_failure_is_counted_by_kind(
    aiohttp_client: Callable[..., Awaitable[Client]], store: Store, unused_tcp_port: int
) -> None:
    nowhere = f"http://127.0.0.1:{unused_tcp_port}"
    config = parse_config(
        {"store": "sqlite:///unused.db", "routes": [{"prefix": "/", "name": "m-down", "upstream": nowhere}]}
    )
    proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
    admin = await aiohttp_client(build_admin_app(store, config))
    before = await scrape(admin)
    response = await proxy.post("/items", json={}, headers={"Idempotency-Key": "k"})
    delta = Delta(before, await scrape(admin))

    assert await problem_type(response) == "upstream-unreachable"
    assert delta("idemproxy_upstream_failures_total", route="m-down", kind="connect") == 1
    assert delta("idemproxy_upstream_failures_total", route="m-down") == 1
    assert delta("idemproxy_requests_total", route="m-down", decision="forwarded") == 1


async def test_in_flight_gauge_counts_forwarded_operations_until_recorded(make_env: EnvFactory) -> None:
    env = await make_env("m-in-flight")
    before = await scrape(env.admin)
    first = asyncio.create_task(env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "k"}))
    await env.upstream.arrived.wait()
    during = Delta(before, await scrape(env.admin))
    env.upstream.release.set()
    assert (await first).status == 201
    after = Delta(before, await scrape(env.admin))

    assert during("idemproxy_in_flight_operations") == 1
    assert after("idemproxy_in_flight_operations") == 0


async def test_unresolved_gauge_equals_the_stores_count_by_state(make_env: EnvFactory, store: Store) -> None:
    env = await make_env("m-unresolved")
    first = asyncio.create_task(env.proxy.post("/gate", json={}, headers={"Idempotency-Key": "pending"}))
    await env.upstream.arrived.wait()
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": "unknown"})).status == 502
    await lost_ack_without_reconcile_method_with_key(env, "escalated")

    await refresh_unresolved_once(store)
    counts = await store.count_unresolved()
    gauge = await scrape(env.admin)
    env.upstream.release.set()
    assert (await first).status == 201
    await refresh_unresolved_once(store)
    settled = await scrape(env.admin)

    assert counts == {State.PENDING: 1, State.UNKNOWN: 1, State.NEEDS_ATTENTION: 1}
    for state, count in counts.items():
        assert gauge.value("idemproxy_unresolved_operations", state=state.value) == count
    assert settled.value("idemproxy_unresolved_operations", state="PENDING") == 0
    assert settled.value("idemproxy_unresolved_operations", state="UNKNOWN") == 1
    assert {sample.labels["state"] for sample in gauge.samples if sample.name == "idemproxy_unresolved_operations"} == {
        "PENDING",
        "UNKNOWN",
        "NEEDS_ATTENTION",
    }


async def lost_ack_without_reconcile_method_with_key(env: Env, key: str) -> None:
    assert (await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": key})).status == 502
    retry = await env.proxy.post("/reset", json={}, headers={"Idempotency-Key": key})
    assert await problem_type(retry) == "needs-attention"


# -- label hygiene -----------------------------------------------------------------------------------


async def test_no_label_value_is_a_key_an_operation_a_task_a_caller_or_a_path(make_env: EnvFactory) -> None:
    env = await make_env("m-labels", reconcile={"probe": LOOKUP, "found": {"status": 201}})
    key, task, caller = "KEY-7f3a9c-secret", "TASK-5521-run", "CALLER-agent-42"
    headers = {"Idempotency-Key": key, "X-Agent-Task": task, "X-Idem-Caller": caller}
    for body in ({"n": 1}, {"n": 1}, {"n": 2}):  # forwarded, replayed, mismatch
        await env.proxy.post("/items/ORDER-9911", json=body, headers=headers)
    await env.proxy.post("/reset", json={}, headers={**headers, "Idempotency-Key": key + "-r"})
    await env.proxy.post("/reset", json={}, headers={**headers, "Idempotency-Key": key + "-r"})  # reconciled
    await env.proxy.get("/items/ORDER-9911?user=USER-31337")
    exposition = await scrape(env.admin)

    forbidden = [key, task, caller, "ORDER-9911", "USER-31337", env.op_id(key, caller), env.op_id(key + "-r", caller)]
    mentions = [
        (name, label, value)
        for name, label, value in exposition.label_values()
        if any(secret.lower() in value.lower() for secret in forbidden)
    ]
    assert mentions == []
    assert exposition.value("idemproxy_requests_total", route="m-labels", decision="mismatch") >= 1
    assert exposition.value("idemproxy_reconciler_probes_total", route="m-labels", result="found") >= 1
    labels = {label for name, label, _ in exposition.label_values() if name.startswith("idemproxy_")}
    assert labels <= {"route", "method", "decision", "kind", "operation", "state", "result", "outcome", "le"} | {
        "version",
        "python",
        "reason",  # idemproxy_store_unsafe: an enum (eviction)
    }


async def test_methods_outside_the_standard_set_are_folded_into_other(make_env: EnvFactory) -> None:
    env = await make_env("m-methods")
    delta = await env.measure(propfind)

    assert delta("idemproxy_requests_total", route="m-methods", method="other", decision="passthrough") == 1
    assert all(sample.labels.get("method") != "PROPFIND" for sample in delta.after.samples)


async def propfind(env: Env) -> None:
    assert (await env.proxy.request("PROPFIND", "/items")).status == 201


# -- access log --------------------------------------------------------------------------------------

ACCESS_FIELDS = {"method", "route", "decision", "status", "op", "task", "attempt", "total_ms", "upstream_ms"}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "idemproxy.access"]


async def test_access_log_has_one_json_line_per_request_without_keys_or_paths(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy.access")
    env = await make_env("m-access")
    key = {"Idempotency-Key": "KEY-access-1f9e", "X-Agent-Task": "task-77"}
    released = {"Idempotency-Key": "KEY-released-8c2d"}
    responses = [
        await env.proxy.post("/items", json={"note": "BODY-SECRET"}, headers=key),
        await env.proxy.post("/items", json={"note": "BODY-SECRET"}, headers=key),
        await env.proxy.post("/items", json={"note": "other"}, headers=key),
        await env.proxy.post("/items", json={}),
        await env.proxy.get("/items?q=QUERY-SECRET"),
        await env.proxy.post("/status/503", json={}, headers=released),
        await env.proxy.post("/status/503", json={}, headers=released),
    ]
    records = access_records(caplog)
    expected = [
        ("POST", "forwarded", env.op_id("KEY-access-1f9e"), "task-77", 1),
        ("POST", "replayed", env.op_id("KEY-access-1f9e"), "task-77", 1),
        ("POST", "mismatch", env.op_id("KEY-access-1f9e"), "task-77", 1),
        ("POST", "rejected", None, None, None),
        ("GET", "passthrough", None, None, None),
        ("POST", "forwarded", env.op_id("KEY-released-8c2d"), None, 1),
        ("POST", "forwarded", env.op_id("KEY-released-8c2d"), None, 2),
    ]

    assert len(records) == len(responses)
    formatter = JsonFormatter()
    for record, response, (method, decision, op, task, attempt) in zip(records, responses, expected, strict=True):
        line = formatter.format(record)
        assert "\n" not in line
        entry = orjson.loads(line)
        assert entry.keys() >= ACCESS_FIELDS
        assert (entry["method"], entry["route"], entry["decision"]) == (method, "m-access", decision)
        assert (entry["status"], entry["op"], entry["task"], entry["attempt"]) == (response.status, op, task, attempt)
        assert isinstance(entry["total_ms"], float)
        assert isinstance(entry["upstream_ms"], float)
        assert entry["total_ms"] >= entry["upstream_ms"] >= 0
        assert (entry["upstream_ms"] > 0) == (decision in {"forwarded", "passthrough"})
        assert "key" not in entry
        assert "path" not in entry
        for secret in ("KEY-access", "KEY-released", "BODY-SECRET", "QUERY-SECRET", "/items", "/status"):
            assert secret not in line


async def test_access_log_carries_key_and_path_only_with_log_keys(
    make_env: EnvFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy.access")
    env = await make_env("m-access-debug", log_keys=True)
    response = await env.proxy.post("/items?x=1", json={"n": 1}, headers={"Idempotency-Key": "KEY-debug-4e1b"})

    [record] = access_records(caplog)
    entry = orjson.loads(JsonFormatter().format(record))
    assert response.status == 201
    assert entry["key"] == "KEY-debug-4e1b"
    assert entry["path"] == "/items?x=1"
    assert entry["op"] == env.op_id("KEY-debug-4e1b")
    assert entry["decision"] == "forwarded"
    assert math.isfinite(entry["total_ms"])

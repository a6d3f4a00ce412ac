"""Metrics and the access log, read the way Prometheus and an operator read them: histograms
and gauges, label hygiene (no key, body or unbounded value ever becomes a label), and the
one JSON access log line per request.

Driven through the in-process proxy (both stores) and read back from the admin app's
``/metrics``; counters are compared as deltas (the registry is process-global).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest

from idemproxy.app import build_admin_app, build_proxy_app, refresh_unresolved_once
from idemproxy.config.settings import parse_config
from idemproxy.lifecycle.records import State
from idemproxy.logs import JsonFormatter
from idemproxy.store import Store
from tests.support.metrics import Client, Delta, Env, EnvFactory, scrape
from tests.support.problems import problem_type

LOOKUP = {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}


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
        "where",  # idemproxy_ledger_records_vanished_total: an enum (lease, record)
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

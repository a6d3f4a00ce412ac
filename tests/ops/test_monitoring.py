"""The monitoring kit (dashboard, alert rules) against promtool and a real Prometheus.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package, which
``make test`` installs (``scripts/bootstrap.sh monitoring``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.store import Store
from tests.conftest import proxy_config
from tests.support.monitoring import (
    ALERT_TESTS,
    ALERTS,
    DATASOURCE,
    METRIC_NAME,
    METRICS_DOC,
    ROUTE,
    SELECTOR,
    Client,
    alert_rules,
    concrete,
    dashboard,
    data_panels,
    drive_traffic,
    exposed_families,
    exposed_samples,
    github_anchors,
    has_finite_value,
    panel_exprs,
    post_status,
    prometheus_scraping,
    run_tool,
    running,
    until,
    write_proxy_config,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import Upstream

# -- the dashboard -----------------------------------------------------------------------------------

#: Labels Prometheus (and the Kubernetes service discovery's relabeling) adds to every series.
TARGET_LABELS = frozenset({"namespace", "job", "instance"})


def test_dashboard_switches_datasource_namespace_job_instance_and_route() -> None:
    board = dashboard()
    assert "__inputs" not in board  # the datasource variable serves imports and provisioning alike
    assert board["uid"] == "idemproxy"
    assert board["id"] is None  # Grafana assigns one on import
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    route = variables["route"]
    assert route["datasource"]["uid"] == DATASOURCE
    assert (route["includeAll"], route["multi"], route["allValue"]) == (True, True, ".*")
    match = re.fullmatch(r"label_values\((idemproxy_[a-z_]+)\{[^}]*\}, route\)", route["query"]["query"])
    assert match is not None
    assert "route" in exposed_samples()[match.group(1)].labels
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert list(variables) == ["datasource", "namespace", "job", "instance", "route"]
    for name in ("namespace", "job", "instance"):
        scoped = variables[name]
        assert scoped["datasource"]["uid"] == DATASOURCE
        assert (scoped["includeAll"], scoped["multi"], scoped["allValue"]) == (True, True, ".*")
        assert scoped["query"]["query"].endswith(f", {name})")


def test_every_panel_honours_the_scope_variables() -> None:
    """Each selector filters by namespace, job and instance, and by route where its metric has one."""
    samples = exposed_samples()
    for where, expr in panel_exprs(dashboard()):
        for name, matchers in SELECTOR.findall(expr):
            for variable in ("namespace", "job", "instance"):
                assert f'{variable}=~"${variable}"' in matchers, f"{where}: {name} ignores ${variable}"
            if "route" in samples[name].labels:
                assert 'route=~"$route"' in matchers, f"{where}: {name} ignores $route"


def test_every_dashboard_panel_queries_idemproxy_metrics_that_exist() -> None:
    board = dashboard()
    panels = data_panels(board)
    samples = exposed_samples()
    ids = [panel["id"] for panel in board["panels"]] + [
        panel["id"] for row in board["panels"] for panel in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    assert len(panels) >= 10
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE, title
        assert panel.get("description"), title
        assert 0 <= panel["gridPos"]["x"] < panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, title
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, title
            expr = target["expr"]
            assert expr.strip(), f"{title}/{target['refId']} has an empty expr"
            named = METRIC_NAME.findall(expr)
            assert named, f"{title}: {expr!r} names no idemproxy metric"
            unknown = set(named) - samples.keys()
            assert not unknown, f"{title}: {sorted(unknown)} are not in proxy/metrics.py"
            for name, matchers in SELECTOR.findall(expr):
                for label in re.findall(r"([a-zA-Z_]+)\s*=~?", matchers):
                    if label in TARGET_LABELS:
                        continue  # added by the scrape, not by idemproxy
                    assert label in samples[name].labels, f"{title}: {name} has no label {label!r}"


def test_dashboard_covers_every_required_view() -> None:
    exprs = [expr for _, expr in panel_exprs(dashboard())]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert {
        "idemproxy_requests_total",  # traffic by decision
        "idemproxy_duplicate_side_effects_prevented_total",
        "idemproxy_overhead_seconds_bucket",
        "idemproxy_upstream_duration_seconds_bucket",
        "idemproxy_ledger_duration_seconds_bucket",
        "idemproxy_upstream_failures_total",
        "idemproxy_unresolved_operations",
        "idemproxy_in_flight_operations",
        "idemproxy_reconciler_probes_total",
        "idemproxy_reconciled_operations_total",
        "idemproxy_store_errors_total",
    } <= used
    assert any("sum by (decision)" in expr and "idemproxy_requests_total" in expr for expr in exprs)
    for quantile in ("0.5", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "idemproxy_overhead_seconds" in e for e in exprs)
    assert any('decision=~"fail_closed' in expr for expr in exprs)


# -- alert rules ----------------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    result = run_tool("promtool", "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = run_tool("promtool", "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_documented_and_unit_tested_firing_and_silent() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    anchors = github_anchors(METRICS_DOC.read_text(encoding="utf-8"))
    samples = exposed_samples()
    assert len(names) == len(rules)
    assert {
        "IdemproxyOperationsNeedAttention",
        "IdemproxyUnknownOperationsPilingUp",
        "IdemproxyStoreUnreachable",
        "IdemproxyStoreUnsafe",
        "IdemproxyFailClosedRejections",
        "IdemproxyOverheadHigh",
        "IdemproxyReconcilerFailing",
    } <= names
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/metrics.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"docs/metrics.md has no heading for #{anchor}"
        assert set(METRIC_NAME.findall(rule["expr"])) <= samples.keys(), name

    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERTS.name]
    checks = [check for case in tests["tests"] for check in case["alert_rule_test"]]
    fired = {check["alertname"] for check in checks if check["exp_alerts"]}
    silent = {check["alertname"] for check in checks if not check["exp_alerts"]}
    assert fired == names
    assert silent == names


# -- the live exposition -------------------------------------------------------------------------------


async def test_promtool_accepts_the_live_exposition_after_traffic(
    aiohttp_client: Callable[..., Awaitable[Client]], store: Store, upstream: Upstream
) -> None:
    config = proxy_config(
        upstream.url, reconcile={"probe": {"url": "{upstream}/lookup?key={key}", "match": "matches[0]"}}
    )
    proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
    admin = await aiohttp_client(build_admin_app(store, config))
    statuses = [
        (await proxy.post(path, json=body, headers={"Idempotency-Key": key})).status
        for path, body, key in [
            ("/items", {"n": 1}, "a"),
            ("/items", {"n": 1}, "a"),
            ("/items", {"n": 2}, "a"),
            ("/reset", {}, "r"),
            ("/reset", {}, "r"),
            ("/status/503", {}, "s"),
        ]
    ]
    await proxy.get("/items")
    exposition = await (await admin.get("/metrics")).read()

    assert statuses == [201, 201, 422, 502, 200, 503]
    names = {family.name for family in text_string_to_metric_families(exposition.decode())}
    assert {"idemproxy_requests", "idemproxy_overhead_seconds", "idemproxy_reconciler_probes"} <= names
    result = run_tool("promtool", "check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


# -- real processes ------------------------------------------------------------------------------------


PHASE_STATUSES = [201, 201, 422, 502, 201, 201, 400]


async def test_real_prometheus_scrapes_the_proxy_and_every_panel_and_alert_has_data(
    upstream: Upstream, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    config_file, listen, admin = write_proxy_config(tmp_path, upstream, redis_server.url)
    base = f"http://127.0.0.1:{listen}"
    command = [sys.executable, "-m", "idemproxy", "run", "--config", str(config_file)]
    exprs = panel_exprs(dashboard())
    try:
        async with (
            running(*command) as proxy,
            prometheus_scraping(tmp_path, admin) as prometheus,
            aiohttp.ClientSession() as session,
        ):
            await proxy.wait_for(b"idemproxy listening")
            await until(lambda: prometheus.query('up{job="idemproxy"} == 1'), "the first successful scrape")

            # Two rounds of traffic, so every series has grown between two scrapes (rates, quantiles).
            assert await drive_traffic(session, base, "a") == PHASE_STATUSES
            await until(
                lambda: prometheus.query("sum(idemproxy_requests_total) >= 7"), "a scrape after the first round"
            )
            assert await drive_traffic(session, base, "b") == PHASE_STATUSES

            # The ledger goes away: side-effecting calls fail closed, store errors are counted.
            redis_server.kill()
            fail_closed = 'idemproxy_requests_total{decision="fail_closed"}'
            assert await post_status(session, f"{base}/items", "down-1") == 503
            await until(lambda: prometheus.query(fail_closed), "a scrape of the first fail-closed request")
            assert await post_status(session, f"{base}/items", "down-2") == 503

            async def all_panels_have_data() -> dict[str, list[dict[str, Any]]] | None:
                results = {where: await prometheus.query(concrete(expr, ROUTE)) for where, expr in exprs}
                return results if all(has_finite_value(result) for result in results.values()) else None

            async def outage_alerts_active() -> dict[str, list[dict[str, Any]]] | None:
                alerts = await prometheus.active_alerts()
                wanted = {"IdemproxyFailClosedRejections", "IdemproxyStoreUnreachable"}
                return alerts if wanted <= alerts.keys() else None

            results = await until(all_panels_have_data, "every panel's query to return data")
            alerts = await until(outage_alerts_active, "the store-outage alerts to go pending")
            routes = await prometheus.api("label/route/values", **{"match[]": "idemproxy_requests_total"})
            rules = await prometheus.api("rules")
            store_errors = await prometheus.scalar('sum(idemproxy_store_errors_total{operation="reserve"})')
            fail_closed_total = await prometheus.scalar(f"sum({fail_closed})")
            prevented = await prometheus.scalar("sum(idemproxy_duplicate_side_effects_prevented_total)")
            probes_found = await prometheus.scalar('sum(idemproxy_reconciler_probes_total{result="found"})')
    finally:
        redis_server.kill()

    assert sorted(results) == sorted(where for where, _ in exprs)
    for where, result in results.items():
        assert result, f"{where} returned no series"
    assert routes == [ROUTE]
    evaluated = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(evaluated) == len(alert_rules())
    assert all(rule["health"] == "ok" for rule in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    assert [alert["labels"]["route"] for alert in alerts["IdemproxyFailClosedRejections"]] == [ROUTE]
    # Healthy in this run: nothing needs attention, probes succeed, no 500s, no fail-open route.
    assert not alerts.keys() & {
        "IdemproxyOperationsNeedAttention",
        "IdemproxyUnknownOperationsPilingUp",
        "IdemproxyReconcilerFailing",
        "IdemproxyInternalErrors",
        "IdemproxyFailOpenForwarding",
        "IdemproxyStoreUnsafe",  # the Redis runs noeviction
    }
    assert fail_closed_total == 2
    assert store_errors == 2
    assert prevented == 4  # per round: the replay and the reconciled retry
    assert probes_found == 2  # one per lost acknowledgment: a claim keeps probes from doubling


# -- several worker processes ---------------------------------------------------------------------------


async def test_metrics_aggregate_across_worker_processes(upstream: Upstream, tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    command = [
        sys.executable, "-m", "idemproxy", "run", "--workers", "2",
        "--upstream", upstream.url,
        "--listen", f"127.0.0.1:{listen}",
        "--admin-listen", f"127.0.0.1:{admin}",
        "--store", f"sqlite:///{tmp_path / 'ledger.db'}",
    ]  # fmt: skip
    requests = 24
    async with running(*command, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}) as proxy:
        await proxy.wait_for(b"idemproxy listening", times=2)
        for number in range(requests):  # a new connection each: the kernel spreads them over the workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                assert await post_status(session, f"http://127.0.0.1:{listen}/items", f"k{number}") == 201
        expositions = []
        for _ in range(10):
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
                session.get(f"http://127.0.0.1:{admin}/metrics") as response,
            ):
                expositions.append(await response.read())
        access = [orjson.loads(line) for line in proxy.lines if b'"idemproxy.access"' in line]

    assert len({entry["pid"] for entry in access}) == 2, "both workers served requests"
    for exposition in expositions:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition.decode())
            for sample in family.samples
        }
        forwarded = (("decision", "forwarded"), ("method", "POST"), ("route", "default"))
        assert samples[("idemproxy_requests_total", forwarded)] == requests
        assert samples[("idemproxy_overhead_seconds_count", (("route", "default"),))] == requests
        assert samples[("idemproxy_in_flight_operations", ())] == 0
        build_info = [value for (name, _), value in samples.items() if name == "idemproxy_build_info"]
        assert build_info == [1]
    result = run_tool("promtool", "check", "metrics", stdin=expositions[0])
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_metrics_table_lists_every_metric_with_its_type_and_labels() -> None:
    section = METRICS_DOC.read_text(encoding="utf-8").split("# Metrics and dashboards", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(idemproxy_[a-z_]+)` \| (\w+) \| ([^|]+) \|", section, re.MULTILINE)
    documented = {name: (kind, frozenset(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    expected = {}
    for family in exposed_families().values():
        name = family.name + ("_total" if family.kind == "counter" else "")
        expected[name] = (family.kind, family.labels - {"le"})
    assert documented == expected

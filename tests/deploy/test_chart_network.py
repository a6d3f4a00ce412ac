"""The Helm chart's network exposure: every other pod in the cluster is hostile.

In every scenario (``tests/deploy/scenarios.py``) the rendered NetworkPolicies admit only
the callers each port is for (agents to the proxy port, Prometheus to metrics, operators
to the admin API), the admin listener stays on loopback unless authentication is on, and
the values that would expose more are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import helm_python
import pytest

from tests.deploy.charts import (
    CHART,
    KUBERNETES_VERSIONS,
    Manifest,
    notes,
    problems,
    render,
)
from tests.deploy.scenarios import (
    FULLNAME,
    IDS,
    SCENARIOS,
    Scenario,
    idemproxy_container,
    loaded_config,
    one,
    reachable_ports,
    rendered,
)

# -- network exposure: every other pod in the cluster is hostile ---------------------------------

#: An identity that may use the operations API: what an admin listener off loopback needs.
OPERATOR_AUTH = {"identities": [{"name": "operator", "tokens": ["sha256:" + "0" * 64], "ops": "admin"}]}
LOOPBACK = ["127.0.0.1", "127.10.0.1", "::1", "localhost"]
OFF_LOOPBACK = ["0.0.0.0", "::", "10.1.2.3", "idemproxy-admin", "127.0.0.256"]
AGENTS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agents"}}}
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
OPERATORS = {"ipBlock": {"cidr": "10.20.0.0/16"}}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def pod_labels(manifests: list[Manifest], kind: str, name: str | None = None) -> dict[str, str]:
    labels: dict[str, str] = one(manifests, kind, name).body["spec"]["template"]["metadata"]["labels"]
    return labels


def admitted(policy: Manifest) -> dict[int, list[dict[str, Any]] | None]:
    """port -> the peers the policy admits to it (None: any source)."""
    spec = policy.body["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert "egress" not in spec
    found: dict[int, list[dict[str, Any]] | None] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            assert port["port"] not in found, f"port {port['port']} in two rules"
            found[port["port"]] = rule.get("from")
    return found


def valid(manifests: list[Manifest]) -> None:
    found = [problem for version in KUBERNETES_VERSIONS for m in manifests for problem in problems(m, version)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("address", LOOPBACK + OFF_LOOPBACK)
def test_schema_keeps_the_operations_api_on_loopback_unless_auth_guards_it(address: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        values = {**chart.values, "upstream": "http://tool:9000", "adminBindAddress": address}
        if address in LOOPBACK:
            chart.validate_schema(values)
        else:
            with pytest.raises(helm_python.HelmValuesError, match="at '/config': missing property 'auth'"):
                chart.validate_schema(values)
        chart.validate_schema({**values, "config": {**chart.values["config"], "auth": OPERATOR_AUTH}})
    if address not in LOOPBACK:
        with pytest.raises(helm_python.HelmError, match="don't meet the specifications of the schema"):
            render(CHART, {"upstream": "http://tool:9000", "adminBindAddress": address})


@pytest.mark.parametrize("address", LOOPBACK + OFF_LOOPBACK)
def test_chart_and_proxy_agree_on_what_loopback_is(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin port is declared (and published) exactly when the proxy's own rule says the
    listener is reachable from outside the pod."""
    manifests = render(
        CHART, {"upstream": "http://tool:9000", "adminBindAddress": address, "config": {"auth": OPERATOR_AUTH}}
    )
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert config.admin_listen.host == address
    _, container = idemproxy_container(manifests)
    declared = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(declared.values()) == reachable_ports(config)
    assert ("admin" in declared) is (address not in LOOPBACK)


def test_chart_listeners_win_over_the_image_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other ports and IPv6 addresses: the container's IDEMPROXY_*_LISTEN carry them past the
    image's own defaults (which would win over the file), IPv6 hosts bracketed."""
    values = {
        "upstream": "http://tool:9000",
        "ports": {"proxy": 9100, "admin": 9101, "metrics": 9102},
        "bindAddress": "::",
        "adminBindAddress": "::1",
    }
    manifests = render(CHART, values)
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert (str(config.listen), str(config.admin_listen), str(config.metrics_listen)) == (
        "[::]:9100",
        "[::1]:9101",
        "[::]:9102",
    )
    _, container = idemproxy_container(manifests)
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"proxy": 9100, "metrics": 9102}


def test_exposed_operations_api_is_declared_and_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    manifests = render(CHART, values)
    valid(manifests)
    config = loaded_config(manifests, tmp_path, monkeypatch)
    assert str(config.admin_listen) == "0.0.0.0:8081"
    assert config.auth is not None
    _, container = idemproxy_container(manifests)
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "proxy": 8080,
        "metrics": 8082,
        "admin": 8081,
    }
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    service = one(manifests, "Service").body
    assert {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        "proxy": (8080, "proxy"),
        "metrics": (8082, "metrics"),
        "admin": (8081, "admin"),
    }
    assert f"also http://{FULLNAME}.agents.svc:8081" in notes(CHART, values)


def test_templates_refuse_an_unguarded_operations_api_when_the_schema_is_skipped(tmp_path: Path) -> None:
    """helm install --skip-schema-validation: the chart still refuses (as the proxy would at start)."""
    chart = tmp_path / "idemproxy"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=r"adminBindAddress 0\.0\.0\.0 is not loopback"):
        render(chart, {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0"})
    assert render(
        chart, {"upstream": "http://tool:9000", "adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    )


def test_notes_say_where_metrics_and_the_operations_api_are() -> None:
    standalone = notes(CHART, {"upstream": "http://tool:9000"})
    assert f"http://{FULLNAME}.agents.svc:8082/metrics" in standalone
    assert f"kubectl -n agents port-forward deployment/{FULLNAME} 8081" in standalone
    assert "idemproxy ops --admin http://127.0.0.1:8081 list" in standalone
    assert ".svc:8081" not in standalone  # not published
    sidecar = notes(CHART, {"upstream": "http://tool:9000", "mode": "sidecar"})
    assert "kubectl -n agents port-forward pod/AGENT_POD 8081" in sidecar
    assert "port 8082 (idem-metrics)" in sidecar


@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_no_network_policy_unless_enabled(scenario: Scenario, agent_chart: Path) -> None:
    policies = [m for m in rendered(scenario, agent_chart) if m.kind == "NetworkPolicy"]
    enabled = scenario.values.get("networkPolicy", {}).get("enabled", False)
    assert len(policies) == (1 if enabled else 0)
    assert scenario.id != "sqlite" or not policies  # the defaults


def test_network_policy_admits_the_configured_peers_on_the_proxy_and_metrics_ports(agent_chart: Path) -> None:
    scenario = SCENARIOS[1]
    manifests = rendered(scenario, agent_chart)
    policy = one(manifests, "NetworkPolicy")
    assert policy.body["apiVersion"] == "networking.k8s.io/v1"
    assert policy.name == FULLNAME
    assert selects(policy.body["spec"]["podSelector"], pod_labels(manifests, "Deployment"))
    configured = scenario.values["networkPolicy"]
    assert admitted(policy) == {8080: configured["proxyFrom"], 8082: configured["metricsFrom"]}
    assert configured["proxyFrom"] == [AGENTS]
    assert configured["metricsFrom"] == [PROMETHEUS]
    # Every port the pod declares has a rule, and nothing else does.
    _, container = idemproxy_container(manifests)
    assert set(admitted(policy)) == {port["containerPort"] for port in container["ports"]}


@pytest.mark.parametrize("exposed", [False, True], ids=["admin-on-loopback", "admin-exposed"])
def test_network_policy_admits_the_admin_port_only_when_it_is_exposed(exposed: bool) -> None:
    values: dict[str, Any] = {
        "upstream": "http://tool:9000",
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [AGENTS],
            "metricsFrom": [PROMETHEUS],
            "adminFrom": [OPERATORS],
        },
    }
    if exposed:
        values |= {"adminBindAddress": "0.0.0.0", "config": {"auth": OPERATOR_AUTH}}
    manifests = render(CHART, values)
    valid(manifests)
    expected = {8080: [AGENTS], 8082: [PROMETHEUS]} | ({8081: [OPERATORS]} if exposed else {})
    assert admitted(one(manifests, "NetworkPolicy")) == expected
    _, container = idemproxy_container(manifests)
    assert set(expected) == {port["containerPort"] for port in container["ports"]}


def test_network_policy_empty_lists() -> None:
    """No proxyFrom: the proxy from any source. No metricsFrom or adminFrom: no pod at all."""
    values = {
        "upstream": "http://tool:9000",
        "adminBindAddress": "0.0.0.0",
        "config": {"auth": OPERATOR_AUTH},
        "networkPolicy": {"enabled": True},
    }
    manifests = render(CHART, values)
    valid(manifests)
    assert admitted(one(manifests, "NetworkPolicy")) == {8080: None}
    assert "Prometheus cannot scrape idemproxy" in notes(CHART, values)
    assert "Prometheus cannot scrape" not in notes(CHART, {**values, "networkPolicy": {"metricsFrom": [PROMETHEUS]}})


def test_network_policy_keeps_the_bundled_redis_to_the_proxy() -> None:
    values = {"upstream": "http://tool:9000", "redis": {"enabled": True}, "networkPolicy": {"enabled": True}}
    manifests = render(CHART, values)
    valid(manifests)
    proxy_pods = pod_labels(manifests, "Deployment")
    redis_pods = pod_labels(manifests, "StatefulSet", f"{FULLNAME}-redis")
    proxy_policy = one(manifests, "NetworkPolicy", FULLNAME).body["spec"]
    # The Redis pods share the proxy's selector labels: its policy must not catch them.
    assert selects(proxy_policy["podSelector"], proxy_pods)
    assert not selects(proxy_policy["podSelector"], redis_pods)
    redis_policy = one(manifests, "NetworkPolicy", f"{FULLNAME}-redis")
    assert selects(redis_policy.body["spec"]["podSelector"], redis_pods)
    assert not selects(redis_policy.body["spec"]["podSelector"], proxy_pods)
    assert list(admitted(redis_policy)) == [6379]
    [peer] = admitted(redis_policy)[6379] or []
    assert set(peer) == {"podSelector"}  # this namespace only
    assert selects(peer["podSelector"], proxy_pods)
    assert not selects(peer["podSelector"], redis_pods)
    off = render(CHART, {**values, "networkPolicy": {"enabled": True, "redis": False}})
    assert [m.name for m in off if m.kind == "NetworkPolicy"] == [FULLNAME]


CREDENTIALED_ROUTE = {
    "name": "tickets",
    "prefix": "/",
    "upstream": "http://tool:9000",
    "upstream_headers": {"Authorization": "env:TOOL_TOKEN"},
}


@pytest.mark.parametrize("address", LOOPBACK + OFF_LOOPBACK)
def test_schema_lends_no_credentials_to_unauthenticated_callers_in_the_cluster(address: str) -> None:
    """A standalone proxy off loopback whose routes inject credentials needs config.auth, or the
    operator's explicit word that the network is trusted; a sidecar listens on loopback."""
    with helm_python.Chart.load(CHART) as chart:
        config = {**chart.values["config"], "routes": [CREDENTIALED_ROUTE]}
        values = {**chart.values, "upstream": "", "bindAddress": address, "config": config}
        if address in LOOPBACK:
            chart.validate_schema(values)
        else:
            with pytest.raises(helm_python.HelmValuesError, match="at '/config'"):
                chart.validate_schema(values)
        chart.validate_schema({**values, "config": {**config, "auth": OPERATOR_AUTH}})
        chart.validate_schema({**values, "config": {**config, "allow_unauthenticated_credential_use": True}})
        chart.validate_schema({**values, "mode": "sidecar"})
        plain = {**CREDENTIALED_ROUTE}
        del plain["upstream_headers"]
        chart.validate_schema({**values, "config": {**config, "routes": [plain]}})
